"""Checks of priorities (the weight of every objective at each step)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from .._adapt.priorities import AbstractPriority, Feedback
from .._adapt.schedulers import EV3Scheduler
from .._types import History, split_model
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
    _rebuilt,
    _row,
    _signature,
)
from ._problem import _problem
from ._schedulers import _scheduler_contract


def check_priority(
    priority: AbstractPriority,
    *,
    num_objectives: int = 2,
    variants: Sequence[AbstractPriority] | None = None,
    rebuild: Callable[[], AbstractPriority] | None = None,
    with_scheduler: bool = False,
    checks: Sequence[str] | None = None,
) -> Report:
    """Check a priority (the weight of every objective at each step; see
    `ev3core.AbstractPriority`): non-negative priorities of shape `(num_objectives,)` summing
    to one, `update` keeps the state's structure, jit/vmap over keys, purity, no
    recompilation, higher is better (`utility` grows when every objective grows and never
    falls when one does), and its state after an update survives a checkpoint round-trip.
    With `with_scheduler=True`, `EV3Scheduler(priority=priority)` must also pass the
    scheduler's `select` / `decide` checks (including the non-finite ones).
    """
    reasons = {"dtype": "priorities see float32 objective values, whatever the model's dtype"}
    if not with_scheduler:
        reasons["nonfinite"] = "pass with_scheduler=True to check it inside EV3Scheduler"
    chk = _Checker(priority, "priority", checks, reasons)
    if not isinstance(priority, AbstractPriority):
        chk.fail("structure", "it is not an ev3core.AbstractPriority", "subclass it")
    num_obj = num_objectives
    state = chk.run("structure", f"init({num_obj})", priority.init, num_obj)
    history = History.empty(8, num_obj)
    key = jax.random.key(9)
    feedback = _feedback(num_obj)

    def both(p: AbstractPriority, k: Any) -> Any:
        w = p.priorities(state, history, k)
        return w, p.update(state, feedback, history)

    jboth, count = _counted_jit(both)
    w, new_state = chk.run("jit", "jitted priorities and update", jboth, priority, key)
    if chk.wants("structure"):
        _structure(chk, w, state, new_state, num_obj)
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
            _filter_jit(lambda p, ks: jax.vmap(lambda k: both(p, k))(ks)),
            priority,
            keys,
        )
        if not _close(_row(got, 1), jboth(priority, keys[1])):
            chk.fail("vmap", "vmapped priorities differ from un-batched", "keep it pure")
    _check_no_recompile(
        chk,
        lambda v: jboth(v, key),
        count,
        _default_variants(priority, variants),
        _rebuilt(rebuild),
    )
    if chk.wants("convention"):
        _convention(chk, priority, w)
    params, static = split_model(_problem(None).model)
    _check_roundtrip(
        chk, params, static, before=((), state), after=((), new_state), num_objectives=num_obj
    )
    if with_scheduler:
        inner = _Checker(priority, "priority", [c for c in chk.selected if c != "no_recompile"])
        inner.who = f"EV3Scheduler(priority=...) with {chk.who}"
        _scheduler_contract(inner, EV3Scheduler(priority=priority), num_obj, [])
    return chk.report()


def _feedback(num_obj: int) -> Feedback:
    gain = jnp.linspace(-0.1, 0.1, num_obj, dtype=jnp.float32)
    return Feedback(
        accepted=jnp.asarray(True),
        significant=jnp.asarray(False),
        gain=gain,
        gain_lower=gain - 0.05,
        gain_upper=gain + 0.05,
        priorities=jnp.full((num_obj,), 1.0 / num_obj, jnp.float32),
    )


def _structure(chk: _Checker, w: Any, state: Any, new_state: Any, num_obj: int) -> None:
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


def _convention(chk: _Checker, priority: AbstractPriority, w: Any) -> None:
    """Higher is better: `utility` rises when every objective rises by 1 and never falls
    when one objective rises."""
    values = jnp.linspace(0.2, 0.8, w.shape[0], dtype=jnp.float32)
    utility = _filter_jit(lambda p, v: p.utility(v, w))
    base = float(utility(priority, values))
    up = float(utility(priority, values + 1.0))
    if not up > base:
        chk.fail(
            "convention",
            f"utility({np.asarray(values + 1.0)}) = {up:.4g} is not above utility("
            f"{np.asarray(values)}) = {base:.4g} with priorities {np.asarray(w)}: objective "
            "values are higher-is-better",
            "make `utility` increasing in every objective with a positive priority",
        )
    for o in range(w.shape[0]):
        one = float(utility(priority, values.at[o].add(1.0)))
        if one < base - 1e-6:
            chk.fail(
                "convention",
                f"raising objective {o} by 1 lowered the utility from {base:.4g} to {one:.4g}",
                "make `utility` non-decreasing in every objective",
            )
