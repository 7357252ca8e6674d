"""The `distill` entry-point plugin: distillation losses and the `distill` experiment.

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


@hookimpl
def ev3_register_experiments() -> dict[str, Any]:
    return {"distill": _distill}


@hookimpl
def ev3_default_experiment() -> str:
    """Distillation is the main job `ev3 run` runs when this plugin is installed."""
    return "distill"
