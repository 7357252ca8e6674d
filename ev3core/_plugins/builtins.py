"""The built-in plugin: ev3core's own components, registered like any third-party plugin.

Their conformance examples live with the kit (`ev3core/testing/_examples.py`), which adds
them when it asks the plugins for examples: importing ev3core never imports the kit.
"""

from __future__ import annotations

from typing import Any

from .._adapt.bounds import BootstrapBound, NormalBound, PairedBound
from .._adapt.priorities import (
    EXP3Priority,
    Lexicographic,
    StallPriority,
    UCBPriority,
    WeightedChebyshev,
    WeightedSum,
)
from .._adapt.schedulers import AlwaysAccept, EV3Scheduler
from .._assess.metrics import AUC, F1Score, NegExpectedCalibrationError
from .._assess.scores import Accuracy, NegBrierScore, NegCrossEntropy
from .._explore.gradient import GradientProposer
from .._explore.losses import CrossEntropy
from ..hookspecs import hookimpl


@hookimpl
def ev3_register_proposers() -> dict[str, type]:
    return {"gradient": GradientProposer}


@hookimpl
def ev3_register_assessors() -> dict[str, type]:
    return {
        "accuracy": Accuracy,
        "neg_cross_entropy": NegCrossEntropy,
        "neg_brier": NegBrierScore,
        "f1": F1Score,
        "auc": AUC,
        "neg_ece": NegExpectedCalibrationError,
    }


@hookimpl
def ev3_register_schedulers() -> dict[str, type]:
    return {"ev3": EV3Scheduler, "always_accept": AlwaysAccept}


@hookimpl
def ev3_register_losses() -> dict[str, type]:
    return {"cross_entropy": CrossEntropy}


@hookimpl
def ev3_register_bounds() -> dict[str, type]:
    return {"normal": NormalBound, "paired": PairedBound, "bootstrap": BootstrapBound}


@hookimpl
def ev3_register_priorities() -> dict[str, type]:
    return {
        "lexicographic": Lexicographic,
        "weighted_sum": WeightedSum,
        "chebyshev": WeightedChebyshev,
        "stall": StallPriority,
        "ucb": UCBPriority,
        "exp3": EXP3Priority,
    }


@hookimpl(trylast=True)
def ev3_explore(proposers: tuple[Any, ...]) -> tuple[Any, ...]:
    return proposers


@hookimpl(trylast=True)
def ev3_assess(assessors: tuple[Any, ...]) -> tuple[Any, ...]:
    return assessors


@hookimpl(trylast=True)
def ev3_adapt(scheduler: Any) -> Any:
    return scheduler
