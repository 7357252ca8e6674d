"""Plain (non-EV3) training: the teacher, and the baselines the benchmark compares with."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jaxtyping import Array, PRNGKeyArray, PyTree


@eqx.filter_jit
def logits_of(model: Any, x: Array, batch: int = 1024) -> Array:
    """`vmap(model)(x)` (jitted)."""
    del batch
    return jax.vmap(model)(x)


def accuracy(model: Any, x: np.ndarray | Array, y: np.ndarray | Array) -> float:
    """Top-1 accuracy of `model` on `(x, y)`."""
    pred = jnp.argmax(logits_of(model, jnp.asarray(x)), axis=-1)
    return float(jnp.mean((pred == jnp.asarray(y)).astype(jnp.float32)))


def train(
    model: Any,
    loss: Callable[[Any, PyTree[Array], PRNGKeyArray], Array],
    optimizer: optax.GradientTransformation,
    data: PyTree[Array],
    *,
    steps: int,
    batch_size: int,
    key: PRNGKeyArray,
    eval_every: int = 0,
    on_eval: Callable[[int, Any], None] | None = None,
) -> Any:
    """Train `model` with one loss and one optimizer for `steps` minibatch steps.

    Batches of `batch_size` examples are drawn with replacement from `data` (a pytree with a
    leading example axis), like the EV3 gradient proposer does. Every `eval_every` steps (and
    at the end) `on_eval(steps_done, model)` is called on the host.

    **Returns:** the trained model.
    """
    params, static = eqx.partition(model, eqx.is_array)
    opt_state = optimizer.init(params)
    n = jax.tree.leaves(data)[0].shape[0]
    chunk = eval_every if eval_every > 0 else steps

    @eqx.filter_jit
    def run_chunk(params, opt_state, key, length):
        def body(carry, k):
            p, o = carry
            k_idx, k_loss = jax.random.split(k)
            idx = jax.random.randint(k_idx, (batch_size,), 0, n)
            batch = jax.tree.map(lambda a: a[idx], data)
            g = eqx.filter_grad(lambda p: loss(eqx.combine(p, static), batch, k_loss))(p)
            u, o = optimizer.update(g, o, p)
            return (optax.apply_updates(p, u), o), None

        (params, opt_state), _ = jax.lax.scan(
            body, (params, opt_state), jax.random.split(key, length)
        )
        return params, opt_state

    done = 0
    while done < steps:
        length = min(chunk, steps - done)
        key, sub = jax.random.split(key)
        params, opt_state = run_chunk(params, opt_state, sub, length)
        done += length
        if on_eval is not None:
            on_eval(done, eqx.combine(params, static))
    return eqx.combine(params, static)


def shift_augmented_loss(in_shape: tuple[int, ...], max_shift: int = 1):
    """Label cross-entropy on randomly translated inputs (by up to `max_shift` pixels per
    axis, zero padded): a standard augmentation used here to train the teacher only."""

    def loss(model: Any, batch: PyTree[Array], key: PRNGKeyArray) -> Array:
        x, y = batch[0], batch[1]
        n = x.shape[0]
        img = jnp.reshape(x, (n, *in_shape))
        pad = jnp.pad(img, ((0, 0), *[(max_shift, max_shift)] * len(in_shape)))
        offsets = jax.random.randint(key, (n, len(in_shape)), 0, 2 * max_shift + 1)
        crop = jax.vmap(lambda im, o: jax.lax.dynamic_slice(im, tuple(o), in_shape))(pad, offsets)
        logits = jax.vmap(model)(jnp.reshape(crop, (n, -1)))
        return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, y))

    return loss
