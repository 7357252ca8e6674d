"""Built-in adapt-stage schedulers: the EV3 decision rule and an always-accept baseline."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int, PRNGKeyArray, PyTree

from .._assess.metrics import AbstractBatchAssessor
from .._interfaces import AbstractAssessor, AbstractScheduler, ComponentName
from .._types import CURRENT, STABLE, WINNER, Choice, Decision, History, choice_at
from ..errors import ConfigurationError
from .bounds import (
    AbstractBound,
    PairedBound,
    Utility,
    advantage,
    bonferroni_z,
    weighted_mean,
)
from .priorities import (
    AbstractPriority,
    Constraint,
    Feedback,
    Objective,
    lexicographic_rank,
)


def _positive_alpha(x: Any) -> Float[Array, ""]:
    if not isinstance(x, jax.core.Tracer):
        v = float(jnp.asarray(x))
        if not 0.0 < v < float("inf"):
            raise ConfigurationError(
                f"alpha={v!r} is outside (0, inf). alpha is the number of standard errors in "
                "the confidence bound: use a positive finite value such as 0.5 or 4.0."
            )
    return jnp.asarray(x, dtype=jnp.float32)


def _traced_alpha(alpha: Float[Array, ""]) -> Float[Array, ""]:
    """`alpha` inside the step: a value outside `(0, inf)` (negative, zero, NaN, inf) becomes
    `+inf`, which makes every bound uninformative, so nothing is accepted or rolled back.

    `__init__` rejects such values, but alphas are array leaves that can be changed without
    it (`eqx.tree_at`, as tuning does); a negative alpha would turn lower bounds into upper
    bounds and make acceptance *easier*. This is the guard that cannot be bypassed.
    """
    ok = jnp.isfinite(alpha) & (alpha > 0)
    return jnp.where(ok, alpha, jnp.inf)


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


#: Tie-break order of the decide stage: a tie never moves the model.
_ORDER = (CURRENT, WINNER, STABLE)


def _component(kind: str, spec: Any, base: type, owner: str) -> Any:
    """An instance of `base` as is; a registered name kept as a `ComponentName`, which
    `Pipeline.build()` resolves through its plugins (components never look up a registry)."""
    if isinstance(spec, str):
        return ComponentName(kind, spec)
    if not isinstance(spec, base):
        raise ConfigurationError(
            f"{owner}: {kind}={spec!r} is not an ev3core.{base.__name__} (or a registered "
            f"{kind} name; `ev3 plugins` lists them)."
        )
    return spec


def _check_directions(
    objectives: Sequence[Objective], assessors: Sequence[AbstractAssessor], owner: str
) -> None:
    """Objectives must not pull one score both ways, nor against its assessor's direction."""
    names = [a.name for a in assessors]
    seen: dict[str, tuple[int, str]] = {}
    for i, o in enumerate(objectives):
        name, direction = o.name, o.direction
        if name is None:
            continue
        if name in seen and seen[name][1] != direction:
            j, other = seen[name]
            raise ConfigurationError(
                f"{owner}: objective {name!r} is given conflicting directions: "
                f"objectives[{j}] has direction={other!r} and objectives[{i}] has "
                f"direction={direction!r}. An objective is either maximised or minimised: "
                "keep one of them (or give them different names if they are different scores)."
            )
        seen.setdefault(name, (i, direction))
        if i < len(names) and name in names and names[i] != name:
            raise ConfigurationError(
                f"{owner}: objectives[{i}] is named {name!r} but assessor #{i} is "
                f"{names[i]!r} ({name!r} is assessor #{names.index(name)}). Objectives are "
                f"matched to assessors by position: list them in assessor order {names}."
            )
        declared = assessors[i].direction if i < len(assessors) else None
        if declared is not None and declared != direction:
            raise ConfigurationError(
                f"{owner}: assessor #{i} {names[i]!r} declares direction={declared!r} (its "
                f"scores are better when {'higher' if declared == 'max' else 'lower'}) but "
                f"objectives[{i}] has direction={direction!r}, which would optimise it the "
                f"wrong way. Use Objective({names[i]!r}, direction={declared!r})."
            )


class EV3SchedulerState(eqx.Module):
    """`EV3Scheduler`'s state: the key its resamples and bandits draw from (each step uses
    `fold_in(key, history.count)`), and its priority component's state."""

    key: PRNGKeyArray
    priority: PyTree[Any]


class _Keys(NamedTuple):
    select: PRNGKeyArray
    decide: PRNGKeyArray
    priority: PRNGKeyArray


class EV3Scheduler(AbstractScheduler):
    """The EV3 decision rule with a pluggable confidence bound and objective priorities.

    One utility `U` is tested per step: the `objective`-th objective alone, or, with a
    `priority` component, the objectives combined with the priorities it gives for this step.
    The `bound` gives confidence intervals of `U`; with a paired bound (the default) they are
    intervals of the advantage `U(model) - U(reference)`.

    *Assess*: the winner is the valid candidate with the highest lower bound (at
    `assess_alpha`) relative to the current model, among those that keep the constraints on
    the assess data when any does.

    *Decide*: on the decide set, with intervals relative to the current model (whose own is
    `[0, 0]` for a paired bound), the highest lower bound among the winner, the current and
    the stable model becomes the current model (ties keep the current model, then prefer the
    winner). So the winner is accepted when `lower(U(winner) - U(current)) > 0` and it beats
    the roll-back candidate; the model rolls back when `lower(U(stable) - U(current)) > 0`
    is the highest. The winner replaces the stable model, and the step is *significant*, when
    its lower bound relative to the stable model beats the stable model's upper bound, i.e.
    `lower(U(winner) - U(stable)) > 0`. Constraints must hold for every move. With
    `bound=NormalBound()` (marginal intervals) this is exactly the reference EV3 rule.
    `docs/statistics.md` says what each bound guarantees.

    **Arguments:**

    - `assess_alpha`, `decide_alpha`: numbers of standard errors (array leaves, in
      `(0, inf)`); the one-sided level of a bound is `Phi(-alpha)` (`z_for_level(0.95)` is
      1.645).
    - `objective`: without `priority`, the index of the objective that decides.
    - `bound`: an `AbstractBound`, or a registered name (`"paired"`, `"normal"`,
      `"bootstrap"`) that `Pipeline.build()` resolves through its plugins. Default
      `PairedBound()`.
    - `priority`: an `AbstractPriority` (or a registered name, resolved the same way), for
      several objectives.
    - `objectives`: one `Objective` (or name) per assessor, in assessor order: names,
      directions and batch-level metrics. Default: every assessor's mean, maximised.
    - `constraints`: `Constraint`s that every move must satisfy.

    ```python
    EV3Scheduler(
        assess_alpha=0.5, decide_alpha=z_for_level(0.95),
        priority=UCBPriority(),
        objectives=[Objective("accuracy"), Objective("neg_cross_entropy")],
        constraints=[Constraint("accuracy", max_drop=0.005)],
    )
    ```
    """

    assess_alpha: Float[Array, ""]
    decide_alpha: Float[Array, ""]
    bound: AbstractBound | ComponentName
    priority: AbstractPriority | ComponentName | None
    objectives: tuple[Objective, ...] | None
    constraints: tuple[Constraint, ...]
    objective: int = eqx.field(static=True)

    def __init__(
        self,
        assess_alpha: Any = 0.5,
        decide_alpha: Any = 4.0,
        objective: int = 0,
        *,
        bound: AbstractBound | str | None = None,
        priority: AbstractPriority | str | None = None,
        objectives: Sequence[Objective | str] | None = None,
        constraints: Sequence[Constraint] = (),
    ):
        self.assess_alpha = _positive_alpha(assess_alpha)
        self.decide_alpha = _positive_alpha(decide_alpha)
        self.objective = int(objective)
        self.bound = (
            PairedBound()
            if bound is None
            else _component("bound", bound, AbstractBound, "EV3Scheduler")
        )
        self.priority = (
            None
            if priority is None
            else _component("priority", priority, AbstractPriority, "EV3Scheduler")
        )
        if objectives is not None:
            objectives = tuple(Objective(o) if isinstance(o, str) else o for o in objectives)
            for o in objectives:
                if not isinstance(o, Objective):
                    raise ConfigurationError(
                        f"EV3Scheduler: objectives entry {o!r} is not an ev3core.Objective or a "
                        "name."
                    )
        self.objectives = objectives
        constraints = tuple(constraints)
        for c in constraints:
            if not isinstance(c, Constraint):
                raise ConfigurationError(
                    f"EV3Scheduler: constraint {c!r} is not an ev3core.Constraint, e.g. "
                    "Constraint('accuracy', max_drop=0.005)."
                )
        self.constraints = constraints

    # ------------------------------------------------------------ configuration
    @property
    def _bound(self) -> AbstractBound:
        """The bound (a name was resolved when the pipeline was built; `init` checks)."""
        assert isinstance(self.bound, AbstractBound), self.bound
        return self.bound

    @property
    def _priority(self) -> AbstractPriority:
        assert isinstance(self.priority, AbstractPriority), self.priority
        return self.priority

    def _order(self, num_objectives: int) -> tuple[tuple[int, ...], Float[Array, " order"]] | None:
        """The lexicographic order and tolerances of the priority, if it tests objectives in
        order (`AbstractPriority.lexicographic_order`); `None` for a scalar utility."""
        return None if self.priority is None else self._priority.lexicographic_order(num_objectives)

    def _constraint_index(self, constraint: Constraint, num_objectives: int) -> int:
        target = constraint.objective
        if isinstance(target, str):
            names = [o.name for o in self.objectives] if self.objectives is not None else []
            if target not in names:
                raise ConfigurationError(
                    f"EV3Scheduler: a constraint refers to the objective {target!r}, but the "
                    f"objectives are named {names or '(unnamed)'}. Name them with "
                    "objectives=[Objective('accuracy'), ...] in assessor order (an Engine names "
                    "them after its assessors), or give the constraint the objective's index."
                )
            return names.index(target)
        if not 0 <= target < num_objectives:
            raise ConfigurationError(
                f"EV3Scheduler: a constraint refers to objective {target}, but the pipeline "
                f"has {num_objectives}. Use an index in [0, {num_objectives})."
            )
        return target

    def bind(self, assessors: Sequence[AbstractAssessor]) -> EV3Scheduler:
        """Name the objectives after `assessors` and use batch-level assessors' metrics.

        Without `objectives`, objective `i` becomes `Objective(assessor_i.name, direction,
        metric)`, where `direction` is the assessor's declared `direction`
        and `metric` is the assessor itself when it is batch-level (F1, AUC, calibration), so
        the bounds test the metric, not a mean of its per-example encodings. Given
        `objectives`, unnamed ones take the assessor's name and batch-level ones without a
        `metric` get the assessor. The engine calls this once when it is built.
        """

        def filled(a: AbstractAssessor, o: Objective | None) -> Objective:
            batch = a if isinstance(a, AbstractBatchAssessor) else None
            if o is None:
                return Objective(a.name, a.direction, batch)
            return Objective(
                o.name if o.name is not None else a.name,
                o.direction,
                o.metric if o.metric is not None else batch,
            )

        assessors = tuple(assessors)
        if self.objectives:
            _check_directions(self.objectives, assessors, type(self).__name__)
        given: Sequence[Objective | None] | None = self.objectives
        if given is not None and len(given) != len(assessors):
            return self  # `init` reports the mismatch
        if given is None:
            given = (None,) * len(assessors)
        objectives = tuple(filled(a, o) for a, o in zip(assessors, given))
        return eqx.tree_at(lambda s: s.objectives, self, objectives, is_leaf=lambda x: x is None)

    def init(self, num_objectives: int, key: PRNGKeyArray) -> EV3SchedulerState:
        """Check the objectives against `num_objectives`; the state keeps `key` for the
        bound's resamples and the priority's draws (so they follow the engine's key)."""
        for name in (self.bound, self.priority):
            if isinstance(name, ComponentName):
                raise ConfigurationError(
                    f"EV3Scheduler: the {name} is a registered name that was never resolved. "
                    "Names are resolved when a pipeline is built: use "
                    "ev3core.Pipeline(...).build(), or pass an instance "
                    f"(ev3core.make({name.kind!r}, {name.name!r}))."
                )
        if not 0 <= self.objective < num_objectives:
            raise ConfigurationError(
                f"EV3Scheduler: objective={self.objective} but the pipeline has "
                f"{num_objectives} assessor(s). Use an index in [0, {num_objectives})."
            )
        if self.objectives is not None and len(self.objectives) != num_objectives:
            raise ConfigurationError(
                f"EV3Scheduler: {len(self.objectives)} objectives for {num_objectives} "
                "assessor(s). Give one Objective per assessor, in assessor order."
            )
        for c in self.constraints:
            self._constraint_index(c, num_objectives)
        pstate = None if self.priority is None else self._priority.init(num_objectives)
        return EV3SchedulerState(key=key, priority=pstate)

    # ------------------------------------------------------------ building blocks
    def _keys(self, state: EV3SchedulerState, history: History) -> _Keys:
        return _Keys(*jax.random.split(jax.random.fold_in(state.key, history.count), 3))

    def _value(self, o: int) -> Utility:
        """Objective `o` (higher is better) of one model's scores under example weights."""
        spec = None if self.objectives is None else self.objectives[o]
        if spec is None:
            return lambda v, w: weighted_mean(v[o], w)
        return lambda v, w: spec.value(v[o], w)

    def _utility(
        self, state: EV3SchedulerState, history: History, key: PRNGKeyArray, num: int
    ) -> tuple[Float[Array, " objective"], Utility]:
        if self.priority is None:
            return jax.nn.one_hot(self.objective, num, dtype=jnp.float32), self._value(
                self.objective
            )
        weights = self._priority.priorities(state.priority, history, key)
        values = [self._value(o) for o in range(num)]

        def utility(v, w):
            return self._priority.utility(jnp.stack([f(v, w) for f in values]), weights)

        return weights, utility

    def _advantages(
        self,
        scores: Float[Array, "objective model example"],
        objectives: Sequence[int],
        reference: int,
        z: Float[Array, ""],
        key: PRNGKeyArray,
        mask: Bool[Array, " model"],
    ) -> tuple[Float[Array, "row model"], Float[Array, "row model"], Float[Array, "row model"]]:
        """Per-objective `(point, lower, upper)` of each model's advantage over `reference`."""
        rows = [
            advantage(
                self._bound.interval(self._value(o), scores, reference, z, key, mask),
                reference,
                self._bound.paired,
            )
            for o in objectives
        ]
        point, lower, upper = (jnp.stack(x) for x in zip(*rows))
        return point, lower, upper

    def _constraints_hold(
        self,
        scores: Float[Array, "objective model example"],
        reference: int,
        z: Float[Array, ""],
        key: PRNGKeyArray,
        mask: Bool[Array, " model"],
    ) -> Bool[Array, " model"]:
        """Whether replacing `reference` by each model keeps every constraint."""
        num_models = scores.shape[1]
        if not self.constraints:
            return jnp.ones((num_models,), bool)
        index = [self._constraint_index(c, scores.shape[0]) for c in self.constraints]
        _, lower, _ = self._advantages(scores, index, reference, z, key, mask)
        drop = jnp.stack([c.max_drop for c in self.constraints])[:, None]
        return jnp.all(lower >= -drop, axis=0) | (jnp.arange(num_models) == reference)

    # ------------------------------------------------------------ the two stages
    def select(
        self,
        scores: Float[Array, "objective model example"],
        valid: Bool[Array, " candidate"],
        state: EV3SchedulerState,
        history: History,
    ) -> Int[Array, ""]:
        k = valid.shape[0]
        keys = self._keys(state, history)
        mask = jnp.concatenate([valid, jnp.zeros((2,), bool)])
        assess_alpha = _traced_alpha(self.assess_alpha)
        lexicographic = self._order(scores.shape[0])
        if lexicographic is not None:
            order, tol = lexicographic
            z = bonferroni_z(assess_alpha, len(order))
            _, lower, _ = self._advantages(scores, order, k, z, keys.select, mask)
            rank, at = lexicographic_rank(lower[:, :k], tol)
            ok = valid & jnp.isfinite(at)
            best = jnp.min(jnp.where(ok, rank, len(order) + 1))
            score = jnp.where(ok & (rank == best), at, -jnp.inf)
        else:
            _, utility = self._utility(state, history, keys.priority, scores.shape[0])
            iv = self._bound.interval(utility, scores, k, assess_alpha, keys.select, mask)
            lcb = iv.lower[:k]
            score = jnp.where(valid & jnp.isfinite(lcb), lcb, -jnp.inf)
        if self.constraints:
            # Prefer candidates that keep the constraints on the assess data, if any does.
            holds = self._constraints_hold(scores, k, assess_alpha, keys.select, mask)[:k]
            keeps = jnp.where(holds, score, -jnp.inf)
            score = jnp.where(jnp.any(jnp.isfinite(keeps)), keeps, score)
        return jnp.argmax(score).astype(jnp.int32)

    def decide(
        self,
        scores: Float[Array, "objective 3 example"],
        winner_valid: Bool[Array, ""],
        state: EV3SchedulerState,
        history: History,
    ) -> tuple[Decision, EV3SchedulerState]:
        num = scores.shape[0]
        keys = self._keys(state, history)
        z = _traced_alpha(self.decide_alpha)
        yes, no = jnp.array(True), jnp.array(False)
        movable = jnp.stack([winner_valid, yes, yes])
        moves = jnp.stack([winner_valid, no, yes])  # comparisons with the current model
        versus_stable = jnp.stack([winner_valid, no, no])
        holds = self._constraints_hold(scores, CURRENT, z, keys.decide, moves)
        holds_stable = self._constraints_hold(scores, STABLE, z, keys.decide, versus_stable)
        order_ = jnp.array(_ORDER, jnp.int32)

        lexicographic = self._order(num)
        if lexicographic is not None:
            order, tol = lexicographic
            zl = bonferroni_z(z, len(order))
            _, lo, up = self._advantages(scores, order, CURRENT, zl, keys.decide, moves)
            rank, at = lexicographic_rank(lo, tol)
            passes = movable & (rank < len(order)) & jnp.isfinite(at) & holds
            passes = passes.at[CURRENT].set(False)
            winner_first = (rank[WINNER] < rank[STABLE]) | (
                (rank[WINNER] == rank[STABLE]) & (at[WINNER] >= at[STABLE])
            )
            pick = jnp.where(
                passes[WINNER] & (~passes[STABLE] | winner_first),
                WINNER,
                jnp.where(passes[STABLE], STABLE, CURRENT),
            ).astype(jnp.int32)
            row = jnp.where(pick == CURRENT, 0, jnp.minimum(rank[pick], len(order) - 1))
            priorities = jax.nn.one_hot(jnp.asarray(order)[row], num, dtype=jnp.float32)
            lower, upper = lo[row], up[row]
            _, lo_s, _ = self._advantages(scores, order, STABLE, zl, keys.decide, versus_stable)
            rank_s, at_s = lexicographic_rank(lo_s, tol)
            beats_stable = (rank_s[WINNER] < len(order)) & jnp.isfinite(at_s[WINNER])
        else:
            priorities, utility = self._utility(state, history, keys.priority, num)
            iv = self._bound.interval(utility, scores, CURRENT, z, keys.decide, moves)
            lower, upper = iv.lower, iv.upper
            ok = movable & jnp.isfinite(lower) & holds
            masked = jnp.where(ok, lower, -jnp.inf)
            pick = order_[jnp.argmax(masked[order_])]
            if self._bound.paired:
                iv_s = self._bound.interval(utility, scores, STABLE, z, keys.decide, versus_stable)
            else:  # marginal intervals do not depend on the reference
                iv_s = iv
            beats_stable = jnp.isfinite(iv_s.lower[WINNER]) & (
                iv_s.lower[WINNER] > iv_s.upper[STABLE]
            )
        significant = winner_valid & beats_stable & holds_stable[WINNER]

        pstate = state.priority
        if self.priority is not None:
            point, lo_o, up_o = self._advantages(scores, range(num), CURRENT, z, keys.decide, moves)
            moved = pick != CURRENT
            gain = lambda x: jnp.where(moved, x[:, pick], 0.0)  # noqa: E731
            feedback = Feedback(
                accepted=pick == WINNER,
                significant=significant,
                gain=gain(point),
                gain_lower=gain(lo_o),
                gain_upper=gain(up_o),
                priorities=priorities,
            )
            pstate = self._priority.update(state.priority, feedback, history)
        decision = Decision(
            choice=choice_at(pick),
            update_stable=significant,
            significant=significant,
            lower=lower,
            upper=upper,
            priorities=priorities,
        )
        return decision, EV3SchedulerState(key=state.key, priority=pstate)


class AlwaysAccept(AbstractScheduler):
    """Baseline: the best candidate by mean assess score is always accepted (if finite).

    The stable model follows the current one; no step is significant. Useful as the
    "no safety control" comparison.

    **Arguments:**

    - `objective`: index of the assessor whose mean picks the winner.
    """

    objective: int = eqx.field(static=True, default=0)

    def bind(self, assessors: Sequence[AbstractAssessor]) -> AlwaysAccept:
        return self

    def init(self, num_objectives: int, key: PRNGKeyArray) -> None:
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
        return (
            Decision(
                choice=Choice.where(ok, Choice.winner, Choice.current),
                update_stable=ok,
                significant=jnp.array(False),
                lower=mean,
                upper=mean,
                priorities=jax.nn.one_hot(self.objective, scores.shape[0], dtype=jnp.float32),
            ),
            state,
        )
