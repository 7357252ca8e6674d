"""Per-step host overhead: what `Engine.step` costs on the host, from a 1-layer to a 50-layer MLP.

Workload: 2-D data, an MLP of width 8 with `depth` hidden layers (1 to 50, so 4 to 102
parameter arrays per model; the state holds several copies: current, stable, optimizer
states), K = 2 candidates (SGD and SGD with momentum), trajectories of 1 step of batch 8,
assess 16 and decide 32 examples: the device work is tiny, so the time is the host's.

For each depth, medians over `--iters` calls (each after the previous result is ready):

* `step_call_s`: how long `engine.step(state, data)` takes to return (the host work:
  flattening the arguments, finding the compiled program, dispatching; the computation runs
  asynchronously),
* `step_total_s`: the call plus waiting for its result,
* `floor_call_s`: the same compiled program called as a plain `jax.jit` on the flat list of
  array leaves, the least host work any entry point can do,
* `filter_jit_call_s`: the same step behind `eqx.filter_jit` (the entry point `Engine.step`
  had before), which partitions engine, state and data on every call,

and the ratios 50-layer / 1-layer (target: `step_call_s` within 20%). Run:

    python benchmarks/overhead.py --json benchmarks/overhead.json [--iters 200]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time

import equinox as eqx
import jax
import jax.numpy as jnp
import optax

import ev3core

DEPTHS = (1, 10, 50)


def build(depth: int):
    kx, ky, km = jax.random.split(jax.random.key(0), 3)
    x = jax.random.normal(kx, (4096, 2))
    y = (x[:, 0] > x[:, 1]).astype(jnp.int32)
    data = ev3core.Data((x, y), (x, y), (x, y))
    model = eqx.nn.MLP(2, 2, 8, depth, activation=jax.nn.relu, key=km)
    proposer = ev3core.GradientProposer(
        [ev3core.CrossEntropy(1.0)],
        [optax.sgd(0.1), optax.sgd(0.01, momentum=0.9)],
        steps=1,
        batch_size=8,
    )
    engine = ev3core.Engine(
        [proposer],
        [ev3core.Accuracy()],
        ev3core.EV3Scheduler(0.5, 4.0),
        assess_size=16,
        decide_size=32,
    )
    return engine, engine.init(model, jax.random.key(1)), data


def measure(depth: int, iters: int) -> dict:
    engine, state, data = build(depth)
    leaves = jax.tree.leaves((state, data))
    state, info = engine.step(state, data)  # compile
    jax.block_until_ready((state, info))
    calls, totals = [], []
    for _ in range(iters):
        t0 = time.perf_counter()
        out = engine.step(state, data)
        t1 = time.perf_counter()
        jax.block_until_ready(out)
        t2 = time.perf_counter()
        state = out[0]
        calls.append(t1 - t0)
        totals.append(t2 - t0)

    # The floor: the same step as a plain jit of the flat array leaves.
    params, static = eqx.partition((engine, state, data), eqx.is_array)
    flat, treedef = jax.tree.flatten(params)

    @jax.jit
    def flat_step(*xs):
        e, s, d = eqx.combine(jax.tree.unflatten(treedef, xs), static)
        return e.step_pure(s, d)

    # The entry point `Engine.step` had before: `eqx.filter_jit`, re-partitioning every call.
    filtered = eqx.filter_jit(lambda e, s, d: e.step_pure(s, d))
    jax.block_until_ready(filtered(engine, state, data))
    filter_calls = []
    for _ in range(iters):
        t0 = time.perf_counter()
        out = filtered(engine, state, data)
        filter_calls.append(time.perf_counter() - t0)
        jax.block_until_ready(out)

    jax.block_until_ready(flat_step(*flat))
    floors = []
    for _ in range(iters):
        t0 = time.perf_counter()
        out = flat_step(*flat)
        floors.append(time.perf_counter() - t0)
        jax.block_until_ready(out)
    return {
        "depth": depth,
        "state_and_data_leaves": len(leaves),
        "engine_leaves": len(jax.tree.leaves(eqx.filter(engine, eqx.is_array))),
        "step_call_s": statistics.median(calls),
        "step_total_s": statistics.median(totals),
        "floor_call_s": statistics.median(floors),
        "filter_jit_call_s": statistics.median(filter_calls),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json")
    ap.add_argument("--iters", type=int, default=200)
    ap.add_argument("--quick", action="store_true", help="depths 1 and 50, 50 calls each")
    args = ap.parse_args()
    depths = (1, 50) if args.quick else DEPTHS
    iters = 50 if args.quick else args.iters
    rows = []
    for depth in depths:
        r = measure(depth, iters)
        rows.append(r)
        print(
            f"depth {depth:3d} ({r['state_and_data_leaves']:4d} leaves): step call "
            f"{r['step_call_s'] * 1e3:7.3f} ms, call + wait {r['step_total_s'] * 1e3:7.3f} ms, "
            f"plain jit call {r['floor_call_s'] * 1e3:7.3f} ms, eqx.filter_jit call "
            f"{r['filter_jit_call_s'] * 1e3:7.3f} ms",
            flush=True,
        )
    first, last = rows[0], rows[-1]
    ratios = {
        key: last[key] / first[key]
        for key in ("step_call_s", "step_total_s", "floor_call_s", "filter_jit_call_s")
    }
    print(
        f"depth {last['depth']} / depth {first['depth']}: step call {ratios['step_call_s']:.2f}x "
        f"(target <= 1.2), call + wait {ratios['step_total_s']:.2f}x, plain jit call "
        f"{ratios['floor_call_s']:.2f}x, eqx.filter_jit call {ratios['filter_jit_call_s']:.2f}x"
    )
    result = {
        "rows": rows,
        "ratio_deepest_over_shallowest": ratios,
        "target_step_call_ratio": 1.2,
        "machine": {
            "platform": platform.platform(),
            "python": platform.python_version(),
            "jax": jax.__version__,
            "devices": str(jax.devices()),
            "load_average": os.getloadavg(),
        },
    }
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
