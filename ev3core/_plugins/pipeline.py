"""Composing a pipeline in plain Python."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from .._engine.engine import Engine
from .manager import Plugins, plugins as default_plugins

ComponentSpec = Any  # an instance, a registered name, or a class to instantiate with no arguments


class Pipeline:
    """A user's EV3 pipeline: components by instance, by class or by registered name.

    `build()` resolves names through the plugins, lets stage hooks (`ev3_explore`,
    `ev3_assess`, `ev3_adapt`) adjust each stage, and returns a compiled-ready `Engine`.

    **Arguments:**

    - `proposers`: explore-stage components (or names such as `"gradient"` with default
      arguments; use `ev3core.make("proposer", name, **kwargs)` to pass arguments).
    - `assessors`: objectives; the first is the primary one. Default `("accuracy",)`.
    - `scheduler`: the adapt stage. Default `"ev3"`.
    - `assess_size`, `decide_size`, `history_size`, `mesh`, `chunk_size`: see `Engine`
      (`mesh=ev3core.candidate_mesh()` spreads the candidates over every device).
    - `plugins`: a `Plugins` instance (default: `ev3core.plugins()`).

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
        plugins = self.plugins if self.plugins is not None else default_plugins()
        proposers = tuple(plugins.resolve("proposer", p) for p in self.proposers)
        assessors = tuple(plugins.resolve("assessor", a) for a in self.assessors)
        scheduler = plugins.resolve("scheduler", self.scheduler)
        # A stage hook that raises is a PluginError naming its plugin.
        proposers = tuple(plugins.call_hook("ev3_explore", pipeline=self, proposers=proposers))
        assessors = tuple(plugins.call_hook("ev3_assess", pipeline=self, assessors=assessors))
        scheduler = plugins.call_hook("ev3_adapt", pipeline=self, scheduler=scheduler)
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
