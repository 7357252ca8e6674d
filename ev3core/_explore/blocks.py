"""A gradient proposer's per-candidate layout: its state, its (optimizer, loss group) blocks
and the slots where each named hyperparameter lives.

Candidate `j * len(losses) + i'` runs optimizer `j` with the `i'`-th loss in group order;
every per-candidate array (optimizer states, lineages, evolving loss leaves) is stacked per
block, whose rows are contiguous global candidate indices. The functions here take the
proposer as their first argument (`GradientProposer`'s methods of the same names call them),
so the trajectories (`trajectories.py`) and what happens after a decision (`lineages.py`)
share them without importing the proposer.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from typing import Any, Protocol, runtime_checkable

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Bool, Float, Int, PRNGKeyArray, PyTree

from .._interfaces import AbstractLoss
from .._types import same_structure, tree_all_finite, tree_stack
from ..errors import ConfigurationError
from .augment import AbstractAugment
from .hyper import Evolve, Optimizer, _Fixed, opt_hyperparams, with_opt_hyperparams
from .population import Slot, take_rows


@runtime_checkable
class GradientLike(Protocol):
    """What these functions read of a gradient proposer (`GradientProposer` is one)."""

    @property
    def losses(self) -> tuple[AbstractLoss, ...]: ...
    @property
    def optimizers(self) -> tuple[Optimizer | _Fixed, ...]: ...
    @property
    def groups(self) -> tuple[tuple[int, ...], ...]: ...
    @property
    def steps(self) -> int: ...
    @property
    def max_steps(self) -> int: ...
    @property
    def batch_size(self) -> int: ...
    @property
    def on_reject(self) -> str: ...
    @property
    def growth_factor(self) -> Float[Array, ""]: ...
    @property
    def patience(self) -> Int[Array, ""]: ...
    @property
    def chunk_size(self) -> int | None: ...
    @property
    def evolve(self) -> Evolve | None: ...
    @property
    def augment(self) -> AbstractAugment | None: ...
    @property
    def grows(self) -> bool: ...
    @property
    def num_candidates(self) -> int: ...


class GradientProposerState(eqx.Module):
    """Optimizer states, one stacked state per (optimizer, loss group) block.

    With trajectory growth (`GradientProposer(max_steps=...)`), also the effective trajectory
    length `length` and the number of consecutive non-significant outcomes `streak`
    (both `None` without growth). With `on_reject="continue"`, `lineages` holds each
    candidate's own parameters, stacked like `opt_states` (`None` otherwise).

    Per-candidate hyperparameters: an `Optimizer`'s (and any `optax.inject_hyperparams`
    optimizer's) live in its optimizer state (`opt_states[j][g].hyperparams`). With evolving
    candidates (`GradientProposer(evolve=...)`, `PBTProposer`), `loss_params` holds each
    candidate's loss array leaves (stacked like `opt_states`; they replace the losses' own
    leaves) and `key` the key the hyperparameter moves draw from (both `None` otherwise).
    """

    opt_states: tuple[tuple[Any, ...], ...]
    length: Int[Array, ""] | None = None
    streak: Int[Array, ""] | None = None
    lineages: tuple[tuple[Any, ...], ...] | None = None
    loss_params: tuple[tuple[Any, ...], ...] | None = None
    key: PRNGKeyArray | None = None


def loss_groups(losses: Sequence[AbstractLoss]) -> tuple[tuple[int, ...], ...]:
    """Partition losses into groups that can be stacked and vmapped together."""
    groups: list[list[int]] = []
    for i, loss in enumerate(losses):
        static_i = eqx.filter(loss, eqx.is_array, inverse=True)
        for g in groups:
            ref = losses[g[0]]
            if (
                type(ref) is type(loss)
                and same_structure(ref, loss)
                and eqx.tree_equal(eqx.filter(ref, eqx.is_array, inverse=True), static_i) is True
                and all(
                    a.shape == b.shape and a.dtype == b.dtype
                    for a, b in zip(
                        jax.tree.leaves(eqx.filter(ref, eqx.is_array)),
                        jax.tree.leaves(eqx.filter(loss, eqx.is_array)),
                    )
                )
            ):
                g.append(i)
                break
        else:
            groups.append([i])
    return tuple(tuple(g) for g in groups)


def _field(tree: Any, name: str) -> Any:
    return getattr(tree, name)


def broadcast(tree: PyTree[Array], n: int) -> PyTree[Array]:
    """Every leaf repeated `n` times along a new leading (candidate) axis."""
    return jax.tree.map(lambda x: jnp.broadcast_to(x, (n,) + jnp.shape(x)), tree)


def where_rows(mask: Array, on_true: PyTree[Array], on_false: PyTree[Array]) -> PyTree[Array]:
    """Per candidate (leading axis of `on_false`): `on_true` where `mask`, else `on_false`;
    `on_true` may lack the candidate axis (it is broadcast)."""

    def pick(t, f):
        return jnp.where(mask.reshape(mask.shape + (1,) * (f.ndim - 1)), t, f)

    return jax.tree.map(pick, on_true, on_false)


def _slot(
    name: str, kind: str, blocks: list[tuple[int, int]], rows: dict[tuple[int, int], np.ndarray]
) -> Slot:
    return Slot(name, kind, tuple(blocks), np.concatenate([rows[b] for b in blocks]))


def ranks(scores: Array) -> Array:
    """0 for the lowest score, `K - 1` for the highest (ties in candidate order)."""
    return jnp.argsort(jnp.argsort(scores, stable=True), stable=True)


def block_rows(proposer: GradientLike) -> list[tuple[int, int, np.ndarray]]:
    """`(optimizer j, loss group gi, global candidate indices)` of every block, in the
    order candidates are concatenated."""
    out, start = [], 0
    for j in range(len(proposer.optimizers)):
        for gi, g in enumerate(proposer.groups):
            out.append((j, gi, np.arange(start, start + len(g))))
            start += len(g)
    return out


def initial_loss_params(proposer: GradientLike) -> tuple[tuple[Any, ...], ...]:
    """The losses' array leaves, stacked per block like `opt_states` (what
    `GradientProposerState.loss_params` starts from)."""
    stacked = [dyn for dyn, _ in stacked_losses(proposer)]
    return tuple(tuple(stacked) for _ in proposer.optimizers)


def loss_fields(proposer: GradientLike, gi: int) -> dict[str, Any]:
    """The inexact array fields (evolvable hyperparameters) of loss group `gi`'s losses."""
    loss = proposer.losses[proposer.groups[gi][0]]
    return {
        f.name: getattr(loss, f.name)
        for f in dataclasses.fields(loss)
        if eqx.is_inexact_array(getattr(loss, f.name, None))
    }


def check_hyper_names(proposer: GradientLike, names: Sequence[str], owner: str) -> None:
    """Raise `ConfigurationError` (for `owner`) unless every name is an array
    hyperparameter of one of the proposer's optimizers or losses."""
    known: set[str] = set()
    for opt in proposer.optimizers:
        known.update(opt.hyperparams)
    for gi in range(len(proposer.groups)):
        known.update(loss_fields(proposer, gi))
    missing = [n for n in names if n not in known]
    if missing:
        raise ConfigurationError(
            f"{owner}: no optimizer or loss of this proposer has the hyperparameter(s) "
            f"{missing} (known: {sorted(known) or 'none'}). Evolving hyperparameters must "
            "be array leaves: give optimizers as ev3core.Optimizer(optax.sgd, "
            "learning_rate=...) and name loss fields that are arrays (e.g. 'temperature')."
        )


def slots(proposer: GradientLike, state: GradientProposerState, names: Sequence[str]) -> list[Slot]:
    """Where each named hyperparameter lives, grouped by comparable candidates: one slot
    per (name, optimizer family) for optimizer hyperparameters, one per (name, loss
    group) for loss fields (those need `state.loss_params`)."""
    rows = {(j, gi): r for j, gi, r in block_rows(proposer)}
    out: list[Slot] = []
    for name in names:
        families: dict[Any, list[tuple[int, int]]] = {}
        for j, opt in enumerate(proposer.optimizers):
            if name in opt.hyperparams:
                fam = opt.family
                for gi in range(len(proposer.groups)):
                    families.setdefault(fam, []).append((j, gi))
        for blocks in families.values():
            out.append(_slot(name, "opt", blocks, rows))
        if state.loss_params is None:
            continue
        for gi in range(len(proposer.groups)):
            if name in loss_fields(proposer, gi):
                blocks = [(j, gi) for j in range(len(proposer.optimizers))]
                out.append(_slot(name, "loss", blocks, rows))
    return out


def get_slot(proposer: GradientLike, state: GradientProposerState, slot: Slot) -> Array:
    """The slot's per-candidate values, concatenated in the slot's row order."""
    if slot.kind == "opt":
        vals = [opt_hyperparams(state.opt_states[j][gi])[slot.name] for j, gi in slot.blocks]
    else:
        assert state.loss_params is not None  # loss slots exist only with loss_params
        vals = [getattr(state.loss_params[j][gi], slot.name) for j, gi in slot.blocks]
    return jnp.concatenate(vals)


def initial_slot(proposer: GradientLike, slot: Slot) -> Array:
    """The slot's values as constructed (the `Optimizer`s' and losses' own leaves)."""
    if slot.kind == "opt":
        vals = [
            jnp.broadcast_to(
                proposer.optimizers[j].hyperparams[slot.name],
                (len(proposer.groups[gi]),)
                + jnp.shape(proposer.optimizers[j].hyperparams[slot.name]),
            )
            for j, gi in slot.blocks
        ]
    else:
        lp = initial_loss_params(proposer)
        vals = [getattr(lp[j][gi], slot.name) for j, gi in slot.blocks]
    return jnp.concatenate(vals)


def set_slot(
    proposer: GradientLike, state: GradientProposerState, slot: Slot, values: Array
) -> GradientProposerState:
    """`state` with the slot's per-candidate values replaced."""
    opt_states = [list(per) for per in state.opt_states]
    loss_params = None if state.loss_params is None else [list(p) for p in state.loss_params]
    start = 0
    for j, gi in slot.blocks:
        n = len(proposer.groups[gi])
        v = values[start : start + n]
        start += n
        if slot.kind == "opt":
            opt_states[j][gi] = with_opt_hyperparams(opt_states[j][gi], {slot.name: v})
        else:
            assert loss_params is not None  # loss slots exist only with loss_params
            loss_params[j][gi] = eqx.tree_at(
                functools.partial(_field, name=slot.name), loss_params[j][gi], v
            )
    return dataclasses.replace(
        state,
        opt_states=tuple(tuple(p) for p in opt_states),
        loss_params=None if loss_params is None else tuple(tuple(p) for p in loss_params),
    )


def family_groups(proposer: GradientLike) -> list[list[tuple[int, int, np.ndarray]]]:
    """Blocks whose optimizer states share a structure (same optimizer family)."""
    fams: dict[Any, list[tuple[int, int, np.ndarray]]] = {}
    for j, gi, r in block_rows(proposer):
        fams.setdefault(proposer.optimizers[j].family, []).append((j, gi, r))
    return list(fams.values())


def copy_rows(
    proposer: GradientLike,
    state: GradientProposerState,
    src: Int[Array, " candidate"],
    lineages: bool = True,
) -> GradientProposerState:
    """Candidate `i` takes candidate `src[i]`'s optimizer state (when their optimizers
    are of one family), loss leaves (same loss group) and, with `lineages`, parameters.
    Rows whose source is incompatible keep their own."""
    opt_states = [list(per) for per in state.opt_states]
    for fam in family_groups(proposer):
        moved = take_rows([opt_states[j][gi] for j, gi, _ in fam], [r for _, _, r in fam], src)
        for (j, gi, _), o in zip(fam, moved):
            opt_states[j][gi] = o
    out = dataclasses.replace(state, opt_states=tuple(tuple(p) for p in opt_states))
    if state.loss_params is not None:
        lp = [list(p) for p in state.loss_params]
        for gi in range(len(proposer.groups)):
            blocks = [(j, gi, r) for j, g2, r in block_rows(proposer) if g2 == gi]
            moved = take_rows([lp[j][gi] for j, _, _ in blocks], [r for *_, r in blocks], src)
            for (j, _, _), t in zip(blocks, moved):
                lp[j][gi] = t
        out = dataclasses.replace(out, loss_params=tuple(tuple(p) for p in lp))
    if lineages and state.lineages is not None:
        blocks = block_rows(proposer)
        moved = take_rows(
            [state.lineages[j][gi] for j, gi, _ in blocks], [r for *_, r in blocks], src
        )
        it = iter(moved)
        out = dataclasses.replace(
            out,
            lineages=tuple(tuple(next(it) for _ in proposer.groups) for _ in proposer.optimizers),
        )
    return out


def lineages_finite(
    proposer: GradientLike, state: GradientProposerState
) -> Bool[Array, " candidate"]:
    """Per candidate: whether its lineage's parameters are finite (all true without
    lineages)."""
    if state.lineages is None:
        return jnp.ones((proposer.num_candidates,), bool)
    return jnp.concatenate(
        [tree_all_finite(p, batch_dims=1) for per in state.lineages for p in per]
    )


def fresh_lineages(
    proposer: GradientLike, params: PyTree[Array]
) -> tuple[tuple[Any, ...], ...] | None:
    """With `on_reject="continue"`, every lineage starting from `params`; else `None`."""
    if proposer.on_reject != "continue":
        return None
    return tuple(
        tuple(broadcast(params, len(g)) for g in proposer.groups) for _ in proposer.optimizers
    )


def stacked_losses(proposer: GradientLike) -> list[tuple[PyTree[Array], Any]]:
    """Per loss group: its losses' array leaves stacked, and their shared static part."""
    out = []
    for g in proposer.groups:
        dyn = tree_stack([eqx.filter(proposer.losses[i], eqx.is_array) for i in g])
        out.append((dyn, eqx.filter(proposer.losses[g[0]], eqx.is_array, inverse=True)))
    return out
