"""Two real processes on localhost (`jax.distributed`, CPU gloo collectives) share the
candidates of one engine and agree with a single-process run, stepping by hand and through
`ev3core.run` (whose host reads gather the candidate-sharded infos)."""

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time

import jax
import numpy as np
import optax

import ev3core

STEPS = 3
NUM_LOSSES = 4  # K = 4: one candidate per device on 2 processes x 2 devices

WORKER = textwrap.dedent(
    """
    import json, sys
    import jax
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.config.update("jax_num_cpu_devices", 2)
    jax.config.update("jax_numpy_dtype_promotion", "strict")
    port, pid, out = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    jax.distributed.initialize(f"127.0.0.1:{port}", num_processes=2, process_id=pid)
    import numpy as np
    import ev3core
    sys.path.insert(0, sys.argv[4])
    from test_multihost import STEPS, make_engine

    mesh = ev3core.candidate_mesh()  # the devices of both processes
    assert mesh.devices.size == 4 and jax.local_device_count() == 2
    engine = make_engine(mesh=mesh)
    data, _ = ev3core.toy_problem(jax.random.key(0), n=4096)
    data = ev3core.replicate(data, mesh)
    state = engine.init(ev3core.toy_model(jax.random.key(1)), jax.random.key(2))
    trace = jax.tree.leaves(state.proposer_states[0].opt_states[0][0])[0]
    local_rows = sorted({s.index[0].start for s in trace.addressable_shards})
    decisions = []
    for _ in range(STEPS):
        state, info = engine.step(state, data)
        local = lambda x: np.asarray(x.addressable_data(0)).tolist()
        choice = jax.tree.leaves(info.choice)[0]  # a Choice holds one int32 array
        decisions.append([local(info.winner), local(choice), local(info.accepted)])
    current = [np.asarray(x.addressable_data(0)).tolist() for x in jax.tree.leaves(state.current)]
    # ev3core.run on the same engine: a scanned chunk of 2 steps, then a single step (its
    # compiled program is the one above), with a progress bar and a JSON-lines logger that
    # read the infos. The candidate-sharded infos (`valid`) come back whole on both.
    bar = ev3core.ProgressBar(every=2, disable=True)
    log = ev3core.JsonlLogger(out + ".jsonl")
    state, infos = ev3core.run(engine, state, data, 3, chunk=2, observers=[bar, log],
                               plugins=ev3core.load_plugins(autoload=False))
    run_out = {"choice": np.asarray(ev3core.choice_index(infos.choice)).tolist(),
               "valid": infos.valid.tolist(),
               "step": np.asarray(state.step.addressable_data(0)).tolist(),
               "logged": [json.loads(line)["step"] for line in open(out + ".jsonl")],
               "counted": sum(bar.counts[k] for k in ("accepted", "kept", "rolled_back"))}
    with open(out, "w") as f:
        json.dump({"decisions": decisions, "current": current, "rows": local_rows,
                   "processes": jax.process_count(), "run": run_out}, f)
    jax.distributed.shutdown()
    """
)


RESUME_WORKER = textwrap.dedent(
    """
    import hashlib, json, os, sys, time
    import jax
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.config.update("jax_num_cpu_devices", 2)
    jax.config.update("jax_numpy_dtype_promotion", "strict")
    port, pid, out, phase, ckpt = sys.argv[1], int(sys.argv[2]), *sys.argv[3:6]
    jax.distributed.initialize(f"127.0.0.1:{port}", num_processes=2, process_id=pid)
    import numpy as np
    import ev3core
    sys.path.insert(0, sys.argv[6])
    from test_multihost import RESUME_AT, RESUME_STEPS, make_engine

    mesh = ev3core.candidate_mesh()
    engine = make_engine(mesh=mesh)
    data = ev3core.replicate(ev3core.toy_problem(jax.random.key(0), n=4096)[0], mesh)
    init = engine.init(ev3core.toy_model(jax.random.key(1)), jax.random.key(2))
    local = lambda x: np.asarray(x.addressable_data(0)).tolist()

    def steps(state, n, hooks=None):
        # A loop of our own, so the test knows each step as it is taken (ev3core.run in a
        # multi-process run is tested above). The Checkpointer is driven through its
        # lifecycle hooks, as run would.
        choices = []
        if hooks is not None:
            hooks.ev3_run_start(engine=engine, state=state)
        for i in range(n):
            state, info = engine.step(state, data)
            choices.append(local(jax.tree.leaves(info.choice)[0]))
            if hooks is not None:
                hooks.ev3_after_step(state=state, step=i)
        if hooks is not None:
            hooks.ev3_run_end(state=state, infos=choices)  # waits for the last commit
        return state, choices

    def digest(state):
        # Every byte this process holds of every leaf (its own shards, in device order).
        h = hashlib.sha256()
        for x in jax.tree.leaves(state):
            if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
                x = jax.random.key_data(x)
            for sh in sorted(x.addressable_shards, key=lambda s: s.device.id):
                h.update(repr(sh.index).encode())
                h.update(np.asarray(sh.data).tobytes())
        return h.hexdigest()

    if phase == "first":
        # Every process has a Checkpointer: Orbax writes each process's own shards.
        state, _ = steps(init, RESUME_AT, ev3core.Checkpointer(ckpt, every=2, keep=5))
        with open(out + ".tmp", "w") as f:
            json.dump({"step": local(state.step), "digest": digest(state)}, f)
        os.replace(out + ".tmp", out)  # complete once it exists
        time.sleep(600)  # killed here, with no shutdown
    else:
        resumed, manifest = ev3core.load_checkpoint(ckpt, like=init)
        resumed_digest = digest(resumed)
        final, choices = steps(resumed, RESUME_STEPS - local(resumed.step))
        straight, choices_s = steps(init, RESUME_STEPS)
        with open(out, "w") as f:
            json.dump({
                "loaded_step": manifest["step"], "storage": manifest["storage"],
                "process_count": manifest["process_count"], "resumed_digest": resumed_digest,
                "final": digest(final), "straight": digest(straight),
                "steps": [local(final.step), local(straight.step)],
                "choices": [choices, choices_s],
            }, f)
        jax.distributed.shutdown()
    """
)
RESUME_AT, RESUME_STEPS = 3, 6


def make_engine(mesh=None):
    proposer = ev3core.GradientProposer(
        [ev3core.CrossEntropy(t) for t in np.linspace(0.5, 2.0, NUM_LOSSES)],
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


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_agree_with_one(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("XLA_", "JAX_"))}
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                str(script),
                str(port),
                str(i),
                str(tmp_path / f"out{i}.json"),
                os.path.dirname(__file__),
            ],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for i in range(2)
    ]
    # The single-process reference (one device, no mesh) while the workers start.
    engine = make_engine()
    data, _ = ev3core.toy_problem(jax.random.key(0), n=4096)
    state = engine.init(ev3core.toy_model(jax.random.key(1)), jax.random.key(2))
    decisions = []
    for _ in range(STEPS):
        state, info = engine.step(state, data)
        decisions.append(
            [int(info.winner), int(ev3core.choice_index(info.choice)), bool(info.accepted)]
        )
    after = state
    run_choice, run_valid = [], []
    for _ in range(3):  # the steps the workers take with ev3core.run
        after, info = engine.step(after, data)
        run_choice.append(int(ev3core.choice_index(info.choice)))
        run_valid.append(np.asarray(info.valid).tolist())
    for p in procs:
        out, _ = p.communicate(timeout=240)
        assert p.returncode == 0, out
    results = [json.loads((tmp_path / f"out{i}.json").read_text()) for i in range(2)]
    # Each process holds its own half of the per-candidate optimizer states ...
    assert results[0]["processes"] == 2
    assert results[0]["rows"] == [0, 1] and results[1]["rows"] == [2, 3]
    # ... and both make the single-process run's decisions, with its parameters.
    assert any(d[2] for d in decisions)
    for r in results:
        assert r["decisions"] == decisions
        for got, want in zip(r["current"], jax.tree.leaves(state.current), strict=True):
            np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=2e-5, atol=2e-6)
        # ev3core.run completes on every process, with every candidate's infos
        run = r["run"]
        assert run["step"] == STEPS + 3 and run["logged"] == [STEPS, STEPS + 1, STEPS + 2]
        assert run["choice"] == run_choice and run["valid"] == run_valid
        assert np.shape(run["valid"]) == (3, NUM_LOSSES) and run["counted"] == 3


def _launch(script, port, tmp_path, tag, *args, cache=None):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("XLA_", "JAX_"))}
    if cache is not None:  # JAX's persistent compilation cache, for every program
        env.update(
            JAX_COMPILATION_CACHE_DIR=str(cache),
            JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
            JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="-1",
        )
    return [
        subprocess.Popen(
            [
                sys.executable,
                str(script),
                str(port),
                str(i),
                str(tmp_path / f"{tag}{i}.json"),
                *args,
                os.path.dirname(__file__),
            ],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for i in range(2)
    ]


def test_two_processes_killed_after_an_orbax_checkpoint_resume_exactly(tmp_path):
    """Two processes checkpoint with Orbax (each writes its own shards), are killed (SIGKILL,
    no shutdown), restart and resume: the final state is byte for byte, shard for shard, the
    state of an uninterrupted two-process run."""
    script = tmp_path / "worker.py"
    script.write_text(RESUME_WORKER)
    ckpt = tmp_path / "ckpt"
    # The restarted processes load the programs the first ones compiled (process 0 writes
    # them), as a restarted job with a compilation cache would.
    cache = tmp_path / "jax-cache"
    first = _launch(script, _free_port(), tmp_path, "first", "first", str(ckpt), cache=cache)
    outs = [tmp_path / f"first{i}.json" for i in range(2)]
    deadline = time.monotonic() + 420  # two compiles on a loaded machine
    while not all(o.exists() for o in outs):
        dead = [p for p in first if p.poll() is not None]
        if dead or time.monotonic() > deadline:
            for p in first:
                p.kill()
            raise AssertionError(
                "first run failed: " + "\n".join(p.communicate()[0] for p in first)
            )
        time.sleep(0.5)
    for p in first:
        p.send_signal(signal.SIGKILL)
        p.communicate()
        assert p.returncode == -signal.SIGKILL
    before = [json.loads(o.read_text()) for o in outs]
    assert all(b["step"] == RESUME_AT for b in before)
    manifest = json.loads((ckpt / f"ckpt-{RESUME_AT:010d}.json").read_text())
    assert manifest["storage"] == "orbax" and manifest["process_count"] == 2
    # Each process wrote its own shards (one OCDBT sub-store per process).
    root = ckpt / manifest["orbax_dir"]
    assert {p.name for p in root.iterdir() if p.name.startswith("ocdbt.process_")} == {
        "ocdbt.process_0",
        "ocdbt.process_1",
    }

    second = _launch(script, _free_port(), tmp_path, "second", "second", str(ckpt), cache=cache)
    for p in second:
        out, _ = p.communicate(timeout=420)
        assert p.returncode == 0, out
    for i in range(2):
        r = json.loads((tmp_path / f"second{i}.json").read_text())
        assert r["loaded_step"] == RESUME_AT and r["storage"] == "orbax"
        assert r["resumed_digest"] == before[i]["digest"]  # the shards this process saved
        assert r["steps"] == [RESUME_STEPS, RESUME_STEPS]
        assert r["final"] == r["straight"]
        assert r["choices"][0] == r["choices"][1][RESUME_AT:]
