"""Cold start: a new process to the first EV3 iteration of the smoke workload.

Each measurement is a fresh Python process that imports ev3core, builds the smoke pipeline
through the installed plugins, makes the smoke data and model, and runs one compiled
`Engine.step` (compile + one iteration). Three cases:

* `no_cache`: the persistent compilation cache off: everything is compiled.
* `cold_cache`: an empty cache directory: everything is compiled and written.
* `warm_cache`: the same directory again: the compiled programs are read from disk.

For each: the median wall time from the parent starting the process to the child holding
the first iteration's result, and the child's own split (import, build, first step). Then
the same for the whole command `ev3 run --smoke --steps 1` (process start to exit), without
and with a warm cache. Run:

    python benchmarks/coldstart.py --json benchmarks/coldstart.json [--repeats 3]

Target (issue 16): <= 3 s to the first iteration with a warm cache.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time


def child(cache: str | None) -> None:
    """Import, build, compile, one iteration; print the split as JSON on stdout."""
    t0 = time.perf_counter()
    import jax

    import ev3core
    from ev3core._host.smoke import smoke_pipeline

    t_import = time.perf_counter()
    if cache is None:
        ev3core.disable_compilation_cache()
    else:
        ev3core.enable_compilation_cache(cache)
    k_data, k_model, k_run = jax.random.split(jax.random.key(0), 3)
    data, _ = ev3core.toy_problem(k_data)
    engine = smoke_pipeline(plugins=ev3core.plugin_manager()).build()
    state = engine.init(ev3core.toy_model(k_model), k_run)
    jax.block_until_ready(state)
    t_build = time.perf_counter()
    state, info = engine.step(state, data)
    jax.block_until_ready((state, info))
    t_step = time.perf_counter()
    since_spawn = time.time() - float(os.environ["EV3_COLDSTART_T0"])
    print(
        json.dumps(
            {
                "import_s": t_import - t0,
                "build_s": t_build - t_import,
                "first_step_s": t_step - t_build,
                "spawn_to_first_iteration_s": since_spawn,
            }
        )
    )


def _spawn(cmd: list[str], env: dict[str, str]) -> tuple[float, str]:
    env = dict(env, EV3_COLDSTART_T0=repr(time.time()))
    t0 = time.perf_counter()
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True).stdout
    return time.perf_counter() - t0, out


def measure_case(cache: str | None, fresh: bool, repeats: int) -> dict:
    rows = []
    for _ in range(repeats):
        if fresh and cache is not None:
            shutil.rmtree(cache, ignore_errors=True)
        cmd = [sys.executable, __file__, "--_child"]
        cmd += ["--_cache", cache] if cache is not None else []
        _, out = _spawn(cmd, dict(os.environ))
        rows.append(json.loads(out.strip().splitlines()[-1]))
    return {key: statistics.median(r[key] for r in rows) for key in rows[0]} | {"runs": rows}


def measure_cli(cache: str | None, repeats: int) -> dict:
    ev3 = shutil.which("ev3", path=os.path.dirname(sys.executable)) or "ev3"
    cmd = [ev3, "run", "--smoke", "--steps", "1", "--no-progress"]
    cmd += ["--compile-cache", cache] if cache else ["--no-compile-cache"]
    if cache:
        _spawn(cmd, dict(os.environ))  # fill the cache
    times = [_spawn(cmd, dict(os.environ))[0] for _ in range(repeats)]
    return {"median_s": statistics.median(times), "runs_s": times}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--_child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--_cache", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args._child:
        child(args._cache)
        return

    with tempfile.TemporaryDirectory() as tmp:
        cache = os.path.join(tmp, "jax-cache")
        result = {
            "no_cache": measure_case(None, False, args.repeats),
            "cold_cache": measure_case(cache, True, args.repeats),
        }
        measure_case(cache, True, 1)  # fill
        result["warm_cache"] = measure_case(cache, False, args.repeats)
        result["cli_no_cache"] = measure_cli(None, args.repeats)
        result["cli_warm_cache"] = measure_cli(os.path.join(tmp, "cli-cache"), args.repeats)
    result["target_warm_s"] = 3.0
    result["machine"] = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "load_average": os.getloadavg(),
    }
    for case in ("no_cache", "cold_cache", "warm_cache"):
        r = result[case]
        print(
            f"{case:11s} first iteration {r['spawn_to_first_iteration_s']:6.2f} s after spawn "
            f"(import {r['import_s']:.2f}, build {r['build_s']:.2f}, "
            f"compile + step {r['first_step_s']:.2f})"
        )
    print(
        f"`ev3 run --smoke --steps 1`: {result['cli_no_cache']['median_s']:.2f} s without the "
        f"cache, {result['cli_warm_cache']['median_s']:.2f} s with a warm cache (start to exit)"
    )
    print(
        f"warm cache to first iteration {result['warm_cache']['spawn_to_first_iteration_s']:.2f} s "
        "(target <= 3 s)"
    )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
