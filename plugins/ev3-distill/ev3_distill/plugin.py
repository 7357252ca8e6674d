"""The `distill` entry-point plugin: distillation losses, the `distill` experiment, the `cifar`
experiment (the paper's, on a data directory) and the `value` experiment (the default of
`ev3 run`).

Found through the `ev3` entry-point group (`[project.entry-points.ev3] distill =
"ev3_distill.plugin"`); ev3core never imports it directly.
"""

from __future__ import annotations

from typing import Any

from ev3core import hookimpl

from ._losses import DistillLoss, LabelLoss


@hookimpl
def ev3_register_losses() -> dict[str, type]:
    return {"distill": DistillLoss, "label_ce": LabelLoss}


def _distill(**options: Any) -> dict[str, Any]:
    from ._experiment import distill_experiment  # heavy imports only when run

    return distill_experiment(**options)


_distill.__doc__ = (
    "Knowledge distillation with network growth (teacher, growing EV3 student, plain "
    "distillation baseline); writes metrics.jsonl, summary.json, report.png and a checkpoint."
)


def _cifar(**options: Any) -> dict[str, Any]:
    from ._experiment import cifar_experiment  # heavy imports only when run

    return cifar_experiment(**options)


_cifar.__doc__ = (
    "The paper's experiment: distillation into a growing ResNet-8 on CIFAR-10/100 read from "
    "--data DIR (array_record files, through grain) with precomputed teacher logits "
    "(--teacher-logits FILE, default DIR/teacher_logits.npy); the distill job's outputs."
)


def _value(**options: Any) -> dict[str, Any]:
    from ._value_experiment import value_experiment  # heavy imports only when run

    return value_experiment(**options)


_value.__doc__ = (
    "EV3 against grid and random search with early stopping, population-based training and "
    "plain training at equal total compute, on one scenario (--scenario: label noise from "
    "scratch or from a pretrained start, a worst-class target); writes summary.json and "
    "report.png."
)


@hookimpl
def ev3_register_experiments() -> dict[str, Any]:
    return {"distill": _distill, "cifar": _cifar, "value": _value}


@hookimpl
def ev3_default_experiment() -> str:
    """`ev3 run` with no arguments runs the equal-compute comparison (`value`)."""
    return "value"
