"""Run every benchmark, each in its own process, and write one JSON with all their figures.

Runs, in order: `coldstart`, `smoke`, `scale`, `overhead`, and, when their scripts exist,
`memory`, `resnet`, `stream` (with its `background=False` comparison) and `value` (in a
short mode). Each benchmark is `benchmarks/NAME.py --json FILE` in a fresh Python process
(so compile caches and memory of one do not leak into the next); a benchmark that fails is
recorded with its exit status and the tail of its output, and the others still run. The
JSON also records the device (platform, kind, count), the JAX version and the load average
before and after each benchmark. Nothing here assumes a CPU: the same
command runs on a GPU, where JAX picks it up by default. Run:

    python benchmarks/run_all.py --json benchmarks/run_all.json          # ~15 min on 2 cores
    python benchmarks/run_all.py --quick --json /tmp/run_all.json        # short modes only
    python benchmarks/run_all.py --only smoke coldstart --json /tmp/a.json

Figures on a shared machine are noisy; compare the ratios each benchmark reports (measured
in one process, under one load).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent

#: name -> (options always passed, options added with --quick), each option a flag and its
#: value (`None` for a switch). `value` always runs in its short mode.
Options = list[tuple[str, str | None]]
BENCHMARKS: dict[str, tuple[Options, Options]] = {
    "coldstart": ([], [("--repeats", "2")]),
    "smoke": ([], [("--iters", "10"), ("--repeats", "2")]),
    "scale": ([], [("--quick", None)]),
    "overhead": ([], [("--quick", None)]),
    "memory": ([], [("--quick", None)]),
    "resnet": ([], [("--quick", None)]),
    "stream": ([("--sync", None)], [("--steps", "50"), ("--repeats", "2")]),
    "value": ([("--quick", None)], []),
}


@functools.cache
def _help(script: Path) -> str:
    try:
        return subprocess.run(
            [sys.executable, str(script), "--help"], capture_output=True, text=True, timeout=300
        ).stdout
    except (OSError, subprocess.TimeoutExpired):
        return ""


def _supports(script: Path, flag: str) -> bool:
    """Whether `script --help` lists `flag` (benchmarks differ in their options)."""
    return re.search(rf"{re.escape(flag)}\b", _help(script)) is not None


def _device() -> dict:
    import jax

    devs = jax.devices()
    return {
        "platform": devs[0].platform,
        "device_kind": devs[0].device_kind,
        "device_count": len(devs),
        "jax": jax.__version__,
        "jaxlib": getattr(__import__("jaxlib"), "__version__", None),
    }


def run_one(name: str, args: list[str], timeout: float) -> dict:
    script = HERE / f"{name}.py"
    with tempfile.TemporaryDirectory() as tmp:
        out_json = Path(tmp) / f"{name}.json"
        cmd = [sys.executable, str(script), *args, "--json", str(out_json)]
        load_before = os.getloadavg()
        t0 = time.perf_counter()
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
            rc, stdout, stderr = proc.returncode, proc.stdout, proc.stderr
        except subprocess.TimeoutExpired as exc:
            rc = "timeout"
            stdout = exc.stdout.decode() if isinstance(exc.stdout, bytes) else exc.stdout or ""
            stderr = exc.stderr.decode() if isinstance(exc.stderr, bytes) else exc.stderr or ""
        wall = time.perf_counter() - t0
        result = json.loads(out_json.read_text()) if out_json.exists() else None
    entry = {
        "command": " ".join(["python", f"benchmarks/{name}.py", *args]),
        "returncode": rc,
        "wall_s": wall,
        "load_average_before": load_before,
        "load_average_after": os.getloadavg(),
        "stdout": stdout,
        "result": result,
    }
    if rc != 0:
        entry["stderr_tail"] = stderr[-4000:]
    return entry


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", required=True, help="write all results to this file")
    ap.add_argument("--quick", action="store_true", help="each benchmark's short mode")
    ap.add_argument("--only", nargs="+", metavar="NAME", help="run only these benchmarks")
    ap.add_argument(
        "--timeout", type=float, default=1800, help="seconds allowed per benchmark (default 1800)"
    )
    args = ap.parse_args()
    names = list(BENCHMARKS)
    if args.only:
        unknown = sorted(set(args.only) - set(names))
        if unknown:
            ap.error(f"unknown benchmark(s) {unknown}; choose from {names}")
        names = [n for n in names if n in args.only]

    report: dict = {
        "machine": {
            **_device(),
            "python": platform.python_version(),
            "platform": platform.platform(),
            "cpu_count": os.cpu_count(),
            "load_average_start": os.getloadavg(),
        },
        "quick": args.quick,
        "benchmarks": {},
        "skipped": {},
    }
    m = report["machine"]
    print(
        f"{m['platform']}: {m['device_count']} x {m['device_kind']}, jax {m['jax']}, "
        f"load {m['load_average_start'][0]:.2f}",
        flush=True,
    )
    failed = []
    for name in names:
        script = HERE / f"{name}.py"
        if not script.exists():
            report["skipped"][name] = f"benchmarks/{name}.py does not exist"
            print(f"-- {name}: skipped (no benchmarks/{name}.py)", flush=True)
            continue
        always, quick = BENCHMARKS[name]
        options = always + (quick if args.quick else [])
        # Benchmarks differ in their options: pass only those the script lists.
        extra = [
            part
            for flag, value in options
            if _supports(script, flag)
            for part in ((flag,) if value is None else (flag, value))
        ]
        print(f"-- {name}: python benchmarks/{name}.py {' '.join(extra)}", flush=True)
        entry = run_one(name, extra, args.timeout)
        report["benchmarks"][name] = entry
        print(entry["stdout"].rstrip(), flush=True)
        status = "ok" if entry["returncode"] == 0 else f"FAILED ({entry['returncode']})"
        print(f"   {name}: {status} in {entry['wall_s']:.1f} s", flush=True)
        if entry["returncode"] != 0:
            failed.append(name)
            print(entry.get("stderr_tail", ""), file=sys.stderr)
    report["machine"]["load_average_end"] = os.getloadavg()
    report["failed"] = failed
    Path(args.json).write_text(json.dumps(report, indent=2))
    print(f"wrote {args.json}" + (f"; failed: {failed}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
