"""Population-based training (Jaderberg et al. 2017) as an explore-stage component."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import optax
from jaxtyping import Array, Float, PRNGKeyArray, PyTree

from .._interfaces import AbstractLoss, AbstractProposer
from .._types import Outcome
from ..errors import ConfigurationError
from .blocks import GradientProposerState, check_hyper_names, ranks
from .gradient import GradientProposer
from .hyper import Optimizer
from .population import rows_of


class PBTProposer(AbstractProposer):
    """Population-based training: `K` members train on, the worst copy the best.

    As Ray Tune's `PopulationBasedTraining`: the population is the grid of losses x
    optimizers of a `GradientProposer` (candidate order and labels as there); each member is a
    lineage that continues from its own endpoint, `steps` optimizer steps per EV3 step (the
    perturbation interval `N` is the trajectory length). After every step the members are
    ranked on their assess score (`Outcome.scores[objective]`, the summary of assessor
    `objective` on the assess stream); each member of the bottom `quantile` (and every member
    whose parameters are not finite) is replaced by a uniformly drawn member of the top
    `quantile`: **exploit** copies its parameters *and* optimizer state (with its
    hyperparameters, and its loss leaves when the losses are of one group); **explore** then
    multiplies each named hyperparameter by `perturb[0]` or `perturb[1]` (a fair coin), or,
    with probability `resample_probability`, resamples it from the initial population's
    values. The other members continue untouched.

    Pair it with the `AlwaysAccept` scheduler (`"always_accept"`): the current model is then
    the best member by the same assess ranking, which is the model PBT returns. Pairing it with
    `EV3Scheduler` gives PBT exploration behind EV3's safety gate. The ranking uses the assess
    stream: to rank on a particular split (e.g. the decide split of a comparison), pass it as
    `Data.assess`.

    Hyperparameters are per-member array leaves (the optimizer states' `hyperparams` and
    the state's `loss_params`), so exploit and explore never recompile.

    **Arguments:**

    - `losses`, `optimizers`, `steps`, `batch_size`, `optimizer_names`, `chunk_size`: as for
      `GradientProposer`; the optimizers must share one family (one optax factory and static
      arguments, e.g. `Optimizer(optax.sgd, learning_rate=lr, momentum=0.9)` for several
      `lr`) so that optimizer states can be copied between members.
    - `names`: the hyperparameters explore perturbs (optimizer hyperparameters and/or array
      fields of the losses).
    - `quantile`: the fraction of members replaced per step (Ray's `quantile_fraction`,
      in `(0, 0.5]`; at least one member).
    - `perturb`: the two multiplicative factors (array leaf; Ray: `(0.8, 1.2)`).
    - `resample_probability`: probability of resampling a hyperparameter instead of
      perturbing it (array leaf).
    - `objective`: the assessor whose summary ranks the members.

    ```python
    proposer = PBTProposer(
        losses=[CrossEntropy()],
        optimizers=[Optimizer(optax.sgd, learning_rate=lr) for lr in (0.3, 0.1, 0.03, 0.01)],
        steps=50, batch_size=32,
    )
    engine = Pipeline([proposer], assessors=["accuracy"], scheduler="always_accept").build()
    ```
    """

    proposer: GradientProposer
    names: tuple[str, ...] = eqx.field(static=True)
    quantile: Float[Array, ""]
    perturb: Float[Array, 2]
    resample_probability: Float[Array, ""]
    objective: int = eqx.field(static=True)

    def __init__(
        self,
        losses: Sequence[AbstractLoss],
        optimizers: Sequence[Optimizer | optax.GradientTransformation],
        steps: int = 100,
        batch_size: int = 32,
        *,
        names: Sequence[str] = ("learning_rate",),
        quantile: float | Array = 0.25,
        perturb: tuple[float, float] | Array = (0.8, 1.2),
        resample_probability: float | Array = 0.25,
        objective: int = 0,
        optimizer_names: Sequence[str] | None = None,
        chunk_size: int | None = None,
    ):
        inner = GradientProposer(
            losses=losses,
            optimizers=optimizers,
            steps=steps,
            batch_size=batch_size,
            on_reject="continue",
            optimizer_names=optimizer_names,
            chunk_size=chunk_size,
        )
        families = {opt.family for opt in inner.optimizers}
        if len(families) > 1:
            raise ConfigurationError(
                "PBTProposer: members copy each other's optimizer state, so every optimizer "
                f"must be of one family; got {len(families)} (different optax factories, static "
                "arguments or hyperparameter names, or several plain GradientTransformations). "
                "Use ev3core.Optimizer specs of one factory, e.g. "
                "[Optimizer(optax.sgd, learning_rate=lr) for lr in (0.1, 0.03)]."
            )
        if isinstance(names, str):
            names = (names,)
        if not isinstance(quantile, jax.core.Tracer) and not 0.0 < float(quantile) <= 0.5:
            raise ConfigurationError(
                f"PBTProposer: quantile={quantile} must be in (0, 0.5] (the bottom and top "
                "fractions must not overlap)."
            )
        if inner.num_candidates < 2:
            raise ConfigurationError(
                "PBTProposer needs a population of at least 2 members; give more losses or "
                "optimizers."
            )
        check_hyper_names(inner, tuple(names), "PBTProposer")
        self.proposer = inner
        self.names = tuple(names)
        self.quantile = jnp.asarray(quantile, jnp.float32)
        self.perturb = jnp.asarray(perturb, jnp.float32)
        if self.perturb.shape != (2,):
            raise ConfigurationError(
                f"PBTProposer: perturb={perturb} must be two factors, e.g. (0.8, 1.2)."
            )
        self.resample_probability = jnp.asarray(resample_probability, jnp.float32)
        self.objective = int(objective)

    @property
    def num_candidates(self) -> int:
        return self.proposer.num_candidates

    def _num_replaced(self) -> Array:
        K = self.num_candidates
        n = jnp.ceil(self.quantile * K).astype(jnp.int32)
        return jnp.clip(n, 1, K // 2)

    @property
    def num_replaced(self) -> int:
        """Members replaced per step: `ceil(quantile * K)`, at least 1 and at most `K // 2`."""
        return int(self._num_replaced())

    def labels(self) -> tuple[str, ...]:
        return self.proposer.labels()

    def init(self, params: PyTree[Array], static: Any, key: PRNGKeyArray) -> GradientProposerState:
        state = self.proposer.init(params, static, key)
        return GradientProposerState(
            opt_states=state.opt_states,
            lineages=state.lineages,
            loss_params=self.proposer.initial_loss_params(),
            key=key,
        )

    def propose(
        self,
        params: PyTree[Array],
        static: Any,
        state: GradientProposerState,
        data: PyTree[Array],
        key: PRNGKeyArray,
    ) -> tuple[PyTree[Array], GradientProposerState]:
        # Members continue their own lineages; `params` (the current model) is not a start.
        return self.proposer.propose(params, static, state, data, key)

    def adapt(self, state: GradientProposerState, outcome: Outcome) -> GradientProposerState:
        """Exploit and explore (ranked on `outcome.scores`); without scores (an outcome built
        by hand) only non-finite members are replaced."""
        inner = self.proposer
        assert state.key is not None  # init stores the key that exploit and explore draw from
        K, n = self.num_candidates, self._num_replaced()
        key, k_pick, k_coin, k_resample, k_from = jax.random.split(state.key, 5)
        finite = inner.lineages_finite(state)
        if outcome.scores is None:
            score = jnp.zeros((K,), jnp.float32)
            bottom = jnp.zeros((K,), bool)
        else:
            score = outcome.scores[self.objective]
            bottom = ranks(jnp.where(jnp.isfinite(score), score, -jnp.inf)) < n
        score = jnp.where(finite & jnp.isfinite(score), score, -jnp.inf)
        order = jnp.argsort(score, stable=True)  # the top n are finite whenever any member is
        within = jnp.floor(jax.random.uniform(k_pick, (K,)) * n.astype(jnp.float32))
        rank = K - n + within.astype(jnp.int32)  # a uniform draw among the top n
        exploit = bottom | ~finite
        src = jnp.where(exploit, order[jnp.clip(rank, K - n, K - 1)], jnp.arange(K))
        state = inner.copy_rows(state, src, lineages=True)
        slots = inner.slots(state, self.names)
        m = max(len(slots), 1)
        up = jax.random.bernoulli(k_coin, 0.5, (m, K))
        resample = jax.random.bernoulli(k_resample, self.resample_probability, (m, K))
        draw = jax.random.uniform(k_from, (m, K))
        for i, slot in enumerate(slots):
            v = inner.get_slot(state, slot)
            v0 = inner.initial_slot(slot).astype(v.dtype)  # the initial population's values
            pick0 = jnp.floor(rows_of(draw[i], slot) * v0.shape[0]).astype(jnp.int32)
            fresh = v0[jnp.clip(pick0, 0, v0.shape[0] - 1)]
            factor = jnp.where(rows_of(up[i], slot), self.perturb[1], self.perturb[0])
            moved = jnp.where(
                _rows(rows_of(resample[i], slot), v), fresh, v * _rows(factor, v).astype(v.dtype)
            )
            new = jnp.where(_rows(rows_of(exploit, slot), v), moved, v).astype(v.dtype)
            state = inner.set_slot(state, slot, new)
        return GradientProposerState(
            opt_states=state.opt_states,
            lineages=state.lineages,
            loss_params=state.loss_params,
            key=key,
        )


def _rows(mask: Array, x: Array) -> Array:
    return mask.reshape(mask.shape + (1,) * (x.ndim - 1))
