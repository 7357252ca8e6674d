"""Scaling benchmark: one dispatch of K candidates vs K dispatches, memory per candidate,
and the same on 8 (virtual) devices with the candidates sharded.

Workloads (a single `GradientProposer` with K cross-entropy temperatures x SGD, so the K
candidates form one vmapped block):

* `small`: the smoke problem (2-D data, MLP 2-8-2, trajectories of 100 steps of batch 32,
  assess 128, decide 2048).
* `mlp`: MLP 784-512-512-10 on random data (10 classes), trajectories of 10 steps of batch
  32, assess 128, decide 512.

For each K in {1, 2, 4, 8, 16, 32, 64}: the median seconds per EV3 iteration (`Engine.step`,
after compiling), candidates per second (K / s), candidate optimizer steps per second
(K * L / s), the ratio of the K-candidate iteration to K single-candidate iterations
(`t(K) / (K t(1))`; target < 0.5 at K = 16 on `small`), and the compiled program's memory
(`memory_analysis()`: arguments + outputs + temporaries) in total and per candidate. Then,
in a subprocess with `XLA_FLAGS=--xla_force_host_platform_device_count=8`, the same with
`Engine(mesh=ev3core.candidate_mesh())`.

Two-axis mesh (`two_axis`, in its own 8-device subprocess): the `mlp` model on labels of a
random linear teacher (so that candidates get accepted), K = 2 candidates (two temperatures
x SGD 0.3 with momentum 0.9), trajectories of 10 steps of batches of 4096, assess 128,
decide 512. The same work per step on one device, on a 2-device candidate mesh
(`candidate_mesh(jax.devices()[:2])`, one candidate per device) and on a 2 x 4
`("candidate", "data")` mesh (`candidate_mesh(candidates=2, data=4)`, each candidate's
examples over 4 devices): the compiled step's per-device memory (`memory_analysis()`:
temporaries + arguments), the ratios, and whether the runs (a few steps from the same
state, data and key) make the same decisions with the same parameters.
Run:

    python benchmarks/scale.py --json benchmarks/scale.json          # a few minutes on 2 cores
    python benchmarks/scale.py --quick --json /tmp/scale.json        # under a minute
    python benchmarks/scale.py --only-two-axis --json benchmarks/scale.json  # that part only,
                                                     # merged into the file's other figures

Timings on a shared machine are noisy; the ratios (same process, same load) are the figures
to compare. On 8 *virtual* CPU devices of a 2-core machine sharding cannot be faster (the
devices share the cores); it shows the sharded program's overhead, not a speed-up.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time

KS = (1, 2, 4, 8, 16, 32, 64)
_LOG = sys.stdout  # the 8-device child logs to stderr, its JSON goes to stdout


def _engine(workload: str, k: int, mesh=None, chunk=None, batch=None):
    import numpy as np
    import optax

    import ev3core

    if workload == "small":
        steps, batch, assess, decide, lr = 100, 32, 128, 2048, 0.1
    else:
        steps, batch, assess, decide, lr = 10, batch or 32, 128, 512, 0.01
    proposer = ev3core.GradientProposer(
        [ev3core.CrossEntropy(t) for t in np.linspace(0.5, 2.0, k)],
        [optax.sgd(lr)],
        steps=steps,
        batch_size=batch,
        chunk_size=chunk,
    )
    engine = ev3core.Engine(
        [proposer],
        [ev3core.Accuracy(), ev3core.NegCrossEntropy()],
        ev3core.EV3Scheduler(0.5, 4.0),
        assess_size=assess,
        decide_size=decide,
        mesh=mesh,
        chunk_size=chunk,
    )
    return engine, steps


def _problem(workload: str):
    import equinox as eqx
    import jax
    import jax.numpy as jnp

    import ev3core

    if workload == "small":
        data, _ = ev3core.toy_problem(jax.random.key(0), n=20_000)
        return data, ev3core.toy_model(jax.random.key(1))
    ks = jax.random.split(jax.random.key(0), 6)

    def split(kx, ky, n=4096):
        return jax.random.normal(kx, (n, 784)), jax.random.randint(ky, (n,), 0, 10, jnp.int32)

    data = ev3core.Data(split(*ks[:2]), split(*ks[2:4]), split(*ks[4:6]))
    model = eqx.nn.MLP(784, 10, 512, 2, activation=jax.nn.relu, key=jax.random.key(1))
    return data, model


def _compile(engine, state, data):
    """The compiled step (ahead of time) and its `memory_analysis()`."""
    import equinox as eqx

    t0 = time.perf_counter()
    lowered = eqx.filter_jit(lambda e, s, d: e.step_pure(s, d)).lower(engine, state, data)
    compiled = lowered.compile()
    compile_s = time.perf_counter() - t0
    m = compiled.compiled.memory_analysis()
    mem = None
    if m is not None:
        mem = {
            "argument_bytes": int(m.argument_size_in_bytes),
            "output_bytes": int(m.output_size_in_bytes),
            "temp_bytes": int(m.temp_size_in_bytes),
            "alias_bytes": int(m.alias_size_in_bytes),
            "peak_bytes": int(
                m.argument_size_in_bytes
                + m.output_size_in_bytes
                + m.temp_size_in_bytes
                - m.alias_size_in_bytes
            ),
        }
    return compiled, mem, compile_s


def _time(step, engine, state, data, iters: int) -> float:
    import jax

    state, _ = step(engine, state, data)
    jax.block_until_ready(state)
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        state, info = step(engine, state, data)
        jax.block_until_ready((state, info))
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def measure(workload: str, ks, iters: int, sharded: bool) -> dict:
    import jax

    import ev3core

    data, model = _problem(workload)
    mesh = ev3core.candidate_mesh() if sharded else None
    if mesh is not None:
        data = ev3core.replicate(data, mesh)
    rows = []
    for k in ks:
        engine, steps = _engine(workload, k, mesh=mesh)
        state = engine.init(model, jax.random.key(2))
        n = iters if k <= 16 else max(2, iters // 2)
        step, mem, compile_s = _compile(engine, state, data)
        med = _time(step, engine, state, data, n)
        rows.append(
            {
                "K": k,
                "s_per_iteration": med,
                "candidates_per_s": k / med,
                "candidate_optimizer_steps_per_s": k * steps / med,
                "compile_s": compile_s,
                "iterations_timed": n,
                "memory": mem,
            }
        )
        print(
            f"  [{workload}{' x8 devices' if sharded else ''}] K={k:3d}  "
            f"{med * 1e3:9.2f} ms/iter  {k / med:9.1f} cand/s  "
            f"peak {mem['peak_bytes'] / 2**20 if mem else float('nan'):8.2f} MiB",
            flush=True,
            file=_LOG,
        )
    base = rows[0]["s_per_iteration"] if rows and rows[0]["K"] == 1 else None
    for r in rows:
        r["ratio_vs_K_single_iterations"] = r["s_per_iteration"] / (r["K"] * base) if base else None
    mems = [(r["K"], r["memory"]["peak_bytes"]) for r in rows if r["memory"]]
    per_candidate = None
    if len(mems) >= 2:  # slope of peak memory in K (least squares)
        xs, ys = zip(*mems)
        mx, my = statistics.fmean(xs), statistics.fmean(ys)
        per_candidate = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum(
            (x - mx) ** 2 for x in xs
        )
    out = {
        "rows": rows,
        "peak_bytes_per_candidate_slope": per_candidate,
        "devices": len(jax.devices()),
    }
    if not sharded and workload == "mlp":
        # The chunking option bounds the trajectories' working set (gradients, activations).
        # With batch 32 the per-candidate memory is dominated by copies of the parameters,
        # so it is measured with trajectory batches of 1024 (compiled only, not timed).
        k = max(ks)
        chunk = max(1, k // 8)
        full, _ = _engine(workload, k, batch=1024)
        part, _ = _engine(workload, k, chunk=chunk, batch=1024)
        state = full.init(model, jax.random.key(2))
        _, mem_full, _ = _compile(full, state, data)
        _, mem_part, _ = _compile(part, state, data)
        out["chunking"] = {
            "K": k,
            "trajectory_batch_size": 1024,
            "chunk_size": chunk,
            "peak_bytes_all_at_once": mem_full["peak_bytes"],
            "peak_bytes_chunked": mem_part["peak_bytes"],
        }
        print(
            f"  [mlp, batch 1024] K={k} chunk_size={chunk}: peak "
            f"{mem_full['peak_bytes'] / 2**20:.1f} MiB -> "
            f"{mem_part['peak_bytes'] / 2**20:.1f} MiB",
            flush=True,
            file=_LOG,
        )
    return out


TWO_AXIS_BATCH = 4096
TWO_AXIS_STEPS = 3  # EV3 steps run to compare the results


def _teacher_problem():
    """The `mlp` model on data it can learn (labels from a random linear teacher), so that
    the compared runs accept candidates: 4096 propose, 512 assess, 512 decide examples."""
    import equinox as eqx
    import jax
    import jax.numpy as jnp

    import ev3core

    k_teacher, k_model, *ks = jax.random.split(jax.random.key(0), 5)
    teacher = jax.random.normal(k_teacher, (784, 10))

    def split(k, n):
        x = jax.random.normal(k, (n, 784))
        return x, jnp.argmax(x @ teacher, axis=1).astype(jnp.int32)

    data = ev3core.Data(split(ks[0], 4096), split(ks[1], 512), split(ks[2], 512))
    model = eqx.nn.MLP(784, 10, 512, 2, activation=jax.nn.relu, key=k_model)
    return data, model


def _two_axis_engine(mesh):
    """K = 2 (two cross-entropy temperatures x SGD with momentum), trajectories of 10 steps
    of 4096 examples."""
    import optax

    import ev3core

    proposer = ev3core.GradientProposer(
        [ev3core.CrossEntropy(t) for t in (0.5, 2.0)],
        [optax.sgd(0.3, momentum=0.9)],
        steps=10,
        batch_size=TWO_AXIS_BATCH,
    )
    return ev3core.Engine(
        [proposer],
        [ev3core.Accuracy(), ev3core.NegCrossEntropy()],
        ev3core.EV3Scheduler(0.5, 4.0),
        assess_size=128,
        decide_size=512,
        mesh=mesh,
    )


def two_axis() -> dict:
    """K = 2 on one device, on a 2-device candidate mesh and on a 2 x 4 (candidate, data)
    mesh: per-device memory of the compiled step, and whether the results are equal."""
    import jax
    import numpy as np

    import ev3core

    data, model = _teacher_problem()
    meshes = {
        "one_device": None,
        "candidates_2": ev3core.candidate_mesh(jax.devices()[:2]),
        "candidates_2_x_data_4": ev3core.candidate_mesh(candidates=2, data=4),
    }
    out: dict = {"K": 2, "trajectory_batch_size": TWO_AXIS_BATCH, "steps": TWO_AXIS_STEPS}
    runs = {}
    for name, mesh in meshes.items():
        engine = _two_axis_engine(mesh)
        d = data if mesh is None else ev3core.replicate(data, mesh)
        state = engine.init(model, jax.random.key(2))
        step, mem, compile_s = _compile(engine, state, d)
        infos = []
        t0 = time.perf_counter()
        for _ in range(TWO_AXIS_STEPS):
            state, info = step(engine, state, d)
            infos.append(info)
        jax.block_until_ready(state)
        seconds = (time.perf_counter() - t0) / TWO_AXIS_STEPS
        runs[name] = (jax.device_get(state.current), jax.device_get(infos))
        per_device = mem["temp_bytes"] + mem["argument_bytes"]
        out[name] = {
            "devices": 1 if mesh is None else int(mesh.devices.size),
            "mesh": None if mesh is None else dict(mesh.shape),
            "memory": mem,
            "per_device_bytes": per_device,
            "compile_s": compile_s,
            "s_per_iteration": seconds,
        }
        print(
            f"  [two-axis] {name:22s} {out[name]['devices']} devices: per device "
            f"temp {mem['temp_bytes'] / 2**20:7.2f} MiB + arguments "
            f"{mem['argument_bytes'] / 2**20:7.2f} MiB = {per_device / 2**20:7.2f} MiB",
            flush=True,
            file=_LOG,
        )

    def decisions(infos):
        return [(int(i.winner), int(jax.tree.leaves(i.choice)[0]), bool(i.accepted)) for i in infos]

    def diffs(a, b):
        """Max absolute and relative (norm of the difference / norm) parameter difference."""
        pairs = list(zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True))
        absolute = max(float(np.max(np.abs(np.asarray(x) - np.asarray(y)))) for x, y in pairs)
        relative = max(
            float(np.linalg.norm(np.asarray(x) - np.asarray(y)) / np.linalg.norm(np.asarray(y)))
            for x, y in pairs
        )
        return absolute, relative

    ref_params, ref_infos = runs["one_device"]
    for name in ("candidates_2", "candidates_2_x_data_4"):
        params, infos = runs[name]
        absolute, relative = diffs(params, ref_params)
        out[name]["same_decisions_as_one_device"] = decisions(infos) == decisions(ref_infos)
        out[name]["max_abs_param_diff_vs_one_device"] = absolute
        out[name]["max_rel_param_diff_vs_one_device"] = relative
    out["decisions"] = decisions(ref_infos)
    two, both = out["candidates_2"], out["candidates_2_x_data_4"]
    out["temp_ratio"] = both["memory"]["temp_bytes"] / two["memory"]["temp_bytes"]
    out["per_device_ratio"] = both["per_device_bytes"] / two["per_device_bytes"]
    print(
        f"  [two-axis] 2 x 4 / 2 devices per device: temp x{out['temp_ratio']:.3f}, "
        f"temp + arguments x{out['per_device_ratio']:.3f}; same decisions as one device: "
        f"{two['same_decisions_as_one_device']} / {both['same_decisions_as_one_device']}, "
        f"max |param diff| {two['max_abs_param_diff_vs_one_device']:.2e} / "
        f"{both['max_abs_param_diff_vs_one_device']:.2e} (relative "
        f"{two['max_rel_param_diff_vs_one_device']:.1e} / "
        f"{both['max_rel_param_diff_vs_one_device']:.1e})",
        flush=True,
        file=_LOG,
    )
    return out


def _eight_devices(args: list[str]) -> dict:
    """Run this script with `args` in a subprocess on 8 virtual CPU devices; its JSON."""
    env = dict(
        os.environ,
        XLA_FLAGS=(
            os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
        ).strip(),
    )
    cmd = [sys.executable, __file__, *args]
    proc = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, text=True, check=True)
    return json.loads(proc.stdout)


def _machine() -> dict:
    import jax

    return {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "jax": jax.__version__,
        "cpu_count": os.cpu_count(),
        "load_average": os.getloadavg(),
    }


def run_all(ks_small, ks_mlp, iters: int, sharded: bool) -> dict:
    return {
        "small": measure("small", ks_small, iters, sharded),
        "mlp": measure("mlp", ks_mlp, max(2, iters // 2), sharded),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json")
    ap.add_argument("--quick", action="store_true", help="K up to 16 / 8, fewer iterations")
    ap.add_argument("--iters", type=int, default=None, help="timed iterations per K")
    ap.add_argument("--no-sharded", action="store_true", help="skip the 8-device runs")
    ap.add_argument(
        "--only-two-axis",
        action="store_true",
        help="only the two-axis comparison; with --json, merged into the file's figures",
    )
    ap.add_argument("--_child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--_two_axis_child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    ks_small = KS[:5] if args.quick else KS
    ks_mlp = KS[:4] if args.quick else KS
    iters = args.iters or (4 if args.quick else 8)

    global _LOG
    if args._child:  # the 8-device run, in its own process (XLA_FLAGS set by the parent)
        _LOG = sys.stderr
        json.dump(run_all(ks_small, ks_mlp, iters, sharded=True), sys.stdout)
        return
    if args._two_axis_child:
        _LOG = sys.stderr
        json.dump(two_axis(), sys.stdout)
        return
    if args.only_two_axis:
        print("8 virtual devices, two-axis mesh (subprocess):", flush=True)
        result = {}
        if args.json and os.path.exists(args.json):
            with open(args.json) as f:
                result = json.load(f)
        result["two_axis"] = _eight_devices(["--_two_axis_child"])
        result["two_axis"]["machine"] = _machine()
        if args.json:
            with open(args.json, "w") as f:
                json.dump(result, f, indent=2)
        return

    import jax

    print(f"1 device ({jax.devices()[0].platform}):", flush=True)
    result = {"one_device": run_all(ks_small, ks_mlp, iters, sharded=False)}
    if not args.no_sharded:
        print("8 virtual devices, candidates sharded (subprocess):", flush=True)
        child = ["--_child", "--iters", str(iters)] + (["--quick"] if args.quick else [])
        result["eight_devices_sharded"] = _eight_devices(child)
        print("8 virtual devices, two-axis mesh (subprocess):", flush=True)
        result["two_axis"] = _eight_devices(["--_two_axis_child"])
    small = {r["K"]: r for r in result["one_device"]["small"]["rows"]}
    if 16 in small:
        print(
            f"ratio t(16) / (16 t(1)) on small: "
            f"{small[16]['ratio_vs_K_single_iterations']:.3f} (target < 0.5)"
        )
    result["machine"] = _machine()
    result["note"] = (
        "Shared 2-core machine: absolute times are noisy; compare ratios. "
        "8 virtual devices share the same cores."
    )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
