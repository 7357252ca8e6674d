"""Built-in training losses (explore stage)."""

from __future__ import annotations

from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import optax
from jaxtyping import Array, Float, PRNGKeyArray, PyTree, Scalar

from .._interfaces import AbstractLoss, AbstractReferenceLoss
from .._stateful import batch_apply
from .._types import _as_float_array, _logits


def _with_reference_logits(model: Any, reference: Any, x: PyTree[Array]) -> tuple[Array, Array]:
    """The model's logits on `x` (float32) and the reference's (float32, no gradient); a
    reference that is the model itself reuses the model's pass."""
    logits = _logits(model, x).astype(jnp.float32)
    ref = logits if reference is model else batch_apply(reference, x)
    return logits, jax.lax.stop_gradient(ref.astype(jnp.float32))


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
        # In float32 whatever the model's dtype: a low-precision softmax loses the loss.
        logits = _logits(model, x).astype(jnp.float32) * self.temperature
        return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, y))

    @property
    def label(self) -> str:
        try:
            return f"ce(T={float(self.temperature):g})"
        except (TypeError, jax.errors.ConcretizationTypeError):  # traced
            return "ce"


class SelfDistill(AbstractReferenceLoss):
    """Cross-entropy against the labels mixed with a reference model's predictions.

    The target of an example `(x, y)` is `(1 - weight) * one_hot(y) + weight *
    softmax(reference(x) / temperature)`. Inside a `GradientProposer` the reference is the
    engine's current (accepted) model, so a candidate distils from the best model EV3 has
    accepted while it keeps learning from the labels; called on its own
    (`loss(model, batch, key)`) the reference is the model itself, which is the soft
    bootstrapping loss of Reed et al. (2015). The batch is `(x, y, ...)` with integer labels.

    **Arguments:**

    - `weight`: the reference's share of the target, in `[0, 1]` (an array leaf).
    - `temperature`: divides the reference's logits before the softmax (an array leaf;
      above 1 softens the reference's targets).

    ```python
    losses = [CrossEntropy(), SelfDistill(weight=0.5), SelfDistill(weight=0.8)]
    ```
    """

    weight: Float[Array, ""] | float = eqx.field(converter=_as_float_array, default=0.5)
    temperature: Float[Array, ""] | float = eqx.field(converter=_as_float_array, default=1.0)

    def with_reference(
        self, model: Any, reference: Any, batch: PyTree[Array], key: PRNGKeyArray
    ) -> Scalar:
        del key
        y = batch[1]
        logits, ref = _with_reference_logits(model, reference, batch[0])
        soft = jax.nn.softmax(ref / self.temperature, axis=-1)
        target = (1.0 - self.weight) * jax.nn.one_hot(y, logits.shape[-1]) + self.weight * soft
        return jnp.mean(optax.softmax_cross_entropy(logits, target))

    @property
    def label(self) -> str:
        try:
            t = float(self.temperature)
            return f"self(w={float(self.weight):g}{f',T={t:g}' if t != 1.0 else ''})"
        except (TypeError, jax.errors.ConcretizationTypeError):  # traced
            return "self"


class Relabel(AbstractReferenceLoss):
    """Cross-entropy against the labels a reference model finds plausible, and against the
    reference's own prediction for the others (label correction under label noise).

    An example `(x, y)` keeps its label as the target when the reference gives `y` a
    probability of at least `threshold`; otherwise its target is `softmax(reference(x) /
    temperature)`. Inside a `GradientProposer` the reference is the engine's current
    (accepted) model, so the labels are corrected by the best model EV3 has accepted, which
    the safety control chose on held-out data. Called on its own (`loss(model, batch, key)`)
    the reference is the model itself: examples whose label the model finds implausible give
    no gradient (their target is the model's own prediction), which is training on the
    examples the model agrees with (self-paced, "small-loss" selection). The batch is `(x, y,
    ...)` with integer labels.

    **Arguments:**

    - `threshold`: the reference probability of the label at or above which the label is
      kept, in `[0, 1]` (an array leaf). `0` is plain cross-entropy.
    - `temperature`: divides the reference's logits in the corrected targets (an array leaf;
      below 1 sharpens them towards the reference's class).

    ```python
    losses = [CrossEntropy(), SelfDistill(weight=0.8), Relabel(threshold=0.3)]
    ```
    """

    threshold: Float[Array, ""] | float = eqx.field(converter=_as_float_array, default=0.3)
    temperature: Float[Array, ""] | float = eqx.field(converter=_as_float_array, default=1.0)

    def with_reference(
        self, model: Any, reference: Any, batch: PyTree[Array], key: PRNGKeyArray
    ) -> Scalar:
        del key
        y = batch[1]
        logits, ref = _with_reference_logits(model, reference, batch[0])
        labels = jax.nn.one_hot(y, logits.shape[-1])
        keep = jnp.sum(jax.nn.softmax(ref, axis=-1) * labels, axis=-1) >= self.threshold
        soft = jax.nn.softmax(ref / self.temperature, axis=-1)
        target = jnp.where(keep[:, None], labels, soft)
        return jnp.mean(optax.softmax_cross_entropy(logits, target))

    @property
    def label(self) -> str:
        try:
            t = float(self.temperature)
            return f"relabel(p>={float(self.threshold):g}{f',T={t:g}' if t != 1.0 else ''})"
        except (TypeError, jax.errors.ConcretizationTypeError):  # traced
            return "relabel"
