"""Checks of confidence bounds."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from .._adapt.bounds import AbstractBound, advantage, weighted_mean
from .._adapt.schedulers import EV3Scheduler
from ._checker import (
    Report,
    _check_no_recompile,
    _check_pure,
    _Checker,
    _close,
    _counted_jit,
    _default_variants,
    _filter_jit,
    _rebuilt,
    _row,
)
from ._schedulers import _scheduler_contract, _scores


def check_bound(
    bound: AbstractBound,
    *,
    variants: Sequence[AbstractBound] | None = None,
    rebuild: Callable[[], AbstractBound] | None = None,
    with_scheduler: bool = False,
    checks: Sequence[str] | None = None,
) -> Report:
    """Check a confidence bound: interval shapes, `lower <= point <= upper`, a clearly better
    model's advantage has a positive lower bound (higher is better), jit/vmap over `z`,
    purity and no recompilation. With `with_scheduler=True`, `EV3Scheduler(bound=bound)` must
    also pass the scheduler's `select` / `decide` checks.
    """
    reasons = {
        "checkpoint": "a bound has no state",
        "dtype": "bounds see float32 scores, whatever the model's dtype",
    }
    if not with_scheduler:
        reasons["nonfinite"] = "pass with_scheduler=True to check it inside EV3Scheduler"
    chk = _Checker(bound, "bound", checks, reasons)
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
        _interval_fits(chk, iv, M)
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
            _filter_jit(lambda b, zz: jax.vmap(lambda zi: interval(b, zi))(zz)),
            bound,
            zs,
        )
        if not _close(_row(got, 0), iv):
            chk.fail("vmap", "vmapped intervals differ from un-batched", "keep it pure")
    _check_no_recompile(
        chk,
        lambda v: jint(v, jnp.asarray(3.0, jnp.float32)),
        count,
        _default_variants(bound, variants),
        _rebuilt(rebuild),
    )
    if with_scheduler:
        inner = _Checker(bound, "bound", [c for c in chk.selected if c != "no_recompile"])
        inner.who = f"EV3Scheduler(bound=...) with {chk.who}"
        _scheduler_contract(inner, EV3Scheduler(bound=bound), 1, [])
    return chk.report()


def _interval_fits(chk: _Checker, iv: Any, M: int) -> None:
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
