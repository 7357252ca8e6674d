"""The EV3 engine: pure `init` and `step` over an `eqx.Module` state.

The step is the three stages of `stages.py` in order; where candidates live (one device or a
candidate mesh) is a placement chosen here, once, when the engine is built.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
from jax.sharding import Mesh
from jaxtyping import PRNGKeyArray

from .._interfaces import AbstractAssessor, AbstractProposer, AbstractScheduler
from .._types import Data, History, State, StepInfo, split_model
from ..errors import ConfigurationError
from .checks import check_components, check_data
from .memo import memo
from .placement import AbstractPlacement, placement_for
from .stages import adapt, assess, explore

logger = logging.getLogger("ev3core")


class Engine(eqx.Module):
    """One EV3 iteration as one compiled program.

    Build it from a `Pipeline` (which resolves components by name through the plugins) or
    directly from components. `init` and `step` are pure: the same state and data give the
    same result, and `step` compiles once (changing an array hyperparameter, such as a loss
    temperature or an alpha, never recompiles; changing the model's architecture re-traces
    once and logs it on the `ev3core` logger).

    One step:

    1. **explore**: each proposer maps the current parameters to its candidates (vmapped, with
       trajectories in `lax.scan`); candidates are concatenated on a leading axis `K`.
    2. **assess**: every assessor scores the `K` candidates, the current and the stable model on
       the *same* `assess_size` examples of the assess stream; the scheduler picks the winner.
       Candidates with non-finite parameters or scores are masked and never accepted.
    3. **adapt**: the winner, the current and the stable model are scored on `decide_size`
       examples of the decide stream (a stable model bitwise equal to the current one gets
       the current model's scores, so the scheduler sees an exact tie, never a rounding
       difference); the scheduler decides; proposers update their states; the decision is
       recorded in the history ring buffer.

    **Arguments:**

    - `proposers`, `assessors`, `scheduler`: the components.
    - `assess_size`, `decide_size`: examples drawn per step from the assess and decide streams.
    - `history_size`: length of the decision ring buffer.
    - `mesh`: a `jax.sharding.Mesh` with a `"candidate"` axis (`ev3core.candidate_mesh()`):
      candidates, their assessment and per-candidate proposer states are split over its
      devices (of one or several processes); `K` is padded to a multiple of the axis size
      with masked candidates that are never accepted. With a second axis `"data"`
      (`ev3core.candidate_mesh(data=n)`), each candidate's examples are split over it too:
      its trajectory minibatches (data parallel, gradients reduced over `"data"`) and the
      assess and decide examples. The decisions are those of one device, with parameters
      equal up to float reduction order. `None` (default): one device. See
      `docs/distributed.md`.
    - `chunk_size`: assess at most this many candidates at once (`lax.map` with
      `batch_size`), to bound memory when `K` is large; the results are the same.
      `None` (default): all at once. `GradientProposer(chunk_size=...)` does the same for
      the trajectories.
    """

    proposers: tuple[AbstractProposer, ...]
    assessors: tuple[AbstractAssessor, ...]
    scheduler: AbstractScheduler
    placement: AbstractPlacement
    assess_size: int = eqx.field(static=True)
    decide_size: int = eqx.field(static=True)
    history_size: int = eqx.field(static=True)
    chunk_size: int | None = eqx.field(static=True)

    def __init__(
        self,
        proposers: Sequence[AbstractProposer],
        assessors: Sequence[AbstractAssessor],
        scheduler: AbstractScheduler,
        assess_size: int = 128,
        decide_size: int = 2048,
        history_size: int = 64,
        *,
        mesh: Mesh | None = None,
        chunk_size: int | None = None,
    ):
        proposers, assessors = tuple(proposers), tuple(assessors)
        check_components(proposers, assessors, scheduler, assess_size, decide_size, chunk_size)
        bound = scheduler.bind(assessors)  # e.g. objectives named after the assessors
        if not isinstance(bound, AbstractScheduler):
            raise ConfigurationError(
                f"{type(scheduler).__name__}.bind(assessors) returned {bound!r}; it must return "
                "an ev3core.AbstractScheduler (return self when there is nothing to bind)."
            )
        # validates the objective index early (traced abstractly: no device work)
        eqx.filter_eval_shape(bound.init, len(assessors), jax.random.key(0))
        self.placement = placement_for(mesh, sum(p.num_candidates for p in proposers))
        self.proposers, self.assessors, self.scheduler = self.placement.place(
            (proposers, assessors, bound)
        )
        self.assess_size = int(assess_size)
        self.decide_size = int(decide_size)
        self.history_size = int(history_size)
        self.chunk_size = None if chunk_size is None else int(chunk_size)

    # ---------------------------------------------------------------- introspection
    @property
    def num_candidates(self) -> int:
        """`K`: the total number of candidates per step."""
        return sum(p.num_candidates for p in self.proposers)

    @property
    def objective_names(self) -> tuple[str, ...]:
        return tuple(a.name for a in self.assessors)

    def labels(self) -> tuple[str, ...]:
        """Provenance label of every candidate, in candidate order."""
        out: list[str] = []
        for i, p in enumerate(self.proposers):
            out.extend(f"p{i}:{label}" for label in p.labels())
        return tuple(out)

    @property
    def mesh(self) -> Mesh | None:
        """The candidate mesh, or `None` when everything runs on one device."""
        return self.placement.mesh

    # ---------------------------------------------------------------- init / step
    def init(self, model: Any, key: PRNGKeyArray) -> State:
        """The initial state: current and stable are both `model`.

        **Arguments:**

        - `model`: an Equinox module called on one example.
        - `key`: a PRNG key (`jax.random.key(seed)`).
        """
        params = split_model(model)[0]
        if not jax.tree.leaves(params):
            raise ConfigurationError(
                f"The model {type(model).__name__} has no array leaves to optimise."
            )
        if not any(isinstance(x, jax.core.Tracer) for x in jax.tree.leaves(params)):
            bad = [
                jax.tree_util.keystr(path)
                for path, x in jax.tree_util.tree_flatten_with_path(params)[0]
                if jnp.issubdtype(x.dtype, jnp.inexact) and not bool(jnp.all(jnp.isfinite(x)))
            ]
            if bad:
                raise ConfigurationError(
                    f"The model {type(model).__name__} has NaN or Inf parameters from the start "
                    f"(in {', '.join(bad[:6])}{' ...' if len(bad) > 6 else ''}): no candidate "
                    "derived from it could be valid. Initialise it with finite values."
                )
        static, dynamic = self._split()
        model_dynamic, model_static = eqx.partition(model, eqx.is_array)
        return self.placement.place_state(
            _jit_init(static, dynamic, _Static(model_static), model_dynamic, key)
        )

    def _init_pure(self, model: Any, key: PRNGKeyArray) -> State:
        params, static = split_model(model)
        k_state, k_scheduler, *k_proposers = jax.random.split(key, len(self.proposers) + 2)
        return State(
            step=jnp.zeros((), jnp.int32),
            key=k_state,
            current=params,
            stable=params,
            proposer_states=tuple(
                p.init(params, static, k) for p, k in zip(self.proposers, k_proposers)
            ),
            scheduler_state=self.scheduler.init(len(self.assessors), k_scheduler),
            history=History.empty(self.history_size, len(self.assessors)),
            static=static,
        )

    def check_data(self, data: Data, state: State | None = None) -> None:
        """Raise `ConfigurationError` if `data` cannot feed this engine (host side, no compile).

        Checks that every stream has one leading example axis, and that the assess and
        decide streams hold at least `assess_size` / `decide_size` examples (each step draws
        that many distinct examples, without replacement). Given a `state`, also evaluates every
        proposer and assessor abstractly (`eqx.filter_eval_shape`: traced, never compiled) on
        the data's shapes and dtypes, so a model/data mismatch is reported naming the
        component and the stream instead of failing deep inside JAX. `ev3core.run` calls it.
        """
        check_data(self, data, state)

    def step_pure(self, state: State, data: Data) -> tuple[State, StepInfo]:
        """One EV3 iteration, un-jitted (for composing into your own `jit` or `scan`):
        explore, then assess, then adapt."""
        logger.info(
            "ev3core: tracing the EV3 step (K=%d candidates, %d objectives)",
            self.num_candidates,
            len(self.assessors),
        )
        key, k_explore, k_assess, k_decide = jax.random.split(state.key, 4)
        with self.placement.proposing():  # examples split over a "data" mesh axis, if any
            explored = explore(self.proposers, state, data.propose, k_explore)
        assessed = assess(
            self.assessors, self.scheduler, self.placement, explored.candidates, state,
            data.assess, k_assess, self.assess_size, self.chunk_size,
        )  # fmt: skip
        new_state, info = adapt(
            self.proposers, self.assessors, self.scheduler, self.placement, explored, assessed,
            state, data.decide, k_decide, self.decide_size, next_key=key,
        )  # fmt: skip
        return self.placement.constrain_state(new_state), info

    def step(self, state: State, data: Data) -> tuple[State, StepInfo]:
        """One EV3 iteration, compiled (see `step_pure`).

        One dispatch of a plain `jax.jit`: the engine's non-array part is split off once per
        engine (not per call), and `state` and `data` go to the compiled program as they are,
        so the host work per step does not depend on the model's size. `state` is left intact
        (nothing is donated): keep it, compare it, checkpoint it. `step_donated` reuses its
        buffers instead.

        **Returns:** `(new_state, info)`; `info` is a `StepInfo` of device arrays.
        """
        static, dynamic = self._split()
        return _jit_step(static, dynamic, state, data)

    def _split(self) -> tuple[_Static, Engine]:
        """`(static, arrays)` of this engine, computed on first use and kept: an engine is
        immutable, and a changed hyperparameter makes a new engine with the same static part."""
        # Kept beside the engine and dropped with it, not on it: an attribute would change its
        # tree structure.
        values = memo(self)
        split = values.get("split")
        if split is None:
            dynamic, static = eqx.partition(self, eqx.is_array)
            split = values["split"] = (_Static(static), dynamic)
        return split

    def scan_pure(self, state: State, data: Data, num_steps: int) -> tuple[State, StepInfo]:
        """`num_steps` iterations in one `lax.scan`, un-jitted."""

        def body(s, _):
            return self.step_pure(s, data)

        return jax.lax.scan(body, state, None, length=num_steps)

    def scan(self, state: State, data: Data, num_steps: int) -> tuple[State, StepInfo]:
        """`num_steps` iterations in one compiled `lax.scan` (data must live on the device).

        **Returns:** `(new_state, infos)` where every leaf of `infos` has a leading axis of
        size `num_steps`.
        """
        static, dynamic = self._split()
        return _jit_scan(static, dynamic, state, data, int(num_steps))

    def step_donated(self, state: State, data: Data) -> tuple[State, StepInfo]:
        """`step` that reuses the buffers of `state` for the new state (`donate`).

        Saves one copy of the whole state per step (parameters, per-candidate optimizer
        states, history). `state` must not be used afterwards: its arrays are deleted. Use
        `step` when you keep old states (comparisons, your own checkpoints).
        """
        static, dynamic = self._split()
        return _jit_step_donated(static, dynamic, state, data)

    def scan_donated(self, state: State, data: Data, num_steps: int) -> tuple[State, StepInfo]:
        """`scan` that reuses the buffers of `state` (see `step_donated`)."""
        static, dynamic = self._split()
        return _jit_scan_donated(static, dynamic, state, data, int(num_steps))


# The compiled programs are plain `jax.jit`s whose static argument is an engine's cached
# `_Static` (and, for `init`, the model's): equal engines share them and
# `jax.clear_caches()` releases them with their static arguments. `eqx.filter_jit` is not
# used: it always donates (its first argument, even when empty), and JAX keeps the argument
# structure of every donating call it traces, static arguments included, in a
# process-wide cache that `jax.clear_caches()` does not clear; `init`, `step` and `scan`
# would leave each engine's non-array part (optimizers, model structure) there. Only the
# explicitly donating `step_donated` / `scan_donated` still do (JAX bounds that cache).


class _Static:
    """An engine's (or a model's) non-array part as a `jax.jit` static argument: hashed once,
    compared by value (engines rebuilt with other hyperparameters share the compiled step)."""

    __slots__ = ("value", "_hash")

    def __init__(self, value: Any):
        self.value = value
        # The tree structure and the static leaves: a module's own hash would fail on a
        # container field (an `Optimizer`'s dict of hyperparameters holds no leaves here).
        leaves, treedef = jax.tree.flatten(value)
        try:
            self._hash = hash((treedef, *leaves))
        except TypeError:  # an unhashable static leaf: never shared, compared by identity
            self._hash = id(value)

    def __hash__(self) -> int:
        return self._hash

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, _Static):
            return NotImplemented
        return self.value is other.value or (
            self._hash == other._hash and bool(self.value == other.value)
        )


def _init_flat(
    static: _Static, dynamic: Engine, model_static: _Static, model_dynamic: Any, key: PRNGKeyArray
) -> State:
    engine = eqx.combine(dynamic, static.value)
    return engine._init_pure(eqx.combine(model_dynamic, model_static.value), key)


def _step_flat(
    static: _Static, dynamic: Engine, state: State, data: Data
) -> tuple[State, StepInfo]:
    return eqx.combine(dynamic, static.value).step_pure(state, data)


def _scan_flat(
    static: _Static, dynamic: Engine, state: State, data: Data, num_steps: int
) -> tuple[State, StepInfo]:
    return eqx.combine(dynamic, static.value).scan_pure(state, data, num_steps)


# One compiled program instead of a dozen eagerly dispatched ones (each compiled on its
# own): a shorter start-up.
_jit_init = jax.jit(_init_flat, static_argnums=(0, 2))
_jit_step = jax.jit(_step_flat, static_argnums=0)
_jit_scan = jax.jit(_scan_flat, static_argnums=(0, 4))
# The state's buffers (argument 2) become the new state's.
_jit_step_donated = jax.jit(_step_flat, static_argnums=0, donate_argnums=2)
_jit_scan_donated = jax.jit(_scan_flat, static_argnums=(0, 4), donate_argnums=2)
