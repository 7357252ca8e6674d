"""The EV3 loop: `ev3core.run` in segments, with growth and new passes between them, and the
host-side job that turns every step into a metrics row."""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import equinox as eqx
import jax
import numpy as np

import ev3core
from ev3core import (
    Pipeline,
    hookimpl,
)
from ev3core.errors import RunInterrupted

from ._config import (
    CHOICES,
    DistillConfig,
    _file_sha256,
    _make_data,
    default_pipeline,
    image_augment,
    make_student,
)
from ._data import Splits
from ._growth import GrowthPolicy, StudentArchive, _streak, grow_state
from ._models import count_params, describe, widths_of
from ._resume import ResumePoint
from ._train import accuracy

logger = logging.getLogger("ev3_distill")


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
        self.pipeline_sha256: str | None = None
        self.t0 = time.perf_counter()
        self.wall_before = 0.0  # wall time of the run before it was resumed

    # -- lifecycle hook: one row per EV3 step
    @hookimpl
    def ev3_after_step(self, state: Any, info: Any) -> None:
        info = jax.device_get(info)
        it = int(state.step)
        choice = ev3core.Choice[info.choice]  # "winner", "current" or "stable"
        position = int(ev3core.choice_index(info.choice))  # its row in decide_mean
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
            "decide_accuracy": float(np.asarray(info.decide_mean)[0, position]),
            "decide_accuracy_full": decide_full,
            "test_accuracy": accuracy(model, self.splits.test.x, self.splits.test.y),
            "student_params": count_params(model),
            "student_widths": widths_of(model),
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
                    "architecture": describe(model),
                    "file": self._file_for(params, it, model),
                }
            )
        return {
            "config": dataclasses.asdict(self.cfg),
            "pipeline_file": self.pipeline_file,
            "pipeline_sha256": self.pipeline_sha256,
            "architecture": describe(state_model),
            "pass": self.current_pass,
            "teachers": [
                {"file": f, "architecture": describe(m)}
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


def _segment_length(growth: GrowthPolicy | None, state: Any, model_at_cap: bool) -> int | None:
    """Steps that can run before the growth trigger could fire (`None`: it cannot)."""
    if growth is None or model_at_cap:
        return None
    step = int(state.step)
    streak = int(_streak(state.history))
    return max(1, growth.patience - streak, growth.patience - (step - growth.last_growth_step))


def build_engine(pipeline: Any, splits: Splits, cfg: DistillConfig, num_teachers: int) -> Any:
    """The engine for `num_teachers` teacher-logit columns: from `default_pipeline` when
    `pipeline` is None, else the user's `Pipeline` or `pipeline(num_teachers, cfg)`."""
    if pipeline is None:
        pipe = default_pipeline(
            num_teachers,
            cfg,
            assess_size=len(splits.assess),
            decide_size=len(splits.decide),
            augment=image_augment(splits.in_shape) if cfg.augment else None,
        )
    elif isinstance(pipeline, Pipeline):
        pipe = pipeline
    else:
        pipe = pipeline(num_teachers, cfg)
    return pipe.build()


def _default_growth(cfg: DistillConfig) -> GrowthPolicy | None:
    if not cfg.grow:
        return None
    return GrowthPolicy(
        patience=cfg.patience,
        max_width=cfg.max_width,
        max_depth=cfg.max_depth,
        factor=cfg.grow_factor,
        mode=cfg.grow_mode,  # type: ignore[arg-type]
    )


def _restore(job: _Job, resume: ResumePoint, growth: GrowthPolicy | None) -> None:
    """Put the host-side record of a checkpoint back into `job` (and `growth`)."""
    rec = resume.record
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


@dataclasses.dataclass
class _Segments:
    """The EV3 run as `ev3core.run` segments, with growth and new passes between them."""

    job: _Job
    splits: Splits
    cfg: DistillConfig
    teacher: Any
    build: Callable[[int], Any]
    growth: GrowthPolicy | None
    multipass: bool
    k_grow: jax.Array
    engine: Any = None
    data: Any = None

    def use(self, engine: Any) -> None:
        """Run `engine` next, on data with the current teachers."""
        self.engine = engine
        self.data = _make_data(self.splits, [self.teacher, *self.job.teacher_models])
        engine.check_data(self.data)
        self.job.labels = list(engine.labels())
        self.job.proposal_steps = sum(
            p.num_candidates * getattr(p, "steps", 0) for p in engine.proposers
        )

    def grow(self, state: Any) -> Any:
        step = int(state.step)
        if self.growth is None or step == 0:
            return state
        state, op = self.growth.maybe_grow(
            self.engine, state, jax.random.fold_in(self.k_grow, step)
        )
        if op is not None:
            row = self.job.rows[-1]
            row["grown"] = op
            self.job.since = 0  # grow_state restarts every candidate from the grown model
            row["student_params_after"] = count_params(state.model)
            row["student_widths_after"] = widths_of(state.model)
            logger.info("ev3_distill: %s at iteration %d", op, step)
        return state

    def new_pass(self, state: Any, want: int) -> Any:
        """Start pass `want`: the best archived students join as extra teachers."""
        job = self.job
        job.current_pass = want
        best = job.archive.best(self.cfg.extra_teachers)
        job.teacher_models = [m for _, _, m in best]
        job.teacher_files = [job._file_for(p, job.archive_iteration[p], m) for p, _, m in best]
        self.use(self.build(1 + len(job.teacher_models)))
        state = grow_state(self.engine, state, state.model, state.stable_model)
        job.since = 0
        logger.info("ev3_distill: pass %d with %d teacher(s)", want, 1 + len(job.teacher_models))
        return state

    def length(self, state: Any, want: int, pass_len: int) -> int:
        """Steps of the next segment: to the end, the next pass or a possible growth."""
        step = int(state.step)
        at_cap = self.growth is None or self.growth.next_model(state.model, self.k_grow) is None
        n = self.cfg.steps - step
        if self.multipass and want < self.cfg.passes:
            n = min(n, want * pass_len - step)
        wait = _segment_length(self.growth, state, at_cap)
        return n if wait is None else min(n, wait)

    def run(
        self, state: Any, plugins: Any, observers: list[Any], checkpointed_model: list[Any]
    ) -> Any:
        """Every segment up to `cfg.steps`; Ctrl-C between segments raises `RunInterrupted`
        naming the last segment boundary (the state its checkpoint holds)."""
        cfg = self.cfg
        pass_len = -(-cfg.steps // cfg.passes)
        boundary = start = state
        try:
            while True:
                step = int(state.step)
                state = self.grow(state)
                want = min(cfg.passes, step // pass_len + 1) if self.multipass else 1
                if want != self.job.current_pass:
                    state = self.new_pass(state, want)
                if step >= cfg.steps:
                    return state
                n = self.length(state, want, pass_len)
                checkpointed_model[0] = state.model
                state, _ = ev3core.run(
                    self.engine, state, self.data, n, plugins=plugins, observers=observers
                )
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
                steps_done=int(boundary.step) - int(start.step),
            ) from None


def _result(job: _Job, state: Any, engine: Any, student: Any, splits: Splits, resume) -> EV3Result:
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
        start_params=count_params(student),
        start_test_accuracy=accuracy(student, splits.test.x, splits.test.y),
        gradient_evaluations=job.explored,
        resumed_from=None if resume is None else int(resume.state.step),
    )


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
    k_student, k_init, k_grow = jax.random.split(key, 3)
    student = make_student(splits, cfg, k_student) if student is None else student
    growth = _default_growth(cfg) if growth == "default" else growth
    assert growth is None or isinstance(growth, GrowthPolicy)
    out = None if out is None else Path(out)
    job = _Job(splits, cfg, out, on_iteration)
    job.baseline_at = dict(baseline_curve or [])
    job.pipeline_file = pipeline_file
    job.pipeline_sha256 = None if pipeline_file is None else _file_sha256(pipeline_file)
    if resume is not None:
        _restore(job, resume, growth)
    segments = _Segments(
        job=job,
        splits=splits,
        cfg=cfg,
        teacher=teacher,
        build=lambda num_teachers: build_engine(pipeline, splits, cfg, num_teachers),
        growth=growth,
        multipass=not isinstance(pipeline, Pipeline),
        k_grow=k_grow,
    )
    segments.use(segments.build(1 + len(job.teacher_models)))
    state = segments.engine.init(student, k_init) if resume is None else resume.state

    observers = [job, *observers]  # this run's observers (nothing is registered globally)
    checkpointed_model = [state.model]  # the architecture of the state being run (for metadata)
    if out is not None:
        checkpointer = ev3core.Checkpointer(
            out / "checkpoint",
            every=checkpoint_every,
            keep=keep,
            metadata=lambda: {
                "cli": {"experiment": "cifar" if cfg.dataset == "cifar" else "distill"},
                "distill": job.record(checkpointed_model[0], growth),
            },
        )
        observers.append(checkpointer)
        if resume is None:
            checkpointer.save(state)  # step 0: a run interrupted at once can still be resumed
    state = segments.run(state, plugins, observers, checkpointed_model)
    return _result(job, state, segments.engine, student, splits, resume)
