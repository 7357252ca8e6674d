"""The `evosax` plugin: registers the evosax proposers and gives them their fitness."""

from __future__ import annotations

from typing import Any

import equinox as eqx

import ev3core

from ._proposers import CMAES, EvosaxProposer, OpenES, SepCMAES, _AbstractEvosaxProposer


@ev3core.hookimpl
def ev3_register_proposers() -> dict[str, type]:
    return {
        "evosax": EvosaxProposer,
        "open_es": OpenES,
        "sep_cma_es": SepCMAES,
        "cma_es": CMAES,
    }


@ev3core.hookimpl(wrapper=True)
def ev3_explore(proposers: tuple[Any, ...], assessors: tuple[Any, ...]):
    """Evosax proposers built without a `fitness` score their members with the pipeline's
    first assessor (its primary objective)."""
    result = yield
    if not any(isinstance(p, _AbstractEvosaxProposer) and p.fitness is None for p in result):
        return result
    primary = assessors[0]
    return tuple(
        eqx.tree_at(lambda q: q.fitness, p, primary, is_leaf=lambda x: x is None)
        if isinstance(p, _AbstractEvosaxProposer) and p.fitness is None
        else p
        for p in result
    )


@ev3core.hookimpl
def ev3_conformance_examples(kind: str, name: str, cls: type) -> list | None:
    """Small instances for `ev3core.testing` (the suite runs the kit on every registered
    component, `tests/test_conformance.py`).

    `OpenES` gets every check. The other classes share its code (`_AbstractEvosaxProposer`):
    they get the checks that depend on the strategy (structure and state of their own evosax
    state, jit, purity, no recompilation, checkpoint round-trip) but not the engine-level
    "nonfinite" check or the "vmap" check, which exercise the same code path as OpenES and
    cost about as much again to compile. CMA-ES could not pass "vmap" anyway: it samples
    through an eigenbasis of its covariance, which is not unique while the covariance is
    nearly isotropic, and the last-bit differences between batched and un-batched reductions
    pick another one, so batched candidates are equally distributed but not equal.
    """
    if kind != "proposer" or cls not in (EvosaxProposer, OpenES, SepCMAES, CMAES):
        return None
    from ev3core.testing import Example

    if cls is OpenES:
        return [OpenES(popsize=4, batch_size=16)]
    checks = ["structure", "jit", "pure", "no_recompile", "checkpoint"]
    if cls is EvosaxProposer:
        return [Example(EvosaxProposer("SNES", popsize=4, batch_size=16), checks=checks)]
    return [Example(cls(popsize=4, batch_size=16), checks=checks)]
