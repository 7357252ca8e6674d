"""The built-in experiments plugin: the smoke experiment, registered through
`ev3_register_experiments` like any plugin's experiment (the distillation plugin's included).

`ev3core._plugins.manager.load_plugins` imports it by name, as it does the built-in
components plugin (the host layer sits above the plugin manager).
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Sequence
from typing import Any

import jax

from .._assess.scores import Accuracy
from .._toy import NUM_EXAMPLES, toy_model, toy_problem
from ..errors import CheckpointError, ConfigurationError
from ..hookspecs import hookimpl
from .checkpoint import (
    Checkpointer,
    list_checkpoints,
    load_checkpoint,
    newest_verified_manifest,
    state_digest,
)
from .observe import ProgressBar
from .run import run
from .smoke import smoke_pipeline

SMOKE_STEPS = 30


def _resume_options(directory: str) -> dict[str, Any]:
    """The options of the smoke run being resumed, from its newest checkpoint that passes
    every check (manifest and leaves checksums, field types): nothing of a manifest is used
    before it is verified, and the recorded options are type-checked."""
    if not list_checkpoints(directory):
        raise CheckpointError(
            f"--resume {directory}: no checkpoint there. Pass the --out directory of an "
            "earlier `ev3 run`."
        )
    _, body, _ = newest_verified_manifest(directory)
    cli = body["metadata"].get("cli")
    if not isinstance(cli, dict) or cli.get("experiment") != "smoke":
        what = cli.get("experiment") if isinstance(cli, dict) else None
        raise CheckpointError(
            f"--resume {directory}: the checkpoint is of the {what!r} experiment, not smoke."
        )
    for name, low in (("seed", None), ("steps", 0), ("chunk", 1), ("examples", 1)):
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
) -> dict[str, Any]:
    """The built-in smoke experiment: the smoke pipeline on the toy problem, with `out`
    checkpoints and `resume` (the same final state as a run that never stopped).

    `observers` see this run's steps (see `ev3core.run`); `plugins` default to
    `ev3core.plugin_manager()`.

    **Returns:** the summary (test accuracies, decision counts, the final state's digest).
    """
    if dataset is not None or pipeline is not None or scenario is not None:
        raise ConfigurationError(
            "the smoke experiment runs the toy problem with its own pipeline: it takes no "
            "--dataset, --scenario or pipeline file (pass --experiment NAME for one that does)."
        )
    t0 = time.perf_counter()
    options: dict[str, Any] = {
        "experiment": "smoke",
        "seed": seed,
        "steps": SMOKE_STEPS if steps is None else steps,
        "chunk": chunk,
        "examples": examples,
    }
    resumed = None if resume is None else _resume_options(str(resume))
    manifest: dict[str, Any] | None = None
    if resumed is not None:
        options.update({k: resumed[k] for k in ("seed", "chunk", "examples") if k in resumed})
        options["steps"] = resumed.get("steps", SMOKE_STEPS) if steps is None else steps
    out = resume if resume is not None else out
    if out is not None and resume is None and list_checkpoints(out):
        raise CheckpointError(
            f"--out {out} already holds checkpoints. Continue that run with "
            f"`ev3 run --resume {out}`, or pass an empty directory."
        )
    k_data, k_model, k_run = jax.random.split(jax.random.key(options["seed"]), 3)
    data, (x_test, y_test) = toy_problem(k_data, n=options["examples"])
    engine = smoke_pipeline(plugins=plugins).build()
    state = engine.init(toy_model(k_model), k_run)
    # Counts decisions for the summary and checkpoints even when nothing is drawn.
    bar = ProgressBar(print_every, desc="ev3 smoke", disable=None if progress else True)
    if resume is not None:
        state, manifest = load_checkpoint(resume, like=state)
        bar.counts.update(manifest["metadata"].get("counts", {}))
        for skipped in manifest["skipped"]:
            print(f"ev3: skipped unusable checkpoint {skipped['file']}: {skipped['reason']}",
                  file=sys.stderr)  # fmt: skip
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
            )
        )
    remaining = max(0, options["steps"] - int(state.step))
    state, _ = run(
        engine, state, data, remaining, plugins=plugins, observers=run_observers,
        chunk=options["chunk"],
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


@hookimpl
def ev3_register_experiments() -> dict[str, Any]:
    return {"smoke": smoke_experiment}


@hookimpl(trylast=True)
def ev3_default_experiment() -> str:
    return "smoke"
