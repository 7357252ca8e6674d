"""The `ev3` command."""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import traceback
from collections.abc import Sequence
from typing import Any

from ..errors import CheckpointError, EV3Error, PluginError


def _cmd_run(args: argparse.Namespace) -> int:
    _validate_run_args(args)
    name = _pick_experiment(args)
    if name is None:
        return _run_smoke(args)
    return _run_experiment(name, args)


def _probe_writable_file(path: str, option: str) -> None:
    """Fail now, not after the run, when `path` cannot be written (opened and closed in
    append mode; a file created by the probe is removed again)."""
    from ..errors import ConfigurationError

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
    from ..errors import ConfigurationError

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
    from ..errors import ConfigurationError

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


def _pick_experiment(args: argparse.Namespace) -> str | None:
    """The registered experiment `ev3 run` runs, or `None` for the built-in smoke one.

    `--smoke` runs smoke; `--resume DIR` continues the experiment whose output DIR is (a
    distillation run keeps its checkpoints in `DIR/checkpoint/`, a smoke run in `DIR`);
    `--experiment NAME` runs that one; otherwise the `distill` experiment if a plugin
    registered it (the ev3-distill package), else smoke.
    """
    from .._plugins.manager import _env_flag, plugins as default_plugins
    from ..errors import ConfigurationError

    if args.smoke:
        if args.experiment not in (None, "smoke") or args.pipeline:
            raise ConfigurationError(
                "--smoke runs the built-in smoke experiment, which takes no --experiment or "
                "pipeline file; drop --smoke to run them."
            )
        return None
    distill_output = bool(args.resume) and os.path.isdir(os.path.join(args.resume, "checkpoint"))
    if args.experiment == "smoke" or (
        args.resume and args.experiment is None and not distill_output
    ):
        return None
    plugins = default_plugins()
    if distill_output and args.experiment is None:
        if "distill" not in plugins.components("experiment"):
            raise ConfigurationError(
                f"--resume {args.resume}: that is the output of a distillation run, but the "
                "distillation plugin is not installed (pip install -e plugins/ev3-distill)."
            )
        return "distill"
    if args.experiment is not None:
        plugins.get("experiment", args.experiment)  # UnknownComponentError with close matches
        return args.experiment
    if "distill" in plugins.components("experiment"):
        return "distill"
    if _env_flag("EV3_DISABLE_PLUGIN_AUTOLOAD") and not args.resume:
        raise ConfigurationError(
            "`ev3 run` runs the experiment of an installed plugin (distillation), but plugin "
            "loading is disabled (EV3_DISABLE_PLUGIN_AUTOLOAD=1), so none is loaded. Pass "
            "--smoke for the built-in smoke experiment, or unset EV3_DISABLE_PLUGIN_AUTOLOAD."
        )
    if args.pipeline:
        raise ConfigurationError(
            f"`ev3 run {args.pipeline}`: no installed experiment runs pipeline files. Install "
            "the distillation plugin (pip install -e plugins/ev3-distill) or pass "
            "--experiment NAME."
        )
    return None


def _run_experiment(name: str, args: argparse.Namespace) -> int:
    """Run an experiment registered through `ev3_register_experiments`."""
    from .._plugins.manager import plugins as default_plugins
    from ..errors import ConfigurationError, RunInterrupted

    resume: dict[str, Any] = {}
    if args.resume:
        if name != "distill":
            raise ConfigurationError(
                f"--resume is supported by the smoke and distill experiments, not by {name!r}; "
                "start a new run with --out DIR."
            )
        if args.out or args.dataset:
            raise ConfigurationError(
                f"--resume {args.resume} continues that run with its recorded options; drop "
                "--out and --dataset (a pipeline file may be named: it must be the run's)."
            )
        resume = {"resume": args.resume}
    experiment = default_plugins().get("experiment", name)
    if getattr(args, "log_jsonl", None):
        # The experiment's EV3 steps go through `ev3core.run` with these plugins, so the
        # JSONL logger sees every step (the distill experiment takes `plugins=`).
        from .observe import JsonlLogger

        plugins = default_plugins()
        plugins.register(
            JsonlLogger(args.log_jsonl, every=getattr(args, "print_every", 1) or 1),
            name="ev3core.cli-jsonl",
        )
        resume["plugins"] = plugins
    try:
        summary = experiment(
            steps=args.steps,
            seed=args.seed,
            out=args.out,
            dataset=args.dataset,
            pipeline=args.pipeline,
            progress=not getattr(args, "no_progress", False),
            checkpoint_every=args.checkpoint_every,
            keep=args.keep,
            **resume,
        )
    except RunInterrupted as exc:
        if exc.state is None:
            print(
                f"ev3: interrupted before the EV3 run started ({exc}); nothing to resume.",
                file=sys.stderr,
            )
            return 130
        out = args.resume or args.out
        where = (
            f"; checkpoint in {out}. Continue with: ev3 run --resume {out}"
            if out
            else " (the checkpoint is in the run directory printed above; continue with "
            "ev3 run --resume DIR)"
        )
        print(f"ev3: interrupted at step {int(exc.state.step)}{where}", file=sys.stderr)
        return 128 + exc.signum
    print(json.dumps(summary, indent=2))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(summary, f, indent=2)
    return 0


def _smoke_resume_options(args: argparse.Namespace) -> dict[str, Any] | None:
    """The options of the run being resumed, from its newest checkpoint that passes every
    check (manifest and leaves checksums, field types) — nothing of a manifest is used
    before it is verified."""
    from .checkpoint import list_checkpoints, newest_verified_manifest

    if not args.resume:
        return None
    if not list_checkpoints(args.resume):
        raise CheckpointError(
            f"--resume {args.resume}: no checkpoint there. Pass the --out directory of an "
            "earlier `ev3 run`."
        )
    _, body, _ = newest_verified_manifest(args.resume)
    cli = body["metadata"].get("cli")
    if not isinstance(cli, dict) or cli.get("experiment") != "smoke":
        what = cli.get("experiment") if isinstance(cli, dict) else None
        raise CheckpointError(
            f"--resume {args.resume}: the checkpoint is of the {what!r} experiment; "
            "`ev3 run --smoke --resume` continues smoke runs only."
        )
    for name, low in (("seed", None), ("steps", 0), ("chunk", 1), ("examples", 1)):
        value = cli.get(name)
        if name in cli and (
            not isinstance(value, int)
            or isinstance(value, bool)
            or (low is not None and value < low)
        ):
            raise CheckpointError(
                f"--resume {args.resume}: the checkpoint records {name}={value!r}, which is "
                "not a valid option value; the run directory was edited. Start a new run."
            )
    return cli


def _run_smoke(args: argparse.Namespace) -> int:
    """The built-in smoke experiment, with `--out` checkpoints and `--resume`."""
    import jax

    from .._assess.scores import Accuracy
    from .._plugins.manager import plugins as default_plugins
    from ..errors import RunInterrupted
    from .checkpoint import Checkpointer, list_checkpoints, load_checkpoint, state_digest
    from .observe import JsonlLogger, ProgressBar
    from .run import run
    from .smoke import smoke_data, smoke_model, smoke_pipeline

    t0 = time.perf_counter()
    resumed = _smoke_resume_options(args)
    options = {
        "experiment": "smoke",
        "seed": args.seed,
        "steps": 30 if args.steps is None else args.steps,
        "chunk": args.chunk,
        "examples": args.examples,
    }
    if resumed is not None:
        options.update({k: resumed[k] for k in ("seed", "chunk", "examples") if k in resumed})
        options["steps"] = resumed.get("steps", 30) if args.steps is None else args.steps
    out = args.resume or args.out
    if args.out and not args.resume and list_checkpoints(args.out):
        raise CheckpointError(
            f"--out {args.out} already holds checkpoints. Continue that run with "
            f"`ev3 run --smoke --resume {args.out}`, or pass an empty directory."
        )
    key = jax.random.key(options["seed"])
    k_data, k_model, k_run = jax.random.split(key, 3)
    data, (x_test, y_test) = smoke_data(k_data, n=options["examples"])
    engine = smoke_pipeline().build()
    state = engine.init(smoke_model(k_model), k_run)
    # Counts decisions for the summary and checkpoints even when nothing is drawn.
    progress = ProgressBar(
        args.print_every, desc="ev3 smoke", disable=True if args.no_progress else None
    )
    if resumed is not None:
        state, manifest = load_checkpoint(args.resume, like=state)
        progress.counts.update(manifest["metadata"].get("counts", {}))
        for skipped in manifest["skipped"]:
            print(
                f"ev3: skipped unusable checkpoint {skipped['file']}: {skipped['reason']}",
                file=sys.stderr,
            )
        print(
            f"ev3: resuming from {manifest['leaves_file']} at step {int(state.step)} of "
            f"{options['steps']}",
            file=sys.stderr,
        )
    remaining = max(0, options["steps"] - int(state.step))
    plugins = default_plugins()
    names = [plugins.register(progress, name="ev3core.cli-progress")]
    if args.log_jsonl:
        names.append(
            plugins.register(
                JsonlLogger(args.log_jsonl, every=args.print_every), name="ev3core.cli-jsonl"
            )
        )
    if out:
        checkpointer = Checkpointer(
            out,
            every=args.checkpoint_every,
            keep=args.keep,
            metadata=lambda: {"cli": options, "counts": dict(progress.counts)},
        )
        names.append(plugins.register(checkpointer, name="ev3core.cli-checkpointer"))
    try:
        state, infos = run(engine, state, data, remaining, plugins=plugins, chunk=options["chunk"])
    except RunInterrupted as exc:
        where = (
            f"; checkpoint in {out}. Continue with: ev3 run --smoke --resume {out}"
            if out
            else " (no checkpoint: pass --out DIR to be able to resume)"
        )
        print(f"ev3: interrupted at step {int(exc.state.step)}{where}", file=sys.stderr)
        return 128 + exc.signum
    finally:
        for name in names:
            if name is not None:
                plugins.pm.unregister(name=name)
    test_acc = float(Accuracy()(state.model, (x_test, y_test)).mean())
    stable_acc = float(Accuracy()(state.stable_model, (x_test, y_test)).mean())
    summary = {
        "experiment": "smoke",
        "steps": int(state.step),
        "seed": options["seed"],
        "test_accuracy": test_acc,
        "stable_test_accuracy": stable_acc,
        **progress.counts,
        "state_sha256": state_digest(state),  # equal digests: bit-identical final states
        "resumed_from": None if resumed is None else int(manifest["step"]),
        "wall_seconds": time.perf_counter() - t0,
    }
    print(json.dumps(summary, indent=2))
    if out:  # first: the run's own record does not depend on the optional copy
        with open(os.path.join(out, "summary.json"), "w") as f:
            json.dump(summary, f, indent=2)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(summary, f, indent=2)
    return 0


def _cmd_plugins(args: argparse.Namespace) -> int:
    from .._plugins.manager import load_plugins, plugins as default_plugins

    if args.trace:
        # A fresh plugin set traced from its first registration; then build a pipeline (the
        # smoke one) so the stage hooks show as they run at build time.
        from .smoke import smoke_pipeline

        plugins = load_plugins(trace=True)
        plugins.describe()  # the registration hooks of every kind
        smoke_pipeline(plugins=plugins).build()
    else:
        plugins = default_plugins()
    try:
        report = plugins.describe()
    except EV3Error:
        if plugins.raise_errors:
            raise
        # describe() reports plugin failures itself; anything left is listed, not fatal.
        report = {"plugins": [], "failures": []}
        report["failures"].append(
            {
                "name": None,
                "distribution": None,
                "stage": "describe",
                "error": repr(sys.exc_info()[1]),
            }
        )
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


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ev3", description="EV3 meta-optimizer for JAX.")
    sub = parser.add_subparsers(dest="command", required=True)
    p_run = sub.add_parser(
        "run",
        help="run an EV3 experiment (default: distillation when ev3-distill is installed, "
        "else the smoke experiment)",
    )
    p_run.add_argument(
        "pipeline", nargs="?", default=None, help="a pipeline file (.py) for the experiment to run"
    )
    p_run.add_argument("--smoke", action="store_true", help="run the built-in smoke experiment")
    p_run.add_argument(
        "--experiment", default=None, help="name of a registered experiment (see `ev3 plugins`)"
    )
    p_run.add_argument(
        "--dataset", default=None, help="data set of the experiment (distill: digits or mnist1d)"
    )
    p_run.add_argument(
        "--steps",
        type=int,
        default=None,
        help="EV3 iterations (default: the experiment's; smoke 30, distill 60)",
    )
    p_run.add_argument("--seed", type=int, default=0)
    p_run.add_argument("--chunk", type=int, default=1, help="steps per compiled call")
    p_run.add_argument(
        "--print-every", type=int, default=5, help="steps between progress refreshes (default 5)"
    )
    p_run.add_argument(
        "--no-progress", action="store_true", help="show no progress (also: EV3_NO_PROGRESS=1)"
    )
    p_run.add_argument(
        "--log-jsonl",
        metavar="PATH",
        help="append one JSON line per step to PATH (smoke experiment)",
    )
    p_run.add_argument("--json", help="also write the summary to this file")
    p_run.add_argument("--out", help="write checkpoints (and summary.json) to this directory")
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
        default=100_000,
        help="examples per data split of the smoke experiment (default 100000)",
    )
    p_run.set_defaults(func=_cmd_run)
    p_pl = sub.add_parser("plugins", help="list loaded plugins and their components")
    p_pl.add_argument("--json", action="store_true", help="print JSON for machines")
    p_pl.add_argument(
        "--trace",
        action="store_true",
        help="trace plugin registrations and hook calls (stderr) while building "
        "the smoke pipeline (any command: EV3_TRACE_PLUGINS=1)",
    )
    p_pl.set_defaults(func=_cmd_plugins)
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except EV3Error as exc:
        from .._plugins.manager import _env_flag

        if _env_flag("EV3_RAISE_PLUGIN_ERRORS") and isinstance(exc, PluginError):
            # The plugin author needs the traceback (with its cause: the plugin's own code).
            traceback.print_exception(exc, file=sys.stderr)
        print(f"ev3: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
