"""The `ev3` command."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Sequence
from typing import Any

from ..errors import CheckpointError, EV3Error


def _setup_compile_cache(args: argparse.Namespace) -> None:
    """JAX's persistent compilation cache, on by default (before anything compiles).

    `--no-compile-cache` or `EV3_COMPILE_CACHE=0` turn it off; `--compile-cache DIR` or
    `EV3_COMPILE_CACHE=DIR` choose the directory (the flag wins over the variable). Without
    either, a directory the user gave JAX itself (`JAX_COMPILATION_CACHE_DIR`) is kept, else
    the platform's per-user cache directory is used.
    """
    from .cache import cache_dir_from_env, disable_compilation_cache, enable_compilation_cache

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
        directory = os.environ["JAX_COMPILATION_CACHE_DIR"]
    try:
        enable_compilation_cache(directory)
    except OSError as exc:  # e.g. a read-only home: run without the cache
        print(f"ev3: compilation cache off ({directory}: {exc})", file=sys.stderr)
        disable_compilation_cache()


def _cmd_run(args: argparse.Namespace) -> int:
    _setup_compile_cache(args)
    name = _pick_experiment(args)
    if name is None:
        return _run_smoke(args)
    return _run_experiment(name, args)


def _pick_experiment(args: argparse.Namespace) -> str | None:
    """The registered experiment `ev3 run` runs, or `None` for the built-in smoke one.

    `--smoke` runs smoke; `--resume DIR` continues the experiment whose output DIR is (a
    distillation run keeps its checkpoints in `DIR/checkpoint/`, a smoke run in `DIR`);
    `--experiment NAME` runs that one; otherwise the `distill` experiment if a plugin
    registered it (the ev3-distill package), else smoke.
    """
    from .._plugins.manager import plugins as default_plugins
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
        if args.out or args.pipeline or args.dataset:
            raise ConfigurationError(
                f"--resume {args.resume} continues that run with its recorded options; drop "
                "--out, --dataset and the pipeline file."
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
        return 130
    print(json.dumps(summary, indent=2))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(summary, f, indent=2)
    return 0


def _smoke_resume_options(args: argparse.Namespace) -> dict[str, Any] | None:
    """The options of the run being resumed (from its newest usable checkpoint's metadata)."""
    from .checkpoint import list_checkpoints

    if not args.resume:
        return None
    manifests = list_checkpoints(args.resume)
    if not manifests:
        raise CheckpointError(
            f"--resume {args.resume}: no checkpoint there. Pass the --out directory of an "
            "earlier `ev3 run`."
        )
    for manifest in reversed(manifests):  # the newest readable one; load_checkpoint verifies
        try:
            cli = json.loads(manifest.read_text())["metadata"]["cli"]
        except (OSError, ValueError, KeyError, TypeError):
            continue
        if cli.get("experiment") != "smoke":
            raise CheckpointError(
                f"--resume {args.resume}: the checkpoint is of the {cli.get('experiment')!r} "
                "experiment; `ev3 run --resume` continues smoke runs only."
            )
        return cli
    raise CheckpointError(f"--resume {args.resume}: no readable checkpoint manifest there.")


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
        return 130
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
    if args.json:
        with open(args.json, "w") as f:
            json.dump(summary, f, indent=2)
    if out:
        with open(os.path.join(out, "summary.json"), "w") as f:
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
    report = plugins.describe()
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
        print(f"ev3: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
