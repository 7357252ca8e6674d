"""Memory benchmark: resident memory (RSS) over rebuilt engines and over a long run.

Three figures, each a ratio of RSS late to RSS early (flat: at most 1.05):

1. **Rebuilt engines.** 50 engines built from *new* optax objects with equal
   hyperparameters (as a script that rebuilds its pipeline per trial does), each initialised
   and run for 2 steps, then dropped; `jax.clear_caches()` and `gc.collect()` after each.
   RSS after engine 50 / RSS after engine 5 (the first few warm up allocators and caches).
   The same again with the optimizers given as `ev3core.Optimizer` specs (equal, hashable).
   `--malloc-trim` returns the C allocator's free memory to the system after each engine
   (glibc `malloc_trim(0)`), so RSS counts only memory in use.
2. **A long run.** One `ev3core.run` of 10,000 steps; RSS at step 10,000 / RSS at step 1,000,
   read by a lifecycle plugin.

Usage: `python benchmarks/memory.py --json benchmarks/memory.json [--engines 50] [--steps 10000]
[--malloc-trim]`
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import platform
import time

import jax
import optax

import ev3core
from ev3core._toy import toy_model, toy_problem


def rss_mb() -> float:
    """Resident set size of this process in MiB (Linux `/proc/self/statm`)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def malloc_trim() -> None:
    """Return the C allocator's free memory to the system (glibc only; else nothing)."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def build(plugins: ev3core.Plugins, spec: bool = False) -> ev3core.Engine:
    """A small pipeline from fresh optax objects (or `ev3core.Optimizer` specs) with the same
    hyperparameters every time."""
    optimizers = (
        [
            ev3core.Optimizer(optax.sgd, learning_rate=0.1),
            ev3core.Optimizer(optax.adam, learning_rate=1e-3),
        ]
        if spec
        else [optax.sgd(0.1), optax.adam(1e-3)]
    )
    return ev3core.Pipeline(
        proposers=[
            ev3core.GradientProposer(
                [ev3core.CrossEntropy(0.5), ev3core.CrossEntropy(1.0)],
                optimizers,
                steps=5,
                batch_size=32,
            )
        ],
        assessors=["accuracy"],
        scheduler=ev3core.EV3Scheduler(assess_alpha=0.5, decide_alpha=1.0),
        assess_size=128,
        decide_size=512,
        plugins=plugins,
    ).build()


class _RssAt:
    """Records RSS after the listed steps of a run (a lifecycle-hook plugin)."""

    def __init__(self, at: set[int]):
        self.at = at
        self.rss: dict[int, float] = {}

    @ev3core.hookimpl
    def ev3_after_step(self, step: int) -> None:
        if step + 1 in self.at:
            self.rss[step + 1] = rss_mb()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", help="write the figures to this file")
    parser.add_argument("--engines", type=int, default=50)
    parser.add_argument("--steps", type=int, default=10_000)
    parser.add_argument(
        "--malloc-trim", action="store_true", help="malloc_trim(0) after each rebuilt engine"
    )
    args = parser.parse_args()

    data, _ = toy_problem(jax.random.key(0), n=4096)
    model = toy_model(jax.random.key(1))
    plugins = ev3core.load_plugins(autoload=False)

    def rebuilt(spec: bool) -> list[float]:
        rss = []
        for i in range(args.engines):
            engine = build(plugins, spec)
            state = engine.init(model, jax.random.key(2))
            state, infos = ev3core.run(engine, state, data, 2, plugins=plugins)
            del engine, state, infos
            jax.clear_caches()
            gc.collect()
            if args.malloc_trim:
                malloc_trim()
            rss.append(rss_mb())
            if (i + 1) % 10 == 0:
                kind = "spec" if spec else "optax"
                print(f"{kind} engine {i + 1:3d}: RSS {rss[-1]:7.1f} MiB", flush=True)
        return rss

    warm = min(5, args.engines) - 1

    def per_engine(rss: list[float]) -> float:
        n = args.engines - warm - 1
        return (rss[-1] - rss[warm]) / n if n > 0 else 0.0

    t0 = time.perf_counter()
    engines_rss = rebuilt(spec=False)
    engines_ratio = engines_rss[-1] / engines_rss[warm]
    t_engines = time.perf_counter() - t0
    spec_rss = rebuilt(spec=True)
    spec_ratio = spec_rss[-1] / spec_rss[warm]

    t0 = time.perf_counter()
    engine = build(plugins)
    state = engine.init(model, jax.random.key(2))
    early = max(1, args.steps // 10)
    probe = _RssAt({early, args.steps})
    run_plugins = ev3core.load_plugins(extra=[probe], autoload=False)
    state, infos = ev3core.run(engine, state, data, args.steps, plugins=run_plugins)
    steps_ratio = probe.rss[args.steps] / probe.rss[early]
    t_steps = time.perf_counter() - t0

    figures = {
        "engines": args.engines,
        "engines_rss_mb": {"after_5": engines_rss[warm], "after_last": engines_rss[-1]},
        "engines_ratio": engines_ratio,
        "engines_mb_per_engine": per_engine(engines_rss),
        "engines_rss_mb_each": engines_rss,
        "spec_engines_rss_mb": {"after_5": spec_rss[warm], "after_last": spec_rss[-1]},
        "spec_engines_ratio": spec_ratio,
        "spec_engines_mb_per_engine": per_engine(spec_rss),
        "spec_engines_rss_mb_each": spec_rss,
        "malloc_trim": args.malloc_trim,
        "steps": args.steps,
        "steps_rss_mb": {
            f"at_{early}": probe.rss[early],
            f"at_{args.steps}": probe.rss[args.steps],
        },
        "steps_ratio": steps_ratio,
        "wall_seconds": {"engines": t_engines, "steps": t_steps},
        "versions": {"jax": jax.__version__, "python": platform.python_version()},
        "flat_within_5_percent": max(engines_ratio, spec_ratio, steps_ratio) <= 1.05,
    }
    print(
        f"{args.engines} rebuilt engines: RSS {engines_rss[warm]:.1f} -> {engines_rss[-1]:.1f} MiB "
        f"(ratio {engines_ratio:.3f}, {figures['engines_mb_per_engine']:.2f} MiB/engine)\n"
        f"{args.engines} rebuilt engines from Optimizer specs: RSS {spec_rss[warm]:.1f} -> "
        f"{spec_rss[-1]:.1f} MiB (ratio {spec_ratio:.3f}, "
        f"{figures['spec_engines_mb_per_engine']:.2f} MiB/engine)\n"
        f"{args.steps} steps: RSS {probe.rss[early]:.1f} MiB at step {early} -> "
        f"{probe.rss[args.steps]:.1f} MiB (ratio {steps_ratio:.3f})"
    )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(figures, f, indent=2)


if __name__ == "__main__":
    main()
