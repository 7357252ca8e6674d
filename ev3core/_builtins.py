"""The built-in plugin: ev3core's own components, registered like any third-party plugin."""

from __future__ import annotations

from typing import Any

from ._components import Accuracy, CrossEntropy, NegCrossEntropy
from ._proposers import GradientProposer
from ._schedulers import AlwaysAccept, EV3Scheduler
from .hookspecs import hookimpl


@hookimpl
def ev3_register_proposers() -> dict[str, type]:
    return {"gradient": GradientProposer}


@hookimpl
def ev3_register_assessors() -> dict[str, type]:
    return {"accuracy": Accuracy, "neg_cross_entropy": NegCrossEntropy}


@hookimpl
def ev3_register_schedulers() -> dict[str, type]:
    return {"ev3": EV3Scheduler, "always_accept": AlwaysAccept}


@hookimpl
def ev3_register_losses() -> dict[str, type]:
    return {"cross_entropy": CrossEntropy}


@hookimpl(trylast=True)
def ev3_explore(proposers: tuple[Any, ...]) -> tuple[Any, ...]:
    return proposers


@hookimpl(trylast=True)
def ev3_assess(assessors: tuple[Any, ...]) -> tuple[Any, ...]:
    return assessors


@hookimpl(trylast=True)
def ev3_adapt(scheduler: Any) -> Any:
    return scheduler
