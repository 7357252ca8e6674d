"""Checkpoints: bit-exact round trip and resume, corruption detection, atomicity, the plugin."""

import hashlib
import json
import os
import signal
from pathlib import Path

import equinox as eqx
import jax
import numpy as np
import optax
import pytest

import ev3core
from ev3core import Checkpointer, latest_checkpoint, load_checkpoint, save_checkpoint
from ev3core._host.ckpt_format import FORMAT_VERSION, _manifest_digest, state_digest
from ev3core._host.ckpt_manifest import list_checkpoints
from ev3core.errors import CheckpointError, CheckpointWarning, RunInterrupted

# One optax object per optimizer for the whole module: engines rebuilt from them are equal,
# so they share one compiled step (keeps the tests fast; a real restart is tested in
# test_faults.py with subprocesses).
_OPTIMIZERS = {m: (optax.sgd(0.1), optax.sgd(0.01, momentum=m)) for m in (0.9, None)}


def _engine(hidden_momentum: float | None = 0.9) -> ev3core.Engine:
    return ev3core.Pipeline(
        proposers=[
            ev3core.GradientProposer(
                losses=[ev3core.CrossEntropy(0.5), ev3core.CrossEntropy(1.0)],
                optimizers=_OPTIMIZERS[hidden_momentum],
                steps=5,
                batch_size=16,
            )
        ],
        assessors=[ev3core.Accuracy(), ev3core.NegCrossEntropy()],
        scheduler=ev3core.EV3Scheduler(assess_alpha=0.5, decide_alpha=1.0),
        assess_size=32,
        decide_size=64,
        history_size=4,  # small, so the ring buffer wraps within a test
        plugins=ev3core.load_plugins(autoload=False),
    ).build()


@pytest.fixture(scope="module")
def problem():
    data, _ = ev3core.toy_problem(jax.random.key(0), n=512)
    engine = _engine()
    init = engine.init(ev3core.toy_model(jax.random.key(1)), jax.random.key(2))
    return engine, data, init


def _raw(x):
    if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
        return ("key", str(jax.random.key_impl(x)), np.asarray(jax.random.key_data(x)))
    return ("array", None, np.asarray(x))


def _assert_bit_identical(a, b):
    """Same tree structure and every leaf equal bit for bit (NaN == NaN, keys by data)."""
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for (path, x), y in zip(jax.tree_util.tree_flatten_with_path(a)[0], jax.tree.leaves(b)):
        kx, ix, vx = _raw(x)
        ky, iy, vy = _raw(y)
        where = jax.tree_util.keystr(path)
        assert (kx, ix, vx.dtype, vx.shape) == (ky, iy, vy.dtype, vy.shape), where
        assert vx.tobytes() == vy.tobytes(), f"leaf {where} differs"


def _plugins(*extra):
    return ev3core.load_plugins(extra=list(extra), autoload=False)


def _decisions(infos):
    return {  # each field is one array (a `Choice` holds one int32 array)
        k: np.asarray(jax.tree.leaves(getattr(infos, k))[0])
        for k in ("step", "winner", "choice", "accepted", "significant", "valid", "num_invalid")
    }


# ------------------------------------------------------------------------- round trip
def test_round_trip_is_bit_exact_and_keeps_metadata(problem, tmp_path):
    engine, data, init = problem
    state = init
    for _ in range(5):  # history (size 4) wraps; NaN-initialised rows get overwritten
        state, _ = engine.step(state, data)
    path = save_checkpoint(tmp_path, state, metadata={"note": "x", "n": [1, 2]})
    assert path.name == "ckpt-0000000005.json"
    loaded, manifest = load_checkpoint(tmp_path, like=init)
    _assert_bit_identical(state, loaded)
    assert manifest["metadata"] == {"note": "x", "n": [1, 2]}
    assert manifest["step"] == 5 and manifest["format_version"] == FORMAT_VERSION
    assert manifest["versions"]["jax"] == jax.__version__
    assert manifest["device_count"] == jax.device_count()
    assert manifest["skipped"] == []
    # the key is typed and the step it produces is the same
    assert jax.dtypes.issubdtype(loaded.key.dtype, jax.dtypes.prng_key)
    _assert_bit_identical(engine.step(state, data), engine.step(loaded, data))
    # the digest the CLI summary reports sees every bit
    assert state_digest(loaded) == state_digest(state)
    assert state_digest(engine.step(state, data)[0]) != state_digest(state)
    # loading the manifest file directly works too
    again, _ = load_checkpoint(path, like=init)
    _assert_bit_identical(state, again)


def test_a_choice_in_the_state_round_trips(problem, tmp_path):
    """A scheduler state may hold a `Choice` (its last decision, say): it is saved as its one
    int32 array and loads back as the same item."""
    engine, data, init = problem
    state, _ = engine.step(init, data)
    remember = lambda s, c: eqx.tree_at(  # noqa: E731
        lambda t: t.scheduler_state, s, (s.scheduler_state, c)
    )
    kept = remember(
        state, ev3core.Choice.where(state.step > 0, ev3core.Choice.stable, ev3core.Choice.winner)
    )
    save_checkpoint(tmp_path, kept)
    loaded, _ = load_checkpoint(tmp_path, like=remember(init, ev3core.Choice.current))
    choice = loaded.scheduler_state[1]
    assert isinstance(choice, ev3core.Choice) and bool(choice == ev3core.Choice.stable)
    assert ev3core.Choice[choice] == "stable"
    _assert_bit_identical(kept, loaded)


def test_resuming_reuses_the_compiled_step(problem, tmp_path):
    """A loaded state is placed like `like` (uncommitted after `init`), so the first step after
    a resume reuses the compiled program instead of compiling it again (seconds per resume)."""
    import logging

    engine, data, init = problem
    state, _ = engine.step(init, data)  # compiled for this placement
    save_checkpoint(tmp_path, state)
    loaded, _ = load_checkpoint(tmp_path, like=init)
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append
    logger = logging.getLogger("jax")
    logger.addHandler(handler)
    try:
        with jax.log_compiles():
            engine.step(loaded, data)
    finally:
        logger.removeHandler(handler)
    compiles = [r.getMessage() for r in records if "jit(step)" in r.getMessage()]
    assert not compiles, compiles


def test_no_temporary_files_are_left_and_only_the_last_n_are_kept(problem, tmp_path):
    engine, data, init = problem
    state = init
    for _ in range(5):
        state, _ = engine.step(state, data)
        save_checkpoint(tmp_path, state, keep=2)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert [n for n in names if n.endswith(".json")] == [
        "ckpt-0000000004.json",
        "ckpt-0000000005.json",
    ]
    assert len([n for n in names if n.endswith(".leaves")]) == 2
    assert not [n for n in names if n.startswith(".") or n.endswith(".tmp")]
    assert latest_checkpoint(tmp_path) == tmp_path / "ckpt-0000000005.json"
    assert latest_checkpoint(tmp_path / "missing") is None


def test_saving_the_same_step_twice_replaces_it_safely(problem, tmp_path):
    engine, data, init = problem
    state, _ = engine.step(init, data)
    save_checkpoint(tmp_path, state, metadata={"v": 1})
    save_checkpoint(tmp_path, state, metadata={"v": 2})
    _, manifest = load_checkpoint(tmp_path, like=init)
    assert manifest["metadata"] == {"v": 2}
    assert len(list(tmp_path.glob("*.leaves"))) == 1  # same leaves, same content-named file


# ------------------------------------------------------------------------- exact resume
@pytest.mark.parametrize("chunk", [1, 2])
def test_resume_after_k_steps_is_bit_identical_to_an_uninterrupted_run(problem, tmp_path, chunk):
    engine, data, init = problem
    n, k = 6, 2
    straight, infos_straight = ev3core.run(engine, init, data, n, plugins=_plugins(), chunk=chunk)

    # Interrupted: k steps with a checkpointer, then a fresh process-like restart.
    first = Checkpointer(tmp_path, every=2, keep=10)
    part, infos_a = ev3core.run(engine, init, data, k, plugins=_plugins(first), chunk=chunk)
    assert int(part.step) == k and latest_checkpoint(tmp_path).name == f"ckpt-{k:010d}.json"

    fresh_engine = _engine()  # rebuilt from scratch, as a new process would
    like = fresh_engine.init(ev3core.toy_model(jax.random.key(1)), jax.random.key(2))
    resumed, manifest = load_checkpoint(tmp_path, like=like)
    assert manifest["metadata"]["pipeline"]["assessors"][0]["name"] == "accuracy"
    second = Checkpointer(tmp_path, every=2, keep=10)
    final, infos_b = ev3core.run(
        fresh_engine, resumed, data, n - k, plugins=_plugins(second), chunk=chunk
    )

    _assert_bit_identical(straight, final)
    a, b, s = _decisions(infos_a), _decisions(infos_b), _decisions(infos_straight)
    for key in s:
        np.testing.assert_array_equal(np.concatenate([a[key], b[key]]), s[key], err_msg=key)
    np.testing.assert_array_equal(
        np.concatenate([infos_a.decide_mean, infos_b.decide_mean]), infos_straight.decide_mean
    )
    # and the resumed run's own checkpoints continue the sequence
    assert [p.name for p in list_checkpoints(tmp_path)][-1] == f"ckpt-{n:010d}.json"


# ------------------------------------------------------------------------- corruption
def _two_checkpoints(engine, data, init, directory):
    s1, _ = engine.step(init, data)
    save_checkpoint(directory, s1)
    s2, _ = engine.step(s1, data)
    save_checkpoint(directory, s2)
    return s1, s2


def _leaves_of(manifest_path: Path) -> Path:
    return manifest_path.parent / json.loads(manifest_path.read_text())["leaves_file"]


@pytest.mark.parametrize(
    "damage",
    [
        "truncate",
        "flip_byte",
        "delete_leaves",
        "edit_manifest",
        "garbage_manifest",
        "future_version",
    ],
)
def test_damaged_newest_checkpoint_is_detected_and_the_previous_one_used(problem, tmp_path, damage):
    engine, data, init = problem
    s1, _ = _two_checkpoints(engine, data, init, tmp_path)
    newest = latest_checkpoint(tmp_path)
    leaves = _leaves_of(newest)
    if damage == "truncate":
        blob = leaves.read_bytes()
        leaves.write_bytes(blob[: len(blob) // 2])
        reason = "truncated"
    elif damage == "flip_byte":
        blob = bytearray(leaves.read_bytes())
        blob[-3] ^= 0x01  # inside the last array's data: still decodes, but differently
        leaves.write_bytes(bytes(blob))
        reason = "SHA-256"
    elif damage == "delete_leaves":
        leaves.unlink()
        reason = "missing"
    elif damage == "edit_manifest":
        body = json.loads(newest.read_text())
        body["step"] = 99
        newest.write_text(json.dumps(body))
        reason = "checksum"
    elif damage == "garbage_manifest":
        newest.write_text('{"format": "ev3core-checkpoint", "format_')
        reason = "JSON"
    else:
        body = json.loads(newest.read_text())
        body["format_version"] = FORMAT_VERSION + 1
        newest.write_text(json.dumps(body))
        reason = "format version"

    with pytest.warns(CheckpointWarning, match="resuming from ckpt-0000000001.json") as rec:
        state, manifest = load_checkpoint(tmp_path, like=init)
    assert reason in str(rec[0].message)
    _assert_bit_identical(state, s1)
    assert manifest["step"] == 1
    assert [Path(s["file"]).name for s in manifest["skipped"]] == ["ckpt-0000000002.json"]
    assert reason in manifest["skipped"][0]["reason"]

    # Asked for that file explicitly: no fallback, a clear error.
    with pytest.raises(CheckpointError, match="ckpt-0000000002.json is unusable"):
        load_checkpoint(newest, like=init)


def test_no_usable_checkpoint_is_a_checkpoint_error(problem, tmp_path):
    engine, data, init = problem
    _two_checkpoints(engine, data, init, tmp_path)
    for m in list_checkpoints(tmp_path):
        _leaves_of(m).write_bytes(b"")
    with pytest.raises(CheckpointError, match="no usable checkpoint") as err:
        load_checkpoint(tmp_path, like=init)
    assert "ckpt-0000000001.json" in str(err.value) and "ckpt-0000000002.json" in str(err.value)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "nowhere", like=init)


class _Payload:
    """Unpickling this would set a flag: a checkpoint must never be unpickled."""

    ran = False

    def __reduce__(self):
        return (_mark_ran, ())


def _mark_ran():
    _Payload.ran = True
    return 0


def test_a_pickle_inside_a_checkpoint_is_never_executed(problem, tmp_path):
    engine, data, init = problem
    s1, _ = _two_checkpoints(engine, data, init, tmp_path)
    newest = latest_checkpoint(tmp_path)
    leaves = _leaves_of(newest)
    # An attacker who can write the directory can also recompute the checksums.
    evil = np.empty((), dtype=object)
    evil[()] = _Payload()
    with open(leaves, "wb") as f:
        np.save(f, evil, allow_pickle=True)
    body = json.loads(newest.read_text())
    blob = leaves.read_bytes()
    body["leaves_bytes"] = len(blob)
    body["leaves_sha256"] = hashlib.sha256(blob).hexdigest()
    body["manifest_sha256"] = _manifest_digest(body)
    newest.write_text(json.dumps(body))
    with pytest.warns(CheckpointWarning, match="cannot be decoded"):
        state, _ = load_checkpoint(tmp_path, like=init)
    assert not _Payload.ran
    _assert_bit_identical(state, s1)


def test_a_crash_while_writing_leaves_the_previous_checkpoint(problem, tmp_path, monkeypatch):
    engine, data, init = problem
    s1, _ = engine.step(init, data)
    save_checkpoint(tmp_path, s1)
    s2, _ = engine.step(s1, data)

    real_replace = os.replace

    def crash(src, dst):
        if str(dst).endswith(".json"):
            raise OSError("disk full (simulated)")
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError, match="simulated"):
        save_checkpoint(tmp_path, s2)
    monkeypatch.setattr(os, "replace", real_replace)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # temp file removed
    state, manifest = load_checkpoint(tmp_path, like=init)
    assert manifest["step"] == 1 and manifest["skipped"] == []
    _assert_bit_identical(state, s1)


# ------------------------------------------------------------------------- structure
def test_a_like_of_another_architecture_gets_a_clear_error(problem, tmp_path):
    engine, data, init = problem
    save_checkpoint(tmp_path, init)
    wider = eqx.nn.MLP(2, 2, 16, 1, activation=jax.nn.relu, key=jax.random.key(1))
    like = engine.init(wider, jax.random.key(2))
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(tmp_path, like=like)
    msg = str(err.value)
    assert ".current.layers[0].weight" in msg and "(8, 2)" in msg and "(16, 2)" in msg
    assert "same model architecture" in msg
    # a pipeline with another optimizer state (no momentum buffer) is caught as well
    other = _engine(hidden_momentum=None).init(
        ev3core.toy_model(jax.random.key(1)), jax.random.key(2)
    )
    with pytest.raises(CheckpointError, match="does not fit"):
        load_checkpoint(tmp_path, like=other)


def test_bad_arguments_are_checkpoint_errors(problem, tmp_path):
    _, _, init = problem
    with pytest.raises(CheckpointError, match="keep=0"):
        save_checkpoint(tmp_path, init, keep=0)
    with pytest.raises(CheckpointError, match="JSON"):
        save_checkpoint(tmp_path, init, metadata={"f": object()})
    with pytest.raises(CheckpointError, match="every=0"):
        Checkpointer(tmp_path, every=0)


# ------------------------------------------------------------------------- plugin
class _InterruptAt:
    """Sends this process SIGINT (as Ctrl-C would) after the given run step."""

    def __init__(self, step):
        self.step = step

    @ev3core.hookimpl
    def ev3_after_step(self, step):
        if step == self.step:
            os.kill(os.getpid(), signal.SIGINT)


def test_checkpointer_saves_every_n_steps_and_at_the_end(problem, tmp_path):
    engine, data, init = problem
    ck = Checkpointer(tmp_path, every=2, keep=10, metadata=lambda: {"calls": 1})
    state, _ = ev3core.run(engine, init, data, 5, plugins=_plugins(ck))
    steps = [int(p.name[5:15]) for p in list_checkpoints(tmp_path)]
    assert steps == [2, 4, 5]
    loaded, manifest = load_checkpoint(tmp_path, like=init)
    _assert_bit_identical(state, loaded)
    assert manifest["metadata"]["calls"] == 1
    assert manifest["metadata"]["pipeline"]["proposers"][0]["num_candidates"] == 4


def test_ctrl_c_stops_at_a_step_boundary_and_writes_a_final_checkpoint(problem, tmp_path):
    if signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
        pytest.skip("another SIGINT handler is installed; run would leave it alone")
    engine, data, init = problem
    ck = Checkpointer(tmp_path, every=100)
    with pytest.raises(RunInterrupted) as err:
        ev3core.run(engine, init, data, 50, plugins=_plugins(_InterruptAt(2), ck))
    assert err.value.steps_done == 3 and int(err.value.state.step) == 3
    assert isinstance(err.value, KeyboardInterrupt)
    assert err.value.infos.winner.shape == (3,)
    loaded, manifest = load_checkpoint(tmp_path, like=init)
    assert manifest["step"] == 3
    _assert_bit_identical(err.value.state, loaded)
    # the handler was restored: Python's default one is back
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
