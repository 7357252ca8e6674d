"""The template's own tests: the conformance kit on every component it registers.

Run them with `pytest plugins/ev3-template/tests` after `pip install -e plugins/ev3-template`.
"""

import pytest

import ev3core
import ev3core.testing as et

PLUGINS = ev3core.load_plugins(only=["template"])
CASES = [
    (kind, name, ex)
    for kind, name, ex in et.registered_examples(PLUGINS)  # every kind the kit checks
    if PLUGINS.components(kind)[name].plugin == "template"
]


def test_the_plugin_is_found_through_its_entry_point():
    names = {(kind, name) for kind, name, _ in CASES}
    assert names == {("proposer", "signum"), ("assessor", "top_k"), ("scheduler", "margin")}


@pytest.mark.parametrize("case", CASES, ids=lambda c: c[2].label)
def test_component_conforms(case):
    kind, _, example = case
    report = et.check_example(kind, example)
    assert {"jit", "pure", "no_recompile"} <= set(report)
    # Every check either ran or says why it does not apply to this kind.
    assert set(report) | set(report.not_applicable) == set(et.CHECKS)
    if kind in ("proposer", "assessor"):
        assert "dtype" in report  # bfloat16 and float16 models
