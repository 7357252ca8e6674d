"""Engine-level checks: components run together in a small real `Engine`, next to a proposer
of NaN and Inf candidates."""

from __future__ import annotations

import tempfile
from collections.abc import Sequence
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from .._adapt.schedulers import AlwaysAccept
from .._assess.scores import NegCrossEntropy
from .._engine.engine import Engine
from .._host.ckpt_io import load_checkpoint, save_checkpoint
from .._interfaces import AbstractAssessor, AbstractProposer, AbstractScheduler
from .._types import Data
from ._checker import (
    _Checker,
    _filter_jit,
    _host,
    _identical,
)
from ._problem import Problem, _problem


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

    def adapt(self, state: Any, outcome: Any) -> Any:
        return state


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
            x[None] + (self.scale * jax.random.normal(k, (2,) + x.shape)).astype(x.dtype)
            if jnp.issubdtype(x.dtype, jnp.inexact)
            else jnp.stack([x, x])
            for x, k in zip(leaves, keys)
        ]
        return jax.tree.unflatten(treedef, out), state

    def adapt(self, state: Any, outcome: Any) -> Any:
        return state


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
    step = _filter_jit(lambda e, st, d: e.step_pure(st, d))  # as Engine.step, compiled cheaply
    for d in (data, Data(propose=bad, assess=data.assess, decide=data.decide), data):
        s, info = chk.run("jit", "a jitted Engine.step", step, engine, s, d)
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
    return chk.report()
