"""The kit's default problem: a model, data and reference models to check components on."""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp

from .._assess.scores import Accuracy, NegCrossEntropy
from .._types import Data


# --------------------------------------------------------------------------- the problem
class _Linear(eqx.Module):
    weight: jax.Array

    def __call__(self, x: jax.Array) -> jax.Array:
        return x @ self.weight


@dataclasses.dataclass(frozen=True)
class Problem:
    """A model, data and reference models to check components on.

    **Arguments:**

    - `model`: an Equinox model called on one example (its array leaves are the parameters).
    - `data`: an `ev3core.Data` whose streams fit `model`.
    - `good_model`, `bad_model`: two models of the same task, the first clearly better (used
      by the `"convention"` checks of assessors and losses; `None` skips those).
    - `assessors`: assessors that can score `model` on `data`, for the engine-level checks of
      proposers and schedulers (a scheduler with `num_objectives=m` uses the first `m`).
    """

    model: Any
    data: Data
    good_model: Any = None
    bad_model: Any = None
    assessors: tuple[Any, ...] = ()


def default_problem(
    seed: int = 0, *, num_features: int = 16, num_classes: int = 4, num_examples: int = 256
) -> Problem:
    """A small synthetic classification problem: features `x ~ N(0, I)`, label
    `argmax(x @ W)` for a fixed random `W`, and a one-hidden-layer MLP (width 16).

    The streams are `(x, y)` pairs of `num_examples` examples each. The good model is the
    exact linear rule (scaled, so it is confident and right), the bad model its negation
    (confident and always wrong). The assessors are negative cross-entropy and accuracy.
    """
    kw, km, kp, ka, kd = jax.random.split(jax.random.key(seed), 5)
    w = jax.random.normal(kw, (num_features, num_classes), jnp.float32)

    def draw(k: Any) -> tuple[jax.Array, jax.Array]:
        x = jax.random.normal(k, (num_examples, num_features), jnp.float32)
        return x, jnp.argmax(x @ w, axis=-1).astype(jnp.int32)

    return Problem(
        model=eqx.nn.MLP(num_features, num_classes, 16, 1, key=km),
        data=Data(propose=draw(kp), assess=draw(ka), decide=draw(kd)),
        good_model=_Linear(w * 10.0),
        bad_model=_Linear(w * -10.0),
        assessors=(NegCrossEntropy(), Accuracy()),
    )


@functools.cache
def _default() -> Problem:
    return default_problem()


def _problem(problem: Problem | None) -> Problem:
    return _default() if problem is None else problem


def _cast(tree: Any, dtype: Any) -> Any:
    """Every floating array leaf of `tree` as `dtype` (integers, keys and the rest as they are)."""
    return jax.tree.map(
        lambda x: (
            x.astype(dtype) if eqx.is_array(x) and jnp.issubdtype(x.dtype, jnp.floating) else x
        ),
        tree,
    )


def _in_dtype(problem: Problem, dtype: Any) -> Problem:
    """The problem with the model's parameters and the data's features in `dtype`."""
    return dataclasses.replace(
        problem,
        model=_cast(problem.model, dtype),
        data=_cast(problem.data, dtype),
        good_model=_cast(problem.good_model, dtype),
        bad_model=_cast(problem.bad_model, dtype),
    )


#: The low-precision dtypes the `"dtype"` check runs proposers, assessors and losses in.
LOW_PRECISION = (jnp.bfloat16, jnp.float16)
