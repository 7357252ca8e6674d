"""The three stages of an EV3 step, each a pure function of arrays and components.

`Engine.step_pure` is `explore`, then `assess`, then `adapt`; the placement (one device or a
candidate mesh) was chosen when the engine was built and is passed in, so no stage branches
on it. Each stage takes the components it needs, the state and its own stream and key.
"""

from __future__ import annotations

from collections.abc import Sequence

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int, PRNGKeyArray, PyTree

from .._interfaces import AbstractAssessor, AbstractProposer, AbstractScheduler
from .._types import (
    CURRENT,
    STABLE,
    WINNER,
    Choice,
    Decision,
    Outcome,
    State,
    StepInfo,
    choice_index,
    tree_concat,
    tree_index,
    tree_stack,
    tree_where,
)
from ..errors import ConfigurationError
from .placement import AbstractPlacement
from .sampling import sample
from .scoring import summaries


class Explored(eqx.Module):
    """The explore stage's result: all proposers' candidates and their new states."""

    candidates: PyTree[Array]
    proposer_states: tuple[PyTree, ...]


class Assessed(eqx.Module):
    """The assess stage's result: the scores that picked the winner, and the winner."""

    scores: Float[Array, "objective model example"]
    valid: Bool[Array, " candidate"]
    winner: Int[Array, ""]
    winner_params: PyTree[Array]
    select_ok: Bool[Array, ""]


def explore(
    proposers: Sequence[AbstractProposer], state: State, data: PyTree[Array], key: PRNGKeyArray
) -> Explored:
    """Every proposer maps the current parameters to its candidates (concatenated on `K`)."""
    keys = jax.random.split(key, len(proposers))
    cands, pstates = [], []
    for p, ps, k in zip(proposers, state.proposer_states, keys):
        c, ps = p.propose(state.current, state.static, ps, data, k)
        cands.append(c)
        pstates.append(ps)
    return Explored(candidates=tree_concat(cands), proposer_states=tuple(pstates))


def assess(
    assessors: Sequence[AbstractAssessor],
    scheduler: AbstractScheduler,
    placement: AbstractPlacement,
    candidates: PyTree[Array],
    state: State,
    data: PyTree[Array],
    key: PRNGKeyArray,
    size: int,
    chunk: int | None,
) -> Assessed:
    """Score the candidates, current and stable on the *same* `size` examples; the scheduler
    picks the winner. Candidates with non-finite parameters or scores are invalid."""
    batch = sample(data, key, size)
    scores, finite, held = placement.score(assessors, candidates, state, batch, chunk)
    k = finite.shape[0]
    valid = finite & jnp.all(jnp.isfinite(scores[:, :k]), axis=(0, 2))
    selected = scheduler.select(scores, valid, state.scheduler_state, state.history)
    # The scheduler is a plugin: its index is checked, never trusted. Out of range (JAX would
    # clamp it to a real candidate) means "no winner": the current model is kept.
    select_ok = (selected >= 0) & (selected < k)
    winner = jnp.where(select_ok, selected, 0).astype(jnp.int32)
    return Assessed(
        scores=scores,
        valid=valid,
        winner=winner,
        winner_params=placement.take(held, winner, state.current),
        select_ok=select_ok,
    )


def _decide(
    assessors: Sequence[AbstractAssessor],
    scheduler: AbstractScheduler,
    placement: AbstractPlacement,
    assessed: Assessed,
    state: State,
    batch: PyTree[Array],
) -> tuple[Float[Array, "objective 3 example"], Decision, PyTree, Bool[Array, ""]]:
    """The scheduler's verdict on `(winner, current, stable)`, with the engine's own safety
    net: an invalid winner (non-finite parameters or scores, or an out-of-range `select`) is
    never taken, and a choice that is no `Choice` item (a value out of range) keeps the
    current model. Also returns whether the choice was in range.

    A stable model identical to the current one (the usual case right after a significant
    step) gets the current model's scores: the three models are scored as one batch, and
    XLA may round one slot differently from another, so without this a tie could show as a
    tiny "reliable" advantage of the stable model and roll the model back to itself (which
    restarts every `on_reject="continue"` lineage)."""
    trio = tree_stack([assessed.winner_params, state.current, state.stable])
    scores = placement.score_replicated(assessors, trio, state.static, batch)
    same = _identical(state.current, state.stable)
    scores = scores.at[:, STABLE].set(jnp.where(same, scores[:, CURRENT], scores[:, STABLE]))
    winner_valid = (
        assessed.valid[assessed.winner]
        & assessed.select_ok
        & jnp.all(jnp.isfinite(scores[:, WINNER]))
    )
    decision, sstate = scheduler.decide(scores, winner_valid, state.scheduler_state, state.history)
    if not isinstance(decision.choice, Choice):
        raise ConfigurationError(
            f"scheduler {type(scheduler).__qualname__}: decide returned a Decision whose "
            f"choice is {decision.choice!r}, not an ev3core.Choice. Return Choice.winner, "
            "Choice.current or Choice.stable (Choice.where(pred, a, b) picks one in traced "
            "code; ev3core.choice_at(index) is the item at a decide position)."
        )
    choice_ok = choice_index(decision.choice) >= 0
    choice = Choice.where(
        ((decision.choice == Choice.winner) & ~winner_valid) | ~choice_ok,
        Choice.current,
        decision.choice,
    )
    keep = winner_valid & choice_ok
    decision = eqx.tree_at(
        lambda d: (d.choice, d.update_stable, d.significant),
        decision,
        (choice, decision.update_stable & keep, decision.significant & keep),
    )
    return scores, decision, sstate, choice_ok


def _identical(a: PyTree[Array], b: PyTree[Array]) -> Bool[Array, ""]:
    """Whether two models of one structure have bitwise-equal array leaves."""
    leaves = [jnp.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b))]
    return jnp.all(jnp.stack(leaves)) if leaves else jnp.array(True)


def _adapt_proposers(
    proposers: Sequence[AbstractProposer],
    proposer_states: Sequence[PyTree],
    winner: Int[Array, ""],
    decision: Decision,
    params: PyTree[Array],
    ranked: Float[Array, "objective candidate"],
) -> tuple[PyTree, ...]:
    """Each proposer learns which of its candidates (if any) was accepted, and its
    candidates' assess summaries (`Outcome.scores`, `-inf` where invalid)."""
    accepted = decision.choice == Choice.winner
    offset, out = 0, []
    for p, ps in zip(proposers, proposer_states):
        local = winner - offset
        mine = accepted & (local >= 0) & (local < p.num_candidates)
        outcome = Outcome(
            accepted_index=jnp.where(mine, local, -1).astype(jnp.int32),
            accepted=accepted,
            significant=decision.significant,
            params=params,
            changed=decision.choice != Choice.current,
            scores=ranked[:, offset : offset + p.num_candidates],
        )
        out.append(p.adapt(ps, outcome))
        offset += p.num_candidates
    return tuple(out)


def adapt(
    proposers: Sequence[AbstractProposer],
    assessors: Sequence[AbstractAssessor],
    scheduler: AbstractScheduler,
    placement: AbstractPlacement,
    explored: Explored,
    assessed: Assessed,
    state: State,
    data: PyTree[Array],
    key: PRNGKeyArray,
    size: int,
    next_key: PRNGKeyArray,
) -> tuple[State, StepInfo]:
    """Decide among winner, current and stable on `size` decide examples; update the
    proposers and the history; return the next state (carrying `next_key`) and the step's
    info."""
    scores, decision, sstate, choice_ok = _decide(
        assessors, scheduler, placement, assessed, state, sample(data, key, size)
    )
    choice, winner = decision.choice, assessed.winner
    position = choice_index(choice)  # in range: `_decide` replaced any other value
    trio = tree_stack([assessed.winner_params, state.current, state.stable])
    new_current = tree_index(trio, position)
    accepted = choice == Choice.winner
    decide_mean = summaries(assessors, scores)
    assess_mean = summaries(assessors, assessed.scores)
    k = assessed.valid.shape[0]
    ranked = jnp.where(assessed.valid, assess_mean[:, :k], -jnp.inf)  # Outcome.scores
    new_state = State(
        step=state.step + 1,
        key=next_key,
        current=new_current,
        stable=tree_where(decision.update_stable, assessed.winner_params, state.stable),
        proposer_states=_adapt_proposers(
            proposers, explored.proposer_states, winner, decision, new_current, ranked
        ),
        scheduler_state=sstate,
        history=state.history.record(
            step=state.step,
            winner=winner,
            choice=position,
            accepted=accepted,
            significant=decision.significant,
            score=decide_mean[:, position],
        ),
        static=state.static,
    )
    info = StepInfo(
        step=state.step,
        winner=winner,
        choice=choice,
        accepted=accepted,
        rolled_back=choice == Choice.stable,
        significant=decision.significant,
        num_invalid=jnp.sum(~assessed.valid).astype(jnp.int32),
        valid=assessed.valid,
        assess_mean=assess_mean,
        decide_mean=decide_mean,
        decide_lower=decision.lower,
        decide_upper=decision.upper,
        priorities=decision.priorities,
        bad_indices=(~assessed.select_ok).astype(jnp.int32) + (~choice_ok).astype(jnp.int32),
    )
    return new_state, info
