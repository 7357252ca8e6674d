"""Host overhead of `ev3core.run(chunk=50)`: bringing a scanned chunk's infos to the host.

Measures, on the `StepInfo`s of a real 50-step `Engine.scan` of the smoke pipeline (medians
of `--repeats` calls, all in one process so the ratios compare like with like):

- `one_device_get_ms`: one `jax.device_get` of the stacked infos (the floor);
- `run_loop_ms`: the run loop's host work per chunk when nothing takes per-step infos
  (`_host_chunk`: one `device_get` into the run's info log);
- `run_loop_per_step_ms`: the same, plus one `StepInfo` per step for `ev3_after_step`;
- `run_loop_hooks_ms`: the same, plus the 50 `ev3_after_step` calls to one observer that
  does nothing;
- `former_loop_ms`: the loop before, one `device_get`, then `jax.tree.unflatten` per step
  (and a second copy into the log).

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
from collections.abc import Callable
from typing import Any

import jax
import numpy as np

import ev3core
from ev3core._host.run import _host_chunk, _InfoLog, call_lifecycle
from ev3core._host.smoke import smoke_pipeline

CHUNK = 50


def _median_ms(fn: Callable[[], Any], repeats: int) -> float:
    fn()  # warm up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(1e3 * (time.perf_counter() - t0))
    return statistics.median(times)


class _NoOp:
    def ev3_after_step(self, info: Any, step: int) -> None:
        pass


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", help="write the figures to this file")
    parser.add_argument("--repeats", type=int, default=200, help="calls per figure (median)")
    args = parser.parse_args()
    plugins = ev3core.load_plugins(autoload=False)
    data, _ = ev3core.toy_problem(jax.random.key(0), n=4096)
    engine = smoke_pipeline(plugins=plugins).build()
    state = engine.init(ev3core.toy_model(jax.random.key(1)), jax.random.key(2))
    _, stacked = engine.scan(state, data, CHUNK)
    jax.block_until_ready(stacked)
    log = _InfoLog(CHUNK)  # each call rewrites the same rows (nothing is committed)
    observers = (_NoOp(),)

    def with_hooks() -> None:
        batch = _host_chunk(log, stacked, CHUNK, True)
        assert batch is not None
        for i, info in enumerate(batch):
            call_lifecycle(
                plugins, "ev3_after_step", observers, engine=engine, state=state, info=info,
                step=i,
            )  # fmt: skip

    def former() -> None:
        host = jax.device_get(stacked)
        leaves, treedef = jax.tree.flatten(host)
        [jax.tree.unflatten(treedef, [x[i] for x in leaves]) for i in range(CHUNK)]
        for arr, x in zip(log._arrays or [], jax.tree.leaves(jax.device_get(host)), strict=True):
            arr[:CHUNK] = x

    r = args.repeats
    figures: dict[str, Any] = {
        "chunk": CHUNK,
        "repeats": r,
        "one_device_get_ms": _median_ms(lambda: jax.device_get(stacked), r),
        "run_loop_ms": _median_ms(lambda: _host_chunk(log, stacked, CHUNK, False), r),
        "run_loop_per_step_ms": _median_ms(lambda: _host_chunk(log, stacked, CHUNK, True), r),
        "run_loop_hooks_ms": _median_ms(with_hooks, r),
        "former_loop_ms": _median_ms(former, r),
        "platform": platform.platform(),
        "jax": jax.__version__,
        "numpy": np.__version__,
    }
    floor = figures["one_device_get_ms"]
    for key in ("run_loop", "run_loop_per_step", "run_loop_hooks", "former_loop"):
        figures[f"{key}_over_device_get"] = figures[f"{key}_ms"] / floor
    for k, v in figures.items():
        print(f"{k}: {v:.3f}" if isinstance(v, float) else f"{k}: {v}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(figures, f, indent=2)


if __name__ == "__main__":
    main()
