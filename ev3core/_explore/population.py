"""Per-candidate rows across a gradient proposer's blocks: copies between candidates and
hyperparameter moves (shared by evolving candidates and population-based training).

A `GradientProposer` keeps its per-candidate state in *blocks* (one per optimizer and loss
group), each stacked on a leading axis; a block's rows are contiguous global candidate
indices. These helpers address rows by global candidate index, so code above them never
needs the block layout.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Bool, Float, Int, PyTree, Shaped

from .._types import tree_concat


def _split(tree: PyTree[Array], sizes: Sequence[int]) -> list[PyTree[Array]]:
    bounds = np.cumsum([0, *sizes])
    return [
        jax.tree.map(lambda x, a=int(a), b=int(b): x[a:b], tree)
        for a, b in zip(bounds[:-1], bounds[1:])
    ]


def rows_mask(mask: Shaped[Array, " n"], x: Array) -> Array:
    """`mask` reshaped to broadcast against `x`'s leading (row) axis."""
    return mask.reshape(mask.shape + (1,) * (x.ndim - 1))


def take_rows(
    trees: Sequence[PyTree[Array]],
    rows: Sequence[np.ndarray],
    src: Int[Array, " candidate"],
) -> list[PyTree[Array]]:
    """Row `i` (a global candidate index) of the blocks `trees` takes row `src[i]`.

    `trees` are blocks of one structure (so rows can move between them); `rows[b]` are the
    global candidate indices of block `b`'s rows. A row whose source is not among these
    blocks (or is negative) keeps its own value.
    """
    all_rows = np.concatenate(list(rows))
    pos = np.full((src.shape[0],), -1, np.int32)
    pos[all_rows] = np.arange(all_rows.size, dtype=np.int32)
    whole = tree_concat(list(trees))
    want = src[all_rows]
    local = jnp.where(want >= 0, jnp.asarray(pos)[jnp.clip(want, 0)], -1)
    found = local >= 0
    safe = jnp.clip(local, 0)
    moved = jax.tree.map(lambda x: jnp.where(rows_mask(found, x), x[safe], x), whole)
    return _split(moved, [r.size for r in rows])


def log_move(
    values: Float[Array, " n"],
    target: Float[Array, "*shape"],
    move: Bool[Array, " n"],
    pull: Float[Array, ""],
    noise: Float[Array, " n"],
) -> Float[Array, " n"]:
    """`log v + pull (log target - log v) + noise` where `move` (and both are positive),
    else `v` unchanged."""
    v = values.astype(jnp.float32)
    t = jnp.broadcast_to(target, v.shape).astype(jnp.float32)
    ok = rows_mask(move, v) & (v > 0) & (t > 0)
    lv = jnp.log(jnp.where(ok, v, 1.0))
    lt = jnp.log(jnp.where(ok, t, 1.0))
    per_row = noise.reshape(noise.shape + (1,) * (v.ndim - 1))  # noise is not a mask
    new = jnp.exp(lv + pull * (lt - lv) + per_row)
    return jnp.where(ok, new, v).astype(values.dtype)


@dataclasses.dataclass(frozen=True)
class Slot:
    """One hyperparameter `name` shared by a set of blocks whose candidates are comparable:
    an optimizer hyperparameter of one optimizer family (`kind="opt"`) or a loss field of
    one loss group (`kind="loss"`). `blocks` are `(optimizer index, group index)` pairs and
    `rows` their global candidate indices, concatenated in block order."""

    name: str
    kind: str
    blocks: tuple[tuple[int, int], ...]
    rows: np.ndarray

    def index_of(self, candidate: Int[Array, ""]) -> tuple[Bool[Array, ""], Int[Array, ""]]:
        """Whether `candidate` (a global index) is in this slot, and its row (0 if not)."""
        hit = jnp.asarray(self.rows) == candidate
        return jnp.any(hit), jnp.argmax(hit)


def pick(values: Array, slot: Slot, candidate: Int[Array, ""]) -> tuple[Bool[Array, ""], Array]:
    """The value of `candidate` in a slot's concatenated values, and whether it has one."""
    has, row = slot.index_of(candidate)
    return has, values[row]


def rows_of(per_candidate: Array, slot: Slot) -> Array:
    """A `[candidate, ...]` array restricted to the slot's rows (in the slot's order)."""
    return per_candidate[jnp.asarray(slot.rows)]
