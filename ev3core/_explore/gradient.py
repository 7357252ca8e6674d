"""The built-in gradient proposer."""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any, Literal

import equinox as eqx
import jax
import jax.numpy as jnp
import optax
from jaxtyping import Array, Float, Int, PRNGKeyArray, PyTree

from .._interfaces import AbstractLoss, AbstractProposer
from .._stateful import Stateful, loss_and_state, trainable, with_trainable
from .._types import (
    Outcome,
    tree_all_finite,
    tree_concat,
    tree_index,
    tree_stack,
    tree_where,
)
from ..errors import ConfigurationError
from .augment import AbstractAugment, augment_batch

RejectPolicy = Literal["keep", "reset", "copy", "continue"]
_POLICIES = ("keep", "reset", "copy", "continue")


def _loss_groups(losses: Sequence[AbstractLoss]) -> tuple[tuple[int, ...], ...]:
    """Partition losses into groups that can be stacked and vmapped together."""
    groups: list[list[int]] = []
    for i, loss in enumerate(losses):
        static_i = eqx.filter(loss, eqx.is_array, inverse=True)
        struct_i = jax.tree.structure(loss)
        for g in groups:
            ref = losses[g[0]]
            if (
                type(ref) is type(loss)
                and jax.tree.structure(ref) == struct_i
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


def _broadcast(tree: PyTree[Array], n: int) -> PyTree[Array]:
    return jax.tree.map(lambda x: jnp.broadcast_to(x, (n,) + jnp.shape(x)), tree)


def _where_rows(mask: Array, on_true: PyTree[Array], on_false: PyTree[Array]) -> PyTree[Array]:
    """Per candidate (leading axis of `on_false`): `on_true` where `mask`, else `on_false`;
    `on_true` may lack the candidate axis (it is broadcast)."""

    def pick(t, f):
        return jnp.where(mask.reshape(mask.shape + (1,) * (f.ndim - 1)), t, f)

    return jax.tree.map(pick, on_true, on_false)


def _num_examples(data: PyTree[Array]) -> int:
    leaves = jax.tree.leaves(data)
    if not leaves:
        raise ConfigurationError(
            "The propose stream is empty. Pass Data(propose=(x, y), ...) with at least one array."
        )
    return leaves[0].shape[0]


class GradientProposerState(eqx.Module):
    """Optimizer states, one stacked state per (optimizer, loss group) block.

    With trajectory growth (`GradientProposer(max_steps=...)`), also the effective trajectory
    length `length` and the number of consecutive non-significant outcomes `streak`
    (both `None` without growth). With `on_reject="continue"`, `lineages` holds each
    candidate's own parameters, stacked like `opt_states` (`None` otherwise).
    """

    opt_states: tuple[tuple[Any, ...], ...]
    length: Int[Array, ""] | None = None
    streak: Int[Array, ""] | None = None
    lineages: tuple[tuple[Any, ...], ...] | None = None


class GradientProposer(AbstractProposer):
    """Candidates from short optax trajectories over a grid of losses x optimizers.

    Candidate `j * len(losses) + i'` runs optimizer `j` with the `i'`-th loss in *group order*
    (losses of the same class and equal non-array fields are grouped, keeping their relative
    order; with a single loss class this is simply the order given). `labels()` gives the
    exact order. Each candidate starts from the current parameters (or, with
    `on_reject="continue"`, from its own previous endpoint) and takes `steps` optimizer
    steps, each on its own batch of `batch_size` examples drawn from the propose stream.
    The parameters that optax sees are the trajectory's current parameters, so weight decay
    and other parameter-dependent transforms are right.

    *History-driven exploration* (the reference implementation's `traj_mul_factor`): with
    `max_steps > steps`, the effective trajectory length starts at `steps`, is multiplied by
    `growth_factor` (rounded up, capped at `max_steps`) after `patience` consecutive
    non-significant EV3 steps, and goes back to `steps` after a significant one. The length is
    an array in the proposer state: the trajectory scan always has `max_steps` iterations and
    skips (`lax.cond`) those beyond the effective length, so growing never recompiles. Each
    step's batch is the same whatever the length, so a longer trajectory extends a shorter one.

    Optimizer states persist across EV3 steps, one per candidate. What happens to the state of
    candidates that were *not* accepted is the `on_reject` policy:

    - `"keep"` (default): every candidate keeps its own optimizer state.
    - `"reset"`: every candidate except the accepted one gets a fresh `optimizer.init` of the
      new current parameters (for `optax.inject_hyperparams` optimizers this also restores the
      initial hyperparameters).
    - `"copy"`: when a candidate is accepted, every candidate with the same optimizer takes a
      copy of its state; candidates with other optimizers (other state structures) keep their
      own. When nothing is accepted, states are kept.
    - `"continue"`: candidates are *lineages*. While the current model does not change, each
      candidate's next trajectory continues from its own previous endpoint with its own
      optimizer state, so the steps of rejected trajectories are not thrown away (and a
      candidate whose gain needs more than one trajectory to show can still be accepted).
      When the current model changes (a candidate is accepted, or the model rolls back),
      every lineage restarts from the new current model, with optimizer states as in
      `"copy"`. A lineage whose parameters are no longer finite restarts from the current
      model with a fresh optimizer state. The safety rule is unchanged: only the decide
      step moves the current model.

    **Arguments:**

    - `losses`: the losses (each an `AbstractLoss`, array hyperparameters as leaves).
    - `optimizers`: any `optax.GradientTransformation`s, including `inject_hyperparams` ones
      (whose hyperparameters then live in the state and can be changed without recompiling).
    - `steps`: trajectory length `L`.
    - `batch_size`: examples per optimizer step.
    - `on_reject`: the policy above.
    - `optimizer_names`: labels for the optimizers (default `opt0`, `opt1`, ...).
    - `max_steps`: the longest trajectory; `None` (default) or `steps` disables growth.
    - `growth_factor`: the length's multiplier after `patience` non-significant steps (an
      array leaf, `>= 1`).
    - `patience`: consecutive non-significant steps before growing (an array leaf, `>= 1`).
    - `chunk_size`: run the trajectories in sequential groups of at most this many
      candidates (`lax.map` with `batch_size`, each group running its whole trajectory), so
      only one group's gradients, updates and activations are alive at once; same batches,
      same results. `None` (default): all candidates in one vmapped trajectory.
    - `augment`: an `ev3core.AbstractAugment` (e.g. `Compose([RandomCrop(4),
      HorizontalFlip()])`) applied to the inputs of every training batch, one key per
      example from the trajectory step's key; `None` (default): no augmentation.

    Models with BatchNorm or dropout (`ev3core.Stateful`) train in training mode with a key
    per step (losses see `Stateful.training(key)`; see `ev3core.batch_apply`), and their
    running statistics are threaded through each trajectory: every candidate ends with its
    own. Gradients and optimizer states cover the weights only.

    ```python
    proposer = GradientProposer(
        losses=[CrossEntropy(t) for t in (0.5, 1.0, 1.5)],
        optimizers=[optax.sgd(0.1), optax.sgd(0.01, momentum=0.95)],
        steps=100, batch_size=32,
    )
    ```
    """

    losses: tuple[AbstractLoss, ...]
    optimizers: tuple[optax.GradientTransformation, ...] = eqx.field(static=True)
    steps: int = eqx.field(static=True)
    batch_size: int = eqx.field(static=True)
    on_reject: str = eqx.field(static=True)
    optimizer_names: tuple[str, ...] = eqx.field(static=True)
    groups: tuple[tuple[int, ...], ...] = eqx.field(static=True)
    max_steps: int = eqx.field(static=True)
    growth_factor: Float[Array, ""]
    patience: Int[Array, ""]
    chunk_size: int | None = eqx.field(static=True, default=None)
    augment: AbstractAugment | None = None

    def __init__(
        self,
        losses: Sequence[AbstractLoss],
        optimizers: Sequence[optax.GradientTransformation],
        steps: int = 100,
        batch_size: int = 32,
        on_reject: RejectPolicy = "keep",
        optimizer_names: Sequence[str] | None = None,
        max_steps: int | None = None,
        growth_factor: float | Array = 2.0,
        patience: int | Array = 3,
        chunk_size: int | None = None,
        augment: Any = None,  # an AbstractAugment or None, checked below with a clear error
    ):
        losses = tuple(losses)
        optimizers = tuple(optimizers)
        if not losses:
            raise ConfigurationError(
                "GradientProposer got no losses. Pass at least one, e.g. losses=[CrossEntropy()]."
            )
        if not optimizers:
            raise ConfigurationError(
                "GradientProposer got no optimizers. Pass at least one, e.g. "
                "optimizers=[optax.sgd(0.1)]."
            )
        for loss in losses:
            if not isinstance(loss, AbstractLoss):
                raise ConfigurationError(
                    f"GradientProposer: loss {loss!r} is not an ev3core.AbstractLoss. Wrap a "
                    "plain function in a subclass of AbstractLoss."
                )
        for opt in optimizers:
            if not isinstance(opt, optax.GradientTransformation):
                raise ConfigurationError(
                    f"GradientProposer: optimizer {opt!r} is not an optax.GradientTransformation "
                    "(for example optax.sgd(0.1) or optax.inject_hyperparams(optax.adam)(1e-3))."
                )
        if int(steps) < 1 or int(batch_size) < 1:
            raise ConfigurationError(
                f"GradientProposer: steps={steps} and batch_size={batch_size} must both be >= 1."
            )
        if on_reject not in _POLICIES:
            raise ConfigurationError(
                f"GradientProposer: on_reject={on_reject!r} is not one of {_POLICIES}."
            )
        if optimizer_names is None:
            optimizer_names = tuple(f"opt{j}" for j in range(len(optimizers)))
        optimizer_names = tuple(optimizer_names)
        if len(optimizer_names) != len(optimizers):
            raise ConfigurationError(
                f"GradientProposer: {len(optimizer_names)} optimizer_names for "
                f"{len(optimizers)} optimizers; give one name per optimizer."
            )
        self.losses = losses
        self.optimizers = optimizers
        self.steps = int(steps)
        self.batch_size = int(batch_size)
        self.on_reject = on_reject
        self.optimizer_names = optimizer_names
        self.groups = _loss_groups(losses)
        self.max_steps = self.steps if max_steps is None else int(max_steps)
        if self.max_steps < self.steps:
            raise ConfigurationError(
                f"GradientProposer: max_steps={max_steps} is below steps={steps}. max_steps is "
                "the longest trajectory that growth may reach: use max_steps >= steps."
            )
        self.growth_factor = jnp.asarray(growth_factor, jnp.float32)
        self.patience = jnp.asarray(patience, jnp.int32)
        if chunk_size is not None and int(chunk_size) < 1:
            raise ConfigurationError(
                f"GradientProposer: chunk_size={chunk_size} must be a positive integer (or None "
                "to advance every candidate at once)."
            )
        self.chunk_size = None if chunk_size is None else int(chunk_size)
        if augment is not None and not isinstance(augment, AbstractAugment):
            raise ConfigurationError(
                f"GradientProposer: augment={augment!r} is not an ev3core.AbstractAugment "
                "(e.g. ev3core.Compose([ev3core.RandomCrop(4), ev3core.HorizontalFlip()]))."
            )
        self.augment = augment
        if not isinstance(self.growth_factor, jax.core.Tracer) and not (
            float(self.growth_factor) >= 1.0 and int(self.patience) >= 1
        ):
            raise ConfigurationError(
                f"GradientProposer: growth_factor={float(self.growth_factor)} must be >= 1 and "
                f"patience={int(self.patience)} >= 1."
            )

    @property
    def grows(self) -> bool:
        """Whether the trajectory length adapts (`max_steps > steps`)."""
        return self.max_steps > self.steps

    @property
    def num_candidates(self) -> int:
        return len(self.losses) * len(self.optimizers)

    def _order(self) -> tuple[int, ...]:
        return tuple(i for g in self.groups for i in g)

    def labels(self) -> tuple[str, ...]:
        return tuple(
            f"{self.losses[i].label}|{name}" for name in self.optimizer_names for i in self._order()
        )

    def init(self, params: PyTree[Array], static: Any, key: PRNGKeyArray) -> GradientProposerState:
        del static, key
        return GradientProposerState(
            opt_states=tuple(
                tuple(_broadcast(opt.init(trainable(params)), len(g)) for g in self.groups)
                for opt in self.optimizers
            ),
            length=jnp.asarray(self.steps, jnp.int32) if self.grows else None,
            streak=jnp.zeros((), jnp.int32) if self.grows else None,
            lineages=self._fresh_lineages(params),
        )

    def _fresh_lineages(self, params: PyTree[Array]) -> tuple[tuple[Any, ...], ...] | None:
        if self.on_reject != "continue":
            return None
        return tuple(
            tuple(_broadcast(params, len(g)) for g in self.groups) for _ in self.optimizers
        )

    def _stacked_losses(self) -> list[tuple[PyTree[Array], Any]]:
        out = []
        for g in self.groups:
            dyn = tree_stack([eqx.filter(self.losses[i], eqx.is_array) for i in g])
            out.append((dyn, eqx.filter(self.losses[g[0]], eqx.is_array, inverse=True)))
        return out

    def propose(
        self,
        params: PyTree[Array],
        static: Any,
        state: GradientProposerState,
        data: PyTree[Array],
        key: PRNGKeyArray,
    ) -> tuple[PyTree[Array], GradientProposerState]:
        k_idx, k_loss = jax.random.split(key)
        K, L, B = self.num_candidates, self.max_steps, self.batch_size
        n = _num_examples(data)
        idx = jax.random.randint(k_idx, (L, K, B), 0, n)
        loss_keys = jax.random.split(k_loss, (L, K))
        stacked_losses = self._stacked_losses()
        sizes = [len(g) for g in self.groups]

        blocks = []  # (optimizer, loss_dyn, loss_static, start, size)
        start = 0
        for opt in self.optimizers:
            for (dyn, lstatic), size in zip(stacked_losses, sizes):
                blocks.append((opt, dyn, lstatic, start, size))
                start += size

        stateful = isinstance(static, Stateful)

        def one(opt, lstatic, p, o, loss_dyn, batch, k):
            loss = eqx.combine(loss_dyn, lstatic)
            if self.augment is not None:
                k, k_aug = jax.random.split(k)
                batch = augment_batch(self.augment, batch, k_aug)
            if not stateful:

                def f(p):
                    return loss(eqx.combine(p, static), batch, k)

                grads = eqx.filter_grad(f)(p)
                updates, o = opt.update(grads, o, p)
                return optax.apply_updates(p, updates), o

            k, k_model = jax.random.split(k)

            def g(w):  # the weights only; the running statistics come out as aux
                model = eqx.combine(with_trainable(p, w), static)
                return loss_and_state(model, k_model, lambda v: loss(v, batch, k), batch)

            grads, new_state = eqx.filter_grad(g, has_aux=True)(trainable(p))
            updates, o = opt.update(grads, o, trainable(p))
            w = optax.apply_updates(trainable(p), updates)
            p = eqx.tree_at(lambda q: q.model, p, w)
            if new_state is not None:
                p = eqx.tree_at(lambda q: q.state, p, new_state)
            return p, o

        def advance(carry, idx_t, keys_t):
            new_carry = []
            for (opt, dyn, lstatic, s, size), (p, o) in zip(blocks, carry):
                sl = slice(s, s + size)
                batch = jax.tree.map(lambda a, sl=sl: a[idx_t[sl]], data)
                step = functools.partial(one, opt, lstatic)
                p, o = jax.vmap(step)(p, o, dyn, batch, keys_t[sl])
                new_carry.append((p, o))
            return tuple(new_carry)

        def body(carry, xs):
            t, idx_t, keys_t = xs
            if not self.grows:
                return advance(carry, idx_t, keys_t), None
            # Steps beyond the effective length are skipped, so its growth never recompiles.
            carry = jax.lax.cond(
                t < state.length, lambda c: advance(c, idx_t, keys_t), lambda c: c, carry
            )
            return carry, None

        flat_states = [o for per_opt in state.opt_states for o in per_opt]
        if state.lineages is None:
            starts = [_broadcast(params, size) for size in [b[4] for b in blocks]]
        else:
            starts = [p for per_opt in state.lineages for p in per_opt]
        if self.chunk_size is not None and self.chunk_size < max(sizes):
            carry = tuple(
                self._chunked_block(one, block, o, p0, state, data, idx, loss_keys)
                for block, o, p0 in zip(blocks, flat_states, starts)
            )
        else:
            carry = tuple(zip(starts, flat_states))
            carry, _ = jax.lax.scan(body, carry, (jnp.arange(L), idx, loss_keys))
        candidates = tree_concat([p for p, _ in carry])

        def per_block(items):
            it = iter(items)
            return tuple(tuple(next(it) for _ in self.groups) for _ in self.optimizers)

        return candidates, GradientProposerState(
            opt_states=per_block(o for _, o in carry),
            length=state.length,
            streak=state.streak,
            lineages=None if state.lineages is None else per_block(p for p, _ in carry),
        )

    def _chunked_block(
        self,
        one: Any,
        block: Any,
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
                if not self.grows:
                    return advance(c, i_t, k_t), None
                return jax.lax.cond(
                    t < state.length, lambda c: advance(c, i_t, k_t), lambda c: c, c
                ), None

            c, _ = jax.lax.scan(body, (p0, o), (jnp.arange(self.max_steps), idx_c, keys_c))
            return c

        xs = (starts, o, dyn, jnp.swapaxes(idx[:, sl], 0, 1), loss_keys[:, sl].T)
        return jax.lax.map(trajectory, xs, batch_size=self.chunk_size)

    def _grow(self, state: GradientProposerState, outcome: Outcome) -> GradientProposerState:
        if not self.grows:
            return state
        streak = jnp.where(outcome.significant, 0, state.streak + 1)
        grow = streak >= self.patience
        longer = jnp.ceil(state.length.astype(jnp.float32) * self.growth_factor)
        longer = jnp.minimum(longer, self.max_steps).astype(jnp.int32)
        length = jnp.where(outcome.significant, self.steps, jnp.where(grow, longer, state.length))
        return GradientProposerState(
            opt_states=state.opt_states,
            length=length.astype(jnp.int32),
            streak=jnp.where(grow, 0, streak).astype(jnp.int32),
            lineages=state.lineages,
        )

    def adapt(self, state: GradientProposerState, outcome: Outcome) -> GradientProposerState:
        state = self._grow(state, outcome)
        if self.on_reject == "keep":
            return state
        n_loss = len(self.losses)
        sizes = [len(g) for g in self.groups]
        new = []
        for j, (opt, per_opt) in enumerate(zip(self.optimizers, state.opt_states)):
            base = j * n_loss
            if self.on_reject == "reset":
                fresh = opt.init(trainable(outcome.params))
                blocks = []
                start = base
                for o, size in zip(per_opt, sizes):
                    keep = jnp.arange(start, start + size) == outcome.accepted_index
                    blocks.append(_where_rows(~keep, fresh, o))
                    start += size
                new.append(tuple(blocks))
            else:  # copy (also the optimizer states of "continue")
                whole = tree_concat(list(per_opt))
                local = outcome.accepted_index - base
                inside = (local >= 0) & (local < n_loss)
                src = tree_index(whole, jnp.clip(local, 0, n_loss - 1))
                blocks = []
                for o, size in zip(per_opt, sizes):
                    blocks.append(tree_where(inside, _broadcast(src, size), o))
                new.append(tuple(blocks))
        if state.lineages is None:
            return GradientProposerState(
                opt_states=tuple(new), length=state.length, streak=state.streak
            )
        return self._continue_lineages(state, tuple(new), outcome)

    def _continue_lineages(
        self, state: GradientProposerState, opt_states: Any, outcome: Outcome
    ) -> GradientProposerState:
        """`"continue"`: keep each lineage while the current model stays; restart them all
        from it when it changes, and any non-finite one from it with a fresh optimizer
        state."""
        changed = outcome.current_changed
        lineages, states = [], []
        for opt, per_lin, per_opt in zip(self.optimizers, state.lineages, opt_states):
            fresh = opt.init(trainable(outcome.params))
            lin_blocks, opt_blocks = [], []
            for p, o in zip(per_lin, per_opt):
                finite = tree_all_finite(p, batch_dims=1)
                lin_blocks.append(_where_rows(changed | ~finite, outcome.params, p))
                opt_blocks.append(_where_rows(~finite, fresh, o))
            lineages.append(tuple(lin_blocks))
            states.append(tuple(opt_blocks))
        return GradientProposerState(
            opt_states=tuple(states),
            length=state.length,
            streak=state.streak,
            lineages=tuple(lineages),
        )
