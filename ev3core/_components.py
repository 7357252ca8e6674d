"""Built-in losses and assessors."""

from __future__ import annotations

from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import optax
from jaxtyping import Array, Float, PRNGKeyArray, PyTree, Scalar

from ._interfaces import AbstractAssessor, AbstractLoss


def _as_float_array(x: Any) -> Float[Array, ""]:
    return jnp.asarray(x, dtype=jnp.float32)


def _logits(model: Any, x: Array) -> Float[Array, "example class"]:
    return jax.vmap(model)(x)


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

    temperature: Float[Array, ""] = eqx.field(converter=_as_float_array, default=1.0)

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


class Accuracy(AbstractAssessor):
    """Per-example top-1 accuracy (1.0 or 0.0) of a classifier on `(x, y)` batches.

    Not differentiable: it takes an argmax.
    """

    @property
    def name(self) -> str:
        return "accuracy"

    def __call__(self, model: Any, batch: PyTree[Array]) -> Float[Array, " example"]:
        x, y = batch
        pred = jnp.argmax(_logits(model, x), axis=-1)
        return (pred == y).astype(jnp.float32)


class NegCrossEntropy(AbstractAssessor):
    """Per-example negative cross-entropy (log-likelihood of the true label), higher is better."""

    @property
    def name(self) -> str:
        return "neg_cross_entropy"

    def __call__(self, model: Any, batch: PyTree[Array]) -> Float[Array, " example"]:
        x, y = batch
        return -optax.softmax_cross_entropy_with_integer_labels(_logits(model, x), y)


class NegBrierScore(AbstractAssessor):
    """Per-example negative Brier score, higher is better.

    `-sum_c (softmax(logits)_c - onehot(y)_c)^2`, in `[-2, 0]`. A proper scoring rule like
    the log-likelihood, continuous (so a paired bound has far more power on it than on
    accuracy), but bounded: one confidently wrong example costs at most 2, where its
    log-likelihood is unbounded. Decisions on it therefore follow accuracy more closely than
    decisions on the log-likelihood once a model grows overconfident.
    """

    @property
    def name(self) -> str:
        return "neg_brier"

    def __call__(self, model: Any, batch: PyTree[Array]) -> Float[Array, " example"]:
        x, y = batch
        logits = _logits(model, x)
        p = jax.nn.softmax(logits, axis=-1)
        onehot = jax.nn.one_hot(y, logits.shape[-1], dtype=p.dtype)
        return -jnp.sum((p - onehot) ** 2, axis=-1)
