"""Orbax checkpoints (sharded, asynchronous): exact resume, damage detection, the legacy
format next to them, and resuming on another number of devices (re-sharding)."""

import json
import warnings
from pathlib import Path

import jax
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P
from test_checkpoint import _assert_bit_identical, _decisions, _engine, _plugins

import ev3core
from ev3core import Checkpointer, latest_checkpoint, load_checkpoint, save_checkpoint
from ev3core._host.ckpt_manifest import list_checkpoints
from ev3core.errors import CheckpointError, CheckpointWarning


@pytest.fixture(scope="module")
def problem():
    data, _ = ev3core.toy_problem(jax.random.key(0), n=512)
    engine = _engine()
    init = engine.init(ev3core.toy_model(jax.random.key(1)), jax.random.key(2))
    return engine, data, init


def _orbax_dir(manifest: Path) -> Path:
    return manifest.parent / json.loads(manifest.read_text())["orbax_dir"]


def test_orbax_resume_is_bit_identical_to_an_uninterrupted_run(problem, tmp_path):
    engine, data, init = problem
    n, k = 5, 2
    straight, infos_straight = ev3core.run(engine, init, data, n, plugins=_plugins())

    first = Checkpointer(tmp_path, every=2, keep=10, storage="orbax")
    part, infos_a = ev3core.run(engine, init, data, k, plugins=_plugins(first))
    manifest = latest_checkpoint(tmp_path)
    assert manifest.name == f"ckpt-{k:010d}.json"  # the run's end waited for the commit
    body = json.loads(manifest.read_text())
    assert body["storage"] == "orbax" and body["versions"]["orbax-checkpoint"]
    # Every committed file is listed with its size and checksum; no temporary directory left.
    root = _orbax_dir(manifest)
    files = {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()}
    assert files == set(body["files"]) and body["data_bytes"] > 0
    assert not [p for p in tmp_path.iterdir() if "tmp" in p.name]

    like = _engine().init(ev3core.toy_model(jax.random.key(1)), jax.random.key(2))
    resumed, loaded_manifest = load_checkpoint(tmp_path, like=like)
    _assert_bit_identical(part, resumed)
    assert loaded_manifest["metadata"]["pipeline"]["assessors"][0]["name"] == "accuracy"
    second = Checkpointer(tmp_path, every=2, keep=10, storage="orbax")
    final, infos_b = ev3core.run(engine, resumed, data, n - k, plugins=_plugins(second))
    _assert_bit_identical(straight, final)
    a, b, s = _decisions(infos_a), _decisions(infos_b), _decisions(infos_straight)
    for key in s:
        np.testing.assert_array_equal(np.concatenate([a[key], b[key]]), s[key], err_msg=key)
    assert [p.name[5:15] for p in list_checkpoints(tmp_path)] == [f"{i:010d}" for i in (2, 4, 5)]


def test_legacy_checkpoints_still_load_and_are_pruned_with_orbax_ones(problem, tmp_path):
    engine, data, init = problem
    s1, _ = engine.step(init, data)
    s2, _ = engine.step(s1, data)
    legacy = save_checkpoint(tmp_path, s1, storage="leaves")
    # A save that was killed before its commit leaves Orbax's temporary directory behind.
    stale = tmp_path / "ckpt-0000000002-0123456789ab.orbax.orbax-checkpoint-tmp"
    stale.mkdir()
    (stale / "partial").write_bytes(b"x")
    save_checkpoint(tmp_path, s2, storage="orbax", keep=2)
    assert not stale.exists()  # pruned after the commit

    state, manifest = load_checkpoint(tmp_path, like=init)
    assert manifest["storage"] == "orbax" and manifest["step"] == 2
    _assert_bit_identical(s2, state)
    old, old_manifest = load_checkpoint(legacy, like=init)  # the existing format reads as ever
    assert "storage" not in old_manifest
    _assert_bit_identical(s1, old)

    s3, _ = engine.step(s2, data)
    save_checkpoint(tmp_path, s3, storage="orbax", keep=1)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert [n for n in names if n.endswith(".json")] == ["ckpt-0000000003.json"]
    assert [n for n in names if not n.endswith(".json")] == [
        _orbax_dir(tmp_path / "ckpt-0000000003.json").name
    ]


@pytest.mark.parametrize("damage", ["delete_file", "truncate", "flip_byte"])
def test_damaged_orbax_checkpoint_falls_back_to_the_previous_one(problem, tmp_path, damage):
    engine, data, init = problem
    s1, _ = engine.step(init, data)
    save_checkpoint(tmp_path, s1, storage="orbax")
    s2, _ = engine.step(s1, data)
    newest = save_checkpoint(tmp_path, s2, storage="orbax")
    root = _orbax_dir(newest)
    body = json.loads(newest.read_text())
    # The largest file holds array data.
    rel = max(body["files"], key=lambda r: body["files"][r][0])
    target = root / rel
    if damage == "delete_file":
        target.unlink()
        reason = "missing"
    elif damage == "truncate":
        target.write_bytes(target.read_bytes()[:-7])
        reason = "truncated"
    else:
        blob = bytearray(target.read_bytes())
        blob[len(blob) // 2] ^= 0x01
        target.write_bytes(bytes(blob))
        reason = "SHA-256"
    with pytest.warns(CheckpointWarning, match="resuming from ckpt-0000000001.json") as rec:
        state, manifest = load_checkpoint(tmp_path, like=init)
    assert reason in str(rec[0].message)
    _assert_bit_identical(s1, state)
    with pytest.raises(CheckpointError, match="ckpt-0000000002.json is unusable"):
        load_checkpoint(newest, like=init)


def test_unknown_storage_is_a_checkpoint_error(problem, tmp_path):
    _, _, init = problem
    with pytest.raises(CheckpointError, match="storage='zarr'"):
        save_checkpoint(tmp_path, init, storage="zarr")


# ------------------------------------------------------------------ another device count
def _sharded_engine(mesh=None):
    proposer = ev3core.GradientProposer(
        [ev3core.CrossEntropy(t) for t in np.linspace(0.5, 2.0, 8)],
        [optax.sgd(0.05, momentum=0.9)],
        steps=4,
        batch_size=16,
    )
    return ev3core.Engine(
        [proposer],
        [ev3core.Accuracy(), ev3core.NegCrossEntropy()],
        ev3core.EV3Scheduler(0.5, 1.0),
        assess_size=64,
        decide_size=256,
        mesh=mesh,
    )


def _steps(engine, state, data, n):
    infos = []
    for _ in range(n):
        state, info = engine.step(state, data)
        infos.append(info)
    return state, jax.tree.map(lambda *xs: np.stack(xs), *jax.device_get(infos))


@pytest.fixture(scope="module")
def moved():
    """Engines over 8 devices, 4 devices and one device (no mesh), built once, and the
    8-device run: its state after 2 steps and its next 5 steps (the run that never moved)."""
    data, _ = ev3core.toy_problem(jax.random.key(0), n=4096)
    model = ev3core.toy_model(jax.random.key(1))
    engines = {n: _sharded_engine(ev3core.candidate_mesh(jax.devices()[:n])) for n in (8, 4)}
    engines[1] = _sharded_engine(None)
    state, _ = _steps(engines[8], engines[8].init(model, jax.random.key(2)), data, 2)
    ref_state, ref_infos = _steps(engines[8], state, data, 5)
    assert ref_infos.accepted.any()
    return engines, data, model, state, ref_state, ref_infos


@pytest.mark.parametrize("storage", ["orbax", "leaves"])
def test_saved_on_8_devices_resumes_on_4_and_on_1(moved, tmp_path, storage):
    """Save with the candidates split over 8 devices, load onto 4 devices and onto one: the
    same state, re-sharded as `like` is; the next 5 steps decide as the 8-device run that
    never stopped (parameters equal up to float reduction order)."""
    engines, data, model, state, ref_state, ref_infos = moved
    save_checkpoint(tmp_path, state, storage=storage)
    for devices in (4, 1):
        engine = engines[devices]
        like = engine.init(model, jax.random.key(2))
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            loaded, manifest = load_checkpoint(tmp_path, like=like)
        assert manifest["device_count"] == 8
        _assert_bit_identical(state, loaded)
        trace = jax.tree.leaves(loaded.proposer_states[0].opt_states[0][0])[0]
        if engine.mesh is not None:  # placed as `like`: split over this mesh's devices
            assert trace.sharding.spec == P("candidate")
            assert len({sh.device for sh in trace.addressable_shards}) == devices
            assert {sh.data.shape[0] for sh in trace.addressable_shards} == {8 // devices}
        else:
            assert len(trace.devices()) == 1
        moved_state, moved_infos = _steps(engine, loaded, data, 5)
        for name in ("winner", "choice", "accepted", "significant", "valid"):
            np.testing.assert_array_equal(  # a `Choice` holds one int32 array
                *(jax.tree.leaves(getattr(i, name))[0] for i in (moved_infos, ref_infos)),
                err_msg=f"{devices}: {name}",
            )
        for x, y in zip(
            jax.tree.leaves(moved_state.current), jax.tree.leaves(ref_state.current), strict=True
        ):
            np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=2e-5, atol=2e-6)


def test_orbax_and_single_file_checkpoints_are_pruned_in_write_order(problem, tmp_path):
    engine, data, init = problem
    states = [init]
    for _ in range(4):
        states.append(engine.step(states[-1], data)[0])
    # Written out of step order on purpose: step 3 (Orbax), step 1 (single file), step 2 (Orbax).
    save_checkpoint(tmp_path, states[3], storage="orbax", keep=2, run_id="a")
    oldest_dir = _orbax_dir(tmp_path / "ckpt-0000000003.json")
    save_checkpoint(tmp_path, states[1], storage="leaves", keep=2, run_id="a")
    save_checkpoint(tmp_path, states[2], storage="orbax", keep=2, run_id="a")
    # The highest step was written first, so it is the one deleted, Orbax directory included.
    assert [p.name for p in list_checkpoints(tmp_path)] == [
        "ckpt-0000000001.json",
        "ckpt-0000000002.json",
    ]
    assert not oldest_dir.exists()
    bodies = [json.loads(p.read_text()) for p in list_checkpoints(tmp_path)]
    assert [b["sequence"] for b in bodies] == [2, 3]
    assert [b.get("storage") for b in bodies] == [None, "orbax"]
    assert {b["run_id"] for b in bodies} == {"a"}
    # The newest is the last written (step 2), not the highest step on disk.
    state, manifest = load_checkpoint(tmp_path, like=init)
    assert manifest["step"] == 2 and manifest["sequence"] == 3
    _assert_bit_identical(states[2], state)

    save_checkpoint(tmp_path, states[4], storage="leaves", keep=2, run_id="a")
    assert [p.name for p in list_checkpoints(tmp_path)] == [
        "ckpt-0000000002.json",
        "ckpt-0000000004.json",
    ]
    assert not list(tmp_path.glob("ckpt-0000000001-*.leaves"))
    assert _orbax_dir(tmp_path / "ckpt-0000000002.json").is_dir()


def test_an_orbax_checkpointer_refuses_another_runs_directory(problem, tmp_path):
    engine, data, init = problem
    first = Checkpointer(tmp_path, every=1, keep=5, storage="orbax")
    part, _ = ev3core.run(engine, init, data, 2, plugins=_plugins(first))
    bodies = [json.loads(p.read_text()) for p in list_checkpoints(tmp_path)]
    assert [b["run_id"] for b in bodies] == [first.run_id] * 2
    assert [b["sequence"] for b in bodies] == [1, 2]
    before = sorted(p.name for p in tmp_path.iterdir())

    # A fresh run (another starting state) is refused before it writes anything...
    fresh = Checkpointer(tmp_path, every=1, keep=1, storage="orbax")
    with pytest.raises(CheckpointError, match="another run"):
        ev3core.run(engine, init, data, 1, plugins=_plugins(fresh))
    with pytest.raises(CheckpointError, match="another run"):
        fresh.save(init)
    assert sorted(p.name for p in tmp_path.iterdir()) == before

    # ... while a resume of that run (its Orbax checkpoint, loaded) continues it.
    resumed, _ = load_checkpoint(tmp_path, like=init)
    second = Checkpointer(tmp_path, every=1, keep=5, storage="orbax")
    ev3core.run(engine, resumed, data, 1, plugins=_plugins(second))
    assert second.run_id == first.run_id
    assert [json.loads(p.read_text())["sequence"] for p in list_checkpoints(tmp_path)] == [1, 2, 3]
