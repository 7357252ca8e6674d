"""Growable students and teachers: an MLP and a small CNN (Equinox modules), and the growth
operators that widen or deepen them.

Both models are called on **one example** (Equinox convention) given as a flat feature vector
(digits: 64 values, MNIST-1D: 40 values); the CNN reshapes it to `in_shape` itself.

Growth operators return a *new* model. Each has two modes:

- `"preserve"` (function-preserving): the grown network computes exactly the same outputs as
  the original before any training. Widening gives the new units random incoming weights and
  *zero* outgoing weights; deepening inserts an identity layer after a ReLU (for a
  non-negative input `x`, `relu(I x + 0) = x`).
- `"fresh"`: the new parts get Equinox's default random initialisation (incoming and outgoing
  weights for new units, a random inserted layer); existing weights are kept.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Literal

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, PRNGKeyArray

from ev3core import Stateful
from ev3core.errors import ConfigurationError

GrowMode = Literal["preserve", "fresh"]
_MODES = ("preserve", "fresh")


def _check_mode(mode: str) -> None:
    if mode not in _MODES:
        raise ConfigurationError(f"growth mode={mode!r} is not one of {_MODES}.")


def count_params(model: Any) -> int:
    """Number of scalar parameters (array leaves) of `model` (of an `ev3core.Stateful`: its
    model's, without the running statistics)."""
    if isinstance(model, Stateful):
        model = model.model
    return int(sum(x.size for x in jax.tree.leaves(eqx.filter(model, eqx.is_array))))


def describe(model: Any) -> dict[str, Any] | None:
    """`model.describe()` (of an `ev3core.Stateful`: its model's), or `None` for a model
    without one; `model_from_description` rebuilds the architecture from it."""
    inner = model.model if isinstance(model, Stateful) else model
    return inner.describe() if hasattr(inner, "describe") else None


def widths_of(model: Any) -> list[int]:
    """The hidden widths (MLP), channels (CNN) or stage widths (ResNet) of a student."""
    inner = model.model if isinstance(model, Stateful) else model
    return [int(w) for w in getattr(inner, "widths", ())]


class MLP(eqx.Module):
    """A ReLU multilayer perceptron with growable hidden layers.

    **Arguments:**

    - `in_features`, `num_classes`: input size (the example is flattened) and output size.
    - `widths`: hidden layer widths, e.g. `(8,)` or `(256, 256)`.
    - `key`: PRNG key.
    """

    layers: tuple[eqx.nn.Linear, ...]

    def __init__(
        self,
        in_features: int,
        num_classes: int,
        widths: Sequence[int],
        *,
        key: PRNGKeyArray,
    ):
        sizes = (int(in_features), *(int(w) for w in widths), int(num_classes))
        keys = jax.random.split(key, len(sizes) - 1)
        self.layers = tuple(
            eqx.nn.Linear(a, b, key=k) for a, b, k in zip(sizes[:-1], sizes[1:], keys)
        )

    @property
    def widths(self) -> tuple[int, ...]:
        return tuple(layer.out_features for layer in self.layers[:-1])

    @property
    def depth(self) -> int:
        """Number of hidden layers."""
        return len(self.layers) - 1

    def describe(self) -> dict[str, Any]:
        return {
            "kind": "mlp",
            "in_features": self.layers[0].in_features,
            "num_classes": self.layers[-1].out_features,
            "widths": list(self.widths),
        }

    def __call__(self, x: Float[Array, ...]) -> Float[Array, " classes"]:
        x = jnp.reshape(x, (-1,))
        for layer in self.layers[:-1]:
            x = jax.nn.relu(layer(x))
        return self.layers[-1](x)


class CNN(eqx.Module):
    """A small ReLU convolutional network (1-D or 2-D) with a linear head.

    `convs` are "same"-padded convolutions with kernel `kernel_size`, each followed by ReLU;
    the last feature map is flattened (channel-major) into the linear `head`.

    **Arguments:**

    - `in_shape`: shape of one example without the channel axis, e.g. `(8, 8)` or `(40,)`.
    - `num_classes`: output size.
    - `channels`: output channels of each convolution, e.g. `(4,)` or `(32, 64)`.
    - `kernel_size`: convolution size (odd).
    - `hidden`: width of an optional hidden dense layer before the head (0: none).
    - `key`: PRNG key.
    """

    convs: tuple[eqx.nn.Conv, ...]
    dense: tuple[eqx.nn.Linear, ...]
    in_shape: tuple[int, ...] = eqx.field(static=True)
    kernel_size: int = eqx.field(static=True)

    def __init__(
        self,
        in_shape: Sequence[int],
        num_classes: int,
        channels: Sequence[int],
        *,
        kernel_size: int = 3,
        hidden: int = 0,
        key: PRNGKeyArray,
    ):
        in_shape = tuple(int(s) for s in in_shape)
        if kernel_size % 2 != 1:
            raise ConfigurationError(f"CNN: kernel_size={kernel_size} must be odd.")
        if not channels:
            raise ConfigurationError("CNN: give at least one convolution, e.g. channels=(4,).")
        nd = len(in_shape)
        chans = (1, *(int(c) for c in channels))
        k_conv, k_dense = jax.random.split(key)
        keys = jax.random.split(k_conv, len(chans) - 1)
        self.convs = tuple(
            eqx.nn.Conv(nd, a, b, kernel_size, padding="SAME", key=k)
            for a, b, k in zip(chans[:-1], chans[1:], keys)
        )
        flat = chans[-1] * math.prod(in_shape)
        sizes = (flat, int(hidden), int(num_classes)) if hidden else (flat, int(num_classes))
        dkeys = jax.random.split(k_dense, len(sizes) - 1)
        self.dense = tuple(
            eqx.nn.Linear(a, b, key=k) for a, b, k in zip(sizes[:-1], sizes[1:], dkeys)
        )
        self.in_shape = in_shape
        self.kernel_size = int(kernel_size)

    @property
    def channels(self) -> tuple[int, ...]:
        return tuple(c.out_channels for c in self.convs)

    @property
    def widths(self) -> tuple[int, ...]:
        return self.channels

    @property
    def depth(self) -> int:
        """Number of convolutions."""
        return len(self.convs)

    def describe(self) -> dict[str, Any]:
        return {
            "kind": "cnn",
            "in_shape": list(self.in_shape),
            "num_classes": self.dense[-1].out_features,
            "channels": list(self.channels),
            "kernel_size": self.kernel_size,
            "hidden": self.dense[0].out_features if len(self.dense) > 1 else 0,
        }

    def __call__(self, x: Float[Array, ...]) -> Float[Array, " classes"]:
        x = jnp.reshape(x, (1, *self.in_shape))
        for conv in self.convs:
            x = jax.nn.relu(conv(x))
        x = jnp.reshape(x, (-1,))
        for layer in self.dense[:-1]:
            x = jax.nn.relu(layer(x))
        return self.dense[-1](x)


# ---------------------------------------------------------------------------- growth
def _set(module: Any, **leaves: Array) -> Any:
    names = list(leaves)
    return eqx.tree_at(
        lambda m: [getattr(m, n) for n in names],
        module,
        [leaves[n] for n in names],
    )


def _widen_linear_out(layer: eqx.nn.Linear, extra: int, key: PRNGKeyArray) -> eqx.nn.Linear:
    """`layer` with `extra` new output units (default init)."""
    fresh = eqx.nn.Linear(layer.in_features, layer.out_features + extra, key=key)
    new = _set(
        fresh,
        weight=jnp.concatenate([layer.weight, fresh.weight[layer.out_features :]], axis=0),
        bias=jnp.concatenate([layer.bias, fresh.bias[layer.out_features :]]),
    )
    return new


def _widen_linear_in(
    layer: eqx.nn.Linear, extra: int, mode: str, key: PRNGKeyArray, *, group: int = 1
) -> eqx.nn.Linear:
    """`layer` taking `extra * group` more inputs.

    The input is laid out channel-major with `group` features per channel (a flattened
    feature map), and the new channels come last.
    """
    old_in = layer.in_features
    new_in = old_in + extra * group
    fresh = eqx.nn.Linear(new_in, layer.out_features, key=key)
    if mode == "preserve":
        add = jnp.zeros((layer.out_features, extra * group), layer.weight.dtype)
    else:
        add = fresh.weight[:, old_in:]
    return _set(fresh, weight=jnp.concatenate([layer.weight, add], axis=1), bias=layer.bias)


def _identity_linear(width: int, key: PRNGKeyArray) -> eqx.nn.Linear:
    layer = eqx.nn.Linear(width, width, key=key)
    eye = jnp.eye(width, dtype=layer.weight.dtype)
    return _set(layer, weight=eye, bias=jnp.zeros_like(layer.bias))


def _widen_conv_out(conv: eqx.nn.Conv, extra: int, key: PRNGKeyArray) -> eqx.nn.Conv:
    fresh = eqx.nn.Conv(
        conv.num_spatial_dims,
        conv.in_channels,
        conv.out_channels + extra,
        conv.kernel_size,
        padding="SAME",
        key=key,
    )
    return _set(
        fresh,
        weight=jnp.concatenate([conv.weight, fresh.weight[conv.out_channels :]], axis=0),
        bias=jnp.concatenate([conv.bias, fresh.bias[conv.out_channels :]], axis=0),
    )


def _widen_conv_in(conv: eqx.nn.Conv, extra: int, mode: str, key: PRNGKeyArray) -> eqx.nn.Conv:
    fresh = eqx.nn.Conv(
        conv.num_spatial_dims,
        conv.in_channels + extra,
        conv.out_channels,
        conv.kernel_size,
        padding="SAME",
        key=key,
    )
    if mode == "preserve":
        add = jnp.zeros((conv.out_channels, extra, *conv.weight.shape[2:]), conv.weight.dtype)
    else:
        add = fresh.weight[:, conv.in_channels :]
    return _set(fresh, weight=jnp.concatenate([conv.weight, add], axis=1), bias=conv.bias)


def _identity_conv(conv_like: eqx.nn.Conv, channels: int, key: PRNGKeyArray) -> eqx.nn.Conv:
    conv = eqx.nn.Conv(
        conv_like.num_spatial_dims,
        channels,
        channels,
        conv_like.kernel_size,
        padding="SAME",
        key=key,
    )
    centre = tuple(k // 2 for k in conv.kernel_size)
    w = jnp.zeros_like(conv.weight)
    idx = jnp.arange(channels)
    w = w.at[(idx, idx, *centre)].set(1.0)
    return _set(conv, weight=w, bias=jnp.zeros_like(conv.bias))


def widen(
    model: MLP | CNN,
    layer: int,
    new_width: int,
    *,
    mode: GrowMode = "preserve",
    key: PRNGKeyArray,
) -> MLP | CNN:
    """Widen hidden layer (MLP) or convolution (CNN) `layer` to `new_width` units/channels.

    **Arguments:**

    - `model`: an `MLP` or a `CNN`.
    - `layer`: index of the hidden layer / convolution to widen.
    - `new_width`: the new number of units or channels (larger than the current one).
    - `mode`: `"preserve"` (same outputs as before) or `"fresh"` (see the module docstring).
    - `key`: PRNG key for the new weights.

    **Returns:** the grown model.

    ```python
    bigger = widen(student, 0, 16, key=jax.random.key(1))
    ```
    """
    _check_mode(mode)
    widths = model.widths
    if not 0 <= layer < len(widths):
        raise ConfigurationError(
            f"widen: layer={layer} but {type(model).__name__} has {len(widths)} growable "
            f"layer(s); use an index in [0, {len(widths)})."
        )
    extra = int(new_width) - widths[layer]
    if extra <= 0:
        raise ConfigurationError(
            f"widen: new_width={new_width} must exceed the current width {widths[layer]}."
        )
    if not isinstance(model, MLP | CNN):
        raise ConfigurationError(f"widen: cannot grow a {type(model).__name__}; use MLP or CNN.")
    return _widen(model, layer, extra, mode, key)


def _widen(model: MLP | CNN, layer: int, extra: int, mode: str, key: PRNGKeyArray) -> MLP | CNN:
    k_out, k_in = jax.random.split(key)
    if isinstance(model, MLP):
        layers = list(model.layers)
        layers[layer] = _widen_linear_out(layers[layer], extra, k_out)
        layers[layer + 1] = _widen_linear_in(layers[layer + 1], extra, mode, k_in)
        return eqx.tree_at(lambda m: m.layers, model, tuple(layers))
    if isinstance(model, CNN):
        convs = list(model.convs)
        convs[layer] = _widen_conv_out(convs[layer], extra, k_out)
        if layer + 1 < len(convs):
            convs[layer + 1] = _widen_conv_in(convs[layer + 1], extra, mode, k_in)
            model = eqx.tree_at(lambda m: m.convs, model, tuple(convs))
            return model
        dense = list(model.dense)
        dense[0] = _widen_linear_in(dense[0], extra, mode, k_in, group=math.prod(model.in_shape))
        return eqx.tree_at(lambda m: (m.convs, m.dense), model, (tuple(convs), tuple(dense)))
    raise AssertionError("unreachable")


def deepen(
    model: MLP | CNN,
    position: int | None = None,
    *,
    mode: GrowMode = "preserve",
    key: PRNGKeyArray,
) -> MLP | CNN:
    """Insert a hidden layer (MLP) or convolution (CNN) after layer `position`.

    The new layer has the width of the layer before it. In `"preserve"` mode it is the
    identity (so, after the preceding ReLU, the network's outputs do not change).

    **Arguments:**

    - `model`: an `MLP` or a `CNN`.
    - `position`: index of the hidden layer / convolution after which to insert (default:
      the last one).
    - `mode`: `"preserve"` or `"fresh"`.
    - `key`: PRNG key.
    """
    _check_mode(mode)
    n = len(model.widths)
    position = n - 1 if position is None else int(position)
    if not 0 <= position < n:
        raise ConfigurationError(
            f"deepen: position={position} but {type(model).__name__} has {n} growable "
            f"layer(s); use an index in [0, {n})."
        )
    if not isinstance(model, MLP | CNN):
        raise ConfigurationError(f"deepen: cannot grow a {type(model).__name__}; use MLP or CNN.")
    return _deepen(model, position, mode, key)


def _deepen(model: MLP | CNN, position: int, mode: str, key: PRNGKeyArray) -> MLP | CNN:
    width = model.widths[position]
    if isinstance(model, MLP):
        new = (
            _identity_linear(width, key)
            if mode == "preserve"
            else eqx.nn.Linear(width, width, key=key)
        )
        layers = list(model.layers)
        layers.insert(position + 1, new)
        return eqx.tree_at(lambda m: m.layers, model, tuple(layers))
    if isinstance(model, CNN):
        ref = model.convs[position]
        new = (
            _identity_conv(ref, width, key)
            if mode == "preserve"
            else eqx.nn.Conv(
                ref.num_spatial_dims, width, width, ref.kernel_size, padding="SAME", key=key
            )
        )
        convs = list(model.convs)
        convs.insert(position + 1, new)
        return eqx.tree_at(lambda m: m.convs, model, tuple(convs))
    raise AssertionError("unreachable")


@eqx.filter_jit
def _max_abs_diff(a: Any, b: Any, x: Array) -> Array:
    return jnp.max(jnp.abs(jax.vmap(a)(x) - jax.vmap(b)(x)))


def max_abs_output_difference(a: Any, b: Any, x: Float[Array, "example ..."]) -> float:
    """Largest absolute difference between the outputs of models `a` and `b` on `x`."""
    return float(_max_abs_diff(a, b, jnp.asarray(x)))


def model_from_description(description: dict[str, Any], *, key: PRNGKeyArray) -> Any:
    """A freshly initialised `MLP`, `CNN` or `Stateful(ResNet, state)` with the architecture
    of `describe(model)`.

    Used to rebuild the structure (the `like` argument) of a saved, possibly grown, student
    before loading its leaves.
    """
    kind = description.get("kind")
    if kind == "mlp":
        return MLP(
            description["in_features"],
            description["num_classes"],
            description["widths"],
            key=key,
        )
    if kind == "cnn":
        return CNN(
            description["in_shape"],
            description["num_classes"],
            description["channels"],
            kernel_size=description["kernel_size"],
            hidden=description["hidden"],
            key=key,
        )
    if kind == "resnet":
        from ._resnet import make_resnet

        return Stateful(
            *make_resnet(
                description["in_shape"],
                description["num_classes"],
                widths=description["widths"],
                blocks=description["blocks"],
                key=key,
            )
        )
    raise ConfigurationError(
        f"model_from_description: unknown model kind {kind!r} in {description!r}; expected "
        "the output of MLP.describe(), CNN.describe() or ResNet.describe()."
    )
