"""Gradient-free proposers built on evosax: one ES population per EV3 step."""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import functools
import inspect
import sys
from collections.abc import Iterator, Mapping
from typing import Any, Literal

import equinox as eqx
import jax
import jax.numpy as jnp
import optax
from jax.flatten_util import ravel_pytree
from jaxtyping import Array, Float, PRNGKeyArray, PyTree

from ev3core import Accuracy, Outcome, objective_value, split_examples
from ev3core._interfaces import AbstractAssessor, AbstractProposer
from ev3core.errors import ConfigurationError

Recenter = Literal["moved", "always", "never"]
_RECENTER = ("moved", "always", "never")


class _Strategies(Mapping[str, type]):
    """evosax's distribution-based algorithms, imported on first use: importing evosax takes
    seconds, and every process that loads the installed plugins (`ev3 run`, whatever it runs)
    imports this module to register the proposers."""

    @functools.cached_property
    def _algorithms(self) -> dict[str, type]:
        import evosax.algorithms

        return dict(evosax.algorithms.distribution_based_algorithms)

    def __getitem__(self, name: str) -> type:
        return self._algorithms[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._algorithms)

    def __len__(self) -> int:
        return len(self._algorithms)

    def __repr__(self) -> str:
        return repr(self._algorithms)


#: Distribution-based evosax algorithms (they keep a mean, which EV3 can re-centre).
STRATEGIES: Mapping[str, type] = _Strategies()


@contextlib.contextmanager
def _standard_promotion() -> Iterator[None]:
    # evosax mixes bool/int/float arrays and broadcasts arrays of different ranks; keep it
    # working under jax's strict dtype promotion and rank-promotion="raise" settings.
    with jax.numpy_dtype_promotion("standard"), jax.numpy_rank_promotion("allow"):
        yield


def _strategy_params_fields(cls: type) -> tuple[str, ...]:
    params_cls = getattr(sys.modules[cls.__module__], "Params", None)
    if params_cls is None or not dataclasses.is_dataclass(params_cls):
        return ()
    return tuple(f.name for f in dataclasses.fields(params_cls))


def _init_args(cls: type) -> tuple[str, ...]:
    return tuple(inspect.signature(cls.__init__).parameters)


@functools.lru_cache(maxsize=128)
def _build_strategy(
    name: str,
    popsize: int,
    num_dims: int,
    optimizer: str | None,
    kwargs: tuple[tuple[str, Any], ...],
) -> Any:
    """The evosax strategy object for a static configuration (cached: evosax jits its
    `ask`/`tell` with the strategy object as a static argument)."""
    cls = STRATEGIES[name]
    kw = dict(kwargs)
    if optimizer is not None:
        # The learning rate lives in the optimizer state, written from the proposer's array
        # leaf at every generation, so changing it never recompiles.
        kw["optimizer"] = optax.inject_hyperparams(getattr(optax, optimizer))(learning_rate=0.0)
    # Built eagerly even when first needed inside a trace (no leaked tracers in the cache).
    with jax.ensure_compile_time_eval(), _standard_promotion():
        return cls(population_size=popsize, solution=jnp.zeros((num_dims,), jnp.float32), **kw)


def _strong(tree: PyTree[Any], like: PyTree[Any] | None = None) -> PyTree[Any]:
    """Leaves as arrays with a fixed (non-weak) dtype, the dtypes of `like` if given."""
    if like is None:
        return jax.tree.map(lambda x: jnp.asarray(x, jnp.result_type(x)), tree)
    return jax.tree.map(lambda x, t: jnp.asarray(x, jnp.result_type(t)), tree, like)


def _sample(data: PyTree[Array], key: PRNGKeyArray, size: int) -> PyTree[Array]:
    leaves = jax.tree.leaves(data)
    if not leaves:
        raise ConfigurationError(
            "The propose stream is empty: evosax proposers evaluate their fitness on it. Pass "
            "Data(propose=(x, y), ...) with at least one array."
        )
    idx = jax.random.randint(key, (size,), 0, leaves[0].shape[0])
    # split over a "data" mesh axis, if the engine has one (the fitness stays that of the batch)
    return split_examples(jax.tree.map(lambda a: a[idx], data))


class EvosaxState(eqx.Module):
    """An evosax proposer's state (part of the engine state, so it is scanned and saved).

    - `es`: the evosax strategy state: the flat ES `mean`, step size `std`, covariance or
      optimizer state, generation counter, ...
    - `anchor`: the current EV3 parameters (flattened) the last `propose` started from; `adapt`
      compares the new current parameters with it to tell whether the current model moved.
    - `fitness`: the fitness of each member of the last generation told to the ES (mean of
      the fitness assessor on that generation's batch, higher is better).
    """

    es: Any
    anchor: Float[Array, " dim"]
    fitness: Float[Array, " population"]


def _check_population(
    owner: str, cls: type, args: Any, popsize: int, strategy_kwargs: dict[str, Any]
) -> None:
    """The population size and the strategy's own keyword arguments, checked."""
    if int(popsize) < 2:
        raise ConfigurationError(f"{owner}: popsize={popsize} must be at least 2.")
    if (
        cls is STRATEGIES.get("Open_ES")
        and strategy_kwargs.get("use_antithetic_sampling", True)
        and int(popsize) % 2
    ):
        raise ConfigurationError(
            f"{owner}: popsize={popsize} must be even with antithetic sampling (each "
            "perturbation is paired with its negation). Use an even popsize."
        )
    for bad in ("population_size", "solution", "optimizer", "std_schedule"):
        if bad in strategy_kwargs:
            raise ConfigurationError(
                f"{owner}: strategy_kwargs may not set {bad!r}; it is set by the proposer "
                "(popsize, the model's parameters, optimizer/learning_rate, sigma)."
            )
    unknown = sorted(set(strategy_kwargs) - set(args))
    if unknown:
        raise ConfigurationError(
            f"{owner}: unknown strategy_kwargs {unknown}; {cls.__name__} accepts "
            f"{[a for a in args if a not in ('self', 'population_size', 'solution')]}."
        )


def _validate(
    strategy: str,
    popsize: int,
    *,
    sigma: Any,
    learning_rate: Any,
    optimizer: str,
    generations: int,
    batch_size: int,
    fitness: Any,
    recenter: str,
    es_params: dict[str, Any],
    strategy_kwargs: dict[str, Any],
) -> bool:
    """Raise `ConfigurationError` on a bad setting; returns whether the strategy takes an
    optax optimizer."""
    owner = f"EvosaxProposer({strategy!r})"
    if strategy not in STRATEGIES:
        close = difflib.get_close_matches(strategy, list(STRATEGIES), n=3, cutoff=0.4)
        hint = f" Did you mean {', '.join(map(repr, close))}?" if close else ""
        raise ConfigurationError(
            f"EvosaxProposer: no distribution-based evosax strategy named {strategy!r}.{hint} "
            f"Available: {', '.join(sorted(STRATEGIES))}."
        )
    cls = STRATEGIES[strategy]
    args = _init_args(cls)
    _check_population(owner, cls, args, popsize, strategy_kwargs)
    if int(generations) < 1 or int(batch_size) < 1:
        raise ConfigurationError(
            f"{owner}: generations={generations} and batch_size={batch_size} must both be >= 1."
        )
    if recenter not in _RECENTER:
        raise ConfigurationError(f"{owner}: recenter={recenter!r} is not one of {_RECENTER}.")
    if fitness is not None and not isinstance(fitness, AbstractAssessor):
        raise ConfigurationError(
            f"{owner}: fitness={fitness!r} is not an ev3core.AbstractAssessor (per-example "
            "scores, higher is better), e.g. ev3core.Accuracy()."
        )
    takes_optimizer = "optimizer" in args
    if learning_rate is not None and not takes_optimizer:
        raise ConfigurationError(
            f"{owner}: learning_rate={learning_rate} given but {cls.__name__} has no "
            "optimizer. Leave learning_rate=None (tune it through es_params instead, e.g. "
            "es_params={'c_mean': 0.5} for CMA-ES)."
        )
    if (
        takes_optimizer
        and learning_rate is not None
        and not callable(getattr(optax, optimizer, None))
    ):
        raise ConfigurationError(
            f"{owner}: optimizer={optimizer!r} is not an optax optimizer name such as "
            "'adam' or 'sgd'."
        )
    fields = _strategy_params_fields(cls)
    bad = sorted(set(es_params) - set(fields))
    if bad:
        raise ConfigurationError(
            f"{owner}: es_params {bad} are not parameters of {cls.__name__}; its "
            f"parameters are {list(fields) or '(none)'}."
        )
    if sigma is not None and not isinstance(sigma, jax.core.Tracer) and not (float(sigma) > 0):
        raise ConfigurationError(f"{owner}: sigma={sigma} must be positive.")
    return takes_optimizer


class EvosaxProposer(AbstractProposer):
    """Candidates from any distribution-based evosax strategy (ask / evaluate / tell).

    Every `propose` runs `generations` ES generations: ask a population around the ES mean,
    score every member with `fitness` on a batch of the propose stream (vmapped over the
    population), tell the ES. It then asks one more population; its members (after the ES
    mean) are the EV3 candidates, which the engine assesses on the assess stream like any
    other. The ES state lives in the proposer state (`EvosaxState`).

    One final class for every strategy; `open_es`, `sep_cma_es` and `cma_es` build it with
    the settings of their strategy (as optax's `adam`, `sgd`, ... build a
    `GradientTransformation`).

    **Arguments:**

    - `strategy`: an evosax algorithm name (`"Open_ES"`, `"Sep_CMA_ES"`, `"CMA_ES"`, `"SNES"`,
      ...; see `ev3_evosax.STRATEGIES`).
    - `learning_rate`, `optimizer`: for strategies that take an optax optimizer (OpenAI-ES,
      PGPE, ...): the optax optimizer's name and its learning rate (an array leaf, written into
      the optimizer state at every generation). `None`: the strategy's default optimizer.

    {common}
    ```python
    proposer = EvosaxProposer("SNES", popsize=16, sigma=0.1)
    ```
    """

    strategy: str = eqx.field(static=True)
    popsize: int = eqx.field(static=True)
    generations: int = eqx.field(static=True)
    batch_size: int = eqx.field(static=True)
    include_mean: bool = eqx.field(static=True)
    recenter: str = eqx.field(static=True)
    optimizer: str | None = eqx.field(static=True)
    strategy_kwargs: tuple[tuple[str, Any], ...] = eqx.field(static=True)
    name: str = eqx.field(static=True)
    fitness: AbstractAssessor | None
    sigma: Float[Array, ""] | None
    learning_rate: Float[Array, ""] | None
    es_params: dict[str, Array]

    def __init__(
        self,
        strategy: str,
        popsize: int = 16,
        *,
        sigma: float | Array | None = 0.1,
        learning_rate: float | Array | None = None,
        optimizer: str = "adam",
        generations: int = 1,
        batch_size: int = 64,
        fitness: AbstractAssessor | None = None,
        include_mean: bool = True,
        recenter: Recenter = "moved",
        es_params: Mapping[str, Any] | None = None,
        strategy_kwargs: Mapping[str, Any] | None = None,
        name: str | None = None,
    ):
        takes_optimizer = _validate(
            strategy,
            popsize,
            sigma=sigma,
            learning_rate=learning_rate,
            optimizer=optimizer,
            generations=generations,
            batch_size=batch_size,
            fitness=fitness,
            recenter=recenter,
            es_params=dict(es_params or {}),
            strategy_kwargs=dict(strategy_kwargs or {}),
        )
        strategy_kwargs = dict(strategy_kwargs or {})
        es_params = dict(es_params or {})
        self.strategy = strategy
        self.popsize = int(popsize)
        self.generations = int(generations)
        self.batch_size = int(batch_size)
        self.include_mean = bool(include_mean)
        self.recenter = recenter
        self.optimizer = optimizer if (takes_optimizer and learning_rate is not None) else None
        self.strategy_kwargs = tuple(sorted(strategy_kwargs.items()))
        self.name = name or strategy.lower()
        self.fitness = fitness
        self.sigma = None if sigma is None else jnp.asarray(sigma, jnp.float32)
        self.learning_rate = (
            None if self.optimizer is None else jnp.asarray(learning_rate, jnp.float32)
        )
        self.es_params = {k: jnp.asarray(v, jnp.float32) for k, v in es_params.items()}

    # ---------------------------------------------------------------- interface
    @property
    def num_candidates(self) -> int:
        return self.popsize + int(self.include_mean)

    def labels(self) -> tuple[str, ...]:
        mean = (f"{self.name}:mean",) if self.include_mean else ()
        return mean + tuple(f"{self.name}#{i}" for i in range(self.popsize))

    # ---------------------------------------------------------------- helpers
    def _es(self, flat: Array) -> Any:
        return _build_strategy(
            self.strategy, self.popsize, flat.shape[0], self.optimizer, self.strategy_kwargs
        )

    @property
    def _fixed_std(self) -> bool:
        # Strategies with a `std_schedule` do not adapt their step size: `sigma` is used at
        # every generation. The others (CMA-ES, ...) adapt it and start from `sigma`.
        return "std_schedule" in _init_args(STRATEGIES[self.strategy])

    def _params(self, es: Any) -> Any:
        with _standard_promotion():
            params = es.default_params
        fields = _strategy_params_fields(STRATEGIES[self.strategy])
        over = dict(self.es_params)
        if self.sigma is not None and "std_init" in fields and "std_init" not in over:
            over["std_init"] = self.sigma
        if over:
            params = params.replace(
                **{k: jnp.asarray(v, jnp.result_type(getattr(params, k))) for k, v in over.items()}
            )
        return params

    def _pin(self, es_state: Any) -> Any:
        """Write the array hyperparameters into the ES state before a generation."""
        if self.sigma is not None and self._fixed_std and hasattr(es_state, "std"):
            es_state = es_state.replace(std=jnp.asarray(self.sigma, es_state.std.dtype))
        if self.optimizer is not None:
            opt = es_state.opt_state
            hp = dict(opt.hyperparams)
            hp["learning_rate"] = jnp.asarray(self.learning_rate, hp["learning_rate"].dtype)
            es_state = es_state.replace(opt_state=opt._replace(hyperparams=hp))
        return es_state

    def _score(self, params: PyTree[Array], static: Any, batch: PyTree[Array]) -> Array:
        fitness = self.fitness if self.fitness is not None else Accuracy()
        values = fitness(eqx.combine(params, static), batch).astype(jnp.float32)
        # the mean, or the metric of a batch-level assessor (F1, AUC, ...)
        return objective_value(fitness, values).astype(jnp.float32)

    # ---------------------------------------------------------------- stages
    def init(self, params: PyTree[Array], static: Any, key: PRNGKeyArray) -> EvosaxState:
        del static
        flat, _ = ravel_pytree(params)
        es = self._es(flat)
        with _standard_promotion():
            es_state = es.init(key, flat.astype(jnp.float32), self._params(es))
            if self.sigma is not None and self._fixed_std and hasattr(es_state, "std"):
                es_state = es_state.replace(std=self.sigma)
            es_state = self._pin(_strong(es_state))
        return EvosaxState(
            es=_strong(es_state),
            anchor=flat,
            fitness=jnp.full((self.popsize,), jnp.nan, jnp.float32),
        )

    def propose(
        self,
        params: PyTree[Array],
        static: Any,
        state: EvosaxState,
        data: PyTree[Array],
        key: PRNGKeyArray,
    ) -> tuple[PyTree[Array], EvosaxState]:
        flat, unravel = ravel_pytree(params)
        es = self._es(flat)
        es_params = self._params(es)
        template = state.es
        es_state = state.es
        if self.recenter == "always":
            es_state = es_state.replace(mean=flat.astype(es_state.mean.dtype))
        k_gens, k_final = jax.random.split(key)

        def generation(es_state, k):
            k_ask, k_batch, k_tell = jax.random.split(k, 3)
            with _standard_promotion():
                pop, es_state = es.ask(k_ask, self._pin(es_state), es_params)
            batch = _sample(data, k_batch, self.batch_size)
            score = jax.vmap(lambda z: self._score(unravel(z.astype(flat.dtype)), static, batch))(
                pop
            )
            with _standard_promotion():  # evosax minimises
                es_state, _ = es.tell(k_tell, pop, -score, es_state, es_params)
            return _strong(es_state, template), score

        es_state, scores = jax.lax.scan(
            generation, es_state, jax.random.split(k_gens, self.generations)
        )
        with _standard_promotion():
            es_state = self._pin(es_state)
            pop, es_state = es.ask(k_final, es_state, es_params)
        es_state = _strong(es_state, template)
        members = pop.astype(flat.dtype)
        if self.include_mean:
            members = jnp.concatenate([es_state.mean.astype(flat.dtype)[None], members])
        candidates = jax.vmap(unravel)(members)
        return candidates, EvosaxState(es=es_state, anchor=flat, fitness=scores[-1])

    def adapt(self, state: EvosaxState, outcome: Outcome) -> EvosaxState:
        if self.recenter != "moved":
            return state
        flat, _ = ravel_pytree(outcome.params)
        # The ES follows the EV3 current model whenever it changed (an accepted candidate of
        # any proposer, or a roll-back to the stable model).
        moved = jnp.any(flat != state.anchor)
        mean = jnp.where(moved, flat.astype(state.es.mean.dtype), state.es.mean)
        return EvosaxState(es=state.es.replace(mean=mean), anchor=flat, fitness=state.fitness)


_COMMON_DOC = """**Arguments** (for every strategy):

    - `popsize`: ES population size `λ`; the proposer returns `popsize` candidates, plus the ES
      mean first when `include_mean` (default), so `num_candidates = popsize + 1`.
    - `sigma`: the ES step size, an array leaf. For strategies that do not adapt their step
      size (OpenAI-ES) it is the noise scale of every generation, read at every step (change
      it with `eqx.tree_at` without recompiling); for CMA-ES and Sep-CMA-ES it is the initial
      step size (`std_init`), which the strategy then adapts.
    - `generations`: ES generations per EV3 step (ask, evaluate, tell), each on its own batch.
    - `batch_size`: propose-stream examples per generation, the same for every member.
    - `fitness`: an `ev3core.AbstractAssessor` scoring one member (mean over the batch, or its
      `summary` for batch-level metrics), higher is better, need not be differentiable.
      `None` (default): the pipeline's first assessor when built by `ev3core.Pipeline` with
      this plugin loaded, accuracy otherwise.
    - `include_mean`: return the ES mean as the first candidate.
    - `recenter`: how the ES mean follows the EV3 current model: `"moved"` (default) moves the
      mean to the new current parameters whenever they changed (any proposer's candidate
      accepted, or a roll-back); `"always"` starts every step's ES from the current
      parameters; `"never"` lets the ES run on its own (its candidates still compete).
    - `es_params`: overrides of the strategy's evosax `Params` fields (array leaves, e.g.
      `{"c_mean": 0.5}` for CMA-ES).
    - `strategy_kwargs`: extra static arguments of the evosax strategy's constructor.
    - `name`: the label prefix (default: the strategy's name in lower case).
"""


def open_es(
    popsize: int = 16,
    *,
    sigma: float | Array = 0.1,
    learning_rate: float | Array = 0.05,
    optimizer: str = "adam",
    **options: Any,
) -> EvosaxProposer:
    """OpenAI-ES (Salimans et al. 2017) candidates: `EvosaxProposer("Open_ES", ...)` with a
    tunable learning rate.

    The mean moves along the rank-shaped search gradient with optax `optimizer` at
    `learning_rate` (an array leaf, default 0.05); `sigma` is the fixed noise scale (an array
    leaf); antithetic sampling (so `popsize` is even). `options`: any other
    `EvosaxProposer` argument (`generations`, `batch_size`, `fitness`, ...).

    ```python
    proposer = open_es(popsize=16, sigma=0.1, learning_rate=0.05, generations=2)
    ```
    """
    options.setdefault("name", "open_es")
    return EvosaxProposer(
        "Open_ES",
        popsize,
        sigma=sigma,
        learning_rate=learning_rate,
        optimizer=optimizer,
        **options,
    )


def sep_cma_es(popsize: int = 16, *, sigma: float | Array = 0.1, **options: Any) -> EvosaxProposer:
    """Separable CMA-ES (Ros & Hansen 2008) candidates: a diagonal covariance, so memory and
    time are linear in the number of parameters. `sigma` is the initial step size;
    `options`: any other `EvosaxProposer` argument.

    ```python
    proposer = sep_cma_es(popsize=16, sigma=0.3)
    ```
    """
    options.setdefault("name", "sep_cma_es")
    return EvosaxProposer("Sep_CMA_ES", popsize, sigma=sigma, **options)


def cma_es(popsize: int = 16, *, sigma: float | Array = 0.1, **options: Any) -> EvosaxProposer:
    """CMA-ES (Hansen 2001/2016) candidates with a full covariance matrix: quadratic memory
    and an eigendecomposition per generation, so use it for models of at most a few thousand
    parameters (`sep_cma_es` otherwise). `sigma` is the initial step size; `options`: any
    other `EvosaxProposer` argument.

    ```python
    proposer = cma_es(popsize=16, sigma=0.3)
    ```
    """
    options.setdefault("name", "cma_es")
    return EvosaxProposer("CMA_ES", popsize, sigma=sigma, **options)


EvosaxProposer.__doc__ = (EvosaxProposer.__doc__ or "").replace("{common}", _COMMON_DOC.strip())
