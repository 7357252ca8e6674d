"""Two real processes on localhost (`jax.distributed`, CPU gloo collectives) share the
candidates of one engine and agree with a single-process run."""

import json
import os
import socket
import subprocess
import sys
import textwrap

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
        decisions.append([local(info.winner), local(info.choice), local(info.accepted)])
    current = [np.asarray(x.addressable_data(0)).tolist() for x in jax.tree.leaves(state.current)]
    with open(out, "w") as f:
        json.dump({"decisions": decisions, "current": current, "rows": local_rows,
                   "processes": jax.process_count()}, f)
    jax.distributed.shutdown()
    """
)


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
        decisions.append([int(info.winner), int(info.choice), bool(info.accepted)])
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
