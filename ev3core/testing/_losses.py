"""Checks of explore losses."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax

from .._explore.gradient import GradientProposer
from .._interfaces import AbstractLoss
from .._types import same_structure, split_model
from ._checker import (
    ConformanceError,
    Report,
    _check_no_recompile,
    _check_pure,
    _Checker,
    _close,
    _counted_jit,
    _default_variants,
    _filter_jit,
    _host,
    _rebuilt,
    _signature,
)
from ._problem import LOW_PRECISION, Problem, _in_dtype, _problem
from ._proposers import check_proposer


def check_loss(
    loss: AbstractLoss,
    *,
    problem: Problem | None = None,
    variants: Sequence[AbstractLoss] | None = None,
    rebuild: Callable[[], AbstractLoss] | None = None,
    checks: Sequence[str] | None = None,
) -> Report:
    """Check a loss: a finite scalar with finite gradients, jit, vmap over stacked losses (as
    `GradientProposer` runs them), purity, no recompilation, lower for `problem.good_model`
    than for `bad_model`, finite values and gradients of the parameters' dtype for bfloat16
    and float16 models, and a `GradientProposer` over it passes `check_proposer`'s structure
    checks.
    """
    problem = _problem(problem)
    variants = _default_variants(loss, variants)
    reasons = {
        "checkpoint": "a loss has no state",
        "nonfinite": "a loss is never selected: GradientProposer masks non-finite trajectories",
    }
    if not variants or not same_structure(variants[0], loss):
        reasons["vmap"] = (
            "it has no variant of the same structure to stack with (no inexact array leaves "
            "and no `variants=`)"
        )
    if problem.good_model is None or problem.bad_model is None:
        reasons["convention"] = "the problem has no good_model and bad_model to compare"
    chk = _Checker(loss, "loss", checks, reasons)
    if not isinstance(loss, AbstractLoss):
        chk.fail("structure", "it is not an ev3core.AbstractLoss", "subclass it")
    batch = jax.tree.map(lambda a: a[:32], problem.data.propose)
    params, static = split_model(problem.model)
    key = jax.random.key(5)

    def value_and_grad(lo: AbstractLoss, p: Any, b: Any, k: Any) -> Any:
        return jax.value_and_grad(lambda q: lo(eqx.combine(q, static), b, k))(p)

    jvg, count = _counted_jit(value_and_grad)
    value, grad = chk.run("jit", "a jitted value and gradient", jvg, loss, params, batch, key)
    if chk.wants("structure"):
        _value_fits(chk, value, grad, params, "")
        label = chk.run("structure", "the label property", lambda: loss.label)
        if not isinstance(label, str):
            chk.fail("structure", f"label is {label!r}", "return a string")
    if chk.wants("pure"):
        _check_pure(
            chk,
            "the loss",
            value_and_grad,
            (loss, params, batch, key),
            lambda: jvg(loss, params, batch, key),
            (value, grad),
            "keep no Python-side state; draw randomness from `key`",
        )
    if chk.wants("vmap"):
        _vmap(chk, loss, variants[0], (params, static, batch, key), value, jvg)
    _check_no_recompile(
        chk, lambda v: jvg(v, params, batch, key), count, variants, _rebuilt(rebuild)
    )
    if chk.wants("convention"):
        _convention(chk, loss, problem, batch, key)
    if chk.wants("dtype"):
        for dtype in LOW_PRECISION:
            low = _in_dtype(problem, dtype)
            lparams, _ = split_model(low.model)
            lbatch = jax.tree.map(lambda a: a[:32], low.data.propose)
            got = chk.run(
                "dtype",
                f"value and gradient on a {dtype.__name__} model",
                jvg,
                loss,
                lparams,
                lbatch,
                key,
            )
            value, grad = got
            _value_fits(chk, value, grad, lparams, f" for a {dtype.__name__} model")
    if chk.wants("structure"):
        _as_proposer(chk, loss, variants, problem)
    return chk.report()


def _value_fits(chk: _Checker, value: Any, grad: Any, params: Any, where: str) -> None:
    check = "dtype" if where else "structure"
    if getattr(value, "shape", None) != () or not bool(jnp.isfinite(value)):
        chk.fail(
            check,
            f"it returned {value!r} on a finite batch{where}",
            "return the batch's mean loss as a finite scalar",
        )
    if not all(np.all(np.isfinite(x.astype(np.float32))) for x in _host(grad)):
        chk.fail(check, f"its gradient is not finite{where}", "check the loss's numerics")
    if where and _signature(grad) != _signature(params):
        chk.fail(
            check,
            f"its gradient{where} has other dtypes than the parameters",
            "keep every computation that touches the parameters in their dtype (cast array "
            "hyperparameters to it)",
        )


def _vmap(chk: _Checker, loss: Any, other: Any, args: tuple, value: Any, jvg: Any) -> None:
    params, static, batch, key = args
    dyn = jax.tree.map(
        lambda *xs: jnp.stack(xs), eqx.filter(loss, eqx.is_array), eqx.filter(other, eqx.is_array)
    )
    lstatic = eqx.filter(loss, eqx.is_array, inverse=True)
    got = chk.run(
        "vmap",
        "the loss vmapped over two stacked hyperparameter settings",
        _filter_jit(
            lambda d, p, k: jax.vmap(
                lambda di: eqx.combine(di, lstatic)(eqx.combine(p, static), batch, k)
            )(d)
        ),
        dyn,
        params,
        key,
    )
    if not (_close(got[0], value) and _close(got[1], jvg(other, params, batch, key)[0])):
        chk.fail(
            "vmap",
            "stacked and vmapped losses differ from the same losses called one by one",
            "keep the loss a pure function of its array hyperparameters",
        )


def _convention(chk: _Checker, loss: Any, problem: Problem, batch: Any, key: Any) -> None:
    good = float(loss(problem.good_model, batch, key))
    bad = float(loss(problem.bad_model, batch, key))
    if not good < bad:
        chk.fail(
            "convention",
            f"its value for a model that is always right ({good:.4g}) is not below its "
            f"value for one that is always wrong ({bad:.4g}): a loss is lower-is-better",
            "return a quantity to minimise (the negated score of an assessor)",
        )


def _as_proposer(chk: _Checker, loss: Any, variants: Sequence[Any], problem: Problem) -> None:
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
