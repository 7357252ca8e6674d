"""The kit's machinery: the check names, the error, the `_Checker` that runs the selected
checks of one component and words the failures, and the comparisons every stage shares."""

from __future__ import annotations

import dataclasses
import functools
import inspect
import tempfile
from collections.abc import Callable, Sequence
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from .._adapt.bounds import AbstractBound
from .._adapt.priorities import AbstractPriority
from .._host.ckpt_io import load_checkpoint, save_checkpoint
from .._interfaces import AbstractAssessor, AbstractLoss, AbstractProposer, AbstractScheduler
from .._types import History, State, same_structure

#: Every check's name, in the order they run.
CHECKS = (
    "structure",
    "jit",
    "vmap",
    "pure",
    "no_recompile",
    "convention",
    "checkpoint",
    "nonfinite",
    "dtype",
)
#: The component kinds the kit checks, with their base classes.
KINDS: dict[str, type] = {
    "proposer": AbstractProposer,
    "assessor": AbstractAssessor,
    "scheduler": AbstractScheduler,
    "loss": AbstractLoss,
    "bound": AbstractBound,
    "priority": AbstractPriority,
}


class ConformanceError(AssertionError):
    """A component broke the engine's contract; the message says which check, what and how
    to fix it."""


class NotApplicableError(ValueError):
    """A check asked for explicitly (`checks=(...)`) does not apply to the component; the
    message says why."""


class Report(tuple):
    """What a check function returns: the names of the checks that ran (a tuple, in the
    order they ran) and, in `not_applicable`, every other check of `CHECKS` with the reason
    it does not apply to this component. A default run checks everything that applies;
    nothing is skipped without a reason."""

    not_applicable: dict[str, str]

    def __new__(cls, ran: Sequence[str], not_applicable: dict[str, str]) -> Report:
        self = super().__new__(cls, ran)
        self.not_applicable = dict(not_applicable)
        return self

    def __repr__(self) -> str:
        return f"Report(ran={tuple(self)!r}, not_applicable={self.not_applicable!r})"


# --------------------------------------------------------------------------- helpers
def _who(component: Any, kind: str) -> str:
    cls = type(component)
    return f"{kind} {cls.__module__}.{cls.__qualname__}"


class _Checker:
    """Runs the selected checks of one component, words the failures and records why the
    checks that do not apply were not run."""

    def __init__(
        self,
        component: Any,
        kind: str,
        checks: Sequence[str] | None,
        not_applicable: dict[str, str] | None = None,
    ):
        self.component = component
        self.who = _who(component, kind)
        self.explicit = checks is not None
        selected = CHECKS if checks is None else tuple(checks)
        unknown = [c for c in selected if c not in CHECKS]
        if unknown:
            raise ValueError(f"Unknown conformance check(s) {unknown}; the checks are {CHECKS}.")
        self.selected = selected
        self.ran: list[str] = []
        self.skipped: dict[str, str] = {}
        for check, why in (not_applicable or {}).items():
            self.not_applicable(check, why)
        if "no_recompile" in selected:  # a static check: fail fast, before any compile
            self._static_floats()

    def _static_floats(self) -> None:
        found = _float_hyperparameters(self.component)
        fields = [p for p in found if "<closure" not in p]
        if fields:
            self.fail(
                "no_recompile",
                f"the field(s) {fields} hold Python floats, which `jit` treats as "
                "compile-time constants: changing one recompiles the step",
                "store numeric hyperparameters as array leaves, e.g. "
                "`scale: Float[Array, ''] = eqx.field(converter=jnp.asarray)`; keep "
                "`eqx.field(static=True)` for sizes and choices",
            )
        if found:
            self.fail(
                "no_recompile",
                f"functions it holds capture Python floats in their closures ({found}): "
                "compile-time constants, so a new value recompiles the step, and a function "
                "built again from equal settings is a new closure, which re-traces it too (an "
                "optax optimizer such as `optax.sgd(0.1)` captures its learning rate so)",
                "hold the numbers as array leaves and the function as a module-level factory "
                "(for optax: the factory and its hyperparameters, applied through "
                "`optax.inject_hyperparams`)",
            )

    def wants(self, check: str) -> bool:
        if check in self.selected and check not in self.skipped:
            if check not in self.ran:
                self.ran.append(check)
            return True
        return False

    def not_applicable(self, check: str, why: str) -> None:
        """Record that `check` does not apply; asked for explicitly, that is an error."""
        if check in self.ran:
            self.ran.remove(check)
        if self.explicit and check in self.selected:
            raise NotApplicableError(
                f"The {check!r} check does not apply to {self.who}: {why}. Fix: leave it out "
                "of `checks=`."
            )
        self.skipped[check] = why

    def report(self) -> Report:
        """The checks that ran; every selected check either ran or says why it did not."""
        silent = [c for c in self.selected if c not in self.ran and c not in self.skipped]
        if silent:  # a kit bug: never let a check pass without running
            raise AssertionError(f"conformance kit: {silent} neither ran nor gave a reason")
        skipped = {c: w for c, w in self.skipped.items() if c in self.selected}
        return Report([c for c in CHECKS if c in self.ran], skipped)

    def fail(self, check: str, what: str, fix: str) -> None:
        raise ConformanceError(f"{self.who} failed the {check!r} check: {what}. Fix: {fix}")

    def run(self, check: str, what: str, fn: Callable[..., Any], *args: Any) -> Any:
        """Call `fn(*args)`; an exception becomes a `ConformanceError` of `check`."""
        if check in self.selected and check not in self.ran:
            self.ran.append(check)
        try:
            return fn(*args)
        except ConformanceError:
            raise
        except Exception as exc:  # noqa: BLE001 - reported with the component's name
            msg = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            fix = {
                "jit": "use only jax operations on array arguments (no Python `if`, `float()` "
                "or `.item()` on traced values; use `jnp.where`, `lax.cond`, `eqx.error_if`)",
                "vmap": "avoid operations that assume unbatched inputs (in-place NumPy, "
                "`.item()`, host callbacks) so the component can be `jax.vmap`ped",
            }.get(check, "make it run on the documented inputs (see ev3core._interfaces)")
            raise ConformanceError(
                f"{self.who} failed the {check!r} check: {what} raised "
                f"{type(exc).__name__}: {msg}. Fix: {fix}"
            ) from exc


def _host(tree: Any) -> list[np.ndarray]:
    """Every array leaf as host bytes (typed PRNG keys as their key data)."""
    out = []
    for x in jax.tree.leaves(tree):
        if isinstance(x, jax.Array) and jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
            x = jax.random.key_data(x)
        if isinstance(x, (jax.Array, np.ndarray, np.generic, int, float, bool)):
            out.append(np.asarray(x))
    return out


def _row(tree: Any, i: int) -> list[np.ndarray]:
    """Row `i` of every array leaf, as `_host` gives them (indexed on the host: indexing on
    the device would compile a program per leaf shape)."""
    return [np.asarray(x[i]) for x in _host(tree)]


def _identical(a: Any, b: Any) -> bool:
    """Same structure and bit-identical leaves (NaNs in the same places count as equal)."""
    if not same_structure(a, b):
        return False
    ha, hb = _host(a), _host(b)
    return len(ha) == len(hb) and all(
        x.shape == y.shape and x.dtype == y.dtype and x.tobytes() == y.tobytes()
        for x, y in zip(ha, hb)
    )


def _close(a: Any, b: Any, rtol: float = 1e-4, atol: float = 1e-5) -> bool:
    ha, hb = _host(a), _host(b)
    return len(ha) == len(hb) and all(
        x.shape == y.shape
        and (
            np.array_equal(x, y, equal_nan=True)
            if not np.issubdtype(x.dtype, np.inexact)
            else np.allclose(x, y, rtol=rtol, atol=atol, equal_nan=True)
        )
        for x, y in zip(ha, hb)
    )


def _signature(tree: Any) -> tuple[Any, list[tuple[tuple[int, ...], str]]]:
    leaves = jax.tree.leaves(tree)
    return jax.tree.structure(tree), [
        (tuple(jnp.shape(x)), str(jnp.result_type(x))) for x in leaves
    ]


def _same_trace(fn: Callable[..., Any], *args: Any) -> bool:
    """Whether tracing `fn(*args)` twice gives the same program and constants: a Python-side
    counter, a host RNG or any state read during the call changes one of them."""
    a = eqx.filter_make_jaxpr(fn)(*args)[0]
    b = eqx.filter_make_jaxpr(fn)(*args)[0]
    return str(a.jaxpr) == str(b.jaxpr) and _identical(list(a.consts), list(b.consts))


def _check_pure(
    chk: _Checker, what: str, fn: Callable[..., Any], args: tuple, again: Any, first: Any, fix: str
) -> None:
    """`fn(*args)` traces to the same program twice, and `again()` (a second compiled call
    with the same inputs) is bit-identical to `first`."""
    same = chk.run("pure", f"tracing {what}", _same_trace, fn, *args)
    if not (same and _identical(chk.run("pure", what, again), first)):
        chk.fail(
            "pure",
            f"two calls of {what} with the same inputs gave different programs or results",
            fix,
        )


def _check_roundtrip(
    chk: _Checker,
    params: Any,
    static: Any,
    *,
    before: tuple[tuple[Any, ...], Any],
    after: tuple[tuple[Any, ...], Any],
    num_objectives: int = 1,
) -> None:
    """Component states (`(proposer_states, scheduler_state)`) inside an engine `State`
    survive `save_checkpoint` / `load_checkpoint` bit for bit: `after` is saved and loaded
    with `like=` the state built from `before` (what `init` returned)."""
    if not chk.wants("checkpoint"):
        return

    def state(parts: tuple[tuple[Any, ...], Any]) -> State:
        return State(
            step=jnp.zeros((), jnp.int32),
            key=jax.random.key(0),
            current=params,
            stable=params,
            proposer_states=parts[0],
            scheduler_state=parts[1],
            history=History.empty(4, num_objectives),
            static=static,
        )

    saved, like = state(after), state(before)
    with tempfile.TemporaryDirectory() as tmp:
        chk.run(
            "checkpoint",
            "save_checkpoint of a state holding its state",
            save_checkpoint,
            tmp,
            saved,
        )
        restored, _ = chk.run(
            "checkpoint",
            "load_checkpoint of a state holding its state (like= the state init returned)",
            lambda: load_checkpoint(tmp, like=like),
        )
    if not _identical(restored, saved):
        chk.fail(
            "checkpoint",
            "its state after a step is not the same after save_checkpoint / load_checkpoint "
            "(checkpoints store array leaves only: state kept in static fields or Python "
            "objects, or a state whose structure changes between steps, is lost)",
            "keep all state in array leaves of a pytree whose structure never changes (the "
            "structure `init` returns)",
        )


def _float_hyperparameters(component: Any, prefix: str = "") -> list[str]:
    """Paths of Python floats held by the component: in its fields, or captured inside the
    closures of functions it holds (an optax optimizer captures its learning rate so). `jit`
    treats them as compile-time constants, so changing one recompiles, and a function
    rebuilt from equal settings is a new closure, which re-traces too."""
    found: list[str] = []
    _walk(component, prefix.rstrip("."), found, set(), 0)
    return found


def _walk(value: Any, path: str, found: list[str], seen: set[int], depth: int) -> None:
    if id(value) in seen or depth > 12:
        return
    seen.add(id(value))
    if isinstance(value, float):
        found.append(path)
    elif isinstance(value, eqx.Module):
        for f in dataclasses.fields(value):
            sub = getattr(value, f.name, None)
            _walk(sub, f"{path}.{f.name}" if path else f.name, found, seen, depth + 1)
    elif isinstance(value, tuple) and hasattr(value, "_fields"):  # NamedTuple (optax)
        for name, sub in zip(value._fields, value):
            _walk(sub, f"{path}.{name}", found, seen, depth + 1)
    elif isinstance(value, (tuple, list)):
        for i, sub in enumerate(value):
            _walk(sub, f"{path}[{i}]", found, seen, depth + 1)
    elif isinstance(value, dict):
        for k, sub in value.items():
            _walk(sub, f"{path}[{k!r}]", found, seen, depth + 1)
    elif inspect.isfunction(value) and value.__closure__:
        names = value.__code__.co_freevars
        for name, cell in zip(names, value.__closure__):
            try:
                sub = cell.cell_contents
            except ValueError:  # an empty cell
                continue
            if isinstance(sub, float) or inspect.isfunction(sub) or isinstance(sub, tuple):
                _walk(sub, f"{path}<closure {name}>", found, seen, depth + 1)


def _perturbed(component: Any) -> Any | None:
    """The component with every inexact array leaf halved, or `None` if it has none."""
    dyn, static = eqx.partition(component, eqx.is_inexact_array)
    if not jax.tree.leaves(dyn):
        return None
    return eqx.combine(jax.tree.map(lambda x: x * 0.5, dyn), static)  # keeps weak types


# The kit checks what a program computes, not how fast: its own programs are compiled with
# XLA's cheapest backend settings, which cuts compile time (most of a check's time) about
# threefold on CPU. Results are compared with a tolerance where compilers may differ.
_FAST_COMPILE = {
    "xla_backend_optimization_level": 0,
    "xla_llvm_disable_expensive_passes": True,
}
# On CPU, XLA's classic fusion emitters compile a small program about twice as fast as its
# newer ones; XLA versions without the switch reject it, so it is used only where accepted.
_CLASSIC_EMITTERS = {"xla_cpu_use_fusion_emitters": False}
_HAS_COMPILER_OPTIONS = "compiler_options" in inspect.signature(jax.jit).parameters


@functools.cache
def _compiler_options() -> dict[str, Any]:
    """`_FAST_COMPILE`, with `_CLASSIC_EMITTERS` where this XLA accepts them."""
    options = {**_FAST_COMPILE, **_CLASSIC_EMITTERS}
    try:
        jax.jit(lambda x: x + 1, compiler_options=options).lower(np.float32(0)).compile()
    except Exception:  # noqa: BLE001 - an XLA without the switch: the fast settings alone
        return dict(_FAST_COMPILE)
    return options


class _Static:
    """Hashable, equality-compared holder of a pytree's non-array part (as `eqx.filter_jit`)."""

    def __init__(self, tree: Any):
        self.leaves, self.treedef = jax.tree.flatten(tree)

    def __hash__(self) -> int:
        return hash((self.treedef, tuple(map(_hashable, self.leaves))))

    def __eq__(self, other: Any) -> bool:
        return (
            isinstance(other, _Static)
            and bool(self.treedef == other.treedef)  # type: ignore[operator]
            and len(self.leaves) == len(other.leaves)
            and all(_same(a, b) for a, b in zip(self.leaves, other.leaves))
        )

    def tree(self) -> Any:
        return jax.tree.unflatten(self.treedef, self.leaves)


def _hashable(x: Any) -> Any:
    try:
        hash(x)
        return x
    except TypeError:
        return id(x)


def _same(a: Any, b: Any) -> bool:
    try:
        return bool(a == b)
    except Exception:  # noqa: BLE001 - e.g. NumPy arrays compare element-wise
        return a is b


def _filter_jit(fn: Callable[..., Any]) -> Callable[..., Any]:
    """`eqx.filter_jit(fn)` (array leaves traced, the rest static), compiled cheaply."""
    if not _HAS_COMPILER_OPTIONS:
        return eqx.filter_jit(fn)
    out_static: list[Any] = []

    def inner(dyn: Any, static: _Static) -> Any:
        out = fn(*eqx.combine(dyn, static.tree()))
        odyn, ostatic = eqx.partition(out, eqx.is_array)
        out_static.append(ostatic)
        return odyn

    jitted = jax.jit(inner, static_argnums=1, compiler_options=_compiler_options())

    def call(*args: Any) -> Any:
        dyn, static = eqx.partition(args, eqx.is_array)
        odyn = jitted(dyn, _Static(static))
        return eqx.combine(odyn, out_static[-1])

    return call


def _counted_jit(fn: Callable[..., Any]) -> tuple[Callable[..., Any], list[int]]:
    """`_filter_jit(fn)` and a counter of how many times it was traced."""
    count = [0]

    def traced(*args: Any) -> Any:
        count[0] += 1
        return fn(*args)

    return _filter_jit(traced), count


def _check_no_recompile(
    chk: _Checker,
    call: Callable[[Any], Any],
    count: list[int],
    variants: Sequence[Any],
    rebuilt: Sequence[Any] = (),
) -> None:
    """`call(component)` was traced once; calling it on an equal, freshly built instance
    (`rebuilt`) or on a variant with changed array hyperparameters must not re-trace."""
    if not variants and not rebuilt:
        chk.not_applicable(
            "no_recompile",
            "it has no inexact array leaves to change and no rebuild was given (pass "
            "`variants=` with other hyperparameter values, or `rebuild=` a function that "
            "builds it again from the same settings)",
        )
        return
    if not chk.wants("no_recompile"):
        return
    for r in rebuilt:
        before = count[0]
        chk.run("no_recompile", "calling it rebuilt from the same settings", call, r)
        if count[0] > before:
            chk.fail(
                "no_recompile",
                "an instance built again from the same settings re-traced the compiled "
                f"function {count[0] - before} more time(s): a static field or a function it "
                "holds differs between builds (an optax optimizer is a new closure every "
                "time, with its learning rate captured as a constant)",
                "keep numbers as array leaves and structure as static values that compare "
                "equal across builds (a module-level factory, not a closure; for optax, "
                "`optax.inject_hyperparams`)",
            )
    before = count[0]
    for v in variants:
        chk.run("no_recompile", "calling it with changed hyperparameters", call, v)
    if count[0] > before:
        same_tree = all(same_structure(v, chk.component) for v in variants)
        why = (
            "an array leaf changed shape, dtype or weak type"
            if same_tree
            else "its static (non-array) part differs between the variants"
        )
        chk.fail(
            "no_recompile",
            f"changing its hyperparameters re-traced the compiled function "
            f"{count[0] - before} more time(s) ({why})",
            "numeric hyperparameters must be array leaves (`jnp.asarray`, not "
            "`eqx.field(static=True)` or Python numbers) with fixed shapes and dtypes",
        )


def _rebuilt(rebuild: Callable[[], Any] | None) -> list[Any]:
    return [] if rebuild is None else [rebuild()]


def _default_variants(component: Any, variants: Sequence[Any] | None) -> list[Any]:
    if variants is not None:
        return list(variants)
    v = _perturbed(component)
    return [] if v is None else [v]
