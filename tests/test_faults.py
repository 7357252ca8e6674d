"""Fault isolation: non-finite candidates, raising components and plugins, Ctrl-C, bad plugins."""

import json
import logging
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import ev3core
from ev3core import Checkpointer, latest_checkpoint, load_checkpoint
from ev3core.errors import ComponentError, PluginError

K = 4


_GRAD = ev3core.GradientProposer(
    losses=[ev3core.CrossEntropy(0.5), ev3core.CrossEntropy(1.0)],
    optimizers=[optax.sgd(0.1), optax.sgd(0.01, momentum=0.9)],
    steps=5,
    batch_size=16,
)


def _grad() -> ev3core.GradientProposer:
    return _GRAD  # one instance: equal engines share one compiled step (fast tests)


class _Spoil(ev3core.AbstractProposer):
    """Wraps a proposer and spoils its even-numbered candidates.

    `how="nan"`: NaN parameters. `how="huge"`: finite parameters so large that the logits
    overflow, so the parameters pass but the *scores* are not finite.
    """

    inner: ev3core.AbstractProposer
    how: str = eqx.field(static=True)

    @property
    def num_candidates(self):
        return self.inner.num_candidates

    def labels(self):
        return self.inner.labels()

    def init(self, params, static, key):
        return self.inner.init(params, static, key)

    def propose(self, params, static, state, data, key):
        cands, state = self.inner.propose(params, static, state, data, key)
        k = self.num_candidates
        bad = jnp.arange(k) % 2 == 0

        def spoil(x):
            mask = bad.reshape((k,) + (1,) * (x.ndim - 1))
            if self.how == "nan":
                return jnp.where(mask, jnp.nan, x)
            return jnp.where(mask, x * jnp.float32(1e30), x)

        return jax.tree.map(spoil, cands), state

    def adapt(self, state, outcome):
        return self.inner.adapt(state, outcome)


class _Reckless(ev3core.AbstractScheduler):
    """A broken scheduler: always picks candidate 0 and always tries to accept it."""

    def bind(self, assessors):
        return self

    def init(self, num_objectives, key):
        return None

    def select(self, scores, valid, state, history):
        return jnp.int32(0)

    def decide(self, scores, winner_valid, state, history):
        return (
            ev3core.Decision(
                choice=ev3core.Choice.winner,
                update_stable=jnp.array(True),
                significant=jnp.array(True),
                lower=jnp.zeros(3),
                upper=jnp.zeros(3),
                priorities=jnp.ones(scores.shape[0]) / scores.shape[0],
            ),
            state,
        )


def _plugins(*extra):
    return ev3core.load_plugins(extra=list(extra), autoload=False)


@pytest.fixture(scope="module")
def data():
    return ev3core.toy_problem(jax.random.key(0), n=512)[0]


def _finite(tree) -> bool:
    return all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(tree))


# ------------------------------------------------------------------------- non-finite
@pytest.mark.parametrize(("how", "scheduler"), [("nan", "ev3"), ("huge", "always_accept")])
def test_half_non_finite_candidates_are_masked_and_never_accepted(data, caplog, how, scheduler):
    sched = (
        ev3core.EV3Scheduler(assess_alpha=0.5, decide_alpha=1.0)
        if scheduler == "ev3"
        else ev3core.AlwaysAccept()
    )
    engine = ev3core.Engine(
        [_Spoil(_grad(), how)], [ev3core.NegCrossEntropy()], sched, assess_size=32, decide_size=64
    )
    state = engine.init(ev3core.toy_model(jax.random.key(1)), jax.random.key(2))
    steps = 6
    with caplog.at_level(logging.WARNING, logger="ev3core"):
        state, infos = ev3core.run(engine, state, data, steps, plugins=_plugins())
    bad = np.arange(K) % 2 == 0
    assert not infos.valid[:, bad].any() and infos.valid[:, ~bad].all()
    assert (infos.num_invalid == K // 2).all()
    assert not bad[infos.winner].any()  # the assess winner is always a valid candidate
    assert infos.accepted.any()  # the valid half still gets accepted
    assert _finite(state.current) and _finite(state.stable)
    # the run says how many were masked
    masked = [r.getMessage() for r in caplog.records if "masked" in r.getMessage()]
    assert masked == [
        f"ev3core: {steps * K // 2} candidate(s) had non-finite parameters or scores in "
        f"{steps} step(s) and were masked (never accepted)."
    ]


def test_a_scheduler_that_insists_on_an_invalid_winner_is_overruled(data):
    engine = ev3core.Engine(
        [_Spoil(_grad(), "nan")], [ev3core.Accuracy()], _Reckless(), assess_size=32, decide_size=64
    )
    init = engine.init(ev3core.toy_model(jax.random.key(1)), jax.random.key(2))
    state, infos = ev3core.run(engine, init, data, 4, plugins=_plugins())
    assert (infos.winner == 0).all() and not infos.valid[:, 0].any()
    assert not infos.accepted.any() and not infos.significant.any()
    assert (infos.choice == ev3core.Choice.current).all()
    for a, b in zip(jax.tree.leaves(state.current), jax.tree.leaves(init.current)):
        np.testing.assert_array_equal(a, b)  # never moved to a NaN candidate
    for a, b in zip(jax.tree.leaves(state.stable), jax.tree.leaves(init.stable)):
        np.testing.assert_array_equal(a, b)


# ------------------------------------------------------------------------- raising code
class _Exploding(ev3core.AbstractAssessor):
    """Raises in its Python code while the step is traced (a host-side failure)."""

    direction = "max"  # higher scores are better

    @property
    def name(self):
        return "exploding"

    def __call__(self, model, batch):
        raise RuntimeError("scoring service unreachable")


class _ExplodingPlugin:
    @ev3core.hookimpl
    def ev3_register_assessors(self):
        return {"exploding": _Exploding}


def _good_engine(plugins, assessors=("accuracy",)):
    return ev3core.Pipeline(
        [_grad()],
        list(assessors),
        ev3core.EV3Scheduler(0.5, 1.0),
        assess_size=32,
        decide_size=64,
        plugins=plugins,
    ).build()


def test_a_raising_assessor_stops_the_run_naming_its_plugin_and_keeps_checkpoints(data, tmp_path):
    plugins = _plugins(_ExplodingPlugin())
    engine = _good_engine(plugins)
    init = engine.init(ev3core.toy_model(jax.random.key(1)), jax.random.key(2))
    ev3core.run(engine, init, data, 4, plugins=_plugins(Checkpointer(tmp_path, every=2)))
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    good, _ = load_checkpoint(tmp_path, like=init)

    # Resume the run with a pipeline that has a broken objective.
    broken = _good_engine(plugins, assessors=("accuracy", "exploding"))
    like = broken.init(ev3core.toy_model(jax.random.key(1)), jax.random.key(2))
    state, _ = load_checkpoint(tmp_path, like=init)
    state = eqx.tree_at(lambda s: s.history, state, like.history)  # 2 objectives now
    run_plugins = _plugins(_ExplodingPlugin(), Checkpointer(tmp_path, every=1))
    with pytest.raises(ComponentError) as err:
        ev3core.run(broken, state, data, 3, plugins=run_plugins)
    assert isinstance(err.value, PluginError)
    msg = str(err.value)
    assert "assessor #1" in msg and "_Exploding" in msg and "'exploding'" in msg
    assert "test_faults._ExplodingPlugin" in msg  # the plugin that registered it
    assert "RuntimeError: scoring service unreachable" in msg
    # The checkpoint files are untouched and the newest still loads to the same state.
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before
    again, manifest = load_checkpoint(tmp_path, like=init)
    assert manifest["step"] == 4 and manifest["skipped"] == []
    for a, b in zip(jax.tree.leaves(again.current), jax.tree.leaves(good.current)):
        np.testing.assert_array_equal(a, b)


class _FailsAtStep:
    def __init__(self, step):
        self.step = step

    @ev3core.hookimpl
    def ev3_after_step(self, step):
        if step == self.step:
            raise OSError("metrics server went away")


def test_a_raising_lifecycle_plugin_stops_the_run_and_leaves_the_last_checkpoint(
    data, tmp_path, caplog
):
    engine = _good_engine(_plugins())
    init = engine.init(ev3core.toy_model(jax.random.key(1)), jax.random.key(2))
    ck = Checkpointer(tmp_path, every=2)
    with caplog.at_level(logging.WARNING, logger="ev3core"), pytest.raises(PluginError) as err:
        ev3core.run(engine, init, data, 10, plugins=_plugins(_FailsAtStep(3), ck))
    msg = str(err.value)
    assert "test_faults._FailsAtStep" in msg and "ev3_after_step" in msg
    assert "OSError: metrics server went away" in msg
    # Step 4's hooks did not all run, so that state is not checkpointed; step 2's is intact.
    assert latest_checkpoint(tmp_path).name == "ckpt-0000000002.json"
    _, manifest = load_checkpoint(tmp_path, like=init)
    assert manifest["step"] == 2
    assert any("did not save the final state of step 4" in r.getMessage() for r in caplog.records)


# ------------------------------------------------------------------------- broken plugin
def test_a_plugin_that_fails_to_import_is_reported_and_skipped(tmp_path):
    # A real distribution (metadata on sys.path) whose entry point cannot be imported.
    site = tmp_path / "site"
    dist = site / "ev3_halfbaked-0.1.dist-info"
    dist.mkdir(parents=True)
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: ev3-halfbaked\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[ev3]\nhalfbaked = ev3_halfbaked_mod\n")
    (site / "ev3_halfbaked_mod.py").write_text("import a_module_that_is_not_installed\n")
    env = {
        **os.environ,
        "PYTHONPATH": str(site),
        "EV3_DISABLE_PLUGIN_AUTOLOAD": "",
        "EV3_LOAD_PLUGINS": "halfbaked",
    }
    out = subprocess.run(
        [sys.executable, "-m", "ev3core._host.cli", "plugins", "--json"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    assert [(f["name"], f["distribution"], f["stage"]) for f in report["failures"]] == [
        ("halfbaked", "ev3-halfbaked", "import")
    ]
    assert "a_module_that_is_not_installed" in report["failures"][0]["error"]
    assert "ev3core.builtins" in [p["name"] for p in report["plugins"]]  # the rest still loads
    # and a run still works with the broken plugin skipped
    code = textwrap.dedent("""
        import ev3core
        p = ev3core.load_plugins()
        print(json.dumps([len(p.failures), sorted(p.components("assessor"))]))
    """)
    run = subprocess.run(
        [sys.executable, "-c", "import json\n" + code],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert run.returncode == 0, run.stderr
    failures, assessors = json.loads(run.stdout)
    assert failures == 1 and "accuracy" in assessors


# ------------------------------------------------------------------------- Ctrl-C, for real
def _ev3(*args, **kw):
    return subprocess.Popen(
        [sys.executable, "-m", "ev3core._host.cli", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        **kw,
    )


def _summary(path: Path) -> dict:
    s = json.loads(path.read_text())
    s.pop("wall_seconds")
    s.pop("resumed_from")
    return s


def test_sigint_then_resume_gives_the_uninterrupted_summary(tmp_path, procs):
    # Enough steps (each checkpointed) that the signal, sent once the first checkpoint
    # exists, lands mid-run even on a loaded machine (with 8, a run sometimes finished first).
    steps = "60"
    common = [
        "run",
        "--smoke",
        "--steps",
        steps,
        "--examples",
        "4096",
        "--print-every",
        "100",
        "--checkpoint-every",
        "1",
    ]
    # A compilation cache the interrupted run compiles the programs into; the uninterrupted
    # and the resumed run, started once it has checkpointed, load them from it.
    cache = ["--compile-cache", str(tmp_path / "jax-cache")]
    interrupted = tmp_path / "interrupted"
    proc = _ev3(*common, *cache, "--out", str(interrupted))
    procs.append(proc)
    deadline = time.monotonic() + 240
    while latest_checkpoint(interrupted) is None:
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    straight = _ev3(*common, *cache, "--out", str(tmp_path / "straight"))
    procs.append(straight)
    _, err = proc.communicate(timeout=240)
    assert proc.returncode == 130, err
    assert "interrupted at step" in err and "--resume" in err
    assert "Traceback" not in err
    stopped = load_checkpoint(interrupted, like=_like_smoke())[1]["step"]
    assert 1 <= stopped < int(steps)  # it really stopped early, at a step boundary
    assert not (interrupted / "summary.json").exists()

    # The directory records its experiment: plain `--resume` continues the smoke run even
    # though the distillation plugin (the default experiment) is installed.
    assert json.loads((interrupted / "ev3-run.json").read_text()) == {"experiment": "smoke"}
    resumed = _ev3("run", "--resume", str(interrupted), "--print-every", "100", *cache)
    procs.append(resumed)
    out, err = resumed.communicate(timeout=240)
    assert resumed.returncode == 0, err
    assert f"at step {stopped} of {steps}" in err
    straight.communicate(timeout=240)
    assert straight.returncode == 0
    a, b = _summary(tmp_path / "straight" / "summary.json"), _summary(interrupted / "summary.json")
    assert a == b  # includes state_sha256: the final engine states are bit-identical
    assert len(a["state_sha256"]) == 64
    assert a["steps"] == int(steps) and a["accepted"] + a["kept"] + a["rolled_back"] == a["steps"]


def _like_smoke():
    from ev3core._host.smoke import smoke_pipeline

    engine = smoke_pipeline(plugins=_plugins()).build()
    _, k_model, k_run = jax.random.split(jax.random.key(0), 3)
    return engine.init(ev3core.toy_model(k_model), k_run)
