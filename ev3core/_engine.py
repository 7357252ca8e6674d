"""The EV3 engine: pure `init` and `step` over an `eqx.Module` state."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, PRNGKeyArray, PyTree

from ._interfaces import AbstractAssessor, AbstractProposer, AbstractScheduler
from ._types import (
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
from .errors import ConfigurationError, EV3Error

logger = logging.getLogger("ev3core")


def _sample(data: PyTree[Array], key: PRNGKeyArray, size: int) -> PyTree[Array]:
    n = jax.tree.leaves(data)[0].shape[0]
    idx = jax.random.randint(key, (size,), 0, n)
    return jax.tree.map(lambda a: a[idx], data)


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
    """

    proposers: tuple[AbstractProposer, ...]
    assessors: tuple[AbstractAssessor, ...]
    scheduler: AbstractScheduler
    assess_size: int = eqx.field(static=True)
    decide_size: int = eqx.field(static=True)
    history_size: int = eqx.field(static=True)

    def __init__(
        self,
        proposers: Sequence[AbstractProposer],
        assessors: Sequence[AbstractAssessor],
        scheduler: AbstractScheduler,
        assess_size: int = 128,
        decide_size: int = 2048,
        history_size: int = 64,
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
        self.proposers = proposers
        self.assessors = assessors
        self.scheduler = scheduler
        self.assess_size = int(assess_size)
        self.decide_size = int(decide_size)
        self.history_size = int(history_size)
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
        keys = jax.random.split(key, len(self.proposers) + 1)
        return State(
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

    def check_data(self, data: Data, state: State | None = None) -> None:
        """Raise `ConfigurationError` if `data` cannot feed this engine (host side, no compile).

        Checks that every stream has one leading example axis, and that the assess and
        decide streams hold at least `assess_size` / `decide_size` examples (they are sampled
        with replacement: fewer examples would repeat and make the confidence bounds claim
        more confidence than the data supports). Given a `state`, also evaluates every
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
        for name, label, size in (
            ("assess", "assess_size", self.assess_size),
            ("decide", "decide_size", self.decide_size),
        ):
            if sizes[name] < size:
                raise ConfigurationError(
                    f"Data.{name} holds {sizes[name]} examples but {label}={size}. The engine "
                    f"draws {size} {name} examples per step with replacement, so examples would "
                    "repeat, the standard errors would shrink and the confidence bounds "
                    "(alpha) would claim more confidence than the data supports. Pass at least "
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
        from ._faults import component_owner

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
                if component_owner(self, exc, innermost=True) is not None:
                    raise  # the component's own code raised: `run` names it (ComponentError)
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
                what, "propose", p.propose, state.current, state.static, ps, data.propose,
                state.key,
            )
            want = jax.tree.map(
                lambda x, k=p.num_candidates: ((k,) + tuple(x.shape), x.dtype), state.current
            )
            got = jax.tree.map(lambda x: (tuple(x.shape), x.dtype), cands)
            if jax.tree.structure(want) != jax.tree.structure(got) or jax.tree.leaves(
                want, is_leaf=lambda x: isinstance(x, tuple)
            ) != jax.tree.leaves(got, is_leaf=lambda x: isinstance(x, tuple)):
                raise ConfigurationError(
                    f"{what} returned candidates that are not the parameters stacked "
                    f"{p.num_candidates} times: expected (shape, dtype) {want}, got {got}. A "
                    "proposer returns full parameters with a leading candidate axis of size "
                    "num_candidates."
                )
            sig = lambda t: [(tuple(jnp.shape(x)), jnp.result_type(x)) for x in jax.tree.leaves(t)]
            if jax.tree.structure(new_ps) != jax.tree.structure(ps) or sig(new_ps) != sig(ps):
                raise ConfigurationError(
                    f"{what} returned a state whose structure, shapes or dtypes differ from the "
                    "state it was given, so the step could not be scanned or would re-compile "
                    "every step. Return a state of the same structure from propose()."
                )

    def _assess(
        self, params: PyTree[Array], static: Any, batch: PyTree[Array]
    ) -> Array:
        def score(p):
            model = eqx.combine(p, static)
            return jnp.stack([a(model, batch).astype(jnp.float32) for a in self.assessors])

        return jnp.moveaxis(jax.vmap(score)(params), 0, 1)  # [objective, model, example]

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
        valid = tree_all_finite(candidates, batch_dims=1)

        # assess: K candidates + current + stable on the same examples
        everything = tree_concat(
            [candidates, tree_stack([state.current]), tree_stack([state.stable])]
        )
        assess_batch = _sample(data.assess, k_assess, self.assess_size)
        scores_a = self._assess(everything, static, assess_batch)
        valid = valid & jnp.all(jnp.isfinite(scores_a[:, :K]), axis=(0, 2))
        winner = self.scheduler.select(scores_a, valid, state.scheduler_state, state.history)
        winner_valid = valid[winner]
        winner_params = tree_index(candidates, winner)

        # adapt: decide among winner, current, stable
        trio = tree_stack([winner_params, state.current, state.stable])
        scores_d = self._assess(trio, static, _sample(data.decide, k_decide, self.decide_size))
        winner_valid = winner_valid & jnp.all(jnp.isfinite(scores_d[:, WINNER]))
        decision, sstate = self.scheduler.decide(
            scores_d, winner_valid, state.scheduler_state, state.history
        )
        # Safety net independent of the scheduler: an invalid winner is never taken.
        choice = jnp.where(
            (decision.choice == WINNER) & ~winner_valid, CURRENT, decision.choice
        ).astype(jnp.int32)
        update_stable = decision.update_stable & winner_valid
        significant = decision.significant & winner_valid
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
            )
            new_pstates.append(p.adapt(ps, outcome))
            offset += p.num_candidates

        decide_mean = jnp.mean(scores_d, axis=-1)
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
        info = StepInfo(
            step=state.step,
            winner=winner,
            choice=choice,
            accepted=accepted,
            rolled_back=choice == STABLE,
            significant=significant,
            num_invalid=jnp.sum(~valid).astype(jnp.int32),
            valid=valid,
            assess_mean=jnp.mean(scores_a, axis=-1),
            decide_mean=decide_mean,
            decide_lower=decision.lower,
            decide_upper=decision.upper,
            priorities=decision.priorities,
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
