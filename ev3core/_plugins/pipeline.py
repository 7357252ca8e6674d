"""Composing a pipeline in plain Python."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax

from .._engine.engine import Engine
from .._interfaces import ComponentName
from .manager import Plugins, plugin_manager

ComponentSpec = Any  # an instance, a registered name, or a class to instantiate with no arguments


class Pipeline:
    """A user's EV3 pipeline: components by instance, by class or by registered name.

    `build()` resolves names through the plugins (nested ones too, such as
    `EV3Scheduler(bound="bootstrap")`), lets stage hooks (`ev3_explore`, `ev3_assess`,
    `ev3_adapt`) adjust each stage, and returns a compiled-ready `Engine`.

    **Arguments:**

    - `proposers`: explore-stage components (or names such as `"gradient"` with default
      arguments; use `ev3core.make("proposer", name, **kwargs)` to pass arguments).
    - `assessors`: objectives; the first is the primary one. Default `("accuracy",)`.
    - `scheduler`: the adapt stage. Default `"ev3"`.
    - `assess_size`, `decide_size`, `history_size`, `mesh`, `chunk_size`: see `Engine`
      (`mesh=ev3core.candidate_mesh()` spreads the candidates over every device).
    - `plugins`: a `Plugins` instance (default: `ev3core.plugin_manager()`).

    ```python
    pipeline = Pipeline(
        proposers=[GradientProposer(losses=[CrossEntropy()], optimizers=[optax.sgd(0.1)])],
        assessors=["accuracy", "neg_cross_entropy"],
        scheduler=EV3Scheduler(assess_alpha=0.5, decide_alpha=4.0),
    )
    engine = pipeline.build()
    ```
    """

    def __init__(
        self,
        proposers: Sequence[ComponentSpec],
        assessors: Sequence[ComponentSpec] = ("accuracy",),
        scheduler: ComponentSpec = "ev3",
        *,
        assess_size: int = 128,
        decide_size: int = 2048,
        history_size: int = 64,
        mesh: Any = None,
        chunk_size: int | None = None,
        plugins: Plugins | None = None,
    ):
        if isinstance(proposers, str) or not isinstance(proposers, Sequence):
            proposers = [proposers]
        if isinstance(assessors, str) or not isinstance(assessors, Sequence):
            assessors = [assessors]
        self.proposers = tuple(proposers)
        self.assessors = tuple(assessors)
        self.scheduler = scheduler
        self.assess_size = assess_size
        self.decide_size = decide_size
        self.history_size = history_size
        self.mesh = mesh
        self.chunk_size = chunk_size
        self.plugins = plugins

    def build(self) -> Engine:
        """Resolve every component and return the `Engine`."""
        plugins = self.plugins if self.plugins is not None else plugin_manager()
        hook = plugins.pm.hook
        proposers, assessors, scheduler = resolve_names(
            (
                tuple(plugins.resolve("proposer", p) for p in self.proposers),
                tuple(plugins.resolve("assessor", a) for a in self.assessors),
                plugins.resolve("scheduler", self.scheduler),
            ),
            plugins,
        )
        proposers = tuple(hook.ev3_explore(proposers=proposers, assessors=assessors))
        assessors = tuple(hook.ev3_assess(assessors=assessors))
        scheduler = hook.ev3_adapt(scheduler=scheduler, assessors=assessors)
        return Engine(
            proposers=proposers,
            assessors=assessors,
            scheduler=scheduler,
            assess_size=self.assess_size,
            decide_size=self.decide_size,
            history_size=self.history_size,
            mesh=self.mesh,
            chunk_size=self.chunk_size,
        )


def _is_name(x: Any) -> bool:
    return isinstance(x, ComponentName)


def resolve_names(components: Any, plugins: Plugins) -> Any:
    """`components` with every `ComponentName` inside replaced by the registered component
    (repeatedly: a resolved component may itself name others)."""
    for _ in range(16):
        names = [x for x in jax.tree.leaves(components, is_leaf=_is_name) if _is_name(x)]
        if not names:
            return components
        components = jax.tree.map(
            lambda x: plugins.resolve(x.kind, x.name) if _is_name(x) else x,
            components,
            is_leaf=_is_name,
        )
    return components  # a name that resolves to itself: the engine reports what is left
