"""Mixed precision: a model that computes in a low-precision dtype and answers in float32.

`MixedPrecision` wraps an Equinox model. Its call casts the floating-point parameters and
inputs to `compute_dtype` (bfloat16 by default), runs the model, and casts the outputs to
`output_dtype` (float32), so losses, assessors and the scheduler's statistics work in float32
whatever the model computes in. The parameters keep the dtype they are stored in: float32
by default ("master weights": gradients and optimizer states stay float32, only the forward
and backward passes are bfloat16), or `param_dtype` (bfloat16 storage halves the memory of
every candidate, of the optimizer states and of checkpoints). A model with state
(`eqx.nn.State`, BatchNorm) gets its state in the compute dtype and returns it in the dtype
it was given, so running statistics keep their precision.
"""

from __future__ import annotations

from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import PyTree

from .errors import ConfigurationError


def _floating(x: Any) -> bool:
    return eqx.is_array(x) and jnp.issubdtype(x.dtype, jnp.floating)


def cast_floating(tree: PyTree[Any], dtype: Any) -> PyTree[Any]:
    """`tree` with every floating-point array leaf cast to `dtype` (other leaves as they
    are: integer labels, keys, static fields)."""
    return jax.tree.map(lambda x: x.astype(dtype) if _floating(x) else x, tree)


def _like(tree: PyTree[Any], reference: PyTree[Any]) -> PyTree[Any]:
    return jax.tree.map(lambda x, r: x.astype(r.dtype) if _floating(x) else x, tree, reference)


def _check_dtype(name: str, dtype: Any) -> np.dtype:
    try:
        d = jnp.dtype(dtype)
    except TypeError as e:
        raise ConfigurationError(f"MixedPrecision: {name}={dtype!r} is not a dtype.") from e
    if not jnp.issubdtype(d, jnp.floating):
        raise ConfigurationError(
            f"MixedPrecision: {name}={d} is not a floating-point dtype; use e.g. "
            "jnp.bfloat16, jnp.float16 or jnp.float32."
        )
    return d


class MixedPrecision(eqx.Module):
    """An Equinox model computing in `compute_dtype` with outputs in `output_dtype`.

    **Arguments:**

    - `model`: the Equinox model, called as `model(x, *args, **kwargs)` (a model with state
      as `model(x, state, *, key)`: wrap the model, then put it in `ev3core.Stateful`).
    - `compute_dtype`: the dtype of the forward and backward passes (default bfloat16).
    - `output_dtype`: the dtype of the outputs (default float32): what losses and assessors
      see.
    - `param_dtype`: if given, the floating-point parameters are stored in this dtype (e.g.
      bfloat16, halving parameter, optimizer-state and checkpoint memory); by default they
      keep their dtype (float32 master weights).

    ```python
    model = ev3core.MixedPrecision(eqx.nn.MLP(64, 10, 128, 2, key=key))
    # with BatchNorm: wrap the model, keep the state float32
    model, state = eqx.nn.make_with_state(ResNet)(...)
    engine.init(ev3core.Stateful(ev3core.MixedPrecision(model), state), key)
    ```
    """

    model: Any
    compute_dtype: np.dtype = eqx.field(static=True)
    output_dtype: np.dtype = eqx.field(static=True)

    def __init__(
        self,
        model: Any,
        compute_dtype: Any = jnp.bfloat16,
        output_dtype: Any = jnp.float32,
        param_dtype: Any = None,
    ):
        self.compute_dtype = _check_dtype("compute_dtype", compute_dtype)
        self.output_dtype = _check_dtype("output_dtype", output_dtype)
        if param_dtype is not None:
            model = cast_floating(model, _check_dtype("param_dtype", param_dtype))
        self.model = model

    def __call__(self, x: PyTree[Any], *args: Any, **kwargs: Any) -> Any:
        model = cast_floating(self.model, self.compute_dtype)
        out = model(
            cast_floating(x, self.compute_dtype),
            *(cast_floating(a, self.compute_dtype) for a in args),
            **kwargs,
        )
        if args and isinstance(args[0], eqx.nn.State):  # (y, state): state back as given
            y, state = out
            return cast_floating(y, self.output_dtype), _like(state, args[0])
        return cast_floating(out, self.output_dtype)
