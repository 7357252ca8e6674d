"""The distillation experiment behind `ev3 run`.

1. Train a teacher on the train split (digits: an MLP 64-256-256-10; MNIST-1D: a 1-D CNN).
2. Distil into a student that starts tiny and grows, with EV3: candidates are short optax
   trajectories over a grid of distillation losses (temperatures x mixing weights, one
   family per teacher) plus the label loss, times optimizers; held-out log-likelihood on the
   assess split picks the winner, on the decide split it accepts or rejects it (under an
   accuracy constraint); after `patience`
   non-significant decisions the student grows (function-preserving by default). With
   `passes > 1`, each later pass adds the best archived students as extra teachers.
3. At the same number of gradient steps, a plain distillation baseline: one loss, one
   optimizer, the student fixed at the size cap.

Outputs in the run directory: `metrics.jsonl`, `summary.json`, `report.png`, `checkpoint/`
(the final EV3 engine state, `ev3core.save_checkpoint`) and `student.eqx` (the final student's
leaves; its architecture is in `summary.json`).

The `cifar` experiment is the same job on an image data directory (`_cifar.py`): the teacher
is its precomputed logits, the student a growing ResNet-8, the propose batches are cropped
and flipped, and there is no baseline (`CIFAR_DEFAULTS`).
"""

from __future__ import annotations

import dataclasses
import datetime
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax

from ev3core.errors import CheckpointError, ConfigurationError, RunInterrupted

from ._baseline import teacher_and_baseline
from ._cifar import load_cifar, teacher_from_logits
from ._config import DistillConfig, load_pipeline_file
from ._data import Splits, load_dataset
from ._loop import build_engine, run_ev3
from ._report import _Bar, write_outputs
from ._resume import ResumePoint, _resume_pipeline, _resume_record, load_resume_point


def distill_experiment(
    *,
    steps: int | None = None,
    seed: int = 0,
    out: str | os.PathLike[str] | None = None,
    dataset: str | None = None,
    pipeline: str | os.PathLike[str] | None = None,
    progress: bool = True,
    resume: str | os.PathLike[str] | None = None,
    checkpoint_every: int = 10,
    keep: int = 3,
    plugins: Any = None,
    observers: Sequence[Any] = (),
    **options: Any,
) -> dict[str, Any]:
    """Run the distillation job and write its outputs; returns the summary.

    **Arguments:**

    - `steps`: EV3 iterations (default 30; each is `trajectory` = 100 gradient steps).
    - `seed`: seeds the splits, the teacher, the students and EV3.
    - `out`: output directory (default `runs/<UTC timestamp>/`).
    - `dataset`: `"digits"` (default) or `"mnist1d"`.
    - `pipeline`: path of a user's pipeline file (see `load_pipeline_file`).
    - `progress`: show a progress bar on stderr.
    - `resume`: the output directory of an interrupted run: continue it from its newest
      checkpoint (its recorded options are used; the final outputs are those of a run that
      never stopped, up to wall times).
    - `checkpoint_every`, `keep`: checkpoint period (EV3 steps) and checkpoints kept.
    - `plugins`: the `ev3core.Plugins` whose lifecycle hooks see the EV3 steps (default
      `ev3core.plugin_manager()`).
    - `observers`: objects whose lifecycle methods see the EV3 steps of this run only (see
      `ev3core.run`), such as the CLI's `--log-jsonl` logger.
    - `options`: any other `DistillConfig` field (unknown names are an error).

    **Raises:** `ev3core.errors.RunInterrupted` after Ctrl-C (the checkpoint is written first).
    """
    return _job(
        {},
        steps=steps,
        seed=seed,
        out=out,
        dataset=dataset,
        pipeline=pipeline,
        progress=progress,
        resume=resume,
        checkpoint_every=checkpoint_every,
        keep=keep,
        plugins=plugins,
        observers=observers,
        options=options,
    )


#: The `cifar` experiment's options where they differ from `DistillConfig`'s: a ResNet-8
#: student (16, 32, 64 filters) widened once to (32, 64, 128), then deepened to ResNet-14;
#: 100 EV3 iterations of 100 Adam steps on batches of 128 (about 28 epochs of 45,000 images
#: along the student's lineage); 5,000 train images held out (2,000 assess, 3,000 decide).
CIFAR_DEFAULTS: dict[str, Any] = {
    "student": "resnet",
    "start_width": 16,
    "max_width": 128,
    "max_depth": 14,
    "grow_factor": 2.0,
    "patience": 3,
    "steps": 100,
    "trajectory": 100,
    "batch_size": 128,
    "learning_rates": (1e-3, 3e-3),
    "holdout": 0.1,
    "augment": True,
    "baseline": False,
}


def cifar_experiment(
    *,
    data: str | os.PathLike[str] | None = None,
    teacher_logits: str | os.PathLike[str] | None = None,
    dataset: str | None = None,
    resume: str | os.PathLike[str] | None = None,
    **kwargs: Any,
) -> dict[str, Any]:
    """The paper's experiment: EV3 distillation into a growing ResNet-8 on CIFAR-10/100.

    The same job and outputs as `distill_experiment` (whose other arguments it takes), on
    the image data directory `data` (`write_array_record`, read through grain), with the
    teacher's precomputed logits (`write_teacher_logits`) and `CIFAR_DEFAULTS`. Assess and
    decide use a held-out part of the train split; the test split is only reported. Every
    file is checked before anything is compiled or trained.

    **Arguments:**

    - `data`: the data directory (`ev3 run --experiment cifar --data DIR`).
    - `teacher_logits`: the teacher's logits on the train split (default
      `DIR/teacher_logits.npy`; `FILE_test.npy` next to it, when present, gives the
      teacher's test accuracy).
    - `resume`: the output directory of an interrupted run (it reads the files it recorded).
    - `kwargs`: `distill_experiment`'s other arguments and `DistillConfig` fields.
    """
    if dataset is not None:
        raise ConfigurationError(
            f"--dataset {dataset}: the cifar experiment reads --data DIR (its manifest names "
            "the data set); drop --dataset."
        )
    if resume is not None:
        if data is not None or teacher_logits is not None:
            raise ConfigurationError(
                f"--resume {resume} continues that run with the data and teacher logits it "
                "recorded; drop --data and --teacher-logits."
            )
        return _job(CIFAR_DEFAULTS, resume=resume, **_split_options(kwargs))
    if data is None:
        raise ConfigurationError(
            "the cifar experiment needs --data DIR, a directory written by "
            "ev3_distill.write_array_record (see docs/distillation.md, 'The paper's "
            "experiment')."
        )
    kwargs["data"] = str(Path(data).resolve())
    if teacher_logits is not None:
        kwargs["teacher_logits"] = str(Path(teacher_logits).resolve())
    return _job(CIFAR_DEFAULTS, dataset="cifar", **_split_options(kwargs))


_JOB_ARGUMENTS = (
    "steps",
    "seed",
    "out",
    "pipeline",
    "progress",
    "checkpoint_every",
    "keep",
    "plugins",
    "observers",
)


def _split_options(kwargs: dict[str, Any]) -> dict[str, Any]:
    """`_job`'s keyword arguments: the job's own, and the rest as `options`."""
    job = {k: kwargs.pop(k) for k in _JOB_ARGUMENTS if k in kwargs}
    return {**job, "options": kwargs}


def load_splits(cfg: DistillConfig) -> Splits:
    """The splits `cfg` names: a built-in data set, or an image data directory."""
    if cfg.dataset == "cifar":
        assert cfg.data is not None  # DistillConfig checks it
        return load_cifar(cfg.data, cfg.seed, cfg.holdout)
    return load_dataset(cfg.dataset, cfg.seed)


def _job(
    defaults: dict[str, Any],
    *,
    steps: int | None = None,
    seed: int = 0,
    out: str | os.PathLike[str] | None = None,
    dataset: str | None = None,
    pipeline: str | os.PathLike[str] | None = None,
    progress: bool = True,
    resume: str | os.PathLike[str] | None = None,
    checkpoint_every: int = 10,
    keep: int = 3,
    plugins: Any = None,
    observers: Sequence[Any] = (),
    options: dict[str, Any],
) -> dict[str, Any]:
    """The job of `distill_experiment` with `defaults` under the user's options."""
    t_start = time.perf_counter()
    cfg, out, user, record, pipeline = _configure(
        steps, seed, out, dataset, pipeline, resume, options, defaults
    )
    out.mkdir(parents=True, exist_ok=True)
    pipeline_file = None if pipeline is None else str(Path(pipeline).resolve())

    key = jax.random.key(cfg.seed)
    k_teacher, k_ev3, k_base = jax.random.split(key, 3)
    splits = load_splits(cfg)
    say = (lambda msg: print(msg, file=sys.stderr, flush=True)) if progress else (lambda m: None)
    say(
        f"ev3 run: distillation on {splits.name} {splits.sizes()}, seed {cfg.seed}, "
        f"{cfg.steps} EV3 iterations x {cfg.trajectory} gradient steps -> {out}"
    )
    try:
        if cfg.dataset == "cifar":
            assert cfg.data is not None
            teacher, teacher_info = teacher_from_logits(cfg.data, cfg.teacher_logits, splits)
            baseline = None
        else:
            teacher, teacher_info, baseline = teacher_and_baseline(
                out, splits, cfg, k_teacher, k_base, say
            )
    except KeyboardInterrupt:
        raise RunInterrupted("interrupted while training the teacher or the baseline") from None
    baseline_curve = [] if baseline is None else [tuple(c) for c in baseline["curve"]]

    pipe = user.get("pipeline")
    point = None if record is None else _resume_point(out, splits, cfg, pipe, pipeline_file, say)
    t = time.perf_counter()
    result = _run(
        splits,
        teacher,
        cfg,
        k_ev3,
        user,
        point,
        progress,
        out=out,
        plugins=plugins,
        observers=observers,
        checkpoint_every=checkpoint_every,
        keep=keep,
        baseline_curve=baseline_curve,
        pipeline_file=pipeline_file,
    )
    return write_outputs(
        out,
        result,
        splits,
        cfg,
        teacher_info=teacher_info,
        baseline=baseline,
        baseline_curve=baseline_curve,
        ev3_seconds=time.perf_counter() - t,
        started=t_start,
    )


def _run(splits, teacher, cfg, k_ev3, user, point, progress, **options: Any) -> Any:
    """`run_ev3` with the user's pipeline, student and growth, under a progress bar."""
    student = user["student"](jax.random.fold_in(k_ev3, 1), splits) if "student" in user else None
    bar = _Bar(cfg.steps, progress, initial=0 if point is None else int(point.state.step))
    try:
        return run_ev3(
            splits,
            teacher,
            cfg,
            k_ev3,
            pipeline=user.get("pipeline"),
            student=student,
            growth=user.get("growth", "default"),
            on_iteration=bar,
            resume=point,
            **options,
        )
    finally:
        bar.close()


def _resume_point(out, splits, cfg, pipe, pipeline_file, say) -> ResumePoint:
    point = load_resume_point(
        out, splits, cfg, lambda num_teachers: build_engine(pipe, splits, cfg, num_teachers)
    )
    point.record.setdefault("pipeline_file", pipeline_file)
    say(f"ev3 run: resuming {out} at EV3 iteration {int(point.state.step)} of {cfg.steps}")
    return point


def _configure(
    steps, seed, out, dataset, pipeline, resume, options, defaults
) -> tuple[DistillConfig, Path, dict[str, Any], dict[str, Any] | None, Any]:
    """`(config, out, user's pipeline file namespace, resume record, pipeline file)`: a new
    run's from the options over the pipeline file's `config` over `defaults`, a resumed
    run's from its newest checkpoint."""
    fields = {f.name for f in dataclasses.fields(DistillConfig)}
    unknown = sorted(set(options) - fields)
    if unknown:
        raise ConfigurationError(
            f"distill experiment: unknown option(s) {unknown}; known: {sorted(fields)}."
        )
    if resume is not None:
        out = Path(resume)
        record = _resume_record(out)
        try:
            cfg = DistillConfig(**record["config"])
        except TypeError as exc:
            raise ConfigurationError(
                f"--resume {out}: the checkpoint's recorded options do not fit this version of "
                f"the distillation plugin ({exc}). Start a new run."
            ) from exc
        if steps is not None and int(steps) != cfg.steps:
            raise ConfigurationError(
                f"--resume {out}: that run was started with --steps {cfg.steps}; resuming "
                f"continues it as it was (drop --steps {steps}), or start a new run."
            )
        pipeline = _resume_pipeline(out, record, pipeline)
        user = load_pipeline_file(pipeline) if pipeline is not None else {}
        return cfg, out, user, record, pipeline
    user = load_pipeline_file(pipeline) if pipeline is not None else {}
    cfg_kwargs = {
        **defaults,
        **user.get("config", {}),
        **{k: v for k, v in options.items() if v is not None},
    }
    if steps is not None:
        cfg_kwargs["steps"] = int(steps)
    if dataset is not None:
        cfg_kwargs["dataset"] = dataset
    cfg_kwargs["seed"] = int(seed)
    cfg = DistillConfig(**cfg_kwargs)
    if out is None:
        stamp = datetime.datetime.now(datetime.UTC).strftime("%Y%m%d-%H%M%S")
        out = Path("runs") / stamp
    out = Path(out)
    if (out / "checkpoint").is_dir() and any((out / "checkpoint").iterdir()):
        raise CheckpointError(
            f"--out {out} already holds a distillation run. Continue it with "
            f"`ev3 run --resume {out}`, or pass an empty directory."
        )
    return cfg, out, user, None, pipeline
