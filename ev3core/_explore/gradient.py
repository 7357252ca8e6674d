"""The built-in gradient proposer: the component, its settings and their checks.

Its per-candidate layout and state are in `blocks.py`, its trajectories in
`trajectories.py`, and what it does after each decision (growth, `on_reject` policies,
evolving hyperparameters) in `lineages.py`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jaxtyping import Array, Bool, Float, Int, PRNGKeyArray, PyTree

from .._interfaces import AbstractLoss, AbstractProposer
from .._stateful import trainable
from .._types import Outcome
from ..errors import ConfigurationError
from . import blocks, trajectories
from .augment import AbstractAugment
from .blocks import GradientProposerState, broadcast, loss_groups
from .hyper import Evolve, Optimizer, _Fixed, as_optimizer
from .lineages import after_decision
from .population import Slot

RejectPolicy = Literal["keep", "reset", "copy", "continue"]
_POLICIES = ("keep", "reset", "copy", "continue")

__all__ = ["GradientProposer", "GradientProposerState"]


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
        losses, optimizers = _checked_grid(losses, optimizers, optimizer_names)
        _check_sizes(steps, batch_size, on_reject, max_steps, chunk_size)
        self.losses = losses
        self.optimizers = optimizers
        self.steps = int(steps)
        self.batch_size = int(batch_size)
        self.on_reject = on_reject
        self.optimizer_names = None if optimizer_names is None else tuple(optimizer_names)
        self.groups = loss_groups(losses)
        self.max_steps = self.steps if max_steps is None else int(max_steps)
        self.growth_factor = jnp.asarray(growth_factor, jnp.float32)
        self.patience = jnp.asarray(patience, jnp.int32)
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
            blocks.check_hyper_names(self, evolve.names, "Evolve")
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
                    broadcast(opt.transformation().init(trainable(params)), len(g))
                    for g in self.groups
                )
                for opt in self.optimizers
            ),
            length=jnp.asarray(self.steps, jnp.int32) if self.grows else None,
            streak=jnp.zeros((), jnp.int32) if self.grows else None,
            lineages=blocks.fresh_lineages(self, params),
            loss_params=blocks.initial_loss_params(self) if evolving else None,
            key=key if evolving else None,
        )

    # ------------------------------------------------------------ per-candidate layout
    def block_rows(self) -> list[tuple[int, int, np.ndarray]]:
        """`(optimizer j, loss group gi, global candidate indices)` of every block, in the
        order candidates are concatenated."""
        return blocks.block_rows(self)

    def initial_loss_params(self) -> tuple[tuple[Any, ...], ...]:
        """The losses' array leaves, stacked per block like `opt_states` (what
        `GradientProposerState.loss_params` starts from)."""
        return blocks.initial_loss_params(self)

    def slots(self, state: GradientProposerState, names: Sequence[str]) -> list[Slot]:
        """Where each named hyperparameter lives, grouped by comparable candidates: one slot
        per (name, optimizer family) for optimizer hyperparameters, one per (name, loss
        group) for loss fields (those need `state.loss_params`)."""
        return blocks.slots(self, state, names)

    def get_slot(self, state: GradientProposerState, slot: Slot) -> Array:
        """The slot's per-candidate values, concatenated in the slot's row order."""
        return blocks.get_slot(self, state, slot)

    def initial_slot(self, slot: Slot) -> Array:
        """The slot's values as constructed (the `Optimizer`s' and losses' own leaves)."""
        return blocks.initial_slot(self, slot)

    def set_slot(
        self, state: GradientProposerState, slot: Slot, values: Array
    ) -> GradientProposerState:
        """`state` with the slot's per-candidate values replaced."""
        return blocks.set_slot(self, state, slot, values)

    def family_groups(self) -> list[list[tuple[int, int, np.ndarray]]]:
        """Blocks whose optimizer states share a structure (same optimizer family)."""
        return blocks.family_groups(self)

    def copy_rows(
        self,
        state: GradientProposerState,
        src: Int[Array, " candidate"],
        lineages: bool = True,
    ) -> GradientProposerState:
        """Candidate `i` takes candidate `src[i]`'s optimizer state (when their optimizers
        are of one family), loss leaves (same loss group) and, with `lineages`, parameters.
        Rows whose source is incompatible keep their own."""
        return blocks.copy_rows(self, state, src, lineages)

    def lineages_finite(self, state: GradientProposerState) -> Bool[Array, " candidate"]:
        """Per candidate: whether its lineage's parameters are finite (all true without
        lineages)."""
        return blocks.lineages_finite(self, state)

    def propose(
        self,
        params: PyTree[Array],
        static: Any,
        state: GradientProposerState,
        data: PyTree[Array],
        key: PRNGKeyArray,
    ) -> tuple[PyTree[Array], GradientProposerState]:
        return trajectories.propose(self, params, static, state, data, key)

    def adapt(self, state: GradientProposerState, outcome: Outcome) -> GradientProposerState:
        return after_decision(self, state, outcome)


def _checked_grid(
    losses: Sequence[AbstractLoss],
    optimizers: Sequence[Optimizer | optax.GradientTransformation],
    optimizer_names: Sequence[str] | None,
) -> tuple[tuple[AbstractLoss, ...], tuple[Optimizer | _Fixed, ...]]:
    """The losses and optimizers as tuples (optimizers as specs), checked."""
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
    specs = tuple(as_optimizer(opt) for opt in optimizers)
    if optimizer_names is not None and len(tuple(optimizer_names)) != len(specs):
        raise ConfigurationError(
            f"GradientProposer: {len(tuple(optimizer_names))} optimizer_names for "
            f"{len(specs)} optimizers; give one name per optimizer."
        )
    return losses, specs


def _check_sizes(
    steps: int, batch_size: int, on_reject: str, max_steps: int | None, chunk_size: int | None
) -> None:
    """The trajectory sizes and the reject policy, checked."""
    if int(steps) < 1 or int(batch_size) < 1:
        raise ConfigurationError(
            f"GradientProposer: steps={steps} and batch_size={batch_size} must both be >= 1."
        )
    if on_reject not in _POLICIES:
        raise ConfigurationError(
            f"GradientProposer: on_reject={on_reject!r} is not one of {_POLICIES}."
        )
    if max_steps is not None and int(max_steps) < int(steps):
        raise ConfigurationError(
            f"GradientProposer: max_steps={max_steps} is below steps={steps}. max_steps is "
            "the longest trajectory that growth may reach: use max_steps >= steps."
        )
    if chunk_size is not None and int(chunk_size) < 1:
        raise ConfigurationError(
            f"GradientProposer: chunk_size={chunk_size} must be a positive integer (or None "
            "to advance every candidate at once)."
        )
