"""Batch-level objectives: metrics that are not a mean of per-example values (F1, AUC, ECE).

The engine's contract is unchanged: an assessor returns one float per example. A batch-level
assessor returns, per example, an *encoding of that example's outcome* (the confusion cell
for F1, the signed confidence for ECE, the signed ranking score for AUC), and says how to turn
weighted outcomes into the metric with `metric(values, weights)`. Resampling examples is then
just drawing new weights (`BootstrapBound`), and the delta method is the gradient with respect
to the weights (`NormalBound`, `PairedBound`). Objectives use `metric` through
`Objective(metric=assessor)`.

The engine logs each objective through `objective_value(assessor, values)`, so
`StepInfo.assess_mean`, `decide_mean` and `History.score` hold the metric itself, not a mean
of encodings.
"""

from __future__ import annotations

from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, PyTree

from .._interfaces import AbstractBatchAssessor
from ..errors import ConfigurationError


def _safe_div(num: Float[Array, ""], den: Float[Array, ""], empty: float) -> Float[Array, ""]:
    ok = den > 0
    return jnp.where(ok, num / jnp.where(ok, den, 1.0), jnp.float32(empty))


def _binary_margin(model: Any, x: Array, positive: int) -> Float[Array, " example"]:
    logits = jax.vmap(model)(x)
    others = jnp.where(jnp.arange(logits.shape[-1]) == positive, -jnp.inf, logits)
    return logits[:, positive] - jax.nn.logsumexp(others, axis=-1)


class F1Score(AbstractBatchAssessor):
    """Binary F1 of a classifier on `(x, y)` batches: `2 TP / (2 TP + FP + FN)`.

    Per example the assessor returns its confusion cell: 0 true negative, 1 true positive,
    2 false positive, 3 false negative. F1 is 0 when there is no positive label and no
    positive prediction.

    **Arguments:**

    - `positive`: the class counted as positive (default 1).
    """

    direction = "max"  # higher scores are better

    positive: int = eqx.field(static=True, default=1)

    @property
    def name(self) -> str:
        return "f1"

    def __call__(self, model: Any, batch: PyTree[Array]) -> Float[Array, " example"]:
        x, y = batch
        pred = jnp.argmax(jax.vmap(model)(x), axis=-1) == self.positive
        true = y == self.positive
        cell = jnp.where(pred, jnp.where(true, 1, 2), jnp.where(true, 3, 0))
        return cell.astype(jnp.float32)

    def metric(
        self, values: Float[Array, " example"], weights: Float[Array, " example"]
    ) -> Float[Array, ""]:
        tp, fp, fn = (jnp.sum(jnp.where(values == c, weights, 0.0)) for c in (1.0, 2.0, 3.0))
        return _safe_div(2.0 * tp, 2.0 * tp + fp + fn, 0.0)


def _encode_rank(margin: Float[Array, " example"]) -> Float[Array, " example"]:
    """A positive, increasing function of the margin with full float precision: exp(asinh)."""
    root = jnp.sqrt(margin**2 + 1.0)
    return jnp.where(margin >= 0, margin + root, 1.0 / (root - margin))


class AUC(AbstractBatchAssessor):
    """Area under the ROC curve of a classifier for one class against the rest.

    The ranking score is the margin `logit[positive] - logsumexp(other logits)`. Per example
    the assessor returns `+g(margin)` for a positive label and `-g(margin)` otherwise, where
    `g > 0` is increasing (so the sign is the label and the magnitude ranks). Ties count one
    half. AUC is 0.5 when the batch has a single class.

    **Arguments:**

    - `positive`: the class counted as positive (default 1).
    """

    direction = "max"  # higher scores are better

    positive: int = eqx.field(static=True, default=1)

    @property
    def name(self) -> str:
        return "auc"

    def __call__(self, model: Any, batch: PyTree[Array]) -> Float[Array, " example"]:
        x, y = batch
        g = _encode_rank(_binary_margin(model, x, self.positive))
        return jnp.where(y == self.positive, g, -g).astype(jnp.float32)

    def metric(
        self, values: Float[Array, " example"], weights: Float[Array, " example"]
    ) -> Float[Array, ""]:
        score = jnp.abs(values)
        order = jnp.argsort(score)
        s = score[order]
        w = weights[order]
        pos = values[order] > 0
        w_pos = jnp.where(pos, w, 0.0)
        w_neg = jnp.where(pos, 0.0, w)
        cum_neg = jnp.concatenate([jnp.zeros((1,), jnp.float32), jnp.cumsum(w_neg)])
        lo = jnp.searchsorted(s, s, side="left")
        hi = jnp.searchsorted(s, s, side="right")
        below = cum_neg[lo]
        tied = cum_neg[hi] - cum_neg[lo]
        num = jnp.sum(w_pos * (below + 0.5 * tied))
        return _safe_div(num, jnp.sum(w_pos) * jnp.sum(w_neg), 0.5)


class NegExpectedCalibrationError(AbstractBatchAssessor):
    """Minus the expected calibration error (top-label, equal-width confidence bins).

    `ECE = sum_b |sum_{i in b} (confidence_i - correct_i)| / n`. Per example the assessor
    returns its confidence (the top softmax probability, always positive) with the sign of
    correctness: `+confidence` if correct, `-confidence` otherwise.

    **Arguments:**

    - `num_bins`: number of equal-width confidence bins (default 15).
    """

    direction = "max"  # higher scores are better

    num_bins: int = eqx.field(static=True, default=15)

    def __check_init__(self):
        if self.num_bins < 1:
            raise ConfigurationError(
                f"NegExpectedCalibrationError: num_bins={self.num_bins} must be >= 1."
            )

    @property
    def name(self) -> str:
        return "neg_ece"

    def __call__(self, model: Any, batch: PyTree[Array]) -> Float[Array, " example"]:
        x, y = batch
        probs = jax.nn.softmax(jax.vmap(model)(x), axis=-1)
        conf = jnp.max(probs, axis=-1)
        correct = jnp.argmax(probs, axis=-1) == y
        return jnp.where(correct, conf, -conf).astype(jnp.float32)

    def metric(
        self, values: Float[Array, " example"], weights: Float[Array, " example"]
    ) -> Float[Array, ""]:
        conf = jnp.abs(values)
        correct = (values > 0).astype(jnp.float32)
        bins = jnp.clip(jnp.floor(conf * self.num_bins), 0, self.num_bins - 1).astype(jnp.int32)
        gap = jax.ops.segment_sum(weights * (conf - correct), bins, num_segments=self.num_bins)
        return -jnp.sum(jnp.abs(gap)) / jnp.sum(weights)
