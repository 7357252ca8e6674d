"""Checks of proposers."""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from .._adapt.schedulers import AlwaysAccept
from .._assess.scores import NegCrossEntropy
from .._interfaces import AbstractProposer
from .._types import Outcome, split_model
from ._checker import (
    Report,
    _check_no_recompile,
    _check_pure,
    _check_roundtrip,
    _Checker,
    _close,
    _counted_jit,
    _default_variants,
    _filter_jit,
    _host,
    _identical,
    _rebuilt,
    _row,
    _signature,
)
from ._engine import _engine_checks
from ._problem import LOW_PRECISION, Problem, _in_dtype, _problem


def check_proposer(
    proposer: AbstractProposer,
    *,
    problem: Problem | None = None,
    variants: Sequence[AbstractProposer] | None = None,
    rebuild: Callable[[], AbstractProposer] | None = None,
    uses_key: bool = True,
    checks: Sequence[str] | None = None,
) -> Report:
    """Check a proposer against the engine's contract (see the module docstring).

    **Arguments:**

    - `proposer`: the instance to check.
    - `problem`: model and data (default: `default_problem()`).
    - `variants`: instances with other hyperparameter values that must reuse the compiled
      program (default: `proposer` with its inexact array leaves halved).
    - `rebuild`: a function that builds `proposer` again from the same settings; the
      rebuilt instance must reuse the compiled program too (the registry passes one).
    - `uses_key`: whether its candidates depend on the key (`False` for a deterministic one).
    - `checks`: a subset of `CHECKS` to run (default: all that apply).

    **Returns:** a `Report`: the checks that ran, and why the others do not apply.
    **Raises:** `ConformanceError`; `NotApplicableError` for an explicit check that does
    not apply.
    """
    chk = _Checker(
        proposer,
        "proposer",
        checks,
        {"convention": "a proposer has no score direction (its candidates are scored)"},
    )
    if not isinstance(proposer, AbstractProposer):
        chk.fail("structure", "it is not an ev3core.AbstractProposer", "subclass it")
    problem = _problem(problem)
    run = _ProposerRun(chk, proposer, problem)
    run.structure()
    if chk.wants("pure"):
        run.pure(uses_key)
    if chk.wants("vmap"):
        run.vmap()
    _check_no_recompile(
        chk,
        lambda v: run.jprop(v, run.state0, run.k1),
        run.count,
        _default_variants(proposer, variants),
        _rebuilt(rebuild),
    )
    _check_roundtrip(
        chk, run.params, run.static, before=((run.state0,), None), after=((run.state1,), None)
    )
    if chk.wants("dtype"):
        for dtype in LOW_PRECISION:
            _dtype(chk, proposer, _in_dtype(problem, dtype))
    _engine_checks(
        chk,
        problem,
        proposers=[proposer],
        assessors=problem.assessors[:1] or (NegCrossEntropy(),),
        scheduler=AlwaysAccept(),
    )
    return chk.report()


@functools.cache
def _keys() -> tuple[Any, ...]:
    """The checks' keys `(init, k1, k2, split(k2, 2), split(k2, 2)[1])`, drawn in one compiled
    program: each eager split or index would compile a program of its own."""

    def draw() -> tuple[Any, ...]:
        k_init, k1, k2 = jax.random.split(jax.random.key(0), 3)
        pair = jax.random.split(k2, 2)
        return k_init, k1, k2, pair, pair[1]

    return _filter_jit(draw)()


class _ProposerRun:
    """One proposer on one problem: its first jitted `propose` and the checks on it."""

    def __init__(self, chk: _Checker, proposer: AbstractProposer, problem: Problem):
        self.chk, self.proposer = chk, proposer
        self.params, self.static = split_model(problem.model)
        self.data = problem.data.propose
        k_init, self.k1, self.k2, self.pair, self.second = _keys()
        self.K = chk.run("structure", "num_candidates", lambda: proposer.num_candidates)
        if not isinstance(self.K, int) or self.K < 1:
            chk.fail("structure", f"num_candidates is {self.K!r}", "return a Python int >= 1")
        labels = chk.run("structure", "labels()", proposer.labels)
        if len(labels) != self.K or not all(isinstance(s, str) for s in labels):
            chk.fail(
                "structure",
                f"labels() returned {labels!r} for num_candidates={self.K}",
                "return one string label per candidate",
            )
        self.state0 = chk.run(
            "structure",
            "init(params, static, key)",
            proposer.init,
            self.params,
            self.static,
            k_init,
        )
        self.jprop, self.count = _counted_jit(self.propose)
        self.cands, self.state1 = chk.run(
            "jit", "a jitted propose", self.jprop, proposer, self.state0, self.k1
        )

    def propose(self, p: AbstractProposer, st: Any, k: Any) -> Any:
        return p.propose(self.params, self.static, st, self.data, k)

    def structure(self) -> None:
        chk, K = self.chk, self.K
        if not chk.wants("structure"):
            return
        _candidates_fit(chk, self.cands, self.params, K, "")
        if _signature(self.state1) != _signature(self.state0):
            chk.fail(
                "structure",
                "propose returned a state whose structure, shapes or dtypes differ from the "
                "state init returned",
                "return a state of the same structure as init's (it is carried by lax.scan)",
            )
        if not all(np.all(np.isfinite(x)) for x in _host(self.cands) if x.dtype.kind == "f"):
            chk.fail(
                "structure",
                "on a well-posed problem with finite data it proposed non-finite candidates",
                "check step sizes and numerics (the engine masks such candidates, but a "
                "proposer that only proposes them never helps)",
            )
        jadapt = _filter_jit(lambda p, st, o: p.adapt(st, o))
        for idx in (0, -1):
            outcome = Outcome(
                accepted_index=jnp.asarray(min(idx, K - 1), jnp.int32),
                accepted=jnp.asarray(idx >= 0),
                significant=jnp.asarray(idx >= 0),
                params=self.params,
            )
            adapted = chk.run(
                "jit",
                "a jitted adapt(state, outcome)",
                jadapt,
                self.proposer,
                self.state1,
                outcome,
            )
            if _signature(adapted) != _signature(self.state0):
                chk.fail(
                    "structure",
                    "adapt returned a state whose structure, shapes or dtypes differ from init's",
                    "return a state of the same structure from adapt",
                )

    def pure(self, uses_key: bool) -> None:
        chk, p, s0 = self.chk, self.proposer, self.state0
        _check_pure(
            chk,
            "propose",
            self.propose,
            (p, s0, self.k1),
            lambda: self.jprop(p, s0, self.k1),
            (self.cands, self.state1),
            "derive all randomness from `key` and keep no Python-side state (counters, "
            "NumPy or `random` RNGs, attributes set during a call)",
        )
        if uses_key:
            other = chk.run("pure", "a jitted propose", self.jprop, p, s0, self.k2)
            if _identical(other[0], self.cands):
                chk.fail(
                    "pure",
                    "two different keys gave identical candidates: it ignores its `key` (e.g. "
                    "a fixed jax.random.key(0) inside)",
                    "split and use the `key` argument for every random draw; if the proposer "
                    "is deterministic by design pass uses_key=False",
                )

    def vmap(self) -> None:
        chk, p, s0 = self.chk, self.proposer, self.state0
        keys = self.pair
        batched = chk.run(
            "vmap",
            "propose vmapped over two keys",
            _filter_jit(lambda q, st, ks: jax.vmap(lambda k: self.propose(q, st, k))(ks)),
            p,
            s0,
            keys,
        )
        one = chk.run("jit", "a jitted propose", self.jprop, p, s0, self.second)
        if not _close(_row(batched, 1), one):
            chk.fail(
                "vmap",
                "propose under jax.vmap gave other candidates than the same call un-batched",
                "keep the computation a pure function of its arguments",
            )


def _candidates_fit(chk: _Checker, cands: Any, params: Any, K: int, where: str) -> None:
    want = [((K,) + s, d) for s, d in _signature(params)[1]]
    got_tree, got = _signature(cands)
    if got_tree != jax.tree.structure(params) or got != want:
        check = "dtype" if where else "structure"
        chk.fail(
            check,
            f"propose{where} returned candidates of (shape, dtype) {got}; expected the "
            f"parameters stacked {K} times: {want}",
            "return full candidate parameters (not deltas) with the structure, shapes and "
            "dtypes of `params` and a leading axis of size num_candidates"
            + (" (cast array hyperparameters to each leaf's dtype)" if where else ""),
        )


def _dtype(chk: _Checker, proposer: AbstractProposer, problem: Problem) -> None:
    """`init`, `propose` and `adapt` on a problem whose parameters and features are in a low
    precision keep the parameters' dtypes and give finite candidates."""
    params, static = split_model(problem.model)
    dtype = str(jax.tree.leaves(params)[0].dtype)
    where = f" on {dtype} parameters"

    @_filter_jit
    def step(p: AbstractProposer, key: Any) -> Any:
        k0, k1 = jax.random.split(key)
        st = p.init(params, static, k0)
        cands, st1 = p.propose(params, static, st, problem.data.propose, k1)
        outcome = Outcome(
            accepted_index=jnp.asarray(0, jnp.int32),
            accepted=jnp.asarray(True),
            significant=jnp.asarray(True),
            params=params,
        )
        return cands, p.adapt(st1, outcome)

    cands, _ = chk.run(
        "dtype", f"init, propose and adapt{where}", step, proposer, jax.random.key(0)
    )
    _candidates_fit(chk, cands, params, proposer.num_candidates, where)
    if not all(
        np.all(np.isfinite(x.astype(np.float32)))
        for x in _host(cands)
        if x.dtype.kind == "f" or x.dtype == jnp.bfloat16
    ):
        chk.fail(
            "dtype",
            f"it proposed non-finite candidates{where} on finite data",
            "compute in a dtype wide enough for your numerics (e.g. accumulate in float32 "
            "and cast the result back to each leaf's dtype)",
        )
