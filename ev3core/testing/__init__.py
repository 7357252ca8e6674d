"""The conformance kit: checks that any proposer, assessor, scheduler, loss, bound or
priority keeps the engine's contract.

Modelled on optax's shared optimizer tests: one call per component runs every check and
raises `ConformanceError` (an `AssertionError`, so pytest reports it as a failure) naming the
component, the check that failed, what was wrong and how to fix it.

```python
import ev3core.testing as et

et.check(MyProposer(scale=0.1))                   # any component: dispatches on its kind
et.check_assessor(MyScore(), problem=my_problem)  # with your own model and data
```

The checks (pass `checks=(...)` to run a subset):

- `"structure"`: shapes and conventions (per-example scores of shape `(n,)`; candidates are
  the parameters stacked `num_candidates` times; states keep their structure, shapes and
  dtypes; decisions and priorities have the documented shapes).
- `"jit"`, `"vmap"`: it runs under `jax.jit` and under `jax.vmap`, with the same results.
- `"pure"`: the same inputs and key give bit-identical results, run after run (no Python-side
  counters, global RNGs or host state); a proposer also gives different candidates for a
  different key (pass `uses_key=False` for a deterministic one).
- `"no_recompile"`: changing its numeric hyperparameters (its inexact array leaves, or the
  `variants` you pass) reuses the compiled program; no hyperparameter is a Python float.
- `"convention"`: higher is better (an assessor scores the problem's good model above its
  bad model; a scheduler prefers and accepts clearly better models; a loss is lower for the
  good model).
- `"checkpoint"`: an engine `State` holding the component's state (after a step) survives
  `save_checkpoint` / `load_checkpoint` bit for bit, loaded with `like=` the state `init`
  returned.
- `"nonfinite"`: a proposer runs in a real `Engine` next to a proposer of NaN and Inf
  candidates and on NaN examples, and no non-finite candidate is ever accepted
  (`check_engine` does this for several components in one engine); a scheduler never selects
  or accepts an invalid candidate.

Registered components are checked with `check_registered(kind, name)` or, for a whole plugin
set, by parametrising a test over `registered_examples()`. A component whose constructor
needs arguments is given example instances by its plugin through the
`ev3_conformance_examples` hook (see `docs/writing-plugins.md`).
"""

from __future__ import annotations

import dataclasses
import tempfile
from collections.abc import Callable, Sequence
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax

from .._adapt.bounds import AbstractBound, advantage, weighted_mean
from .._adapt.priorities import AbstractPriority, Feedback
from .._adapt.schedulers import AlwaysAccept, EV3Scheduler
from .._assess.metrics import AbstractBatchAssessor
from .._assess.scores import NegCrossEntropy
from .._engine.engine import Engine
from .._explore.gradient import GradientProposer
from .._host.checkpoint import load_checkpoint, save_checkpoint
from .._interfaces import AbstractAssessor, AbstractLoss, AbstractProposer, AbstractScheduler
from .._plugins.manager import plugin_manager
from .._types import WINNER, Data, History, Outcome, State, split_model
from . import _examples
from ._example import Example as Example

__all__ = [
    "CHECKS",
    "KINDS",
    "ConformanceError",
    "Example",
    "Problem",
    "check",
    "check_assessor",
    "check_bound",
    "check_engine",
    "check_example",
    "check_loss",
    "check_priority",
    "check_proposer",
    "check_registered",
    "check_scheduler",
    "default_problem",
    "examples",
    "registered_examples",
]

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


# --------------------------------------------------------------------------- the problem
class _Linear(eqx.Module):
    weight: jax.Array

    def __call__(self, x: jax.Array) -> jax.Array:
        return x @ self.weight


@dataclasses.dataclass(frozen=True)
class Problem:
    """A model, data and reference models to check components on.

    **Arguments:**

    - `model`: an Equinox model called on one example (its array leaves are the parameters).
    - `data`: an `ev3core.Data` whose streams fit `model`.
    - `good_model`, `bad_model`: two models of the same task, the first clearly better (used
      by the `"convention"` checks of assessors and losses; `None` skips those).
    - `assessors`: assessors that can score `model` on `data`, for the engine-level checks of
      proposers and schedulers (a scheduler with `num_objectives=m` uses the first `m`).
    """

    model: Any
    data: Data
    good_model: Any = None
    bad_model: Any = None
    assessors: tuple[Any, ...] = ()


def default_problem(
    seed: int = 0, *, num_features: int = 16, num_classes: int = 4, num_examples: int = 256
) -> Problem:
    """A small synthetic classification problem: features `x ~ N(0, I)`, label
    `argmax(x @ W)` for a fixed random `W`, and a one-hidden-layer MLP (width 16).

    The streams are `(x, y)` pairs of `num_examples` examples each. The good model is the
    exact linear rule (scaled, so it is confident and right), the bad model its negation
    (confident and always wrong). The assessors are negative cross-entropy and accuracy.
    """
    kw, km, kp, ka, kd = jax.random.split(jax.random.key(seed), 5)
    w = jax.random.normal(kw, (num_features, num_classes), jnp.float32)

    def draw(k: Any) -> tuple[jax.Array, jax.Array]:
        x = jax.random.normal(k, (num_examples, num_features), jnp.float32)
        return x, jnp.argmax(x @ w, axis=-1).astype(jnp.int32)

    from .._assess.scores import Accuracy

    return Problem(
        model=eqx.nn.MLP(num_features, num_classes, 16, 1, key=km),
        data=Data(propose=draw(kp), assess=draw(ka), decide=draw(kd)),
        good_model=_Linear(w * 10.0),
        bad_model=_Linear(w * -10.0),
        assessors=(NegCrossEntropy(), Accuracy()),
    )


_DEFAULT_PROBLEM: Problem | None = None


def _problem(problem: Problem | None) -> Problem:
    global _DEFAULT_PROBLEM
    if problem is not None:
        return problem
    if _DEFAULT_PROBLEM is None:
        _DEFAULT_PROBLEM = default_problem()
    return _DEFAULT_PROBLEM


# --------------------------------------------------------------------------- helpers
def _who(component: Any, kind: str) -> str:
    cls = type(component)
    return f"{kind} {cls.__module__}.{cls.__qualname__}"


class _Checker:
    """Runs the selected checks of one component and words the failures."""

    def __init__(self, component: Any, kind: str, checks: Sequence[str] | None):
        self.component = component
        self.who = _who(component, kind)
        selected = CHECKS if checks is None else tuple(checks)
        unknown = [c for c in selected if c not in CHECKS]
        if unknown:
            raise ValueError(f"Unknown conformance check(s) {unknown}; the checks are {CHECKS}.")
        self.selected = selected
        self.ran: list[str] = []
        if "no_recompile" in selected:  # a static check: fail fast, before any compile
            floats = _float_hyperparameters(component)
            if floats:
                self.fail(
                    "no_recompile",
                    f"the field(s) {floats} hold Python floats, which `jit` treats as "
                    "compile-time constants: changing one recompiles the step",
                    "store numeric hyperparameters as array leaves, e.g. "
                    "`scale: Float[Array, ''] = eqx.field(converter=jnp.asarray)`; keep "
                    "`eqx.field(static=True)` for sizes and choices",
                )

    def wants(self, check: str) -> bool:
        if check in self.selected:
            if check not in self.ran:
                self.ran.append(check)
            return True
        return False

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


def _identical(a: Any, b: Any) -> bool:
    """Same structure and bit-identical leaves (NaNs in the same places count as equal)."""
    if jax.tree.structure(a) != jax.tree.structure(b):
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
    """Paths of Python-float fields: static to `jit`, so changing one recompiles."""
    found: list[str] = []
    if isinstance(component, eqx.Module):
        for f in dataclasses.fields(component):
            value = getattr(component, f.name, None)
            path = f"{prefix}{f.name}"
            if isinstance(value, float):
                found.append(path)
            elif isinstance(value, eqx.Module):
                found.extend(_float_hyperparameters(value, path + "."))
            elif isinstance(value, (tuple, list)):
                for i, v in enumerate(value):
                    if isinstance(v, float):
                        found.append(f"{path}[{i}]")
                    elif isinstance(v, eqx.Module):
                        found.extend(_float_hyperparameters(v, f"{path}[{i}]."))
    return found


def _perturbed(component: Any) -> Any | None:
    """The component with every inexact array leaf halved, or `None` if it has none."""
    dyn, static = eqx.partition(component, eqx.is_inexact_array)
    if not jax.tree.leaves(dyn):
        return None
    return eqx.combine(jax.tree.map(lambda x: x * 0.5, dyn), static)  # keeps weak types


def _counted_jit(fn: Callable[..., Any]) -> tuple[Callable[..., Any], list[int]]:
    """`eqx.filter_jit(fn)` and a counter of how many times it was traced."""
    count = [0]

    def traced(*args: Any) -> Any:
        count[0] += 1
        return fn(*args)

    return eqx.filter_jit(traced), count


def _check_no_recompile(
    chk: _Checker, call: Callable[[Any], Any], count: list[int], variants: Sequence[Any]
) -> None:
    """`call(component)` was traced once; calling it on every variant must not re-trace."""
    before = count[0]
    for v in variants:
        chk.run("no_recompile", "calling it with changed hyperparameters", call, v)
    if count[0] > before:
        same_tree = all(
            jax.tree.structure(v) == jax.tree.structure(chk.component) for v in variants
        )
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


def _default_variants(component: Any, variants: Sequence[Any] | None) -> list[Any]:
    if variants is not None:
        return list(variants)
    v = _perturbed(component)
    return [] if v is None else [v]


# --------------------------------------------------------------------------- engine helpers
class _PoisonProposer(AbstractProposer):
    """Two candidates that must never be accepted: NaN parameters and Inf parameters."""

    @property
    def num_candidates(self) -> int:
        return 2

    def labels(self) -> tuple[str, ...]:
        return ("nan", "inf")

    def init(self, params: Any, static: Any, key: Any) -> None:
        return None

    def propose(self, params: Any, static: Any, state: Any, data: Any, key: Any) -> Any:
        def poison(x: jax.Array) -> jax.Array:
            if not jnp.issubdtype(x.dtype, jnp.inexact):
                return jnp.stack([x, x])
            return jnp.stack([jnp.full_like(x, jnp.nan), jnp.full_like(x, jnp.inf)])

        return jax.tree.map(poison, params), state


class _NoiseProposer(AbstractProposer):
    """Current parameters plus Gaussian noise (the kit's neutral proposer)."""

    scale: jax.Array = eqx.field(converter=jnp.asarray, default=0.05)

    @property
    def num_candidates(self) -> int:
        return 2

    def labels(self) -> tuple[str, ...]:
        return ("noise0", "noise1")

    def init(self, params: Any, static: Any, key: Any) -> None:
        return None

    def propose(self, params: Any, static: Any, state: Any, data: Any, key: Any) -> Any:
        leaves, treedef = jax.tree.flatten(params)
        keys = jax.random.split(key, len(leaves))
        out = [
            x + (self.scale * jax.random.normal(k, (2,) + x.shape)).astype(x.dtype)
            if jnp.issubdtype(x.dtype, jnp.inexact)
            else jnp.stack([x, x])
            for x, k in zip(leaves, keys)
        ]
        return jax.tree.unflatten(treedef, out), state


def _engine_checks(
    chk: _Checker,
    problem: Problem,
    *,
    proposers: Sequence[AbstractProposer],
    assessors: Sequence[AbstractAssessor],
    scheduler: AbstractScheduler,
) -> None:
    """Three steps of a small real `Engine` with the component and a proposer of NaN and Inf
    candidates, the second on a propose stream with NaN examples: no invalid candidate is
    accepted, the parameters stay finite, and the engine state survives a checkpoint."""
    if not chk.wants("nonfinite"):
        return
    poison_at = sum(p.num_candidates for p in proposers)
    engine = chk.run(
        "nonfinite",
        "building an Engine with it",
        lambda: Engine(
            list(proposers) + [_PoisonProposer()],
            list(assessors),
            scheduler,
            assess_size=16,
            decide_size=32,
            history_size=4,
        ),
    )
    data = problem.data
    state = chk.run("nonfinite", "Engine.init", engine.init, problem.model, jax.random.key(1))
    chk.run("nonfinite", "Engine.check_data", engine.check_data, data, state)
    bad = jax.tree.map(
        lambda a: a.at[::3].set(jnp.nan) if jnp.issubdtype(a.dtype, jnp.inexact) else a,
        data.propose,
    )
    infos = []
    s = state
    for d in (data, Data(propose=bad, assess=data.assess, decide=data.decide), data):
        s, info = chk.run("jit", "a jitted Engine.step", engine.step, s, d)
        infos.append(info)
    for i, info in enumerate(infos):
        valid = np.asarray(info.valid)
        if valid[poison_at] or valid[poison_at + 1]:
            chk.fail(
                "nonfinite",
                f"step {i}: a candidate with NaN or Inf parameters was marked valid",
                "never turn non-finite parameters or scores into finite ones",
            )
        if bool(info.accepted) and not valid[int(info.winner)]:
            chk.fail(
                "nonfinite",
                f"step {i}: the invalid candidate {int(info.winner)} was accepted",
                "never select or accept a candidate whose `valid` flag is false",
            )
    for name, tree in (("current", s.current), ("stable", s.stable)):
        if not all(np.all(np.isfinite(x)) for x in _host(tree) if x.dtype.kind == "f"):
            chk.fail(
                "nonfinite",
                f"after steps with NaN/Inf candidates and NaN examples the {name} parameters "
                "are not finite",
                "never select or accept a candidate whose `valid` flag is false",
            )
    if "checkpoint" in chk.selected:
        with tempfile.TemporaryDirectory() as tmp:
            chk.run("checkpoint", "save_checkpoint of the engine state", save_checkpoint, tmp, s)
            restored, _ = chk.run(
                "checkpoint",
                "load_checkpoint of the engine state",
                lambda: load_checkpoint(tmp, like=state),
            )
        if not _identical(restored, s):
            chk.fail(
                "checkpoint",
                "the engine state after three steps is not the same after save_checkpoint / "
                "load_checkpoint",
                "keep all state in array leaves of a pytree whose structure never changes",
            )


def check_engine(
    proposers: Sequence[AbstractProposer] = (),
    assessors: Sequence[AbstractAssessor] = (),
    scheduler: AbstractScheduler | None = None,
    *,
    problem: Problem | None = None,
    checks: Sequence[str] | None = None,
) -> tuple[str, ...]:
    """Run components together in one small real `Engine`, next to a proposer of NaN and Inf
    candidates, for three steps (the second on a propose stream with NaN examples): no
    invalid candidate may be accepted, the parameters stay finite, and the engine state
    survives `save_checkpoint` / `load_checkpoint` bit for bit. One engine for many
    components compiles once (`check_proposer` runs the same check for one proposer).

    **Arguments:** the components (defaults: a Gaussian-noise proposer, the problem's first
    assessor, `AlwaysAccept()`), `problem` as `check_proposer`, and `checks` among
    `("nonfinite", "checkpoint")`.
    """
    problem = _problem(problem)
    proposers = list(proposers) or [_NoiseProposer()]
    assessors = list(assessors) or list(problem.assessors[:1]) or [NegCrossEntropy()]
    scheduler = AlwaysAccept() if scheduler is None else scheduler
    selected = ("jit", "nonfinite", "checkpoint") if checks is None else ("jit", *checks)
    chk = _Checker(None, "engine", selected)
    names = [type(c).__qualname__ for c in (*proposers, *assessors, scheduler)]
    chk.who = f"an Engine of {', '.join(names)}"
    _engine_checks(chk, problem, proposers=proposers, assessors=assessors, scheduler=scheduler)
    return tuple(chk.ran)


# --------------------------------------------------------------------------- proposers
def check_proposer(
    proposer: AbstractProposer,
    *,
    problem: Problem | None = None,
    variants: Sequence[AbstractProposer] | None = None,
    uses_key: bool = True,
    checks: Sequence[str] | None = None,
) -> tuple[str, ...]:
    """Check a proposer against the engine's contract (see the module docstring).

    **Arguments:**

    - `proposer`: the instance to check.
    - `problem`: model and data (default: `default_problem()`).
    - `variants`: instances with other hyperparameter values that must reuse the compiled
      program (default: `proposer` with its inexact array leaves halved).
    - `uses_key`: whether its candidates depend on the key (`False` for a deterministic one).
    - `checks`: a subset of `CHECKS` to run (default: all).

    **Returns:** the names of the checks that ran. **Raises:** `ConformanceError`.
    """
    chk = _Checker(proposer, "proposer", checks)
    if not isinstance(proposer, AbstractProposer):
        chk.fail("structure", "it is not an ev3core.AbstractProposer", "subclass it")
    problem = _problem(problem)
    params, static = split_model(problem.model)
    data = problem.data.propose
    k_init, k1, k2 = jax.random.split(jax.random.key(0), 3)

    K = chk.run("structure", "num_candidates", lambda: proposer.num_candidates)
    if not isinstance(K, int) or K < 1:
        chk.fail("structure", f"num_candidates is {K!r}", "return a Python int >= 1")
    labels = chk.run("structure", "labels()", proposer.labels)
    if len(labels) != K or not all(isinstance(s, str) for s in labels):
        chk.fail(
            "structure",
            f"labels() returned {labels!r} for num_candidates={K}",
            "return one string label per candidate",
        )
    state0 = chk.run(
        "structure", "init(params, static, key)", proposer.init, params, static, k_init
    )

    def propose(p: AbstractProposer, st: Any, k: Any) -> Any:
        return p.propose(params, static, st, data, k)

    jprop, count = _counted_jit(propose)
    cands, state1 = chk.run("jit", "a jitted propose", jprop, proposer, state0, k1)
    if chk.wants("structure"):
        want = [((K,) + s, d) for s, d in _signature(params)[1]]
        got_tree, got = _signature(cands)
        if got_tree != jax.tree.structure(params) or got != want:
            chk.fail(
                "structure",
                f"propose returned candidates of (shape, dtype) {got}; expected the parameters "
                f"stacked {K} times: {want}",
                "return full candidate parameters (not deltas) with the structure of `params` "
                "and a leading axis of size num_candidates",
            )
        if _signature(state1) != _signature(state0):
            chk.fail(
                "structure",
                "propose returned a state whose structure, shapes or dtypes differ from the "
                "state init returned",
                "return a state of the same structure as init's (it is carried by lax.scan)",
            )
        if not all(np.all(np.isfinite(x)) for x in _host(cands) if x.dtype.kind == "f"):
            chk.fail(
                "structure",
                "on a well-posed problem with finite data it proposed non-finite candidates",
                "check step sizes and numerics (the engine masks such candidates, but a "
                "proposer that only proposes them never helps)",
            )
        jadapt = eqx.filter_jit(lambda p, st, o: p.adapt(st, o))
        for idx in (0, -1):
            outcome = Outcome(
                accepted_index=jnp.asarray(min(idx, K - 1), jnp.int32),
                accepted=jnp.asarray(idx >= 0),
                significant=jnp.asarray(idx >= 0),
                params=params,
            )
            adapted = chk.run(
                "jit",
                "a jitted adapt(state, outcome)",
                jadapt,
                proposer,
                state1,
                outcome,
            )
            if _signature(adapted) != _signature(state0):
                chk.fail(
                    "structure",
                    "adapt returned a state whose structure, shapes or dtypes differ from init's",
                    "return a state of the same structure from adapt",
                )
    if chk.wants("pure"):
        _check_pure(
            chk,
            "propose",
            propose,
            (proposer, state0, k1),
            lambda: jprop(proposer, state0, k1),
            (cands, state1),
            "derive all randomness from `key` and keep no Python-side state (counters, "
            "NumPy or `random` RNGs, attributes set during a call)",
        )
        if uses_key:
            other = chk.run("pure", "a jitted propose", jprop, proposer, state0, k2)
            if _identical(other[0], cands):
                chk.fail(
                    "pure",
                    "two different keys gave identical candidates: it ignores its `key` (e.g. "
                    "a fixed jax.random.key(0) inside)",
                    "split and use the `key` argument for every random draw; if the proposer "
                    "is deterministic by design pass uses_key=False",
                )
    if chk.wants("vmap"):
        keys = jax.random.split(k2, 2)
        batched = chk.run(
            "vmap",
            "propose vmapped over two keys",
            eqx.filter_jit(lambda p, st, ks: jax.vmap(lambda k: propose(p, st, k))(ks)),
            proposer,
            state0,
            keys,
        )
        one = chk.run("jit", "a jitted propose", jprop, proposer, state0, keys[1])
        if not _close(jax.tree.map(lambda x: x[1], batched), one):
            chk.fail(
                "vmap",
                "propose under jax.vmap gave other candidates than the same call un-batched",
                "keep the computation a pure function of its arguments",
            )
    if chk.wants("no_recompile"):
        _check_no_recompile(
            chk,
            lambda v: jprop(v, state0, k1),
            count,
            _default_variants(proposer, variants),
        )
    _check_roundtrip(chk, params, static, before=((state0,), None), after=((state1,), None))
    _engine_checks(
        chk,
        problem,
        proposers=[proposer],
        assessors=problem.assessors[:1] or (NegCrossEntropy(),),
        scheduler=AlwaysAccept(),
    )
    return tuple(chk.ran)


# --------------------------------------------------------------------------- assessors
def _metric(assessor: AbstractAssessor, values: jax.Array) -> jax.Array:
    if isinstance(assessor, AbstractBatchAssessor):
        return assessor.metric(values, jnp.ones_like(values))
    return jnp.mean(values)


def check_assessor(
    assessor: AbstractAssessor,
    *,
    problem: Problem | None = None,
    variants: Sequence[AbstractAssessor] | None = None,
    checks: Sequence[str] | None = None,
) -> tuple[str, ...]:
    """Check an assessor: per-example scores of shape `(n,)`, jit/vmap, purity, no
    recompilation, higher is better (`problem.good_model` scores above `bad_model`; batch
    assessors through `metric`) and non-finite safety in a real engine.

    Arguments and return value as `check_proposer`.
    """
    chk = _Checker(assessor, "assessor", checks)
    if not isinstance(assessor, AbstractAssessor):
        chk.fail("structure", "it is not an ev3core.AbstractAssessor", "subclass it")
    problem = _problem(problem)
    batch = jax.tree.map(lambda a: a[:32], problem.data.assess)
    n = jax.tree.leaves(batch)[0].shape[0]
    name = chk.run("structure", "the name property", lambda: assessor.name)
    if not isinstance(name, str) or not name:
        chk.fail("structure", f"name is {name!r}", "return a non-empty string")

    def score(a: AbstractAssessor, model: Any) -> Any:
        return a(model, batch)

    jscore, count = _counted_jit(score)
    out = chk.run("jit", "a jitted call on a batch", jscore, assessor, problem.model)
    if chk.wants("structure"):
        shape, dtype = getattr(out, "shape", None), getattr(out, "dtype", None)
        if shape != (n,) or dtype is None or not jnp.issubdtype(dtype, jnp.floating):
            chk.fail(
                "structure",
                f"it returned {type(out).__name__} of shape {shape} and dtype {dtype} for a "
                f"batch of {n} examples",
                f"return one float score per example: shape ({n},), higher is better "
                "(batch-level metrics: subclass AbstractBatchAssessor)",
            )
    if chk.wants("pure"):
        _check_pure(
            chk,
            "the assessor",
            score,
            (assessor, problem.model),
            lambda: jscore(assessor, problem.model),
            out,
            "keep no Python-side state and use no global RNG",
        )
    if chk.wants("vmap"):
        params, static = split_model(problem.model)
        stacked = jax.tree.map(lambda x: jnp.stack([x, x * 0.5]), params)
        batched = chk.run(
            "vmap",
            "a call vmapped over two stacked models (as the engine does)",
            eqx.filter_jit(lambda a, ps: jax.vmap(lambda p: a(eqx.combine(p, static), batch))(ps)),
            assessor,
            stacked,
        )
        half = eqx.combine(jax.tree.map(lambda x: x * 0.5, params), static)
        if not (_close(batched[0], out) and _close(batched[1], jscore(assessor, half))):
            chk.fail(
                "vmap",
                "scores under jax.vmap differ from the same calls un-batched",
                "keep the computation a pure function of the model and the batch",
            )
    if chk.wants("no_recompile"):
        _check_no_recompile(
            chk,
            lambda v: jscore(v, problem.model),
            count,
            _default_variants(assessor, variants),
        )
    if problem.good_model is not None and problem.bad_model is not None and chk.wants("convention"):
        good = float(_metric(assessor, jscore(assessor, problem.good_model)))
        bad = float(_metric(assessor, jscore(assessor, problem.bad_model)))
        if not good > bad:
            chk.fail(
                "convention",
                f"it scores a model that is always right ({good:.4g}) no higher than one "
                f"that is always wrong ({bad:.4g}): scores must be higher-is-better",
                "negate a quantity to be minimised (return -loss, -error)",
            )
    return tuple(chk.ran)


# --------------------------------------------------------------------------- schedulers
def _scores(key: Any, num_objectives: int, num_models: int, n: int, boost: dict[int, float]) -> Any:
    s = 0.1 * jax.random.normal(key, (num_objectives, num_models, n), jnp.float32)
    for m, v in boost.items():
        s = s.at[:, m].add(jnp.float32(v))
    return s


def _scheduler_contract(
    chk: _Checker,
    scheduler: AbstractScheduler,
    num_objectives: int,
    variants: Sequence[Any],
    safe: bool = True,
) -> tuple[Any, Any]:
    """Direct checks of `select` and `decide` on synthetic scores."""
    num_obj, K, n = num_objectives, 3, 32
    history = History.empty(8, num_obj)
    state = chk.run(
        "structure", f"init({num_obj}, key)", scheduler.init, num_obj, jax.random.key(11)
    )
    ks = jax.random.split(jax.random.key(3), 8)
    valid = jnp.ones((K,), bool)

    def select(s: AbstractScheduler, sc: Any, v: Any) -> Any:
        return s.select(sc, v, state, history)

    def decide(s: AbstractScheduler, sc: Any, wv: Any) -> Any:
        return s.decide(sc, wv, state, history)

    jselect, count = _counted_jit(select)
    jdecide, dcount = _counted_jit(decide)
    best1 = _scores(ks[0], num_obj, K + 2, n, {1: 1.0})
    w = chk.run("jit", "a jitted select", jselect, scheduler, best1, valid)
    better = _scores(ks[1], num_obj, 3, n, {WINNER: 1.0})
    decision, new_state = chk.run(
        "jit", "a jitted decide", jdecide, scheduler, better, jnp.asarray(True)
    )
    if chk.wants("structure"):
        if getattr(w, "shape", None) != () or not jnp.issubdtype(w.dtype, jnp.integer):
            chk.fail(
                "structure",
                f"select returned {w!r}",
                "return a scalar integer array: the winner's index among the K candidates",
            )
        shapes = {
            "choice": (decision.choice.shape, ()),
            "lower": (decision.lower.shape, (3,)),
            "upper": (decision.upper.shape, (3,)),
            "priorities": (decision.priorities.shape, (num_obj,)),
        }
        for field, (got, want) in shapes.items():
            if got != want:
                chk.fail(
                    "structure",
                    f"decide returned Decision.{field} of shape {got}, expected {want}",
                    "see ev3core.Decision",
                )
        if _signature(new_state) != _signature(state):
            chk.fail(
                "structure",
                "decide returned a state whose structure, shapes or dtypes differ from init's",
                "return a state of the same structure as init's",
            )
        total = float(jnp.sum(decision.priorities))
        if not abs(total - 1.0) < 1e-4 or bool(jnp.any(decision.priorities < 0)):
            chk.fail(
                "structure",
                f"Decision.priorities {np.asarray(decision.priorities)} are not non-negative "
                "weights summing to one",
                "normalise the priorities",
            )
    if chk.wants("convention"):
        for j in range(K):
            sc = _scores(ks[2 + j], num_obj, K + 2, n, {j: 1.0})
            got = int(jselect(scheduler, sc, valid))
            if got != j:
                chk.fail(
                    "convention",
                    f"select picked candidate {got} although candidate {j} scores 1.0 higher "
                    "than every other model on every objective: scores are higher-is-better",
                    "pick the candidate with the highest (lower bound of its) score",
                )
        if int(decision.choice) != WINNER:
            chk.fail(
                "convention",
                f"decide chose {int(decision.choice)} although the winner scores 1.0 higher than "
                "the current and the stable model on every example (noise sd 0.1)",
                "accept a clearly better valid winner (higher is better)",
            )
        worse = _scores(ks[6], num_obj, 3, n, {WINNER: -1.0})
        d, _ = jdecide(scheduler, worse, jnp.asarray(True))
        if safe and int(d.choice) == WINNER:
            chk.fail(
                "convention",
                "decide accepted a winner that scores 1.0 lower than the current and the "
                "stable model: scores are higher-is-better",
                "never accept a clearly worse winner (pass safe=False for a baseline that "
                "accepts every winner by design)",
            )
    if chk.wants("nonfinite"):
        bad_valid = valid.at[1].set(False)
        got = int(jselect(scheduler, best1, bad_valid))
        if got == 1:
            chk.fail(
                "nonfinite",
                "select returned the invalid candidate 1 (it scores highest, but valid[1] is "
                "false) while valid ones exist",
                "mask invalid candidates, e.g. jnp.where(valid, score, -jnp.inf)",
            )
        nan = best1.at[:, 1].set(jnp.nan)
        got = int(jselect(scheduler, nan, bad_valid))
        if got == 1:
            chk.fail(
                "nonfinite",
                "select returned candidate 1 whose scores are NaN (and valid[1] is false)",
                "mask invalid candidates, e.g. jnp.where(valid, score, -jnp.inf)",
            )
        d, _ = jdecide(scheduler, better, jnp.asarray(False))
        if int(d.choice) == WINNER or bool(d.update_stable):
            chk.fail(
                "nonfinite",
                "decide chose (or made stable) a winner whose winner_valid flag is false",
                "never choose WINNER or set update_stable when winner_valid is false",
            )
    if chk.wants("pure"):
        fix = (
            "draw randomness from keys in the scheduler's state (e.g. "
            "fold_in(state.key, history.count)); keep no Python-side state"
        )
        _check_pure(
            chk,
            "select",
            select,
            (scheduler, best1, valid),
            lambda: jselect(scheduler, best1, valid),
            w,
            fix,
        )
        _check_pure(
            chk,
            "decide",
            decide,
            (scheduler, better, jnp.asarray(True)),
            lambda: jdecide(scheduler, better, jnp.asarray(True)),
            (decision, new_state),
            fix,
        )
    if chk.wants("vmap"):
        both = jnp.stack([best1, _scores(ks[7], num_obj, K + 2, n, {2: 1.0})])
        dboth = jnp.stack([better, _scores(ks[6], num_obj, 3, n, {WINNER: -1.0})])

        def batched(s: AbstractScheduler, sc: Any, dsc: Any) -> Any:
            return (
                jax.vmap(lambda x: s.select(x, valid, state, history))(sc),
                jax.vmap(lambda x: s.decide(x, jnp.asarray(True), state, history)[0].choice)(dsc),
            )

        got, dgot = chk.run(
            "vmap",
            "select and decide vmapped over two score tensors",
            eqx.filter_jit(batched),
            scheduler,
            both,
            dboth,
        )
        one = jselect(scheduler, both[1], valid)
        if int(got[0]) != int(w) or int(got[1]) != int(one) or int(dgot[0]) != int(decision.choice):
            chk.fail(
                "vmap",
                "select/decide under jax.vmap gave other results than un-batched",
                "keep the computation a pure function of its arguments",
            )
    if chk.wants("no_recompile"):
        _check_no_recompile(chk, lambda v: jselect(v, best1, valid), count, variants)
        _check_no_recompile(chk, lambda v: jdecide(v, better, jnp.asarray(True)), dcount, variants)
    return state, new_state


def check_scheduler(
    scheduler: AbstractScheduler,
    *,
    num_objectives: int = 1,
    problem: Problem | None = None,
    variants: Sequence[AbstractScheduler] | None = None,
    safe: bool = True,
    engine: bool = False,
    checks: Sequence[str] | None = None,
) -> tuple[str, ...]:
    """Check a scheduler on synthetic scores: `select` and `decide` shapes, jit/vmap,
    purity, no recompilation, higher is better (a clearly better candidate is picked and
    accepted, a clearly worse winner never is), an invalid candidate is never selected or
    accepted, and its state survives a checkpoint round-trip.

    **Arguments:**

    - `num_objectives`: how many objectives to check it with.
    - `safe`: whether a clearly worse winner must be refused (`False` for a baseline such as
      `AlwaysAccept` that accepts every valid winner by design).
    - `engine`: also run it in a real `Engine` next to NaN/Inf candidates (uses the first
      `num_objectives` of `problem.assessors`).
    - the others as `check_proposer`.
    """
    chk = _Checker(scheduler, "scheduler", checks)
    if not isinstance(scheduler, AbstractScheduler):
        chk.fail("structure", "it is not an ev3core.AbstractScheduler", "subclass it")
    problem = _problem(problem)
    before, after = _scheduler_contract(
        chk, scheduler, num_objectives, _default_variants(scheduler, variants), safe
    )
    params, static = split_model(problem.model)
    _check_roundtrip(
        chk, params, static, before=((), before), after=((), after), num_objectives=num_objectives
    )
    if engine:
        assessors = problem.assessors[:num_objectives]
        if len(assessors) < num_objectives:
            raise ValueError(
                f"check_scheduler(num_objectives={num_objectives}, engine=True) needs a problem "
                f"with at least {num_objectives} assessors; it has {len(problem.assessors)}."
            )
        _engine_checks(
            chk, problem, proposers=[_NoiseProposer()], assessors=assessors, scheduler=scheduler
        )
    return tuple(chk.ran)


# --------------------------------------------------------------------------- losses
def check_loss(
    loss: AbstractLoss,
    *,
    problem: Problem | None = None,
    variants: Sequence[AbstractLoss] | None = None,
    checks: Sequence[str] | None = None,
) -> tuple[str, ...]:
    """Check a loss: a finite scalar with finite gradients, jit, vmap over stacked losses (as
    `GradientProposer` runs them), purity, no recompilation, lower for `problem.good_model`
    than for `bad_model`, and a `GradientProposer` over it passes `check_proposer`'s
    structure checks.
    """
    chk = _Checker(loss, "loss", checks)
    if not isinstance(loss, AbstractLoss):
        chk.fail("structure", "it is not an ev3core.AbstractLoss", "subclass it")
    problem = _problem(problem)
    batch = jax.tree.map(lambda a: a[:32], problem.data.propose)
    params, static = split_model(problem.model)
    key = jax.random.key(5)

    def value_and_grad(lo: AbstractLoss, p: Any, k: Any) -> Any:
        return jax.value_and_grad(lambda q: lo(eqx.combine(q, static), batch, k))(p)

    jvg, count = _counted_jit(value_and_grad)
    value, grad = chk.run("jit", "a jitted value and gradient", jvg, loss, params, key)
    if chk.wants("structure"):
        if getattr(value, "shape", None) != () or not bool(jnp.isfinite(value)):
            chk.fail(
                "structure",
                f"it returned {value!r} on a finite batch",
                "return the batch's mean loss as a finite scalar",
            )
        if not all(np.all(np.isfinite(x)) for x in _host(grad)):
            chk.fail("structure", "its gradient is not finite", "check the loss's numerics")
        label = chk.run("structure", "the label property", lambda: loss.label)
        if not isinstance(label, str):
            chk.fail("structure", f"label is {label!r}", "return a string")
    if chk.wants("pure"):
        _check_pure(
            chk,
            "the loss",
            value_and_grad,
            (loss, params, key),
            lambda: jvg(loss, params, key),
            (value, grad),
            "keep no Python-side state; draw randomness from `key`",
        )
    variants = _default_variants(loss, variants)
    if chk.wants("vmap") and variants:
        other = variants[0]
        if jax.tree.structure(other) == jax.tree.structure(loss):
            dyn = jax.tree.map(
                lambda *xs: jnp.stack(xs),
                eqx.filter(loss, eqx.is_array),
                eqx.filter(other, eqx.is_array),
            )
            lstatic = eqx.filter(loss, eqx.is_array, inverse=True)
            got = chk.run(
                "vmap",
                "the loss vmapped over two stacked hyperparameter settings",
                eqx.filter_jit(
                    lambda d, p, k: jax.vmap(
                        lambda di: eqx.combine(di, lstatic)(eqx.combine(p, static), batch, k)
                    )(d)
                ),
                dyn,
                params,
                key,
            )
            if not (_close(got[0], value) and _close(got[1], jvg(other, params, key)[0])):
                chk.fail(
                    "vmap",
                    "stacked and vmapped losses differ from the same losses called one by one",
                    "keep the loss a pure function of its array hyperparameters",
                )
    if chk.wants("no_recompile"):
        _check_no_recompile(chk, lambda v: jvg(v, params, key), count, variants)
    if problem.good_model is not None and problem.bad_model is not None and chk.wants("convention"):
        good = float(loss(problem.good_model, batch, key))
        bad = float(loss(problem.bad_model, batch, key))
        if not good < bad:
            chk.fail(
                "convention",
                f"its value for a model that is always right ({good:.4g}) is not below its "
                f"value for one that is always wrong ({bad:.4g}): a loss is lower-is-better",
                "return a quantity to minimise (the negated score of an assessor)",
            )
    if chk.wants("structure"):
        proposer = GradientProposer(
            losses=[loss, variants[0] if variants else loss],
            optimizers=[optax.sgd(0.05)],
            steps=2,
            batch_size=8,
        )
        try:
            check_proposer(proposer, problem=problem, checks=("structure",))
        except ConformanceError as exc:
            chk.fail(
                "structure",
                f"a GradientProposer over it (and a variant) is not a conforming proposer: {exc}",
                "see the message above",
            )
    return tuple(chk.ran)


# --------------------------------------------------------------------------- bounds
def check_bound(
    bound: AbstractBound,
    *,
    variants: Sequence[AbstractBound] | None = None,
    with_scheduler: bool = False,
    checks: Sequence[str] | None = None,
) -> tuple[str, ...]:
    """Check a confidence bound: interval shapes, `lower <= point <= upper`, a clearly better
    model's advantage has a positive lower bound (higher is better), jit/vmap over `z`,
    purity and no recompilation. With `with_scheduler=True`, `EV3Scheduler(bound=bound)` must
    also pass the scheduler's `select` / `decide` checks.
    """
    chk = _Checker(bound, "bound", checks)
    if not isinstance(bound, AbstractBound):
        chk.fail("structure", "it is not an ev3core.AbstractBound", "subclass it")
    M, n, ref = 4, 64, 0
    scores = _scores(jax.random.key(7), 1, M, n, {2: 1.0})
    key = jax.random.key(8)

    def utility(v: Any, w: Any) -> Any:
        return weighted_mean(v[0], w)

    def interval(b: AbstractBound, z: Any) -> Any:
        return b.interval(utility, scores, ref, z, key, None)

    jint, count = _counted_jit(interval)
    z = jnp.asarray(2.0, jnp.float32)
    iv = chk.run("jit", "a jitted interval", jint, bound, z)
    if chk.wants("structure"):
        for field in ("point", "lower", "upper"):
            if getattr(iv, field).shape != (M,):
                chk.fail(
                    "structure",
                    f"Interval.{field} has shape {getattr(iv, field).shape}, expected ({M},)",
                    "return one entry per model",
                )
        lo, pt, up = (np.asarray(getattr(iv, f)) for f in ("lower", "point", "upper"))
        if not (np.all(lo <= pt + 1e-6) and np.all(pt <= up + 1e-6)):
            chk.fail(
                "structure",
                f"lower <= point <= upper does not hold: {lo}, {pt}, {up}",
                "return intervals around the point estimate",
            )
    if chk.wants("convention"):
        _, lower, _ = advantage(iv, ref, bound.paired)
        if not float(lower[2]) > 0:
            chk.fail(
                "convention",
                f"the advantage of a model scoring 1.0 higher on every example (noise sd 0.1, "
                f"n={n}) has lower bound {float(lower[2]):.4g} <= 0 at z=2",
                "intervals must be of the utility (higher is better), with the `paired` "
                "property saying whether they are relative to the reference",
            )
    if chk.wants("pure"):
        _check_pure(
            chk,
            "interval",
            interval,
            (bound, z),
            lambda: jint(bound, z),
            iv,
            "draw randomness only from `key`",
        )
    if chk.wants("vmap"):
        zs = jnp.asarray([2.0, 3.0], jnp.float32)
        got = chk.run(
            "vmap",
            "interval vmapped over two alphas",
            eqx.filter_jit(lambda b, zz: jax.vmap(lambda zi: interval(b, zi))(zz)),
            bound,
            zs,
        )
        if not _close(jax.tree.map(lambda x: x[0], got), iv):
            chk.fail("vmap", "vmapped intervals differ from un-batched", "keep it pure")
    if chk.wants("no_recompile"):
        _check_no_recompile(
            chk,
            lambda v: jint(v, jnp.asarray(3.0, jnp.float32)),
            count,
            _default_variants(bound, variants),
        )
    if with_scheduler:
        inner = _Checker(bound, "bound", [c for c in chk.selected if c != "no_recompile"])
        inner.who = f"EV3Scheduler(bound=...) with {chk.who}"
        _scheduler_contract(inner, EV3Scheduler(bound=bound), 1, [])
    return tuple(chk.ran)


# --------------------------------------------------------------------------- priorities
def check_priority(
    priority: AbstractPriority,
    *,
    num_objectives: int = 2,
    variants: Sequence[AbstractPriority] | None = None,
    with_scheduler: bool = False,
    checks: Sequence[str] | None = None,
) -> tuple[str, ...]:
    """Check a priority scheduler: non-negative priorities of shape `(num_objectives,)`
    summing to one, `update` keeps the state's structure, jit/vmap over keys, purity, no
    recompilation. With `with_scheduler=True`, `EV3Scheduler(priority=priority)` must also
    pass the scheduler's `select` / `decide` checks.
    """
    chk = _Checker(priority, "priority", checks)
    if not isinstance(priority, AbstractPriority):
        chk.fail("structure", "it is not an ev3core.AbstractPriority", "subclass it")
    num_obj = num_objectives
    state = chk.run("structure", f"init({num_obj})", priority.init, num_obj)
    history = History.empty(8, num_obj)
    key = jax.random.key(9)
    gain = jnp.linspace(-0.1, 0.1, num_obj, dtype=jnp.float32)
    feedback = Feedback(
        accepted=jnp.asarray(True),
        significant=jnp.asarray(False),
        gain=gain,
        gain_lower=gain - 0.05,
        gain_upper=gain + 0.05,
        priorities=jnp.full((num_obj,), 1.0 / num_obj, jnp.float32),
    )

    def both(p: AbstractPriority, k: Any) -> Any:
        w = p.priorities(state, history, k)
        return w, p.update(state, feedback, history)

    jboth, count = _counted_jit(both)
    w, new_state = chk.run("jit", "jitted priorities and update", jboth, priority, key)
    if chk.wants("structure"):
        if w.shape != (num_obj,) or bool(jnp.any(w < 0)) or not abs(float(jnp.sum(w)) - 1.0) < 1e-4:
            chk.fail(
                "structure",
                f"priorities returned {np.asarray(w)} for {num_obj} objectives",
                f"return {num_obj} non-negative weights summing to one",
            )
        if _signature(new_state) != _signature(state):
            chk.fail(
                "structure",
                "update returned a state whose structure, shapes or dtypes differ from init's",
                "return a state of the same structure as init's",
            )
    if chk.wants("pure"):
        _check_pure(
            chk,
            "priorities and update",
            both,
            (priority, key),
            lambda: jboth(priority, key),
            (w, new_state),
            "draw randomness only from `key`",
        )
    if chk.wants("vmap"):
        keys = jax.random.split(key, 2)
        got = chk.run(
            "vmap",
            "priorities vmapped over two keys",
            eqx.filter_jit(lambda p, ks: jax.vmap(lambda k: both(p, k))(ks)),
            priority,
            keys,
        )
        if not _close(jax.tree.map(lambda x: x[1], got), jboth(priority, keys[1])):
            chk.fail("vmap", "vmapped priorities differ from un-batched", "keep it pure")
    if chk.wants("no_recompile"):
        _check_no_recompile(
            chk, lambda v: jboth(v, key), count, _default_variants(priority, variants)
        )
    if with_scheduler:
        inner = _Checker(priority, "priority", [c for c in chk.selected if c != "no_recompile"])
        inner.who = f"EV3Scheduler(priority=...) with {chk.who}"
        _scheduler_contract(inner, EV3Scheduler(priority=priority), num_obj, [])
    return tuple(chk.ran)


# --------------------------------------------------------------------------- dispatch
def check(component: Any, **options: Any) -> tuple[str, ...]:
    """Run the checks for `component`'s kind (`check_proposer`, `check_assessor`, ...)."""
    for kind, fn in _CHECKERS.items():
        if isinstance(component, KINDS[kind]):
            return fn(component, **options)
    raise TypeError(
        f"{type(component).__qualname__} is not a component the conformance kit checks "
        f"({', '.join(b.__name__ for b in KINDS.values())})."
    )


_CHECKERS: dict[str, Callable[..., tuple[str, ...]]] = {
    "proposer": check_proposer,
    "assessor": check_assessor,
    "scheduler": check_scheduler,
    "loss": check_loss,
    "bound": check_bound,
    "priority": check_priority,
}


def _as_example(item: Any) -> Example:
    return item if isinstance(item, Example) else Example(item)


def examples(kind: str, name: str, plugins: Any = None) -> list[Example]:
    """The examples of the component registered as `name`: those the plugins give through
    `ev3_conformance_examples`, else `cls()`. A component that cannot be built gives one
    `Example` whose `error` says how to fix it (checking it raises `ConformanceError`)."""
    plugins = plugin_manager() if plugins is None else plugins
    info = plugins.components(kind)[name]
    cls = info.cls
    found: list[Any] = []
    # ev3core's own examples join the plugins' answers (the core never imports the kit)
    for result in plugins.pm.hook.ev3_conformance_examples.call_extra(
        [_examples.ev3_conformance_examples], {"kind": kind, "name": name, "cls": cls}
    ):
        found.extend(result or [])
    out = [_as_example(x) for x in found]
    if not out:
        ex = Example(None)
        try:
            ex.component = cls()
        except Exception as exc:  # noqa: BLE001 - reported when checked
            ex.error = (
                f"{kind} {name!r} ({cls.__module__}.{cls.__qualname__}, plugin "
                f"{info.plugin!r}) has no conformance example and cls() raised "
                f"{type(exc).__name__}: {exc}. Fix: implement the `ev3_conformance_examples` "
                "hook in the plugin and return example instances of it"
            )
        out = [ex]
    for i, ex in enumerate(out):
        ex.label = f"{kind}:{name}[{i}]"
        if ex.error is None and not isinstance(ex.component, cls):
            ex.error = (
                f"an ev3_conformance_examples example for {kind} {name!r} is "
                f"{ex.component!r}, not an instance of {cls.__qualname__}. Fix: return "
                "instances of the registered class"
            )
    return out


def registered_examples(
    plugins: Any = None, kinds: Sequence[str] = tuple(KINDS)
) -> list[tuple[str, str, Example]]:
    """`(kind, name, example)` for every registered component of `kinds` and each of its
    examples: parametrise a test over it so that every newly registered component is
    checked."""
    plugins = plugin_manager() if plugins is None else plugins
    return [
        (kind, name, ex)
        for kind in kinds
        for name in sorted(plugins.components(kind))
        for ex in examples(kind, name, plugins)
    ]


def check_example(kind: str, example: Example) -> tuple[str, ...]:
    """Check one `Example` as a component of `kind`."""
    if example.error is not None:
        raise ConformanceError(example.error)
    return _CHECKERS[kind](example.component, **example.options)


def check_registered(kind: str, name: str, plugins: Any = None) -> tuple[str, ...]:
    """Check every example of the component registered as `name` (see `examples`)."""
    ran: list[str] = []
    for ex in examples(kind, name, plugins):
        for c in check_example(kind, ex):
            if c not in ran:
                ran.append(c)
    return tuple(ran)
