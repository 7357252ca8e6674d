"""Streamed data benchmark: EV3 steps per second with a grain source against the same data
held on the device, in the same run.

Workload: an MLP 64-128-128-10 on 8,192 synthetic examples (64 features, 10 classes), K = 4
candidates (cross-entropy at two temperatures x SGD with momentum at two learning rates),
trajectories of 5 steps of batch 64, assess on 256 and decide on 512 examples per step.

- `device`: `ev3core.run` on a `Data` of the whole arrays on the device (the engine samples
  every batch there);
- `grain`: `ev3core.run` on an `ev3core.DataStream` over a `grain.MapDataset` of one
  `Data` per step (320 propose, 256 assess and 512 decide examples, distinct within the
  step, drawn with a seeded `random_map`), read on the host by the stream's background
  thread and prefetched to the device (`prefetch=2`);
- `sync` (with `--sync`): the same stream with `background=False`, read on the run's thread
  while the device waits.

Each runs `--steps` steps after one warm-up run that compiles; `--repeats` alternating timed
runs each; the medians and their ratio (grain / device steps per second; target >= 0.8) are
printed and written to `--json`.

    python benchmarks/stream.py --json benchmarks/stream.json [--steps 200] [--repeats 3] [--sync]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time

import equinox as eqx
import grain
import jax
import numpy as np
import optax

import ev3core as ev3

N, FEATURES, CLASSES = 8192, 64, 10
PROPOSE, ASSESS, DECIDE = 320, 256, 512


def problem(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    w = rng.normal(size=(FEATURES, CLASSES)).astype(np.float32)
    x = rng.normal(size=(N, FEATURES)).astype(np.float32)
    y = np.argmax(x @ w + rng.normal(size=(N, CLASSES)), axis=1).astype(np.int32)
    return x, y


def build() -> ev3.Engine:
    proposer = ev3.GradientProposer(
        losses=[ev3.CrossEntropy(1.0), ev3.CrossEntropy(0.5)],
        optimizers=[
            ev3.Optimizer(optax.sgd, learning_rate=lr, momentum=0.9) for lr in (0.05, 0.01)
        ],
        steps=5,
        batch_size=64,
        on_reject="continue",
    )
    return ev3.Pipeline(
        proposers=[proposer], assessors=["accuracy"], assess_size=ASSESS, decide_size=DECIDE
    ).build()


def stream_of(x: np.ndarray, y: np.ndarray, seed: int, background: bool) -> ev3.DataStream:
    """One `Data` per step, as the engine samples on the device: each step's 1,088 examples
    are distinct (drawn without replacement from the whole set) and split into propose,
    assess and decide. A `random_map` over step indices draws them with one NumPy call per
    step, seeded per element (deterministic, and the iterator's position checkpoints). (A
    shuffled per-example `MapDataset` batched to 1,088 costs grain one Python call per
    *example*: 44 ms per step on the 2-core CPU machine.)"""
    per_step = PROPOSE + ASSESS + DECIDE

    def to_data(step: int, rng: np.random.Generator) -> ev3.Data:
        idx = rng.choice(len(x), per_step, replace=False)
        p, a, d = idx[:PROPOSE], idx[PROPOSE : PROPOSE + ASSESS], idx[PROPOSE + ASSESS :]
        return ev3.Data(propose=(x[p], y[p]), assess=(x[a], y[a]), decide=(x[d], y[d]))

    # No grain reading threads: the stream's own reader thread (or, with background=False,
    # the run's thread) reads; grain's default pool of 16 threads and 500 buffered elements
    # cost 0.7 ms per element in bookkeeping here.
    dataset = (
        grain.MapDataset.range(10**9)
        .random_map(to_data, seed=seed)
        .to_iter_dataset(grain.ReadOptions(num_threads=0, prefetch_buffer_size=0))
    )
    return ev3.DataStream(dataset, prefetch=2, background=background)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", help="write the figures to this file")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--sync", action="store_true", help="also time the stream with background=False"
    )
    args = parser.parse_args()

    x, y = problem()
    on_device = ev3.Data(propose=(x, y), assess=(x, y), decide=(x, y))
    on_device = jax.device_put(on_device)
    engine = build()
    model = eqx.nn.MLP(FEATURES, CLASSES, 128, 2, key=jax.random.key(1))
    start = engine.init(model, jax.random.key(2))

    def timed(kind: str, seed: int) -> float:
        if kind == "device":
            data: ev3.Data | ev3.DataStream = on_device
        else:
            data = stream_of(x, y, seed, background=kind == "grain")
        t = time.perf_counter()
        state, _ = ev3.run(engine, start, data, args.steps)
        jax.block_until_ready(state)
        rate = args.steps / (time.perf_counter() - t)
        if isinstance(data, ev3.DataStream):
            data.close()
        return rate

    kinds = ("device", "grain", "sync") if args.sync else ("device", "grain")
    for kind in kinds:  # compile (and warm the readers) outside the timing
        timed(kind, 99)
    rates: dict[str, list[float]] = {kind: [] for kind in kinds}
    for r in range(args.repeats):
        for kind in kinds:
            rates[kind].append(timed(kind, r))
            print(f"repeat {r}: {kind:6s} {rates[kind][-1]:7.1f} steps/s", flush=True)
    med = {k: statistics.median(v) for k, v in rates.items()}
    ratio = med["grain"] / med["device"]
    print(
        f"median steps/s: device {med['device']:.1f}, grain {med['grain']:.1f}; "
        f"grain / device = {ratio:.2f} (target >= 0.8)"
    )
    if args.sync:
        print(
            f"median steps/s: sync {med['sync']:.1f}; sync / device = "
            f"{med['sync'] / med['device']:.2f}, grain / sync = {med['grain'] / med['sync']:.2f}"
        )
    if args.json:
        figures = {
            "benchmark": "stream",
            "command": (
                f"python benchmarks/stream.py --steps {args.steps} --repeats {args.repeats}"
                + (" --sync" if args.sync else "")
            ),
            "steps": args.steps,
            "steps_per_second": rates,
            "median_steps_per_second": med,
            "ratio_grain_over_device": ratio,
            "target_met": ratio >= 0.8,
            "device": jax.devices()[0].device_kind,
            "load_average": os.getloadavg(),
            "versions": {"jax": jax.__version__, "python": platform.python_version()},
        }
        with open(args.json, "w") as f:
            json.dump(figures, f, indent=2)


if __name__ == "__main__":
    main()
