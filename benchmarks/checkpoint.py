"""Checkpoint benchmark: save time and blocking time of a ~100 MB engine state, one host.

The state is a real `Engine.init` state (MLP 1024-1600-1600-10, one `GradientProposer` with
4 candidates and SGD with momentum: current, stable and 4 momentum buffers, 101 MB of
float32), with every float leaf filled with random numbers (zeros would compress). Compared:

* `leaves`: the single-file format (`save_checkpoint(storage="leaves")`): serialise on the
  host, SHA-256, write, fsync, rename. The run is blocked for all of it.
* `orbax` (synchronous): `save_checkpoint(storage="orbax")`, which returns after the commit.
* `orbax async`: `Checkpointer(storage="orbax").save(state)` returns once the arrays are
  copied to host memory (**blocking time**, what a run loses per checkpoint); `wait()` then
  returns once the checkpoint is committed and its manifest written (**save time**).

And the load time of each. Median of `--repeats` saves (a fresh directory each). Run:

    python benchmarks/checkpoint.py --json benchmarks/checkpoint.json
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import statistics
import tempfile
import time
from pathlib import Path


def _state():
    import equinox as eqx
    import jax
    import jax.numpy as jnp
    import optax

    import ev3core

    proposer = ev3core.GradientProposer(
        [ev3core.CrossEntropy(t) for t in (0.5, 1.0, 1.5, 2.0)],
        [optax.sgd(0.01, momentum=0.9)],
        steps=1,
        batch_size=8,
    )
    engine = ev3core.Engine([proposer], [ev3core.Accuracy()], ev3core.EV3Scheduler(0.5, 1.0), 8, 8)
    model = eqx.nn.MLP(1024, 10, 1600, 2, key=jax.random.key(0))
    state = engine.init(model, jax.random.key(1))
    leaves, treedef = jax.tree.flatten(state)
    keys = jax.random.split(jax.random.key(2), len(leaves))
    filled = [
        jax.random.normal(k, x.shape, x.dtype)
        if isinstance(x, jax.Array) and jnp.issubdtype(x.dtype, jnp.floating) and x.size > 1000
        else x
        for k, x in zip(keys, leaves)
    ]
    state = jax.tree.unflatten(treedef, filled)
    jax.block_until_ready(state)
    nbytes = sum(x.nbytes for x in jax.tree.leaves(state) if hasattr(x, "nbytes"))
    return engine, model, state, nbytes


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", help="write the figures to this file")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--dir", help="where to write (default: a temporary directory)")
    args = ap.parse_args()

    import jax

    import ev3core

    engine, model, state, nbytes = _state()
    like = engine.init(model, jax.random.key(1))
    print(f"state: {nbytes / 2**20:.1f} MiB in {len(jax.tree.leaves(state))} leaves", flush=True)
    base = Path(args.dir or tempfile.mkdtemp(prefix="ev3-ckpt-bench-"))
    results: dict[str, dict[str, list[float]]] = {
        "leaves": {"blocking_s": [], "save_s": [], "load_s": [], "disk_bytes": []},
        "orbax": {"blocking_s": [], "save_s": [], "load_s": [], "disk_bytes": []},
        "orbax_async": {"blocking_s": [], "save_s": [], "load_s": [], "disk_bytes": []},
    }

    def disk(d: Path) -> int:
        return sum(p.stat().st_size for p in d.rglob("*") if p.is_file())

    for rep in range(args.repeats + 1):  # the first round warms up (imports, compiles)
        for kind, r in results.items():
            d = base / f"{kind}-{rep}"
            t0 = time.perf_counter()
            if kind == "orbax_async":
                ck = ev3core.Checkpointer(d, storage="orbax")
                ck.save(state)
                blocking = time.perf_counter() - t0
                ck.wait()
            else:
                ev3core.save_checkpoint(d, state, storage=kind)
                blocking = time.perf_counter() - t0
            total = time.perf_counter() - t0
            t1 = time.perf_counter()
            loaded, _ = ev3core.load_checkpoint(d, like=like)
            jax.block_until_ready(loaded)
            load = time.perf_counter() - t1
            if rep:
                r["blocking_s"].append(blocking)
                r["save_s"].append(total)
                r["load_s"].append(load)
                r["disk_bytes"].append(disk(d))
            shutil.rmtree(d)
    summary = {kind: {k: statistics.median(v) for k, v in r.items()} for kind, r in results.items()}
    for kind, s in summary.items():
        print(
            f"  {kind:12s} blocking {s['blocking_s']:7.3f} s   save {s['save_s']:7.3f} s   "
            f"load {s['load_s']:7.3f} s   on disk {s['disk_bytes'] / 2**20:7.1f} MiB",
            flush=True,
        )
    ratio_block = summary["orbax_async"]["blocking_s"] / summary["leaves"]["blocking_s"]
    ratio_save = summary["orbax_async"]["save_s"] / summary["leaves"]["save_s"]
    print(f"  blocking time, orbax async / leaves: {ratio_block:.3f}")
    print(f"  save time,     orbax async / leaves: {ratio_save:.3f}")
    out = {
        "state_bytes": nbytes,
        "repeats": args.repeats,
        "median": summary,
        "runs": results,
        "ratio_blocking_orbax_async_vs_leaves": ratio_block,
        "ratio_save_orbax_async_vs_leaves": ratio_save,
        "machine": {
            "python": platform.python_version(),
            "jax": jax.__version__,
            "backend": jax.default_backend(),
            "devices": jax.device_count(),
        },
    }
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))
    shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
