"""The knowledge-distillation loss (Hinton et al., 2015) as an `ev3core.AbstractLoss`."""

from __future__ import annotations

from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import optax
from jaxtyping import Array, Float, Int, PRNGKeyArray, PyTree, Scalar

from ev3core import AbstractLoss, batch_apply
from ev3core.errors import ConfigurationError


def _as_float(x: Any) -> Float[Array, ""]:
    return jnp.asarray(x, dtype=jnp.float32)


def kd_loss(
    student_logits: Float[Array, "example classes"],
    teacher_logits: Float[Array, "example classes"],
    labels: Int[Array, " example"],
    temperature: Float[Array, ""] | float,
    weight: Float[Array, ""] | float,
) -> Scalar:
    """Mean distillation loss of a batch.

    `weight * T^2 * KL(softmax(teacher / T) || softmax(student / T))
    + (1 - weight) * CE(softmax(student), labels)`, averaged over examples. The `T^2`
    factor keeps the soft term's gradient scale independent of `T` (Hinton et al., 2015).
    The teacher's logits are treated as constants (no gradient flows into the teacher).

    **Arguments:**

    - `student_logits`, `teacher_logits`: `[example, classes]`.
    - `labels`: integer classes `[example]`.
    - `temperature`: `T > 0`.
    - `weight`: the weight of the distillation term in `[0, 1]` (0: labels only).

    **Returns:** a scalar.
    """
    t = jnp.asarray(temperature, jnp.float32)
    w = jnp.asarray(weight, jnp.float32)
    teacher_logits = jax.lax.stop_gradient(teacher_logits.astype(jnp.float32))
    log_p_t = jax.nn.log_softmax(teacher_logits / t, axis=-1)
    log_p_s = jax.nn.log_softmax(student_logits / t, axis=-1)
    kl = jnp.sum(jnp.exp(log_p_t) * (log_p_t - log_p_s), axis=-1)
    ce = optax.softmax_cross_entropy_with_integer_labels(student_logits, labels)
    return jnp.mean(w * t * t * kl + (1.0 - w) * ce)


class DistillLoss(AbstractLoss):
    """Distillation from one teacher mixed with the label loss (see `kd_loss`).

    The teacher is either

    - **precomputed logits** (default, fastest): the batch is `(x, y, teacher_logits)` with
      `teacher_logits` of shape `[example, teachers, classes]`, and this loss uses column
      `teacher`; or
    - **a function** `teacher_fn(x_one_example) -> logits` (any callable or Equinox
      module): the batch is `(x, y)` (extra entries are ignored) and the teacher is run
      on the batch, without gradient.

    Losses that use different teachers are different candidate families (they are not
    stacked together by the gradient proposer). `temperature` and `weight` are array leaves:
    changing them never recompiles.

    **Arguments:**

    - `temperature`: `T > 0` (array leaf).
    - `weight`: weight of the distillation term in `[0, 1]` (array leaf); `0` gives the
      plain label cross-entropy.
    - `teacher`: column of the precomputed logits to use (static).
    - `teacher_fn`: a teacher function instead of precomputed logits.
    - `teacher_name`: the teacher's name in candidate labels (default `t<teacher>`).

    ```python
    losses = [DistillLoss(temperature=t, weight=0.9) for t in (1.0, 4.0)]
    ```
    """

    temperature: Float[Array, ""] = eqx.field(converter=_as_float)
    weight: Float[Array, ""] = eqx.field(converter=_as_float)
    teacher: int = eqx.field(static=True)
    teacher_fn: Any
    teacher_name: str = eqx.field(static=True)

    def __init__(
        self,
        temperature: Any = 4.0,
        weight: Any = 0.9,
        teacher: int = 0,
        teacher_fn: Any = None,
        teacher_name: str | None = None,
    ):
        for name, value, lo, hi in (
            ("temperature", temperature, 0.0, float("inf")),
            ("weight", weight, 0.0, 1.0),
        ):
            if not isinstance(value, jax.core.Tracer):
                v = float(jnp.asarray(value))
                bad = not (lo < v < hi) if name == "temperature" else not (lo <= v <= hi)
                if bad:
                    raise ConfigurationError(
                        f"DistillLoss: {name}={v!r} is out of range; use a temperature in "
                        "(0, inf) such as 4.0 and a weight in [0, 1] such as 0.9."
                    )
        if int(teacher) < 0:
            raise ConfigurationError(f"DistillLoss: teacher={teacher} must be >= 0.")
        if teacher_fn is not None and not callable(teacher_fn):
            raise ConfigurationError(
                f"DistillLoss: teacher_fn={teacher_fn!r} is not callable; pass a function or an "
                "Equinox module mapping one example to logits."
            )
        self.temperature = temperature
        self.weight = weight
        self.teacher = int(teacher)
        self.teacher_fn = teacher_fn
        self.teacher_name = teacher_name if teacher_name is not None else f"t{int(teacher)}"

    def teacher_logits(self, batch: PyTree[Array]) -> Float[Array, "example classes"]:
        if self.teacher_fn is not None:
            # The teacher reads the inputs in its own precision (the student's may be lower).
            weights = jax.tree.leaves(eqx.filter(self.teacher_fn, eqx.is_inexact_array))
            x = batch[0] if not weights else batch[0].astype(weights[0].dtype)
            return jax.vmap(self.teacher_fn)(x)
        if len(batch) < 3:
            raise ConfigurationError(
                "DistillLoss: the batch has no teacher logits. Put (x, y, teacher_logits) in "
                "the propose stream, or pass teacher_fn=..."
            )
        logits = batch[2]
        return logits if logits.ndim == 2 else logits[:, self.teacher]

    def __call__(self, model: Any, batch: PyTree[Array], key: PRNGKeyArray) -> Scalar:
        del key
        x, y = batch[0], batch[1]
        # In float32 whatever the model's dtype: a low-precision softmax loses the loss.
        logits = batch_apply(model, x).astype(jnp.float32)
        return kd_loss(logits, self.teacher_logits(batch), y, self.temperature, self.weight)

    @property
    def label(self) -> str:
        try:
            w = float(self.weight)
            if w == 0.0:
                return "ce"
            return f"kd[{self.teacher_name}](T={float(self.temperature):g},w={w:g})"
        except (TypeError, jax.errors.ConcretizationTypeError):  # traced
            return f"kd[{self.teacher_name}]"


class LabelLoss(AbstractLoss):
    """Softmax cross-entropy on the labels only, for batches `(x, y, ...)`.

    Like `ev3core.CrossEntropy` but ignores extra batch entries (teacher logits), so it can sit
    next to `DistillLoss` candidates on the same propose stream.

    **Arguments:**

    - `temperature`: multiplies the logits before the softmax (array leaf).
    """

    temperature: Float[Array, ""] = eqx.field(converter=_as_float, default=1.0)

    def __call__(self, model: Any, batch: PyTree[Array], key: PRNGKeyArray) -> Scalar:
        del key
        logits = batch_apply(model, batch[0]).astype(jnp.float32) * self.temperature
        return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, batch[1]))

    @property
    def label(self) -> str:
        try:
            t = float(self.temperature)
            return "ce" if t == 1.0 else f"ce(T={t:g})"
        except (TypeError, jax.errors.ConcretizationTypeError):  # traced
            return "ce"
