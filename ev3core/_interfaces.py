"""Stage interfaces: one abstract `eqx.Module` per stage of an EV3 step.

Concrete components are final modules: wrap them, do not subclass them. Numbers a user may
tune are array leaves (so changing them never recompiles); structure (sizes, names, choices)
is `eqx.field(static=True)`.

Conventions shared by every stage:

* parameters are the *array leaves* of an Equinox model (`eqx.filter(model, eqx.is_array)`);
  the non-array part (`static`) is passed alongside, and `eqx.combine(params, static)` gives
  the model back;
* a model is called on **one example** (Equinox convention); components `jax.vmap` over
  examples themselves;
* scores are **higher is better**.
"""

import abc
import dataclasses
from collections.abc import Sequence
from typing import Any, ClassVar

import equinox as eqx
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int, PRNGKeyArray, PyTree, Scalar

from ._types import Decision, History, Outcome


@dataclasses.dataclass(frozen=True)
class ComponentName:
    """A component given by its registered name inside another component (for instance
    `EV3Scheduler(bound="bootstrap")`).

    Components never look up the plugin registry themselves: `Pipeline.build()` replaces
    every `ComponentName` by the component its plugins register under that name, and an
    `Engine` built directly refuses one that is left.
    """

    kind: str
    name: str

    def __str__(self) -> str:
        return f"{self.kind} {self.name!r}"


class AbstractLoss(eqx.Module):
    """A differentiable training loss used by gradient proposers.

    A loss may carry extra state as fields: array hyperparameters (a temperature), a teacher
    model, precomputed teacher logits. Losses of the same class whose non-array fields are
    equal are stacked and `vmap`ped together.
    """

    @abc.abstractmethod
    def __call__(self, model: Any, batch: PyTree[Array], key: PRNGKeyArray) -> Scalar:
        """The mean loss of `model` on `batch` (lower is better)."""

    @property
    @abc.abstractmethod
    def label(self) -> str:
        """A short human-readable name used in candidate labels (the loss and its
        hyperparameters, e.g. `"ce(T=0.5)"`; `type(self).__name__` for a loss without any)."""


class AbstractReferenceLoss(AbstractLoss):
    """A training loss that also sees a *reference model*: the model the proposer's
    trajectories start from, that is the engine's current (accepted) model.

    This is how a candidate learns from the model EV3 has accepted so far (self-distillation:
    under label noise, the accepted model's predictions correct the labels it has not
    memorized). `GradientProposer` (and so `PBTProposer`) calls
    `with_reference(model, reference, batch, key)` with the current model as `reference`,
    the same for every step of an iteration. A plain call `loss(model, batch, key)` (a
    training loop without an accepted model, such as a grid-search baseline) passes the model
    itself, which makes the loss a bootstrapping loss on the model's own predictions.

    Implementations compute the reference's outputs under `jax.lax.stop_gradient` (the
    reference is a target, never trained through), in float32 for low-precision models.
    """

    @abc.abstractmethod
    def with_reference(
        self, model: Any, reference: Any, batch: PyTree[Array], key: PRNGKeyArray
    ) -> Scalar:
        """The mean loss of `model` on `batch` given the `reference` model."""

    def __call__(self, model: Any, batch: PyTree[Array], key: PRNGKeyArray) -> Scalar:
        return self.with_reference(model, model, batch, key)


class AbstractProposer(eqx.Module):
    """The explore stage: maps the current parameters to `K` candidate parameters.

    A proposer never needs the final objective to be differentiable: it returns full
    candidate parameters (not deltas), stacked on a leading axis.
    """

    @property
    @abc.abstractmethod
    def num_candidates(self) -> int:
        """`K`, the number of candidates returned by every call of `propose` (static)."""

    @abc.abstractmethod
    def labels(self) -> tuple[str, ...]:
        """One provenance label per candidate, e.g. `"ce(T=0.5)|sgd"`."""

    @abc.abstractmethod
    def init(self, params: PyTree[Array], static: Any, key: PRNGKeyArray) -> PyTree[Any]:
        """The proposer's initial state (optimizer states, ES state, ...)."""

    @abc.abstractmethod
    def propose(
        self,
        params: PyTree[Array],
        static: Any,
        state: PyTree[Any],
        data: PyTree[Array],
        key: PRNGKeyArray,
    ) -> tuple[PyTree[Array], PyTree[Any]]:
        """Produce candidates.

        **Arguments:**

        - `params`: the current parameters (array leaves of the model).
        - `static`: the non-array part of the model.
        - `state`: this proposer's state.
        - `data`: the whole propose stream (leading example axis); sample from it with `key`.
        - `key`: a PRNG key for this call.

        **Returns:**

        `(candidates, state)`: `candidates` has the structure of `params` with an extra
        leading axis of size `num_candidates`.
        """

    @abc.abstractmethod
    def adapt(self, state: PyTree[Any], outcome: Outcome) -> PyTree[Any]:
        """Update the state after the adapt stage decided; a proposer that ignores the
        decision returns `state` unchanged. `outcome.accepted_index` is the index of this
        proposer's accepted candidate (or `-1`), `outcome.scores` its candidates' assess
        summaries."""


class AbstractAssessor(eqx.Module):
    """The assess stage: scores one model on a batch, per example, higher is better.

    The score need not be differentiable (accuracy uses an argmax).

    Every assessor declares `direction` (a class attribute): `"max"` for scores that are
    better when higher (the convention: negate a quantity to be minimised), `"min"` for a
    score the objectives must minimise. `EV3Scheduler` takes an objective's direction from
    it, and an `Engine` refuses an `Objective` that pulls the other way.
    """

    direction: eqx.AbstractClassVar[str]

    @property
    @abc.abstractmethod
    def name(self) -> str:
        """The objective's name, used in logs and by multi-objective schedulers."""

    @abc.abstractmethod
    def __call__(self, model: Any, batch: PyTree[Array]) -> Float[Array, " example"]:
        """Per-example scores of `model` on `batch`, higher is better."""


class AbstractBatchAssessor(AbstractAssessor):
    """An assessor whose objective is a batch-level metric.

    `__call__(model, batch)` returns one float per example that encodes everything `metric`
    needs about that example; `metric(values, weights)` computes the metric (higher is better)
    from those values with non-negative example weights. `metric` must be invariant to
    multiplying every weight by the same constant (normalise by the weights' sum) and
    differentiable in the weights almost everywhere; it needs no gradient in the model.
    """

    per_example: ClassVar[bool] = False

    @abc.abstractmethod
    def metric(
        self, values: Float[Array, " example"], weights: Float[Array, " example"]
    ) -> Float[Array, ""]:
        """The batch-level metric of the encoded `values` weighted by `weights`."""


def objective_value(
    assessor: AbstractAssessor, values: Float[Array, " example"]
) -> Float[Array, ""]:
    """An objective's value on a batch from its assessor's per-example scores: the mean, or
    the metric of a batch-level assessor (every example weighted 1). The engine logs it
    (`StepInfo.assess_mean`, `decide_mean`, `History.score`)."""
    if isinstance(assessor, AbstractBatchAssessor):
        return jnp.asarray(assessor.metric(values, jnp.ones_like(values)), jnp.float32)
    return jnp.mean(values)


class AbstractScheduler(eqx.Module):
    """The adapt stage: picks the assess winner and decides accept / roll back / stable.

    Both methods see the scores of every objective (`objective` axis first) and the history.
    """

    @abc.abstractmethod
    def bind(self, assessors: Sequence[AbstractAssessor]) -> "AbstractScheduler":
        """This scheduler configured for a pipeline's assessors (called once, when an engine
        is built; the engine keeps what it returns).

        Return `self` when there is nothing to configure. `EV3Scheduler` names its
        objectives after the assessors and uses the metric of batch-level assessors, so
        constraints can name objectives.
        """

    @abc.abstractmethod
    def init(self, num_objectives: int, key: PRNGKeyArray) -> PyTree[Any]:
        """The scheduler's initial state for `num_objectives` assessors.

        `key` is the scheduler's share of the engine key: keep it in the state for anything
        random (bootstrap resamples, bandit draws), so runs with different keys differ.
        """

    @abc.abstractmethod
    def select(
        self,
        scores: Float[Array, "objective model example"],
        valid: Bool[Array, " candidate"],
        state: PyTree[Any],
        history: History,
    ) -> Int[Array, ""]:
        """Index of the assess winner among the candidates.

        `scores` stacks the `K` candidates, then current, then stable (`model = K + 2`).
        An invalid candidate must never be returned while a valid one exists.
        """

    @abc.abstractmethod
    def decide(
        self,
        scores: Float[Array, "objective 3 example"],
        winner_valid: Bool[Array, ""],
        state: PyTree[Any],
        history: History,
    ) -> tuple[Decision, PyTree[Any]]:
        """Decide on the decide set among `(winner, current, stable)`.

        An invalid winner (`winner_valid` false) must never be chosen or made stable.
        """
