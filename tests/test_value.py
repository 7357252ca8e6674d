"""The equal-compute comparison (`benchmarks/value.py`): compute accounting, the quick mode end
to end, and no method selecting on the test split."""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import sys
from pathlib import Path
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from ev3_distill import _scenarios

import ev3core as ev3

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "value.py"


@pytest.fixture(autouse=True)
def _standard_promotion():
    # optax's Adam (plain or through inject_hyperparams) mixes int and float arrays in its
    # bias correction, which strict promotion rejects; the benchmark runs with the default.
    with jax.numpy_dtype_promotion("standard"):
        yield


@pytest.fixture(scope="module")
def value():
    spec = importlib.util.spec_from_file_location("value_benchmark", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["value_benchmark"] = module
    spec.loader.exec_module(module)
    return module


class Counting(ev3.AbstractLoss):
    """Wraps a loss and reports every evaluation to the host (one per gradient evaluation:
    under `vmap` the callback runs once per candidate)."""

    inner: Any
    sink: Any = eqx.field(static=True)

    @property
    def label(self):
        return type(self).__name__

    def __call__(self, model, batch, key):
        value = self.inner(model, batch, key)
        jax.debug.callback(lambda v: self.sink.append(1), value)
        return value


def _tiny(value):
    """Two seeds of the label-noise scenario cut to 64 examples per split, stacked as the
    benchmark stacks them."""
    prob = value.build_label_problem("noise_sym_scratch", [0, 1])
    d = {k: tuple(a[:, :64] for a in v) for k, v in prob["data"].items()}
    models = [value._digits_mlp(jax.random.key(i)) for i in range(2)]
    params0, static = eqx.partition(value.tree_stack(models), eqx.is_array)
    return d, params0, static


@pytest.mark.slow
def test_compute_is_equal_across_methods(value):
    budget = value.Budget(trajectory=3, iterations=2)
    d, params0, static = _tiny(value)
    (losses, lrs), _ = value.label_configs("noise_sym_scratch", jax.random.key(0), 6)
    K = len(losses) * len(lrs)
    expected = budget.total(K)  # per seed
    keys = jnp.stack([jax.random.key(1), jax.random.key(2)])
    sizes = {"assess": 64, "decide": 64}
    counts = {}
    for name in ("ev3", "pbt", "grid"):
        sink: list[int] = []
        counted = [Counting(loss, sink) for loss in losses]
        if name == "grid":
            cfg_losses, cfg_lrs, labels = value._grid_configs(counted, lrs)
            dec, _ = value.search_configs(
                static,
                params0,
                cfg_losses,
                cfg_lrs,
                d["train"],
                d["decide"],
                d["test"],
                keys,
                value.accuracy_of,
                budget.iterations,
                budget.trajectory,
            )
            assert dec.shape == (2, K, budget.iterations + 1)
        else:
            if name == "ev3":
                engine = value.label_engine("noise_sym_scratch", counted, lrs, budget, sizes)
                data = ev3.Data(propose=d["train"], assess=d["assess"], decide=d["decide"])
            else:
                engine = value.pbt_engine(counted, lrs, budget, ev3.Accuracy(), 64)
                data = ev3.Data(propose=d["train"], assess=d["decide"], decide=d["decide"])
            arm = value.engine_arm(
                engine,
                params0,
                static,
                data,
                d["test"],
                keys,
                value.accuracy_of,
                budget.iterations,
            )
            assert arm["gradient_evaluations"] == expected
        jax.effects_barrier()
        counts[name] = len(sink)
    assert counts == {"ev3": 2 * expected, "pbt": 2 * expected, "grid": 2 * expected}


# The quick mode's run (two seeds of one scenario at the quick budget) is made once; the
# selection test compares it with a run on permuted test labels, which reuses its compiled
# programs (same shapes), so both tests run on one worker.
QUICK_SCENARIO = "noise_sym_pretrained"


@pytest.fixture(scope="module")
def quick_run(value, tmp_path_factory):
    """`benchmarks/value.py --quick` on one scenario: `(json result, output directory,
    printed log)`."""
    out = tmp_path_factory.mktemp("value-quick")
    argv = [
        "--quick", "--scenarios", QUICK_SCENARIO, "--json", str(out / "value.json"),
        "--plot", str(out / "value.png"), "--markdown", str(out / "value.md"),
    ]  # fmt: skip
    log = io.StringIO()
    # module scope: the autouse promotion fixture (per test) is not active yet
    with contextlib.redirect_stderr(log), jax.numpy_dtype_promotion("standard"):
        assert value.main(argv) == 0
    return json.loads((out / "value.json").read_text()), out, log.getvalue()


@pytest.mark.slow
@pytest.mark.xdist_group("value-quick")
def test_selection_ignores_test_labels(value, quick_run, monkeypatch):
    """Permuting the test labels changes the reported test metrics but no selection: the
    configurations and checkpoints the searches pick, EV3's and PBT's acceptances."""
    res, _, _ = quick_run
    build = value.build_label_problem

    def permuted(variant, seeds):
        prob = build(variant, seeds)
        x, y = prob["data"]["test"]
        y = jnp.asarray(np.random.default_rng(0).permutation(np.asarray(y), axis=1))
        prob["data"]["test"] = (x, y)
        return prob

    monkeypatch.setattr(_scenarios, "build_label_problem", permuted)
    a = res["scenarios"][QUICK_SCENARIO]
    b = value.run_label_scenario(
        QUICK_SCENARIO, a["seeds"], value.budgets(quick=True)["label"], print
    )
    assert a["methods"]["ev3"]["test"] != b["methods"]["ev3"]["test"]  # test labels did change
    for m in ("grid", "random"):
        assert a["methods"][m]["chosen_config"] == b["methods"][m]["chosen_config"]
        assert a["methods"][m]["chosen_step"] == b["methods"][m]["chosen_step"]
    for m in ("ev3", "pbt"):
        assert a["methods"][m]["accepted"] == b["methods"][m]["accepted"]
        assert a["methods"][m]["final_decide"] == b["methods"][m]["final_decide"]


@pytest.mark.slow
@pytest.mark.xdist_group("value-quick")
def test_quick_mode_writes_every_per_seed_figure(quick_run):
    res, out, log = quick_run
    assert res["command"].startswith("python benchmarks/value.py --quick")
    sc = res["scenarios"][QUICK_SCENARIO]
    assert sc["seeds"] == [0, 1] and len(sc["start_test"]) == 2
    computes = {m: r["gradient_evaluations"] for m, r in sc["methods"].items()}
    assert set(computes) == {"ev3", "grid", "random", "pbt", "plain"}
    assert len(set(computes.values())) == 1, computes
    for r in sc["methods"].values():
        assert len(r["test"]) == 2 and all(0.0 <= v <= 1.0 for v in r["test"])
        assert r["curve_x"][-1] == r["gradient_evaluations"]
    s = sc["summary"]
    assert s["best_alternative"] in {"grid", "random", "pbt", "plain"}
    ci = s["ev3_minus_best"]
    assert ci["low"] <= ci["mean"] <= ci["high"]
    assert set(s["below_start"]) == set(computes)
    assert res["groups"]["b"]["variants"] == [QUICK_SCENARIO]
    assert (out / "value.png").stat().st_size > 0
    assert "EV3 − best alternative" in (out / "value.md").read_text()
    assert "EV3 - best alternative" in log
