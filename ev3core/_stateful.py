"""Models with state (BatchNorm running statistics) and randomness (dropout).

EV3 keeps a model as its array leaves (`State.current`, stacked candidates, checkpoints,
shards) plus a static remainder. `Stateful` puts an Equinox model and its `eqx.nn.State`
into one module, so the running statistics are array leaves like the weights: every candidate
carries its own, the current and stable models keep theirs, and checkpoints, sharding and
`lax.scan` need nothing new. A stateless model is never wrapped and is unaffected.

- **Assessment** calls `Stateful` on one example: the model runs in inference mode
  (`eqx.nn.inference_mode`: BatchNorm uses its running statistics, dropout is off, no key is
  needed), so every assessor works on it unchanged.
- **Training** (the gradient proposer) uses `Stateful.training(key)`, a view in training mode
  with a key: losses call it on a whole batch through `batch_apply(model, x)` (BatchNorm needs
  the batch, under `jax.vmap(axis_name="batch")`; dropout gets one key per example), and the
  proposer threads the updated statistics (`TrainingView.new_state`) through each trajectory.
  Gradients and optimizer states cover `Stateful.model` only, never the statistics.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
from jaxtyping import Array, PRNGKeyArray, PyTree

from .errors import ConfigurationError


def first_input(batch: PyTree[Array]) -> PyTree[Array]:
    """The model's inputs in a batch `(x, y, ...)`: its first entry (or the batch itself)."""
    return batch[0] if isinstance(batch, tuple | list) else batch


def _clone(state: eqx.nn.State) -> eqx.nn.State:
    # eqx.nn.State invalidates an object once `set` was called on it; each call gets a copy.
    leaves, treedef = jax.tree.flatten(state)
    return jax.tree.unflatten(treedef, leaves)


class Stateful(eqx.Module):
    """An Equinox model with an `eqx.nn.State` and/or dropout, as one EV3 model.

    The model is called as `model(x, state, *, key) -> (y, state)` when `state` is given
    (BatchNorm: `eqx.nn.make_with_state(Model)(...)`), or `model(x, *, key) -> y` when it is
    `None` (dropout only), on one example, the Equinox way. Its BatchNorm layers use
    `axis_name="batch"` (the Equinox default).

    **Arguments:**

    - `model`: the Equinox model (its layers' `inference` flags are switched by EV3).
    - `state`: its `eqx.nn.State`, or `None` for a model without state.
    - `inputs`: picks the model's inputs out of a propose batch, to update the running
      statistics in training (default: the first entry of `(x, y, ...)`).

    ```python
    model, state = eqx.nn.make_with_state(ResNet)(...)
    engine.init(ev3.Stateful(model, state), key)
    ```
    """

    model: Any
    state: eqx.nn.State | None
    inputs: Callable[[Any], Any] = eqx.field(static=True, default=first_input)

    def __check_init__(self):
        if self.state is not None and not isinstance(self.state, eqx.nn.State):
            raise ConfigurationError(
                f"Stateful: state must be an eqx.nn.State or None, got "
                f"{type(self.state).__name__}. Build both parts with "
                "eqx.nn.make_with_state(Model)(...)."
            )

    def __call__(self, x: PyTree[Array]) -> PyTree[Array]:
        """One example in inference mode (what assessors see)."""
        model = eqx.nn.inference_mode(self.model, True)
        if self.state is None:
            return model(x)
        y, _ = model(x, _clone(self.state))
        return y

    def training(self, key: PRNGKeyArray) -> TrainingView:
        """This model in training mode with `key` (for losses; see `batch_apply`)."""
        return TrainingView(self.model, self.state, key)


class _Record:
    """Where a training view notes the state its last batch pass produced (local to one
    traced loss evaluation, like a Haiku frame: see `loss_and_state`)."""

    __slots__ = ("state", "calls")

    def __init__(self) -> None:
        self.state: Any = None
        self.calls = 0


class TrainingView(eqx.Module):
    """A `Stateful` model in training mode, with a key: call it on a batch with
    `batch_apply(view, x)`. Built by `Stateful.training(key)`."""

    model: Any
    state: eqx.nn.State | None
    key: PRNGKeyArray
    record: _Record | None = eqx.field(static=True, default=None)

    def _run(self, x: PyTree[Array]) -> tuple[PyTree[Array], eqx.nn.State | None]:
        model = eqx.nn.inference_mode(self.model, False)
        n = jax.tree.leaves(x)[0].shape[0]
        keys = jax.random.split(self.key, n)
        if self.state is None:
            return jax.vmap(lambda xi, ki: model(xi, key=ki))(x, keys), None
        state = _clone(self.state)
        return jax.vmap(
            lambda xi, ki: model(xi, state, key=ki),
            axis_name="batch",
            in_axes=(0, 0),
            out_axes=(0, None),
        )(x, keys)

    def batch(self, x: PyTree[Array]) -> PyTree[Array]:
        """The outputs on a batch `x` (leading example axis), in training mode."""
        y, state = self._run(x)
        if self.record is not None:
            self.record.state, self.record.calls = state, self.record.calls + 1
        return y

    def new_state(self, x: PyTree[Array]) -> eqx.nn.State | None:
        """The state after a training-mode pass over the batch `x`."""
        return self._run(x)[1]

    def __call__(self, x: PyTree[Array]) -> PyTree[Array]:
        raise ConfigurationError(
            "A model in training mode was called on one example. Models with BatchNorm or "
            "dropout (ev3core.Stateful) train on whole batches: in a loss, compute outputs "
            "with ev3core.batch_apply(model, x) instead of jax.vmap(model)(x)."
        )


def loss_and_state(
    model: Stateful,
    key: PRNGKeyArray,
    loss: Callable[[TrainingView], Array],
    batch: PyTree[Array],
) -> tuple[Array, eqx.nn.State | None]:
    """`(loss(view), new_state)` for the training view of `model` with `key`.

    The new running statistics are those of the loss's own forward pass: the view notes the
    state of its (last) `batch_apply` during this one evaluation, so there is no second
    pass. A loss that never calls `batch_apply` (it raises on a per-example call) cannot
    train a stateful model; if it computes its outputs some other way and returns without
    calling the view, the statistics come from a separate training pass on
    `model.inputs(batch)`. Call `batch_apply` at the top level of the loss (not inside your
    own `vmap` / `scan`), so the state it produces belongs to this evaluation.
    """
    record = _Record()
    view = TrainingView(model.model, model.state, key, record)
    value = loss(view)
    if model.state is None:
        return value, None
    if record.calls:
        return value, record.state
    return value, TrainingView(model.model, model.state, key).new_state(model.inputs(batch))


def batch_apply(model: Any, x: PyTree[Array]) -> PyTree[Array]:
    """`model` on a batch `x` (leading example axis): `jax.vmap(model)(x)` for an ordinary
    model or a `Stateful` one in inference mode; a training-mode pass (batch statistics,
    a dropout key per example) for the view a gradient proposer hands to its losses.

    Losses should call models through this, so that they train stateful models too.
    """
    if isinstance(model, TrainingView):
        return model.batch(x)
    return jax.vmap(model)(x)


def trainable(params: PyTree[Array]) -> PyTree[Array]:
    """The parts of a model's parameters that gradients update (not running statistics)."""
    return params.model if isinstance(params, Stateful) else params


def with_trainable(params: PyTree[Array], new: PyTree[Array]) -> PyTree[Array]:
    """`params` with its trainable part replaced by `new`."""
    if isinstance(params, Stateful):
        return eqx.tree_at(lambda p: p.model, params, new)
    return new
