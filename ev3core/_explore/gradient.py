"""The built-in gradient proposer."""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from typing import Any, Literal

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jaxtyping import Array, Bool, Float, Int, PRNGKeyArray, PyTree

from .._interfaces import AbstractLoss, AbstractProposer, AbstractReferenceLoss
from .._sharding import split_examples
from .._stateful import Stateful, loss_and_state, trainable, with_trainable
from .._types import (
    Outcome,
    same_structure,
    tree_all_finite,
    tree_concat,
    tree_index,
    tree_stack,
    tree_where,
)
from ..errors import ConfigurationError
from .augment import AbstractAugment, augment_batch
from .hyper import (
    Evolve,
    Optimizer,
    _Fixed,
    as_optimizer,
    opt_hyperparams,
    update_in_param_dtype,
    with_opt_hyperparams,
)
from .population import Slot, log_move, pick, rows_of, take_rows

RejectPolicy = Literal["keep", "reset", "copy", "continue"]
_POLICIES = ("keep", "reset", "copy", "continue")


def _loss_groups(losses: Sequence[AbstractLoss]) -> tuple[tuple[int, ...], ...]:
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


def _with_reference(
    loss: AbstractReferenceLoss, reference: Any, model: Any, batch: PyTree[Array], key: Any
) -> Array:
    return loss.with_reference(model, reference, batch, key)


def _broadcast(tree: PyTree[Array], n: int) -> PyTree[Array]:
    return jax.tree.map(lambda x: jnp.broadcast_to(x, (n,) + jnp.shape(x)), tree)


def _where_rows(mask: Array, on_true: PyTree[Array], on_false: PyTree[Array]) -> PyTree[Array]:
    """Per candidate (leading axis of `on_false`): `on_true` where `mask`, else `on_false`;
    `on_true` may lack the candidate axis (it is broadcast)."""

    def pick(t, f):
        return jnp.where(mask.reshape(mask.shape + (1,) * (f.ndim - 1)), t, f)

    return jax.tree.map(pick, on_true, on_false)


def _slot(
    name: str, kind: str, blocks: list[tuple[int, int]], rows: dict[tuple[int, int], np.ndarray]
) -> Slot:
    return Slot(name, kind, tuple(blocks), np.concatenate([rows[b] for b in blocks]))


def _ranks(scores: Array) -> Array:
    """0 for the lowest score, `K - 1` for the highest (ties in candidate order)."""
    return jnp.argsort(jnp.argsort(scores, stable=True), stable=True)


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
    - `optimizers`: `ev3core.Optimizer` specs (recommended: `Optimizer(optax.sgd,
      learning_rate=0.1)`; the factory is static and the numbers are array leaves, applied
      through `optax.inject_hyperparams`, so each candidate's hyperparameters live in its
      optimizer state, a rebuilt pipeline never re-traces and a new learning rate never
      recompiles), or plain `optax.GradientTransformation`s (static: their numbers are
      compile-time constants, and a freshly built `optax.sgd(0.1)` is a new closure that
      re-traces the step).
    - `steps`: trajectory length `L`.
    - `batch_size`: examples per optimizer step.
    - `on_reject`: the policy above.
    - `optimizer_names`: labels for the optimizers (default: an `Optimizer`'s own label with
      its initial values, e.g. `sgd(lr=0.1)`, read when labels are asked for, so that values
      stay out of the static structure; `opt0`, `opt1`, ... for plain transformations).
    - `max_steps`: the longest trajectory; `None` (default) or `steps` disables growth.
    - `growth_factor`: the length's multiplier after `patience` non-significant steps (an
      array leaf, `>= 1`).
    - `patience`: consecutive non-significant steps before growing (an array leaf, `>= 1`).
    - `chunk_size`: run the trajectories in sequential groups of at most this many
      candidates (`lax.map` with `batch_size`, each group running its whole trajectory), so
      only one group's gradients, updates and activations are alive at once; same batches,
      same results. `None` (default): all candidates in one vmapped trajectory.
    - `evolve`: an `ev3core.Evolve`: candidates' hyperparameters (learning rates, loss
      temperatures) move toward the accepted candidate's after each acceptance, and
      optionally only the worse lineages restart (see `Evolve`). `None` (default): fixed.
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
        optimizers=[Optimizer(optax.sgd, learning_rate=0.1),
                    Optimizer(optax.sgd, learning_rate=0.01, momentum=0.95)],
        steps=100, batch_size=32,
    )
    ```
    """

    losses: tuple[AbstractLoss, ...]
    optimizers: tuple[Optimizer | _Fixed, ...]
    steps: int = eqx.field(static=True)
    batch_size: int = eqx.field(static=True)
    on_reject: str = eqx.field(static=True)
    optimizer_names: tuple[str, ...] | None = eqx.field(static=True)
    groups: tuple[tuple[int, ...], ...] = eqx.field(static=True)
    max_steps: int = eqx.field(static=True)
    growth_factor: Float[Array, ""]
    patience: Int[Array, ""]
    chunk_size: int | None = eqx.field(static=True, default=None)
    evolve: Evolve | None = None
    augment: AbstractAugment | None = None

    def __init__(
        self,
        losses: Sequence[AbstractLoss],
        optimizers: Sequence[Optimizer | optax.GradientTransformation],
        steps: int = 100,
        batch_size: int = 32,
        on_reject: RejectPolicy = "keep",
        optimizer_names: Sequence[str] | None = None,
        max_steps: int | None = None,
        growth_factor: float | Array = 2.0,
        patience: int | Array = 3,
        chunk_size: int | None = None,
        evolve: Evolve | None = None,
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
        optimizers = tuple(as_optimizer(opt) for opt in optimizers)
        if int(steps) < 1 or int(batch_size) < 1:
            raise ConfigurationError(
                f"GradientProposer: steps={steps} and batch_size={batch_size} must both be >= 1."
            )
        if on_reject not in _POLICIES:
            raise ConfigurationError(
                f"GradientProposer: on_reject={on_reject!r} is not one of {_POLICIES}."
            )
        if optimizer_names is not None:
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
        if evolve is not None and not isinstance(evolve, Evolve):
            raise ConfigurationError(
                f"GradientProposer: evolve={evolve!r} is not an ev3core.Evolve; pass e.g. "
                "evolve=Evolve(names=('learning_rate',))."
            )
        self.evolve = evolve
        if evolve is not None:
            self._check_hyper_names(evolve.names, "Evolve")
            if evolve.truncate is not None and on_reject != "continue":
                raise ConfigurationError(
                    f"GradientProposer: Evolve(truncate={evolve.truncate}) restarts only the "
                    f"worse lineages, but on_reject={on_reject!r} has no lineages. Use "
                    "on_reject='continue' (or truncate=None)."
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
            f"{self.losses[i].label}|{name}" for name in self.names() for i in self._order()
        )

    def names(self) -> tuple[str, ...]:
        """One label per optimizer (`optimizer_names`, or the default described above)."""
        if self.optimizer_names is not None:
            return self.optimizer_names
        return tuple(
            opt.label if isinstance(opt, Optimizer) else f"opt{j}"
            for j, opt in enumerate(self.optimizers)
        )

    def init(self, params: PyTree[Array], static: Any, key: PRNGKeyArray) -> GradientProposerState:
        del static
        evolving = self.evolve is not None
        return GradientProposerState(
            opt_states=tuple(
                tuple(
                    _broadcast(opt.transformation().init(trainable(params)), len(g))
                    for g in self.groups
                )
                for opt in self.optimizers
            ),
            length=jnp.asarray(self.steps, jnp.int32) if self.grows else None,
            streak=jnp.zeros((), jnp.int32) if self.grows else None,
            lineages=self._fresh_lineages(params),
            loss_params=self.initial_loss_params() if evolving else None,
            key=key if evolving else None,
        )

    # ------------------------------------------------------------ per-candidate layout
    def block_rows(self) -> list[tuple[int, int, np.ndarray]]:
        """`(optimizer j, loss group gi, global candidate indices)` of every block, in the
        order candidates are concatenated."""
        out, start = [], 0
        for j in range(len(self.optimizers)):
            for gi, g in enumerate(self.groups):
                out.append((j, gi, np.arange(start, start + len(g))))
                start += len(g)
        return out

    def initial_loss_params(self) -> tuple[tuple[Any, ...], ...]:
        """The losses' array leaves, stacked per block like `opt_states` (what
        `GradientProposerState.loss_params` starts from)."""
        stacked = [dyn for dyn, _ in self._stacked_losses()]
        return tuple(tuple(stacked) for _ in self.optimizers)

    def _loss_fields(self, gi: int) -> dict[str, Any]:
        loss = self.losses[self.groups[gi][0]]
        return {
            f.name: getattr(loss, f.name)
            for f in dataclasses.fields(loss)
            if eqx.is_inexact_array(getattr(loss, f.name, None))
        }

    def _check_hyper_names(self, names: Sequence[str], owner: str) -> None:
        known: set[str] = set()
        for opt in self.optimizers:
            known.update(opt.hyperparams)
        for gi in range(len(self.groups)):
            known.update(self._loss_fields(gi))
        missing = [n for n in names if n not in known]
        if missing:
            raise ConfigurationError(
                f"{owner}: no optimizer or loss of this proposer has the hyperparameter(s) "
                f"{missing} (known: {sorted(known) or 'none'}). Evolving hyperparameters must "
                "be array leaves: give optimizers as ev3core.Optimizer(optax.sgd, "
                "learning_rate=...) and name loss fields that are arrays (e.g. 'temperature')."
            )

    def slots(self, state: GradientProposerState, names: Sequence[str]) -> list[Slot]:
        """Where each named hyperparameter lives, grouped by comparable candidates: one slot
        per (name, optimizer family) for optimizer hyperparameters, one per (name, loss
        group) for loss fields (those need `state.loss_params`)."""
        rows = {(j, gi): r for j, gi, r in self.block_rows()}
        out: list[Slot] = []
        for name in names:
            families: dict[Any, list[tuple[int, int]]] = {}
            for j, opt in enumerate(self.optimizers):
                if name in opt.hyperparams:
                    fam = opt.family
                    for gi in range(len(self.groups)):
                        families.setdefault(fam, []).append((j, gi))
            for blocks in families.values():
                out.append(_slot(name, "opt", blocks, rows))
            if state.loss_params is None:
                continue
            for gi in range(len(self.groups)):
                if name in self._loss_fields(gi):
                    blocks = [(j, gi) for j in range(len(self.optimizers))]
                    out.append(_slot(name, "loss", blocks, rows))
        return out

    def get_slot(self, state: GradientProposerState, slot: Slot) -> Array:
        """The slot's per-candidate values, concatenated in the slot's row order."""
        if slot.kind == "opt":
            vals = [opt_hyperparams(state.opt_states[j][gi])[slot.name] for j, gi in slot.blocks]
        else:
            assert state.loss_params is not None  # loss slots exist only with loss_params
            vals = [getattr(state.loss_params[j][gi], slot.name) for j, gi in slot.blocks]
        return jnp.concatenate(vals)

    def initial_slot(self, slot: Slot) -> Array:
        """The slot's values as constructed (the `Optimizer`s' and losses' own leaves)."""
        if slot.kind == "opt":
            vals = [
                jnp.broadcast_to(
                    self.optimizers[j].hyperparams[slot.name],
                    (len(self.groups[gi]),) + jnp.shape(self.optimizers[j].hyperparams[slot.name]),
                )
                for j, gi in slot.blocks
            ]
        else:
            lp = self.initial_loss_params()
            vals = [getattr(lp[j][gi], slot.name) for j, gi in slot.blocks]
        return jnp.concatenate(vals)

    def set_slot(
        self, state: GradientProposerState, slot: Slot, values: Array
    ) -> GradientProposerState:
        """`state` with the slot's per-candidate values replaced."""
        opt_states = [list(per) for per in state.opt_states]
        loss_params = None if state.loss_params is None else [list(p) for p in state.loss_params]
        start = 0
        for j, gi in slot.blocks:
            n = len(self.groups[gi])
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

    def family_groups(self) -> list[list[tuple[int, int, np.ndarray]]]:
        """Blocks whose optimizer states share a structure (same optimizer family)."""
        fams: dict[Any, list[tuple[int, int, np.ndarray]]] = {}
        for j, gi, r in self.block_rows():
            fams.setdefault(self.optimizers[j].family, []).append((j, gi, r))
        return list(fams.values())

    def copy_rows(
        self,
        state: GradientProposerState,
        src: Int[Array, " candidate"],
        lineages: bool = True,
    ) -> GradientProposerState:
        """Candidate `i` takes candidate `src[i]`'s optimizer state (when their optimizers
        are of one family), loss leaves (same loss group) and, with `lineages`, parameters.
        Rows whose source is incompatible keep their own."""
        opt_states = [list(per) for per in state.opt_states]
        for fam in self.family_groups():
            moved = take_rows([opt_states[j][gi] for j, gi, _ in fam], [r for _, _, r in fam], src)
            for (j, gi, _), o in zip(fam, moved):
                opt_states[j][gi] = o
        out = dataclasses.replace(state, opt_states=tuple(tuple(p) for p in opt_states))
        if state.loss_params is not None:
            lp = [list(p) for p in state.loss_params]
            for gi in range(len(self.groups)):
                blocks = [(j, gi, r) for j, g2, r in self.block_rows() if g2 == gi]
                moved = take_rows([lp[j][gi] for j, _, _ in blocks], [r for *_, r in blocks], src)
                for (j, _, _), t in zip(blocks, moved):
                    lp[j][gi] = t
            out = dataclasses.replace(out, loss_params=tuple(tuple(p) for p in lp))
        if lineages and state.lineages is not None:
            blocks = self.block_rows()
            moved = take_rows(
                [state.lineages[j][gi] for j, gi, _ in blocks], [r for *_, r in blocks], src
            )
            it = iter(moved)
            out = dataclasses.replace(
                out,
                lineages=tuple(tuple(next(it) for _ in self.groups) for _ in self.optimizers),
            )
        return out

    def lineages_finite(self, state: GradientProposerState) -> Bool[Array, " candidate"]:
        """Per candidate: whether its lineage's parameters are finite (all true without
        lineages)."""
        if state.lineages is None:
            return jnp.ones((self.num_candidates,), bool)
        return jnp.concatenate(
            [tree_all_finite(p, batch_dims=1) for per in state.lineages for p in per]
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
        for j, opt in enumerate(self.optimizers):
            tx = opt.transformation()
            for gi, ((dyn, lstatic), size) in enumerate(zip(stacked_losses, sizes)):
                if state.loss_params is not None:  # per-candidate (evolving) loss leaves
                    dyn = state.loss_params[j][gi]
                blocks.append((tx, dyn, lstatic, start, size))
                start += size

        stateful = isinstance(static, Stateful)
        reference = eqx.combine(params, static)  # the current model, for reference losses

        def one(opt, lstatic, p, o, loss_dyn, batch, k):
            batch = split_examples(batch)  # data parallel on a mesh with a "data" axis
            loss = eqx.combine(loss_dyn, lstatic)
            if self.augment is not None:
                k, k_aug = jax.random.split(k)
                batch = augment_batch(self.augment, batch, k_aug)
            if isinstance(loss, AbstractReferenceLoss):
                loss = functools.partial(_with_reference, loss, reference)
            if not stateful:

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

        return candidates, dataclasses.replace(
            state,
            opt_states=per_block(o for _, o in carry),
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
        assert state.streak is not None and state.length is not None  # a growing proposer's
        streak = jnp.where(outcome.significant, 0, state.streak + 1)
        grow = streak >= self.patience
        longer = jnp.ceil(state.length.astype(jnp.float32) * self.growth_factor)
        longer = jnp.minimum(longer, self.max_steps).astype(jnp.int32)
        length = jnp.where(outcome.significant, self.steps, jnp.where(grow, longer, state.length))
        return dataclasses.replace(
            state,
            length=length.astype(jnp.int32),
            streak=jnp.where(grow, 0, streak).astype(jnp.int32),
        )

    def adapt(self, state: GradientProposerState, outcome: Outcome) -> GradientProposerState:
        state = self._grow(state, outcome)
        before = state
        restart = None
        if self.on_reject != "keep":
            new = self._policy_opt_states(state, outcome)
            if state.lineages is None:
                state = dataclasses.replace(state, opt_states=new)
            elif self.evolve is not None and self.evolve.truncate is not None:
                state, restart = self._truncate_lineages(state, outcome)
            else:
                state = self._continue_lineages(state, new, outcome)
        if self.evolve is not None:
            state = self._evolve(before, state, outcome, restart)
        return state

    def _policy_opt_states(self, state: GradientProposerState, outcome: Outcome) -> Any:
        n_loss = len(self.losses)
        sizes = [len(g) for g in self.groups]
        new = []
        for j, (opt, per_opt) in enumerate(zip(self.optimizers, state.opt_states)):
            base = j * n_loss
            if self.on_reject == "reset":
                fresh = opt.transformation().init(trainable(outcome.params))
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
        return tuple(new)

    def _continue_lineages(
        self, state: GradientProposerState, opt_states: Any, outcome: Outcome
    ) -> GradientProposerState:
        """`"continue"`: keep each lineage while the current model stays; restart them all
        from it when it changes, and any non-finite one from it with a fresh optimizer
        state."""
        changed = outcome.current_changed
        assert state.lineages is not None  # "continue" keeps lineages
        lineages, states = [], []
        for opt, per_lin, per_opt in zip(self.optimizers, state.lineages, opt_states):
            fresh = opt.transformation().init(trainable(outcome.params))
            lin_blocks, opt_blocks = [], []
            for p, o in zip(per_lin, per_opt):
                finite = tree_all_finite(p, batch_dims=1)
                lin_blocks.append(_where_rows(changed | ~finite, outcome.params, p))
                opt_blocks.append(_where_rows(~finite, fresh, o))
            lineages.append(tuple(lin_blocks))
            states.append(tuple(opt_blocks))
        return dataclasses.replace(state, opt_states=tuple(states), lineages=tuple(lineages))

    def _restart_mask(self, outcome: Outcome) -> Bool[Array, " candidate"]:
        """Truncation: on an acceptance only the bottom `truncate` fraction of lineages
        (by assess score) restart; on a roll back all of them; otherwise none."""
        K = self.num_candidates
        changed = jnp.broadcast_to(outcome.current_changed, (K,))
        if outcome.scores is None or self.evolve is None or self.evolve.truncate is None:
            return changed
        s = outcome.scores[self.evolve.objective]
        s = jnp.where(jnp.isfinite(s), s, -jnp.inf)
        n = jnp.maximum(1, jnp.ceil(self.evolve.truncate * K)).astype(jnp.int32)
        bottom = _ranks(s) < n
        return changed & jnp.where(outcome.accepted, bottom, True)

    def _truncate_lineages(
        self, state: GradientProposerState, outcome: Outcome
    ) -> tuple[GradientProposerState, Bool[Array, " candidate"]]:
        """`"continue"` with `Evolve(truncate=...)`: restarted lineages start from the new
        current model with the accepted candidate's optimizer state (same family); the others
        continue with their own; non-finite ones restart with a fresh optimizer state."""
        assert state.lineages is not None  # "continue" keeps lineages
        K = self.num_candidates
        finite = self.lineages_finite(state)
        restart = self._restart_mask(outcome) | ~finite
        idx = jnp.arange(K)
        src = jnp.where(restart & finite, outcome.accepted_index, idx)
        copied = self.copy_rows(state, src, lineages=False)
        # The moments come from the accepted candidate; each candidate's hyperparameters and
        # loss leaves stay its own (the evolving ones are moved by `_evolve`).
        state = dataclasses.replace(
            copied,
            opt_states=tuple(
                tuple(
                    with_opt_hyperparams(o, opt_hyperparams(own))
                    for o, own in zip(per_new, per_own)
                )
                for per_new, per_own in zip(copied.opt_states, state.opt_states)
            ),
            loss_params=state.loss_params,
        )
        own_lineages = state.lineages
        assert own_lineages is not None
        lineages, states = [], []
        for j, opt in enumerate(self.optimizers):
            fresh = opt.transformation().init(outcome.params)
            lin_blocks, opt_blocks = [], []
            for gi, (_, _, rows) in enumerate(b for b in self.block_rows() if b[0] == j):
                r = jnp.asarray(rows)
                lin_blocks.append(_where_rows(restart[r], outcome.params, own_lineages[j][gi]))
                opt_blocks.append(_where_rows(~finite[r], fresh, state.opt_states[j][gi]))
            lineages.append(tuple(lin_blocks))
            states.append(tuple(opt_blocks))
        new = dataclasses.replace(state, opt_states=tuple(states), lineages=tuple(lineages))
        return new, restart

    def _evolve(
        self,
        before: GradientProposerState,
        state: GradientProposerState,
        outcome: Outcome,
        restart: Bool[Array, " candidate"] | None,
    ) -> GradientProposerState:
        """Move the named hyperparameters toward the accepted candidate's (log space, with
        log-normal noise); they persist per candidate whatever the `on_reject` policy did to
        the optimizer states."""
        ev = self.evolve
        assert ev is not None and before.key is not None  # init keeps a key when evolving
        K = self.num_candidates
        a = outcome.accepted_index
        key, k_noise = jax.random.split(before.key)
        idx = jnp.arange(K)
        move = (a >= 0) & (idx != a)
        if restart is not None:
            move = move & restart
        slots = self.slots(before, ev.names)
        noise = ev.sigma * jax.random.normal(k_noise, (max(len(slots), 1), K))
        for n, slot in enumerate(slots):
            v = self.get_slot(before, slot)
            has, target = pick(v, slot, a)
            m = rows_of(move, slot) & has
            state = self.set_slot(
                state, slot, log_move(v, target, m, ev.pull, rows_of(noise[n], slot))
            )
        return dataclasses.replace(state, key=key)
