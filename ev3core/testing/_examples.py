"""Conformance-kit examples of ev3core's built-in components whose constructors need
arguments, or that have settings worth checking separately.

`ev3_conformance_examples` here is the built-in answer to the hook of that name: the kit
adds it to every plugin manager's answers when it collects examples (`examples()`), so the
core's built-in plugin never imports the kit."""

from __future__ import annotations

from typing import Any

import optax

from .._adapt.bounds import BootstrapBound, NormalBound
from .._adapt.priorities import WeightedChebyshev, WeightedSum
from .._adapt.schedulers import AlwaysAccept, EV3Scheduler
from .._explore.gradient import GradientProposer
from .._explore.losses import CrossEntropy
from ._example import Example


def _gradient() -> list[Any]:
    losses = [CrossEntropy(1.0), CrossEntropy(0.5)]
    return [
        GradientProposer(losses=losses, optimizers=[optax.sgd(0.1)], steps=2, batch_size=8),
        # growth and a non-default reject policy: state that changes between steps
        GradientProposer(
            losses=losses[:1],
            optimizers=[optax.sgd(0.1), optax.sgd(0.05, momentum=0.9)],
            steps=1,
            max_steps=2,
            batch_size=8,
            on_reject="reset",
        ),
        # lineages that continue through rejections: parameters in the proposer state
        GradientProposer(
            losses=losses,
            optimizers=[optax.sgd(0.05, momentum=0.9)],
            steps=2,
            batch_size=8,
            on_reject="continue",
        ),
    ]


def _ev3() -> list[Any]:
    return [
        EV3Scheduler(),
        Example(EV3Scheduler(bound=NormalBound()), num_objectives=2),
    ]


def ev3_conformance_examples(kind: str, name: str, cls: type) -> list[Any] | None:
    if kind == "proposer" and cls is GradientProposer:
        return _gradient()
    if kind == "scheduler" and cls is EV3Scheduler:
        return _ev3()
    if kind == "scheduler" and cls is AlwaysAccept:
        return [Example(AlwaysAccept(), safe=False)]  # accepts every valid winner by design
    if kind == "bound" and cls is BootstrapBound:
        return [BootstrapBound(num_resamples=200, method="normal")]
    if kind == "priority" and cls is WeightedSum:
        return [WeightedSum([0.5, 0.5])]
    if kind == "priority" and cls is WeightedChebyshev:
        return [WeightedChebyshev([0.7, 0.3])]
    return None
