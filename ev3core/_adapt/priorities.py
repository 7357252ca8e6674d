"""Objectives, constraints and priority schedulers ("which objective matters now").

A pipeline with several assessors has several *objectives*, one per assessor, in assessor
order. `EV3Scheduler(priority=...)` asks its priority component, before it sees a step's data,
for the weight of every objective (the *priorities*, which sum to one and are logged in
`Decision.priorities` / `StepInfo.priorities`), combines the objectives with them into one
utility, and tests that utility with its bound. After the decision the priority component is
told what happened (`Feedback`) and updates its state, which lives in the scheduler state.

Priority components are plugins (`ev3_register_priorities`):

| name | class | priorities |
| --- | --- | --- |
| `lexicographic` | `Lexicographic` | a fixed order with tolerances |
| `weighted_sum` | `WeightedSum` | fixed weights, weighted sum |
| `chebyshev` | `WeightedChebyshev` | fixed weights, weighted Chebyshev |
| `stall` | `StallPriority` | focus on one objective until it stalls, then the next |
| `ucb` | `UCBPriority` | discounted UCB bandit over objectives |
| `exp3` | `EXP3Priority` | EXP3 bandit over objectives |
"""

import abc
from collections.abc import Sequence
from typing import Any, ClassVar

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int, PRNGKeyArray, PyTree

from .._types import History, _as_float_array as _float_array
from ..errors import ConfigurationError
from .bounds import weighted_mean


def _int_array(x: Any) -> Int[Array, "..."]:
    return jnp.asarray(x, dtype=jnp.int32)


def _num_objectives(history: History) -> int:
    return history.score.shape[-1]


# --------------------------------------------------------------------------- objectives
class Objective(eqx.Module):
    """How one assessor's scores become an objective (higher is better after `direction`).

    **Arguments:**

    - `name`: the objective's name (constraints may refer to it). Defaults to its index.
    - `direction`: `"max"` (default) or `"min"`: an assessor whose scores are better when
      lower (a model size, a fairness gap) is negated.
    - `metric`: for a batch-level objective, its `AbstractBatchAssessor` (whose `metric`
      turns the per-example encodings into the metric). Default: the mean of the scores.

    ```python
    objectives = [Objective("accuracy"), Objective("f1", metric=f1), Objective("gap", "min")]
    ```
    """

    name: str | None = eqx.field(static=True, default=None)
    direction: str = eqx.field(static=True, default="max")
    metric: Any = None

    def __check_init__(self):
        if self.direction not in ("max", "min"):
            raise ConfigurationError(
                f"Objective {self.name!r}: direction={self.direction!r} must be 'max' or 'min'."
            )
        if self.metric is not None and not callable(getattr(self.metric, "metric", None)):
            raise ConfigurationError(
                f"Objective {self.name!r}: metric={self.metric!r} has no metric(values, "
                "weights) method. Pass the batch-level assessor itself (e.g. F1Score())."
            )

    def value(
        self, values: Float[Array, " example"], weights: Float[Array, " example"]
    ) -> Float[Array, ""]:
        """The objective (higher is better) of one model's scores under example weights."""
        if self.metric is None:
            v = weighted_mean(values, weights)
        else:
            v = jnp.asarray(self.metric.metric(values, weights), jnp.float32)
        return v if self.direction == "max" else -v


class Constraint(eqx.Module):
    """ "Do not lose more than `max_drop` of this objective" (in the objective's units).

    A move is allowed only if the lower confidence bound of `objective(new) - objective(old)`
    on the decide set is at least `-max_drop`, where `old` is the model being replaced (the
    current model for acceptance and roll-back, the stable model for the stable update). A
    step that violates a constraint is never accepted.

    **Arguments:**

    - `objective`: the objective's index or name (names come from `EV3Scheduler(objectives=)`).
    - `max_drop`: the tolerated loss, `>= 0` (an array leaf).

    ```python
    Constraint("accuracy", max_drop=0.005)  # at most half a point of accuracy
    ```
    """

    objective: int | str = eqx.field(static=True)
    max_drop: Float[Array, ""] = eqx.field(converter=_float_array, default=0.0)

    def __check_init__(self):
        if not isinstance(self.max_drop, jax.core.Tracer) and not float(self.max_drop) >= 0:
            raise ConfigurationError(
                f"Constraint on {self.objective!r}: max_drop={float(self.max_drop)!r} must be "
                ">= 0 (it is how much of the objective may be lost)."
            )


class Feedback(eqx.Module):
    """What a priority component is told after each decision.

    **Arguments:**

    - `accepted`: the winner became the current model.
    - `significant`: the winner replaced the stable model.
    - `gain`, `gain_lower`, `gain_upper`: per objective, the point estimate and bounds (at the
      decide alpha, on the decide set) of `objective(new current) - objective(old current)`;
      zero when the current model did not change.
    - `priorities`: the priorities this step used.
    """

    accepted: Bool[Array, ""]
    significant: Bool[Array, ""]
    gain: Float[Array, " objective"]
    gain_lower: Float[Array, " objective"]
    gain_upper: Float[Array, " objective"]
    priorities: Float[Array, " objective"]


# --------------------------------------------------------------------------- interface
class AbstractPriority(eqx.Module):
    """A priority component: the weight of every objective at each step.

    `priorities` is called before the step's data is seen (by `select` and again by
    `decide`, with the same state, history and key, so both see the same priorities);
    `utility` combines objective values with them; `update` learns from the `Feedback`.

    `scalarisation` is `"sum"` or `"chebyshev"` (a scalar utility, tested with one bound) or
    `"lexicographic"` (objectives tested in order: `lexicographic_order` gives the order and
    tolerances).
    Every method is abstract; `weighted_sum` is the usual `utility`.
    """

    scalarisation: eqx.AbstractClassVar[str]

    @abc.abstractmethod
    def init(self, num_objectives: int) -> PyTree[Any]:
        """The initial state (`None` when there is none). Raise `ConfigurationError` on a
        bad size."""

    @abc.abstractmethod
    def priorities(
        self, state: PyTree[Any], history: History, key: PRNGKeyArray
    ) -> Float[Array, " objective"]:
        """The weight of every objective for this step: non-negative, summing to one."""

    @abc.abstractmethod
    def utility(
        self, values: Float[Array, " objective"], weights: Float[Array, " objective"]
    ) -> Float[Array, ""]:
        """One utility from the objective values (usually `weighted_sum(values, weights)`)."""

    @abc.abstractmethod
    def update(self, state: PyTree[Any], feedback: Feedback, history: History) -> PyTree[Any]:
        """The state after a decision (return `state` when nothing is learnt)."""

    @abc.abstractmethod
    def lexicographic_order(
        self, num_objectives: int
    ) -> tuple[tuple[int, ...], Float[Array, " order"]] | None:
        """For a lexicographic priority, the objectives in the order they are tested and
        their tolerances; `None` for a scalar utility (static: decided when tracing)."""


def weighted_sum(
    values: Float[Array, " objective"], weights: Float[Array, " objective"]
) -> Float[Array, ""]:
    """The weighted sum of the objective values: the usual `AbstractPriority.utility`."""
    return jnp.sum(weights * values)


def _check_size(owner: str, got: int, num_objectives: int) -> None:
    if got != num_objectives:
        raise ConfigurationError(
            f"{owner} has {got} weight(s) but the pipeline has {num_objectives} objective(s). "
            "Give one per assessor, in assessor order."
        )


def _normalised(owner: str, weights: Any) -> Float[Array, " objective"]:
    w = jnp.asarray(weights, jnp.float32).reshape(-1)
    if not isinstance(w, jax.core.Tracer):
        if w.size == 0 or bool(jnp.any(w < 0)) or not float(jnp.sum(w)) > 0:
            raise ConfigurationError(
                f"{owner}: weights={list(map(float, w))} must be non-negative with a positive sum."
            )
        w = w / jnp.sum(w)
    return w


class WeightedSum(AbstractPriority):
    """Fixed weights; the utility is `sum_o weight_o * objective_o`.

    With per-example objectives the weighted sum is itself a mean of per-example values, so
    a paired bound on it is exact. Weights multiply objectives in their own units.

    **Arguments:**

    - `weights`: one per objective (normalised to sum to one; an array leaf).
    """

    scalarisation: ClassVar[str] = "sum"

    weights: Float[Array, " objective"]

    def __init__(self, weights: Sequence[float] | Array):
        self.weights = _normalised("WeightedSum", weights)

    def init(self, num_objectives: int) -> None:
        _check_size("WeightedSum", self.weights.shape[0], num_objectives)
        return None

    def priorities(
        self, state: PyTree[Any], history: History, key: PRNGKeyArray
    ) -> Float[Array, " objective"]:
        return self.weights

    def utility(
        self, values: Float[Array, " objective"], weights: Float[Array, " objective"]
    ) -> Float[Array, ""]:
        return weighted_sum(values, weights)

    def update(self, state: PyTree[Any], feedback: Feedback, history: History) -> PyTree[Any]:
        return state

    def lexicographic_order(self, num_objectives: int) -> None:
        return None


class WeightedChebyshev(AbstractPriority):
    """Fixed weights; the utility is `-max_o weight_o * (ideal_o - objective_o)`.

    Maximising it minimises the worst weighted shortfall from the `ideal` point, which reaches
    every Pareto-optimal trade-off (a weighted sum cannot reach non-convex parts of the
    front). Objectives with zero weight are left out of the max. A nonlinear statistic: its
    bound uses the delta method (normal bounds) or resampling (`BootstrapBound`).

    **Arguments:**

    - `weights`: one per objective (normalised; an array leaf).
    - `ideal`: the ideal point, one value per objective in its higher-is-better units, at
      least as good as any model (default 1.0 for all: right for accuracies, F1, AUC and
      negated losses).
    """

    weights: Float[Array, " objective"]
    ideal: Float[Array, " objective"]
    scalarisation: ClassVar[str] = "chebyshev"

    def __init__(
        self, weights: Sequence[float] | Array, ideal: Sequence[float] | Array | None = None
    ):
        self.weights = _normalised("WeightedChebyshev", weights)
        if ideal is None:
            ideal = jnp.ones_like(self.weights)
        self.ideal = jnp.broadcast_to(jnp.asarray(ideal, jnp.float32), self.weights.shape)

    def init(self, num_objectives: int) -> None:
        _check_size("WeightedChebyshev", self.weights.shape[0], num_objectives)
        return None

    def priorities(
        self, state: PyTree[Any], history: History, key: PRNGKeyArray
    ) -> Float[Array, " objective"]:
        return self.weights

    def utility(
        self, values: Float[Array, " objective"], weights: Float[Array, " objective"]
    ) -> Float[Array, ""]:
        shortfall = jnp.where(weights > 0, weights * (self.ideal - values), -jnp.inf)
        return -jnp.max(shortfall)

    def update(self, state: PyTree[Any], feedback: Feedback, history: History) -> PyTree[Any]:
        return state

    def lexicographic_order(self, num_objectives: int) -> None:
        return None


class Lexicographic(AbstractPriority):
    """Fixed lexicographic priority with tolerances.

    The winner beats the incumbent if, for some position `j` in `order`, it is significantly
    better on objective `order[j]` (lower bound of the difference `> 0`) and, on every
    objective before it, not worse by more than its tolerance (lower bound `>= -tolerance`).
    Among moves that qualify, the one decided at the earliest position wins, then the highest
    lower bound. Testing up to `len(order)` objectives, the scheduler spends its level over
    them (Bonferroni), so a move that is truly no better lexicographically is accepted with
    probability at most `Phi(-alpha)`.

    The logged priorities are one-hot on the objective that decided the move (on the first
    objective when nothing moved).

    **Arguments:**

    - `order`: objective indices, most important first (default: assessor order, all).
    - `tolerances`: one per entry of `order`, `>= 0` (an array leaf; default zeros).
    """

    order: tuple[int, ...] | None = eqx.field(static=True)
    tolerances: Float[Array, " order"] | None
    scalarisation: ClassVar[str] = "lexicographic"

    def __init__(
        self,
        order: Sequence[int] | None = None,
        tolerances: Sequence[float] | Array | None = None,
    ):
        self.order = None if order is None else tuple(int(i) for i in order)
        if tolerances is not None:
            tolerances = jnp.asarray(tolerances, jnp.float32).reshape(-1)
            if not isinstance(tolerances, jax.core.Tracer) and bool(jnp.any(tolerances < 0)):
                raise ConfigurationError(
                    f"Lexicographic: tolerances={list(map(float, tolerances))} must be >= 0."
                )
        self.tolerances = tolerances

    def resolved(self, num_objectives: int) -> tuple[tuple[int, ...], Float[Array, " order"]]:
        """`(order, tolerances)` for a pipeline with `num_objectives` objectives."""
        order = tuple(range(num_objectives)) if self.order is None else self.order
        tol = jnp.zeros((len(order),), jnp.float32) if self.tolerances is None else self.tolerances
        return order, tol

    def init(self, num_objectives: int) -> None:
        order = tuple(range(num_objectives)) if self.order is None else self.order
        if (
            not order
            or len(set(order)) != len(order)
            or not all(0 <= i < num_objectives for i in order)
        ):
            raise ConfigurationError(
                f"Lexicographic: order={order} must list distinct objective indices in "
                f"[0, {num_objectives})."
            )
        if self.tolerances is not None and self.tolerances.shape[0] != len(order):
            raise ConfigurationError(
                f"Lexicographic: {self.tolerances.shape[0]} tolerances for an order of "
                f"{len(order)} objectives; give one tolerance per entry of order."
            )
        return None

    def priorities(
        self, state: PyTree[Any], history: History, key: PRNGKeyArray
    ) -> Float[Array, " objective"]:
        order, _ = self.resolved(_num_objectives(history))
        return jax.nn.one_hot(order[0], _num_objectives(history), dtype=jnp.float32)

    def utility(
        self, values: Float[Array, " objective"], weights: Float[Array, " objective"]
    ) -> Float[Array, ""]:
        return weighted_sum(values, weights)

    def update(self, state: PyTree[Any], feedback: Feedback, history: History) -> PyTree[Any]:
        return state

    def lexicographic_order(
        self, num_objectives: int
    ) -> tuple[tuple[int, ...], Float[Array, " order"]]:
        return self.resolved(num_objectives)


def lexicographic_rank(
    lower: Float[Array, "order model"], tolerances: Float[Array, " order"]
) -> tuple[Int[Array, " model"], Float[Array, " model"]]:
    """For each model, the first position deciding "better" and the lower bound there.

    `lower[j, m]` is the lower bound of the advantage of model `m` on the `j`-th objective of
    the order. Position `j` decides when `lower[j] > 0` and `lower[i] >= -tolerances[i]` for
    every `i < j`. A model no position decides gets `len(order)` and its first lower bound.
    """
    num = lower.shape[0]
    within = lower >= -tolerances[:, None]
    before = jnp.concatenate(
        [jnp.ones((1, lower.shape[1]), bool), jnp.cumprod(within, axis=0)[:-1].astype(bool)]
    )
    decides = (lower > 0) & before
    rank = jnp.where(jnp.any(decides, axis=0), jnp.argmax(decides, axis=0), num).astype(jnp.int32)
    at = jnp.take_along_axis(lower, jnp.minimum(rank, num - 1)[None], axis=0)[0]
    return rank, jnp.where(rank < num, at, lower[0])


def _focus_weights(
    arm: Int[Array, ""], num: int, floor: Float[Array, ""]
) -> Float[Array, " objective"]:
    return (1.0 - floor) * jax.nn.one_hot(arm, num, dtype=jnp.float32) + floor / num


def _check_floor(owner: str, floor: Float[Array, ""]) -> None:
    if not isinstance(floor, jax.core.Tracer) and not 0.0 <= float(floor) < 1.0:
        raise ConfigurationError(
            f"{owner}: floor={float(floor)!r} must be in [0, 1) (the weight every objective keeps)."
        )


def _improved(feedback: Feedback, arm: Int[Array, ""]) -> Bool[Array, ""]:
    """The accepted step improved objective `arm` significantly."""
    return feedback.accepted & (feedback.gain_lower[arm] > 0)


class StallState(eqx.Module):
    focus: Int[Array, ""]
    stall: Int[Array, ""]


class StallPriority(AbstractPriority):
    """Dynamic priority from the progress history: rotate when the focus stalls.

    Priority goes to one *focus* objective (weight `1 - floor`, the rest share `floor`). Each
    step that is not an accepted, significant improvement of the focus objective (lower bound
    of its gain `> 0`) counts as a stalled step; after `patience` stalled steps in a row, the
    objective whose improvement has stalled hands priority to the next objective in turn.
    An objective that has saturated therefore stops taking the steps, and one that keeps
    improving keeps them.

    **Arguments:**

    - `patience`: stalled steps before priority moves on (array leaf, `>= 1`).
    - `floor`: total weight shared by the objectives out of focus (array leaf, in `[0, 1)`).
    """

    scalarisation: ClassVar[str] = "sum"

    patience: Int[Array, ""] = eqx.field(converter=_int_array, default=5)
    floor: Float[Array, ""] = eqx.field(converter=_float_array, default=0.1)

    def __check_init__(self):
        _check_floor("StallPriority", self.floor)
        if not isinstance(self.patience, jax.core.Tracer) and int(self.patience) < 1:
            raise ConfigurationError(f"StallPriority: patience={int(self.patience)} must be >= 1.")

    def init(self, num_objectives: int) -> StallState:
        return StallState(focus=jnp.zeros((), jnp.int32), stall=jnp.zeros((), jnp.int32))

    def priorities(
        self, state: StallState, history: History, key: PRNGKeyArray
    ) -> Float[Array, " objective"]:
        return _focus_weights(state.focus, _num_objectives(history), self.floor)

    def update(self, state: StallState, feedback: Feedback, history: History) -> StallState:
        stall = jnp.where(_improved(feedback, state.focus), 0, state.stall + 1)
        move = stall >= self.patience
        focus = jnp.where(move, (state.focus + 1) % _num_objectives(history), state.focus)
        return StallState(
            focus=focus.astype(jnp.int32), stall=jnp.where(move, 0, stall).astype(jnp.int32)
        )

    def utility(
        self, values: Float[Array, " objective"], weights: Float[Array, " objective"]
    ) -> Float[Array, ""]:
        return weighted_sum(values, weights)

    def lexicographic_order(self, num_objectives: int) -> None:
        return None


class BanditState(eqx.Module):
    """`UCBPriority`'s discounted pull counts and reward sums, per objective."""

    counts: Float[Array, " objective"]
    rewards: Float[Array, " objective"]


class UCBPriority(AbstractPriority):
    """Discounted UCB bandit over objectives, rewarded by the accepted improvement.

    Each step one objective (the arm) gets priority `1 - floor`. Its reward is 1 when the step
    accepted a model that improved that objective significantly (lower bound of the gain
    `> 0`), else 0. The arm is the one with the highest `mean reward + exploration *
    sqrt(2 log(1 + N) / n_arm)` over discounted counts (unplayed arms first, in order);
    `discount < 1` forgets old rewards, so an objective that saturates loses priority.

    **Arguments:**

    - `exploration`: the confidence-bonus scale (array leaf, default 0.5).
    - `discount`: per-step discount of counts and rewards (array leaf in `(0, 1]`, default 0.9).
    - `floor`: total weight shared by the other objectives (array leaf, default 0.1).
    """

    scalarisation: ClassVar[str] = "sum"

    exploration: Float[Array, ""] = eqx.field(converter=_float_array, default=0.5)
    discount: Float[Array, ""] = eqx.field(converter=_float_array, default=0.9)
    floor: Float[Array, ""] = eqx.field(converter=_float_array, default=0.1)

    def __check_init__(self):
        _check_floor("UCBPriority", self.floor)
        if not isinstance(self.discount, jax.core.Tracer) and not 0 < float(self.discount) <= 1:
            raise ConfigurationError(
                f"UCBPriority: discount={float(self.discount)!r} must be in (0, 1]."
            )

    def init(self, num_objectives: int) -> BanditState:
        zeros = jnp.zeros((num_objectives,), jnp.float32)
        return BanditState(counts=zeros, rewards=zeros)

    def arm(self, state: BanditState) -> Int[Array, ""]:
        """The objective that gets priority in this state."""
        n = state.counts
        played = n > 0
        safe = jnp.where(played, n, 1.0)
        bonus = self.exploration * jnp.sqrt(2.0 * jnp.log1p(jnp.sum(n)) / safe)
        index = jnp.where(played, state.rewards / safe + bonus, jnp.inf)
        return jnp.argmax(index).astype(jnp.int32)

    def priorities(
        self, state: BanditState, history: History, key: PRNGKeyArray
    ) -> Float[Array, " objective"]:
        return _focus_weights(self.arm(state), _num_objectives(history), self.floor)

    def update(self, state: BanditState, feedback: Feedback, history: History) -> BanditState:
        arm = self.arm(state)
        pulled = jax.nn.one_hot(arm, state.counts.shape[0], dtype=jnp.float32)
        reward = _improved(feedback, arm).astype(jnp.float32)
        return BanditState(
            counts=self.discount * state.counts + pulled,
            rewards=self.discount * state.rewards + pulled * reward,
        )

    def utility(
        self, values: Float[Array, " objective"], weights: Float[Array, " objective"]
    ) -> Float[Array, ""]:
        return weighted_sum(values, weights)

    def lexicographic_order(self, num_objectives: int) -> None:
        return None


class EXP3State(eqx.Module):
    log_weights: Float[Array, " objective"]


class EXP3Priority(AbstractPriority):
    """EXP3 bandit over objectives, rewarded by the accepted improvement.

    Each step the arm is drawn from `p = (1 - gamma) softmax(log_weights) + gamma / M` (with
    the scheduler's key, so `select` and `decide` draw the same arm); the reward is as for
    `UCBPriority`, and the arm's log-weight grows by `gamma * reward / (p_arm * M)`.

    **Arguments:**

    - `gamma`: exploration rate and learning rate (array leaf in `(0, 1]`, default 0.2).
    - `floor`: total weight shared by the other objectives (array leaf, default 0.1).
    """

    scalarisation: ClassVar[str] = "sum"

    gamma: Float[Array, ""] = eqx.field(converter=_float_array, default=0.2)
    floor: Float[Array, ""] = eqx.field(converter=_float_array, default=0.1)

    def __check_init__(self):
        _check_floor("EXP3Priority", self.floor)
        if not isinstance(self.gamma, jax.core.Tracer) and not 0 < float(self.gamma) <= 1:
            raise ConfigurationError(
                f"EXP3Priority: gamma={float(self.gamma)!r} must be in (0, 1]."
            )

    def init(self, num_objectives: int) -> EXP3State:
        return EXP3State(log_weights=jnp.zeros((num_objectives,), jnp.float32))

    def probabilities(self, state: EXP3State) -> Float[Array, " objective"]:
        """The arm-drawing distribution."""
        num = state.log_weights.shape[0]
        return (1.0 - self.gamma) * jax.nn.softmax(state.log_weights) + self.gamma / num

    def priorities(
        self, state: EXP3State, history: History, key: PRNGKeyArray
    ) -> Float[Array, " objective"]:
        arm = jax.random.categorical(key, jnp.log(self.probabilities(state)))
        return _focus_weights(arm.astype(jnp.int32), _num_objectives(history), self.floor)

    def update(self, state: EXP3State, feedback: Feedback, history: History) -> EXP3State:
        num = state.log_weights.shape[0]
        arm = jnp.argmax(feedback.priorities).astype(jnp.int32)
        p = self.probabilities(state)[arm]
        reward = _improved(feedback, arm).astype(jnp.float32)
        step = self.gamma * reward / (p * num)
        return EXP3State(
            log_weights=state.log_weights + step * jax.nn.one_hot(arm, num, dtype=jnp.float32)
        )

    def utility(
        self, values: Float[Array, " objective"], weights: Float[Array, " objective"]
    ) -> Float[Array, ""]:
        return weighted_sum(values, weights)

    def lexicographic_order(self, num_objectives: int) -> None:
        return None
