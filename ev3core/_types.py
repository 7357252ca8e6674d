"""The pytrees that flow through one EV3 step.

Index conventions used everywhere:

* candidates are stacked on a leading axis of size `K` (all proposers concatenated, in the
  order the proposers were given);
* assessment stacks `K + 2` models: the `K` candidates, then the current model (index `K`),
  then the stable model (index `K + 1`);
* the decide stage stacks three models in the order `(winner, current, stable)`
  (positions `WINNER`, `CURRENT`, `STABLE`; the decision among them is a `Choice`).

Scores are always "higher is better": an assessor of a quantity to be minimised returns its
negation.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator
from typing import Any, cast

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Bool, Float, Int, PRNGKeyArray, PyTree

from ._stateful import batch_apply
from .errors import ConfigurationError

#: Position of the assess winner in the decide stage's stacked models.
WINNER = 0
#: Position of the current model in the decide stage's stacked models.
CURRENT = 1
#: Position of the stable model in the decide stage's stacked models.
STABLE = 2


class Choice(eqx.Enumeration):
    """Which of `(winner, current, stable)` the adapt stage makes the new current model.

    An Equinox enumeration: items are pytrees holding one int32 array, so a `Choice` passes
    through `jax.jit`, `jax.vmap` and `jax.lax.scan` like any array. Compare items with `==`
    (`decision.choice == Choice.winner`, an array of bools), pick one with
    `Choice.where(pred, Choice.winner, Choice.current)` (a scalar boolean `pred`), and read
    the name on the host with `Choice[item]` (`"winner"`, `"current"` or `"stable"`; the
    names JSON-lines logs use).

    - `winner`: accept the assess winner.
    - `current`: keep the current model.
    - `stable`: roll back to the stable model.

    Each item's position in the decide stage's stacked models is `choice_index(item)`
    (`WINNER`, `CURRENT`, `STABLE`), and `choice_at(index)` is the item at a position.
    """

    # `cast`: the value is the item's name at run time, and type checkers see an item.
    winner = cast("Choice", "winner")
    current = cast("Choice", "current")
    stable = cast("Choice", "stable")


#: The decide stage's stacked models, in order (`_DECIDE_ORDER[WINNER] is Choice.winner`).
_DECIDE_ORDER = (Choice.winner, Choice.current, Choice.stable)


def choice_index(choice: Choice) -> Int[Array, "*batch"]:
    """The position of `choice` in the decide stage's stacked models: `WINNER` (0),
    `CURRENT` (1) or `STABLE` (2), and `-1` for a value that is none of them (a hand-made
    item out of range). Jittable; a stacked (`vmap`, `scan`) choice gives one position per
    element. Index the decide scores or means with it (`decide_mean[:, choice_index(c)]`)."""
    if not isinstance(choice, Choice):
        raise TypeError(f"choice_index: expected an ev3core.Choice item, got {choice!r}.")
    positions = [choice == item for item in _DECIDE_ORDER]
    return jnp.select(positions, [jnp.int32(i) for i in range(len(positions))], jnp.int32(-1))


def choice_name(choice: Choice) -> str:
    """`Choice[choice]`, the name of one concrete (host) choice: `"winner"`, `"current"` or
    `"stable"`."""
    return Choice[choice]  # type: ignore[misc]  # the enumeration's metaclass indexes it


def choice_at(index: Int[Array, ""] | int) -> Choice:
    """The `Choice` at position `index` of the decide stage's stacked models (the inverse of
    `choice_index`): `Choice.winner` for `WINNER`, `Choice.stable` for `STABLE` and
    `Choice.current` for `CURRENT` or any other value. Jittable (a scalar `index`); lets a
    scheduler that ranks the three models by position (an `argmax`) return its pick."""
    index = jnp.asarray(index)
    return Choice.where(
        index == WINNER,
        Choice.winner,
        Choice.where(index == STABLE, Choice.stable, Choice.current),
    )


class Data(eqx.Module):
    """The three data streams of an EV3 run.

    Each stream is any pytree of arrays sharing a leading *example* axis (for instance a
    tuple `(x, y)`). The engine samples from them with its own key, so the whole data set can
    live on the device; a host loop may instead pass small fresh streams at every step (keep
    their shapes fixed to avoid recompiling). Host NumPy arrays are accepted too (a
    `DataStream` yields them and puts them on the device).

    **Arguments:**

    - `propose`: examples the proposers train on.
    - `assess`: examples on which every candidate, the current and the stable model are scored
      to pick the winner.
    - `decide`: examples on which the winner, the current and the stable model are scored to
      make the accept / roll back decision.
    """

    propose: PyTree[Array | np.ndarray]
    assess: PyTree[Array | np.ndarray]
    decide: PyTree[Array | np.ndarray]


class Outcome(eqx.Module):
    """What the adapt stage decided, as seen by a proposer after the step.

    **Arguments:**

    - `accepted_index`: index of the accepted candidate *within this proposer's candidates*,
      or `-1` if none of them was accepted.
    - `accepted`: whether any candidate was accepted this step.
    - `significant`: whether the stable model was replaced this step.
    - `params`: the new current parameters.
    - `changed`: whether the current model changed this step (accepted, or rolled back to
      the stable model); `None` (for outcomes built by hand) means the same as `accepted`.
    - `scores`: each objective's assess summary (`assessor.summary`, higher is better) of
      *this proposer's* candidates, `-inf` where a candidate was masked invalid; the engine
      always fills it, `None` for outcomes built by hand. Population methods rank their
      members on it (`PBTProposer`, `Evolve(truncate=...)`).
    """

    accepted_index: Int[Array, ""]
    accepted: Bool[Array, ""]
    significant: Bool[Array, ""]
    params: PyTree[Array]
    changed: Bool[Array, ""] | None = None
    scores: Float[Array, "objective candidate"] | None = None

    @property
    def current_changed(self) -> Bool[Array, ""]:
        """`changed`, or `accepted` when `changed` is `None`."""
        return self.accepted if self.changed is None else self.changed


class Decision(eqx.Module):
    """The adapt stage's verdict for one step.

    **Arguments:**

    - `choice`: which of `(winner, current, stable)` becomes the new current model, a
      `Choice` (`Choice.winner`, `Choice.current` or `Choice.stable`).
    - `update_stable`: whether the winner replaces the stable model.
    - `significant`: whether the step counts as a significant improvement (recorded in the
      history; schedulers and proposers react to runs of non-significant steps).
    - `lower`, `upper`: the confidence bounds the decision used, one per decide model.
    - `priorities`: the weight each objective had in this decision (sums to one).
    """

    choice: Choice
    update_stable: Bool[Array, ""]
    significant: Bool[Array, ""]
    lower: Float[Array, 3]
    upper: Float[Array, 3]
    priorities: Float[Array, " objective"]


class History(eqx.Module):
    """A fixed-size ring buffer of past decisions, as arrays (never Python lists).

    Row `i` holds the step `count - size + i` after `count >= size`; use `History.last(n)` or
    `History.ordered()` rather than indexing directly. `count` is the number of decisions ever
    recorded. `choice` holds each decision's position `choice_index(decision.choice)`
    (`WINNER`, `CURRENT` or `STABLE`; `-1` in rows never written).
    """

    step: Int[Array, " size"]
    winner: Int[Array, " size"]
    choice: Int[Array, " size"]
    accepted: Bool[Array, " size"]
    significant: Bool[Array, " size"]
    score: Float[Array, "size objective"]
    count: Int[Array, ""]

    @staticmethod
    def empty(size: int, num_objectives: int) -> History:
        if size < 1:
            raise ConfigurationError(
                f"History size must be at least 1, got history_size={size}. "
                "Pass a positive history_size to the pipeline."
            )
        return History(
            step=jnp.full((size,), -1, jnp.int32),
            winner=jnp.full((size,), -1, jnp.int32),
            choice=jnp.full((size,), -1, jnp.int32),
            accepted=jnp.zeros((size,), bool),
            significant=jnp.zeros((size,), bool),
            score=jnp.full((size, num_objectives), jnp.nan, jnp.float32),
            count=jnp.zeros((), jnp.int32),
        )

    @property
    def size(self) -> int:
        return self.step.shape[0]

    def record(
        self,
        step: Int[Array, ""],
        winner: Int[Array, ""],
        choice: Int[Array, ""],
        accepted: Bool[Array, ""],
        significant: Bool[Array, ""],
        score: Float[Array, " objective"],
    ) -> History:
        """Append one decision, overwriting the oldest once the buffer is full."""
        i = self.count % self.size
        return History(
            step=self.step.at[i].set(step),
            winner=self.winner.at[i].set(winner),
            choice=self.choice.at[i].set(choice),
            accepted=self.accepted.at[i].set(accepted),
            significant=self.significant.at[i].set(significant),
            score=self.score.at[i].set(score),
            count=self.count + 1,
        )

    def ordered(self) -> History:
        """The same history rolled so that row `-1` is the most recent decision."""
        shift = -(self.count % self.size)
        full = self.count >= self.size
        shift = jnp.where(full, shift, 0)
        roll = lambda x: jnp.roll(x, shift, axis=0)  # noqa: E731
        return History(
            step=roll(self.step),
            winner=roll(self.winner),
            choice=roll(self.choice),
            accepted=roll(self.accepted),
            significant=roll(self.significant),
            score=roll(self.score),
            count=self.count,
        )

    def non_significant_streak(self) -> Int[Array, ""]:
        """Number of consecutive non-significant decisions up to the latest one."""
        # Walk backwards from the newest entry; entries never written count as "unknown"
        # and stop the streak.
        size = self.size
        idx = (self.count - 1 - jnp.arange(size)) % size
        written = jnp.arange(size) < self.count
        nonsig = (~self.significant[idx]) & written
        return jnp.sum(jnp.cumprod(nonsig.astype(jnp.int32))).astype(jnp.int32)


class StepInfo(eqx.Module):
    """What one step reports, all arrays (no host synchronisation is needed to produce it).

    **Arguments:**

    - `step`: index of the step that produced this info (0 for the first).
    - `winner`: index of the assess winner among the `K` candidates.
    - `choice`: the decision, a `Choice` (see `Decision`); `Choice[info.choice]` is its name
      on the host, `choice_index(info.choice)` its position in `decide_mean`.
    - `accepted`: the winner became the current model.
    - `rolled_back`: the stable model became the current model.
    - `significant`: the stable model was replaced.
    - `num_invalid`: candidates masked this step because their parameters or scores were not
      finite.
    - `valid`: per-candidate validity mask.
    - `assess_mean`: mean score of each objective for every candidate, current and stable.
    - `decide_mean`: mean score of each objective for winner, current and stable on the
      decide set.
    - `decide_lower`, `decide_upper`: the confidence bounds of the decision.
    - `priorities`: the objective priorities used by the decision.
    - `bad_indices`: how many indices the scheduler returned out of range this step (a
      `select` outside `[0, K)`, a `decide` choice that is no `Choice` item); the
      engine treats each as "keep the current model" and `ev3core.run` logs them.
    """

    step: Int[Array, ""]
    winner: Int[Array, ""]
    choice: Choice
    accepted: Bool[Array, ""]
    rolled_back: Bool[Array, ""]
    significant: Bool[Array, ""]
    num_invalid: Int[Array, ""]
    valid: Bool[Array, " candidate"]
    assess_mean: Float[Array, "objective model"]
    decide_mean: Float[Array, "objective 3"]
    decide_lower: Float[Array, 3]
    decide_upper: Float[Array, 3]
    priorities: Float[Array, " objective"]
    bad_indices: Int[Array, ""]


class State(eqx.Module):
    """The whole engine state: a pure pytree, so it can be jitted, scanned and saved.

    **Arguments:**

    - `step`: number of steps taken.
    - `key`: the PRNG key for the next step.
    - `current`, `stable`: the array leaves of the current and of the stable model (the
      non-array part of the model lives in `static`).
    - `static`: the non-array part of the model (activation functions, layer sizes...). It is
      part of the tree structure: growing the network changes it and re-traces the step once.
    - `proposer_states`: one state per proposer, in pipeline order.
    - `scheduler_state`: the adapt stage's state.
    - `history`: the decision ring buffer.
    """

    step: Int[Array, ""]
    key: PRNGKeyArray
    current: PyTree[Array]
    stable: PyTree[Array]
    proposer_states: tuple[Any, ...]
    scheduler_state: PyTree[Any]
    history: History
    static: Any = eqx.field(static=True)

    @property
    def model(self) -> Any:
        """The current model, as a full Equinox module."""
        return eqx.combine(self.current, self.static)

    @property
    def stable_model(self) -> Any:
        """The stable model, as a full Equinox module."""
        return eqx.combine(self.stable, self.static)


def split_model(model: Any) -> tuple[PyTree[Array], Any]:
    """Split a model into its array leaves and the rest (see `State.static`)."""
    return eqx.partition(model, eqx.is_array)


def tree_stack(trees: list[PyTree[Array]]) -> PyTree[Array]:
    """Stack structurally identical pytrees of arrays on a new leading axis."""
    return jax.tree.map(lambda *xs: jnp.stack(xs), *trees)


def tree_concat(trees: list[PyTree[Array]]) -> PyTree[Array]:
    """Concatenate stacked pytrees of arrays along their leading axis."""
    if len(trees) == 1:
        return trees[0]
    return jax.tree.map(lambda *xs: jnp.concatenate(xs), *trees)


def tree_index(tree: PyTree[Array], i: Int[Array, ""] | int) -> PyTree[Array]:
    """Take element `i` of the leading axis of every leaf."""
    return jax.tree.map(lambda x: x[i], tree)


def tree_where(
    pred: Bool[Array, ""], on_true: PyTree[Array], on_false: PyTree[Array]
) -> PyTree[Array]:
    """Leaf-wise `jnp.where` with a scalar predicate."""
    return jax.tree.map(lambda a, b: jnp.where(pred, a, b), on_true, on_false)


def same_structure(a: Any, b: Any) -> bool:
    """Whether two pytrees have the same tree structure (node types, static fields, arity)."""
    return bool(jax.tree.structure(a) == jax.tree.structure(b))  # type: ignore[operator]


def tree_all_finite(tree: PyTree[Array], batch_dims: int = 0) -> Bool[Array, ...]:
    """Whether every inexact leaf is finite, reduced over all but `batch_dims` leading axes."""
    leaves = [x for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.inexact)]
    if not leaves:
        return jnp.ones((), bool)
    out = jnp.all(jnp.isfinite(leaves[0]), axis=tuple(range(batch_dims, leaves[0].ndim)))
    for x in leaves[1:]:
        out = out & jnp.all(jnp.isfinite(x), axis=tuple(range(batch_dims, x.ndim)))
    return out


def _as_float_array(x: Any) -> Float[Array, ""]:
    return jnp.asarray(x, dtype=jnp.float32)


#: Forward passes already traced while one model is scored (see `shared_forward`).
_FORWARD_MEMO: contextvars.ContextVar[list[tuple[Any, Any, Any, Array]] | None] = (
    contextvars.ContextVar("ev3core_forward_memo", default=None)
)


def _trace_state() -> Any:
    try:
        from jax._src.core import get_opaque_trace_state
    except ImportError:  # pragma: no cover - then nothing is shared
        return None
    return get_opaque_trace_state()


@contextlib.contextmanager
def shared_forward() -> Iterator[None]:
    """While tracing one model's scores, assessors that call the model on the same batch
    share one traced forward pass (`Accuracy` and `NegCrossEntropy` of the smoke pipeline
    trace the MLP once, not twice): a smaller program that compiles faster. A pass is only
    reused for the very same model and batch objects in the same trace, so the values are
    exactly those of separate passes."""
    token = _FORWARD_MEMO.set([])
    try:
        yield
    finally:
        _FORWARD_MEMO.reset(token)


def _logits(model: Any, x: Array) -> Float[Array, "example class"]:
    memo = _FORWARD_MEMO.get()
    if memo is None:
        return batch_apply(model, x)
    trace = _trace_state()
    if trace is not None:
        for m, xs, t, out in memo:
            if m is model and xs is x and t == trace:
                return out
    out = batch_apply(model, x)
    if trace is not None:
        memo.append((model, x, trace, out))
    return out
