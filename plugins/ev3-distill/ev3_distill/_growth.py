"""Growing the student inside an EV3 run, and the archive of students used as teachers.

Growth is host-side: between two compiled steps, `GrowthPolicy.maybe_grow` looks at the
decision history; after `patience` consecutive non-significant decisions it widens (or, once
the width cap is reached, deepens) the current *and* the stable model with the same operator,
and `grow_state` rebuilds the engine state for the new shapes (fresh proposer states, e.g.
optimizer moments, for the new parameter shapes; step, history, scheduler state and PRNG key
kept). The next `Engine.step` re-traces once for the new architecture (it logs "tracing the
EV3 step" on the `ev3core` logger); later steps reuse that program.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import equinox as eqx
import jax
from jaxtyping import PRNGKeyArray

from ev3core import Engine, State, Stateful
from ev3core.errors import ConfigurationError

from ._models import CNN, MLP, GrowMode, count_params, deepen, describe, widen
from ._resnet import ResNet, deepen_resnet, grow_tree, widen_resnet


def _resnet_of(model: Any) -> bool:
    return isinstance(model, Stateful) and isinstance(model.model, ResNet)


def grow_resnet(model: Stateful, op: str, *, factor: float = 2.0, key: PRNGKeyArray) -> Stateful:
    """`widen_resnet` (`op="widen"`) or `deepen_resnet` (`op="deepen"`) of a ResNet held in
    an `ev3core.Stateful`, returning the grown `Stateful` (same `inputs` selector)."""
    if not _resnet_of(model):
        raise ConfigurationError(
            f"grow_resnet: expected ev3core.Stateful(ResNet, state), got {type(model).__name__}."
        )
    if op == "widen":
        m, s = widen_resnet(model.model, model.state, factor, key=key)
    elif op == "deepen":
        m, s = deepen_resnet(model.model, model.state, key=key)
    else:
        raise ConfigurationError(f"grow_resnet: op={op!r} is not 'widen' or 'deepen'.")
    return Stateful(m, s, inputs=model.inputs)


def grow_state(
    engine: Engine,
    state: State,
    new_model: Any,
    new_stable: Any = None,
    *,
    carry: bool = False,
) -> State:
    """The engine state with the model replaced by a (grown) one.

    Proposer states are rebuilt for the new parameter shapes with `proposer.init` (keys split
    from the state's key); with `carry=True` the old proposer states are then grown into them
    (`grow_tree`): optimizer moments keep their values on the old units and start from the
    optimizer's initial values on the new ones, step counts and injected hyperparameters are
    kept, and each `on_reject="continue"` lineage keeps its own weights with the new units of
    the grown current model (zero BatchNorm scales, zero outgoing weights), so every lineage
    computes what it computed before. Use `carry=True` only for growth that keeps every old
    array at its place in the tree and only appends units (`widen`, `widen_resnet`,
    `deepen_resnet`); `deepen` of an MLP or CNN inserts a layer and needs `carry=False`.
    `step`, `history`, `scheduler_state` and `key` are kept. The
    `engine` may also be a different engine with the same number of objectives (for instance
    one with extra teacher losses for a later distillation pass).

    **Arguments:**

    - `engine`: the engine that will step the new state.
    - `state`: the state to carry over.
    - `new_model`: the new current model (an Equinox module).
    - `new_stable`: the new stable model (default: `new_model`); it must have the same
      structure as `new_model`.
    - `carry`: grow the old proposer states instead of starting them afresh (see above).

    **Returns:** the new `State`.
    """
    params, static = eqx.partition(new_model, eqx.is_array)
    if new_stable is None:
        stable = params
    else:
        stable, static_s = eqx.partition(new_stable, eqx.is_array)
        if jax.tree.structure(stable) != jax.tree.structure(params) or any(
            a.shape != b.shape for a, b in zip(jax.tree.leaves(stable), jax.tree.leaves(params))
        ):
            raise ConfigurationError(
                "grow_state: the new stable model does not have the shape of the new current "
                "model; grow both with the same operator."
            )
        del static_s
    keys = jax.random.split(state.key, len(engine.proposers) + 1)
    return State(
        step=state.step,
        key=keys[0],
        current=params,
        stable=stable,
        proposer_states=tuple(
            grow_tree(old, p.init(params, static, k)) if carry else p.init(params, static, k)
            for p, k, old in zip(engine.proposers, keys[1:], state.proposer_states)
        ),
        scheduler_state=state.scheduler_state,
        history=state.history,
        static=static,
    )


@eqx.filter_jit
def _streak(history: Any) -> jax.Array:
    return history.non_significant_streak()


@dataclasses.dataclass
class GrowthPolicy:
    """When and how the student grows.

    After `patience` consecutive non-significant EV3 decisions (and at least `patience`
    steps after the previous growth), the student grows once: every hidden layer (MLP) or
    convolution (CNN) narrower than `max_width` is widened by `factor` (capped at
    `max_width`); when all are at `max_width`, a layer is inserted after the last one while
    the depth is below `max_depth`. A growth that would exceed `max_params` is not done.

    A ResNet student (`ev3core.Stateful(ResNet, state)`) is widened by `factor` while its
    widest stage stays within `max_width`, then deepened (one block per stage, depth + 6)
    while its depth stays within `max_depth` (ResNet depth, `6 s + 2`). Both are
    function-preserving, and the proposer states (optimizer moments, lineages) are grown
    with the model instead of restarting.

    **Arguments:**

    - `patience`: `N`, the number of consecutive non-significant decisions that trigger growth.
    - `max_width`, `max_depth`, `max_params`: the size caps.
    - `factor`: width multiplier per growth.
    - `mode`: `"preserve"` (function-preserving) or `"fresh"` (new parts randomly initialised).
    """

    patience: int = 5
    max_width: int = 32
    max_depth: int = 2
    max_params: int | None = None
    factor: float = 2.0
    mode: GrowMode = "preserve"
    last_growth_step: int = dataclasses.field(default=-(10**9), repr=False)

    def __post_init__(self) -> None:
        if self.patience < 1 or self.max_width < 1 or self.max_depth < 1 or self.factor <= 1:
            raise ConfigurationError(
                f"GrowthPolicy: patience={self.patience}, max_width={self.max_width}, "
                f"max_depth={self.max_depth} must be >= 1 and factor={self.factor} > 1."
            )

    def cap_widths(self) -> tuple[int, ...]:
        """Hidden widths of the largest student this policy can grow (the size cap)."""
        return (self.max_width,) * self.max_depth

    def next_model(self, model: Any, key: PRNGKeyArray) -> tuple[Any, str] | None:
        """`(grown model, description)` of the next growth, or `None` at the cap."""
        if _resnet_of(model):
            net = model.model
            if max(int(round(w * self.factor)) for w in net.widths) <= self.max_width:
                grown = grow_resnet(model, "widen", factor=self.factor, key=key)
                return grown, f"widen {list(net.widths)} -> {list(grown.model.widths)}"
            if net.depth + 6 <= self.max_depth:
                grown = grow_resnet(model, "deepen", key=key)
                return grown, f"deepen depth {net.depth} -> {grown.model.depth}"
            return None
        if not isinstance(model, MLP | CNN):
            return None
        widths = model.widths
        if any(w < self.max_width for w in widths):
            grown = model
            new_widths = []
            for i, w in enumerate(widths):
                target = min(self.max_width, max(w + 1, int(round(w * self.factor))))
                if target > w:
                    key, sub = jax.random.split(key)
                    grown = widen(grown, i, target, mode=self.mode, key=sub)
                new_widths.append(max(w, target))
            op = f"widen {list(widths)} -> {new_widths}"
        elif model.depth < self.max_depth:
            grown = deepen(model, mode=self.mode, key=key)
            op = f"deepen {list(widths)} -> {list(grown.widths)}"
        else:
            return None
        if self.max_params is not None and count_params(grown) > self.max_params:
            return None
        return grown, op

    def should_grow(self, state: State) -> bool:
        step = int(state.step)
        if step - self.last_growth_step < self.patience:
            return False
        return int(_streak(state.history)) >= self.patience

    def maybe_grow(
        self, engine: Engine, state: State, key: PRNGKeyArray
    ) -> tuple[State, str | None]:
        """Grow if the trigger fired; returns `(state, description or None)`."""
        if not self.should_grow(state):
            return state, None
        nxt = self.next_model(state.model, key)
        if nxt is None:
            return state, None
        grown, op = nxt
        # The same operator with the same key: the stable model keeps its own weights and,
        # in preserve mode, its own outputs.
        stable, _ = self.next_model(state.stable_model, key)  # type: ignore[misc]
        self.last_growth_step = int(state.step)
        carry = _resnet_of(grown) or op.startswith("widen")
        return grow_state(engine, state, grown, stable, carry=carry), op


@dataclasses.dataclass
class StudentArchive:
    """The best student of each size (parameter count) by decide-set accuracy.

    Later distillation passes can add the archived students as extra teachers
    (`best(n)`).
    """

    entries: dict[int, tuple[float, Any]] = dataclasses.field(default_factory=dict)

    def offer(self, model: Any, accuracy: float) -> bool:
        """Keep `model` if it beats the archived model of its size; returns whether kept."""
        size = count_params(model)
        if size in self.entries and self.entries[size][0] >= accuracy:
            return False
        self.entries[size] = (float(accuracy), model)
        return True

    def best(self, n: int = 1) -> list[tuple[int, float, Any]]:
        """The `n` most accurate archived students as `(params, accuracy, model)`."""
        ranked = sorted(self.entries.items(), key=lambda kv: (-kv[1][0], kv[0]))
        return [(size, acc, m) for size, (acc, m) in ranked[:n]]

    def summary(self) -> list[dict[str, Any]]:
        return [
            {"params": size, "decide_accuracy": acc, "architecture": describe(m)}
            for size, (acc, m) in sorted(self.entries.items())
            if describe(m) is not None
        ]
