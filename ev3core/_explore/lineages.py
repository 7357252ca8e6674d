"""What a gradient proposer does after each decision: trajectory growth, the `on_reject`
policies for the candidates that were not accepted (`"reset"`, `"copy"`, `"continue"`
lineages, truncation) and evolving hyperparameters (`Evolve`)."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool

from .._stateful import trainable
from .._types import Outcome, tree_all_finite, tree_concat, tree_index, tree_where
from .blocks import (
    GradientLike,
    GradientProposerState,
    block_rows,
    broadcast,
    copy_rows,
    get_slot,
    lineages_finite,
    ranks,
    set_slot,
    slots,
    where_rows,
)
from .hyper import opt_hyperparams, with_opt_hyperparams
from .population import log_move, pick, rows_of


def after_decision(
    proposer: GradientLike, state: GradientProposerState, outcome: Outcome
) -> GradientProposerState:
    """`GradientProposer.adapt`: growth, then the `on_reject` policy, then evolution."""
    state = _grow(proposer, state, outcome)
    before = state
    restart = None
    if proposer.on_reject != "keep":
        new = _policy_opt_states(proposer, state, outcome)
        if state.lineages is None:
            state = dataclasses.replace(state, opt_states=new)
        elif proposer.evolve is not None and proposer.evolve.truncate is not None:
            state, restart = _truncate_lineages(proposer, state, outcome)
        else:
            state = _continue_lineages(proposer, state, new, outcome)
    if proposer.evolve is not None:
        state = _evolve(proposer, before, state, outcome, restart)
    return state


def _grow(
    proposer: GradientLike, state: GradientProposerState, outcome: Outcome
) -> GradientProposerState:
    """Trajectory growth: longer after `patience` non-significant steps, back to `steps`
    after a significant one."""
    if not proposer.grows:
        return state
    assert state.streak is not None and state.length is not None  # a growing proposer's
    streak = jnp.where(outcome.significant, 0, state.streak + 1)
    due = streak >= proposer.patience
    longer = jnp.ceil(state.length.astype(jnp.float32) * proposer.growth_factor)
    longer = jnp.minimum(longer, proposer.max_steps).astype(jnp.int32)
    length = jnp.where(outcome.significant, proposer.steps, jnp.where(due, longer, state.length))
    return dataclasses.replace(
        state,
        length=length.astype(jnp.int32),
        streak=jnp.where(due, 0, streak).astype(jnp.int32),
    )


def _policy_opt_states(
    proposer: GradientLike, state: GradientProposerState, outcome: Outcome
) -> Any:
    """The optimizer states after a `"reset"` or `"copy"` policy (also the optimizer states
    of `"continue"`)."""
    n_loss = len(proposer.losses)
    sizes = [len(g) for g in proposer.groups]
    new = []
    for j, (opt, per_opt) in enumerate(zip(proposer.optimizers, state.opt_states)):
        base = j * n_loss
        if proposer.on_reject == "reset":
            fresh = opt.transformation().init(trainable(outcome.params))
            blocks = []
            start = base
            for o, size in zip(per_opt, sizes):
                keep = jnp.arange(start, start + size) == outcome.accepted_index
                blocks.append(where_rows(~keep, fresh, o))
                start += size
            new.append(tuple(blocks))
        else:  # copy (also the optimizer states of "continue")
            whole = tree_concat(list(per_opt))
            local = outcome.accepted_index - base
            inside = (local >= 0) & (local < n_loss)
            src = tree_index(whole, jnp.clip(local, 0, n_loss - 1))
            blocks = []
            for o, size in zip(per_opt, sizes):
                blocks.append(tree_where(inside, broadcast(src, size), o))
            new.append(tuple(blocks))
    return tuple(new)


def _continue_lineages(
    proposer: GradientLike, state: GradientProposerState, opt_states: Any, outcome: Outcome
) -> GradientProposerState:
    """`"continue"`: keep each lineage while the current model stays; restart them all
    from it when it changes, and any non-finite one from it with a fresh optimizer
    state."""
    changed = outcome.current_changed
    assert state.lineages is not None  # "continue" keeps lineages
    lineages, states = [], []
    for opt, per_lin, per_opt in zip(proposer.optimizers, state.lineages, opt_states):
        fresh = opt.transformation().init(trainable(outcome.params))
        lin_blocks, opt_blocks = [], []
        for p, o in zip(per_lin, per_opt):
            finite = tree_all_finite(p, batch_dims=1)
            lin_blocks.append(where_rows(changed | ~finite, outcome.params, p))
            opt_blocks.append(where_rows(~finite, fresh, o))
        lineages.append(tuple(lin_blocks))
        states.append(tuple(opt_blocks))
    return dataclasses.replace(state, opt_states=tuple(states), lineages=tuple(lineages))


def _restart_mask(proposer: GradientLike, outcome: Outcome) -> Bool[Array, " candidate"]:
    """Truncation: on an acceptance only the bottom `truncate` fraction of lineages
    (by assess score) restart; on a roll back all of them; otherwise none."""
    K = proposer.num_candidates
    changed = jnp.broadcast_to(outcome.current_changed, (K,))
    if outcome.scores is None or proposer.evolve is None or proposer.evolve.truncate is None:
        return changed
    s = outcome.scores[proposer.evolve.objective]
    s = jnp.where(jnp.isfinite(s), s, -jnp.inf)
    n = jnp.maximum(1, jnp.ceil(proposer.evolve.truncate * K)).astype(jnp.int32)
    bottom = ranks(s) < n
    return changed & jnp.where(outcome.accepted, bottom, True)


def _truncate_lineages(
    proposer: GradientLike, state: GradientProposerState, outcome: Outcome
) -> tuple[GradientProposerState, Bool[Array, " candidate"]]:
    """`"continue"` with `Evolve(truncate=...)`: restarted lineages start from the new
    current model with the accepted candidate's optimizer state (same family); the others
    continue with their own; non-finite ones restart with a fresh optimizer state."""
    assert state.lineages is not None  # "continue" keeps lineages
    K = proposer.num_candidates
    finite = lineages_finite(proposer, state)
    restart = _restart_mask(proposer, outcome) | ~finite
    idx = jnp.arange(K)
    src = jnp.where(restart & finite, outcome.accepted_index, idx)
    copied = copy_rows(proposer, state, src, lineages=False)
    # The moments come from the accepted candidate; each candidate's hyperparameters and
    # loss leaves stay its own (the evolving ones are moved by `_evolve`).
    state = dataclasses.replace(
        copied,
        opt_states=tuple(
            tuple(with_opt_hyperparams(o, opt_hyperparams(own)) for o, own in zip(per_new, per_own))
            for per_new, per_own in zip(copied.opt_states, state.opt_states)
        ),
        loss_params=state.loss_params,
    )
    own_lineages = state.lineages
    assert own_lineages is not None
    lineages, states = [], []
    for j, opt in enumerate(proposer.optimizers):
        fresh = opt.transformation().init(outcome.params)
        lin_blocks, opt_blocks = [], []
        for gi, (_, _, rows) in enumerate(b for b in block_rows(proposer) if b[0] == j):
            r = jnp.asarray(rows)
            lin_blocks.append(where_rows(restart[r], outcome.params, own_lineages[j][gi]))
            opt_blocks.append(where_rows(~finite[r], fresh, state.opt_states[j][gi]))
        lineages.append(tuple(lin_blocks))
        states.append(tuple(opt_blocks))
    new = dataclasses.replace(state, opt_states=tuple(states), lineages=tuple(lineages))
    return new, restart


def _evolve(
    proposer: GradientLike,
    before: GradientProposerState,
    state: GradientProposerState,
    outcome: Outcome,
    restart: Bool[Array, " candidate"] | None,
) -> GradientProposerState:
    """Move the named hyperparameters toward the accepted candidate's (log space, with
    log-normal noise); they persist per candidate whatever the `on_reject` policy did to
    the optimizer states."""
    ev = proposer.evolve
    assert ev is not None and before.key is not None  # init keeps a key when evolving
    K = proposer.num_candidates
    a = outcome.accepted_index
    key, k_noise = jax.random.split(before.key)
    idx = jnp.arange(K)
    move = (a >= 0) & (idx != a)
    if restart is not None:
        move = move & restart
    moving = slots(proposer, before, ev.names)
    noise = ev.sigma * jax.random.normal(k_noise, (max(len(moving), 1), K))
    for n, slot in enumerate(moving):
        v = get_slot(proposer, before, slot)
        has, target = pick(v, slot, a)
        m = rows_of(move, slot) & has
        state = set_slot(
            proposer, state, slot, log_move(v, target, m, ev.pull, rows_of(noise[n], slot))
        )
    return dataclasses.replace(state, key=key)
