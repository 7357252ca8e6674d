"""The experiment's configuration and what it is built from: `DistillConfig`, the starting
student, the default EV3 pipeline, a user's pipeline file and the data streams."""

from __future__ import annotations

import dataclasses
import os
import runpy
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from ev3core import (
    Accuracy,
    Compose,
    Constraint,
    Data,
    EV3Scheduler,
    GradientProposer,
    HorizontalFlip,
    Lexicographic,
    NegCrossEntropy,
    Objective,
    Pipeline,
    RandomCrop,
    Reshaped,
    Stateful,
)
from ev3core._host.runfile import file_sha256
from ev3core.errors import ConfigurationError

from ._data import DATASETS, Splits
from ._growth import GrowthPolicy
from ._losses import DistillLoss, LabelLoss
from ._models import CNN, MLP
from ._resnet import make_resnet
from ._train import logits_of

#: The name a row gives each decision, by the engine's `Choice` name.
CHOICES = {"winner": "accepted", "current": "kept", "stable": "rolled_back"}


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

    dataset: str = "digits"  # "digits", "mnist1d", or "cifar" (images read from `data`)
    seed: int = 0
    steps: int = 30  # EV3 iterations
    trajectory: int = 100  # optimizer steps per candidate per iteration
    batch_size: int = 32
    # `GradientProposer(on_reject=...)`: "continue" (default) makes every candidate a lineage
    # that goes on from its own endpoint while nothing is accepted, so rejected trajectories
    # are not wasted; "copy" restarts every candidate from the current model each iteration.
    on_reject: str = "continue"
    # "mlp", "cnn", or "resnet" (image data: a ResNet-8 with stages of start_width,
    # 2 start_width and 4 start_width filters, grown while its widest stage stays within
    # max_width, then deepened while its depth, 6 s + 2, stays within max_depth).
    student: str = "mlp"
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
    # dataset="cifar": the data directory (`ev3_distill.write_array_record`), the teacher's
    # precomputed logits on its train split (default DATA/teacher_logits.npy), the fraction
    # of the train split held out for assess (40%) and decide (60%), and random crops
    # (padding 4) and horizontal flips of the propose batches.
    data: str | None = None
    teacher_logits: str | None = None
    holdout: float = 0.1
    augment: bool = False

    def __post_init__(self) -> None:
        if self.dataset not in (*DATASETS, "cifar"):
            raise ConfigurationError(
                f"dataset={self.dataset!r} is not one of {(*DATASETS, 'cifar')}; pass --dataset "
                "digits or --dataset mnist1d, or run --experiment cifar --data DIR."
            )
        if (self.dataset == "cifar") != (self.data is not None):
            raise ConfigurationError(
                "dataset='cifar' reads the directory given by --data DIR, and only it does: "
                f"got dataset={self.dataset!r} with data={self.data!r}. Run "
                "`ev3 run --experiment cifar --data DIR`."
            )
        if self.teacher_logits is not None and self.dataset != "cifar":
            raise ConfigurationError(
                f"teacher_logits={self.teacher_logits!r}: precomputed logits are read for an "
                f"image data directory (`ev3 run --experiment cifar --data DIR`); the "
                f"{self.dataset} experiment trains its own teacher."
            )
        if self.student not in ("mlp", "cnn", "resnet"):
            raise ConfigurationError(f"student={self.student!r}: use 'mlp', 'cnn' or 'resnet'.")
        if self.student == "resnet" and self.dataset != "cifar":
            raise ConfigurationError(
                f"student='resnet' needs image data (dataset='cifar'), not {self.dataset!r}."
            )
        if self.augment and self.dataset != "cifar":
            raise ConfigurationError(
                f"augment=True crops and flips images; dataset={self.dataset!r} has none."
            )
        if self.student == "resnet" and self.baseline:
            raise ConfigurationError(
                "the plain-distillation baseline trains an MLP or CNN student; with "
                "student='resnet' set baseline=False."
            )
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


def make_student(splits: Splits, cfg: DistillConfig, key: jax.Array, widths=None) -> Any:
    """The starting student (`start_width` units, one hidden layer), or one with `widths`;
    `student="resnet"`: `ev3core.Stateful` of a ResNet-8 with stages of `start_width`,
    `2 start_width` and `4 start_width` filters (or `widths`)."""
    if cfg.student == "resnet":
        w = cfg.start_width
        widths = (w, 2 * w, 4 * w) if widths is None else tuple(widths)
        return Stateful(*make_resnet(splits.in_shape, splits.num_classes, 8, widths, key=key))
    widths = (cfg.start_width,) if widths is None else tuple(widths)
    if cfg.student == "mlp":
        return MLP(splits.in_features, splits.num_classes, widths, key=key)
    return CNN(splits.in_shape, splits.num_classes, widths, key=key)


def image_augment(in_shape: tuple[int, ...]) -> Reshaped:
    """Random crops (padding 4) and horizontal flips of flat stored images of `in_shape`
    `(height, width, channels)`: the standard CIFAR augmentation."""
    return Reshaped(Compose([RandomCrop(4), HorizontalFlip()]), in_shape)


def default_pipeline(
    num_teachers: int,
    cfg: DistillConfig,
    *,
    assess_size: int,
    decide_size: int,
    augment: Any = None,
) -> Pipeline:
    """The EV3 distillation pipeline for `num_teachers` teacher-logit columns.

    Losses: the label loss, and for teacher 0 every (temperature, weight) pair; later teachers
    (archived students) get one family each over the temperatures at the largest weight.
    Optimizers: Adam at each learning rate. Assessors: accuracy and negative cross-entropy.
    With `cfg.decide_on == "nll"` (default) the held-out log-likelihood decides (the paired
    bound makes this continuous score far more powerful than accuracy), under
    `Constraint("accuracy", max_drop=cfg.accuracy_max_drop)`; with `"lexicographic"`,
    accuracy first and, with `cfg.tie_break`, log-likelihood (`ev3core.Lexicographic`).
    `augment` (an `ev3core.AbstractAugment`, e.g. `image_augment(in_shape)`) transforms the
    propose batches' inputs.
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
                augment=augment,
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

    The file must define `pipeline`: an `ev3core.Pipeline`, a function
    `pipeline(num_teachers, config) -> Pipeline`, or `None` (the built-in pipeline, with the
    file's `config`, `student` and `growth`). It may define `student(key, splits)`
    returning the starting student, `growth` (a `GrowthPolicy`, or `None` for a fixed size)
    and `config` (a dict of `DistillConfig` fields). Every name is checked here, before any
    training starts.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigurationError(f"pipeline file {str(path)!r} does not exist.")
    namespace = runpy.run_path(str(path))
    where = f"pipeline file {str(path)!r}"
    if "pipeline" not in namespace:
        raise ConfigurationError(
            f"{where} defines no `pipeline`. Define `pipeline = "
            "ev3core.Pipeline(...)`, `def pipeline(num_teachers, config): ...`, or "
            "`pipeline = None` for the built-in pipeline."
        )
    pipe = namespace["pipeline"]
    if pipe is not None and not isinstance(pipe, Pipeline) and not callable(pipe):
        raise ConfigurationError(
            f"{where}: `pipeline` is {type(pipe).__name__} {pipe!r}; it must be an "
            "ev3core.Pipeline or a function `pipeline(num_teachers, config) -> Pipeline`."
        )
    if "student" in namespace and not callable(namespace["student"]):
        raise ConfigurationError(
            f"{where}: `student` must be a function `student(key, splits) -> model`, got "
            f"{type(namespace['student']).__name__}."
        )
    growth = namespace.get("growth", None)
    if growth is not None and not isinstance(growth, GrowthPolicy):
        raise ConfigurationError(
            f"{where}: `growth` must be a GrowthPolicy or None, got {type(growth).__name__}."
        )
    config = namespace.get("config", {})
    fields = {f.name for f in dataclasses.fields(DistillConfig)}
    if not isinstance(config, dict) or set(config) - fields:
        raise ConfigurationError(
            f"{where}: `config` must be a dict of DistillConfig fields; got "
            + (
                f"unknown field(s) {sorted(set(config) - fields)}"
                if isinstance(config, dict)
                else type(config).__name__
            )
            + f". Fields: {sorted(fields)}."
        )
    if pipe is not None and not isinstance(pipe, Pipeline):
        built = pipe(1, DistillConfig(**config))
        if not isinstance(built, Pipeline):
            raise ConfigurationError(
                f"{where}: `pipeline(num_teachers, config)` returned {type(built).__name__}; "
                "it must return an ev3core.Pipeline."
            )
    return namespace


_file_sha256 = file_sha256  # the SHA-256 that `ev3 run FILE --resume DIR` checks


def _inside(directory: Path, name: Any) -> Path:
    """`directory / name` for a relative `name` recorded in a checkpoint; a path that would
    leave the run directory (absolute, `..`, a link out) is an error, never followed."""
    from ev3core.errors import CheckpointError

    base = directory.resolve()
    target = (directory / str(name)).resolve()
    if not isinstance(name, str) or Path(name).is_absolute() or not target.is_relative_to(base):
        raise CheckpointError(
            f"the checkpoint names the file {name!r}, which is outside the run directory "
            f"{directory}; the run directory was edited. Restore it or start a new run."
        )
    return target


def _teacher_columns(teachers: list[Any], x: jax.Array) -> jax.Array:
    """`[n, teachers, classes]`: each teacher's logits on `x`; a teacher given as an array
    is its precomputed logits on `x`."""
    return jnp.stack(
        [
            jnp.asarray(t) if isinstance(t, np.ndarray | jax.Array) else logits_of(t, x)
            for t in teachers
        ],
        axis=1,
    )


def _make_data(splits: Splits, teachers: list[Any]) -> Data:
    x = jnp.asarray(splits.train.x)
    return Data(
        propose=(x, jnp.asarray(splits.train.y), _teacher_columns(teachers, x)),
        assess=(jnp.asarray(splits.assess.x), jnp.asarray(splits.assess.y)),
        decide=(jnp.asarray(splits.decide.x), jnp.asarray(splits.decide.y)),
    )
