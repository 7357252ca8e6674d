"""Regression tests for defects found by an outside probe suite: data loss in checkpoint
directories, lossy dtypes, hostile manifests, code named by checkpoints, broken plugins,
signals, late CLI failures, memory held by a run, untrusted indices and hyperparameters from
components, inputs that run silently, and error messages."""

import json
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
import ml_dtypes
import numpy as np
import optax
import pytest

import ev3core
from ev3core import Checkpointer, load_checkpoint, save_checkpoint
from ev3core._host.ckpt_format import _manifest_digest
from ev3core._host.ckpt_manifest import list_checkpoints
from ev3core.errors import (
    CheckpointError,
    CheckpointWarning,
    ConfigurationError,
    DuplicateComponentError,
    PluginError,
)

_GRAD = ev3core.GradientProposer(
    losses=[ev3core.CrossEntropy(0.5), ev3core.CrossEntropy(1.0)],
    optimizers=[optax.sgd(0.1), optax.sgd(0.05)],
    steps=2,
    batch_size=16,
)


def _plugins(*extra):
    return ev3core.load_plugins(extra=list(extra), autoload=False)


def _engine(**overrides):
    kw = dict(
        proposers=[_GRAD],
        assessors=["accuracy"],
        scheduler=ev3core.EV3Scheduler(assess_alpha=0.5, decide_alpha=1.0),
        assess_size=32,
        decide_size=64,
        plugins=_plugins(),
    )
    kw.update(overrides)
    return ev3core.Pipeline(**kw).build()


@pytest.fixture(scope="module")
def tiny(tiny_problem):
    """`(engine, data, states)`: states[k] is the state after k steps (k = 0..4)."""
    data, model = tiny_problem
    engine = _engine()
    states = [engine.init(model, jax.random.key(2))]
    for _ in range(4):
        states.append(engine.step(states[-1], data)[0])
    return engine, data, states


def _bits(tree):
    out = []
    for x in jax.tree.leaves(tree):
        if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            out.append(("key", str(jax.random.key_impl(x)), np.asarray(jax.random.key_data(x))))
        else:
            out.append(("array", str(x.dtype), np.asarray(x)))
    return [(k, d, a.shape, a.tobytes()) for k, d, a in out]


def _rewrite(manifest: Path, edit) -> None:
    """Edit a manifest's JSON and recompute its checksum (as a deliberate edit would)."""
    body = json.loads(manifest.read_text())
    edit(body)
    body["manifest_sha256"] = _manifest_digest(body)
    manifest.write_text(json.dumps(body))


# ----------------------------------------------------------- 1: pruning loses checkpoints
def test_pruning_after_a_fallback_keeps_what_the_resumed_run_writes(tiny, tmp_path):
    engine, data, states = tiny
    for k in (1, 2, 4):
        save_checkpoint(tmp_path, states[k], keep=3)
    leaves = tmp_path / json.loads((tmp_path / "ckpt-0000000004.json").read_text())["leaves_file"]
    leaves.write_bytes(leaves.read_bytes()[:50])  # the newest is damaged
    with pytest.warns(CheckpointWarning, match="truncated"):
        resumed, manifest = load_checkpoint(tmp_path, like=states[0])
    assert manifest["step"] == 2
    # Resume with keep=1: the checkpoint of step 3 is the newest written, whatever the
    # damaged step-4 checkpoint says; it must survive pruning and be what loads next.
    checkpointer = Checkpointer(tmp_path, every=1, keep=1)
    final, _ = ev3core.run(engine, resumed, data, 1, plugins=_plugins(checkpointer))
    assert [p.name for p in list_checkpoints(tmp_path)] == ["ckpt-0000000003.json"]
    loaded, manifest = load_checkpoint(tmp_path, like=states[0])
    assert manifest["step"] == 3 and _bits(loaded) == _bits(final)


def test_a_second_run_never_mixes_with_or_loads_the_first_runs_checkpoints(tiny, tmp_path):
    engine, data, states = tiny
    first = Checkpointer(tmp_path, every=1, keep=2)
    ev3core.run(engine, states[2], data, 2, plugins=_plugins(first))  # writes steps 3, 4
    # A fresh run (another starting state) with the same directory is refused up front...
    with pytest.raises(CheckpointError, match="another run"):
        ev3core.run(engine, states[0], data, 1, plugins=_plugins(Checkpointer(tmp_path)))
    assert [p.name for p in list_checkpoints(tmp_path)] == [
        "ckpt-0000000003.json",
        "ckpt-0000000004.json",
    ]
    # ...and by hand, pruning goes by write order: the state just written is kept and loads.
    save_checkpoint(tmp_path, states[1], keep=1)
    loaded, manifest = load_checkpoint(tmp_path, like=states[0])
    assert manifest["step"] == 1 and _bits(loaded) == _bits(states[1])


def test_resuming_from_the_directory_continues_the_same_run(tiny, tmp_path):
    engine, data, states = tiny
    first = Checkpointer(tmp_path, every=1, keep=5)
    ev3core.run(engine, states[0], data, 2, plugins=_plugins(first))
    restored, _ = load_checkpoint(tmp_path, like=states[0])
    again = Checkpointer(tmp_path, every=1, keep=5)
    ev3core.run(engine, restored, data, 1, plugins=_plugins(again))
    bodies = [json.loads(p.read_text()) for p in list_checkpoints(tmp_path)]
    assert [b["step"] for b in bodies] == [1, 2, 3]
    assert [b["sequence"] for b in bodies] == [1, 2, 3]
    assert {b["run_id"] for b in bodies} == {first.run_id}


# ----------------------------------------------------------------- 2: every JAX dtype
def _all_dtypes():
    names = [
        "bool",
        "int8",
        "int16",
        "int32",
        "uint8",
        "uint16",
        "uint32",
        "float16",
        "bfloat16",
        "float32",
        "complex64",
        "int2",
        "uint2",
        "int4",
        "uint4",
        "float4_e2m1fn",
        "float8_e3m4",
        "float8_e4m3",
        "float8_e4m3b11fnuz",
        "float8_e4m3fn",
        "float8_e4m3fnuz",
        "float8_e5m2",
        "float8_e5m2fnuz",
        "float8_e8m0fnu",
    ]
    return [n for n in names if hasattr(jnp, n)]


def test_every_jax_dtype_and_key_kind_round_trips_bit_for_bit(tiny, tmp_path):
    _, _, states = tiny
    assert {"bfloat16", "float8_e4m3fn", "float8_e5m2", "int4"} <= set(_all_dtypes())
    leaves = {}
    for name in _all_dtypes():
        dtype = np.dtype(getattr(jnp, name))
        raw = np.arange(16, dtype=np.uint8) * 7 + 3  # arbitrary bit patterns, NaNs included
        if dtype.itemsize == 1 and name not in ("bool",) and "int" not in name:
            value = raw.view(dtype)
        elif name == "bool":
            value = (raw % 2).astype(bool)
        elif name.startswith(("int", "uint")):
            info = ml_dtypes.iinfo(dtype) if dtype.kind == "V" or dtype.isbuiltin == 2 else None
            lo, hi = (info.min, info.max) if info else (0, 100)
            value = np.linspace(lo, hi, 16).round().astype(dtype)
        else:
            value = (np.linspace(-3, 3, 16) * 1.37).astype(dtype)
        leaves[name] = jnp.asarray(value.reshape(4, 4))
    for impl in ("threefry2x32", "rbg", "unsafe_rbg"):
        leaves[f"key_{impl}"] = jax.random.key(7, impl=impl)
    state = eqx.tree_at(lambda s: s.scheduler_state, states[0], leaves)
    save_checkpoint(tmp_path, state)
    loaded, _ = load_checkpoint(tmp_path, like=state)
    assert _bits(loaded.scheduler_state) == _bits(leaves)
    assert _bits(loaded) == _bits(state)


# ---------------------------------------------------- 6: malformed manifests fall back
_MALFORMED = {
    "signature is a string": lambda b: b.update(signature="nope"),
    "signature entry short": lambda b: b.update(signature=[["a", [1]]]),
    "missing leaves_file": lambda b: b.pop("leaves_file"),
    "missing step": lambda b: b.pop("step"),
    "step is text": lambda b: b.update(step="4"),
    "leaves outside": lambda b: b.update(leaves_file="../../etc/passwd"),
    "metadata is a list": lambda b: b.update(metadata=[1]),
    "bad sequence": lambda b: b.update(sequence=-3),
}


@pytest.mark.parametrize("damage", [*_MALFORMED, "deep nesting", "not an object", "huge int"])
def test_every_malformed_newest_manifest_falls_back_with_a_warning(tiny, tmp_path, damage):
    _, _, states = tiny
    save_checkpoint(tmp_path, states[1])
    newest = save_checkpoint(tmp_path, states[2])
    if damage == "deep nesting":
        newest.write_text("[" * 200_000 + "]" * 200_000)
    elif damage == "not an object":
        newest.write_text("[1, 2, 3]")
    elif damage == "huge int":
        newest.write_text('{"format": "ev3core-checkpoint", "format_version": 1' + "0" * 5000 + "}")
    else:
        _rewrite(newest, _MALFORMED[damage])
    with pytest.warns(CheckpointWarning, match="ckpt-0000000002.json"):
        loaded, manifest = load_checkpoint(tmp_path, like=states[0])
    assert manifest["step"] == 1 and manifest["skipped"][0]["file"] == str(newest)
    # a damaged manifest as a file is a CheckpointError, never a raw exception
    with pytest.raises(CheckpointError, match="unusable"):
        load_checkpoint(newest, like=states[0])


# ------------------------------------------------------------- 10: stale temporary files
def test_stale_temporary_files_of_killed_saves_are_removed(tiny, tmp_path):
    _, _, states = tiny
    stale = [tmp_path / ".ckpt-0000000007.json.x1y2.tmp", tmp_path / ".ckpt-7-ab.leaves.q.tmp"]
    for p in stale:
        p.write_bytes(b"half a checkpoint")
    save_checkpoint(tmp_path, states[1])
    assert not any(p.exists() for p in stale)
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")) == []


# -------------------------------------------------------------------- CLI helpers
def _cli(*args, env=None, timeout=240):
    return subprocess.run(
        [sys.executable, "-m", "ev3core._host.cli", *args],
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
        timeout=timeout,
    )


def test_sigterm_stops_ev3_run_cleanly_with_a_final_checkpoint(tmp_path, procs):
    out = tmp_path / "run"
    proc = subprocess.Popen(
        [sys.executable, "-m", "ev3core._host.cli", "run", "--smoke", "--steps", "400"]
        + ["--examples", "4096", "--checkpoint-every", "1000", "--out", str(out)]
        + ["--print-every", "1", "--no-progress", "--log-jsonl", str(tmp_path / "log.jsonl")],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    procs.append(proc)
    deadline = time.monotonic() + 240
    log = tmp_path / "log.jsonl"
    while not (log.exists() and log.read_text().count("\n") >= 2):
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=240)
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert "interrupted at step" in err and "Traceback" not in err
    # no checkpoint was due (every 1000 steps): the one there is the final one
    [manifest] = list_checkpoints(out)
    step = json.loads(manifest.read_text())["step"]
    assert 2 <= step < 400


# ------------------------------------------------------ 11: late and raw CLI failures
@pytest.mark.parametrize(
    ("extra", "needle"),
    [
        (["--examples", "-1"], "--examples -1"),
        (["--chunk", "0"], "--chunk 0"),
        (["--json", "FILE/summary.json"], "--json"),  # under a file: never writable
        (["--out", "FILE"], "is a file"),
        (["--log-jsonl", "FILE/x.jsonl"], "--log-jsonl"),
    ],
)
def test_bad_cli_options_fail_before_any_work(tmp_path, capsys, extra, needle):
    from ev3core._host.cli import main

    a_file = tmp_path / "a_file"
    a_file.write_text("")
    extra = [x.replace("FILE", str(a_file)) for x in extra]
    t = time.perf_counter()
    assert main(["run", "--smoke", "--steps", "3", *extra]) == 2
    err = capsys.readouterr().err
    assert needle in err and "Traceback" not in err
    assert time.perf_counter() - t < 5  # nothing was built or compiled


def test_a_pipeline_file_without_a_pipeline_fails_before_training(tmp_path):
    pipe = tmp_path / "pipe.py"
    pipe.write_text("pipeline = 42\n")
    out = tmp_path / "out"
    res = _cli("run", "--experiment", "distill", str(pipe), "--out", str(out), "--no-progress")
    assert res.returncode == 2, res.stderr[-2000:]
    assert "`pipeline` is int 42" in res.stderr
    assert not (out / "teacher.eqx").exists()  # failed before the teacher was trained


def test_disabled_autoload_does_not_silently_run_the_smoke_experiment():
    res = _cli("run", "--steps", "1", env={"EV3_DISABLE_PLUGIN_AUTOLOAD": "1"})
    assert res.returncode == 2
    assert "EV3_DISABLE_PLUGIN_AUTOLOAD" in res.stderr and "--smoke" in res.stderr
    assert res.stdout == ""


def test_an_unwritable_json_path_still_leaves_the_summary(tmp_path, capsys):
    from ev3core._host.cli import main

    # checked up front now, so the run never starts; the run directory stays empty
    out = tmp_path / "out"
    code = main(["run", "--smoke", "--out", str(out), "--json", str(tmp_path / "no" / "s.json")])
    assert code == 2 and "--json" in capsys.readouterr().err
    assert not list_checkpoints(out)


# ------------------------------------------------------ 3: --resume trusts no metadata
def _fake_distill_run(tmp_path, states, record_extra):
    run_dir = tmp_path / "run"
    record = {"config": {"steps": 5}, "rows": [], **record_extra}
    save_checkpoint(
        run_dir / "checkpoint",
        states[1],
        metadata={"cli": {"experiment": "distill"}, "distill": record},
    )
    return run_dir


def test_resume_never_runs_a_pipeline_file_because_a_checkpoint_names_it(tiny, tmp_path):
    from ev3_distill._config import _file_sha256
    from ev3_distill._experiment import distill_experiment

    _, _, states = tiny
    marker = tmp_path / "ran"
    evil = tmp_path / "evil.py"
    evil.write_text(f"open({str(marker)!r}, 'w').write('x')\npipeline = None\n")
    # A manifest that passes every checksum (anyone can recompute them) naming the file,
    # even with the file's own hash recorded: it is not run unless the user names it.
    for extra in ({"pipeline_file": str(evil)},) * 1 + (
        {"pipeline_file": str(evil), "pipeline_sha256": _file_sha256(evil)},
    ):
        run_dir = _fake_distill_run(tmp_path, states, extra)
        with pytest.raises(ConfigurationError, match="does not run a file because a checkpoint"):
            distill_experiment(resume=run_dir, progress=False)
        assert not marker.exists()
        for p in (run_dir / "checkpoint").iterdir():
            p.unlink()
    # a named file that differs from the recorded one is refused too
    other = tmp_path / "other.py"
    other.write_text("pipeline = None\n")
    run_dir = _fake_distill_run(
        tmp_path, states, {"pipeline_file": str(evil), "pipeline_sha256": _file_sha256(evil)}
    )
    with pytest.raises(ConfigurationError, match="content differs"):
        distill_experiment(resume=run_dir, pipeline=str(other), progress=False)
    assert not marker.exists()


def test_resume_reads_only_verified_manifests_and_paths_inside_the_run(tiny, tmp_path):
    from ev3_distill._config import _inside
    from ev3_distill._resume import _resume_record

    _, _, states = tiny
    run_dir = _fake_distill_run(tmp_path, states, {"pipeline_file": None})
    manifest = list_checkpoints(run_dir / "checkpoint")[-1]
    text = manifest.read_text().replace('"steps": 5', '"steps": 7')  # edited, checksum stale
    manifest.write_text(text)
    with pytest.raises(CheckpointError, match="checksum"):
        _resume_record(run_dir)
    (tmp_path / "outside.eqx").write_bytes(b"")
    (run_dir / "link").symlink_to(tmp_path)
    for name in ("../outside.eqx", str(tmp_path / "outside.eqx"), "link/outside.eqx"):
        with pytest.raises(CheckpointError, match="outside the run directory"):
            _inside(run_dir, name)
    assert _inside(run_dir, "students/p1-it1.eqx") == (run_dir / "students/p1-it1.eqx").resolve()


def test_smoke_resume_uses_no_unverified_metadata(tiny, tmp_path, capsys):
    from ev3core._host.cli import main

    _, _, states = tiny
    save_checkpoint(tmp_path, states[1], metadata={"cli": {"experiment": "smoke", "examples": -5}})
    assert main(["run", "--smoke", "--resume", str(tmp_path)]) == 2
    assert "examples=-5" in capsys.readouterr().err
    # the same with the checksum not recomputed: the manifest is damaged, not used at all
    m = list_checkpoints(tmp_path)[-1]
    m.write_text(m.read_text().replace('"examples": -5', '"examples": 7'))
    assert main(["run", "--smoke", "--resume", str(tmp_path)]) == 2
    assert "checksum does not match" in capsys.readouterr().err


# ----------------------------------------------------------- 4: one plugin breaks all
def _site_plugin(tmp_path, name, source):
    site = tmp_path / "site"
    dist = site / f"ev3_{name}-0.1.dist-info"
    dist.mkdir(parents=True)
    (dist / "METADATA").write_text(f"Metadata-Version: 2.1\nName: ev3-{name}\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text(f"[ev3]\n{name} = ev3_{name}_mod\n")
    (site / f"ev3_{name}_mod.py").write_text(textwrap.dedent(source))
    path = os.pathsep.join(filter(None, [str(site), os.environ.get("PYTHONPATH")]))
    return {"PYTHONPATH": path, "EV3_DISABLE_PLUGIN_AUTOLOAD": "", "EV3_LOAD_PLUGINS": name}


@pytest.mark.parametrize("how", ["import sys\nsys.exit(3)\n", "raise KeyboardInterrupt\n"])
def test_a_plugin_that_exits_at_import_is_that_plugins_failure(tmp_path, how):
    env = _site_plugin(tmp_path, "quitter", how)
    res = _cli("plugins", "--json", env=env, timeout=120)
    assert res.returncode == 0, res.stderr
    report = json.loads(res.stdout)
    [failure] = report["failures"]
    assert failure["name"] == "quitter" and failure["stage"] == "import"
    assert failure["error"].startswith(("SystemExit", "KeyboardInterrupt"))
    assert "ev3core.builtins" in [p["name"] for p in report["plugins"]]


def test_raise_plugin_errors_prints_the_plugin_authors_traceback(tmp_path):
    env = _site_plugin(tmp_path, "broken", "def f():\n    return 1 / 0\nf()\n")
    res = _cli("plugins", env={**env, "EV3_RAISE_PLUGIN_ERRORS": "1"}, timeout=120)
    assert res.returncode == 2
    assert "Traceback" in res.stderr and "ev3_broken_mod.py" in res.stderr
    assert "ZeroDivisionError" in res.stderr and "ev3: error: plugin 'broken'" in res.stderr


class _Twin:
    """Registers a built-in name (a conflict) and a name of its own."""

    @ev3core.hookimpl
    def ev3_register_assessors(self):
        return {"accuracy": ev3core.NegCrossEntropy, "twin_nce": ev3core.NegCrossEntropy}

    @ev3core.hookimpl
    def ev3_register_proposers(self):
        return {"gradient": ev3core.GradientProposer}


def test_a_name_registered_twice_fails_only_the_later_plugin_for_that_name():
    p = _plugins(_Twin())
    assessors = p.components("assessor")
    assert assessors["accuracy"].cls is ev3core.Accuracy  # the built-in keeps its name
    assert assessors["twin_nce"].plugin.endswith("_Twin")  # the later plugin's other name
    assert p.get("proposer", "gradient") is ev3core.GradientProposer
    report = p.describe()
    stages = sorted((f["stage"], "registered twice" in f["error"]) for f in report["failures"])
    assert stages == [("register:assessor", True), ("register:proposer", True)]
    assert all(f["name"].endswith("_Twin") for f in report["failures"])
    strict = ev3core.load_plugins(extra=[_Twin()], autoload=False, raise_errors=True)
    with pytest.raises(DuplicateComponentError, match="'accuracy' is registered twice"):
        strict.components("assessor")


class _BadStage:
    @ev3core.hookimpl
    def ev3_explore(self, proposers):
        raise RuntimeError("stage hook exploded")


def test_a_stage_hook_that_raises_is_a_plugin_error_naming_the_plugin():
    with pytest.raises(PluginError, match=r"plugin '.*_BadStage' raised in ev3_explore") as err:
        _engine(plugins=_plugins(_BadStage()))
    assert "stage hook exploded" in str(err.value)


# -------------------------------------------------- 5: scheduler indices are not trusted
class _Wayward(ev3core.AbstractScheduler):
    """A broken scheduler: `select` returns `index`, or `decide` chooses `index`."""

    index: jax.Array
    stage: str = eqx.field(static=True)

    def bind(self, assessors):
        return self

    def init(self, num_objectives, key):
        return None

    def select(self, scores, valid, state, history):
        return self.index if self.stage == "select" else jnp.int32(0)

    def decide(self, scores, winner_valid, state, history):
        choice = ev3core.Choice.winner
        if self.stage == "decide":  # an item holding any value, as a careless tree_map makes
            choice = jax.tree.map(lambda _: self.index, choice)
        return (
            ev3core.Decision(
                choice=choice,
                update_stable=jnp.array(True),
                significant=jnp.array(True),
                lower=jnp.zeros(3),
                upper=jnp.zeros(3),
                priorities=jnp.ones(scores.shape[0]) / scores.shape[0],
            ),
            state,
        )


@pytest.mark.parametrize("stage", ["select", "decide"])
def test_out_of_range_scheduler_indices_keep_the_current_model(tiny, stage, caplog):
    _, data, states = tiny
    engine = _engine(scheduler=_Wayward(jnp.int32(0), stage))
    state = engine.init(states[0].model, jax.random.key(2))
    k = engine.num_candidates
    bad = [k, k + 9, -1] if stage == "select" else [3, 7, -1]
    for index in bad:  # an array leaf: one compiled step for all of them
        wayward = eqx.tree_at(lambda e: e.scheduler.index, engine, jnp.int32(index))
        new, info = wayward.step(state, data)
        assert int(info.bad_indices) == 1, index
        assert not bool(info.accepted) and not bool(info.rolled_back), index
        assert int(ev3core.choice_index(info.choice)) == ev3core.CURRENT and not bool(
            info.significant
        )
        assert _bits(new.current) == _bits(state.current), index  # nothing moved
        assert _bits(new.stable) == _bits(state.stable), index
    with caplog.at_level("WARNING", logger="ev3core"):
        ev3core.run(wayward, state, data, 2, plugins=_plugins())
    assert "out-of-range index(es) in 2 step(s)" in caplog.text


# ------------------------------------------------------- 9: alphas changed by tree_at
def test_an_invalid_alpha_set_by_tree_at_never_makes_acceptance_easier(tiny):
    engine, data, states = tiny
    # A negative alpha turns the lower confidence bound into an upper one: without the guard
    # inside the step, a winner no better than the current model is accepted at once.
    for alpha in (-5.0, float("nan"), 0.0, float("-inf")):
        decide = eqx.tree_at(lambda e: e.scheduler.decide_alpha, engine, jnp.float32(alpha))
        assess = eqx.tree_at(lambda e: e.scheduler.assess_alpha, engine, jnp.float32(alpha))
        for state in states[:3]:
            _, info = decide.step(state, data)
            assert not bool(info.accepted) and not bool(info.significant), alpha
            assert not bool(info.rolled_back), alpha
            _, info = assess.step(state, data)  # only changes which candidate is tested
            assert 0 <= int(info.winner) < engine.num_candidates


# --------------------------------------------------------- 8: inputs that run silently
def _with(data, stream, y=None, x=None):
    old = getattr(data, stream)
    new = (old[0] if x is None else x, old[1] if y is None else y)
    return ev3core.Data(
        **{s: new if s == stream else getattr(data, s) for s in ("propose", "assess", "decide")}
    )


def test_labels_outside_the_models_classes_are_rejected_up_front(tiny):
    engine, data, states = tiny
    y = data.assess[1]
    for bad in (y.at[3].set(2), y.at[0].set(-1)):
        with pytest.raises(ConfigurationError, match=r"Data.assess has labels in .* 2 classes"):
            engine.check_data(_with(data, "assess", y=bad), states[0])
        with pytest.raises(ConfigurationError, match="labels"):
            ev3core.run(engine, states[0], _with(data, "assess", y=bad), 1, plugins=_plugins())


def test_non_finite_data_is_reported_as_data(tiny):
    engine, data, states = tiny
    x = data.assess[0].at[17, 1].set(jnp.nan)
    with pytest.raises(ConfigurationError, match=r"Data.assess has 1 of 256 example\(s\)") as err:
        engine.check_data(_with(data, "assess", x=x), states[0])
    assert "examples [17]" in str(err.value)


def test_a_model_with_nan_weights_is_rejected_at_init(tiny):
    engine, _, states = tiny
    model = states[0].model
    broken = eqx.tree_at(lambda m: m.layers[0].weight, model, model.layers[0].weight * jnp.nan)
    with pytest.raises(ConfigurationError, match=r"NaN or Inf parameters .*layers\[0\]\.weight"):
        engine.init(broken, jax.random.key(0))


# --------------------------------------------------------------- 12: error messages
class _Shrink(ev3core.AbstractProposer):
    """Returns candidates whose first weight lost a row (a wrong-shape proposer)."""

    inner: ev3core.AbstractProposer

    @property
    def num_candidates(self):
        return self.inner.num_candidates

    def labels(self):
        return self.inner.labels()

    def init(self, params, static, key):
        return self.inner.init(params, static, key)

    def propose(self, params, static, state, data, key):
        cands, state = self.inner.propose(params, static, state, data, key)
        return eqx.tree_at(
            lambda c: c.layers[0].weight, cands, cands.layers[0].weight[:, 1:]
        ), state

    def adapt(self, state, outcome):
        return self.inner.adapt(state, outcome)


class _BadCarry(ev3core.AbstractProposer):
    """Its scan's carry changes dtype (bfloat16 in, float32 out): a trace-time TypeError."""

    @property
    def num_candidates(self):
        return 1

    def labels(self):
        return ("bad-carry",)

    def init(self, params, static, key):
        return None

    def propose(self, params, static, state, data, key):
        def body(c, _):
            return c.astype(jnp.float32) * 2, None

        jax.lax.scan(body, jnp.zeros((), jnp.bfloat16), None, length=2)
        return jax.tree.map(lambda x: x[None], params), state

    def adapt(self, state, outcome):
        return state


def test_a_wrong_shape_proposer_error_lists_the_leaf_and_names_the_proposer(tiny):
    _, data, states = tiny
    engine = _engine(proposers=[_Shrink(_GRAD)])
    state = engine.init(states[0].model, jax.random.key(2))
    with pytest.raises(ConfigurationError) as err:
        engine.check_data(data, state)
    msg = str(err.value)
    assert "proposer #0" in msg and "_Shrink" in msg
    assert ".layers[0].weight: expected (4, 4, 2) float32, got (4, 3, 2) float32" in msg
    assert msg.count("\n") < 3 and "MLP(" not in msg  # not the whole model, twice


def test_a_proposers_trace_time_type_error_names_the_component(tiny):
    _, data, states = tiny
    engine = _engine(proposers=[_BadCarry()])
    state = engine.init(states[0].model, jax.random.key(2))
    with pytest.raises(ev3core.errors.ComponentError, match=r"proposer #0 .*_BadCarry.*TypeError"):
        engine.check_data(data, state)
