"""Checks of schedulers: `select` and `decide` on synthetic scores."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from .._interfaces import AbstractScheduler
from .._types import WINNER, Choice, History, choice_index, choice_name, split_model
from ._checker import (
    Report,
    _check_no_recompile,
    _check_pure,
    _check_roundtrip,
    _Checker,
    _counted_jit,
    _default_variants,
    _filter_jit,
    _rebuilt,
    _signature,
)
from ._engine import _engine_checks, _NoiseProposer
from ._problem import Problem, _problem


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
    rebuilt: Sequence[Any] = (),
) -> tuple[Any, Any]:
    """Direct checks of `select` and `decide` on synthetic scores; returns the state `init`
    gave and the state after one `decide`."""
    run = _SchedulerRun(chk, scheduler, num_objectives)
    if chk.wants("structure"):
        run.structure()
    if chk.wants("convention"):
        run.convention(safe)
    if chk.wants("nonfinite"):
        run.nonfinite()
    if chk.wants("pure"):
        run.pure()
    if chk.wants("vmap"):
        run.vmap()
    valid, better = run.valid, run.better
    _check_no_recompile(
        chk, lambda v: run.jselect(v, run.best1, valid), run.count, variants, rebuilt
    )
    _check_no_recompile(
        chk, lambda v: run.jdecide(v, better, jnp.asarray(True)), run.dcount, variants, rebuilt
    )
    return run.state, run.new_state


class _SchedulerRun:
    """A scheduler's first jitted `select` and `decide` on synthetic scores, and the checks
    on them (`K = 3` candidates, `n = 32` examples)."""

    K, n = 3, 32

    def __init__(self, chk: _Checker, scheduler: AbstractScheduler, num_objectives: int):
        self.chk, self.scheduler, self.num_obj = chk, scheduler, num_objectives
        self.history = History.empty(8, num_objectives)
        self.state = chk.run(
            "structure",
            f"init({num_objectives}, key)",
            scheduler.init,
            num_objectives,
            jax.random.key(11),
        )
        self.ks = jax.random.split(jax.random.key(3), 8)
        self.valid = jnp.ones((self.K,), bool)
        self.jselect, self.count = _counted_jit(self.select)
        self.jdecide, self.dcount = _counted_jit(self.decide)
        self.best1 = self.scores(0, self.K + 2, {1: 1.0})
        self.w = chk.run("jit", "a jitted select", self.jselect, scheduler, self.best1, self.valid)
        self.better = self.scores(1, 3, {WINNER: 1.0})
        self.decision, self.new_state = chk.run(
            "jit", "a jitted decide", self.jdecide, scheduler, self.better, jnp.asarray(True)
        )

    def scores(self, i: int, num_models: int, boost: dict[int, float]) -> Any:
        return _scores(self.ks[i], self.num_obj, num_models, self.n, boost)

    def select(self, s: AbstractScheduler, sc: Any, v: Any) -> Any:
        return s.select(sc, v, self.state, self.history)

    def decide(self, s: AbstractScheduler, sc: Any, wv: Any) -> Any:
        return s.decide(sc, wv, self.state, self.history)

    def structure(self) -> None:
        chk, w, decision = self.chk, self.w, self.decision
        if getattr(w, "shape", None) != () or not jnp.issubdtype(w.dtype, jnp.integer):
            chk.fail(
                "structure",
                f"select returned {w!r}",
                "return a scalar integer array: the winner's index among the K candidates",
            )
        if not isinstance(decision.choice, Choice):
            chk.fail(
                "structure",
                f"decide returned Decision.choice={decision.choice!r}",
                "return an ev3core.Choice item: Choice.winner, Choice.current or "
                "Choice.stable (Choice.where(pred, a, b) picks one in traced code)",
            )
        shapes = {
            "choice": (choice_index(decision.choice).shape, ()),
            "lower": (decision.lower.shape, (3,)),
            "upper": (decision.upper.shape, (3,)),
            "priorities": (decision.priorities.shape, (self.num_obj,)),
        }
        for field, (got, want) in shapes.items():
            if got != want:
                chk.fail(
                    "structure",
                    f"decide returned Decision.{field} of shape {got}, expected {want}",
                    "see ev3core.Decision",
                )
        if _signature(self.new_state) != _signature(self.state):
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

    def convention(self, safe: bool) -> None:
        chk, s = self.chk, self.scheduler
        for j in range(self.K):
            got = int(self.jselect(s, self.scores(2 + j, self.K + 2, {j: 1.0}), self.valid))
            if got != j:
                chk.fail(
                    "convention",
                    f"select picked candidate {got} although candidate {j} scores 1.0 higher "
                    "than every other model on every objective: scores are higher-is-better",
                    "pick the candidate with the highest (lower bound of its) score",
                )
        if not bool(self.decision.choice == Choice.winner):
            chk.fail(
                "convention",
                f"decide chose {choice_name(self.decision.choice)!r} although the winner scores "
                "1.0 higher than the current and the stable model on every example (noise sd 0.1)",
                "accept a clearly better valid winner (higher is better)",
            )
        d, _ = self.jdecide(s, self.scores(6, 3, {WINNER: -1.0}), jnp.asarray(True))
        if safe and bool(d.choice == Choice.winner):
            chk.fail(
                "convention",
                "decide accepted a winner that scores 1.0 lower than the current and the "
                "stable model: scores are higher-is-better",
                "never accept a clearly worse winner (pass safe=False for a baseline that "
                "accepts every winner by design)",
            )

    def nonfinite(self) -> None:
        chk, s = self.chk, self.scheduler
        bad_valid = self.valid.at[1].set(False)
        fix = "mask invalid candidates, e.g. jnp.where(valid, score, -jnp.inf)"
        if int(self.jselect(s, self.best1, bad_valid)) == 1:
            chk.fail(
                "nonfinite",
                "select returned the invalid candidate 1 (it scores highest, but valid[1] is "
                "false) while valid ones exist",
                fix,
            )
        nan = self.best1.at[:, 1].set(jnp.nan)
        if int(self.jselect(s, nan, bad_valid)) == 1:
            chk.fail(
                "nonfinite",
                "select returned candidate 1 whose scores are NaN (and valid[1] is false)",
                fix,
            )
        d, _ = self.jdecide(s, self.better, jnp.asarray(False))
        if bool(d.choice == Choice.winner) or bool(d.update_stable):
            chk.fail(
                "nonfinite",
                "decide chose (or made stable) a winner whose winner_valid flag is false",
                "never choose Choice.winner or set update_stable when winner_valid is false",
            )

    def pure(self) -> None:
        chk, s, best1, better, valid = (
            self.chk,
            self.scheduler,
            self.best1,
            self.better,
            self.valid,
        )
        fix = (
            "draw randomness from keys in the scheduler's state (e.g. "
            "fold_in(state.key, history.count)); keep no Python-side state"
        )
        _check_pure(
            chk,
            "select",
            self.select,
            (s, best1, valid),
            lambda: self.jselect(s, best1, valid),
            self.w,
            fix,
        )
        yes = jnp.asarray(True)
        _check_pure(
            chk,
            "decide",
            self.decide,
            (s, better, yes),
            lambda: self.jdecide(s, better, yes),
            (self.decision, self.new_state),
            fix,
        )

    def vmap(self) -> None:
        chk, s, valid, state, history = (
            self.chk,
            self.scheduler,
            self.valid,
            self.state,
            self.history,
        )
        both = jnp.stack([self.best1, self.scores(7, self.K + 2, {2: 1.0})])
        dboth = jnp.stack([self.better, self.scores(6, 3, {WINNER: -1.0})])

        def batched(s: AbstractScheduler, sc: Any, dsc: Any) -> Any:
            return (
                jax.vmap(lambda x: s.select(x, valid, state, history))(sc),
                jax.vmap(lambda x: s.decide(x, jnp.asarray(True), state, history)[0].choice)(dsc),
            )

        got, dgot = chk.run(
            "vmap",
            "select and decide vmapped over two score tensors",
            _filter_jit(batched),
            s,
            both,
            dboth,
        )
        one = self.jselect(s, both[1], valid)
        dgot = choice_index(dgot)
        if (
            int(got[0]) != int(self.w)
            or int(got[1]) != int(one)
            or int(dgot[0]) != int(choice_index(self.decision.choice))
        ):
            chk.fail(
                "vmap",
                "select/decide under jax.vmap gave other results than un-batched",
                "keep the computation a pure function of its arguments",
            )


def check_scheduler(
    scheduler: AbstractScheduler,
    *,
    num_objectives: int = 1,
    problem: Problem | None = None,
    variants: Sequence[AbstractScheduler] | None = None,
    rebuild: Callable[[], AbstractScheduler] | None = None,
    safe: bool = True,
    engine: bool = False,
    checks: Sequence[str] | None = None,
) -> Report:
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
    reasons = {"dtype": "schedulers see float32 scores, whatever the model's dtype"}
    chk = _Checker(scheduler, "scheduler", checks, reasons)
    if not isinstance(scheduler, AbstractScheduler):
        chk.fail("structure", "it is not an ev3core.AbstractScheduler", "subclass it")
    problem = _problem(problem)
    before, after = _scheduler_contract(
        chk,
        scheduler,
        num_objectives,
        _default_variants(scheduler, variants),
        safe,
        _rebuilt(rebuild),
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
    return chk.report()
