"""Drawing the examples a step assesses on: distinct examples, uniformly, with the step's key."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jaxtyping import Array, Int, PRNGKeyArray, PyTree


def sample(data: PyTree[Array], key: PRNGKeyArray, size: int) -> PyTree[Array]:
    """`size` distinct examples of a stream, uniformly without replacement.

    Without replacement, every drawn example is a separate observation, as the confidence
    bounds assume; drawing with replacement would repeat examples (a bootstrap resample when
    `size` is the stream's length), which adds resampling noise that the standard errors do
    not see, inflating false acceptances and costing power. A `size` equal to the stream's
    length takes the whole stream as it is (no gather).
    """
    n = jax.tree.leaves(data)[0].shape[0]
    if size == n:
        return data
    idx = distinct_indices(key, n, size)
    return jax.tree.map(lambda a: a[idx], data)


def _top_k_indices(key: PRNGKeyArray, n: int, size: int) -> Int[Array, " size"]:
    """A uniformly random `size`-subset of `range(n)`: the `size` largest of `n` uniform keys
    (O(n); `jax.random.choice(replace=False)` sorts a whole permutation, 20-40 times slower)."""
    return jax.lax.top_k(jax.random.uniform(key, (n,)), size)[1].astype(jnp.int32)


def distinct_indices(key: PRNGKeyArray, n: int, size: int) -> Int[Array, " size"]:
    """`size` distinct indices in `range(n)`, a uniformly random subset in random order.

    For `size <= n / 4`, in O(size log size): the first `size` distinct values of `draws`
    i.i.d. uniform draws (each new distinct value is uniform over those not drawn yet, so the
    subset is uniform), with enough draws (`size + 64 + 4 size^2 / n`, about eight times the
    expected number of repeats, plus 64) that too few distinct values almost never happen, and
    the O(n) top-k draw when they do. Denser draws use the top-k draw directly.
    """
    if 4 * size > n:
        return _top_k_indices(key, n, size)
    k_draw, k_fallback = jax.random.split(key)
    draws = size + 64 + (4 * size * size) // n
    d = jax.random.randint(k_draw, (draws,), 0, n, dtype=jnp.int32)
    order = jnp.argsort(d, stable=True)
    ranked = d[order]
    new_sorted = jnp.concatenate([jnp.ones((1,), bool), ranked[1:] != ranked[:-1]])
    first = jnp.zeros((draws,), bool).at[order].set(new_sorted)  # first occurrence, draw order
    slot = jnp.where(first, jnp.cumsum(first) - 1, size)
    picked = jnp.zeros((size,), jnp.int32).at[slot].set(d, mode="drop")
    return jax.lax.cond(
        jnp.sum(first) >= size,
        lambda: picked,
        lambda: _top_k_indices(k_fallback, n, size),
    )
