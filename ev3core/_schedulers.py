"""Built-in adapt-stage schedulers: the EV3 decision rule and an always-accept baseline."""

from __future__ import annotations

from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int, PyTree

from ._interfaces import AbstractScheduler
from ._types import CURRENT, STABLE, WINNER, Decision, History
from .errors import ConfigurationError


def _positive_alpha(x: Any) -> Float[Array, ""]:
    if not isinstance(x, jax.core.Tracer):
        v = float(jnp.asarray(x))
        if not 0.0 < v < float("inf"):
            raise ConfigurationError(
                f"alpha={v!r} is outside (0, inf). alpha is the number of standard errors in "
                "the confidence bound: use a positive finite value such as 0.5 or 4.0."
            )
    return jnp.asarray(x, dtype=jnp.float32)


def mean_and_stderr(
    scores: Float[Array, "*batch example"],
) -> tuple[Float[Array, "*batch"], Float[Array, "*batch"]]:
    """Mean and standard error of the mean over the last axis (sample sd, `ddof=1`)."""
    n = scores.shape[-1]
    mean = jnp.mean(scores, axis=-1)
    if n < 2:
        return mean, jnp.full_like(mean, jnp.inf)
    sd = jnp.std(scores, axis=-1, ddof=1)
    return mean, sd / jnp.sqrt(jnp.float32(n))


class EV3Scheduler(AbstractScheduler):
    """The EV3 decision rule on one objective, with normal confidence bounds.

    *Assess*: the winner is the valid candidate with the highest lower confidence bound
    `mean - assess_alpha * stderr` on the assess set.

    *Decide*: on the decide set, among the winner, the current and the stable model, the one
    with the highest lower bound `mean - decide_alpha * stderr` becomes the current model
    (ties go to the current model, then the winner). When the winner's lower bound beats the
    stable model's upper bound `mean + decide_alpha * stderr`, the winner replaces the stable
    model and the step is recorded as *significant*.

    **Arguments:**

    - `assess_alpha`, `decide_alpha`: numbers of standard errors (array leaves, in (0, inf)).
    - `objective`: index of the assessor that decides (the others are reported only).
    """

    assess_alpha: Float[Array, ""] = eqx.field(converter=_positive_alpha, default=0.5)
    decide_alpha: Float[Array, ""] = eqx.field(converter=_positive_alpha, default=4.0)
    objective: int = eqx.field(static=True, default=0)

    def init(self, num_objectives: int) -> None:
        if not 0 <= self.objective < num_objectives:
            raise ConfigurationError(
                f"EV3Scheduler: objective={self.objective} but the pipeline has "
                f"{num_objectives} assessor(s). Use an index in [0, {num_objectives})."
            )
        return None

    def select(
        self,
        scores: Float[Array, "objective model example"],
        valid: Bool[Array, " candidate"],
        state: PyTree[Any],
        history: History,
    ) -> Int[Array, ""]:
        k = valid.shape[0]
        mean, se = mean_and_stderr(scores[self.objective, :k])
        lcb = mean - self.assess_alpha * se
        lcb = jnp.where(valid & jnp.isfinite(lcb), lcb, -jnp.inf)
        return jnp.argmax(lcb).astype(jnp.int32)

    def decide(
        self,
        scores: Float[Array, "objective 3 example"],
        winner_valid: Bool[Array, ""],
        state: PyTree[Any],
        history: History,
    ) -> tuple[Decision, PyTree[Any]]:
        mean, se = mean_and_stderr(scores[self.objective])
        lower = mean - self.decide_alpha * se
        upper = mean + self.decide_alpha * se
        ok = jnp.stack([winner_valid, jnp.array(True), jnp.array(True)]) & jnp.isfinite(lower)
        masked = jnp.where(ok, lower, -jnp.inf)
        # Tie-break order: current, winner, stable (a tie never moves the model).
        order = jnp.array([CURRENT, WINNER, STABLE], jnp.int32)
        choice = order[jnp.argmax(masked[order])]
        significant = ok[WINNER] & (lower[WINNER] > upper[STABLE])
        priorities = jax.nn.one_hot(self.objective, scores.shape[0], dtype=jnp.float32)
        return (
            Decision(
                choice=choice,
                update_stable=significant,
                significant=significant,
                lower=lower,
                upper=upper,
                priorities=priorities,
            ),
            state,
        )


class AlwaysAccept(AbstractScheduler):
    """Baseline: the best candidate by mean assess score is always accepted (if finite).

    The stable model follows the current one; no step is significant. Useful as the
    "no safety control" comparison.

    **Arguments:**

    - `objective`: index of the assessor whose mean picks the winner.
    """

    objective: int = eqx.field(static=True, default=0)

    def init(self, num_objectives: int) -> None:
        if not 0 <= self.objective < num_objectives:
            raise ConfigurationError(
                f"AlwaysAccept: objective={self.objective} but the pipeline has "
                f"{num_objectives} assessor(s). Use an index in [0, {num_objectives})."
            )
        return None

    def select(
        self,
        scores: Float[Array, "objective model example"],
        valid: Bool[Array, " candidate"],
        state: PyTree[Any],
        history: History,
    ) -> Int[Array, ""]:
        k = valid.shape[0]
        mean = jnp.mean(scores[self.objective, :k], axis=-1)
        mean = jnp.where(valid & jnp.isfinite(mean), mean, -jnp.inf)
        return jnp.argmax(mean).astype(jnp.int32)

    def decide(
        self,
        scores: Float[Array, "objective 3 example"],
        winner_valid: Bool[Array, ""],
        state: PyTree[Any],
        history: History,
    ) -> tuple[Decision, PyTree[Any]]:
        mean = jnp.mean(scores[self.objective], axis=-1)
        ok = winner_valid & jnp.isfinite(mean[WINNER])
        choice = jnp.where(ok, WINNER, CURRENT).astype(jnp.int32)
        return (
            Decision(
                choice=choice,
                update_stable=ok,
                significant=jnp.array(False),
                lower=mean,
                upper=mean,
                priorities=jax.nn.one_hot(self.objective, scores.shape[0], dtype=jnp.float32),
            ),
            state,
        )
