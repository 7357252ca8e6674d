"""Data augmentation on the propose stream: composable, jittable, one example at a time.

An augmentation is an `AbstractAugment`: `augment(x, key) -> x'` on **one example** (the
model's input, not its label), pure under a key, shape-preserving, so it can be `vmap`ped
over a batch and run inside the gradient proposer's compiled trajectories. Numbers a user may
tune (probabilities) are array leaves; sizes that fix shapes are static.

`GradientProposer(augment=...)` applies it to the inputs of every training batch (the first
entry of `(x, y, ...)`), with a key per example drawn from the trajectory's key, so each
candidate and each step sees its own augmented batch; assessment data is never augmented.

Images are `(height, width, channels)` (channel last, as they are stored); signals are
`(length,)` or `(length, channels)`. A flat stored example can be given its shape with
`Reshaped`.
"""

from __future__ import annotations

import abc
from collections.abc import Sequence
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, PRNGKeyArray, PyTree

from .._types import _as_float_array
from ..errors import ConfigurationError


class AbstractAugment(eqx.Module):
    """One random, shape-preserving transformation of one example."""

    @abc.abstractmethod
    def __call__(self, x: Array, key: PRNGKeyArray) -> Array:
        """`x` transformed with randomness from `key` (same shape and dtype)."""


def _check_ndim(name: str, x: Array, ndim: int, what: str) -> None:
    if x.ndim != ndim:
        raise ConfigurationError(
            f"{name}: expected one example of {what} ({ndim} axes), got shape {x.shape}. "
            "Augmentations see one example at a time; for flat stored examples wrap the "
            "augmentation in Reshaped(aug, shape)."
        )


class RandomCrop(AbstractAugment):
    """Pad an image by `padding` pixels on each side and crop it back to its size at a
    random offset (the CIFAR augmentation).

    **Arguments:**

    - `padding`: pixels added on each side of height and width (static).
    - `fill`: the padded pixels' value (an array leaf, default `0`).
    """

    padding: int = eqx.field(static=True)
    fill: Float[Array, ""] = eqx.field(converter=_as_float_array, default=0.0)

    def __check_init__(self):
        if self.padding < 0:
            raise ConfigurationError(f"RandomCrop: padding={self.padding} must be >= 0.")

    def __call__(self, x: Array, key: PRNGKeyArray) -> Array:
        _check_ndim("RandomCrop", x, 3, "an image (height, width, channels)")
        h, w, c = x.shape
        p = self.padding
        padded = jnp.pad(x, ((p, p), (p, p), (0, 0)), constant_values=self.fill.astype(x.dtype))
        off = jax.random.randint(key, (2,), 0, 2 * p + 1)
        return jax.lax.dynamic_slice(padded, (off[0], off[1], 0), (h, w, c))


class HorizontalFlip(AbstractAugment):
    """Mirror an image left-right with probability `p`.

    **Arguments:**

    - `p`: flip probability (an array leaf, default `0.5`).
    """

    p: Float[Array, ""] = eqx.field(converter=_as_float_array, default=0.5)

    def __call__(self, x: Array, key: PRNGKeyArray) -> Array:
        _check_ndim("HorizontalFlip", x, 3, "an image (height, width, channels)")
        return jnp.where(jax.random.uniform(key) < self.p, x[:, ::-1, :], x)


class Shift1D(AbstractAugment):
    """Shift a signal along its first axis by a uniform integer in
    `[-max_shift, max_shift]`, filling the vacated samples with `fill`.

    **Arguments:**

    - `max_shift`: the largest shift in samples (static).
    - `fill`: value of the vacated samples (an array leaf, default `0`).
    """

    max_shift: int = eqx.field(static=True)
    fill: Float[Array, ""] = eqx.field(converter=_as_float_array, default=0.0)

    def __check_init__(self):
        if self.max_shift < 0:
            raise ConfigurationError(f"Shift1D: max_shift={self.max_shift} must be >= 0.")

    def __call__(self, x: Array, key: PRNGKeyArray) -> Array:
        if x.ndim not in (1, 2):
            _check_ndim("Shift1D", x, 1, "a signal (length,) or (length, channels)")
        m = self.max_shift
        n = x.shape[0]
        pad = ((m, m),) + ((0, 0),) * (x.ndim - 1)
        padded = jnp.pad(x, pad, constant_values=self.fill.astype(x.dtype))
        shift = jax.random.randint(key, (), -m, m + 1)
        # Output sample i is input sample i - shift (a positive shift moves the signal right).
        start = (m - shift,) + (0,) * (x.ndim - 1)
        return jax.lax.dynamic_slice(padded, start, (n,) + x.shape[1:])


class Reshaped(AbstractAugment):
    """Apply `augment` to the example reshaped to `shape`, and flatten it back.

    **Arguments:**

    - `augment`: the augmentation.
    - `shape`: the example's shape for `augment`, e.g. `(8, 8, 1)` for flat 64-pixel digits.
    """

    augment: AbstractAugment
    shape: tuple[int, ...] = eqx.field(static=True, converter=tuple)

    def __call__(self, x: Array, key: PRNGKeyArray) -> Array:
        return jnp.reshape(self.augment(jnp.reshape(x, self.shape), key), x.shape)


class Compose(AbstractAugment):
    """Apply `augments` in order, each with its own key.

    ```python
    augment = Compose([RandomCrop(4), HorizontalFlip()])
    ```
    """

    augments: tuple[AbstractAugment, ...]

    def __init__(self, augments: Sequence[Any]):  # checked below, with a clear error
        augments = tuple(augments)
        for a in augments:
            if not isinstance(a, AbstractAugment):
                raise ConfigurationError(
                    f"Compose: {a!r} is not an ev3core.AbstractAugment (RandomCrop, "
                    "HorizontalFlip, Shift1D, Reshaped or your own subclass)."
                )
        self.augments = augments

    def __call__(self, x: Array, key: PRNGKeyArray) -> Array:
        for a, k in zip(self.augments, jax.random.split(key, max(len(self.augments), 1))):
            x = a(x, k)
        return x


def augment_batch(
    augment: AbstractAugment, batch: PyTree[Array], key: PRNGKeyArray
) -> PyTree[Array]:
    """`batch` with `augment` applied to each example of its inputs (the first entry of a
    tuple `(x, y, ...)`, or the whole batch if it is one array), one key per example."""
    if isinstance(batch, tuple | list):
        x = batch[0]
    else:
        x = batch
    n = x.shape[0]
    out = jax.vmap(augment)(x, jax.random.split(key, n))
    if isinstance(batch, tuple | list):
        return type(batch)((out, *batch[1:]))
    return out
