"""The built-in smoke experiment (issue #2): a linearly separable 2-D problem.

Data: 2 features from N(0, 1), label `[x . w >= 0]` for a fixed random `w`; separate
propose / assess / decide sets of 100,000 examples (and a held-out test set). Model: MLP
2 -> 8 (ReLU) -> 2. Six candidates: cross-entropy with temperatures {0.5, 1, 1.5} x
{SGD lr 0.1, SGD lr 0.01 with momentum 0.95}; trajectories of 100 steps of batch 32; assess
on 128 examples with alpha 0.5; decide on 2048 examples with alpha 4, with the reference
(unpaired normal) bound.
"""

from __future__ import annotations

import functools
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import optax
from jaxtyping import Array, PRNGKeyArray

from .._adapt.bounds import NormalBound
from .._adapt.schedulers import EV3Scheduler
from .._assess.scores import Accuracy, NegCrossEntropy
from .._explore.gradient import GradientProposer
from .._explore.losses import CrossEntropy
from .._plugins.pipeline import Pipeline
from .._types import Data

TEMPERATURES = (0.5, 1.0, 1.5)
NUM_EXAMPLES = 100_000


def smoke_data(key: PRNGKeyArray, n: int = NUM_EXAMPLES) -> tuple[Data, tuple[Array, Array]]:
    """`(Data, test_set)` for the smoke problem; every split is drawn independently."""
    return _smoke_data(key, int(n))


@functools.partial(jax.jit, static_argnums=1)  # one program, not one per operation
def _smoke_data(key: PRNGKeyArray, n: int) -> tuple[Data, tuple[Array, Array]]:
    kw, kp, ka, kd, kt = jax.random.split(key, 5)
    w = jax.random.normal(kw, (2,))

    def draw(k: PRNGKeyArray) -> tuple[Array, Array]:
        x = jax.random.normal(k, (n, 2))
        return x, (x @ w >= 0).astype(jnp.int32)

    return Data(propose=draw(kp), assess=draw(ka), decide=draw(kd)), draw(kt)


def smoke_model(key: PRNGKeyArray) -> Any:
    """MLP 2 -> 8 (ReLU) -> 2."""
    return _smoke_model(key)


@eqx.filter_jit  # one program, not one per operation
def _smoke_model(key: PRNGKeyArray) -> Any:
    return eqx.nn.MLP(2, 2, 8, 1, activation=jax.nn.relu, key=key)


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
