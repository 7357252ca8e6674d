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
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import logging
import math
import os
import runpy
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax

from ev3core import (
    Accuracy,
    Constraint,
    Data,
    EV3Scheduler,
    GradientProposer,
    Lexicographic,
    NegCrossEntropy,
    Objective,
    Pipeline,
    hookimpl,
)
from ev3core.errors import ConfigurationError, RunInterrupted

from ._data import DATASETS, Splits, load_dataset
from ._growth import GrowthPolicy, StudentArchive, _streak, grow_state
from ._losses import DistillLoss, LabelLoss
from ._models import CNN, MLP, count_params
from ._train import accuracy, logits_of, shift_augmented_loss, train

logger = logging.getLogger("ev3_distill")

CHOICES = {0: "accepted", 1: "kept", 2: "rolled_back"}
BASELINE_CHUNK = 50  # see `run_baseline`


@dataclasses.dataclass
class DistillConfig:
    """Every option of the distillation experiment (defaults: `ev3 run` with no arguments).

    The gradient-step budget is `steps * trajectory`: in each EV3 iteration every candidate
    lineage advances by one trajectory of `trajectory` optimizer steps (with the default
    `on_reject="continue"` a rejected candidate goes on from its own endpoint until the
    current model changes), so no student EV3 can return took more optimizer steps along its
    own lineage than the baselines get. (All `K` candidates together take `K` times more;
    `summary.json` reports the total as `ev3_gradient_evaluations`.)
    """

    dataset: str = "digits"
    seed: int = 0
    steps: int = 30  # EV3 iterations
    trajectory: int = 100  # optimizer steps per candidate per iteration
    batch_size: int = 32
    # `GradientProposer(on_reject=...)`: "continue" (default) makes every candidate a lineage
    # that goes on from its own endpoint while nothing is accepted, so rejected trajectories
    # are not wasted; "copy" restarts every candidate from the current model each iteration.
    on_reject: str = "continue"
    student: str = "mlp"  # "mlp" or "cnn"
    start_width: int = 8
    max_width: int = 32
    max_depth: int = 2
    patience: int = 2
    grow_mode: str = "preserve"
    grow_factor: float = 4.0
    grow: bool = True
    passes: int = 2
    extra_teachers: int = 1
    temperatures: tuple[float, ...] = (2.0, 4.0)
    weights: tuple[float, ...] = (0.5, 0.9)
    learning_rates: tuple[float, ...] = (3e-3, 1e-2)
    assess_alpha: float = 0.5
    decide_alpha: float = 1.0
    # Decide on accuracy first; among moves that lose at most `accuracy_tolerance` of it,
    # a significant gain in held-out log-likelihood also counts (ties on accuracy are common
    # once the student is good: a 270-example decide set moves in steps of 0.0037).
    tie_break: bool = True
    accuracy_tolerance: float = 0.005
    # What decides: "nll" (held-out log-likelihood, `NegCrossEntropy`, under the accuracy
    # constraint `accuracy_max_drop` when not None) or "lexicographic" (accuracy first with
    # `accuracy_tolerance`, log-likelihood as the tie-break; `tie_break=False`: accuracy only).
    # See docs/distillation.md ("Decisions") for why log-likelihood is the default.
    decide_on: str = "nll"
    accuracy_max_drop: float | None = 0.02
    teacher_steps: int | None = None  # default per data set
    baseline_temperature: float = 4.0
    baseline_weight: float = 0.9
    baseline_learning_rate: float = 1e-3
    baseline: bool = True

    def __post_init__(self) -> None:
        if self.dataset not in DATASETS:
            raise ConfigurationError(
                f"dataset={self.dataset!r} is not one of {DATASETS}; pass --dataset digits or "
                "--dataset mnist1d."
            )
        if self.student not in ("mlp", "cnn"):
            raise ConfigurationError(f"student={self.student!r}: use 'mlp' or 'cnn'.")
        if self.decide_on not in ("nll", "lexicographic"):
            raise ConfigurationError(
                f"decide_on={self.decide_on!r}: use 'nll' (held-out log-likelihood under the "
                "accuracy constraint) or 'lexicographic' (accuracy, then log-likelihood)."
            )
        if self.steps < 1 or self.trajectory < 1 or self.passes < 1:
            raise ConfigurationError(
                f"steps={self.steps}, trajectory={self.trajectory} and passes={self.passes} "
                "must all be >= 1."
            )

    @property
    def cap_widths(self) -> tuple[int, ...]:
        return (self.max_width,) * self.max_depth


# ---------------------------------------------------------------------------- parts
def train_teacher(splits: Splits, key: jax.Array, steps: int | None = None) -> Any:
    """A teacher trained on the train split with labels.

    Digits: an MLP 64-256-256-10, AdamW with a cosine schedule, inputs shifted by up to one
    pixel (>= 97% test accuracy). MNIST-1D: a 1-D CNN (two 32-channel convolutions, a
    128-unit dense layer), AdamW.
    """
    k_model, k_train = jax.random.split(key)
    data = (jnp.asarray(splits.train.x), jnp.asarray(splits.train.y))
    if splits.name == "digits":
        model = MLP(splits.in_features, splits.num_classes, (256, 256), key=k_model)
        steps = 3000 if steps is None else steps
        loss: Any = shift_augmented_loss(splits.in_shape)
        opt = optax.adamw(optax.cosine_decay_schedule(3e-3, steps), weight_decay=1e-4)
    else:
        model = CNN(splits.in_shape, splits.num_classes, (32, 32), hidden=128, key=k_model)
        steps = 3000 if steps is None else steps
        loss = LabelLoss()
        opt = optax.adamw(1e-3, weight_decay=1e-4)
    return train(model, loss, opt, data, steps=steps, batch_size=64, key=k_train)


def make_student(splits: Splits, cfg: DistillConfig, key: jax.Array, widths=None) -> Any:
    """The starting student (`start_width` units, one hidden layer), or one with `widths`."""
    widths = (cfg.start_width,) if widths is None else tuple(widths)
    if cfg.student == "mlp":
        return MLP(splits.in_features, splits.num_classes, widths, key=key)
    return CNN(splits.in_shape, splits.num_classes, widths, key=key)


def default_pipeline(
    num_teachers: int, cfg: DistillConfig, *, assess_size: int, decide_size: int
) -> Pipeline:
    """The EV3 distillation pipeline for `num_teachers` teacher-logit columns.

    Losses: the label loss, and for teacher 0 every (temperature, weight) pair; later teachers
    (archived students) get one family each over the temperatures at the largest weight.
    Optimizers: Adam at each learning rate. Assessors: accuracy and negative cross-entropy.
    With `cfg.decide_on == "nll"` (default) the held-out log-likelihood decides (the paired
    bound makes this continuous score far more powerful than accuracy), under
    `Constraint("accuracy", max_drop=cfg.accuracy_max_drop)`; with `"lexicographic"`,
    accuracy first and, with `cfg.tie_break`, log-likelihood (`ev3core.Lexicographic`).
    """
    losses: list[Any] = [LabelLoss()]
    for t in cfg.temperatures:
        for w in cfg.weights:
            losses.append(DistillLoss(t, w, teacher=0, teacher_name="teacher"))
    for j in range(1, num_teachers):
        for t in cfg.temperatures:
            losses.append(DistillLoss(t, max(cfg.weights), teacher=j, teacher_name=f"student{j}"))
    lex: dict[str, Any] = {}
    if cfg.decide_on == "nll":
        lex = {
            "objective": 1,
            "objectives": [Objective("accuracy"), Objective("neg_cross_entropy")],
            "constraints": []
            if cfg.accuracy_max_drop is None
            else [Constraint("accuracy", max_drop=cfg.accuracy_max_drop)],
        }
    elif cfg.tie_break:
        lex = {
            "priority": Lexicographic(order=[0, 1], tolerances=[cfg.accuracy_tolerance, 0.0]),
            "objectives": [Objective("accuracy"), Objective("neg_cross_entropy")],
        }
    return Pipeline(
        proposers=[
            GradientProposer(
                losses=losses,
                optimizers=[optax.adam(lr) for lr in cfg.learning_rates],
                steps=cfg.trajectory,
                batch_size=cfg.batch_size,
                on_reject=cfg.on_reject,
                optimizer_names=[f"adam{lr:g}" for lr in cfg.learning_rates],
            )
        ],
        assessors=[Accuracy(), NegCrossEntropy()]
        if (cfg.tie_break or cfg.decide_on == "nll")
        else [Accuracy()],
        scheduler=EV3Scheduler(assess_alpha=cfg.assess_alpha, decide_alpha=cfg.decide_alpha, **lex),
        assess_size=assess_size,
        decide_size=decide_size,
        history_size=64,
    )


def load_pipeline_file(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a user's pipeline file (see `docs/distillation.md`).

    The file must define `pipeline`: an `ev3core.Pipeline`, or a function
    `pipeline(num_teachers, config) -> Pipeline`. It may define `student(key, splits)`
    returning the starting student, `growth` (a `GrowthPolicy`, or `None` for a fixed size)
    and `config` (a dict of `DistillConfig` fields).
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigurationError(f"pipeline file {str(path)!r} does not exist.")
    namespace = runpy.run_path(str(path))
    if "pipeline" not in namespace:
        raise ConfigurationError(
            f"pipeline file {str(path)!r} defines no `pipeline`. Define `pipeline = "
            "ev3core.Pipeline(...)` or `def pipeline(num_teachers, config): ...`."
        )
    return namespace


def _teacher_columns(teachers: list[Any], x: jax.Array) -> jax.Array:
    return jnp.stack([logits_of(t, x) for t in teachers], axis=1)  # [n, teachers, classes]


def _make_data(splits: Splits, teachers: list[Any]) -> Data:
    x = jnp.asarray(splits.train.x)
    return Data(
        propose=(x, jnp.asarray(splits.train.y), _teacher_columns(teachers, x)),
        assess=(jnp.asarray(splits.assess.x), jnp.asarray(splits.assess.y)),
        decide=(jnp.asarray(splits.decide.x), jnp.asarray(splits.decide.y)),
    )


# ---------------------------------------------------------------------------- EV3 loop
@dataclasses.dataclass
class EV3Result:
    state: Any
    engine: Any
    metrics: list[dict[str, Any]]
    growth: list[dict[str, Any]]
    archive: StudentArchive
    counts: dict[str, int]
    start_params: int
    start_test_accuracy: float
    gradient_evaluations: int
    resumed_from: int | None = None

    @property
    def path_steps(self) -> int:
        """Optimizer steps along the final student's own lineage (accepted trajectories)."""
        return int(self.metrics[-1]["path_steps"]) if self.metrics else 0


@dataclasses.dataclass
class ResumePoint:
    """Where an interrupted `run_ev3` continues: the engine state and the host-side record
    saved with it (the `distill` entry of the checkpoint's metadata)."""

    state: Any
    record: dict[str, Any]
    teachers: list[Any]  # the extra (archived-student) teachers of the current pass
    archive: dict[int, tuple[float, int, Any]]  # params -> (decide accuracy, iteration, model)


def _count(rows: list[dict[str, Any]]) -> dict[str, int]:
    counts = {"accepted": 0, "kept": 0, "rolled_back": 0, "significant": 0, "grown": 0}
    for r in rows:
        counts[r["choice"]] += 1
        counts["significant"] += bool(r["significant"])
        counts["grown"] += bool(r["grown"])
    return counts


class _Job:
    """The host side of one EV3 distillation run.

    Its `ev3_after_step` hook (registered with the other plugins for each `ev3core.run`
    segment) turns every step into a metrics row and offers the student to the archive; its
    `record()` is what the checkpoint's metadata stores so that a run can be resumed.
    """

    def __init__(self, splits: Splits, cfg: DistillConfig, out: Path | None, on_iteration):
        self.splits = splits
        self.cfg = cfg
        self.out = out
        self.on_iteration = on_iteration
        self.rows: list[dict[str, Any]] = []
        self.archive = StudentArchive()
        self.archive_iteration: dict[int, int] = {}
        self.current_pass = 1
        self.teacher_files: list[str] = []
        self.teacher_models: list[Any] = []
        self.labels: list[str] = []
        self.proposal_steps = 0  # gradient steps per EV3 iteration over all candidates
        self.path = {"current": 0, "stable": 0}  # optimizer steps along each incumbent's lineage
        # Iterations the candidates' trajectories have run since they last started from the
        # current model (on_reject="continue": since the current model last changed).
        self.since = 0
        self.explored = 0
        self.baseline_at: dict[int, float] = {}
        self.pipeline_file: str | None = None
        self.t0 = time.perf_counter()
        self.wall_before = 0.0  # wall time of the run before it was resumed

    # -- lifecycle hook: one row per EV3 step
    @hookimpl
    def ev3_after_step(self, state: Any, info: Any) -> None:
        info = jax.device_get(info)
        it = int(state.step)
        choice = int(info.choice)
        self.explored += self.proposal_steps
        # The winner's lineage started from the current model `since` iterations ago (one
        # iteration unless on_reject="continue"); a significant winner also becomes the
        # stable model, a roll back makes the stable model current. (A "continue" lineage that
        # restarted after going non-finite is shorter: this is an upper bound.)
        self.since = self.since + 1 if self.cfg.on_reject == "continue" else 1
        winner = self.path["current"] + self.since * self.cfg.trajectory
        stable = winner if bool(info.significant) else self.path["stable"]
        if bool(info.accepted):
            self.path["current"] = winner
        elif bool(info.rolled_back):
            self.path["current"] = self.path["stable"]
        if bool(info.accepted) or bool(info.rolled_back):
            self.since = 0
        self.path["stable"] = stable
        model = state.model
        decide_full = accuracy(model, self.splits.decide.x, self.splits.decide.y)
        if self.archive.offer(model, decide_full):
            self.archive_iteration[count_params(model)] = it
        row: dict[str, Any] = {
            "iteration": it,
            "gradient_steps": it * self.cfg.trajectory,
            "path_steps": self.path["current"],
            "explored_steps": self.explored,
            "pass": self.current_pass,
            "choice": CHOICES[choice],
            "accepted": bool(info.accepted),
            "rolled_back": bool(info.rolled_back),
            "significant": bool(info.significant),
            "winner": self.labels[int(info.winner)],
            "num_invalid": int(info.num_invalid),
            "decide_accuracy": float(np.asarray(info.decide_mean)[0, choice]),
            "decide_accuracy_full": decide_full,
            "test_accuracy": accuracy(model, self.splits.test.x, self.splits.test.y),
            "student_params": count_params(model),
            "student_widths": list(getattr(model, "widths", ())),
            "grown": None,
            "baseline_test_accuracy": self.baseline_at.get(it * self.cfg.trajectory),
            "wall_seconds": self.wall_before + time.perf_counter() - self.t0,
        }
        self.rows.append(row)
        if self.on_iteration is not None:
            self.on_iteration(row, _count(self.rows))

    # -- what a checkpoint stores besides the engine state
    def _file_for(self, params: int, iteration: int, model: Any) -> str:
        name = f"students/p{params}-it{iteration}.eqx"
        if self.out is not None and not (self.out / name).exists():
            (self.out / "students").mkdir(exist_ok=True)
            tmp = self.out / (name + ".tmp")
            eqx.tree_serialise_leaves(tmp, model)
            os.replace(tmp, self.out / name)
        return name

    def record(self, state_model: Any, growth: GrowthPolicy | None) -> dict[str, Any]:
        archive = []
        for params, (acc, model) in sorted(self.archive.entries.items()):
            it = self.archive_iteration[params]
            archive.append(
                {
                    "params": params,
                    "decide_accuracy": acc,
                    "iteration": it,
                    "architecture": model.describe(),
                    "file": self._file_for(params, it, model),
                }
            )
        return {
            "config": dataclasses.asdict(self.cfg),
            "pipeline_file": self.pipeline_file,
            "architecture": state_model.describe() if hasattr(state_model, "describe") else None,
            "pass": self.current_pass,
            "teachers": [
                {"file": f, "architecture": m.describe()}
                for f, m in zip(self.teacher_files, self.teacher_models)
            ],
            "archive": archive,
            "path": dict(self.path),
            "since": self.since,
            "explored": self.explored,
            "last_growth_step": None if growth is None else growth.last_growth_step,
            "rows": self.rows,
            "wall_seconds": self.wall_before + time.perf_counter() - self.t0,
        }


def load_resume_point(
    directory: str | os.PathLike[str],
    splits: Splits,
    cfg: DistillConfig,
    engine_for: Callable[[int], Any],
) -> ResumePoint:
    """The newest usable checkpoint of a distillation run in `directory` (its `checkpoint/`).

    The checkpoint's metadata records the student's (grown) architecture and the number of
    teachers, so the `like` state is rebuilt before the leaves are read; the archived
    students and extra teachers are read from `students/`.
    """
    from ev3core import load_checkpoint
    from ev3core._host.checkpoint import list_checkpoints
    from ev3core.errors import CheckpointError

    from ._models import model_from_description

    directory = Path(directory)
    manifests = list_checkpoints(directory / "checkpoint")
    errors = []
    for manifest in reversed(manifests):
        try:
            record = json.loads(manifest.read_text())["metadata"]["distill"]
            key = jax.random.key(0)
            like_model = model_from_description(record["architecture"], key=key)
            engine = engine_for(1 + len(record["teachers"]))
            like = engine.init(like_model, key)
            state, _ = load_checkpoint(manifest, like=like)
        except (OSError, ValueError, KeyError, TypeError, CheckpointError) as exc:
            errors.append(f"{manifest.name}: {exc}")
            continue

        def load(entry: dict[str, Any]) -> Any:
            like = model_from_description(entry["architecture"], key=jax.random.key(0))
            return eqx.tree_deserialise_leaves(directory / entry["file"], like)

        teachers = [load(t) for t in record["teachers"]]
        archive = {
            int(e["params"]): (float(e["decide_accuracy"]), int(e["iteration"]), load(e))
            for e in record["archive"]
        }
        return ResumePoint(state=state, record=record, teachers=teachers, archive=archive)
    raise CheckpointError(
        f"--resume {directory}: no usable distillation checkpoint in {directory / 'checkpoint'}"
        + (f" ({'; '.join(errors)})" if errors else "")
        + ". Pass the --out directory of an earlier `ev3 run`, or start a new run."
    )


def _segment_length(growth: GrowthPolicy | None, state: Any, model_at_cap: bool) -> int | None:
    """Steps that can run before the growth trigger could fire (`None`: it cannot)."""
    if growth is None or model_at_cap:
        return None
    step = int(state.step)
    streak = int(_streak(state.history))
    return max(1, growth.patience - streak, growth.patience - (step - growth.last_growth_step))


def run_ev3(
    splits: Splits,
    teacher: Any,
    cfg: DistillConfig,
    key: jax.Array,
    *,
    pipeline: Any = None,
    student: Any = None,
    growth: GrowthPolicy | None | str = "default",
    on_iteration: Callable[[dict[str, Any], dict[str, int]], None] | None = None,
    plugins: Any = None,
    observers: Sequence[Any] = (),
    out: str | os.PathLike[str] | None = None,
    checkpoint_every: int = 10,
    keep: int = 3,
    resume: ResumePoint | None = None,
    baseline_curve: list[tuple[int, float]] | None = None,
    pipeline_file: str | None = None,
) -> EV3Result:
    """EV3 distillation with growth and multi-pass teachers; one metrics row per iteration.

    The steps run through `ev3core.run` in segments, so every lifecycle plugin (`plugins`,
    default `ev3core.plugin_manager()`) sees `ev3_run_start`, `ev3_after_step` and `ev3_run_end`.
    Between segments the host grows the student (`growth`) and starts new passes; a segment
    is never longer than the number of steps before the growth trigger could fire, so growth
    happens at exactly the step it would if it were checked after every step.

    With `out`, a `Checkpointer` writes `out/checkpoint/` every `checkpoint_every` steps and
    at the end of each segment (metadata: the student's architecture, the pass, the archive,
    the metrics rows), and archived students go to `out/students/`; `resume` (from
    `load_resume_point`) continues such a run with the same results as never stopping.
    Ctrl-C raises `ev3core.errors.RunInterrupted` after checkpointing.
    """
    from ev3core import Checkpointer, run

    k_student, k_init, k_grow = jax.random.split(key, 3)
    if student is None:
        student = make_student(splits, cfg, k_student)
    if growth == "default":
        growth = (
            GrowthPolicy(
                patience=cfg.patience,
                max_width=cfg.max_width,
                max_depth=cfg.max_depth,
                factor=cfg.grow_factor,
                mode=cfg.grow_mode,  # type: ignore[arg-type]
            )
            if cfg.grow
            else None
        )
    assert growth is None or isinstance(growth, GrowthPolicy)
    multipass = not isinstance(pipeline, Pipeline)

    def build(num_teachers: int):
        if pipeline is None:
            pipe = default_pipeline(
                num_teachers, cfg, assess_size=len(splits.assess), decide_size=len(splits.decide)
            )
        elif isinstance(pipeline, Pipeline):
            pipe = pipeline
        else:
            pipe = pipeline(num_teachers, cfg)
        return pipe.build()

    out = None if out is None else Path(out)
    job = _Job(splits, cfg, out, on_iteration)
    job.baseline_at = dict(baseline_curve or [])
    job.pipeline_file = pipeline_file
    start_params = count_params(student)
    start_test = accuracy(student, splits.test.x, splits.test.y)
    if resume is None:
        engine = build(1)
        state = engine.init(student, k_init)
    else:
        rec = resume.record
        engine = build(1 + len(resume.teachers))
        state = resume.state
        job.rows = list(rec["rows"])
        job.current_pass = int(rec["pass"])
        job.teacher_files = [t["file"] for t in rec["teachers"]]
        job.teacher_models = list(resume.teachers)
        job.path = {k: int(v) for k, v in rec["path"].items()}
        job.since = int(rec.get("since", 0))
        job.explored = int(rec["explored"])
        job.wall_before = float(rec["wall_seconds"])
        for params, (acc, it, model) in resume.archive.items():
            job.archive.entries[params] = (acc, model)
            job.archive_iteration[params] = it
        if growth is not None and rec["last_growth_step"] is not None:
            growth.last_growth_step = int(rec["last_growth_step"])
    teachers = [teacher, *job.teacher_models]
    data = _make_data(splits, teachers)
    engine.check_data(data)
    job.labels = list(engine.labels())
    job.proposal_steps = sum(p.num_candidates * getattr(p, "steps", 0) for p in engine.proposers)

    observers = [job, *observers]  # this run's observers (nothing is registered globally)
    if out is not None:
        checkpointer = Checkpointer(
            out / "checkpoint",
            every=checkpoint_every,
            keep=keep,
            metadata=lambda: {
                "cli": {"experiment": "distill"},
                "distill": job.record(checkpointed_model[0], growth),
            },
        )
        observers.append(checkpointer)
    checkpointed_model = [state.model]  # the architecture of the state being run (for metadata)
    if out is not None and resume is None:
        checkpointer.save(state)  # step 0: a run interrupted at once can still be resumed
    pass_len = -(-cfg.steps // cfg.passes)
    boundary = state  # the last state that a checkpoint holds (a segment boundary)
    try:
        while True:
            step = int(state.step)
            if growth is not None and step > 0:
                state, op = growth.maybe_grow(engine, state, jax.random.fold_in(k_grow, step))
                if op is not None:
                    row = job.rows[-1]
                    row["grown"] = op
                    job.since = 0  # grow_state restarts every candidate from the grown model
                    row["student_params_after"] = count_params(state.model)
                    row["student_widths_after"] = list(getattr(state.model, "widths", ()))
                    logger.info("ev3_distill: %s at iteration %d", op, step)
            want = min(cfg.passes, step // pass_len + 1) if multipass else 1
            if want != job.current_pass:
                # A new pass: the best archived students join as extra teachers.
                job.current_pass = want
                best = job.archive.best(cfg.extra_teachers)
                job.teacher_models = [m for _, _, m in best]
                job.teacher_files = [
                    job._file_for(p, job.archive_iteration[p], m) for p, _, m in best
                ]
                teachers = [teacher, *job.teacher_models]
                data = _make_data(splits, teachers)
                engine = build(len(teachers))
                engine.check_data(data)
                job.labels = list(engine.labels())
                job.proposal_steps = sum(
                    p.num_candidates * getattr(p, "steps", 0) for p in engine.proposers
                )
                state = grow_state(engine, state, state.model, state.stable_model)
                job.since = 0
                logger.info("ev3_distill: pass %d with %d teacher(s)", want, len(teachers))
            if step >= cfg.steps:
                break
            at_cap = growth is None or growth.next_model(state.model, k_grow) is None
            n = cfg.steps - step
            if multipass and want < cfg.passes:
                n = min(n, want * pass_len - step)
            wait = _segment_length(growth, state, at_cap)
            if wait is not None:
                n = min(n, wait)
            checkpointed_model[0] = state.model
            state, _ = run(engine, state, data, n, plugins=plugins, observers=observers)
            boundary = state
    except RunInterrupted:
        raise
    except KeyboardInterrupt:
        # Ctrl-C between two `ev3core.run` segments (growing, starting a pass, compiling):
        # the checkpoint of the last segment boundary is the state to resume from.
        raise RunInterrupted(
            f"ev3_distill: interrupted between EV3 segments at step {int(boundary.step)}; "
            "the checkpoint of that step is kept.",
            state=boundary,
            steps_done=int(boundary.step) - (0 if resume is None else int(resume.state.step)),
        ) from None
    return EV3Result(
        state=state,
        engine=engine,
        metrics=job.rows,
        growth=[
            {
                "iteration": r["iteration"],
                "gradient_steps": r["gradient_steps"],
                "op": r["grown"],
                "params": r["student_params_after"],
            }
            for r in job.rows
            if r["grown"]
        ],
        archive=job.archive,
        counts=_count(job.rows),
        start_params=start_params,
        start_test_accuracy=start_test,
        gradient_evaluations=job.explored,
        resumed_from=None if resume is None else int(resume.state.step),
    )


def run_baseline(
    splits: Splits,
    teacher: Any | None,
    cfg: DistillConfig,
    key: jax.Array,
    *,
    widths: tuple[int, ...] | None = None,
) -> tuple[Any, list[tuple[int, float]]]:
    """Plain training of a fixed-size student for `steps * trajectory` optimizer steps.

    With a `teacher`: plain distillation (one `DistillLoss`, one Adam); with `teacher=None`:
    labels only. Returns the model and the test-accuracy curve `[(gradient_steps, acc)]`
    every `trajectory` steps.
    """
    k_model, k_train = jax.random.split(key)
    model = make_student(splits, cfg, k_model, cfg.cap_widths if widths is None else widths)
    x = jnp.asarray(splits.train.x)
    y = jnp.asarray(splits.train.y)
    if teacher is None:
        loss: Any = LabelLoss()
        data: Any = (x, y)
    else:
        loss = DistillLoss(cfg.baseline_temperature, cfg.baseline_weight)
        data = (x, y, _teacher_columns([teacher], x))
    curve: list[tuple[int, float]] = []
    # `train` draws one batch key per evaluation chunk, so the chunk length fixes the batch
    # stream: chunks of gcd(trajectory, 50) steps keep the baseline's batches (hence its
    # results) independent of EV3's trajectory length (any multiple of 50), and the curve
    # still has a point at every EV3 iteration.
    chunk = math.gcd(cfg.trajectory, BASELINE_CHUNK)
    model = train(
        model,
        loss,
        optax.adam(cfg.baseline_learning_rate),
        data,
        steps=cfg.steps * cfg.trajectory,
        batch_size=cfg.batch_size,
        key=k_train,
        eval_every=chunk,
        on_eval=lambda done, m: (
            curve.append((done, accuracy(m, splits.test.x, splits.test.y)))
            if done % cfg.trajectory == 0 or done == cfg.steps * cfg.trajectory
            else None
        ),
    )
    return model, curve


# ---------------------------------------------------------------------------- outputs
def write_report(
    path: Path,
    metrics: list[dict[str, Any]],
    baseline_curve: list[tuple[int, float]],
    *,
    baseline_params: int | None,
    teacher_accuracy: float,
    title: str,
) -> None:
    """`report.png`: accuracy over gradient steps (EV3 and baseline, accepted / rejected /
    grown markers) and the student size."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = np.array([m["gradient_steps"] for m in metrics])
    test = np.array([m["test_accuracy"] for m in metrics])
    params = np.array([m.get("student_params_after", m["student_params"]) for m in metrics])
    accepted = np.array([m["accepted"] for m in metrics], bool)
    fig, (ax, ax2) = plt.subplots(
        2, 1, figsize=(9, 7), sharex=True, gridspec_kw={"height_ratios": [3, 1.3]}
    )
    ax.plot(steps, test, "-", color="C0", label="EV3 student (test)")
    ax.plot(steps[accepted], test[accepted], "^", color="green", ms=5, label="accepted")
    ax.plot(steps[~accepted], test[~accepted], "x", color="red", ms=5, label="rejected")
    if baseline_curve:
        b = np.array(baseline_curve)
        ax.plot(b[:, 0], b[:, 1], "-", color="C1", label="plain distillation (test)")
    ax.axhline(teacher_accuracy, color="gray", ls=":", label="teacher (test)")
    grown = [m for m in metrics if m["grown"]]
    for i, m in enumerate(grown):
        for a in (ax, ax2):
            a.axvline(
                m["gradient_steps"],
                color="purple",
                ls="--",
                lw=0.8,
                label="grown" if (i == 0 and a is ax) else None,
            )
    ax.set_ylabel("test accuracy")
    lo = min(float(test.min()), *(b for _, b in baseline_curve)) if baseline_curve else test.min()
    ax.set_ylim(max(0.0, lo - 0.02), 1.0)
    ax.legend(loc="lower right", fontsize=8)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax2.step(steps, params, where="post", color="C0", label="EV3 student")
    if baseline_params is not None:
        ax2.axhline(baseline_params, color="C1", ls="-", label="baseline student")
    ax2.set_ylabel("parameters")
    ax2.set_xlabel("gradient steps (budget: one trajectory per EV3 iteration)")
    ax2.legend(loc="lower right", fontsize=8)
    ax2.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


class _Bar:
    def __init__(self, total: int, enabled: bool, initial: int = 0):
        self.bar = None
        if enabled:
            from tqdm.auto import tqdm

            self.bar = tqdm(
                total=total,
                initial=initial,
                desc="EV3 distill",
                unit="it",
                file=sys.stderr,
                dynamic_ncols=True,
            )

    def __call__(self, row: dict[str, Any], counts: dict[str, int]) -> None:
        if self.bar is None:
            return
        self.bar.set_postfix(
            {
                "grad_steps": row["gradient_steps"],
                "acc": f"{row['decide_accuracy_full']:.3f}",
                "params": row.get("student_params_after", row["student_params"]),
                "acc/rej": f"{counts['accepted']}/{counts['kept'] + counts['rolled_back']}",
                "grown": counts["grown"],
            },
            refresh=False,
        )
        self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


# ---------------------------------------------------------------------------- main job
def _teacher_like(splits: Splits, key: jax.Array) -> Any:
    """A teacher with the architecture `train_teacher` builds (to load saved leaves into)."""
    if splits.name == "digits":
        return MLP(splits.in_features, splits.num_classes, (256, 256), key=key)
    return CNN(splits.in_shape, splits.num_classes, (32, 32), hidden=128, key=key)


def _write_json(path: Path, obj: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2))
    os.replace(tmp, path)


def _resume_record(directory: Path) -> dict[str, Any]:
    """The `distill` metadata of the newest checkpoint manifest in `directory/checkpoint`."""
    from ev3core._host.checkpoint import list_checkpoints
    from ev3core.errors import CheckpointError

    for manifest in reversed(list_checkpoints(directory / "checkpoint")):
        try:
            return json.loads(manifest.read_text())["metadata"]["distill"]
        except (OSError, ValueError, KeyError, TypeError):
            continue
    raise CheckpointError(
        f"--resume {directory}: no distillation checkpoint in {directory / 'checkpoint'}. Pass "
        "the --out directory of an earlier `ev3 run`."
    )


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
    t_start = time.perf_counter()
    fields = {f.name for f in dataclasses.fields(DistillConfig)}
    unknown = sorted(set(options) - fields)
    if unknown:
        raise ConfigurationError(
            f"distill experiment: unknown option(s) {unknown}; known: {sorted(fields)}."
        )
    record: dict[str, Any] | None = None
    if resume is not None:
        out = Path(resume)
        record = _resume_record(out)
        recorded = DistillConfig(**record["config"])
        if steps is not None and int(steps) != recorded.steps:
            raise ConfigurationError(
                f"--resume {out}: that run was started with --steps {recorded.steps}; resuming "
                f"continues it as it was (drop --steps {steps}), or start a new run."
            )
        pipeline = record.get("pipeline_file")
        cfg = recorded
        user = load_pipeline_file(pipeline) if pipeline is not None else {}
    else:
        user = load_pipeline_file(pipeline) if pipeline is not None else {}
        cfg_kwargs = {
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
            from ev3core.errors import CheckpointError

            raise CheckpointError(
                f"--out {out} already holds a distillation run. Continue it with "
                f"`ev3 run --resume {out}`, or pass an empty directory."
            )
    out.mkdir(parents=True, exist_ok=True)
    pipeline_file = None if pipeline is None else str(Path(pipeline).resolve())

    key = jax.random.key(cfg.seed)
    k_teacher, k_ev3, k_base = jax.random.split(key, 3)
    splits = load_dataset(cfg.dataset, cfg.seed)
    say = (lambda msg: print(msg, file=sys.stderr, flush=True)) if progress else (lambda m: None)
    say(
        f"ev3 run: distillation on {cfg.dataset} {splits.sizes()}, seed {cfg.seed}, "
        f"{cfg.steps} EV3 iterations x {cfg.trajectory} gradient steps -> {out}"
    )

    def teacher_and_baseline() -> tuple[Any, dict[str, Any], dict[str, Any] | None]:
        # The teacher and the baseline are saved once done, so a resumed run reuses them.
        if (out / "teacher.json").is_file() and (out / "teacher.eqx").is_file():
            teacher = eqx.tree_deserialise_leaves(
                out / "teacher.eqx", _teacher_like(splits, k_teacher)
            )
            teacher_info = json.loads((out / "teacher.json").read_text())
            say(f"teacher: loaded from {out / 'teacher.eqx'}")
        else:
            t = time.perf_counter()
            teacher = train_teacher(splits, k_teacher, cfg.teacher_steps)
            teacher_info = {
                "test_accuracy": accuracy(teacher, splits.test.x, splits.test.y),
                "params": count_params(teacher),
                "architecture": teacher.describe(),
                "wall_seconds": time.perf_counter() - t,
            }
            eqx.tree_serialise_leaves(out / "teacher.eqx", teacher)
            _write_json(out / "teacher.json", teacher_info)
        teacher_acc = teacher_info["test_accuracy"]
        say(
            f"teacher: {teacher_info['params']} parameters, test accuracy {teacher_acc:.4f} "
            f"({teacher_info['wall_seconds']:.1f} s)"
        )

        baseline: dict[str, Any] | None = None
        if cfg.baseline:
            if (out / "baseline.json").is_file():
                baseline = json.loads((out / "baseline.json").read_text())
            else:
                t = time.perf_counter()
                baseline_model, curve = run_baseline(splits, teacher, cfg, k_base)
                baseline = {
                    "method": f"plain distillation: DistillLoss(T={cfg.baseline_temperature:g}, "
                    f"w={cfg.baseline_weight:g}), adam({cfg.baseline_learning_rate:g}), fixed size",
                    "test_accuracy": curve[-1][1],
                    "params": count_params(baseline_model),
                    "architecture": baseline_model.describe(),
                    "gradient_steps": cfg.steps * cfg.trajectory,
                    "wall_seconds": time.perf_counter() - t,
                    "curve": curve,
                }
                _write_json(out / "baseline.json", baseline)
            say(
                f"plain distillation baseline: test accuracy {baseline['test_accuracy']:.4f} "
                f"({baseline['wall_seconds']:.1f} s)"
            )
        return teacher, teacher_info, baseline

    try:
        teacher, teacher_info, baseline = teacher_and_baseline()
    except KeyboardInterrupt:
        raise RunInterrupted("interrupted while training the teacher or the baseline") from None
    teacher_acc = teacher_info["test_accuracy"]
    baseline_curve = [] if baseline is None else [tuple(c) for c in baseline["curve"]]

    pipe = user.get("pipeline")
    growth: Any = user.get("growth", "default")
    student = None
    if "student" in user:
        student = user["student"](jax.random.fold_in(k_ev3, 1), splits)
    point = None
    if record is not None:

        def engine_for(num_teachers: int) -> Any:
            if pipe is None:
                return default_pipeline(
                    num_teachers,
                    cfg,
                    assess_size=len(splits.assess),
                    decide_size=len(splits.decide),
                ).build()
            return (pipe if isinstance(pipe, Pipeline) else pipe(num_teachers, cfg)).build()

        point = load_resume_point(out, splits, cfg, engine_for)
        point.record.setdefault("pipeline_file", pipeline_file)
        say(f"ev3 run: resuming {out} at EV3 iteration {int(point.state.step)} of {cfg.steps}")
    bar = _Bar(cfg.steps, progress, initial=0 if point is None else int(point.state.step))
    t = time.perf_counter()
    try:
        result = run_ev3(
            splits,
            teacher,
            cfg,
            k_ev3,
            pipeline=pipe,
            student=student,
            growth=growth,
            on_iteration=bar,
            plugins=plugins,
            observers=observers,
            out=out,
            checkpoint_every=checkpoint_every,
            keep=keep,
            resume=point,
            baseline_curve=baseline_curve,
            pipeline_file=pipeline_file,
        )
    finally:
        bar.close()
    ev3_time = time.perf_counter() - t
    final = result.state.model
    ev3_acc = accuracy(final, splits.test.x, splits.test.y)

    with open(out / "metrics.jsonl", "w") as f:
        for row in result.metrics:
            f.write(json.dumps(row) + "\n")
    eqx.tree_serialise_leaves(out / "student.eqx", final)
    from ev3core._host.checkpoint import state_digest

    K = result.engine.num_candidates
    budget = cfg.steps * cfg.trajectory
    summary = {
        "experiment": "distill",
        "dataset": cfg.dataset,
        "seed": cfg.seed,
        "splits": splits.sizes(),
        "ev3_iterations": cfg.steps,
        "gradient_steps": budget,
        "budget": (
            f"{budget} gradient steps = {cfg.steps} EV3 iterations x {cfg.trajectory}: each "
            "iteration advances every candidate lineage by one trajectory, so no EV3 student "
            "took more steps along its own lineage; the baseline gets the same number of "
            "optimizer steps. The EV3 student's own lineage took at most "
            f"{result.path_steps} of them; all {K} candidates together explored "
            f"{result.gradient_evaluations}."
        ),
        "ev3_path_steps": result.path_steps,
        "ev3_gradient_evaluations": result.gradient_evaluations,
        "teacher": {k: v for k, v in teacher_info.items()},
        "ev3_student": {
            "test_accuracy": ev3_acc,
            "stable_test_accuracy": accuracy(
                result.state.stable_model, splits.test.x, splits.test.y
            ),
            "params": count_params(final),
            "architecture": final.describe() if hasattr(final, "describe") else None,
            "start_params": result.start_params,
            "start_test_accuracy": result.start_test_accuracy,
            "candidates_per_iteration": K,
            "counts": result.counts,
            "growth": result.growth,
            "archive": result.archive.summary(),
            "state_sha256": state_digest(result.state),
            "wall_seconds": result.metrics[-1]["wall_seconds"] if result.metrics else ev3_time,
        },
        "baseline_student": None
        if baseline is None
        else {k: v for k, v in baseline.items() if k != "curve"},
        "checkpoint": "checkpoint",
        "resumed_from": result.resumed_from,
        "wall_seconds": time.perf_counter() - t_start,
    }
    _write_json(out / "summary.json", summary)
    write_report(
        out / "report.png",
        result.metrics,
        baseline_curve,
        baseline_params=None if baseline is None else baseline["params"],
        teacher_accuracy=teacher_acc,
        title=f"EV3 distillation on {cfg.dataset} (seed {cfg.seed}): EV3 {ev3_acc:.3f}"
        + ("" if baseline is None else f", baseline {baseline['test_accuracy']:.3f}")
        + f", teacher {teacher_acc:.3f}",
    )
    summary["out"] = str(out)
    return summary
