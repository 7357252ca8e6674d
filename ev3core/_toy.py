"""A toy classification problem for examples, docs and tests: 2-D, linearly separable.

Data: 2 features from N(0, 1), label `[x . w >= 0]` for a fixed random `w`; separate
propose / assess / decide streams and a held-out test set, each of `n` examples. Model: an
MLP 2 -> 8 (ReLU) -> 2. The built-in smoke experiment runs EV3 on it.
"""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int, PRNGKeyArray

from ._types import Data

#: Examples per stream of `toy_problem` by default.
NUM_EXAMPLES = 100_000


def toy_problem(
    key: PRNGKeyArray, n: int = NUM_EXAMPLES
) -> tuple[Data, tuple[Float[Array, "example 2"], Int[Array, " example"]]]:
    """`(data, (x_test, y_test))` of the toy problem; every split is drawn independently.

    ```python
    data, (x_test, y_test) = ev3core.toy_problem(jax.random.key(0), n=4096)
    model = ev3core.toy_model(jax.random.key(1))
    ```
    """
    kw, kp, ka, kd, kt = jax.random.split(key, 5)
    w = jax.random.normal(kw, (2,))

    def draw(k: PRNGKeyArray) -> tuple[Array, Array]:
        x = jax.random.normal(k, (n, 2))
        return x, (x @ w >= 0).astype(jnp.int32)

    return Data(propose=draw(kp), assess=draw(ka), decide=draw(kd)), draw(kt)


def toy_model(key: PRNGKeyArray) -> eqx.nn.MLP:
    """The toy problem's model: an MLP 2 -> 8 (ReLU) -> 2, called on one example."""
    return eqx.nn.MLP(2, 2, 8, 1, activation=jax.nn.relu, key=key)
