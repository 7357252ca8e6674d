"""The built-in smoke pipeline (issue #2) on the toy problem (`ev3core.toy_problem`).

Six candidates: cross-entropy with temperatures {0.5, 1, 1.5} x
{SGD lr 0.1, SGD lr 0.01 with momentum 0.95}; trajectories of 100 steps of batch 32; assess
on 128 examples with alpha 0.5; decide on 2048 examples with alpha 4, with the reference
(unpaired normal) bound.
"""

from __future__ import annotations

from typing import Any

import optax

from .._adapt.bounds import NormalBound
from .._adapt.schedulers import EV3Scheduler
from .._assess.scores import Accuracy, NegCrossEntropy
from .._explore.gradient import GradientProposer
from .._explore.losses import CrossEntropy
from .._plugins.pipeline import Pipeline

TEMPERATURES = (0.5, 1.0, 1.5)


def smoke_optimizers() -> tuple[optax.GradientTransformation, ...]:
    return (optax.sgd(0.1), optax.sgd(0.01, momentum=0.95))


def smoke_pipeline(**overrides: Any) -> Pipeline:
    """The smoke pipeline; keyword arguments override `Pipeline` arguments."""
    kwargs: dict[str, Any] = dict(
        proposers=[
            GradientProposer(
                losses=[CrossEntropy(t) for t in TEMPERATURES],
                optimizers=smoke_optimizers(),
                steps=100,
                batch_size=32,
                optimizer_names=("sgd0.1", "sgd0.01m0.95"),
            )
        ],
        assessors=[Accuracy(), NegCrossEntropy()],
        # Issue #2 defines the smoke experiment with the reference EV3 rule (mean - alpha *
        # stderr, unpaired); the library default is the paired bound (docs/statistics.md).
        scheduler=EV3Scheduler(assess_alpha=0.5, decide_alpha=4.0, bound=NormalBound()),
        assess_size=128,
        decide_size=2048,
    )
    kwargs.update(overrides)
    return Pipeline(**kwargs)
