"""The EV3 engine: pure `init` and `step` over an `eqx.Module` state."""

from __future__ import annotations

import functools
import logging
from collections.abc import Sequence
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, PartitionSpec as P
from jaxtyping import Array, Int, PRNGKeyArray, PyTree

from .._interfaces import AbstractAssessor, AbstractProposer, AbstractScheduler
from .._sharding import (
    CANDIDATE_AXIS,
    check_mesh,
    constrain,
    num_shards,
    padded_size,
    replicate,
    shard_state,
    state_specs,
)
from .._types import (
    CURRENT,
    STABLE,
    WINNER,
    Data,
    History,
    Outcome,
    State,
    StepInfo,
    split_model,
    tree_all_finite,
    tree_concat,
    tree_index,
    tree_stack,
    tree_where,
)
from ..errors import ComponentError, ConfigurationError, EV3Error

logger = logging.getLogger("ev3core")


def _sample(data: PyTree[Array], key: PRNGKeyArray, size: int) -> PyTree[Array]:
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
    idx = _distinct_indices(key, n, size)
    return jax.tree.map(lambda a: a[idx], data)


def _top_k_indices(key: PRNGKeyArray, n: int, size: int) -> Int[Array, " size"]:
    """A uniformly random `size`-subset of `range(n)`: the `size` largest of `n` uniform keys
    (O(n); `jax.random.choice(replace=False)` sorts a whole permutation, 20-40 times slower)."""
    return jax.lax.top_k(jax.random.uniform(key, (n,)), size)[1].astype(jnp.int32)


def _distinct_indices(key: PRNGKeyArray, n: int, size: int) -> Int[Array, " size"]:
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


def _psum_pick(x: Array, mine: Array) -> Array:
    """`x` from the one shard where `mine` holds, on every shard (an all-reduce)."""
    if x.dtype == jnp.bool_:
        return jax.lax.psum(jnp.where(mine, x, False).astype(jnp.int32), CANDIDATE_AXIS) > 0
    return jax.lax.psum(jnp.where(mine, x, jnp.zeros_like(x)), CANDIDATE_AXIS)


_STREAMS = ("propose", "assess", "decide")
#: Engine / state / data signatures that passed `Engine.check_data`'s abstract evaluation.
_CHECKED: set[Any] = set()


def _describe_stream(stream: PyTree[Any]) -> str:
    leaves = jax.tree.leaves(stream)
    return ", ".join(f"{jnp.result_type(x)}{list(jnp.shape(x))}" for x in leaves)


def _check_objective_directions(
    assessors: Sequence[AbstractAssessor], scheduler: AbstractScheduler
) -> None:
    """Objectives (`scheduler.objectives`, if any) must not pull one score both ways."""
    objectives = getattr(scheduler, "objectives", None)
    if not objectives:
        return
    owner = type(scheduler).__name__
    names = [a.name for a in assessors]
    seen: dict[str, tuple[int, str]] = {}
    for i, o in enumerate(objectives):
        name, direction = getattr(o, "name", None), getattr(o, "direction", None)
        if name is None or direction is None:
            continue
        if name in seen and seen[name][1] != direction:
            j, other = seen[name]
            raise ConfigurationError(
                f"{owner}: objective {name!r} is given conflicting directions: "
                f"objectives[{j}] has direction={other!r} and objectives[{i}] has "
                f"direction={direction!r}. An objective is either maximised or minimised: "
                "keep one of them (or give them different names if they are different scores)."
            )
        seen.setdefault(name, (i, direction))
        if i < len(names) and name in names and names[i] != name:
            raise ConfigurationError(
                f"{owner}: objectives[{i}] is named {name!r} but assessor #{i} is "
                f"{names[i]!r} ({name!r} is assessor #{names.index(name)}). Objectives are "
                f"matched to assessors by position: list them in assessor order {names}."
            )
        declared = getattr(assessors[i], "direction", None) if i < len(assessors) else None
        if declared in ("max", "min") and declared != direction:
            raise ConfigurationError(
                f"{owner}: assessor #{i} {names[i]!r} declares direction={declared!r} (its "
                f"scores are better when {'higher' if declared == 'max' else 'lower'}) but "
                f"objectives[{i}] has direction={direction!r}, which would optimise it the "
                f"wrong way. Use Objective({names[i]!r}, direction={declared!r})."
            )


def _check_stream(name: str, stream: PyTree[Any]) -> int:
    leaves = jax.tree.leaves(stream)
    if not leaves:
        raise ConfigurationError(
            f"Data.{name} is empty. Pass a pytree of arrays with a leading example axis, "
            f"e.g. Data({name}=(x, y), ...)."
        )
    sizes = {jnp.shape(x)[0] if jnp.ndim(x) else None for x in leaves}
    if None in sizes or len(sizes) != 1:
        raise ConfigurationError(
            f"Data.{name}: every array needs the same leading example axis, got shapes "
            f"{[jnp.shape(x) for x in leaves]}. Stack examples on axis 0."
        )
    (n,) = sizes
    if n == 0:
        raise ConfigurationError(f"Data.{name} has zero examples; pass at least one example.")
    return n


def _concrete(tree: PyTree[Any]) -> bool:
    return not any(isinstance(x, jax.core.Tracer) for x in jax.tree.leaves(tree))


def _check_finite_stream(name: str, stream: PyTree[Any], n: int) -> None:
    """Non-finite *data* is the data's problem: say so, naming the stream and the examples,
    instead of letting every candidate scored on it look invalid."""
    bad = np.zeros(n, bool)
    where = []
    for path, x in jax.tree_util.tree_flatten_with_path(stream)[0]:
        if not jnp.issubdtype(jnp.result_type(x), jnp.inexact):
            continue
        rows = ~np.asarray(jnp.all(jnp.isfinite(jnp.reshape(x, (n, -1))), axis=1))
        if rows.any():
            bad |= rows
            where.append(jax.tree_util.keystr(path) or "(the array)")
    if bad.any():
        first = np.flatnonzero(bad)[:5].tolist()
        raise ConfigurationError(
            f"Data.{name} has {int(bad.sum())} of {n} example(s) with NaN or Inf values (in "
            f"{', '.join(where)}; examples {first}{' ...' if bad.sum() > 5 else ''}). Every "
            "model scored on them would look invalid, so no candidate could be accepted. "
            "Remove or impute those examples."
        )


def _check_labels(name: str, stream: PyTree[Any], model: Any) -> None:
    """Integer class labels (`(x, y, ...)` streams) must index the model's outputs: a label
    outside `[0, classes)` would make every candidate's score invalid, or wrap silently."""
    if not isinstance(stream, (tuple, list)) or len(stream) < 2:
        return
    x, y = stream[0], stream[1]
    if not (
        eqx.is_array(y) and jnp.ndim(y) == 1 and jnp.issubdtype(jnp.result_type(y), jnp.integer)
    ):
        return
    try:
        out = eqx.filter_eval_shape(
            model, jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape[1:], a.dtype), x)
        )
    except Exception:  # noqa: BLE001 - the component checks report shape problems
        return
    if not hasattr(out, "shape") or len(out.shape) != 1:
        return
    classes = out.shape[0]
    lo, hi = int(jnp.min(y)), int(jnp.max(y))
    if lo < 0 or hi >= classes:
        raise ConfigurationError(
            f"Data.{name} has labels in [{lo}, {hi}] (element 1 of the stream), but the model "
            f"{type(model).__name__} outputs {classes} classes, so labels must lie in "
            f"[0, {classes - 1}]. Fix the labels or give the model {hi + 1} outputs."
        )


def _leaf_differences(want: PyTree[Any], got: PyTree[Any], limit: int = 6) -> str:
    """The leaves where two trees of arrays differ, as `path: (shape) dtype` lines."""

    def flat(tree: PyTree[Any]) -> dict[str, str]:
        return {
            jax.tree_util.keystr(path): f"{tuple(jnp.shape(x))} {jnp.result_type(x)}"
            for path, x in jax.tree_util.tree_flatten_with_path(tree)[0]
        }

    a, b = flat(want), flat(got)
    lines = []
    for path in [*a, *(p for p in b if p not in a)]:
        if a.get(path) != b.get(path):
            lines.append(
                f"{path or '(root)'}: expected {a.get(path, '(no such leaf)')}, "
                f"got {b.get(path, '(no such leaf)')}"
            )
    more = f"; and {len(lines) - limit} more" if len(lines) > limit else ""
    return "; ".join(lines[:limit]) + more


def _describe(kind: str, index: int, comp: Any) -> str:
    from .._faults import describe_component
    from .._plugins.manager import plugins as default_plugins

    return describe_component(kind, index, comp, plugins=default_plugins())


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
       examples of the decide stream; the scheduler decides; proposers update their states;
       the decision is recorded in the history ring buffer.

    **Arguments:**

    - `proposers`, `assessors`, `scheduler`: the components.
    - `assess_size`, `decide_size`: examples drawn per step from the assess and decide streams.
    - `history_size`: length of the decision ring buffer.
    - `mesh`: a `jax.sharding.Mesh` with a `"candidate"` axis (`ev3core.candidate_mesh()`):
      candidates, their assessment and per-candidate proposer states are split over its
      devices (of one or several processes); `K` is padded to a multiple of the axis size
      with masked candidates that are never accepted. `None` (default): one device. See
      `docs/distributed.md`.
    - `chunk_size`: assess at most this many candidates at once (`lax.map` with
      `batch_size`), to bound memory when `K` is large; the results are the same.
      `None` (default): all at once. `GradientProposer(chunk_size=...)` does the same for
      the trajectories.
    """

    proposers: tuple[AbstractProposer, ...]
    assessors: tuple[AbstractAssessor, ...]
    scheduler: AbstractScheduler
    assess_size: int = eqx.field(static=True)
    decide_size: int = eqx.field(static=True)
    history_size: int = eqx.field(static=True)
    mesh: Mesh | None = eqx.field(static=True)
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
        proposers = tuple(proposers)
        assessors = tuple(assessors)
        if not proposers:
            raise ConfigurationError(
                "The pipeline has no proposer, so there is no candidate to assess. Add one, "
                "e.g. proposers=[GradientProposer(...)]."
            )
        if not assessors:
            raise ConfigurationError(
                "The pipeline has no assessor. Add one, e.g. assessors=['accuracy']."
            )
        for p in proposers:
            if not isinstance(p, AbstractProposer):
                raise ConfigurationError(f"{p!r} is not an ev3core.AbstractProposer.")
            if p.num_candidates < 1:
                raise ConfigurationError(
                    f"{type(p).__name__} proposes {p.num_candidates} candidates; a proposer "
                    "must propose at least one."
                )
        for a in assessors:
            if not isinstance(a, AbstractAssessor):
                raise ConfigurationError(f"{a!r} is not an ev3core.AbstractAssessor.")
        names = [a.name for a in assessors]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ConfigurationError(
                f"Two assessors share the objective name(s) {dupes}. Give each objective a "
                "distinct name."
            )
        if not isinstance(scheduler, AbstractScheduler):
            raise ConfigurationError(f"{scheduler!r} is not an ev3core.AbstractScheduler.")
        _check_objective_directions(assessors, scheduler)
        for label, size in (("assess_size", assess_size), ("decide_size", decide_size)):
            if int(size) < 2:
                raise ConfigurationError(
                    f"{label}={size}: at least 2 examples are needed to estimate a standard "
                    f"error. Use a larger {label} (the smoke experiment uses 128 and 2048)."
                )
        bound = scheduler.bind(assessors)  # e.g. objectives named after the assessors
        if not isinstance(bound, AbstractScheduler):
            raise ConfigurationError(
                f"{type(scheduler).__name__}.bind(assessors) returned {bound!r}; it must return "
                "an ev3core.AbstractScheduler (return self when there is nothing to bind)."
            )
        scheduler = bound
        if mesh is not None:  # hyperparameters live on every device: no copy per step
            proposers, assessors, scheduler = replicate(
                (proposers, assessors, scheduler), check_mesh(mesh)
            )
        self.proposers = proposers
        self.assessors = assessors
        self.scheduler = scheduler
        self.assess_size = int(assess_size)
        self.decide_size = int(decide_size)
        self.history_size = int(history_size)
        self.mesh = None if mesh is None else check_mesh(mesh)
        if chunk_size is not None and int(chunk_size) < 1:
            raise ConfigurationError(
                f"chunk_size={chunk_size}: assess at least one candidate at a time (a positive "
                "integer), or pass chunk_size=None to assess all candidates at once."
            )
        self.chunk_size = None if chunk_size is None else int(chunk_size)
        scheduler.init(len(assessors))  # validates the objective index early

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

    # ---------------------------------------------------------------- init / step
    def init(self, model: Any, key: PRNGKeyArray) -> State:
        """The initial state: current and stable are both `model`.

        **Arguments:**

        - `model`: an Equinox module called on one example.
        - `key`: a PRNG key (`jax.random.key(seed)`).
        """
        params, static = split_model(model)
        if not jax.tree.leaves(params):
            raise ConfigurationError(
                f"The model {type(model).__name__} has no array leaves to optimise."
            )
        if _concrete(params):
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
        keys = jax.random.split(key, len(self.proposers) + 1)
        state = State(
            step=jnp.zeros((), jnp.int32),
            key=keys[0],
            current=params,
            stable=params,
            proposer_states=tuple(
                p.init(params, static, k) for p, k in zip(self.proposers, keys[1:])
            ),
            scheduler_state=self.scheduler.init(len(self.assessors)),
            history=History.empty(self.history_size, len(self.assessors)),
            static=static,
        )
        return state if self.mesh is None else shard_state(state, self.mesh)

    def check_data(self, data: Data, state: State | None = None) -> None:
        """Raise `ConfigurationError` if `data` cannot feed this engine (host side, no compile).

        Checks that every stream has one leading example axis, and that the assess and
        decide streams hold at least `assess_size` / `decide_size` examples (each step draws
        that many distinct examples, without replacement). Given a `state`, also evaluates every
        proposer and assessor abstractly (`eqx.filter_eval_shape`: traced, never compiled) on
        the data's shapes and dtypes, so a model/data mismatch is reported naming the
        component and the stream instead of failing deep inside JAX. `ev3core.run` calls it.
        """
        if not isinstance(data, Data):
            raise ConfigurationError(
                f"Expected ev3core.Data(propose=..., assess=..., decide=...), got "
                f"{type(data).__name__}."
            )
        sizes = {name: _check_stream(name, getattr(data, name)) for name in _STREAMS}
        if _concrete(data):
            for name in _STREAMS:
                _check_finite_stream(name, getattr(data, name), sizes[name])
                if state is not None and isinstance(state, State) and _concrete(state.current):
                    _check_labels(name, getattr(data, name), state.model)
        for name, label, size in (
            ("assess", "assess_size", self.assess_size),
            ("decide", "decide_size", self.decide_size),
        ):
            if sizes[name] < size:
                raise ConfigurationError(
                    f"Data.{name} holds {sizes[name]} examples but {label}={size}. The engine "
                    f"draws {size} distinct {name} examples per step (repeating examples would "
                    "shrink the standard errors, and the confidence bounds (alpha) would claim "
                    "more confidence than the data supports). Pass at least "
                    f"{size} {name} examples or use {label}<={sizes[name]}."
                )
        if state is not None:
            try:  # the abstract check depends only on structures, shapes and dtypes
                key = (
                    id(self),
                    jax.tree.structure(self),
                    jax.tree.structure(state),
                    jax.tree.structure(data),
                    tuple(
                        (jnp.shape(x), jnp.result_type(x))
                        for x in jax.tree.leaves((self, state, data))
                    ),
                )
                hash(key)
            except TypeError:
                key = None
            if key is None or key not in _CHECKED:
                self._check_against_state(data, state)
                if key is not None:
                    if len(_CHECKED) > 256:
                        _CHECKED.clear()
                    _CHECKED.add(key)

    def _check_against_state(self, data: Data, state: State) -> None:
        from .._faults import component_owner

        if not isinstance(state, State):
            raise ConfigurationError(
                f"Expected an ev3core.State from engine.init(model, key), got "
                f"{type(state).__name__}."
            )
        if len(state.proposer_states) != len(self.proposers):
            raise ConfigurationError(
                f"The state has {len(state.proposer_states)} proposer state(s) but the engine "
                f"has {len(self.proposers)} proposer(s): it was made by another pipeline. Build "
                "it with this engine's init(model, key)."
            )
        if state.history.score.shape[-1] != len(self.assessors):
            raise ConfigurationError(
                f"The state records {state.history.score.shape[-1]} objective(s) but the engine "
                f"has {len(self.assessors)} assessor(s) {list(self.objective_names)}: it was made "
                "by another pipeline. Build it with this engine's init(model, key)."
            )

        def attempt(what: str, stream: str, fn: Any, *args: Any) -> Any:
            try:
                return eqx.filter_eval_shape(fn, *args)
            except EV3Error:
                raise
            except Exception as exc:
                owner = component_owner(self, exc)
                if owner is not None and (
                    component_owner(self, exc, innermost=True) is not None
                    or isinstance(exc, TypeError)
                ):
                    # The component's own code raised, or tracing it failed on a type (a
                    # carry of the wrong dtype in its scan): name the component.
                    raise ComponentError(
                        f"{_describe(*owner)} raised {type(exc).__name__} while being traced "
                        f"on Data.{stream} ({_describe_stream(getattr(data, stream))}): "
                        f"{str(exc).strip()[:800]}. Fix the component or remove it from the "
                        "pipeline."
                    ) from exc
                msg = str(exc).strip().splitlines()[0].rstrip(".") if str(exc).strip() else ""
                raise ConfigurationError(
                    f"{what} cannot run on Data.{stream} "
                    f"({_describe_stream(getattr(data, stream))}) with the model "
                    f"{type(state.model).__name__}: {type(exc).__name__}: {msg}. The data's "
                    "shapes or dtypes do not match what the model and the component expect "
                    "(models are called on one example; axis 0 of every array is the example "
                    "axis). Fix the data or the model."
                ) from exc

        model = state.model
        for name, size in (("assess", self.assess_size), ("decide", self.decide_size)):
            batch = jax.tree.map(
                lambda a, n=size: jax.ShapeDtypeStruct(
                    (n,) + tuple(jnp.shape(a))[1:], jnp.result_type(a)
                ),
                getattr(data, name),
            )
            for i, a in enumerate(self.assessors):
                what = f"assessor #{i} {a.name!r} ({type(a).__qualname__})"
                out = attempt(what, name, a, model, batch)
                shape = getattr(out, "shape", None)
                if shape != (size,):
                    raise ConfigurationError(
                        f"{what} returned shape {shape} for a batch of {size} {name} examples. "
                        f"An assessor returns one score per example: shape ({size},)."
                    )
        for i, (p, ps) in enumerate(zip(self.proposers, state.proposer_states)):
            what = f"proposer #{i} ({type(p).__qualname__})"
            cands, new_ps = attempt(
                what,
                "propose",
                p.propose,
                state.current,
                state.static,
                ps,
                data.propose,
                state.key,
            )
            want = jax.tree.map(
                lambda x, k=p.num_candidates: ((k,) + tuple(x.shape), x.dtype), state.current
            )
            got = jax.tree.map(lambda x: (tuple(x.shape), x.dtype), cands)
            if jax.tree.structure(want) != jax.tree.structure(got) or jax.tree.leaves(
                want, is_leaf=lambda x: isinstance(x, tuple)
            ) != jax.tree.leaves(got, is_leaf=lambda x: isinstance(x, tuple)):
                expected = jax.tree.map(
                    lambda x, k=p.num_candidates: jax.ShapeDtypeStruct((k, *x.shape), x.dtype),
                    state.current,
                )
                raise ConfigurationError(
                    f"{_describe('proposer', i, p)} returned candidates that are not the "
                    f"parameters stacked {p.num_candidates} times: "
                    f"{_leaf_differences(expected, cands)}. A proposer returns full parameters "
                    "with a leading candidate axis of size num_candidates."
                )
            sig = lambda t: [(tuple(jnp.shape(x)), jnp.result_type(x)) for x in jax.tree.leaves(t)]
            if jax.tree.structure(new_ps) != jax.tree.structure(ps) or sig(new_ps) != sig(ps):
                raise ConfigurationError(
                    f"{what} returned a state whose structure, shapes or dtypes differ from the "
                    "state it was given, so the step could not be scanned or would re-compile "
                    "every step. Return a state of the same structure from propose()."
                )

    def _summaries(self, scores: Array) -> Array:
        """`[objective, model]`: each objective's value per model (`assessor.summary`: the mean,
        or a batch-level metric such as F1)."""
        return jnp.stack([jax.vmap(a.summary)(s) for a, s in zip(self.assessors, scores)])

    def _assess(
        self, params: PyTree[Array], static: Any, batch: PyTree[Array], chunk: int | None = None
    ) -> Array:
        def score(p):
            model = eqx.combine(p, static)
            return jnp.stack([a(model, batch).astype(jnp.float32) for a in self.assessors])

        n = jax.tree.leaves(params)[0].shape[0]
        if chunk is None or chunk >= n:
            out = jax.vmap(score)(params)
        else:  # groups of `chunk` models in sequence: bounded memory, same values
            out = jax.lax.map(score, params, batch_size=chunk)
        return jnp.moveaxis(out, 0, 1)  # [objective, model, example]

    def _assess_sharded(
        self,
        candidates: PyTree[Array],
        state: State,
        batch: PyTree[Array],
    ) -> tuple[Array, Array, PyTree[Array], Any]:
        """Assess the candidates where they live; only scores leave their devices.

        Returns the scores of the `K` candidates, current and stable, the validity of the
        candidates' parameters, the padded candidates and a function extracting one of them.
        """
        mesh, K = self.mesh, self.num_candidates
        Kp = padded_size(K, num_shards(mesh))
        if Kp > K:  # masked padding: copies of the current model, never valid
            pad = jax.tree.map(lambda x: jnp.broadcast_to(x, (Kp - K,) + x.shape), state.current)
            candidates = tree_concat([candidates, pad])
        cand_spec = jax.tree.map(lambda _: P(CANDIDATE_AXIS), candidates)
        candidates = constrain(candidates, mesh, cand_spec)
        static, chunk = state.static, self.chunk_size

        def local(cands, batch):
            n = jax.tree.leaves(cands)[0].shape[0]
            finite = jnp.broadcast_to(tree_all_finite(cands, 1), (n,))
            return self._assess(cands, static, batch, chunk), finite

        scores_c, finite = jax.shard_map(
            local,
            mesh=mesh,
            in_specs=(cand_spec, P()),
            out_specs=(P(None, CANDIDATE_AXIS), P(CANDIDATE_AXIS)),
        )(candidates, batch)
        incumbents = self._assess(tree_stack([state.current, state.stable]), static, batch)
        scores = jnp.concatenate([scores_c[:, :K], incumbents], axis=1)
        per_shard = Kp // num_shards(mesh)

        def pick(i: Array) -> PyTree[Array]:
            # The shard holding candidate i contributes it, the others zeros: one all-reduce
            # of one model's parameters (the winner's broadcast), never a gather of all K.
            def one(cands):
                shard = jax.lax.axis_index(CANDIDATE_AXIS)
                local_i = i - shard * per_shard
                mine = (local_i >= 0) & (local_i < per_shard)
                row = jnp.clip(local_i, 0, per_shard - 1)
                return jax.tree.map(lambda x: _psum_pick(x[row], mine), cands)

            return jax.shard_map(
                one,
                mesh=mesh,
                in_specs=(cand_spec,),
                out_specs=jax.tree.map(lambda _: P(), state.current),
            )(candidates)

        return scores, finite[:K], candidates, pick

    def step_pure(self, state: State, data: Data) -> tuple[State, StepInfo]:
        """One EV3 iteration, un-jitted (for composing into your own `jit` or `scan`)."""
        logger.info(
            "ev3core: tracing the EV3 step (K=%d candidates, %d objectives)",
            self.num_candidates,
            len(self.assessors),
        )
        static = state.static
        key, k_prop, k_assess, k_decide = jax.random.split(state.key, 4)

        # explore
        prop_keys = jax.random.split(k_prop, len(self.proposers))
        cands, pstates = [], []
        for p, ps, k in zip(self.proposers, state.proposer_states, prop_keys):
            c, ps = p.propose(state.current, static, ps, data.propose, k)
            cands.append(c)
            pstates.append(ps)
        candidates = tree_concat(cands)
        K = self.num_candidates
        if self.mesh is None:
            valid = tree_all_finite(candidates, batch_dims=1)
            # assess: K candidates + current + stable on the same examples
            everything = tree_concat(
                [candidates, tree_stack([state.current]), tree_stack([state.stable])]
            )
            assess_batch = _sample(data.assess, k_assess, self.assess_size)
            scores_a = self._assess(everything, static, assess_batch, self.chunk_size)
        else:
            assess_batch = _sample(data.assess, k_assess, self.assess_size)
            scores_a, valid, padded, pick = self._assess_sharded(candidates, state, assess_batch)
        valid = valid & jnp.all(jnp.isfinite(scores_a[:, :K]), axis=(0, 2))
        selected = self.scheduler.select(scores_a, valid, state.scheduler_state, state.history)
        # The scheduler is a plugin: its indices are checked, never trusted. An index out of
        # range (JAX would clamp it to a real candidate) means "no winner: keep current".
        select_ok = (selected >= 0) & (selected < K)
        winner = jnp.where(select_ok, selected, 0).astype(jnp.int32)
        winner_valid = valid[winner] & select_ok
        if self.mesh is None:
            winner_params = tree_index(candidates, winner)
        else:
            winner_params = pick(winner)

        # adapt: decide among winner, current, stable
        trio = tree_stack([winner_params, state.current, state.stable])
        scores_d = self._assess(trio, static, _sample(data.decide, k_decide, self.decide_size))
        winner_valid = winner_valid & jnp.all(jnp.isfinite(scores_d[:, WINNER]))
        decision, sstate = self.scheduler.decide(
            scores_d, winner_valid, state.scheduler_state, state.history
        )
        # Safety net independent of the scheduler: an invalid winner is never taken, and a
        # choice that is none of WINNER, CURRENT, STABLE keeps the current model.
        choice_ok = (decision.choice >= 0) & (decision.choice <= 2)
        choice = jnp.where(
            ((decision.choice == WINNER) & ~winner_valid) | ~choice_ok, CURRENT, decision.choice
        ).astype(jnp.int32)
        update_stable = decision.update_stable & winner_valid & choice_ok
        significant = decision.significant & winner_valid & choice_ok
        bad_indices = (~select_ok).astype(jnp.int32) + (~choice_ok).astype(jnp.int32)
        new_current = tree_index(trio, choice)
        new_stable = tree_where(update_stable, winner_params, state.stable)
        accepted = choice == WINNER

        offset = 0
        new_pstates = []
        for p, ps in zip(self.proposers, pstates):
            local = winner - offset
            mine = accepted & (local >= 0) & (local < p.num_candidates)
            outcome = Outcome(
                accepted_index=jnp.where(mine, local, -1).astype(jnp.int32),
                accepted=accepted,
                significant=significant,
                params=new_current,
                changed=choice != CURRENT,
            )
            new_pstates.append(p.adapt(ps, outcome))
            offset += p.num_candidates

        decide_mean = self._summaries(scores_d)
        history = state.history.record(
            step=state.step,
            winner=winner,
            choice=choice,
            accepted=accepted,
            significant=significant,
            score=decide_mean[:, choice],
        )
        new_state = State(
            step=state.step + 1,
            key=key,
            current=new_current,
            stable=new_stable,
            proposer_states=tuple(new_pstates),
            scheduler_state=sstate,
            history=history,
            static=static,
        )
        if self.mesh is not None:  # the same layout every step: no re-compile, no drift
            new_state = constrain(new_state, self.mesh, state_specs(new_state, self.mesh))
        info = StepInfo(
            step=state.step,
            winner=winner,
            choice=choice,
            accepted=accepted,
            rolled_back=choice == STABLE,
            significant=significant,
            num_invalid=jnp.sum(~valid).astype(jnp.int32),
            valid=valid,
            assess_mean=self._summaries(scores_a),
            decide_mean=decide_mean,
            decide_lower=decision.lower,
            decide_upper=decision.upper,
            priorities=decision.priorities,
            bad_indices=bad_indices,
        )
        return new_state, info

    @eqx.filter_jit
    def step(self, state: State, data: Data) -> tuple[State, StepInfo]:
        """One EV3 iteration, compiled (see `step_pure`).

        **Returns:** `(new_state, info)`; `info` is a `StepInfo` of device arrays.
        """
        return self.step_pure(state, data)

    def scan_pure(self, state: State, data: Data, num_steps: int) -> tuple[State, StepInfo]:
        """`num_steps` iterations in one `lax.scan`, un-jitted."""

        def body(s, _):
            return self.step_pure(s, data)

        return jax.lax.scan(body, state, None, length=num_steps)

    @eqx.filter_jit
    def scan(self, state: State, data: Data, num_steps: int) -> tuple[State, StepInfo]:
        """`num_steps` iterations in one compiled `lax.scan` (data must live on the device).

        **Returns:** `(new_state, infos)` where every leaf of `infos` has a leading axis of
        size `num_steps`.
        """
        return self.scan_pure(state, data, num_steps)

    def step_donated(self, state: State, data: Data) -> tuple[State, StepInfo]:
        """`step` that reuses the buffers of `state` for the new state (`donate`).

        Saves one copy of the whole state per step (parameters, per-candidate optimizer
        states, history). `state` must not be used afterwards: its arrays are deleted. Use
        `step` when you keep old states (comparisons, your own checkpoints).
        """
        return _step_donated((self, data), state)

    def scan_donated(self, state: State, data: Data, num_steps: int) -> tuple[State, StepInfo]:
        """`scan` that reuses the buffers of `state` (see `step_donated`)."""
        return _scan_donated((self, data, num_steps), state)


@functools.partial(eqx.filter_jit, donate="all-except-first")
def _step_donated(engine_data: tuple[Engine, Data], state: State) -> tuple[State, StepInfo]:
    engine, data = engine_data
    return engine.step_pure(state, data)


@functools.partial(eqx.filter_jit, donate="all-except-first")
def _scan_donated(engine_data: tuple[Engine, Data, int], state: State) -> tuple[State, StepInfo]:
    engine, data, num_steps = engine_data
    return engine.scan_pure(state, data, num_steps)
