"""Host-side cost of the observability plugins per EV3 step.

A small engine (MLP 2-8-2, 2 candidates of 5 SGD steps) runs `--steps` steps with
`ev3core.run` (chunk 1), with no observer and with each observer writing to /dev/null or a
temporary file; the best of `--repeats` runs is reported, per step. The overhead is the time
over the no-observer run: the hook calls, the device-to-host reads (`every=1` waits for every
step) and the formatting.

    python benchmarks/observe.py --steps 200 --repeats 5 [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

import equinox as eqx
import jax
import jax.numpy as jnp
import optax

import ev3core


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--json")
    args = ap.parse_args()

    x = jax.random.normal(jax.random.key(0), (4096, 2))
    y = (x[:, 0] + x[:, 1] > 0).astype(jnp.int32)
    data = ev3core.Data(propose=(x, y), assess=(x, y), decide=(x, y))
    proposer = ev3core.GradientProposer(
        losses=[ev3core.CrossEntropy()],
        optimizers=[optax.sgd(0.1), optax.sgd(0.01)],
        steps=5,
        batch_size=32,
    )
    engine = ev3core.Pipeline(
        [proposer],
        ["accuracy"],
        assess_size=64,
        decide_size=512,
        plugins=ev3core.load_plugins(autoload=False),
    ).build()
    init = engine.init(eqx.nn.MLP(2, 2, 8, 1, key=jax.random.key(1)), jax.random.key(2))
    devnull = open(os.devnull, "w")  # noqa: SIM115
    tmp = tempfile.mkdtemp()

    configs = {
        "none": lambda: [],
        "progress lines every=1": lambda: [ev3core.ProgressBar(1, file=devnull, style="lines")],
        "progress bar every=1": lambda: [ev3core.ProgressBar(1, file=devnull, style="bar")],
        "progress bar every=10": lambda: [ev3core.ProgressBar(10, file=devnull, style="bar")],
        "jsonl every=1": lambda: [ev3core.JsonlLogger(os.path.join(tmp, "a.jsonl"))],
        "jsonl every=10": lambda: [ev3core.JsonlLogger(os.path.join(tmp, "b.jsonl"), every=10)],
    }
    state, _ = ev3core.run(engine, init, data, 2, plugins=ev3core.load_plugins(autoload=False))
    jax.block_until_ready(state)  # compiled
    best: dict[str, float] = {}
    for _ in range(args.repeats):
        for name, make in configs.items():  # interleaved, so load changes hit every config
            plugins = ev3core.load_plugins(extra=make(), autoload=False)
            t0 = time.perf_counter()
            out, _ = ev3core.run(engine, init, data, args.steps, plugins=plugins)
            jax.block_until_ready(out)
            per_step = (time.perf_counter() - t0) / args.steps
            best[name] = min(best.get(name, float("inf")), per_step)
    base = best["none"]
    result = {
        name: {"ms_per_step": 1e3 * t, "overhead_ms_per_step": 1e3 * (t - base)}
        for name, t in best.items()
    }
    for name, r in result.items():
        over = r["overhead_ms_per_step"]
        print(f"{name:24s} {r['ms_per_step']:8.3f} ms/step  overhead {over:+.3f} ms/step")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {
                    "steps": args.steps,
                    "repeats": args.repeats,
                    "backend": jax.default_backend(),
                    "results": result,
                },
                f,
                indent=2,
            )


if __name__ == "__main__":
    main()
