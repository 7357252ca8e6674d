"""The ev3-distill plugin: growth operators, the KD loss, growth inside an EV3 run, data splits,
the `ev3 run` main job end to end, and discovery through the entry point after a real install."""

import functools
import json
import logging
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from ev3_distill import (
    CNN,
    MLP,
    DistillLoss,
    GrowthPolicy,
    LabelLoss,
    StudentArchive,
    count_params,
    deepen,
    grow_state,
    kd_loss,
    load_dataset,
    max_abs_output_difference,
    widen,
)

import ev3core
from ev3core.errors import ConfigurationError

PLUGIN_DIR = Path(__file__).resolve().parents[1]
ROOT = PLUGIN_DIR.parents[1]


# ---------------------------------------------------------------------------- growth
@functools.cache
def _models():
    k = jax.random.key(0)
    return {
        "mlp": MLP(64, 10, (5, 3), key=k),
        "cnn2d": CNN((8, 8), 10, (2, 3), hidden=6, key=k),
        "cnn1d": CNN((40,), 10, (2, 2), kernel_size=5, key=k),
    }


@functools.cache
def _inputs(name):
    shape = (40,) if name == "cnn1d" else (64,)
    return jax.random.normal(jax.random.key(1), (32, *shape))


# Every operator on every kind of layer boundary: hidden -> hidden, hidden -> output,
# conv -> conv, conv -> dense head (flattened channels), 1-D and 2-D convolutions.
OPS = [
    ("mlp", "widen", 0),
    ("mlp", "widen", 1),
    ("mlp", "deepen", 0),
    ("mlp", "deepen", 1),
    ("cnn2d", "widen", 0),
    ("cnn2d", "widen", 1),
    ("cnn2d", "deepen", 0),
    ("cnn1d", "widen", 1),
    ("cnn1d", "deepen", 1),
]


def _grow(model, op, i, mode, key):
    if op == "widen":
        return widen(model, i, model.widths[i] + 3, mode=mode, key=key)
    return deepen(model, i, mode=mode, key=key)


@pytest.mark.parametrize("name,op,layer", OPS)
def test_growth_preserves_the_function(name, op, layer):
    model, x = _models()[name], _inputs(name)
    grown = _grow(model, op, layer, "preserve", jax.random.key(2))
    assert count_params(grown) > count_params(model)
    assert max_abs_output_difference(model, grown, x) < 1e-5


@pytest.mark.parametrize("name,op,layer", [("mlp", "widen", 0), ("cnn2d", "deepen", 0)])
def test_fresh_growth_changes_the_function(name, op, layer):
    model, x = _models()[name], _inputs(name)
    fresh = _grow(model, op, layer, "fresh", jax.random.key(2))
    preserved = _grow(model, op, layer, "preserve", jax.random.key(2))
    assert jax.tree.structure(fresh) == jax.tree.structure(preserved)
    assert max_abs_output_difference(model, fresh, x) > 1e-3  # the check above is not vacuous


def test_repeated_growth_preserves_and_new_units_learn():
    model = _models()["mlp"]
    x = _inputs("mlp")
    y = jnp.arange(32) % 10
    grown = widen(model, 1, 6, key=jax.random.key(10))
    grown = deepen(grown, key=jax.random.key(20))
    assert grown.widths == (5, 6, 6)
    assert max_abs_output_difference(model, grown, x) < 1e-5
    # zero outgoing weights of new units still get gradients: they are not dead
    grads = eqx.filter_grad(lambda m: LabelLoss()(m, (x, y), jax.random.key(0)))(grown)
    assert float(jnp.abs(grads.layers[2].weight[:, 3:]).sum()) > 0


def test_growth_rejects_bad_requests():
    model = MLP(64, 10, (4,), key=jax.random.key(0))
    with pytest.raises(ConfigurationError, match="must exceed"):
        widen(model, 0, 4, key=jax.random.key(0))
    with pytest.raises(ConfigurationError, match="layer=3"):
        widen(model, 3, 8, key=jax.random.key(0))
    with pytest.raises(ConfigurationError, match="mode"):
        deepen(model, mode="copy", key=jax.random.key(0))


def test_growth_policy_widens_then_deepens_then_stops():
    policy = GrowthPolicy(patience=2, max_width=16, max_depth=2)
    model = MLP(64, 10, (4,), key=jax.random.key(0))
    seen = []
    while (nxt := policy.next_model(model, jax.random.key(len(seen)))) is not None:
        model, op = nxt
        seen.append(model.widths)
    assert seen == [(8,), (16,), (16, 16)]
    assert policy.cap_widths() == (16, 16)
    capped = GrowthPolicy(max_width=16, max_params=700)
    assert capped.next_model(MLP(64, 10, (8,), key=jax.random.key(0)), jax.random.key(1)) is None


# ---------------------------------------------------------------------------- KD loss
def test_kd_loss_matches_a_hand_computed_value():
    s = [1.0, 2.0, 0.0]
    t = [0.5, 1.5, -1.0]
    label, T, w = 1, 2.0, 0.7

    def softmax(v):
        e = [math.exp(a) for a in v]
        return [a / sum(e) for a in e]

    p_t = softmax([a / T for a in t])
    p_s = softmax([a / T for a in s])
    kl = sum(pt * math.log(pt / ps) for pt, ps in zip(p_t, p_s))
    ce = -math.log(softmax(s)[label])
    expected = w * T * T * kl + (1 - w) * ce
    # worked out by hand: p_t = softmax(0.25, 0.75, -0.5) = (0.320401, 0.528252, 0.151347),
    # p_s = softmax(0.5, 1, 0) = (0.307196, 0.506480, 0.186324), KL = 0.0042514,
    # CE = -log softmax(1, 2, 0)[1] = 0.4076060; 0.7 * 4 * KL + 0.3 * CE = 0.1341857
    assert expected == pytest.approx(0.1341857, abs=1e-6)
    got = kd_loss(jnp.array([s]), jnp.array([t]), jnp.array([label]), T, w)
    assert float(got) == pytest.approx(expected, rel=1e-5)
    # weight 0 is the label loss; identical teacher and student give no KL
    assert float(kd_loss(jnp.array([s]), jnp.array([t]), jnp.array([label]), T, 0.0)) == (
        pytest.approx(ce, rel=1e-5)
    )
    assert float(kd_loss(jnp.array([s]), jnp.array([s]), jnp.array([label]), T, 1.0)) == (
        pytest.approx(0.0, abs=1e-6)
    )


def test_distill_loss_teacher_forms_agree():
    k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
    teacher = MLP(64, 10, (16,), key=k1)
    student = MLP(64, 10, (4,), key=k2)
    x = jax.random.normal(k3, (20, 64))
    y = jnp.arange(20) % 10
    other = jnp.zeros((20, 10))
    logits = jnp.stack([other, jax.vmap(teacher)(x)], axis=1)  # teacher in column 1
    key = jax.random.key(0)
    by_fn = DistillLoss(3.0, 0.8, teacher_fn=teacher)(student, (x, y), key)
    by_logits = DistillLoss(3.0, 0.8, teacher=1)(student, (x, y, logits), key)
    assert float(by_fn) == pytest.approx(float(by_logits), rel=1e-5)
    assert float(DistillLoss(3.0, 0.8, teacher=0)(student, (x, y, logits), key)) != (
        pytest.approx(float(by_logits), rel=1e-3)
    )
    # no gradient reaches a teacher given as a module
    g = eqx.filter_grad(lambda t: DistillLoss(3.0, 0.8, teacher_fn=t)(student, (x, y), key))(
        teacher
    )
    assert all(float(jnp.abs(a).max()) == 0 for a in jax.tree.leaves(g))
    assert DistillLoss(4.0, 0.9, teacher_name="teacher").label == "kd[teacher](T=4,w=0.9)"
    with pytest.raises(ConfigurationError, match="weight"):
        DistillLoss(2.0, 1.5)
    with pytest.raises(ConfigurationError, match="temperature"):
        DistillLoss(0.0, 0.5)


# ---------------------------------------------------------------------------- growth in EV3
def _tiny_engine(num_teachers=1):
    losses = [LabelLoss()] + [
        DistillLoss(t, 0.9, teacher=j) for j in range(num_teachers) for t in (1.0, 3.0)
    ]
    return ev3core.Pipeline(
        proposers=[ev3core.GradientProposer(losses, [optax.sgd(0.1)], steps=3, batch_size=8)],
        assessors=[ev3core.Accuracy()],
        scheduler=ev3core.EV3Scheduler(decide_alpha=1.0),
        assess_size=16,
        decide_size=32,
        history_size=8,
    ).build()


def _tiny_data(teacher, n=64, num_teachers=1):
    k = jax.random.key(5)
    x = jax.random.normal(k, (n, 64))
    y = jnp.argmax(jax.vmap(teacher)(x), -1)
    tl = jnp.stack([jax.vmap(teacher)(x)] * num_teachers, axis=1)
    return ev3core.Data(propose=(x, y, tl), assess=(x, y), decide=(x, y))


def test_grow_state_keeps_the_run_and_retraces_once(caplog):
    teacher = MLP(64, 10, (16,), key=jax.random.key(1))
    engine = _tiny_engine()
    data = _tiny_data(teacher)
    state = engine.init(MLP(64, 10, (4,), key=jax.random.key(2)), jax.random.key(3))
    caplog.set_level(logging.INFO, logger="ev3core")
    for _ in range(2):
        state, _ = engine.step(state, data)
    x = data.decide[0]
    before, before_stable = state.model, state.stable_model
    policy = GrowthPolicy(patience=1, max_width=8, max_depth=1)
    grown_model, _ = policy.next_model(before, jax.random.key(9))
    grown_stable, _ = policy.next_model(before_stable, jax.random.key(9))
    new = grow_state(engine, state, grown_model, grown_stable)
    assert int(new.step) == int(state.step) == 2
    assert int(new.history.count) == 2
    assert max_abs_output_difference(before, new.model, x) < 1e-5
    assert max_abs_output_difference(before_stable, new.stable_model, x) < 1e-5
    assert new.model.widths == (8,)
    for _ in range(3):
        new, info = engine.step(new, data)
    assert int(new.step) == 5
    traces = [r for r in caplog.records if "tracing the EV3 step" in r.getMessage()]
    assert len(traces) == 2  # once for the first architecture, once after growth


def test_growth_trigger_counts_non_significant_decisions():
    engine = _tiny_engine()
    state = engine.init(MLP(64, 10, (4,), key=jax.random.key(2)), jax.random.key(3))
    policy = GrowthPolicy(patience=3, max_width=8, max_depth=1)
    hist = state.history
    for i, sig in enumerate([True, False, False]):
        hist = hist.record(
            jnp.int32(i),
            jnp.int32(0),
            jnp.int32(1),
            jnp.array(False),
            jnp.array(sig),
            jnp.zeros((1,), jnp.float32),
        )
    state = eqx.tree_at(lambda s: (s.history, s.step), state, (hist, jnp.int32(3)))
    assert not policy.should_grow(state)  # streak of 2 < 3
    hist = hist.record(
        jnp.int32(3),
        jnp.int32(0),
        jnp.int32(1),
        jnp.array(False),
        jnp.array(False),
        jnp.zeros((1,), jnp.float32),
    )
    state = eqx.tree_at(lambda s: (s.history, s.step), state, (hist, jnp.int32(4)))
    assert policy.should_grow(state)
    grown, op = policy.maybe_grow(engine, state, jax.random.key(0))
    assert op == "widen [4] -> [8]" and grown.model.widths == (8,)
    assert not policy.should_grow(grown)  # not again right after growing
    again, op = policy.maybe_grow(
        engine, eqx.tree_at(lambda s: s.step, grown, jnp.int32(9)), jax.random.key(0)
    )
    assert op is None  # at the cap (width 8, depth 1)


def test_archive_keeps_the_best_student_of_each_size():
    archive = StudentArchive()
    a = MLP(64, 10, (4,), key=jax.random.key(0))
    b = MLP(64, 10, (4,), key=jax.random.key(1))
    c = MLP(64, 10, (8,), key=jax.random.key(2))
    assert archive.offer(a, 0.5)
    assert archive.offer(b, 0.6)
    assert not archive.offer(a, 0.55)
    assert archive.offer(c, 0.58)
    best = archive.best(2)
    assert [(p, acc) for p, acc, _ in best] == [(count_params(b), 0.6), (count_params(c), 0.58)]
    assert best[0][2] is b


# ---------------------------------------------------------------------------- data
@pytest.mark.parametrize(
    "name,sizes",
    [
        ("digits", {"train": 987, "assess": 180, "decide": 270, "test": 360}),
        ("mnist1d", {"train": 3000, "assess": 400, "decide": 600, "test": 1000}),
    ],
)
def test_datasets_split_without_overlap_and_offline(name, sizes, monkeypatch):
    import requests

    def no_network(*args, **kwargs):
        raise AssertionError("the data set must not be downloaded")

    monkeypatch.setattr(requests, "get", no_network)
    np.random.seed(123)
    marker = np.random.get_state()[1].copy()
    splits = load_dataset(name, seed=1)
    assert np.array_equal(np.random.get_state()[1], marker)  # global RNG left alone
    assert splits.sizes() == sizes
    splits.check_disjoint()
    assert splits.train.x.dtype == np.float32 and splits.train.y.dtype == np.int32
    assert set(np.unique(splits.test.y)) == set(range(10))
    # the inputs themselves do not repeat across splits either
    rows = {s: {r.tobytes() for r in getattr(splits, s).x} for s in sizes}
    assert not rows["test"] & (rows["train"] | rows["assess"] | rows["decide"])
    with pytest.raises(ConfigurationError, match="mnist"):
        load_dataset("mnist")


# ---------------------------------------------------------------------------- ev3 run
def _env(**extra):
    env = {k: v for k, v in os.environ.items() if not k.startswith("EV3_")}
    env.update(extra)
    return env


@pytest.mark.slow
def test_ev3_run_end_to_end(tmp_path):
    out = tmp_path / "run"
    res = subprocess.run(
        [
            str(Path(sys.executable).parent / "ev3"),
            "run",
            "--experiment",
            "distill",
            "--steps",
            "4",
            "--seed",
            "3",
            "--out",
            str(out),
            "--log-jsonl",
            str(tmp_path / "steps.jsonl"),
        ],
        env=_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    assert "EV3 distill" in res.stderr  # the progress bar
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    # --log-jsonl reaches the experiment: one line per EV3 step, across growth/pass segments
    logged = [json.loads(line) for line in (tmp_path / "steps.jsonl").read_text().splitlines()]
    assert [r["accepted"] for r in logged] == [r["accepted"] for r in rows]
    assert [r["winner_label"] for r in logged] == [r["winner"] for r in rows]
    assert [r["iteration"] for r in rows] == [1, 2, 3, 4]
    assert [r["gradient_steps"] for r in rows] == [100, 200, 300, 400]
    for r in rows:
        assert r["choice"] in ("accepted", "kept", "rolled_back")
        assert 0.0 <= r["test_accuracy"] <= 1.0 and 0.0 <= r["decide_accuracy"] <= 1.0
        assert r["student_params"] >= 610
        assert r["baseline_test_accuracy"] is not None
    assert rows[-1]["pass"] == 2  # the second pass (archived student as extra teacher) ran
    summary = json.loads((out / "summary.json").read_text())
    assert summary["experiment"] == "distill" and summary["dataset"] == "digits"
    assert summary["gradient_steps"] == 400
    assert summary["teacher"]["test_accuracy"] >= 0.97
    assert summary["teacher"]["params"] > summary["baseline_student"]["params"]
    ev3s = summary["ev3_student"]
    assert ev3s["start_params"] == 610
    assert ev3s["params"] == rows[-1].get("student_params_after", rows[-1]["student_params"])
    assert 0.3 < ev3s["test_accuracy"] <= 1.0  # 400 steps from an 8-unit student: it learned
    assert 0.5 < summary["baseline_student"]["test_accuracy"] <= 1.0
    assert summary["baseline_student"]["params"] == 3466  # the size cap, 64-32-32-10
    assert sum(ev3s["counts"][k] for k in ("accepted", "kept", "rolled_back")) == 4
    assert summary["wall_seconds"] > 0
    png = (out / "report.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    # budget accounting: every iteration advances each candidate lineage by one trajectory;
    # with on_reject="continue" a lineage goes on through rejections and restarts from the
    # current model when it changes, grows or a pass starts; all candidates together
    # explored K times more
    K = ev3s["candidates_per_iteration"]
    assert summary["ev3_path_steps"] == rows[-1]["path_steps"] <= 400
    if not any(r["rolled_back"] for r in rows):
        path = since = 0
        for i, r in enumerate(rows):
            since += 1
            if r["accepted"]:
                path, since = path + 100 * since, 0
            if r["grown"] or (i + 1 < len(rows) and rows[i + 1]["pass"] != r["pass"]):
                since = 0
            assert r["path_steps"] == path
        assert 100 * sum(r["accepted"] for r in rows) <= path
    per_pass = {1: 5 * 2, 2: K}  # (label loss + 2x2 KD losses) x 2 lrs; pass 2 adds 2 losses
    assert (
        summary["ev3_gradient_evaluations"]
        == rows[-1]["explored_steps"]
        == 100 * sum(per_pass[r["pass"]] for r in rows)
    )
    # the final checkpoint is the whole engine state, with the (grown) architecture recorded
    # for --resume; the student reloads from its leaves
    manifests = sorted((out / "checkpoint").glob("ckpt-*.json"))
    final = json.loads(manifests[-1].read_text())
    assert final["step"] == 4
    assert final["metadata"]["distill"]["architecture"] == ev3s["architecture"]
    assert len(final["metadata"]["distill"]["rows"]) == 4
    arch = ev3s["architecture"]
    like = MLP(arch["in_features"], arch["num_classes"], arch["widths"], key=jax.random.key(0))
    student = eqx.tree_deserialise_leaves(out / "student.eqx", like)
    splits = load_dataset("digits", seed=3)
    from ev3_distill._train import accuracy

    assert accuracy(student, splits.test.x, splits.test.y) == pytest.approx(
        ev3s["test_accuracy"], abs=1e-6
    )


def test_ev3_run_refuses_what_it_cannot_do(tmp_path, capsys):
    from ev3core._host.cli import main

    assert main(["run", "--experiment", "distil"]) == 2
    err = capsys.readouterr().err
    assert "No experiment named 'distil'" in err and "'distill'" in err
    (tmp_path / "checkpoint").mkdir()
    assert main(["run", "--resume", str(tmp_path)]) == 2  # no run record: which experiment?
    assert "records no experiment" in capsys.readouterr().err
    (tmp_path / "ev3-run.json").write_text('{"experiment": "distill"}')
    assert main(["run", "--resume", str(tmp_path)]) == 2  # a distill run dir, but empty
    assert "no distillation checkpoint" in capsys.readouterr().err
    assert main(["run", "--resume", str(tmp_path), "--dataset", "mnist1d"]) == 2
    assert "recorded options" in capsys.readouterr().err
    assert main(["run", "--smoke", "my_pipeline.py"]) == 2
    assert "--smoke runs the built-in smoke experiment" in capsys.readouterr().err


# ---------------------------------------------------------------------------- entry point
def test_plugin_is_found_through_its_entry_point_after_a_real_install(tmp_path, pip_install_target):
    target = pip_install_target(tmp_path / "site", PLUGIN_DIR)
    assert (target / "ev3_distill" / "plugin.py").is_file()
    code = textwrap.dedent("""
        import json, ev3core, ev3_distill
        p = ev3core.load_plugins()
        print(json.dumps({
            "file": ev3_distill.__file__,
            "experiments": {k: v.plugin for k, v in p.components("experiment").items()},
            "losses": {k: v.cls.__module__ for k, v in p.components("loss").items()},
            "plugins": {i.name: [i.distribution, i.version] for i in p.plugin_infos()},
            "failures": [str(f) for f in p.failures],
        }))
    """)
    res = subprocess.run(
        [sys.executable, "-c", code],
        env=_env(PYTHONPATH=str(target)),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    assert out["file"].startswith(str(target))  # the installed copy, not the source tree
    # the installed plugin's experiments, beside the built-in smoke and file experiments
    assert out["experiments"] == {
        "distill": "distill",
        "cifar": "distill",
        "value": "distill",
        "smoke": "ev3core.experiments",
        "file": "ev3core.experiments",
    }
    assert out["losses"]["distill"] == "ev3_distill._losses"
    assert out["plugins"]["distill"] == ["ev3-distill", "0.1.0"]
    assert out["failures"] == []
    # and with entry points disabled, nothing of it is loaded
    res = subprocess.run(
        [sys.executable, "-c", code],
        env=_env(PYTHONPATH=str(target), EV3_DISABLE_PLUGIN_AUTOLOAD="1"),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert json.loads(res.stdout)["experiments"] == {
        "smoke": "ev3core.experiments",
        "file": "ev3core.experiments",
    }  # built-in only


PIPELINE_FILE = """
import optax
import ev3core
from ev3_distill import GrowthPolicy, LabelLoss, DistillLoss

config = {"trajectory": 5, "teacher_steps": 100, "baseline": False, "passes": 1, "start_width": 4}
growth = GrowthPolicy(patience=1, max_width=8, max_depth=1)


def pipeline(num_teachers, config):
    losses = [LabelLoss(), DistillLoss(2.0, 0.5, teacher_name="teacher")]
    return ev3core.Pipeline(
        proposers=[ev3core.GradientProposer(losses, [optax.sgd(0.1)], steps=5, batch_size=16)],
        assessors=["accuracy"],
        scheduler=ev3core.EV3Scheduler(decide_alpha=4.0),
        assess_size=64,
        decide_size=64,
    )
"""


@pytest.mark.slow
def test_user_pipeline_file_runs_inside_the_job(tmp_path):
    from ev3_distill import distill_experiment

    path = tmp_path / "pipeline.py"
    path.write_text(PIPELINE_FILE)
    with jax.numpy_dtype_promotion("standard"):
        summary = distill_experiment(
            steps=3, seed=0, out=tmp_path / "out", pipeline=path, progress=False
        )
    rows = [json.loads(x) for x in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 3 and rows[-1]["gradient_steps"] == 15
    assert summary["baseline_student"] is None
    assert summary["ev3_student"]["candidates_per_iteration"] == 2
    # with patience 1, the first non-significant decision grows the student (4 -> 8 units,
    # the cap); the summary and the metrics agree on it
    grown = [r for r in rows if r["grown"]]
    assert len(grown) <= 1
    assert summary["ev3_student"]["params"] == (610 if grown else 310)
    assert len(summary["ev3_student"]["growth"]) == len(grown)
    assert (tmp_path / "out" / "report.png").is_file()
    with pytest.raises(ConfigurationError, match="defines no `pipeline`"):
        empty = tmp_path / "empty.py"
        empty.write_text("x = 1\n")
        distill_experiment(steps=1, out=tmp_path / "o2", pipeline=empty, progress=False)


RESUMABLE_PIPELINE = """
import json, os, time
import optax
import ev3core
from ev3_distill import GrowthPolicy, LabelLoss, DistillLoss

config = {"trajectory": 5, "teacher_steps": 150, "passes": 2, "extra_teachers": 1, "start_width": 4}
growth = GrowthPolicy(patience=1, max_width=8, max_depth=1, factor=2.0)


def pipeline(num_teachers, config):
    losses = [LabelLoss()] + [DistillLoss(2.0, 0.7, teacher=j) for j in range(num_teachers)]
    return ev3core.Pipeline(
        proposers=[ev3core.GradientProposer(losses, [optax.adam(3e-3)], steps=5, batch_size=16)],
        assessors=["accuracy"],
        scheduler=ev3core.EV3Scheduler(decide_alpha=1.0),
        assess_size=64,
        decide_size=128,
    )


class Trace:  # a user's lifecycle plugin: it sees every EV3 step of the distillation job
    @ev3core.hookimpl
    def ev3_run_start(self, state, num_steps):
        self.write({"event": "start", "step": int(state.step), "num_steps": num_steps})

    @ev3core.hookimpl
    def ev3_after_step(self, state, step):
        self.write({"event": "step", "step": int(state.step)})
        time.sleep(0.2)  # slow enough for the test to interrupt it

    @ev3core.hookimpl
    def ev3_run_end(self, state):
        self.write({"event": "end", "step": int(state.step)})

    def write(self, row):
        with open(os.environ["TRACE_FILE"], "a") as f:
            f.write(json.dumps(row) + "\\n")


ev3core.plugin_manager().register(Trace(), name="test-trace")
"""


def _distill_outputs(out):
    def strip(obj):
        if isinstance(obj, dict):
            return {
                k: strip(v) for k, v in obj.items() if k not in ("wall_seconds", "resumed_from")
            }
        if isinstance(obj, list):
            return [strip(v) for v in obj]
        return obj

    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return strip(json.loads((out / "summary.json").read_text())), strip(rows)


@pytest.mark.slow
def test_sigint_then_resume_gives_the_uninterrupted_outputs(tmp_path):
    """Ctrl-C a real `ev3 run` distillation, resume it: the same summary, metrics and final
    engine state (bit-identical) as a run that never stopped; user lifecycle plugins see
    every EV3 step, growth and the second pass included."""
    import signal
    import time

    from ev3core._host.ckpt_manifest import list_checkpoints

    pipe = tmp_path / "pipe.py"
    pipe.write_text(RESUMABLE_PIPELINE)
    ev3 = str(Path(sys.executable).parent / "ev3")
    common = ["run", "--experiment", "distill", str(pipe), "--steps", "10", "--seed", "1"]
    common += ["--checkpoint-every", "1"]

    # One run after another: the resumed and the uninterrupted run load the programs that the
    # runs before them compiled from the session's compilation cache (on, as by default).
    stopped_dir = tmp_path / "stopped"
    proc = subprocess.Popen(
        [ev3, *common, "--out", str(stopped_dir)],
        env=_env(TRACE_FILE=str(tmp_path / "stopped.trace")),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 600
        # step 0 is checkpointed at once; interrupt once a few EV3 steps are done
        while (
            max((int(m.stem[5:]) for m in list_checkpoints(stopped_dir / "checkpoint")), default=0)
            < 2
        ):
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline
            time.sleep(0.05)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=600)
        assert proc.returncode == 130, err[-3000:]
        assert "interrupted at step" in err and f"ev3 run {pipe} --resume {stopped_dir}" in err
        assert "Traceback" not in err
        assert not (stopped_dir / "summary.json").exists()
        stopped_at = json.loads(list_checkpoints(stopped_dir / "checkpoint")[-1].read_text())
        assert 2 <= stopped_at["step"] < 10

        resumed = subprocess.run(
            [ev3, "run", str(pipe), "--resume", str(stopped_dir)],
            env=_env(TRACE_FILE=str(tmp_path / "resumed.trace")),
            capture_output=True,
            text=True,
            timeout=240,
        )
        assert resumed.returncode == 0, resumed.stderr[-3000:]
        assert f"resuming {stopped_dir} at EV3 iteration {stopped_at['step']} of 10" in (
            resumed.stderr
        )
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    straight = subprocess.run(
        [ev3, *common, "--out", str(tmp_path / "straight")],
        env=_env(TRACE_FILE=str(tmp_path / "straight.trace")),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert straight.returncode == 0, straight.stderr[-3000:]
    a_summary, a_rows = _distill_outputs(tmp_path / "straight")
    b_summary, b_rows = _distill_outputs(stopped_dir)
    assert a_rows == b_rows
    assert a_summary == b_summary  # includes the final engine state's SHA-256
    assert (
        json.loads((stopped_dir / "summary.json").read_text())["resumed_from"]
        == (stopped_at["step"])
    )
    assert (tmp_path / "straight" / "student.eqx").read_bytes() == (
        stopped_dir / "student.eqx"
    ).read_bytes()
    # the run grew and reached its second pass, so resuming rebuilt a grown architecture
    assert a_summary["ev3_student"]["counts"]["grown"] >= 1
    assert a_rows[-1]["pass"] == 2
    assert a_summary["ev3_student"]["params"] > a_summary["ev3_student"]["start_params"]
    # lifecycle hooks: every EV3 step seen once, inside run_start/run_end segments
    trace = [json.loads(x) for x in (tmp_path / "straight.trace").read_text().splitlines()]
    assert [t["step"] for t in trace if t["event"] == "step"] == list(range(1, 11))
    starts = [t for t in trace if t["event"] == "start"]
    ends = [t for t in trace if t["event"] == "end"]
    assert len(starts) == len(ends) >= 2  # growth and the new pass happen between segments
    assert sum(t["num_steps"] for t in starts) == 10
    resumed_trace = [json.loads(x) for x in (tmp_path / "resumed.trace").read_text().splitlines()]
    assert [t["step"] for t in resumed_trace if t["event"] == "step"] == list(
        range(stopped_at["step"] + 1, 11)
    )
