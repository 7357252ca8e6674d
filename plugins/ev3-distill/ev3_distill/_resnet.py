"""A CIFAR-style ResNet student (He et al., 2016, section 4.2) and its function-preserving
growth, as in the reference EV3 implementation.

The network has a 3x3 stem convolution, three stages of *basic blocks* (two 3x3 convolutions,
each followed by BatchNorm, with a residual connection; the first block of stages 2 and 3
halves the resolution and uses a 1x1 projection shortcut), global average pooling and a
linear head. With `s` blocks per stage its depth is `6 s + 2` (ResNet-8, -14, -20, ...).

BatchNorm keeps running statistics in an `eqx.nn.State`, so the model is called as
`model(x, state) -> (logits, state)` on **one example** of shape `in_shape` (channel last,
`(height, width, channels)`, as images are stored) inside a `jax.vmap(..., axis_name="batch")`
in training, or in inference mode (`eqx.nn.inference_mode`) on its own. Build it with
`eqx.nn.make_with_state(ResNet)(...)` and hand both parts to EV3 as
`ev3core.Stateful(model, state)`.

Growth (both exact in inference mode, and in training mode for the old channels):

- `widen_resnet`: every stage's filters times `factor`. New channels get fresh weights but
  their BatchNorm scales and shifts are zero, so they are exactly zero everywhere (and stay
  zero through ReLUs and residual sums) until training moves those scales.
- `deepen_resnet`: one new basic block at the end of every stage whose *last* BatchNorm scale
  and shift are zero, so the block computes `relu(x + 0) = x` on its (non-negative) input.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, PRNGKeyArray

from ev3core.errors import ConfigurationError


def _bn(width: int) -> eqx.nn.BatchNorm:
    # "ema": batch statistics in training (running averages from the first batch on), the
    # running averages in inference.
    return eqx.nn.BatchNorm(width, axis_name="batch", momentum=0.9, mode="ema")


class BasicBlock(eqx.Module):
    """`relu(bn2(conv2(relu(bn1(conv1(x))))) + shortcut(x))`; the shortcut is the identity
    or, when the block changes resolution or width, a 1x1 convolution and BatchNorm."""

    conv1: eqx.nn.Conv2d
    bn1: eqx.nn.BatchNorm
    conv2: eqx.nn.Conv2d
    bn2: eqx.nn.BatchNorm
    proj: eqx.nn.Conv2d | None
    proj_bn: eqx.nn.BatchNorm | None

    def __init__(self, in_width: int, width: int, stride: int, *, key: PRNGKeyArray):
        k1, k2, k3 = jax.random.split(key, 3)
        conv = dict(kernel_size=3, padding=1, use_bias=False)
        self.conv1 = eqx.nn.Conv2d(in_width, width, stride=stride, key=k1, **conv)
        self.bn1 = _bn(width)
        self.conv2 = eqx.nn.Conv2d(width, width, stride=1, key=k2, **conv)
        self.bn2 = _bn(width)
        if stride != 1 or in_width != width:
            self.proj = eqx.nn.Conv2d(
                in_width, width, kernel_size=1, stride=stride, use_bias=False, key=k3
            )
            self.proj_bn = _bn(width)
        else:
            self.proj = None
            self.proj_bn = None

    def __call__(
        self, x: Float[Array, "c h w"], state: eqx.nn.State
    ) -> tuple[Float[Array, "c2 h2 w2"], eqx.nn.State]:
        y, state = self.bn1(self.conv1(x), state)
        y, state = self.bn2(self.conv2(jax.nn.relu(y)), state)
        if self.proj is None:
            shortcut = x
        else:
            shortcut, state = self.proj_bn(self.proj(x), state)
        return jax.nn.relu(y + shortcut), state


class ResNet(eqx.Module):
    """A CIFAR ResNet of basic blocks with BatchNorm (see the module docstring).

    **Arguments:**

    - `in_shape`: one example's shape, channel last, e.g. `(32, 32, 3)`.
    - `num_classes`: output size.
    - `depth`: `6 s + 2` for `s` blocks per stage (8, 14, 20, 32, ...); or give `blocks`.
    - `widths`: filters of the three stages (default `(16, 32, 64)`).
    - `blocks`: blocks per stage, overriding `depth`.
    - `key`: PRNG key.

    ```python
    model, state = eqx.nn.make_with_state(ResNet)((32, 32, 3), 10, depth=8, key=key)
    ```
    """

    stem: eqx.nn.Conv2d
    stem_bn: eqx.nn.BatchNorm
    stages: tuple[tuple[BasicBlock, ...], ...]
    head: eqx.nn.Linear
    in_shape: tuple[int, ...] = eqx.field(static=True)

    def __init__(
        self,
        in_shape: Sequence[int],
        num_classes: int,
        depth: int = 8,
        widths: Sequence[int] = (16, 32, 64),
        *,
        blocks: Sequence[int] | None = None,
        key: PRNGKeyArray,
    ):
        in_shape = tuple(int(s) for s in in_shape)
        if len(in_shape) != 3:
            raise ConfigurationError(
                f"ResNet: in_shape={in_shape} must be (height, width, channels), e.g. (32, 32, 3)."
            )
        widths = tuple(int(w) for w in widths)
        if blocks is None:
            if depth < 8 or (depth - 2) % 6:
                raise ConfigurationError(
                    f"ResNet: depth={depth} is not 6 s + 2 with s >= 1 blocks per stage; use "
                    "8, 14, 20, 32, ... (or pass blocks=(s1, s2, s3))."
                )
            blocks = ((depth - 2) // 6,) * len(widths)
        blocks = tuple(int(b) for b in blocks)
        if len(blocks) != len(widths) or min(blocks) < 1 or min(widths) < 1:
            raise ConfigurationError(
                f"ResNet: blocks={blocks} and widths={widths} need one positive entry per stage."
            )
        k_stem, k_head, k_blocks = jax.random.split(key, 3)
        self.stem = eqx.nn.Conv2d(
            in_shape[-1], widths[0], kernel_size=3, padding=1, use_bias=False, key=k_stem
        )
        self.stem_bn = _bn(widths[0])
        stages = []
        in_width = widths[0]
        keys = iter(jax.random.split(k_blocks, sum(blocks)))
        for i, (n, width) in enumerate(zip(blocks, widths)):
            stage = []
            for j in range(n):
                stride = 2 if (i > 0 and j == 0) else 1
                stage.append(BasicBlock(in_width, width, stride, key=next(keys)))
                in_width = width
            stages.append(tuple(stage))
        self.stages = tuple(stages)
        self.head = eqx.nn.Linear(widths[-1], int(num_classes), key=k_head)
        self.in_shape = in_shape

    @property
    def widths(self) -> tuple[int, ...]:
        return tuple(stage[0].conv2.out_channels for stage in self.stages)

    @property
    def blocks(self) -> tuple[int, ...]:
        return tuple(len(stage) for stage in self.stages)

    @property
    def depth(self) -> int:
        return 2 + 2 * sum(self.blocks)

    @property
    def num_classes(self) -> int:
        return self.head.out_features

    def describe(self) -> dict[str, Any]:
        return {
            "kind": "resnet",
            "in_shape": list(self.in_shape),
            "num_classes": self.num_classes,
            "widths": list(self.widths),
            "blocks": list(self.blocks),
        }

    def __call__(
        self,
        x: Float[Array, ...],
        state: eqx.nn.State,
        *,
        key: PRNGKeyArray | None = None,
    ) -> tuple[Float[Array, " classes"], eqx.nn.State]:
        del key  # no randomness in the network itself; accepted for the Equinox protocol
        x = jnp.transpose(jnp.reshape(x, self.in_shape), (2, 0, 1))
        y, state = self.stem_bn(self.stem(x), state)
        y = jax.nn.relu(y)
        for stage in self.stages:
            for block in stage:
                y, state = block(y, state)
        return self.head(jnp.mean(y, axis=(1, 2))), state


def make_resnet(
    in_shape: Sequence[int],
    num_classes: int,
    depth: int = 8,
    widths: Sequence[int] = (16, 32, 64),
    *,
    blocks: Sequence[int] | None = None,
    key: PRNGKeyArray,
) -> tuple[ResNet, eqx.nn.State]:
    """`(model, state)`: a `ResNet` and its initial BatchNorm state
    (`eqx.nn.make_with_state(ResNet)(...)`), with running means 0 and variances 1, so
    that a model assessed before any training step is not scaled by `1 / sqrt(eps)`."""
    model, state = eqx.nn.make_with_state(ResNet)(
        in_shape, num_classes, depth, widths, blocks=blocks, key=key
    )
    is_bn = lambda x: isinstance(x, eqx.nn.BatchNorm)  # noqa: E731
    for bn in [x for x in jax.tree.leaves(model, is_leaf=is_bn) if is_bn(x)]:
        mean, var = state.get(bn.ema_state_index)
        state = state.set(bn.ema_state_index, (jnp.zeros_like(mean), jnp.ones_like(var)))
    return model, state


# ---------------------------------------------------------------------------- growth
def embed(old: Array, new: Array) -> Array:
    """`new` with `old` written into its leading corner (`new[:a, :b, ...] = old`)."""
    old = jnp.asarray(old)
    if old.ndim != new.ndim or any(o > n for o, n in zip(old.shape, new.shape)):
        raise ConfigurationError(
            f"embed: cannot place an array of shape {old.shape} inside one of shape "
            f"{new.shape}; growth only adds units."
        )
    return new.at[tuple(slice(0, s) for s in old.shape)].set(old.astype(new.dtype))


def _path_key(path: Any) -> str:
    return jax.tree_util.keystr(path)


def _is_state(x: Any) -> bool:
    return isinstance(x, eqx.nn.State)


def grow_tree(old: Any, new: Any) -> Any:
    """`new` with every array of `old` embedded (`embed`) at the same place.

    Leaves are matched by their path in the tree (BatchNorm states, `eqx.nn.State`, by their
    layer's path), so this grows anything that mirrors a model's parameters: parameters,
    optimizer moments (`optax` states), stacked candidate lineages, running statistics.
    Leaves of `new` without a counterpart in `old` (new blocks) keep `new`'s values; `old`
    leaves without a counterpart are dropped.
    """
    olds: dict[str, Any] = {}

    def collect(path, x):
        if _is_state(x):
            values, markers = x.tree_flatten()
            for m, v in zip(markers, values):
                for p, leaf in jax.tree_util.tree_flatten_with_path(v)[0]:
                    olds[f"{_path_key(path)}<{m}>{_path_key(p)}"] = leaf
        elif eqx.is_array(x):
            olds[_path_key(path)] = x
        return x

    jax.tree_util.tree_map_with_path(collect, old, is_leaf=_is_state)

    def place(path, x):
        if _is_state(x):
            values, markers = x.tree_flatten()
            out = []
            for m, v in zip(markers, values):
                prefix = f"{_path_key(path)}<{m}>"
                out.append(
                    jax.tree_util.tree_map_with_path(
                        lambda p, leaf, prefix=prefix: _place_one(prefix + _path_key(p), leaf),
                        v,
                    )
                )
            return eqx.nn.State.tree_unflatten(markers, out)
        if eqx.is_array(x):
            return _place_one(_path_key(path), x)
        return x

    def _place_one(name: str, x: Array) -> Array:
        if name not in olds:
            return x
        o = olds[name]
        return embed(o, x) if jnp.shape(o) != jnp.shape(x) else jnp.asarray(o).astype(x.dtype)

    return jax.tree_util.tree_map_with_path(place, new, is_leaf=_is_state)


def _zero_new(old_bn: eqx.nn.BatchNorm | None, new_bn: eqx.nn.BatchNorm) -> eqx.nn.BatchNorm:
    """`new_bn` with its scale and shift zero outside the channels of `old_bn` (all of them
    when `old_bn` is `None`)."""
    n = 0 if old_bn is None else old_bn.input_size
    keep = jnp.arange(new_bn.input_size) < n
    return eqx.tree_at(
        lambda b: (b.weight, b.bias),
        new_bn,
        (jnp.where(keep, new_bn.weight, 0.0), jnp.where(keep, new_bn.bias, 0.0)),
    )


def _check(model: Any, state: Any, op: str) -> None:
    if not isinstance(model, ResNet):
        raise ConfigurationError(
            f"{op}: expected an ev3_distill.ResNet, got {type(model).__name__}."
        )
    if not isinstance(state, eqx.nn.State):
        raise ConfigurationError(
            f"{op}: expected the model's eqx.nn.State as second argument, got "
            f"{type(state).__name__}. Build both with make_resnet(...)."
        )


def widen_resnet(
    model: ResNet, state: eqx.nn.State, factor: float = 2.0, *, key: PRNGKeyArray
) -> tuple[ResNet, eqx.nn.State]:
    """Multiply every stage's filters by `factor`, preserving the network's function.

    New filters get fresh random weights; the BatchNorm scales and shifts of the new
    channels are zero, so they output exactly zero until training moves those scales
    (and so does every weight that reads them). Running statistics are carried over.

    **Arguments:**

    - `model`, `state`: a `ResNet` and its `eqx.nn.State`.
    - `factor`: width multiplier (`> 1`; new widths are rounded).
    - `key`: PRNG key for the new weights.

    **Returns:** `(grown_model, grown_state)`.
    """
    _check(model, state, "widen_resnet")
    widths = tuple(max(w + 1, int(round(w * factor))) for w in model.widths)
    if not factor > 1:
        raise ConfigurationError(f"widen_resnet: factor={factor} must be > 1.")
    fresh, fresh_state = make_resnet(
        model.in_shape, model.num_classes, widths=widths, blocks=model.blocks, key=key
    )
    return _grown(model, state, fresh, fresh_state, last_bn_only=False)


def deepen_resnet(
    model: ResNet, state: eqx.nn.State, *, key: PRNGKeyArray
) -> tuple[ResNet, eqx.nn.State]:
    """Append one basic block to every stage, preserving the network's function.

    The new block's last BatchNorm has zero scale and shift, so its residual branch is zero
    and the block computes `relu(x) = x` on its non-negative input.

    **Arguments:**

    - `model`, `state`: a `ResNet` and its `eqx.nn.State`.
    - `key`: PRNG key for the new blocks' weights.

    **Returns:** `(grown_model, grown_state)`, of depth `model.depth + 6`.
    """
    _check(model, state, "deepen_resnet")
    fresh, fresh_state = make_resnet(
        model.in_shape,
        model.num_classes,
        widths=model.widths,
        blocks=tuple(b + 1 for b in model.blocks),
        key=key,
    )
    return _grown(model, state, fresh, fresh_state, last_bn_only=True)


def _grown(
    model: ResNet,
    state: eqx.nn.State,
    fresh: ResNet,
    fresh_state: eqx.nn.State,
    last_bn_only: bool,
) -> tuple[ResNet, eqx.nn.State]:
    """Zero the BatchNorm scales of everything new in `fresh`, then copy every old weight
    and running statistic into its corner (`grow_tree`)."""
    if last_bn_only:  # deepen: only the appended blocks are new; their last BatchNorm is zero
        for i, n_old in enumerate(model.blocks):
            for j in range(n_old, len(fresh.stages[i])):
                get = lambda m, i=i, j=j: m.stages[i][j].bn2  # noqa: E731
                fresh = eqx.tree_at(get, fresh, _zero_new(None, get(fresh)))
    else:  # widen: every BatchNorm gains channels, whose scales and shifts are zero
        gets = [lambda m: m.stem_bn]
        for i, stage in enumerate(model.stages):
            for j, block in enumerate(stage):
                for name in ("bn1", "bn2", "proj_bn"):
                    if getattr(block, name) is not None:
                        gets.append(lambda m, i=i, j=j, name=name: getattr(m.stages[i][j], name))
        for get in gets:
            fresh = eqx.tree_at(get, fresh, _zero_new(get(model), get(fresh)))
    return grow_tree(model, fresh), grow_tree(state, fresh_state)
