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
`Engine(mesh=ev3core.candidate_mesh())`. Run:

    python benchmarks/scale.py --json benchmarks/scale.json          # a few minutes on 2 cores
    python benchmarks/scale.py --quick --json /tmp/scale.json        # under a minute

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
    ap.add_argument("--no-sharded", action="store_true", help="skip the 8-device run")
    ap.add_argument("--_child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    ks_small = KS[:5] if args.quick else KS
    ks_mlp = KS[:4] if args.quick else KS
    iters = args.iters or (4 if args.quick else 8)

    global _LOG
    if args._child:  # the 8-device run, in its own process (XLA_FLAGS set by the parent)
        _LOG = sys.stderr
        json.dump(run_all(ks_small, ks_mlp, iters, sharded=True), sys.stdout)
        return

    import jax

    print(f"1 device ({jax.devices()[0].platform}):", flush=True)
    result = {"one_device": run_all(ks_small, ks_mlp, iters, sharded=False)}
    if not args.no_sharded:
        print("8 virtual devices, candidates sharded (subprocess):", flush=True)
        env = dict(
            os.environ,
            XLA_FLAGS=(
                os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
            ).strip(),
        )
        cmd = [sys.executable, __file__, "--_child", "--iters", str(iters)]
        if args.quick:
            cmd.append("--quick")
        proc = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, text=True, check=True)
        result["eight_devices_sharded"] = json.loads(proc.stdout)
    small = {r["K"]: r for r in result["one_device"]["small"]["rows"]}
    if 16 in small:
        print(
            f"ratio t(16) / (16 t(1)) on small: "
            f"{small[16]['ratio_vs_K_single_iterations']:.3f} (target < 0.5)"
        )
    result["machine"] = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "jax": jax.__version__,
        "cpu_count": os.cpu_count(),
        "load_average": os.getloadavg(),
    }
    result["note"] = (
        "Shared 2-core machine: absolute times are noisy; compare ratios. "
        "8 virtual devices share the same cores."
    )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
