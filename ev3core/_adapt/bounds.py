"""Confidence bounds for the adapt stage, as pluggable components.

A bound turns the scores of a stack of models on the same examples into one confidence
interval per model for a *utility*: a function of the per-example scores and of example
weights (see `Utility`). Making the utility a function of example weights is what lets one
interface serve every statistic:

* the normal bounds take the utility's empirical influence function by autodiff with respect
  to the weights (`psi_i = n * dU/dw_i` at `w = 1`); for a mean it is `x_i - mean`, which gives
  back the usual `sd / sqrt(n)`; for a batch-level metric (F1, AUC, calibration error) it is
  the delta method;
* the bootstrap draws multinomial example weights (a resample of the examples) and evaluates
  the utility on each, so a batch-level metric is recomputed on every resample and the
  interval's width is that of the metric, never divided by `sqrt(n)` a second time.

Every bound is *one-sided at level* `Phi(-z)` per side, where `z` is the scheduler's alpha
("number of standard errors"): `z = 1.645` is a 95% one-sided bound (`z_for_level(0.95)`).

Index conventions: `scores` is `[objective, model, example]`; the interval has one entry per
model. A *paired* bound gives the interval of `U(model) - U(reference)` (the reference's own is
`[0, 0]`); the unpaired `NormalBound` gives each model's marginal interval of `U(model)`.
See `docs/statistics.md` for what each bound guarantees.
"""

from __future__ import annotations

import abc
import statistics
from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
from jax.scipy.special import ndtr, ndtri
from jaxtyping import Array, Bool, Float, Int, PRNGKeyArray, Shaped

from ..errors import ConfigurationError

#: Corrections for comparing several models at once (see `AbstractBound`).
CORRECTIONS = ("none", "bonferroni", "holm", "max")

#: `utility(values, weights) -> scalar`: `values` is one model's `[objective, example]` scores,
#: `weights` the `[example]` weights (non-negative; the utility must not change when they are
#: all multiplied by a constant: use weighted means, never weighted sums).
Utility = Callable[[Float[Array, "objective example"], Float[Array, " example"]], Any]


def z_for_level(level: float) -> float:
    """The alpha (number of standard errors) of a one-sided bound at confidence `level`.

    ```python
    z_for_level(0.95)  # 1.6449: accept with a 5% chance of a false acceptance
    ```
    """
    if not 0.5 <= float(level) < 1.0:
        raise ConfigurationError(
            f"z_for_level: level={level!r} is outside [0.5, 1). Pass a one-sided confidence "
            "level such as 0.95."
        )
    return statistics.NormalDist().inv_cdf(float(level))


def level_for_z(z: float) -> float:
    """The one-sided confidence level of a bound `z` standard errors wide (`Phi(z)`)."""
    return statistics.NormalDist().cdf(float(z))


def weighted_mean(
    values: Float[Array, " example"], weights: Float[Array, " example"]
) -> Float[Array, ""]:
    """`sum(w * x) / sum(w)`: the utility of a per-example objective."""
    # A dot product, so that resampling many weight vectors is one matrix product.
    return jnp.dot(values, weights) / jnp.sum(weights)


def bonferroni_z(z: Float[Array, ""], m: Shaped[Array, "*m"] | int) -> Float[Array, "*m"]:
    """The alpha that spends the one-sided level `Phi(-z)` over `m` comparisons (`m >= 1`,
    a count or an array of counts).

    `-Phi^-1(Phi(-z) / m)`, computed in the lower tail so that it stays accurate for large `z`.
    """
    m = jnp.maximum(jnp.asarray(m, jnp.float32), 1.0)
    return -ndtri(ndtr(-z) / m)


class Interval(eqx.Module):
    """One confidence interval per model.

    **Arguments:**

    - `point`: the point estimate (for a paired bound: `U(model) - U(reference)`).
    - `lower`, `upper`: the bounds, each one-sided at the level the bound was asked for
      (after any correction).
    """

    point: Float[Array, " model"]
    lower: Float[Array, " model"]
    upper: Float[Array, " model"]


def advantage(
    interval: Interval, reference: int, paired: bool
) -> tuple[Float[Array, " model"], Float[Array, " model"], Float[Array, " model"]]:
    """`(point, lower, upper)` of each model's advantage `U(model) - U(reference)`.

    A paired interval already is one. From unpaired (marginal) intervals the advantage bounds
    are `lower_m - upper_ref` and `upper_m - lower_ref`: valid, and conservative (the two
    intervals must not overlap).
    """
    if paired:
        return interval.point, interval.lower, interval.upper
    return (
        interval.point - interval.point[reference],
        interval.lower - interval.upper[reference],
        interval.upper - interval.lower[reference],
    )


# --------------------------------------------------------------------------- helpers
def _point_and_influence(
    utility: Utility, scores: Float[Array, "objective model example"]
) -> tuple[Float[Array, " model"], Float[Array, "model example"]]:
    n = scores.shape[-1]
    ones = jnp.ones((n,), jnp.float32)
    value_and_grad = jax.value_and_grad(lambda v, w: jnp.asarray(utility(v, w), jnp.float32), 1)
    point, grad = jax.vmap(value_and_grad, in_axes=(1, None))(scores, ones)
    return point, grad * jnp.float32(n)


def _same_as_reference(
    scores: Float[Array, "objective model example"], reference: int
) -> Bool[Array, " model"]:
    """Models whose scores equal the reference's on every example and objective.

    Their paired difference is exactly zero. Computing it as `U(model) - U(reference)` from
    two separate reductions leaves rounding noise (~1e-8) with a near-zero standard error,
    which would read as a "significant" difference between identical models (for example a
    roll back to a stable model equal to the current one).
    """
    return jnp.all(scores == scores[:, reference : reference + 1], axis=(0, 2))


def _stderr_from_influence(psi: Float[Array, "model example"]) -> Float[Array, " model"]:
    n = psi.shape[-1]
    if n < 2:
        return jnp.full(psi.shape[:-1], jnp.inf, jnp.float32)
    centred = psi - jnp.mean(psi, axis=-1, keepdims=True)
    return jnp.sqrt(jnp.sum(centred**2, axis=-1) / jnp.float32(n * (n - 1)))


def _resample_weights(key: PRNGKeyArray, num: int, n: int) -> Float[Array, "resample example"]:
    """Multinomial counts of `num` bootstrap resamples of `n` examples."""
    idx = jax.random.randint(key, (num, n), 0, n)
    rows = jnp.broadcast_to(jnp.arange(num)[:, None], (num, n))
    return jnp.zeros((num, n), jnp.float32).at[rows, idx].add(1.0)


def _standardised(
    values: Float[Array, "*b model"], scale: Float[Array, " model"]
) -> Float[Array, "*b model"]:
    """`values / scale`, with `0 / 0 = 0` (a comparison without noise) and `x / 0 = +-inf`."""
    safe = jnp.where(scale > 0, scale, 1.0)
    ratio = values / safe
    degenerate = jnp.where(values > 0, jnp.inf, jnp.where(values < 0, -jnp.inf, 0.0))
    return jnp.where(scale > 0, ratio, degenerate)


def _holm_ranks(
    t: Float[Array, " model"], mask: Bool[Array, " model"]
) -> tuple[Int[Array, " model"], Int[Array, " model"], Int[Array, ""]]:
    """Rank of each comparison by decreasing `t` (masked ones last), the sort order, and `m`."""
    key = jnp.where(mask & ~jnp.isnan(t), t, -jnp.inf)
    order = jnp.argsort(-key, stable=True)
    rank = jnp.argsort(order, stable=True)
    return rank, order, jnp.sum(mask).astype(jnp.int32)


def _holm_chain(
    passes: Bool[Array, " model"], order: Int[Array, " model"], rank: Int[Array, " model"]
) -> Bool[Array, " model"]:
    """Step-down: a comparison is rejected only if every better-ranked one is."""
    chain = jnp.cumprod(passes[order].astype(jnp.int32)).astype(bool)
    return chain[rank]


def _max_critical(
    draws: Float[Array, "resample model"],
    mask: Bool[Array, " model"],
    z: Float[Array, ""],
) -> Float[Array, ""]:
    """Critical value of the maximum of standardised draws over the masked comparisons.

    Clipped to `[z, bonferroni_z(z, m)]`: the maximum statistic's true critical value lies
    there, and a finite number of draws cannot resolve tails finer than `1 / resamples`.
    """
    m = jnp.sum(mask)
    top = jnp.max(jnp.where(mask, draws, -jnp.inf), axis=-1)
    q = jnp.quantile(top, 1.0 - ndtr(-z))
    c = jnp.clip(q, z, bonferroni_z(z, m))
    return jnp.where(m > 0, c, z)


def _normal_intervals(
    point: Float[Array, " model"],
    se: Float[Array, " model"],
    z: Float[Array, ""],
    mask: Bool[Array, " model"],
    correction: str,
    draws: Float[Array, "resample model"] | None,
) -> Interval:
    """`point -+ c * se` with the critical value `c` of the correction."""
    m = jnp.sum(mask)
    if correction == "none":
        c = jnp.broadcast_to(z, point.shape)
    elif correction == "bonferroni":
        c = jnp.where(mask, bonferroni_z(z, m), z)
    elif correction == "max":
        assert draws is not None
        c = jnp.where(mask, _max_critical(draws, mask, z), z)
    else:  # holm
        t = _standardised(point, se)
        rank, order, m = _holm_ranks(t, mask)
        c = jnp.where(mask, bonferroni_z(z, m - rank), z)
        lower = point - c * se
        chain = _holm_chain(lower > 0, order, rank)
        lower = jnp.where(chain | ~mask, lower, jnp.minimum(lower, 0.0))
        return Interval(point=point, lower=lower, upper=point + c * se)
    return Interval(point=point, lower=point - c * se, upper=point + c * se)


def _check_correction(owner: str, correction: str, paired: bool) -> None:
    if correction not in CORRECTIONS:
        raise ConfigurationError(f"{owner}: correction={correction!r} is not one of {CORRECTIONS}.")
    if correction == "holm" and not paired:
        raise ConfigurationError(
            f"{owner}: correction='holm' is a step-down test of 'better than the reference', "
            "which needs a paired bound. Use PairedBound(correction='holm') or "
            "correction='bonferroni' / 'max' here."
        )


def _check_resamples(owner: str, num_resamples: int) -> int:
    if int(num_resamples) < 2:
        raise ConfigurationError(
            f"{owner}: num_resamples={num_resamples} must be at least 2 (1000 is typical; a "
            "one-sided level p needs about 10 / p resamples to resolve its tail)."
        )
    return int(num_resamples)


# --------------------------------------------------------------------------- components
class AbstractBound(eqx.Module):
    """A confidence bound: intervals for a utility of every model in a stack.

    Implement `interval`; say whether it is `paired`. `correction` chooses how the intervals
    of several comparisons (the models in `mask`) are made simultaneous:

    - `"none"`: each interval has level `Phi(-z)` on its own;
    - `"bonferroni"`: each interval has level `Phi(-z) / m` (`m` comparisons): the chance that
      any lower bound is wrong is at most `Phi(-z)`;
    - `"holm"`: Holm's step-down version of it (paired bounds only): a lower bound is above
      zero exactly when Holm's procedure rejects "no better than the reference";
    - `"max"`: the critical value of the maximum of the standardised comparisons, estimated by
      resampling; as safe as Bonferroni and tighter when the comparisons are correlated.
    """

    correction: eqx.AbstractVar[str]

    @property
    @abc.abstractmethod
    def paired(self) -> bool:
        """Whether intervals are of `U(model) - U(reference)` (else marginal, of `U(model)`)."""

    @abc.abstractmethod
    def interval(
        self,
        utility: Utility,
        scores: Float[Array, "objective model example"],
        reference: int,
        z: Float[Array, ""],
        key: PRNGKeyArray,
        mask: Bool[Array, " model"] | None = None,
    ) -> Interval:
        """Intervals of `utility` for every model.

        **Arguments:**

        - `utility`: see `Utility`.
        - `scores`: per-example scores of every model on the same examples.
        - `reference`: index of the model that paired intervals are relative to.
        - `z`: the alpha (number of standard errors; one-sided level `Phi(-z)`).
        - `key`: for resampling (ignored by bounds that do not resample).
        - `mask`: the models that count as comparisons for the correction (default: all but
          the reference). Non-finite models must be left out of it.

        **Returns:** an `Interval`, one entry per model.
        """

    def _mask(
        self, mask: Bool[Array, " model"] | None, num_models: int, reference: int
    ) -> Bool[Array, " model"]:
        base = jnp.ones((num_models,), bool) if mask is None else mask
        if self.paired:
            base = base & (jnp.arange(num_models) != reference)
        return base

    def _influence_intervals(
        self,
        point: Float[Array, " model"],
        psi: Float[Array, "model example"],
        reference: int,
        z: Float[Array, ""],
        key: PRNGKeyArray,
        mask: Bool[Array, " model"] | None,
        num_resamples: int,
    ) -> Interval:
        """Normal intervals from point estimates and influence functions (normal bounds)."""
        mask = self._mask(mask, point.shape[0], reference)
        draws = _multiplier_draws(key, psi, num_resamples) if self.correction == "max" else None
        return _normal_intervals(
            point, _stderr_from_influence(psi), z, mask, self.correction, draws
        )


def _multiplier_draws(
    key: PRNGKeyArray, psi: Float[Array, "model example"], num: int
) -> Float[Array, "resample model"]:
    """Gaussian-multiplier draws of the standardised means: each column is exactly N(0, 1)
    and the columns are correlated as the comparisons are."""
    centred = psi - jnp.mean(psi, axis=-1, keepdims=True)
    norm = jnp.sqrt(jnp.sum(centred**2, axis=-1))
    g = jax.random.normal(key, (num, psi.shape[-1]), jnp.float32)
    return _standardised(g @ centred.T, norm)


class NormalBound(AbstractBound):
    """Unpaired normal bound: each model's own interval `U -+ z * se` (the reference EV3 rule).

    `se` is the standard error of `U` from its influence function (for a mean: `sd / sqrt(n)`
    with `ddof=1`). Intervals are marginal: they ignore that every model was scored on the same
    examples, so comparisons built on them are conservative (see `advantage`). With this bound
    `EV3Scheduler` makes exactly the decisions of the reference implementation, including its
    acceptance rule "highest lower bound wins", which is not a test (see
    `docs/statistics.md`).

    **Arguments:**

    - `correction`: `"none"`, `"bonferroni"` or `"max"` (see `AbstractBound`).
    - `num_resamples`: Gaussian-multiplier draws for `correction="max"`.
    """

    correction: str = eqx.field(static=True, default="none")
    num_resamples: int = eqx.field(static=True, default=2000)

    def __check_init__(self):
        _check_correction("NormalBound", self.correction, paired=False)
        _check_resamples("NormalBound", self.num_resamples)

    @property
    def paired(self) -> bool:
        return False

    def interval(
        self,
        utility: Utility,
        scores: Float[Array, "objective model example"],
        reference: int,
        z: Float[Array, ""],
        key: PRNGKeyArray,
        mask: Bool[Array, " model"] | None = None,
    ) -> Interval:
        point, psi = _point_and_influence(utility, scores)
        return self._influence_intervals(point, psi, reference, z, key, mask, self.num_resamples)


class PairedBound(AbstractBound):
    """Paired normal bound on per-example differences with the reference (the default).

    The interval of `U(model) - U(reference)` is `d -+ z * se(d)`, with `se(d)` from the
    per-example differences of the influence functions (for a mean: the differences
    `x_model - x_reference`, `ddof=1`). Every model is scored on the same examples, so the
    differences cancel the example-to-example variation the models share: narrower intervals
    than `NormalBound` at the same level, hence more power.

    **Arguments:**

    - `correction`: `"none"`, `"bonferroni"`, `"holm"` or `"max"` (see `AbstractBound`).
    - `num_resamples`: Gaussian-multiplier draws for `correction="max"`.

    ```python
    EV3Scheduler(assess_alpha=0.5, decide_alpha=z_for_level(0.95), bound=PairedBound())
    ```
    """

    correction: str = eqx.field(static=True, default="none")
    num_resamples: int = eqx.field(static=True, default=2000)

    def __check_init__(self):
        _check_correction("PairedBound", self.correction, paired=True)
        _check_resamples("PairedBound", self.num_resamples)

    @property
    def paired(self) -> bool:
        return True

    def interval(
        self,
        utility: Utility,
        scores: Float[Array, "objective model example"],
        reference: int,
        z: Float[Array, ""],
        key: PRNGKeyArray,
        mask: Bool[Array, " model"] | None = None,
    ) -> Interval:
        point, psi = _point_and_influence(utility, scores)
        same = _same_as_reference(scores, reference)
        point = jnp.where(same, 0.0, point - point[reference])
        psi = jnp.where(same[:, None], 0.0, psi - psi[reference][None])
        return self._influence_intervals(point, psi, reference, z, key, mask, self.num_resamples)


class BootstrapBound(AbstractBound):
    """Paired bootstrap bound: resample the examples, recompute the utility, take quantiles.

    Each resample draws `n` examples with replacement (as multinomial example weights, the
    same for every model, so the comparison stays paired) and evaluates the utility on it: a
    batch-level metric (F1, AUC, calibration error; see `AbstractBatchAssessor`) is recomputed
    on every resample, so the interval has the metric's own width. Jittable; the resamples come
    from the `key` the scheduler passes.

    **Arguments:**

    - `num_resamples`: bootstrap resamples `B`. A one-sided level `p = Phi(-z)` needs about
      `10 / p` resamples (`B = 1000` is right for `z = 1.645`; the EV3 default `z = 4` has
      `p = 3e-5`: use `method="normal"` there).
    - `method`: `"percentile"` (quantiles `p` and `1 - p` of the resampled differences) or
      `"normal"` (`d -+ z * sd`, with `sd` the bootstrap standard deviation: usable at any `z`).
    - `correction`: `"none"`, `"bonferroni"`, `"holm"` or `"max"` (the maximum of the
      comparisons standardised by their bootstrap standard deviations).
    """

    num_resamples: int = eqx.field(static=True, default=1000)
    method: str = eqx.field(static=True, default="percentile")
    correction: str = eqx.field(static=True, default="none")

    def __check_init__(self):
        _check_correction("BootstrapBound", self.correction, paired=True)
        _check_resamples("BootstrapBound", self.num_resamples)
        if self.method not in ("percentile", "normal"):
            raise ConfigurationError(
                f"BootstrapBound: method={self.method!r} is not 'percentile' or 'normal'."
            )

    @property
    def paired(self) -> bool:
        return True

    def resampled(
        self,
        utility: Utility,
        scores: Float[Array, "objective model example"],
        key: PRNGKeyArray,
    ) -> tuple[Float[Array, " model"], Float[Array, "resample model"]]:
        """`(point, draws)`: the utility of every model on the data and on each resample."""
        n = scores.shape[-1]
        weights = _resample_weights(key, self.num_resamples, n)
        u = lambda v, w: jnp.asarray(utility(v, w), jnp.float32)  # noqa: E731
        per_model = jax.vmap(u, in_axes=(1, None))
        point = per_model(scores, jnp.ones((n,), jnp.float32))
        draws = jax.vmap(per_model, in_axes=(None, 0))(scores, weights)
        return point, draws

    def interval(
        self,
        utility: Utility,
        scores: Float[Array, "objective model example"],
        reference: int,
        z: Float[Array, ""],
        key: PRNGKeyArray,
        mask: Bool[Array, " model"] | None = None,
    ) -> Interval:
        point, draws = self.resampled(utility, scores, key)
        same = _same_as_reference(scores, reference)
        point = jnp.where(same, 0.0, point - point[reference])
        draws = jnp.where(same[None, :], 0.0, draws - draws[:, reference : reference + 1])
        mask = self._mask(mask, point.shape[0], reference)
        sd = jnp.std(draws, axis=0, ddof=1)
        standardised = _standardised(draws - point, sd)
        if self.method == "normal" or self.correction == "max":
            return _normal_intervals(point, sd, z, mask, self.correction, standardised)
        p = ndtr(-z)
        m = jnp.sum(mask)
        if self.correction == "none":
            level = jnp.broadcast_to(p, point.shape)
        elif self.correction == "bonferroni":
            level = jnp.where(mask, p / jnp.maximum(m, 1), p)
        else:  # holm
            rank, order, m = _holm_ranks(_standardised(point, sd), mask)
            level = jnp.where(mask, p / jnp.maximum(m - rank, 1), p)
        quantile = jax.vmap(jnp.quantile, in_axes=(1, 0))
        lower = quantile(draws, level)
        upper = quantile(draws, 1.0 - level)
        if self.correction == "holm":
            chain = _holm_chain(lower > 0, order, rank)
            lower = jnp.where(chain | ~mask, lower, jnp.minimum(lower, 0.0))
        return Interval(point=point, lower=lower, upper=upper)
