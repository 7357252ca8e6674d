"""The built-in experiments plugin: the smoke experiment and the run-file experiment
(`ev3 run FILE.py`), registered through
`ev3_register_experiments` like any plugin's experiment (the distillation plugin's included).

`ev3core._plugins.manager.load_plugins` imports it by name, as it does the built-in
components plugin (the host layer sits above the plugin manager).
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
from collections.abc import Sequence
from typing import Any

import jax

from .._assess.scores import Accuracy
from .._toy import NUM_EXAMPLES, toy_model, toy_problem
from ..errors import CheckpointError, ConfigurationError, RunInterrupted
from ..hookspecs import hookimpl
from .checkpoint import Checkpointer
from .ckpt_format import state_digest
from .ckpt_io import load_checkpoint
from .ckpt_manifest import list_checkpoints, newest_verified_manifest
from .observe import JsonlLogger, ProgressBar
from .run import run
from .runfile import build_engine, check_fits, load_run_file, resumed_file
from .smoke import smoke_pipeline
from .stream import DataStream

SMOKE_STEPS = 30
FILE_STEPS = 30
RUN_RECORD = "ev3-run.json"


def recorded_experiment(directory: str | os.PathLike[str]) -> str | None:
    """The experiment that owns a run directory (recorded by `ev3 run`), or `None`."""
    path = os.path.join(directory, RUN_RECORD)
    try:
        with open(path) as f:
            return str(json.load(f)["experiment"])
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(
            f"{path} is unreadable ({exc}); pass --experiment NAME to say which experiment "
            "made the run."
        ) from exc


def record_experiment(directory: str | os.PathLike[str], name: str) -> None:
    """Record in `directory` (created if needed) that experiment `name` owns it, so that
    `ev3 run --resume DIR` continues it; a directory of another experiment is refused."""
    owner = recorded_experiment(directory)
    if owner is not None and owner != name:
        raise ConfigurationError(
            f"--out {directory} holds a run of the {owner!r} experiment. Continue it with "
            f"`ev3 run --resume {directory}`, or pass another directory."
        )
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, RUN_RECORD), "w") as f:
        json.dump({"experiment": name}, f)


def _resume_record(
    directory: str, experiment: str, limits: Sequence[tuple[str, int | None]]
) -> dict[str, Any]:
    """The options recorded by an `experiment` run in `directory` (its `cli` metadata), from
    its newest checkpoint that passes every check (manifest and leaves checksums, field
    types): nothing of a manifest is used before it is verified, and the integer options
    named in `limits` (`(name, lowest value or None)`) are type-checked."""
    if not list_checkpoints(directory):
        raise CheckpointError(
            f"--resume {directory}: no checkpoint there. Pass the --out directory of an "
            "earlier `ev3 run`."
        )
    _, body, _ = newest_verified_manifest(directory)
    cli = body["metadata"].get("cli")
    if not isinstance(cli, dict) or cli.get("experiment") != experiment:
        what = cli.get("experiment") if isinstance(cli, dict) else None
        raise CheckpointError(
            f"--resume {directory}: the checkpoint is of the {what!r} experiment, not {experiment}."
        )
    for name, low in limits:
        value = cli.get(name)
        if name in cli and (
            not isinstance(value, int)
            or isinstance(value, bool)
            or (low is not None and value < low)
        ):
            raise CheckpointError(
                f"--resume {directory}: the checkpoint records {name}={value!r}, which is not "
                "a valid option value; the run directory was edited. Start a new run."
            )
    return cli


def _check_new_out(out: str | os.PathLike[str] | None) -> None:
    """A new run's `--out` must hold no checkpoints (those of another run)."""
    if out is not None and list_checkpoints(out):
        raise CheckpointError(
            f"--out {out} already holds checkpoints. Continue that run with "
            f"`ev3 run --resume {out}`, or pass an empty directory."
        )


def _checkpointed_run(
    engine: Any,
    state: Any,
    data: Any,
    options: dict[str, Any],
    *,
    out: str | os.PathLike[str] | None,
    resume: str | os.PathLike[str] | None,
    bar: ProgressBar,
    observers: Sequence[Any],
    checkpoint_every: int,
    keep: int,
    plugins: Any,
) -> tuple[Any, dict[str, Any] | None]:
    """`ev3core.run` up to `options["steps"]`, from the newest checkpoint of `resume` when
    given, checkpointing into `out` (when given) every `checkpoint_every` steps with the run's
    `options` (metadata `cli`) and the decision counts of `bar` (metadata `counts`).

    A `DataStream` is resumed at the recorded position and its position is checkpointed.

    **Returns:** `(final state, the manifest resumed from or None)`.
    """
    stream = data if isinstance(data, DataStream) else None
    manifest: dict[str, Any] | None = None
    if resume is not None:
        state, manifest = load_checkpoint(resume, like=state)
        bar.counts.update(manifest["metadata"].get("counts", {}))
        for skipped in manifest["skipped"]:
            print(f"ev3: skipped unusable checkpoint {skipped['file']}: {skipped['reason']}",
                  file=sys.stderr)  # fmt: skip
        if stream is not None:
            stream.restore(manifest)
        print(
            f"ev3: resuming from {manifest['leaves_file']} at step {int(state.step)} of "
            f"{options['steps']}",
            file=sys.stderr,
        )
    run_observers: list[Any] = [bar, *observers]
    if out is not None:
        run_observers.append(
            Checkpointer(
                out,
                every=checkpoint_every,
                keep=keep,
                metadata=lambda: {"cli": options, "counts": dict(bar.counts)},
                stream=stream,
            )
        )
    remaining = max(0, options["steps"] - int(state.step))
    state, _ = run(
        engine, state, data, remaining, plugins=plugins, observers=run_observers,
        chunk=options.get("chunk", 1),
    )  # fmt: skip
    return state, manifest


def smoke_experiment(
    *,
    steps: int | None = None,
    seed: int = 0,
    out: str | os.PathLike[str] | None = None,
    resume: str | os.PathLike[str] | None = None,
    chunk: int = 1,
    examples: int = NUM_EXAMPLES,
    print_every: int = 5,
    progress: bool = True,
    checkpoint_every: int = 10,
    keep: int = 3,
    observers: Sequence[Any] = (),
    plugins: Any = None,
    dataset: str | None = None,
    pipeline: str | None = None,
    scenario: str | None = None,
    data: str | None = None,
    teacher_logits: str | None = None,
) -> dict[str, Any]:
    """The built-in smoke experiment: the smoke pipeline on the toy problem, with `out`
    checkpoints and `resume` (the same final state as a run that never stopped).

    `observers` see this run's steps (see `ev3core.run`); `plugins` default to
    `ev3core.plugin_manager()`.

    **Returns:** the summary (test accuracies, decision counts, the final state's digest).
    """
    if any(x is not None for x in (dataset, pipeline, scenario, data, teacher_logits)):
        raise ConfigurationError(
            "the smoke experiment runs the toy problem with its own pipeline: it takes no "
            "--dataset, --scenario, --data, --teacher-logits or pipeline file (pass "
            "--experiment NAME for one that does)."
        )
    t0 = time.perf_counter()
    options: dict[str, Any] = {
        "experiment": "smoke",
        "seed": seed,
        "steps": SMOKE_STEPS if steps is None else steps,
        "chunk": chunk,
        "examples": examples,
    }
    if resume is not None:
        limits = (("seed", None), ("steps", 0), ("chunk", 1), ("examples", 1))
        resumed = _resume_record(str(resume), "smoke", limits)
        options.update({k: resumed[k] for k in ("seed", "chunk", "examples") if k in resumed})
        options["steps"] = resumed.get("steps", SMOKE_STEPS) if steps is None else steps
    else:
        _check_new_out(out)
    out = resume if resume is not None else out
    k_data, k_model, k_run = jax.random.split(jax.random.key(options["seed"]), 3)
    toy_data, (x_test, y_test) = toy_problem(k_data, n=options["examples"])
    engine = smoke_pipeline(plugins=plugins).build()
    state = engine.init(toy_model(k_model), k_run)
    # Counts decisions for the summary and checkpoints even when nothing is drawn.
    bar = ProgressBar(print_every, desc="ev3 smoke", disable=None if progress else True)
    state, manifest = _checkpointed_run(
        engine, state, toy_data, options, out=out, resume=resume, bar=bar, observers=observers,
        checkpoint_every=checkpoint_every, keep=keep, plugins=plugins,
    )  # fmt: skip
    summary = {
        "experiment": "smoke",
        "steps": int(state.step),
        "seed": options["seed"],
        "test_accuracy": float(Accuracy()(state.model, (x_test, y_test)).mean()),
        "stable_test_accuracy": float(Accuracy()(state.stable_model, (x_test, y_test)).mean()),
        **bar.counts,
        "state_sha256": state_digest(state),  # equal digests: bit-identical final states
        "resumed_from": None if manifest is None else int(manifest["step"]),
        "wall_seconds": time.perf_counter() - t0,
    }
    if out is not None:
        with open(os.path.join(out, "summary.json"), "w") as f:
            json.dump(summary, f, indent=2)
    return summary


def _default_out(stem: str) -> str:
    """A new directory under `runs/`: `runs/<file stem>-<UTC time>` (suffixed if taken)."""
    base = os.path.join("runs", f"{stem}-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}")
    path, i = base, 1
    while os.path.exists(path):
        path, i = f"{base}-{i}", i + 1
    return path


def _read_metrics(path: str) -> list[dict[str, Any]]:
    """The step records of a `metrics.jsonl` (a torn last line is skipped)."""
    records = []
    with contextlib.suppress(FileNotFoundError), open(path) as f:
        for line in f:
            with contextlib.suppress(ValueError):
                records.append(json.loads(line))
    return records


def _final_decide(records: list[dict[str, Any]]) -> dict[str, Any] | None:
    """Per objective, the decide-set means of the last step's outcome: `current` is the model
    the run ends with (the winner when the last step accepted it, the stable model after a
    roll back), `stable` the stable model's."""
    if not records:
        return None
    last = records[-1]
    chosen = last.get("choice", "current")
    return {
        name: {"current": means.get(chosen, means.get("current")), "stable": means.get("stable")}
        for name, means in last.get("decide_mean", {}).items()
    }


def _write_report(path: str, records: list[dict[str, Any]], title: str) -> str:
    """Plot the logged decide-set means per step (one panel per objective) to `path`.

    **Returns:** `"report.png"`-style file name, or why the plot was skipped (matplotlib is
    optional).
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "skipped: matplotlib is not installed (pip install matplotlib)"
    if not records:
        return "skipped: no steps were logged"
    names = list(records[0].get("decide_mean", {}))
    fig, axes = plt.subplots(len(names), 1, figsize=(7, 2.6 * len(names)), squeeze=False)
    steps = [r["step"] for r in records]
    for ax, name in zip(axes[:, 0], names, strict=True):
        for which, style in (("winner", ":"), ("current", "-"), ("stable", "--")):
            ys = [r["decide_mean"][name][which] for r in records]
            ax.plot(steps, [float("nan") if y is None else y for y in ys], style, label=which)
        accepted = [r["step"] for r in records if r.get("accepted")]
        ax.vlines(accepted, 0, 1, transform=ax.get_xaxis_transform(), colors="0.85", lw=0.8)
        ax.set_ylabel(f"decide {name}")
        ax.legend(loc="lower right", fontsize="small")
    axes[-1, 0].set_xlabel("EV3 step (grey: accepted)")
    axes[0, 0].set_title(title, fontsize="medium")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return os.path.basename(path)


def _load_file(
    pipeline: str | os.PathLike[str] | None,
    resume: str | os.PathLike[str] | None,
    out: str | os.PathLike[str] | None,
    seed: int,
    chunk: int,
    steps: int | None,
) -> tuple[Any, dict[str, Any], Any]:
    """`(run file, the run's options, the run's key)`: the file loaded and checked; on
    resume, with the seed, steps and chunk the run recorded, and the file it ran."""
    recorded: dict[str, Any] | None = None
    if resume is not None:
        recorded = _resume_record(str(resume), "file", (("seed", None), ("steps", 0), ("chunk", 1)))
        resumed_file(resume, recorded, pipeline)
        seed, chunk = recorded.get("seed", seed), recorded.get("chunk", chunk)
    else:
        _check_new_out(out)
    k_file, k_run = jax.random.split(jax.random.key(seed))
    user = load_run_file(pipeline, k_file)  # type: ignore[arg-type]  # named, or refused
    if recorded is not None and user.sha256 != recorded["file_sha256"]:  # changed meanwhile
        resumed_file(resume, recorded, pipeline)  # type: ignore[arg-type]
    if isinstance(user.data, DataStream) and chunk != 1:
        raise ConfigurationError(
            f"--chunk {chunk}: run file {str(user.path)!r} streams its `data` (a DataStream), "
            "one Data per step; drop --chunk (or give the arrays as one ev3core.Data)."
        )
    if steps is None:
        steps = recorded.get("steps") if recorded is not None else user.steps
    options: dict[str, Any] = {
        "experiment": "file",
        "file": str(user.path),
        "file_sha256": user.sha256,
        "seed": seed,
        "steps": FILE_STEPS if steps is None else int(steps),
        "chunk": chunk,
    }
    return user, options, k_run


def file_experiment(
    *,
    pipeline: str | os.PathLike[str] | None = None,
    steps: int | None = None,
    seed: int = 0,
    out: str | os.PathLike[str] | None = None,
    resume: str | os.PathLike[str] | None = None,
    chunk: int = 1,
    print_every: int = 5,
    progress: bool = True,
    checkpoint_every: int = 10,
    keep: int = 3,
    observers: Sequence[Any] = (),
    plugins: Any = None,
    dataset: str | None = None,
    scenario: str | None = None,
    examples: int | None = None,
    data: str | None = None,
    teacher_logits: str | None = None,
) -> dict[str, Any]:
    """The built-in run-file experiment (`ev3 run FILE.py`): the user's `model`, `data` and
    `pipeline` from a Python file (see `ev3core._host.runfile`), run with `ev3core.run`.

    Everything in the file is checked before anything is trained or written: its names and
    types, its factories, the pipeline's build and the engine's data checks. The run writes
    into `out` (default: a new directory under `runs/`): `metrics.jsonl` (one JSON line per
    step), checkpoints every `checkpoint_every` steps, and at the end `summary.json` and
    `report.png` (when matplotlib is installed). `resume` continues the run of that
    directory from its newest checkpoint, to the final state of a run that never stopped;
    the file must be named again (`pipeline`) and have the SHA-256 the run recorded.

    **Returns:** the summary (steps, decision counts, the final decide-set means, the final
    state's digest, the file's SHA-256, wall time).

    **Raises:** `ConfigurationError` naming the file's attribute and the fix;
    `ev3core.errors.RunInterrupted` after Ctrl-C (the checkpoint is written first; its `out`
    names the directory to resume).
    """
    if any(x is not None for x in (dataset, scenario, examples, data, teacher_logits)):
        raise ConfigurationError(
            "`ev3 run FILE.py` runs the model and data the file defines: it takes no "
            "--dataset, --scenario, --examples, --data or --teacher-logits."
        )
    if pipeline is None and resume is None:
        raise ConfigurationError(
            "the file experiment runs a Python file that defines `model`, `data` and "
            "`pipeline`: pass it, `ev3 run FILE.py`."
        )
    t0 = time.perf_counter()
    user, options, k_run = _load_file(pipeline, resume, out, seed, chunk, steps)
    seed = options["seed"]
    engine = build_engine(user, plugins)
    try:
        state = engine.init(user.model, k_run)
    except ConfigurationError as exc:
        raise ConfigurationError(f"run file {str(user.path)!r}: `model`: {exc}") from exc
    check_fits(user, engine, state, plugins)

    # Checked: from here on the run writes.
    if resume is not None:
        out = resume
    elif out is None:
        out = _default_out(user.path.stem)
        record_experiment(out, "file")
    os.makedirs(out, exist_ok=True)
    metrics = os.path.join(out, "metrics.jsonl")
    bar = ProgressBar(print_every, desc=f"ev3 {user.path.stem}", disable=None if progress else True)
    try:
        state, manifest = _checkpointed_run(
            engine, state, user.data, options, out=out, resume=resume, bar=bar,
            observers=[JsonlLogger(metrics, every=print_every), *observers],
            checkpoint_every=checkpoint_every, keep=keep, plugins=plugins,
        )  # fmt: skip
    except RunInterrupted as exc:
        exc.out = str(out)
        raise
    records = _read_metrics(metrics)
    report = _write_report(
        os.path.join(out, "report.png"), records, f"{user.path.name} (seed {seed})"
    )
    summary = {
        "experiment": "file",
        "file": str(user.path),
        "file_sha256": user.sha256,
        "out": str(out),
        "steps": int(state.step),
        "seed": seed,
        **bar.counts,
        "final_decide": _final_decide(records),
        "state_sha256": state_digest(state),  # equal digests: bit-identical final states
        "report": report,
        "resumed_from": None if manifest is None else int(manifest["step"]),
        "wall_seconds": time.perf_counter() - t0,
    }
    with open(os.path.join(out, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    return summary


@hookimpl
def ev3_register_experiments() -> dict[str, Any]:
    return {"smoke": smoke_experiment, "file": file_experiment}


@hookimpl(trylast=True)
def ev3_default_experiment() -> str:
    return "smoke"
