"""Checks of assessors (per-example and batch-level)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from .._adapt.schedulers import AlwaysAccept
from .._assess.metrics import AbstractBatchAssessor
from .._interfaces import AbstractAssessor
from .._types import split_model
from ._checker import (
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
)
from ._engine import _engine_checks, _NoiseProposer
from ._problem import LOW_PRECISION, Problem, _in_dtype, _problem


def _metric(assessor: AbstractAssessor, values: jax.Array) -> jax.Array:
    if isinstance(assessor, AbstractBatchAssessor):
        return assessor.metric(values, jnp.ones_like(values))
    return jnp.mean(values)


def check_assessor(
    assessor: AbstractAssessor,
    *,
    problem: Problem | None = None,
    variants: Sequence[AbstractAssessor] | None = None,
    rebuild: Callable[[], AbstractAssessor] | None = None,
    checks: Sequence[str] | None = None,
) -> Report:
    """Check an assessor: per-example scores (or batch-level encodings) of shape `(n,)`,
    jit/vmap, purity, no recompilation, higher is better (`problem.good_model` scores above
    `bad_model`; batch assessors through `metric`), scores of bfloat16 and float16 models,
    and non-finite safety in a real engine.

    Arguments and return value as `check_proposer`.
    """
    reasons = {"checkpoint": "an assessor has no state"}
    problem = _problem(problem)
    if problem.good_model is None or problem.bad_model is None:
        reasons["convention"] = "the problem has no good_model and bad_model to compare"
    chk = _Checker(assessor, "assessor", checks, reasons)
    if not isinstance(assessor, AbstractAssessor):
        chk.fail("structure", "it is not an ev3core.AbstractAssessor", "subclass it")
    batch = jax.tree.map(lambda a: a[:32], problem.data.assess)
    name = chk.run("structure", "the name property", lambda: assessor.name)
    if not isinstance(name, str) or not name:
        chk.fail("structure", f"name is {name!r}", "return a non-empty string")

    def score(a: AbstractAssessor, model: Any, b: Any) -> Any:
        return a(model, b)

    jscore, count = _counted_jit(score)
    out = chk.run("jit", "a jitted call on a batch", jscore, assessor, problem.model, batch)
    if chk.wants("structure"):
        _scores_fit(chk, out, batch, "")
    if chk.wants("pure"):
        _check_pure(
            chk,
            "the assessor",
            score,
            (assessor, problem.model, batch),
            lambda: jscore(assessor, problem.model, batch),
            out,
            "keep no Python-side state and use no global RNG",
        )
    if chk.wants("vmap"):
        _vmap(chk, assessor, problem.model, batch, out, jscore)
    _check_no_recompile(
        chk,
        lambda v: jscore(v, problem.model, batch),
        count,
        _default_variants(assessor, variants),
        _rebuilt(rebuild),
    )
    if chk.wants("convention"):
        _convention(chk, assessor, problem, lambda m: jscore(assessor, m, batch))
    if chk.wants("dtype"):
        for dtype in LOW_PRECISION:
            low = _in_dtype(problem, dtype)
            lbatch = jax.tree.map(lambda a: a[:32], low.data.assess)
            got = chk.run(
                "dtype", f"a call on a {dtype.__name__} model", jscore, assessor, low.model, lbatch
            )
            _scores_fit(chk, got, lbatch, f" for a {dtype.__name__} model and batch")
    _engine_checks(
        chk, problem, proposers=[_NoiseProposer()], assessors=[assessor], scheduler=AlwaysAccept()
    )
    return chk.report()


def _scores_fit(chk: _Checker, out: Any, batch: Any, where: str) -> None:
    n = jax.tree.leaves(batch)[0].shape[0]
    check = "dtype" if where else "structure"
    shape, dtype = getattr(out, "shape", None), getattr(out, "dtype", None)
    if shape != (n,) or dtype is None or not jnp.issubdtype(dtype, jnp.floating):
        chk.fail(
            check,
            f"it returned {type(out).__name__} of shape {shape} and dtype {dtype} for a "
            f"batch of {n} examples{where}",
            f"return one float score per example: shape ({n},), higher is better "
            "(batch-level metrics: subclass AbstractBatchAssessor)",
        )
    if where and not all(np.all(np.isfinite(x.astype(np.float32))) for x in _host(out)):
        chk.fail(
            check,
            f"it returned non-finite scores{where} with finite data",
            "compute in a dtype wide enough for your numerics (e.g. upcast logits to "
            "float32 before a softmax or a log)",
        )


def _vmap(chk: _Checker, assessor: Any, model: Any, batch: Any, out: Any, jscore: Any) -> None:
    params, static = split_model(model)
    stacked = jax.tree.map(lambda x: jnp.stack([x, x * 0.5]), params)
    batched = chk.run(
        "vmap",
        "a call vmapped over two stacked models (as the engine does)",
        _filter_jit(lambda a, ps: jax.vmap(lambda p: a(eqx.combine(p, static), batch))(ps)),
        assessor,
        stacked,
    )
    half = eqx.combine(jax.tree.map(lambda x: x * 0.5, params), static)
    if not (_close(batched[0], out) and _close(batched[1], jscore(assessor, half, batch))):
        chk.fail(
            "vmap",
            "scores under jax.vmap differ from the same calls un-batched",
            "keep the computation a pure function of the model and the batch",
        )


def _convention(chk: _Checker, assessor: Any, problem: Problem, scores: Any) -> None:
    good = float(_metric(assessor, scores(problem.good_model)))
    bad = float(_metric(assessor, scores(problem.bad_model)))
    if not good > bad:
        chk.fail(
            "convention",
            f"it scores a model that is always right ({good:.4g}) no higher than one "
            f"that is always wrong ({bad:.4g}): scores must be higher-is-better",
            "negate a quantity to be minimised (return -loss, -error)",
        )
