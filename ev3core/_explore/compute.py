"""Compute accounting: what one engine step spends on gradients."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from .._interfaces import AbstractProposer
from ..errors import ConfigurationError
from .blocks import GradientProposerState
from .gradient import GradientProposer
from .pbt import PBTProposer


def _per_proposer(proposer: AbstractProposer, state: Any) -> int:
    if isinstance(proposer, PBTProposer):
        proposer = proposer.proposer
    if not isinstance(proposer, GradientProposer):
        raise ConfigurationError(
            f"gradient_evaluations: {type(proposer).__name__} is not one of ev3core's gradient "
            "proposers (GradientProposer, PBTProposer), so its gradient cost is unknown here. "
            "Count it yourself and add it, or leave that proposer out."
        )
    steps = proposer.steps
    if proposer.grows and isinstance(state, GradientProposerState) and state.length is not None:
        steps = int(state.length)
    return proposer.num_candidates * steps


def gradient_evaluations(proposers: Any, state: Any = None, *, examples: bool = False) -> int:
    """Minibatch gradient evaluations one engine step spends in its gradient proposers.

    Each candidate (or PBT member) takes `steps` optimizer steps per engine step, each one
    gradient of the loss on `batch_size` examples, so a step costs the sum over candidates of
    their trajectory lengths. With trajectory growth (`max_steps > steps`) the length in use
    is read from `state` (an engine `State`, or the proposers' states in order); without a
    state, the starting length `steps` is counted.

    **Arguments:**

    - `proposers`: an `Engine`, a `Pipeline`, a proposer or a sequence of proposers.
    - `state`: an engine `State` (or the tuple of proposer states), for grown lengths.
    - `examples`: count examples (`x batch_size`) instead of gradient evaluations.

    **Returns:** an `int`.

    ```python
    engine = Pipeline([GradientProposer([CrossEntropy()], [Optimizer(optax.sgd,
                       learning_rate=0.1)] * 4, steps=50)]).build()
    gradient_evaluations(engine)  # 4 candidates x 50 steps = 200 per engine step
    ```
    """
    if hasattr(proposers, "proposers"):  # an Engine or a Pipeline
        proposers = proposers.proposers
    if isinstance(proposers, AbstractProposer):
        proposers = (proposers,)
    proposers = tuple(proposers)
    for p in proposers:
        if not isinstance(p, AbstractProposer):
            raise ConfigurationError(
                f"gradient_evaluations: {p!r} is not a proposer instance (resolve names first: "
                "pass the built Engine rather than the Pipeline)."
            )
    states: Sequence[Any] = (None,) * len(proposers)
    if state is not None:
        states = getattr(state, "proposer_states", state)
    total = 0
    for p, s in zip(proposers, states):
        n = _per_proposer(p, s)
        if examples:
            inner = p.proposer if isinstance(p, PBTProposer) else p
            n *= inner.batch_size
        total += n
    return total
