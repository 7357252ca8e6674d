"""The distillation experiment behind `ev3 run`.

1. Train a teacher on the train split (digits: an MLP 64-256-256-10; MNIST-1D: a 1-D CNN).
2. Distil into a student that starts tiny and grows, with EV3: candidates are short optax
   trajectories over a grid of distillation losses (temperatures x mixing weights, one
   family per teacher) plus the label loss, times optimizers; accuracy on the assess split
   picks the winner, accuracy on the decide split accepts or rejects it; after `patience`
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
import os
import runpy
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax

from ev3core import Accuracy, Data, EV3Scheduler, GradientProposer, Pipeline
from ev3core.errors import ConfigurationError

from ._data import DATASETS, Splits, load_dataset
from ._growth import GrowthPolicy, StudentArchive, grow_state
from ._losses import DistillLoss, LabelLoss
from ._models import CNN, MLP, count_params
from ._train import accuracy, logits_of, shift_augmented_loss, train

logger = logging.getLogger("ev3_distill")

CHOICES = {0: "accepted", 1: "kept", 2: "rolled_back"}


@dataclasses.dataclass
class DistillConfig:
    """Every option of the distillation experiment (defaults: `ev3 run` with no arguments).

    The gradient-step budget is `steps * trajectory`: each EV3 iteration moves the student
    along one accepted (or no) trajectory of `trajectory` optimizer steps, and the baselines
    get the same number of optimizer steps. (EV3 also spends `K - 1` rejected trajectories
    per iteration; `summary.json` reports the total as `ev3_gradient_evaluations`.)
    """

    dataset: str = "digits"
    seed: int = 0
    steps: int = 60  # EV3 iterations
    trajectory: int = 50  # optimizer steps per candidate per iteration
    batch_size: int = 32
    student: str = "mlp"  # "mlp" or "cnn"
    start_width: int = 4
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
    Optimizers: Adam at each learning rate.
    """
    losses: list[Any] = [LabelLoss()]
    for t in cfg.temperatures:
        for w in cfg.weights:
            losses.append(DistillLoss(t, w, teacher=0, teacher_name="teacher"))
    for j in range(1, num_teachers):
        for t in cfg.temperatures:
            losses.append(DistillLoss(t, max(cfg.weights), teacher=j, teacher_name=f"student{j}"))
    return Pipeline(
        proposers=[
            GradientProposer(
                losses=losses,
                optimizers=[optax.adam(lr) for lr in cfg.learning_rates],
                steps=cfg.trajectory,
                batch_size=cfg.batch_size,
                optimizer_names=[f"adam{lr:g}" for lr in cfg.learning_rates],
            )
        ],
        assessors=[Accuracy()],
        scheduler=EV3Scheduler(assess_alpha=cfg.assess_alpha, decide_alpha=cfg.decide_alpha),
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
) -> EV3Result:
    """EV3 distillation with growth and multi-pass teachers; one metrics row per iteration."""
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

    teachers = [teacher]
    data = _make_data(splits, teachers)
    engine = build(1)
    engine.check_data(data)
    state = engine.init(student, k_init)
    labels = engine.labels()
    archive = StudentArchive()
    counts = {"accepted": 0, "kept": 0, "rolled_back": 0, "significant": 0, "grown": 0}
    metrics: list[dict[str, Any]] = []
    growth_events: list[dict[str, Any]] = []
    start_params = count_params(student)
    start_test = accuracy(student, splits.test.x, splits.test.y)
    pass_len = -(-cfg.steps // cfg.passes)
    t0 = time.perf_counter()
    current_pass = 1
    evaluations = 0
    for it in range(cfg.steps):
        if it > 0 and it % pass_len == 0 and not isinstance(pipeline, Pipeline):
            # A new pass: the best archived students join as extra teachers.
            current_pass += 1
            extra = [m for _, _, m in archive.best(cfg.extra_teachers)]
            teachers = [teacher, *extra]
            data = _make_data(splits, teachers)
            engine = build(len(teachers))
            engine.check_data(data)
            labels = engine.labels()
            state = grow_state(engine, state, state.model, state.stable_model)
            logger.info("ev3_distill: pass %d with %d teacher(s)", current_pass, len(teachers))
        state, info = engine.step(state, data)
        info = jax.device_get(info)
        evaluations += sum(p.num_candidates * getattr(p, "steps", 0) for p in engine.proposers)
        choice = int(info.choice)
        counts[CHOICES[choice]] += 1
        counts["significant"] += bool(info.significant)
        model = state.model
        decide_full = accuracy(model, splits.decide.x, splits.decide.y)
        test_acc = accuracy(model, splits.test.x, splits.test.y)
        archive.offer(model, decide_full)
        row: dict[str, Any] = {
            "iteration": it + 1,
            "gradient_steps": (it + 1) * cfg.trajectory,
            "pass": current_pass,
            "choice": CHOICES[choice],
            "accepted": bool(info.accepted),
            "rolled_back": bool(info.rolled_back),
            "significant": bool(info.significant),
            "winner": labels[int(info.winner)],
            "num_invalid": int(info.num_invalid),
            "decide_accuracy": float(np.asarray(info.decide_mean)[0, choice]),
            "decide_accuracy_full": decide_full,
            "test_accuracy": test_acc,
            "student_params": count_params(model),
            "student_widths": list(getattr(model, "widths", ())),
            "grown": None,
            "wall_seconds": time.perf_counter() - t0,
        }
        if growth is not None:
            k_grow, sub = jax.random.split(k_grow)
            state, op = growth.maybe_grow(engine, state, sub)
            if op is not None:
                counts["grown"] += 1
                row["grown"] = op
                row["student_params_after"] = count_params(state.model)
                growth_events.append(
                    {
                        "iteration": it + 1,
                        "gradient_steps": row["gradient_steps"],
                        "op": op,
                        "params": row["student_params_after"],
                    }
                )
                logger.info("ev3_distill: %s at iteration %d", op, it + 1)
        metrics.append(row)
        if on_iteration is not None:
            on_iteration(row, counts)
    return EV3Result(
        state=state,
        engine=engine,
        metrics=metrics,
        growth=growth_events,
        archive=archive,
        counts=counts,
        start_params=start_params,
        start_test_accuracy=start_test,
        gradient_evaluations=evaluations,
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
    model = train(
        model,
        loss,
        optax.adam(cfg.baseline_learning_rate),
        data,
        steps=cfg.steps * cfg.trajectory,
        batch_size=cfg.batch_size,
        key=k_train,
        eval_every=cfg.trajectory,
        on_eval=lambda done, m: curve.append((done, accuracy(m, splits.test.x, splits.test.y))),
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
    ax2.set_xlabel("gradient steps (along the accepted trajectory)")
    ax2.legend(loc="lower right", fontsize=8)
    ax2.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _save_final(out: Path, state: Any, engine: Any, cfg: DistillConfig) -> str:
    model = state.model
    meta = {
        "experiment": "distill",
        "config": dataclasses.asdict(cfg),
        "architecture": model.describe() if hasattr(model, "describe") else None,
        "labels": list(engine.labels()),
    }
    eqx.tree_serialise_leaves(out / "student.eqx", model)
    try:
        from ev3core import save_checkpoint
    except ImportError:  # older ev3core without checkpoints
        save_checkpoint = None
    if save_checkpoint is not None:
        save_checkpoint(out / "checkpoint", state, metadata=meta, keep=1)
        return "checkpoint"
    eqx.tree_serialise_leaves(out / "checkpoint.eqx", state)
    return "checkpoint.eqx"


class _Bar:
    def __init__(self, total: int, enabled: bool):
        self.bar = None
        if enabled:
            from tqdm.auto import tqdm

            self.bar = tqdm(
                total=total, desc="EV3 distill", unit="it", file=sys.stderr, dynamic_ncols=True
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
def distill_experiment(
    *,
    steps: int | None = None,
    seed: int = 0,
    out: str | os.PathLike[str] | None = None,
    dataset: str | None = None,
    pipeline: str | os.PathLike[str] | None = None,
    progress: bool = True,
    **options: Any,
) -> dict[str, Any]:
    """Run the distillation job and write its outputs; returns the summary.

    **Arguments:**

    - `steps`: EV3 iterations (default 60; each is `trajectory` = 50 gradient steps).
    - `seed`: seeds the splits, the teacher, the students and EV3.
    - `out`: output directory (default `runs/<UTC timestamp>/`).
    - `dataset`: `"digits"` (default) or `"mnist1d"`.
    - `pipeline`: path of a user's pipeline file (see `load_pipeline_file`).
    - `progress`: show a progress bar on stderr.
    - `options`: any other `DistillConfig` field (unknown names are an error).
    """
    t_start = time.perf_counter()
    user: dict[str, Any] = {}
    if pipeline is not None:
        user = load_pipeline_file(pipeline)
    fields = {f.name for f in dataclasses.fields(DistillConfig)}
    unknown = sorted(set(options) - fields)
    if unknown:
        raise ConfigurationError(
            f"distill experiment: unknown option(s) {unknown}; known: {sorted(fields)}."
        )
    cfg_kwargs = {**user.get("config", {}), **{k: v for k, v in options.items() if v is not None}}
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
    out.mkdir(parents=True, exist_ok=True)

    key = jax.random.key(cfg.seed)
    k_teacher, k_ev3, k_base = jax.random.split(key, 3)
    splits = load_dataset(cfg.dataset, cfg.seed)
    say = (lambda msg: print(msg, file=sys.stderr, flush=True)) if progress else (lambda m: None)
    say(
        f"ev3 run: distillation on {cfg.dataset} {splits.sizes()}, seed {cfg.seed}, "
        f"{cfg.steps} EV3 iterations x {cfg.trajectory} gradient steps -> {out}"
    )

    t = time.perf_counter()
    teacher = train_teacher(splits, k_teacher, cfg.teacher_steps)
    teacher_acc = accuracy(teacher, splits.test.x, splits.test.y)
    teacher_time = time.perf_counter() - t
    say(
        f"teacher: {count_params(teacher)} parameters, test accuracy {teacher_acc:.4f} "
        f"({teacher_time:.1f} s)"
    )

    baseline_model, baseline_curve, baseline_time = None, [], 0.0
    if cfg.baseline:
        t = time.perf_counter()
        baseline_model, baseline_curve = run_baseline(splits, teacher, cfg, k_base)
        baseline_time = time.perf_counter() - t
        say(
            f"plain distillation baseline: test accuracy {baseline_curve[-1][1]:.4f} "
            f"({baseline_time:.1f} s)"
        )

    bar = _Bar(cfg.steps, progress)
    growth: Any = user.get("growth", "default")
    student = None
    if "student" in user:
        student = user["student"](jax.random.fold_in(k_ev3, 1), splits)
    t = time.perf_counter()
    try:
        result = run_ev3(
            splits,
            teacher,
            cfg,
            k_ev3,
            pipeline=user.get("pipeline"),
            student=student,
            growth=growth,
            on_iteration=bar,
        )
    finally:
        bar.close()
    ev3_time = time.perf_counter() - t
    final = result.state.model
    ev3_acc = accuracy(final, splits.test.x, splits.test.y)

    base_at = dict(baseline_curve)
    with open(out / "metrics.jsonl", "w") as f:
        for row in result.metrics:
            row = dict(row)
            row["baseline_test_accuracy"] = base_at.get(row["gradient_steps"])
            f.write(json.dumps(row) + "\n")
    ckpt = _save_final(out, result.state, result.engine, cfg)
    K = result.engine.num_candidates
    summary = {
        "experiment": "distill",
        "dataset": cfg.dataset,
        "seed": cfg.seed,
        "splits": splits.sizes(),
        "ev3_iterations": cfg.steps,
        "gradient_steps": cfg.steps * cfg.trajectory,
        "ev3_gradient_evaluations": result.gradient_evaluations,
        "teacher": {
            "test_accuracy": teacher_acc,
            "params": count_params(teacher),
            "architecture": teacher.describe(),
            "wall_seconds": teacher_time,
        },
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
            "wall_seconds": ev3_time,
        },
        "baseline_student": None
        if baseline_model is None
        else {
            "method": f"plain distillation: DistillLoss(T={cfg.baseline_temperature:g}, "
            f"w={cfg.baseline_weight:g}), adam({cfg.baseline_learning_rate:g}), fixed size",
            "test_accuracy": baseline_curve[-1][1],
            "params": count_params(baseline_model),
            "architecture": baseline_model.describe(),
            "wall_seconds": baseline_time,
        },
        "checkpoint": ckpt,
        "wall_seconds": time.perf_counter() - t_start,
    }
    with open(out / "summary.json", "w") as f:
        json.dump(summary, f, indent=2)
    write_report(
        out / "report.png",
        result.metrics,
        baseline_curve,
        baseline_params=None if baseline_model is None else count_params(baseline_model),
        teacher_accuracy=teacher_acc,
        title=f"EV3 distillation on {cfg.dataset} (seed {cfg.seed}): EV3 {ev3_acc:.3f}"
        + ("" if baseline_model is None else f", baseline {baseline_curve[-1][1]:.3f}")
        + f", teacher {teacher_acc:.3f}",
    )
    summary["out"] = str(out)
    return summary
