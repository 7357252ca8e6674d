"""Optimizers whose numeric hyperparameters are array leaves, and how candidates evolve them.

`Optimizer(optax.sgd, learning_rate=0.1)` keeps the optax *factory* (a module-level function,
equal across rebuilds) as static structure and the numbers as array leaves. A gradient
proposer applies it through `optax.inject_hyperparams`, so every candidate carries its own
hyperparameters in its optimizer state: rebuilding a pipeline with equal settings, or with a
new learning rate, never re-traces the step, and the hyperparameters can evolve per candidate
(`Evolve`, `PBTProposer`) inside the compiled step.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jaxtyping import Array, Float

from ..errors import ConfigurationError

_INJECT_STATES = tuple(
    cls
    for cls in (
        getattr(optax, "InjectStatefulHyperparamsState", None),
        getattr(optax, "InjectHyperparamsState", None),
    )
    if cls is not None
)


def _is_numeric(value: Any) -> bool:
    if isinstance(value, bool):
        return False
    return isinstance(value, (int, float, np.ndarray, np.generic, jax.Array))


class Optimizer(eqx.Module):
    """An optax optimizer as a spec: the factory is static, numeric hyperparameters are leaves.

    Build it from any optax factory (`optax.sgd`, `optax.adam`, `optax.adamw`, ...) and the
    keyword arguments you would pass to it. Numbers (floats, ints, arrays) become array leaves
    of this module and, through `optax.inject_hyperparams`, entries of each candidate's
    optimizer state (`state.hyperparams`); everything else (booleans, strings, `None`,
    schedules and other callables, and any name listed in `static_args`) is static and passed
    to the factory as it is.

    Because the factory is a module-level function, two `Optimizer(optax.sgd,
    learning_rate=0.1)` built separately are equal as static structure: a rebuilt pipeline
    reuses the compiled step, and one with another learning rate does too (a plain
    `optax.sgd(0.1)` is a new closure every time and re-traces).

    The hyperparameters in a proposer's state are the ones in use: `init` copies this
    module's values into the state, and evolving proposers (`Evolve`, `PBTProposer`) change
    them there, per candidate.

    **Arguments:**

    - `factory`: the optax function that builds the `GradientTransformation`.
    - `static_args`: names of keyword arguments to keep static even though they are numbers
      (e.g. an integer period that sets a structure).
    - `**hyperparams`: the factory's keyword arguments.

    ```python
    opt = Optimizer(optax.sgd, learning_rate=0.1, momentum=0.9, nesterov=True)
    opt.hyperparams["learning_rate"]  # Array(0.1)
    ```
    """

    factory: Callable[..., optax.GradientTransformation] = eqx.field(static=True)
    hyperparams: dict[str, Array]
    static_args: tuple[tuple[str, Any], ...] = eqx.field(static=True)

    def __init__(
        self,
        factory: Any,  # checked below, with a message that says what to pass instead
        /,
        *,
        static_args: Sequence[str] = (),
        **hyperparams: Any,
    ):
        if isinstance(factory, optax.GradientTransformation):
            raise ConfigurationError(
                "Optimizer: got an optax.GradientTransformation; pass the function that builds "
                "it and its arguments instead, e.g. Optimizer(optax.sgd, learning_rate=0.1) "
                "rather than Optimizer(optax.sgd(0.1))."
            )
        if not callable(factory):
            raise ConfigurationError(
                f"Optimizer: factory={factory!r} is not callable. Pass an optax function such "
                "as optax.sgd, e.g. Optimizer(optax.sgd, learning_rate=0.1)."
            )
        static_names = set(static_args)
        unknown = static_names - set(hyperparams)
        if unknown:
            raise ConfigurationError(
                f"Optimizer({getattr(factory, '__name__', factory)}): static_args names "
                f"{sorted(unknown)} that are not among its keyword arguments {sorted(hyperparams)}."
            )
        leaves: dict[str, Array] = {}
        static: list[tuple[str, Any]] = []
        for name, value in sorted(hyperparams.items()):
            if name not in static_names and _is_numeric(value):
                dtype = jnp.int32 if isinstance(value, int) else None
                arr = jnp.asarray(value, dtype)
                if jnp.issubdtype(arr.dtype, jnp.floating) and isinstance(value, float):
                    arr = arr.astype(jnp.float32)
                leaves[name] = arr
            else:
                static.append((name, value))
        try:
            optax.inject_hyperparams(factory, static_args=tuple(n for n, _ in static))(
                **dict(static), **leaves
            )
        except TypeError as exc:
            raise ConfigurationError(
                f"Optimizer({getattr(factory, '__name__', factory)}): the keyword arguments "
                f"{sorted(hyperparams)} do not fit the factory ({exc}). Pass the names its "
                "signature uses, e.g. learning_rate=..."
            ) from exc
        self.factory = factory
        self.hyperparams = leaves
        self.static_args = tuple(static)

    def transformation(self) -> optax.GradientTransformation:
        """The `optax.inject_hyperparams` transformation (its state holds the hyperparameters)."""
        static = dict(self.static_args)
        return optax.inject_hyperparams(self.factory, static_args=tuple(static))(
            **static, **self.hyperparams
        )

    @property
    def family(self) -> Any:
        """Static key: optimizers of one family share their state's structure, so candidates
        can copy each other's optimizer state and compare hyperparameters."""
        sig = tuple((k, jnp.shape(v), jnp.result_type(v)) for k, v in self.hyperparams.items())
        return (self.factory, self.static_args, sig)

    @property
    def label(self) -> str:
        name = getattr(self.factory, "__name__", "opt")
        parts = []
        for k, v in self.hyperparams.items():
            short = "lr" if k == "learning_rate" else k
            try:
                parts.append(f"{short}={float(v):g}")
            except (TypeError, jax.errors.ConcretizationTypeError):
                parts.append(short)
        return f"{name}({','.join(parts)})"


class _Fixed(eqx.Module):
    """A plain `optax.GradientTransformation`: static, so its numbers are compile-time
    constants (a rebuilt one re-traces)."""

    tx: optax.GradientTransformation = eqx.field(static=True)

    def transformation(self) -> optax.GradientTransformation:
        return self.tx

    @property
    def hyperparams(self) -> dict[str, Array]:
        return {}

    @property
    def family(self) -> Any:
        return ("fixed", self.tx)


def as_optimizer(opt: Any) -> Optimizer | _Fixed:
    """An `Optimizer` as it is; a plain `GradientTransformation` wrapped as static."""
    if isinstance(opt, (Optimizer, _Fixed)):
        return opt
    if isinstance(opt, optax.GradientTransformation):
        return _Fixed(opt)
    raise ConfigurationError(
        f"GradientProposer: optimizer {opt!r} is neither an ev3core.Optimizer nor an "
        "optax.GradientTransformation. Use e.g. Optimizer(optax.sgd, learning_rate=0.1) "
        "(hyperparameters as leaves) or optax.sgd(0.1) (static)."
    )


def opt_hyperparams(opt_state: Any) -> dict[str, Array]:
    """The injected hyperparameters of an optimizer state (empty if it has none)."""
    if _INJECT_STATES and isinstance(opt_state, _INJECT_STATES):
        return dict(opt_state.hyperparams)
    return {}


def with_opt_hyperparams(opt_state: Any, values: Mapping[str, Array]) -> Any:
    """`opt_state` with some injected hyperparameters replaced."""
    if not values:
        return opt_state
    return opt_state._replace(hyperparams={**opt_state.hyperparams, **values})


def update_in_param_dtype(
    tx: optax.GradientTransformation, grads: Any, opt_state: Any, params: Any
) -> tuple[Any, Any]:
    """`tx.update(grads, opt_state, params)` with the injected float hyperparameters cast to
    the parameters' float dtype, when the parameters have a single one (so bfloat16 and
    float16 models train under strict dtype promotion: a float32 learning rate or momentum
    would not combine with bfloat16 gradients). The returned state keeps its own
    hyperparameters, so evolving and perturbing them stays exact."""
    hp = opt_hyperparams(opt_state)
    dtypes = {
        x.dtype
        for x in jax.tree.leaves(params)
        if eqx.is_array(x) and jnp.issubdtype(x.dtype, jnp.floating)
    }
    if not hp or len(dtypes) != 1:
        return tx.update(grads, opt_state, params)
    (dtype,) = dtypes
    cast = {
        k: v.astype(dtype)
        for k, v in hp.items()
        if eqx.is_array(v) and jnp.issubdtype(v.dtype, jnp.floating) and v.dtype != dtype
    }
    if not cast:
        return tx.update(grads, opt_state, params)
    updates, new_state = tx.update(grads, with_opt_hyperparams(opt_state, cast), params)
    return updates, with_opt_hyperparams(new_state, {k: hp[k] for k in cast})


class Evolve(eqx.Module):
    """How a `GradientProposer`'s candidates evolve their hyperparameters ("ever evolving").

    After every step in which one of the proposer's candidates is accepted, each other
    candidate's named hyperparameters move toward the accepted candidate's, in log space, with
    multiplicative log-normal noise:

    `log h_i <- log h_i + pull * (log h_accepted - log h_i) + sigma * N(0, 1)`.

    The accepted candidate keeps its own values. Only candidates that share the accepted one's
    optimizer family (same factory and static arguments) move their optimizer hyperparameters,
    and only candidates whose loss is of the same group (class and static fields) move their
    loss hyperparameters; the others keep theirs. Hyperparameters must be positive scalars
    (learning rates, temperatures, loss weights); use `pull=0` for pure noise and `pull=1` for
    a PBT-style resample around the accepted candidate.

    With `truncate` (needs `on_reject="continue"`), when a candidate is accepted only the
    lineages whose assess score is in the bottom `truncate` fraction (and non-finite ones)
    restart from the new current model with the accepted candidate's optimizer state and
    evolved hyperparameters; the others continue their own lineage with their own
    hyperparameters (population diversity, as in PBT's truncation selection). It ranks on
    `Outcome.scores[objective]`; without scores every lineage restarts.

    **Arguments:**

    - `names`: the hyperparameters that evolve: keys of an `Optimizer`'s hyperparameters
      (`"learning_rate"`) and/or array fields of the losses (`"temperature"`).
    - `pull`: fraction of the log-distance to the accepted candidate covered per acceptance
      (an array leaf in `[0, 1]`).
    - `sigma`: standard deviation of the log-normal noise (an array leaf, `>= 0`).
    - `truncate`: fraction of lineages restarted on acceptance (an array leaf; at least one
      lineage restarts), or `None` (all restart).
    - `objective`: the assessor whose summary ranks the lineages for `truncate`.

    ```python
    GradientProposer(
        losses=[CrossEntropy()],
        optimizers=[Optimizer(optax.sgd, learning_rate=lr) for lr in (0.3, 0.1, 0.03)],
        on_reject="continue",
        evolve=Evolve(names=("learning_rate",), pull=0.5, sigma=0.2, truncate=0.5),
    )
    ```
    """

    names: tuple[str, ...] = eqx.field(static=True)
    pull: Float[Array, ""]
    sigma: Float[Array, ""]
    truncate: Float[Array, ""] | None
    objective: int = eqx.field(static=True)

    def __init__(
        self,
        names: Sequence[str] = ("learning_rate",),
        pull: float | Array = 0.5,
        sigma: float | Array = 0.2,
        truncate: float | Array | None = None,
        objective: int = 0,
    ):
        if isinstance(names, str):
            names = (names,)
        self.names = tuple(names)
        if not self.names:
            raise ConfigurationError("Evolve: names is empty; name at least one hyperparameter.")
        self.pull = jnp.asarray(pull, jnp.float32)
        self.sigma = jnp.asarray(sigma, jnp.float32)
        if not isinstance(self.pull, jax.core.Tracer) and not (
            0.0 <= float(self.pull) <= 1.0 and float(self.sigma) >= 0.0
        ):
            raise ConfigurationError(
                f"Evolve: pull={float(self.pull)} must be in [0, 1] and sigma="
                f"{float(self.sigma)} >= 0."
            )
        self.truncate = None if truncate is None else jnp.asarray(truncate, jnp.float32)
        if self.truncate is not None and not isinstance(self.truncate, jax.core.Tracer):
            if not 0.0 < float(self.truncate) <= 1.0:
                raise ConfigurationError(
                    f"Evolve: truncate={float(self.truncate)} must be in (0, 1] (the fraction "
                    "of lineages that restart), or None to restart every lineage."
                )
        self.objective = int(objective)
