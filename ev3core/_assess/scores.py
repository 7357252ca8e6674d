"""Built-in per-example assessors (assess stage)."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax
from jaxtyping import Array, Float, PyTree

from .._interfaces import AbstractAssessor
from .._types import _logits


class Accuracy(AbstractAssessor):
    """Per-example top-1 accuracy (1.0 or 0.0) of a classifier on `(x, y)` batches.

    Not differentiable: it takes an argmax.
    """

    direction = "max"  # higher scores are better

    @property
    def name(self) -> str:
        return "accuracy"

    def __call__(self, model: Any, batch: PyTree[Array]) -> Float[Array, " example"]:
        x, y = batch
        pred = jnp.argmax(_logits(model, x), axis=-1)
        return (pred == y).astype(jnp.float32)


class NegCrossEntropy(AbstractAssessor):
    """Per-example negative cross-entropy (log-likelihood of the true label), higher is better."""

    direction = "max"  # higher scores are better

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

    direction = "max"  # higher scores are better

    @property
    def name(self) -> str:
        return "neg_brier"

    def __call__(self, model: Any, batch: PyTree[Array]) -> Float[Array, " example"]:
        x, y = batch
        logits = _logits(model, x)
        p = jax.nn.softmax(logits, axis=-1)
        onehot = jax.nn.one_hot(y, logits.shape[-1], dtype=p.dtype)
        return -jnp.sum((p - onehot) ** 2, axis=-1)
