"""The kit's default problem: a model, data and reference models to check components on."""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from .._assess.scores import Accuracy, NegCrossEntropy
from .._stateful import Stateful
from .._types import Data
from ._checker import _filter_jit


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
    model, good, bad, data = _problem_arrays(
        jax.random.key(seed), num_features, num_classes, num_examples
    )
    return Problem(
        model=model,
        data=data,
        good_model=_Linear(good),
        bad_model=_Linear(bad),
        assessors=(NegCrossEntropy(), Accuracy()),
    )


@_filter_jit
def _problem_arrays(
    key: Any, num_features: int, num_classes: int, num_examples: int
) -> tuple[Any, jax.Array, jax.Array, Data]:
    """`default_problem`'s model, the weights of its good and bad rules and its data, built in one
    compiled program (compiled cheaply, as the kit's own programs are): a check in a fresh
    process compiles that one program instead of one per random draw and per layer."""
    kz, km = jax.random.split(key)
    # One draw for the rule and the three streams: each random draw compiles on its own.
    F, C, N = num_features, num_classes, num_examples
    z = jax.random.normal(kz, (F * C + 3 * N * F,), jnp.float32)
    w = z[: F * C].reshape(F, C)

    def stream(x: jax.Array) -> tuple[jax.Array, jax.Array]:
        return x, jnp.argmax(x @ w, axis=-1).astype(jnp.int32)

    xs = z[F * C :].reshape(3, N, F)
    model = eqx.nn.MLP(F, C, 16, 1, key=km)
    data = Data(propose=stream(xs[0]), assess=stream(xs[1]), decide=stream(xs[2]))
    return model, w * 10.0, w * -10.0, data


class _BatchNormMLP(eqx.Module):
    """Linear - BatchNorm - ReLU - Dropout - Linear, called the Equinox way
    (`model(x, state, *, key) -> (y, state)`)."""

    first: eqx.nn.Linear
    norm: eqx.nn.BatchNorm
    drop: eqx.nn.Dropout
    last: eqx.nn.Linear

    def __init__(self, num_features: int, num_classes: int, width: int, *, key: Any):
        k1, k2 = jax.random.split(key)
        self.first = eqx.nn.Linear(num_features, width, key=k1)
        self.norm = eqx.nn.BatchNorm(width, "batch", momentum=0.9, mode="ema")
        self.drop = eqx.nn.Dropout(0.1)
        self.last = eqx.nn.Linear(width, num_classes, key=k2)

    def __call__(self, x: jax.Array, state: eqx.nn.State, *, key: Any = None) -> Any:
        h, state = self.norm(self.first(x), state)
        return self.last(self.drop(jax.nn.relu(h), key=key)), state


def stateful_problem(seed: int = 0, **kwargs: Any) -> Problem:
    """`default_problem` with a model that has BatchNorm state and dropout
    (`ev3core.Stateful`): proposers must train it in training mode and carry its running
    statistics in their candidates; assessors score it in inference mode. Pass it as
    `problem=` to `check_proposer` / `check_assessor`; first-party proposers and assessors
    are checked on it."""
    base = default_problem(seed, **kwargs)
    num_features = base.data.propose[0].shape[-1]
    num_classes = base.good_model.weight.shape[-1]
    model, state = eqx.nn.make_with_state(_BatchNormMLP)(
        num_features, num_classes, 16, key=jax.random.key(seed + 1)
    )
    return dataclasses.replace(base, model=Stateful(model, state))


@functools.cache
def _default() -> Problem:
    return default_problem()


def _problem(problem: Problem | None) -> Problem:
    return _default() if problem is None else problem


def _cast(tree: Any, dtype: Any) -> Any:
    """Every floating array leaf of `tree` as `dtype` (integers, keys and the rest as they are).

    Cast on the host (NumPy rounds to nearest even, as XLA does): casting on the device would
    compile one program per leaf shape and dtype."""
    return jax.tree.map(
        lambda x: (
            jax.device_put(np.asarray(x).astype(dtype))
            if eqx.is_array(x) and jnp.issubdtype(x.dtype, jnp.floating)
            else x
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
