"""Host overhead of `ev3core.run(chunk=50)`: bringing a scanned chunk's infos to the host.

Compares, on the `StepInfo`s of a real 50-step `Engine.scan` of the smoke pipeline:

- one `jax.device_get` of the stacked infos (the floor);
- the run loop's way (`_host_steps`: one `device_get`, then NumPy slicing per step);
- the former way: slicing the stacked device arrays one step at a time on the device.

```bash
.venv/bin/python benchmarks/host_loop.py --json benchmarks/host_loop.json
```
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import jax

import ev3core
from ev3core._host.run import _host_steps
from ev3core._host.smoke import smoke_pipeline

CHUNK, REPEATS = 50, 15


def _median_ms(fn) -> float:
    times = []
    for _ in range(REPEATS):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(1e3 * (time.perf_counter() - t0))
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", help="write the figures to this file")
    args = parser.parse_args()
    data, _ = ev3core.toy_problem(jax.random.key(0), n=4096)
    engine = smoke_pipeline(plugins=ev3core.load_plugins(autoload=False)).build()
    state = engine.init(ev3core.toy_model(jax.random.key(1)), jax.random.key(2))
    _, stacked = engine.scan(state, data, CHUNK)
    jax.block_until_ready(stacked)

    def device_slices():  # the former loop: one device slice per step and leaf
        steps = [jax.tree.map(lambda x, i=i: x[i], stacked) for i in range(CHUNK)]
        return jax.device_get(steps)

    figures = {
        "chunk": CHUNK,
        "one_device_get_ms": _median_ms(lambda: jax.device_get(stacked)),
        "run_loop_ms": _median_ms(lambda: _host_steps(stacked, CHUNK)),
        "device_slicing_ms": _median_ms(device_slices),
        "platform": platform.platform(),
        "jax": jax.__version__,
    }
    figures["run_loop_over_device_get"] = figures["run_loop_ms"] / figures["one_device_get_ms"]
    figures["device_slicing_over_run_loop"] = figures["device_slicing_ms"] / figures["run_loop_ms"]
    for k, v in figures.items():
        print(f"{k}: {v:.3f}" if isinstance(v, float) else f"{k}: {v}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(figures, f, indent=2)


if __name__ == "__main__":
    main()
