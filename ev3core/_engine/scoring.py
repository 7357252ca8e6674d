"""Scoring stacked models with the assessors: the one computation every placement runs."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, PyTree

from .._interfaces import AbstractAssessor, objective_value


def score_models(
    assessors: Sequence[AbstractAssessor],
    params: PyTree[Array],
    static: Any,
    batch: PyTree[Array],
    chunk: int | None = None,
) -> Float[Array, "objective model example"]:
    """Per-example scores of every model stacked on the leading axis of `params`.

    With `chunk`, groups of `chunk` models are scored in sequence (`lax.map`): bounded memory,
    the same values.
    """

    def score(p: PyTree[Array]) -> Array:
        model = eqx.combine(p, static)
        return jnp.stack([a(model, batch).astype(jnp.float32) for a in assessors])

    n = jax.tree.leaves(params)[0].shape[0]
    if chunk is None or chunk >= n:
        out = jax.vmap(score)(params)
    else:
        out = jax.lax.map(score, params, batch_size=chunk)
    return jnp.moveaxis(out, 0, 1)


def summaries(
    assessors: Sequence[AbstractAssessor], scores: Float[Array, "objective model example"]
) -> Float[Array, "objective model"]:
    """Each objective's value per model (`objective_value`: the mean, or a batch-level
    metric such as F1)."""
    return jnp.stack(
        [jax.vmap(lambda v, a=a: objective_value(a, v))(s) for a, s in zip(assessors, scores)]
    )
