"""Built-in training losses (explore stage)."""

from __future__ import annotations

from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import optax
from jaxtyping import Array, Float, PRNGKeyArray, PyTree, Scalar

from .._interfaces import AbstractLoss
from .._types import _as_float_array, _logits


class CrossEntropy(AbstractLoss):
    """Softmax cross-entropy on integer labels, with the logits multiplied by `temperature`.

    The batch is a pair `(x, y)` with integer class labels `y`.

    **Arguments:**

    - `temperature`: multiplies the logits before the softmax (an array leaf: changing it
      never recompiles).

    ```python
    loss = CrossEntropy(temperature=0.5)
    ```
    """

    temperature: Float[Array, ""] | float = eqx.field(converter=_as_float_array, default=1.0)

    def __call__(self, model: Any, batch: PyTree[Array], key: PRNGKeyArray) -> Scalar:
        del key
        x, y = batch
        logits = _logits(model, x) * self.temperature
        return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, y))

    @property
    def label(self) -> str:
        try:
            return f"ce(T={float(self.temperature):g})"
        except (TypeError, jax.errors.ConcretizationTypeError):  # traced
            return "ce"
