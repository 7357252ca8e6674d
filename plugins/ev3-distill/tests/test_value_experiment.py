"""The `value` experiment (`ev3 run` with no arguments): one scenario, every method at equal
compute, the comparison printed and written; bad options refused before any work."""

import json

import jax
import pytest
from ev3_distill._scenarios import SCENARIOS
from ev3_distill._value_experiment import value_experiment

import ev3core
from ev3core.errors import ConfigurationError


@pytest.fixture(autouse=True)
def _standard_promotion():
    # optax's Adam mixes int and float arrays in its bias correction (strict promotion
    # rejects it); the experiment runs with JAX's default promotion, as a user's would.
    with jax.numpy_dtype_promotion("standard"):
        yield


def test_value_is_the_default_experiment_and_is_listed():
    plugins = ev3core.plugin_manager()
    assert plugins.pm.hook.ev3_default_experiment() == "value"
    assert "value" in plugins.components("experiment")


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"scenario": "noise"}, "is not a value scenario"),
        ({"dataset": "mnist1d"}, "--experiment distill --dataset"),
        ({"pipeline": "p.py"}, "takes no pipeline file"),
        ({"resume": "runs/x"}, "run it again instead of --resume"),
        ({"observers": ["jsonl"]}, "no per-step observers"),
        ({"chunk": 5}, "takes no --chunk"),
        ({"steps": 0}, "at least one iteration"),
    ],
)
def test_bad_options_are_refused_before_any_work(options, message, tmp_path):
    with pytest.raises(ConfigurationError, match=message):
        value_experiment(out=tmp_path / "out", progress=False, **options)
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_one_scenario_end_to_end(tmp_path, capsys):
    out = tmp_path / "out"
    summary = value_experiment(
        scenario="noise_sym_pretrained", seed=1, steps=4, trajectory=5, out=out
    )
    written = json.loads((out / "summary.json").read_text())
    assert written["scenario"] == "noise_sym_pretrained" and written["seed"] == 1
    methods = written["methods"]
    assert set(methods) == {"ev3", "grid", "random", "pbt", "plain"}
    # equal compute: K = 9 configurations x 5 steps x 4 iterations for every method
    assert {m["gradient_evaluations"] for m in methods.values()} == {180}
    best = written["best_alternative"]
    assert best in {"grid", "random", "pbt", "plain"}
    assert (
        max(methods[m]["test"] for m in ("grid", "random", "pbt", "plain"))
        == (methods[best]["test"])
    )
    assert written["ev3_minus_best_alternative"] == pytest.approx(
        methods["ev3"]["test"] - methods[best]["test"]
    )
    for m in methods.values():
        assert m["curve_x"][-1] == m["gradient_evaluations"] and len(m["curve"]) == len(
            m["curve_x"]
        )
    assert (out / "report.png").stat().st_size > 0
    assert summary["outputs"] == [str(out / "summary.json"), str(out / "report.png")]
    err = capsys.readouterr().err
    assert "EV3 - best alternative" in err and "180 grad. evals" in err
    assert set(SCENARIOS) >= {written["scenario"]}
