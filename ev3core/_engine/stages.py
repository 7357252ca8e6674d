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
    Decision,
    Outcome,
    State,
    StepInfo,
    tree_concat,
    tree_index,
    tree_stack,
    tree_where,
)
from .placement import AbstractPlacement
from .sampling import sample
from .scoring import score_models, summaries


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
    winner = scheduler.select(scores, valid, state.scheduler_state, state.history)
    return Assessed(
        scores=scores,
        valid=valid,
        winner=winner,
        winner_params=placement.take(held, winner, state.current),
    )


def _decide(
    assessors: Sequence[AbstractAssessor],
    scheduler: AbstractScheduler,
    assessed: Assessed,
    state: State,
    batch: PyTree[Array],
) -> tuple[Float[Array, "objective 3 example"], Decision, PyTree, Bool[Array, ""]]:
    """The scheduler's verdict on `(winner, current, stable)`, with the engine's own safety
    net: an invalid winner (non-finite parameters or scores) is never taken."""
    trio = tree_stack([assessed.winner_params, state.current, state.stable])
    scores = score_models(assessors, trio, state.static, batch)
    winner_valid = assessed.valid[assessed.winner] & jnp.all(jnp.isfinite(scores[:, WINNER]))
    decision, sstate = scheduler.decide(scores, winner_valid, state.scheduler_state, state.history)
    choice = jnp.where(
        (decision.choice == WINNER) & ~winner_valid, CURRENT, decision.choice
    ).astype(jnp.int32)
    decision = eqx.tree_at(
        lambda d: (d.choice, d.update_stable, d.significant),
        decision,
        (choice, decision.update_stable & winner_valid, decision.significant & winner_valid),
    )
    return scores, decision, sstate, winner_valid


def _adapt_proposers(
    proposers: Sequence[AbstractProposer],
    proposer_states: Sequence[PyTree],
    winner: Int[Array, ""],
    decision: Decision,
    params: PyTree[Array],
) -> tuple[PyTree, ...]:
    """Each proposer learns which of its candidates (if any) was accepted."""
    accepted = decision.choice == WINNER
    offset, out = 0, []
    for p, ps in zip(proposers, proposer_states):
        local = winner - offset
        mine = accepted & (local >= 0) & (local < p.num_candidates)
        outcome = Outcome(
            accepted_index=jnp.where(mine, local, -1).astype(jnp.int32),
            accepted=accepted,
            significant=decision.significant,
            params=params,
            changed=decision.choice != CURRENT,
        )
        out.append(p.adapt(ps, outcome))
        offset += p.num_candidates
    return tuple(out)


def adapt(
    proposers: Sequence[AbstractProposer],
    assessors: Sequence[AbstractAssessor],
    scheduler: AbstractScheduler,
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
    scores, decision, sstate, _ = _decide(
        assessors, scheduler, assessed, state, sample(data, key, size)
    )
    choice, winner = decision.choice, assessed.winner
    trio = tree_stack([assessed.winner_params, state.current, state.stable])
    new_current = tree_index(trio, choice)
    accepted = choice == WINNER
    decide_mean = summaries(assessors, scores)
    new_state = State(
        step=state.step + 1,
        key=next_key,
        current=new_current,
        stable=tree_where(decision.update_stable, assessed.winner_params, state.stable),
        proposer_states=_adapt_proposers(
            proposers, explored.proposer_states, winner, decision, new_current
        ),
        scheduler_state=sstate,
        history=state.history.record(
            step=state.step,
            winner=winner,
            choice=choice,
            accepted=accepted,
            significant=decision.significant,
            score=decide_mean[:, choice],
        ),
        static=state.static,
    )
    info = StepInfo(
        step=state.step,
        winner=winner,
        choice=choice,
        accepted=accepted,
        rolled_back=choice == STABLE,
        significant=decision.significant,
        num_invalid=jnp.sum(~assessed.valid).astype(jnp.int32),
        valid=assessed.valid,
        assess_mean=summaries(assessors, assessed.scores),
        decide_mean=decide_mean,
        decide_lower=decision.lower,
        decide_upper=decision.upper,
        priorities=decision.priorities,
    )
    return new_state, info
