"""The `ev3` command."""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .._plugins.manager import Plugins, _env_flag, load_plugins, plugin_manager
from ..errors import CheckpointError, ConfigurationError, EV3Error, PluginError, RunInterrupted
from .cache import cache_dir_from_env, disable_compilation_cache, enable_compilation_cache
from .experiments import (
    RUN_RECORD,
    record_experiment as _record_experiment,
    recorded_experiment as _recorded_experiment,
)
from .observe import JsonlLogger
from .run import make_observer
from .smoke import smoke_pipeline


def _setup_compile_cache(args: argparse.Namespace) -> None:
    """JAX's persistent compilation cache, on by default (before anything compiles).

    `--no-compile-cache` or `EV3_COMPILE_CACHE=0` turn it off; `--compile-cache DIR` or
    `EV3_COMPILE_CACHE=DIR` choose the directory (the flag wins over the variable). Without
    either, a directory the user gave JAX itself (`JAX_COMPILATION_CACHE_DIR`) is kept, else
    the platform's per-user cache directory is used.
    """
    if args.no_compile_cache:
        disable_compilation_cache()
        return
    if args.compile_cache:
        enable_compilation_cache(args.compile_cache)
        return
    directory = cache_dir_from_env()
    if directory is None:
        disable_compilation_cache()
        return
    if not os.environ.get("EV3_COMPILE_CACHE") and os.environ.get("JAX_COMPILATION_CACHE_DIR"):
        directory = Path(os.environ["JAX_COMPILATION_CACHE_DIR"])
    try:
        enable_compilation_cache(directory)
    except OSError as exc:  # e.g. a read-only home: run without the cache
        print(f"ev3: compilation cache off ({directory}: {exc})", file=sys.stderr)
        disable_compilation_cache()


def _probe_writable_file(path: str, option: str) -> None:
    """Fail now, not after the run, when `path` cannot be written (opened and closed in
    append mode; a file created by the probe is removed again)."""
    if os.path.isdir(path):
        raise ConfigurationError(f"{option} {path}: that is a directory; pass a file name.")
    existed = os.path.exists(path)
    try:
        with open(path, "a"):
            pass
    except OSError as exc:
        raise ConfigurationError(
            f"{option} {path} cannot be written ({exc.strerror or exc}). Pass a path in a "
            "directory that exists and that you can write to."
        ) from exc
    if not existed:
        os.unlink(path)


def _probe_writable_dir(path: str, option: str) -> None:
    if os.path.exists(path) and not os.path.isdir(path):
        raise ConfigurationError(
            f"{option} {path}: that is a file, not a directory; pass a directory (it is "
            "created if needed)."
        )
    try:
        os.makedirs(path, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as exc:
        raise ConfigurationError(
            f"{option} {path} cannot be written ({exc.strerror or exc}). Pass a directory "
            "that you can write to."
        ) from exc


def _validate_run_args(args: argparse.Namespace) -> None:
    """Every option of `ev3 run` checked before anything expensive (data, compilation,
    teacher training) starts."""
    minimum = {
        "--steps": (args.steps, 0),
        "--chunk": (args.chunk, 1),
        "--print-every": (args.print_every, 1),
        "--checkpoint-every": (args.checkpoint_every, 1),
        "--keep": (args.keep, 1),
        "--examples": (args.examples, 1),
    }
    for option, (value, low) in minimum.items():
        if value is not None and value < low:
            raise ConfigurationError(f"{option} {value}: must be at least {low}.")
    if args.resume is not None and not os.path.isdir(args.resume):
        raise ConfigurationError(
            f"--resume {args.resume}: no such directory. Pass the --out directory of an "
            "earlier `ev3 run`."
        )
    if args.out is not None:
        _probe_writable_dir(args.out, "--out")
    if args.resume is not None:
        _probe_writable_dir(args.resume, "--resume")
    if args.json is not None:
        _probe_writable_file(args.json, "--json")
    if args.log_jsonl is not None:
        _probe_writable_file(args.log_jsonl, "--log-jsonl")


def _pick_experiment(args: argparse.Namespace, plugins: Plugins) -> str:
    """The registered experiment `ev3 run` runs.

    `--smoke` is `--experiment smoke`; `--resume DIR` continues the experiment recorded in
    DIR; otherwise `--experiment NAME`; a run file alone (`ev3 run FILE.py`) runs the
    built-in file experiment (the file's model, data and pipeline); otherwise the default
    experiment (`ev3_default_experiment`: a plugin's main job when one is installed, else the
    built-in smoke experiment).
    """
    if args.smoke:
        if args.experiment not in (None, "smoke") or args.pipeline:
            raise ConfigurationError(
                "--smoke runs the built-in smoke experiment, which takes no --experiment or "
                "pipeline file; drop --smoke to run them."
            )
        name = "smoke"
    elif args.experiment is not None:
        name = args.experiment
    elif args.resume:
        name = _recorded_experiment(args.resume)  # type: ignore[assignment]
        if name is None:
            raise CheckpointError(
                f"--resume {args.resume}: the directory records no experiment ({RUN_RECORD}); "
                "pass the --out directory of an earlier `ev3 run`, or say which experiment "
                "made it with --experiment NAME."
            )
    elif args.pipeline is not None:
        name = "file"
    else:
        name = plugins.pm.hook.ev3_default_experiment()
        if name == "smoke" and _env_flag("EV3_DISABLE_PLUGIN_AUTOLOAD"):
            # The default experiment comes from an installed plugin, but none was loaded:
            # running smoke instead would be a silent switch to another job.
            raise ConfigurationError(
                "`ev3 run` runs the main experiment of an installed plugin (for instance "
                "distillation), but plugin loading is disabled (EV3_DISABLE_PLUGIN_AUTOLOAD=1), "
                "so none is loaded. Pass --smoke for the built-in smoke experiment, or "
                "--experiment NAME, or unset EV3_DISABLE_PLUGIN_AUTOLOAD."
            )
    plugins.get("experiment", name)  # UnknownComponentError with close matches
    return name


def _parse_observer(spec: str) -> tuple[str, dict[str, Any]]:
    """`NAME` or `NAME:KEY=VALUE,...` (values read as JSON when they parse, else as text)."""
    name, _, rest = spec.partition(":")
    options: dict[str, Any] = {}
    for item in filter(None, (part.strip() for part in rest.split(","))):
        key, eq, value = item.partition("=")
        if not eq or not key.strip().isidentifier():
            raise ConfigurationError(
                f"--observer {spec}: {item!r} is not KEY=VALUE. Write --observer NAME or "
                "--observer NAME:KEY=VALUE,KEY=VALUE (e.g. jsonl:path=steps.jsonl,every=5)."
            )
        try:
            options[key.strip()] = json.loads(value)
        except ValueError:
            options[key.strip()] = value
    if not name.strip():
        raise ConfigurationError(
            f"--observer {spec!r}: no observer name. `ev3 plugins` lists the registered ones."
        )
    return name.strip(), options


def _observers(args: argparse.Namespace, plugins: Plugins) -> list[Any]:
    """The run's observers: `--log-jsonl`, then every `--observer`, built now (an unknown
    name or bad option fails before the experiment starts)."""
    observers: list[Any] = []
    if args.log_jsonl:
        observers.append(JsonlLogger(args.log_jsonl, every=args.print_every or 5))
    for spec in args.observer or ():
        name, opts = _parse_observer(spec)
        observers.append(make_observer(plugins, name, opts))
    return observers


def _options(args: argparse.Namespace, plugins: Plugins) -> dict[str, Any]:
    """The experiment's keyword arguments: the common ones, and the others when given."""
    options: dict[str, Any] = {
        "steps": args.steps,
        "seed": args.seed,
        "out": args.out,
        "dataset": args.dataset,
        "pipeline": args.pipeline,
        "progress": not args.no_progress,
        "checkpoint_every": args.checkpoint_every,
        "keep": args.keep,
    }
    for name in ("chunk", "examples", "print_every", "scenario", "data", "teacher_logits"):
        if getattr(args, name) is not None:
            options[name] = getattr(args, name)
    if args.resume:
        if args.out or args.dataset:
            raise ConfigurationError(
                f"--resume {args.resume} continues that run with its recorded options; drop "
                "--out and --dataset (a pipeline file may be named: it must be the run's)."
            )
        options["resume"] = args.resume
    observers = _observers(args, plugins)
    if observers:
        options["observers"] = observers
    return options


def _cmd_run(args: argparse.Namespace) -> int:
    """Run a registered experiment (`ev3_register_experiments`) and print its summary."""
    _validate_run_args(args)
    _setup_compile_cache(args)
    plugins = plugin_manager()
    name = _pick_experiment(args, plugins)
    options = _options(args, plugins)
    if args.out:
        _record_experiment(args.out, name)
    try:
        summary = plugins.get("experiment", name)(**options)
    except RunInterrupted as exc:
        if exc.state is None:
            print(
                f"ev3: interrupted before the EV3 run started ({exc}); nothing to resume.",
                file=sys.stderr,
            )
            return 130
        out = getattr(exc, "out", None) or args.resume or args.out
        named = f"{args.pipeline} " if args.pipeline else ""  # a file is named again
        where = (
            f"; checkpoint in {out}. Continue with: ev3 run {named}--resume {out}"
            if out
            else " (pass --out DIR to be able to resume with ev3 run --resume DIR)"
        )
        step = int(getattr(exc.state, "step", -1))
        print(f"ev3: interrupted at step {step}{where}", file=sys.stderr)
        return 128 + exc.signum  # 130 after Ctrl-C, 143 after SIGTERM
    print(json.dumps(summary, indent=2))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(summary, f, indent=2)
    return 0


def _cmd_plugins(args: argparse.Namespace) -> int:
    if args.trace:
        # A fresh plugin set traced from its first registration; then build a pipeline (the
        # smoke one) so the stage hooks show as they run at build time.
        plugins = load_plugins(trace=True)
        plugins.describe()  # the registration hooks of every kind
        smoke_pipeline(plugins=plugins).build()
    else:
        plugins = plugin_manager()
    try:
        report = plugins.describe()
    except EV3Error as exc:
        if plugins.raise_errors:
            raise
        # describe() reports plugin failures itself; anything left is listed, not fatal.
        failure = {"name": None, "distribution": None, "stage": "describe", "error": repr(exc)}
        report = {"plugins": [], "failures": [failure]}
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    for e in report["plugins"]:
        dist = f"{e['distribution']} {e['version']}" if e["distribution"] else "(no distribution)"
        print(f"{e['name']}  [{dist}]")
        print(f"  hooks: {', '.join(e['hooks']) or '(none)'}")
        by_kind: dict[str, list[str]] = {}
        for c in e["components"]:
            by_kind.setdefault(c["kind"], []).append(c["name"])
        for kind, names in by_kind.items():
            print(f"  {kind}: {', '.join(names)}")
    for f in report["failures"]:
        dist = f" (from {f['distribution']})" if f["distribution"] else ""
        print(f"FAILED {f['name']}{dist} during {f['stage']}: {f['error']}")
    return 0


def _add_run_command(sub: Any) -> None:
    """`ev3 run`: what to run (a file, an experiment), then `_add_run_outputs`."""
    p_run = sub.add_parser(
        "run",
        help="run a Python file that defines model, data and pipeline (`ev3 run FILE.py`), or "
        "a registered EV3 experiment (default: the main experiment of an installed plugin, else "
        "the built-in smoke experiment)",
    )
    p_run.add_argument(
        "pipeline",
        nargs="?",
        default=None,
        metavar="FILE.py",
        help="a Python file defining `model`, `data` and `pipeline` (and optionally `steps`), "
        "run with checkpoints, metrics.jsonl, summary.json and report.png; with --experiment "
        "NAME, a pipeline file for that experiment",
    )
    p_run.add_argument("--smoke", action="store_true", help="run the built-in smoke experiment")
    p_run.add_argument(
        "--experiment", default=None, help="name of a registered experiment (see `ev3 plugins`)"
    )
    p_run.add_argument(
        "--scenario", default=None, help="scenario of the experiment (if it has several)"
    )
    p_run.add_argument(
        "--dataset", default=None, help="data set of the experiment (if it takes one)"
    )
    p_run.add_argument(
        "--data",
        metavar="DIR",
        default=None,
        help="data directory of the experiment (if it reads one, e.g. cifar)",
    )
    p_run.add_argument(
        "--teacher-logits",
        metavar="FILE",
        default=None,
        help="precomputed teacher logits of a distillation experiment (if it takes them)",
    )
    p_run.add_argument(
        "--steps",
        type=int,
        default=None,
        help="EV3 iterations (default: the experiment's; smoke 30; FILE.py: its `steps`, else 30)",
    )
    p_run.add_argument("--seed", type=int, default=0)
    p_run.add_argument(
        "--chunk", type=int, default=None, help="steps per compiled call (smoke; default 1)"
    )
    _add_run_outputs(p_run)
    p_run.set_defaults(func=_cmd_run)


def _add_run_outputs(p_run: Any) -> None:
    """`ev3 run`'s options for progress, outputs, checkpoints and compiled programs."""
    p_run.add_argument(
        "--print-every",
        type=int,
        default=None,
        help="steps between progress refreshes and JSONL lines (default 5)",
    )
    p_run.add_argument(
        "--no-progress", action="store_true", help="show no progress (also: EV3_NO_PROGRESS=1)"
    )
    p_run.add_argument(
        "--log-jsonl",
        metavar="PATH",
        help="append one JSON line per step to PATH",
    )
    p_run.add_argument(
        "--observer",
        action="append",
        metavar="NAME[:KEY=VALUE,...]",
        help="enable an observer a plugin registered (repeatable; `ev3 plugins` lists them), "
        "with options, e.g. --observer jsonl:path=steps.jsonl,every=5",
    )
    p_run.add_argument("--json", help="also write the summary to this file")
    p_run.add_argument(
        "--out",
        help="write checkpoints (and summary.json) to this directory (FILE.py runs: default "
        "runs/<file name>-<time>)",
    )
    p_run.add_argument(
        "--resume",
        metavar="DIR",
        help="continue the run checkpointed in DIR (same options, same results)",
    )
    p_run.add_argument(
        "--checkpoint-every",
        type=int,
        default=10,
        help="steps between checkpoints with --out/--resume (default 10)",
    )
    p_run.add_argument("--keep", type=int, default=3, help="checkpoints kept (default 3)")
    p_run.add_argument(
        "--examples",
        type=int,
        default=None,
        help="examples per data split of the smoke experiment (default 100000)",
    )
    p_run.add_argument(
        "--compile-cache",
        metavar="DIR",
        help="keep compiled programs in DIR (default: EV3_COMPILE_CACHE, else the per-user "
        "cache directory, e.g. ~/.cache/ev3core/jax)",
    )
    p_run.add_argument(
        "--no-compile-cache",
        action="store_true",
        help="do not read or write the persistent compilation cache (also: EV3_COMPILE_CACHE=0)",
    )


def _add_plugins_command(sub: Any) -> None:
    p_pl = sub.add_parser("plugins", help="list loaded plugins and their components")
    p_pl.add_argument("--json", action="store_true", help="print JSON for machines")
    p_pl.add_argument(
        "--trace",
        action="store_true",
        help="trace plugin registrations and hook calls (stderr) while building "
        "the smoke pipeline (any command: EV3_TRACE_PLUGINS=1)",
    )
    p_pl.set_defaults(func=_cmd_plugins)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ev3", description="EV3 meta-optimizer for JAX.")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_run_command(sub)
    _add_plugins_command(sub)
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except EV3Error as exc:
        if _env_flag("EV3_RAISE_PLUGIN_ERRORS") and isinstance(exc, PluginError):
            # The plugin author needs the traceback (with its cause: the plugin's own code).
            traceback.print_exception(exc, file=sys.stderr)
        print(f"ev3: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
