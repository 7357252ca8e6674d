"""The template's components: one proposer, one assessor, one scheduler.

Each is a final `eqx.Module` implementing an ev3core stage interface. Numbers a user may
tune are array leaves (changing them never recompiles); sizes and choices are
`eqx.field(static=True)`. Everything is a pure function of its arguments: randomness comes
only from the `key` the engine passes.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int, PRNGKeyArray, PyTree

import ev3core
from ev3core.errors import ConfigurationError


# --------------------------------------------------------------------------- proposer
class SignumState(eqx.Module):
    """`Signum`'s state: the momentum (an exponential average of gradients)."""

    momentum: PyTree[Array]


class Signum(ev3core.AbstractProposer):
    """Sign-of-momentum steps (signSGD with momentum, Bernstein et al. 2018), one candidate
    per learning rate.

    Each call draws one batch of `batch_size` examples, updates the momentum
    `m <- beta * m + (1 - beta) * grad`, and proposes `params - lr_i * sign(m)` for every
    learning rate `lr_i`. The step size of every parameter is exactly `lr_i`, whatever the
    gradient's scale: a cheap, scale-free family of candidates next to `GradientProposer`.

    **Arguments:**

    - `learning_rates`: one candidate per value (an array leaf).
    - `beta`: the momentum's decay in `[0, 1)` (an array leaf; `0` is plain signSGD).
    - `batch_size`: examples per gradient (static).
    - `loss`: an `ev3core.AbstractLoss` (default `CrossEntropy()`).
    """

    learning_rates: Float[Array, " candidate"]
    beta: Float[Array, ""]
    loss: ev3core.AbstractLoss
    batch_size: int = eqx.field(static=True)

    def __init__(
        self,
        learning_rates: Sequence[float] | Array = (0.1, 0.03, 0.01),
        beta: float | Array = 0.9,
        batch_size: int = 32,
        loss: ev3core.AbstractLoss | None = None,
    ):
        self.learning_rates = jnp.asarray(learning_rates, jnp.float32).reshape(-1)
        self.beta = jnp.asarray(beta, jnp.float32)
        self.batch_size = int(batch_size)
        self.loss = ev3core.CrossEntropy() if loss is None else loss
        if self.learning_rates.shape[0] < 1 or self.batch_size < 1:
            raise ConfigurationError(
                f"Signum: got {self.learning_rates.shape[0]} learning rates and "
                f"batch_size={batch_size}; give at least one learning rate and batch_size >= 1."
            )
        if not isinstance(self.beta, jax.core.Tracer) and not 0.0 <= float(self.beta) < 1.0:
            raise ConfigurationError(f"Signum: beta={float(self.beta)} must be in [0, 1).")

    @property
    def num_candidates(self) -> int:
        return self.learning_rates.shape[0]

    def labels(self) -> tuple[str, ...]:
        try:
            return tuple(f"signum(lr={float(lr):g})" for lr in self.learning_rates)
        except jax.errors.ConcretizationTypeError:  # traced: no values to print
            return tuple(f"signum#{i}" for i in range(self.num_candidates))

    def init(self, params: PyTree[Array], static: Any, key: PRNGKeyArray) -> SignumState:
        return SignumState(momentum=jax.tree.map(jnp.zeros_like, params))

    def propose(
        self,
        params: PyTree[Array],
        static: Any,
        state: SignumState,
        data: PyTree[Array],
        key: PRNGKeyArray,
    ) -> tuple[PyTree[Array], SignumState]:
        k_batch, k_loss = jax.random.split(key)
        n = jax.tree.leaves(data)[0].shape[0]
        idx = jax.random.randint(k_batch, (self.batch_size,), 0, n)
        batch = jax.tree.map(lambda a: a[idx], data)
        grads = jax.grad(lambda p: self.loss(eqx.combine(p, static), batch, k_loss))(params)

        def average(m: Array, g: Array) -> Array:
            beta = self.beta.astype(m.dtype)  # in the parameters' dtype (bfloat16 models too)
            return beta * m + (1 - beta) * g

        momentum = jax.tree.map(average, state.momentum, grads)

        def step(x: Array, m: Array) -> Array:
            lr = self.learning_rates.reshape((-1,) + (1,) * x.ndim).astype(x.dtype)
            return x[None] - lr * jnp.sign(m)[None]  # one candidate per learning rate

        return jax.tree.map(step, params, momentum), SignumState(momentum=momentum)

    def adapt(self, state: SignumState, outcome: ev3core.Outcome) -> SignumState:
        return state  # the momentum follows the current model, whatever was decided


# --------------------------------------------------------------------------- assessor
class TopKAccuracy(ev3core.AbstractAssessor):
    """Per-example top-`k` accuracy: 1.0 when fewer than `k` classes have a higher logit
    than the true class (ties count in the model's favour), else 0.0. Not differentiable.

    **Arguments:**

    - `k`: how many of the highest-scoring classes count as a hit (static, `>= 1`).
    """

    direction = "max"  # higher scores are better

    k: int = eqx.field(static=True, default=5)

    def __check_init__(self):
        if self.k < 1:
            raise ConfigurationError(f"TopKAccuracy: k={self.k} must be >= 1.")

    @property
    def name(self) -> str:
        return f"top{self.k}_accuracy"

    def __call__(self, model: Any, batch: PyTree[Array]) -> Float[Array, " example"]:
        x, y = batch[0], batch[1]
        logits = jax.vmap(model)(x)
        true = jnp.take_along_axis(logits, y[:, None], axis=-1)
        above = jnp.sum(logits > true, axis=-1)
        return (above < self.k).astype(jnp.float32)


# --------------------------------------------------------------------------- scheduler
class MarginState(eqx.Module):
    """`MarginScheduler`'s state: how many winners it has accepted."""

    accepted: Int[Array, ""]


class MarginScheduler(ev3core.AbstractScheduler):
    """A greedy scheduler with a minimum improvement: the winner (highest mean assess score
    among valid candidates) is accepted when its mean decide score beats the current
    model's by more than `margin`, and replaces the stable model when it also beats the
    stable model's by more than `margin`. No confidence bounds and no roll back: a simple
    baseline between `AlwaysAccept` and `EV3Scheduler`.

    **Arguments:**

    - `margin`: the required improvement of the mean score (an array leaf, `>= 0`).
    - `objective`: the index of the assessor that decides (static).
    """

    margin: Float[Array, ""]
    objective: int = eqx.field(static=True)

    def __init__(self, margin: float | Array = 0.0, objective: int = 0):
        self.margin = jnp.asarray(margin, jnp.float32)
        self.objective = int(objective)
        if not isinstance(self.margin, jax.core.Tracer) and not float(self.margin) >= 0.0:
            raise ConfigurationError(
                f"MarginScheduler: margin={float(self.margin)} must be >= 0 (scores are "
                "higher-is-better, so the margin is a required gain)."
            )

    def bind(self, assessors: Sequence[ev3core.AbstractAssessor]) -> MarginScheduler:
        return self  # nothing to configure from the assessors

    def init(self, num_objectives: int, key: PRNGKeyArray) -> MarginState:
        if not 0 <= self.objective < num_objectives:
            raise ConfigurationError(
                f"MarginScheduler: objective={self.objective} but the pipeline has "
                f"{num_objectives} assessor(s). Use an index in [0, {num_objectives})."
            )
        return MarginState(accepted=jnp.zeros((), jnp.int32))

    def select(
        self,
        scores: Float[Array, "objective model example"],
        valid: Bool[Array, " candidate"],
        state: MarginState,
        history: ev3core.History,
    ) -> Int[Array, ""]:
        k = valid.shape[0]
        mean = jnp.mean(scores[self.objective, :k], axis=-1)
        return jnp.argmax(jnp.where(valid & jnp.isfinite(mean), mean, -jnp.inf)).astype(jnp.int32)

    def decide(
        self,
        scores: Float[Array, "objective 3 example"],
        winner_valid: Bool[Array, ""],
        state: MarginState,
        history: ev3core.History,
    ) -> tuple[ev3core.Decision, MarginState]:
        mean = jnp.mean(scores[self.objective], axis=-1)
        gain = mean[ev3core.WINNER] - mean[ev3core.CURRENT]
        accept = winner_valid & jnp.isfinite(gain) & (gain > self.margin)
        beats_stable = accept & (mean[ev3core.WINNER] - mean[ev3core.STABLE] > self.margin)
        decision = ev3core.Decision(
            choice=ev3core.Choice.where(accept, ev3core.Choice.winner, ev3core.Choice.current),
            update_stable=beats_stable,
            significant=beats_stable,
            lower=mean,
            upper=mean,
            priorities=jax.nn.one_hot(self.objective, scores.shape[0], dtype=jnp.float32),
        )
        return decision, MarginState(accepted=state.accepted + accept.astype(jnp.int32))
