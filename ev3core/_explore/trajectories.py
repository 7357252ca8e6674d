"""A gradient proposer's trajectories: every candidate's optimizer steps in one `lax.scan`.

Inside the scan body each (optimizer, loss group) block is one `vmap` over its candidates;
with `chunk_size`, each block runs its candidates' whole trajectories in sequential groups
(`lax.map`) instead.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
import optax
from jaxtyping import Array, PRNGKeyArray, PyTree

from .._interfaces import AbstractReferenceLoss
from .._sharding import split_examples
from .._stateful import Stateful, loss_and_state, trainable, with_trainable
from .._types import tree_concat
from ..errors import ConfigurationError
from .augment import AbstractAugment, augment_batch
from .blocks import GradientLike, GradientProposerState, broadcast, stacked_losses
from .hyper import update_in_param_dtype


class _Block(NamedTuple):
    """One (optimizer, loss group) block: its transformation, the losses' array leaves
    (stacked) and static part, and its candidates' global rows `start:start + size`."""

    tx: optax.GradientTransformation
    loss_dyn: PyTree[Array]
    loss_static: Any
    start: int
    size: int


class _Step(NamedTuple):
    """What every optimizer step of one `propose` call shares."""

    static: Any  # the model's non-array part
    reference: Any  # the current model, for reference losses
    augment: AbstractAugment | None


def _with_reference(
    loss: AbstractReferenceLoss, reference: Any, model: Any, batch: PyTree[Array], key: Any
) -> Array:
    return loss.with_reference(model, reference, batch, key)


def _num_examples(data: PyTree[Array]) -> int:
    leaves = jax.tree.leaves(data)
    if not leaves:
        raise ConfigurationError(
            "The propose stream is empty. Pass Data(propose=(x, y), ...) with at least one array."
        )
    return leaves[0].shape[0]


def _blocks(proposer: GradientLike, state: GradientProposerState) -> list[_Block]:
    """The blocks in the order candidates are concatenated (per-candidate loss leaves from
    the state when candidates evolve them)."""
    stacked = stacked_losses(proposer)
    blocks, start = [], 0
    for j, opt in enumerate(proposer.optimizers):
        tx = opt.transformation()
        for gi, (g, (dyn, lstatic)) in enumerate(zip(proposer.groups, stacked)):
            if state.loss_params is not None:  # per-candidate (evolving) loss leaves
                dyn = state.loss_params[j][gi]
            blocks.append(_Block(tx, dyn, lstatic, start, len(g)))
            start += len(g)
    return blocks


def _train_step(
    shared: _Step, opt: Any, lstatic: Any, p: Any, o: Any, loss_dyn: Any, batch: Any, k: Any
) -> tuple[Any, Any]:
    """One optimizer step of one candidate (vmapped over a block's candidates)."""
    static = shared.static
    batch = split_examples(batch)  # data parallel on a mesh with a "data" axis
    loss = eqx.combine(loss_dyn, lstatic)
    if shared.augment is not None:
        k, k_aug = jax.random.split(k)
        batch = augment_batch(shared.augment, batch, k_aug)
    if isinstance(loss, AbstractReferenceLoss):
        loss = functools.partial(_with_reference, loss, shared.reference)
    if not isinstance(static, Stateful):

        def f(p):
            return loss(eqx.combine(p, static), batch, k)

        grads = eqx.filter_grad(f)(p)
        updates, o = update_in_param_dtype(opt, grads, o, p)
        return optax.apply_updates(p, updates), o

    k, k_model = jax.random.split(k)

    def g(w):  # the weights only; the running statistics come out as aux
        model = eqx.combine(with_trainable(p, w), static)
        return loss_and_state(model, k_model, lambda v: loss(v, batch, k), batch)

    grads, new_state = eqx.filter_grad(g, has_aux=True)(trainable(p))
    updates, o = update_in_param_dtype(opt, grads, o, trainable(p))
    w = optax.apply_updates(trainable(p), updates)
    p = eqx.tree_at(lambda q: q.model, p, w)
    if new_state is not None:
        p = eqx.tree_at(lambda q: q.state, p, new_state)
    return p, o


def propose(
    proposer: GradientLike,
    params: PyTree[Array],
    static: Any,
    state: GradientProposerState,
    data: PyTree[Array],
    key: PRNGKeyArray,
) -> tuple[PyTree[Array], GradientProposerState]:
    """`GradientProposer.propose`: every candidate's trajectory, from the current parameters
    (or its own lineage), each step on its own batch of the propose stream."""
    k_idx, k_loss = jax.random.split(key)
    K, L, B = proposer.num_candidates, proposer.max_steps, proposer.batch_size
    idx = jax.random.randint(k_idx, (L, K, B), 0, _num_examples(data))
    loss_keys = jax.random.split(k_loss, (L, K))
    blocks = _blocks(proposer, state)
    one = functools.partial(
        _train_step, _Step(static, eqx.combine(params, static), proposer.augment)
    )

    def advance(carry, idx_t, keys_t):
        new_carry = []
        for b, (p, o) in zip(blocks, carry):
            sl = slice(b.start, b.start + b.size)
            batch = jax.tree.map(lambda a, sl=sl: a[idx_t[sl]], data)
            step = functools.partial(one, b.tx, b.loss_static)
            p, o = jax.vmap(step)(p, o, b.loss_dyn, batch, keys_t[sl])
            new_carry.append((p, o))
        return tuple(new_carry)

    def body(carry, xs):
        t, idx_t, keys_t = xs
        if not proposer.grows:
            return advance(carry, idx_t, keys_t), None
        # Steps beyond the effective length are skipped, so its growth never recompiles.
        carry = jax.lax.cond(
            t < state.length, lambda c: advance(c, idx_t, keys_t), lambda c: c, carry
        )
        return carry, None

    flat_states = [o for per_opt in state.opt_states for o in per_opt]
    if state.lineages is None:
        starts = [broadcast(params, b.size) for b in blocks]
    else:
        starts = [p for per_opt in state.lineages for p in per_opt]
    if proposer.chunk_size is not None and proposer.chunk_size < max(b.size for b in blocks):
        carry = tuple(
            _chunked_block(proposer, one, block, o, p0, state, data, idx, loss_keys)
            for block, o, p0 in zip(blocks, flat_states, starts)
        )
    else:
        carry = tuple(zip(starts, flat_states))
        carry, _ = jax.lax.scan(body, carry, (jnp.arange(L), idx, loss_keys))
    candidates = tree_concat([p for p, _ in carry])

    def per_block(items):
        it = iter(items)
        return tuple(tuple(next(it) for _ in proposer.groups) for _ in proposer.optimizers)

    return candidates, dataclasses.replace(
        state,
        opt_states=per_block(o for _, o in carry),
        lineages=None if state.lineages is None else per_block(p for p, _ in carry),
    )


def _chunked_block(
    proposer: GradientLike,
    one: Any,
    block: _Block,
    o: Any,
    starts: Any,
    state: GradientProposerState,
    data: Any,
    idx: Any,
    loss_keys: Any,
) -> tuple[Any, Any]:
    """One block's trajectories in sequential groups of `chunk_size` candidates, each
    group running its whole trajectory: only `chunk_size` trajectories' gradients and
    activations are alive at once. Same batches and keys as the vmapped path."""
    opt, dyn, lstatic, start, size = block
    step = functools.partial(one, opt, lstatic)
    sl = slice(start, start + size)

    def trajectory(args):
        p0, o, loss_dyn, idx_c, keys_c = args  # idx_c [L, B], keys_c [L]

        def advance(c, i_t, k_t):
            batch = jax.tree.map(lambda a: a[i_t], data)
            return step(c[0], c[1], loss_dyn, batch, k_t)

        def body(c, xs):
            t, i_t, k_t = xs
            if not proposer.grows:
                return advance(c, i_t, k_t), None
            return jax.lax.cond(
                t < state.length, lambda c: advance(c, i_t, k_t), lambda c: c, c
            ), None

        c, _ = jax.lax.scan(body, (p0, o), (jnp.arange(proposer.max_steps), idx_c, keys_c))
        return c

    xs = (starts, o, dyn, jnp.swapaxes(idx[:, sl], 0, 1), loss_keys[:, sl].T)
    return jax.lax.map(trajectory, xs, batch_size=proposer.chunk_size)
