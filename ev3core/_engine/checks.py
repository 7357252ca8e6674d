"""Host-side checks of an engine's components and data, before anything is compiled."""

from __future__ import annotations

from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import PyTree

from .._faults import component_owner, describe_component
from .._interfaces import AbstractAssessor, AbstractProposer, AbstractScheduler, ComponentName
from .._types import Data, State, same_structure
from ..errors import ComponentError, ConfigurationError, EV3Error
from .memo import memo

_STREAMS = ("propose", "assess", "decide")
#: At most this many state / data signatures are remembered per engine as checked.
_MAX_CHECKED = 64


def _describe_stream(stream: PyTree[Any]) -> str:
    leaves = jax.tree.leaves(stream)
    return ", ".join(f"{jnp.result_type(x)}{list(jnp.shape(x))}" for x in leaves)


def check_stream(name: str, stream: PyTree[Any]) -> int:
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
    assert n is not None  # checked above
    if n == 0:
        raise ConfigurationError(f"Data.{name} has zero examples; pass at least one example.")
    return n


def _check_resolved(component: Any, what: str) -> None:
    is_name = lambda x: isinstance(x, ComponentName)  # noqa: E731
    names = [x for x in jax.tree.leaves(component, is_leaf=is_name) if is_name(x)]
    if names:
        raise ConfigurationError(
            f"{what} holds the registered name of a {names[0]}, which only a pipeline "
            "resolves: build the engine with ev3core.Pipeline(...).build(), or pass an "
            f"instance (ev3core.make({names[0].kind!r}, {names[0].name!r}))."
        )


def check_components(
    proposers: tuple[AbstractProposer, ...],
    assessors: tuple[AbstractAssessor, ...],
    scheduler: AbstractScheduler,
    assess_size: int,
    decide_size: int,
    chunk_size: int | None,
) -> None:
    """The components and sizes an `Engine` is built from, before it binds anything."""
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
    for label, size in (("assess_size", assess_size), ("decide_size", decide_size)):
        if int(size) < 2:
            raise ConfigurationError(
                f"{label}={size}: at least 2 examples are needed to estimate a standard "
                f"error. Use a larger {label} (the smoke experiment uses 128 and 2048)."
            )
    for kind, group in (("proposer", proposers), ("assessor", assessors)):
        for i, c in enumerate(group):
            _check_resolved(c, f"{kind} #{i} ({type(c).__name__})")
    _check_resolved(scheduler, f"the scheduler ({type(scheduler).__name__})")
    if chunk_size is not None and int(chunk_size) < 1:
        raise ConfigurationError(
            f"chunk_size={chunk_size}: assess at least one candidate at a time (a positive "
            "integer), or pass chunk_size=None to assess all candidates at once."
        )


def _concrete(tree: PyTree[Any]) -> bool:
    return not any(isinstance(x, jax.core.Tracer) for x in jax.tree.leaves(tree))


def check_finite_stream(name: str, stream: PyTree[Any], n: int) -> None:
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


def check_labels(name: str, stream: PyTree[Any], model: Any) -> None:
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
    """The leaves where two trees of arrays differ, as `path: expected ..., got ...`."""

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


def _component_error(cls: type[EV3Error], owner: tuple[str, int, Any], message: str) -> EV3Error:
    """An error about a component, starting with its description; `ev3core.run` adds the
    plugin that registered it (`_faults.name_plugin`), which this layer cannot look up."""
    err = cls(f"{describe_component(*owner)} {message}")
    err.component = owner  # type: ignore[attr-defined]
    return err


def check_data(engine: Any, data: Data, state: State | None = None) -> None:
    """Raise `ConfigurationError` if `data` cannot feed `engine` (host side, no compile).

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
    sizes = {name: check_stream(name, getattr(data, name)) for name in _STREAMS}
    if _concrete(data):
        for name in _STREAMS:
            check_finite_stream(name, getattr(data, name), sizes[name])
            if isinstance(state, State) and _concrete(state.current):
                check_labels(name, getattr(data, name), state.model)
    for name, label, size in (
        ("assess", "assess_size", engine.assess_size),
        ("decide", "decide_size", engine.decide_size),
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
        # The abstract check depends only on structures, shapes and dtypes. Signatures that
        # passed are remembered beside the engine (an engine is immutable) and dropped with it.
        try:
            key = (
                jax.tree.structure(state),
                jax.tree.structure(data),
                tuple((jnp.shape(x), jnp.result_type(x)) for x in jax.tree.leaves((state, data))),
            )
            hash(key)
        except TypeError:
            key = None
        checked: set[Any] = memo(engine).setdefault("checked", set())
        if key is None or key not in checked:
            _check_against_state(engine, data, state)
            if key is not None:
                if len(checked) >= _MAX_CHECKED:
                    checked.clear()
                checked.add(key)


def _check_against_state(engine: Any, data: Data, state: State) -> None:
    """The state is this engine's, and every assessor and proposer runs (abstractly) on the
    data's shapes."""
    if not isinstance(state, State):
        raise ConfigurationError(
            f"Expected an ev3core.State from engine.init(model, key), got {type(state).__name__}."
        )
    if len(state.proposer_states) != len(engine.proposers):
        raise ConfigurationError(
            f"The state has {len(state.proposer_states)} proposer state(s) but the engine "
            f"has {len(engine.proposers)} proposer(s): it was made by another pipeline. Build "
            "it with this engine's init(model, key)."
        )
    if state.history.score.shape[-1] != len(engine.assessors):
        raise ConfigurationError(
            f"The state records {state.history.score.shape[-1]} objective(s) but the engine "
            f"has {len(engine.assessors)} assessor(s) {list(engine.objective_names)}: it was made "
            "by another pipeline. Build it with this engine's init(model, key)."
        )
    _check_assessors(engine, data, state)
    _check_proposers(engine, data, state)


def _attempt(
    engine: Any, data: Data, state: State, what: str, stream: str, fn: Any, *args: Any
) -> Any:
    """`fn(*args)` evaluated abstractly; a failure names the component or the data."""
    try:
        return eqx.filter_eval_shape(fn, *args)
    except EV3Error:
        raise
    except Exception as exc:
        inner = component_owner(engine, exc, innermost=True)
        if inner is not None:
            # The component's own code raised while being traced (for instance a
            # TypeError from a scan whose carry changes dtype): name the component, not
            # the data. `run` adds the plugin that registered it.
            owner = component_owner(engine, exc) or inner
            raise _component_error(
                ComponentError,
                owner,
                f"raised {type(exc).__name__}: {str(exc).strip()[:800]} (while being "
                f"traced on Data.{stream}, {_describe_stream(getattr(data, stream))}). "
                "The run was stopped before this step changed the state (checkpoints "
                "already written are intact). Fix the component or remove it from the "
                "pipeline.",
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


def _check_assessors(engine: Any, data: Data, state: State) -> None:
    model = state.model
    for name, size in (("assess", engine.assess_size), ("decide", engine.decide_size)):
        batch = jax.tree.map(
            lambda a, n=size: jax.ShapeDtypeStruct(
                (n,) + tuple(jnp.shape(a))[1:], jnp.result_type(a)
            ),
            getattr(data, name),
        )
        for i, a in enumerate(engine.assessors):
            what = f"assessor #{i} {a.name!r} ({type(a).__qualname__})"
            out = _attempt(engine, data, state, what, name, a, model, batch)
            shape = getattr(out, "shape", None)
            if shape != (size,):
                raise ConfigurationError(
                    f"{what} returned shape {shape} for a batch of {size} {name} examples. "
                    f"An assessor returns one score per example: shape ({size},)."
                )


def _check_proposers(engine: Any, data: Data, state: State) -> None:
    for i, (p, ps) in enumerate(zip(engine.proposers, state.proposer_states)):
        what = f"proposer #{i} ({type(p).__qualname__})"
        cands, new_ps = _attempt(
            engine,
            data,
            state,
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
        same = same_structure(want, got)
        if not same or jax.tree.leaves(
            want, is_leaf=lambda x: isinstance(x, tuple)
        ) != jax.tree.leaves(got, is_leaf=lambda x: isinstance(x, tuple)):
            expected = jax.tree.map(
                lambda x, k=p.num_candidates: jax.ShapeDtypeStruct((k, *x.shape), x.dtype),
                state.current,
            )
            raise _component_error(
                ConfigurationError,
                ("proposer", i, p),
                f"returned candidates that are not the parameters stacked {p.num_candidates} "
                f"times: {_leaf_differences(expected, cands)}. A proposer returns full "
                "parameters with a leading candidate axis of size num_candidates.",
            )
        sig = lambda t: [(tuple(jnp.shape(x)), jnp.result_type(x)) for x in jax.tree.leaves(t)]
        same = same_structure(new_ps, ps)
        if not same or sig(new_ps) != sig(ps):
            raise ConfigurationError(
                f"{what} returned a state whose structure, shapes or dtypes differ from the "
                "state it was given, so the step could not be scanned or would re-compile "
                "every step. Return a state of the same structure from propose()."
            )
