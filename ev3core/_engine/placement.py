"""Where the candidates live: on one device, or split over a mesh's `"candidate"` axis (and
their examples over its `"data"` axis, when it has one).

The placement is chosen once, when the engine is built; the step calls the same methods
whichever it is, so the step has no branch on the mesh and nothing is handed back from one
stage to the next but arrays.
"""

from __future__ import annotations

import abc
import contextlib
from collections.abc import Sequence
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
from jax.sharding import Mesh, PartitionSpec as P
from jaxtyping import Array, Bool, Float, Int, PyTree

from .._interfaces import AbstractAssessor
from .._sharding import (
    CANDIDATE_AXIS,
    DATA_AXIS,
    check_mesh,
    constrain,
    data_shards,
    num_shards,
    padded_size,
    replicate,
    shard_state,
    splitting_examples,
    state_specs,
)
from .._types import State, tree_all_finite, tree_concat, tree_index, tree_stack
from .scoring import score_models


class AbstractPlacement(eqx.Module):
    """How the step lays out candidates and state over devices (host-side choice, static)."""

    @property
    @abc.abstractmethod
    def mesh(self) -> Mesh | None:
        """The mesh the candidates are split over, or `None` for one device."""

    @abc.abstractmethod
    def place(self, components: PyTree[Any]) -> PyTree[Any]:
        """Components' array leaves where the step needs them (once, at build)."""

    @abc.abstractmethod
    def place_state(self, state: State) -> State:
        """A fresh state (from `Engine.init`) where the step expects it."""

    @abc.abstractmethod
    def constrain_state(self, state: State) -> State:
        """The new state in the layout of the old one (inside the step: no drift, no
        re-compile)."""

    @abc.abstractmethod
    def proposing(self) -> contextlib.AbstractContextManager[None]:
        """The context the explore stage is traced in (`ev3core.split_examples` reads it)."""

    @abc.abstractmethod
    def score_replicated(
        self,
        assessors: Sequence[AbstractAssessor],
        models: PyTree[Array],
        static: Any,
        batch: PyTree[Array],
    ) -> Float[Array, "objective model example"]:
        """Per-example scores of a few models that every device holds (the incumbents, the
        decide trio), stacked on their leading axis."""

    @abc.abstractmethod
    def score(
        self,
        assessors: Sequence[AbstractAssessor],
        candidates: PyTree[Array],
        state: State,
        batch: PyTree[Array],
        chunk: int | None,
    ) -> tuple[Float[Array, "objective model example"], Bool[Array, " candidate"], PyTree[Array]]:
        """Score the `K` candidates, the current and the stable model on `batch`.

        **Returns:** `(scores, finite, held)`: `scores` stacks the candidates, then current,
        then stable (`model = K + 2`); `finite` says which candidates' parameters are all
        finite; `held` is the candidates as this placement keeps them (pass it to `take`).
        """

    @abc.abstractmethod
    def take(
        self, held: PyTree[Array], index: Int[Array, ""], like: PyTree[Array]
    ) -> PyTree[Array]:
        """Candidate `index`'s parameters (shaped as `like`) from `held`."""


class LocalPlacement(AbstractPlacement):
    """Everything on one device: candidates are scored together with current and stable."""

    @property
    def mesh(self) -> None:
        return None

    def place(self, components: PyTree[Any]) -> PyTree[Any]:
        return components

    def place_state(self, state: State) -> State:
        return state

    def constrain_state(self, state: State) -> State:
        return state

    def proposing(self) -> contextlib.AbstractContextManager[None]:
        return contextlib.nullcontext()

    def score_replicated(self, assessors, models, static, batch):
        return score_models(assessors, models, static, batch)

    def score(self, assessors, candidates, state, batch, chunk):
        finite = tree_all_finite(candidates, batch_dims=1)
        everything = tree_concat(
            [candidates, tree_stack([state.current]), tree_stack([state.stable])]
        )
        return score_models(assessors, everything, state.static, batch, chunk), finite, candidates

    def take(self, held, index, like):
        return tree_index(held, index)


def _psum_pick(x: Array, mine: Array) -> Array:
    """`x` from the one shard where `mine` holds, on every shard (an all-reduce)."""
    if x.dtype == jnp.bool_:
        return jax.lax.psum(jnp.where(mine, x, False).astype(jnp.int32), CANDIDATE_AXIS) > 0
    return jax.lax.psum(jnp.where(mine, x, jnp.zeros_like(x)), CANDIDATE_AXIS)


def _pad_examples(batch: PyTree[Array], shards: int) -> tuple[PyTree[Array], int]:
    """`batch` with its example axis padded (repeating examples) to a multiple of `shards`,
    and its true length: the scores of the padding are dropped."""
    n = jax.tree.leaves(batch)[0].shape[0]
    m = padded_size(n, shards)
    if m == n:
        return batch, n
    idx = jnp.arange(m) % n
    return jax.tree.map(lambda a: a[idx], batch), n


class ShardedPlacement(AbstractPlacement):
    """Candidates split over the mesh's `"candidate"` axis; only scores (and then the
    winner's parameters) cross devices.

    `K` is padded to a multiple of the axis size with copies of the current model, which are
    dropped before the scheduler sees them (never accepted). With a `"data"` axis, examples
    are split over it: the proposers' minibatches (`split_examples` under `proposing`) and
    every scoring `shard_map`'s batch, whose per-example scores come back in example order.
    """

    device_mesh: Mesh = eqx.field(static=True)
    num_candidates: int = eqx.field(static=True)

    def __init__(self, mesh: Mesh, num_candidates: int):
        self.device_mesh = check_mesh(mesh)
        self.num_candidates = int(num_candidates)

    @property
    def mesh(self) -> Mesh:
        return self.device_mesh

    @property
    def _padded(self) -> int:
        return padded_size(self.num_candidates, num_shards(self.device_mesh))

    def place(self, components: PyTree[Any]) -> PyTree[Any]:
        # hyperparameters live on every device: no copy per step
        return replicate(components, self.device_mesh)

    def place_state(self, state: State) -> State:
        return shard_state(state, self.device_mesh)

    def constrain_state(self, state: State) -> State:
        return constrain(state, self.device_mesh, state_specs(state, self.device_mesh))

    def _candidate_specs(self, candidates: PyTree[Array]) -> PyTree[Any]:
        return jax.tree.map(lambda _: P(CANDIDATE_AXIS), candidates)

    def proposing(self) -> contextlib.AbstractContextManager[None]:
        return splitting_examples(self.device_mesh)

    def score_replicated(self, assessors, models, static, batch):
        shards = data_shards(self.device_mesh)
        if shards == 1:  # replicated, as on one device
            return score_models(assessors, models, static, batch)
        batch, n = _pad_examples(batch, shards)
        scores = jax.shard_map(
            lambda m, b: score_models(assessors, m, static, b),
            mesh=self.device_mesh,
            in_specs=(P(), P(DATA_AXIS)),
            out_specs=P(None, None, DATA_AXIS),
        )(models, batch)
        return scores[..., :n]

    def score(self, assessors, candidates, state, batch, chunk):
        mesh, k, kp = self.device_mesh, self.num_candidates, self._padded
        shards = data_shards(mesh)
        # Each device scores its candidates on its slice of the examples.
        examples, n = _pad_examples(batch, shards)
        batch_spec = P(DATA_AXIS) if shards > 1 else P()
        scores_spec = P(None, CANDIDATE_AXIS, DATA_AXIS) if shards > 1 else P(None, CANDIDATE_AXIS)
        if kp > k:  # masked padding: copies of the current model, never valid
            pad = jax.tree.map(lambda x: jnp.broadcast_to(x, (kp - k,) + x.shape), state.current)
            candidates = tree_concat([candidates, pad])
        spec = self._candidate_specs(candidates)
        candidates = constrain(candidates, mesh, spec)
        static = state.static

        def local(cands, batch):
            n = jax.tree.leaves(cands)[0].shape[0]
            finite = jnp.broadcast_to(tree_all_finite(cands, 1), (n,))
            return score_models(assessors, cands, static, batch, chunk), finite

        scores_c, finite = jax.shard_map(
            local,
            mesh=mesh,
            in_specs=(spec, batch_spec),
            out_specs=(scores_spec, P(CANDIDATE_AXIS)),
        )(candidates, examples)
        incumbents = self.score_replicated(
            assessors, tree_stack([state.current, state.stable]), static, batch
        )
        scores = jnp.concatenate([scores_c[:, :k, :n], incumbents], axis=1)
        return scores, finite[:k], candidates

    def take(self, held, index, like):
        per_shard = self._padded // num_shards(self.device_mesh)

        # The shard holding candidate `index` contributes it, the others zeros: one all-reduce
        # of one model's parameters (the winner's broadcast), never a gather of all K.
        def one(cands):
            shard = jax.lax.axis_index(CANDIDATE_AXIS)
            local_i = index - shard * per_shard
            mine = (local_i >= 0) & (local_i < per_shard)
            row = jnp.clip(local_i, 0, per_shard - 1)
            return jax.tree.map(lambda x: _psum_pick(x[row], mine), cands)

        return jax.shard_map(
            one,
            mesh=self.device_mesh,
            in_specs=(self._candidate_specs(held),),
            out_specs=jax.tree.map(lambda _: P(), like),
        )(held)


def placement_for(mesh: Mesh | None, num_candidates: int) -> AbstractPlacement:
    """The placement an engine with `mesh` uses (chosen once, when it is built)."""
    return LocalPlacement() if mesh is None else ShardedPlacement(mesh, num_candidates)
