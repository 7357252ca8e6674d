"""Hook specifications of the `ev3` pluggy project: the plugin reference.

A plugin is any module or object with functions marked `@ev3core.hookimpl` whose names
match the hooks below. Third-party plugins are found through the `ev3` entry-point group:

```toml
[project.entry-points.ev3]
mything = "ev3_mything.plugin"
```

Hooks come in three families.

* **Registration hooks** (`ev3_register_*`) add named components. They are called once per
  kind, the first time a component of that kind is looked up by name.
* **Stage hooks** (`ev3_explore`, `ev3_assess`, `ev3_adapt`) resolve each stage of a
  pipeline when `Pipeline.build()` runs. They are host-side Python: pluggy is never
  dispatched inside the compiled step.
* **Lifecycle hooks** (`ev3_run_start`, `ev3_after_step`, `ev3_run_end`) are called by the
  host run loop `ev3core.run` between compiled steps, for loggers, checkpointers and progress
  display.

Implementations may accept any subset of a hook's arguments (pluggy passes them by name), so
new arguments can be added to a hook without breaking existing plugins.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pluggy

if TYPE_CHECKING:
    from ._engine import Engine
    from ._interfaces import AbstractAssessor, AbstractProposer, AbstractScheduler
    from ._pipeline import Pipeline
    from ._types import State, StepInfo

PROJECT_NAME = "ev3"

hookspec = pluggy.HookspecMarker(PROJECT_NAME)
hookimpl = pluggy.HookimplMarker(PROJECT_NAME)


# ------------------------------------------------------------------ registration hooks
@hookspec
def ev3_register_proposers() -> dict[str, type[AbstractProposer]] | None:
    """Register named proposers (explore-stage components).

    **When:** once per plugin manager, the first time a proposer is looked up by name
    (`Pipeline(proposers=["name"])`, `ev3core.make("proposer", "name", ...)`,
    `ev3 plugins`).

    **Returns:** a mapping from name to a concrete subclass of `AbstractProposer` (or
    `None`). Names are global across plugins: two plugins registering the same name is a
    `DuplicateComponentError` naming both.

    **Calling rule:** collect-all; ev3core calls each implementation separately so that a
    failing plugin is reported and skipped without affecting the others.

    ```python
    @ev3core.hookimpl
    def ev3_register_proposers():
        return {"my_noise": MyNoiseProposer}
    ```
    """


@hookspec
def ev3_register_assessors() -> dict[str, type[AbstractAssessor]] | None:
    """Register named assessors (assess-stage objectives).

    **When / returns / calling rule:** as `ev3_register_proposers`, with subclasses of
    `AbstractAssessor`. Assessors return per-example scores, higher is better.
    """


@hookspec
def ev3_register_schedulers() -> dict[str, type[AbstractScheduler]] | None:
    """Register named schedulers (adapt-stage decision rules and priority schedulers).

    **When / returns / calling rule:** as `ev3_register_proposers`, with subclasses of
    `AbstractScheduler`.
    """


@hookspec
def ev3_register_losses() -> dict[str, type] | None:
    """Register named training losses for gradient proposers.

    **When / returns / calling rule:** as `ev3_register_proposers`, with subclasses of
    `AbstractLoss`.
    """


# ------------------------------------------------------------------ stage hooks
@hookspec(firstresult=True)
def ev3_explore(
    pipeline: Pipeline, proposers: tuple[AbstractProposer, ...]
) -> tuple[AbstractProposer, ...] | None:
    """Resolve the explore stage of a pipeline being built.

    **When:** once per `Pipeline.build()`, after names were resolved to components.

    **Arguments:** the `pipeline` being built and its `proposers`, in order.

    **Returns:** the proposers the engine will use.

    **Calling rule:** first result. The built-in implementation (`trylast`) returns
    `proposers` unchanged. To change every pipeline's explore stage, write a new-style
    wrapper:

    ```python
    @ev3core.hookimpl(wrapper=True)
    def ev3_explore(proposers):
        result = yield
        return result + (MyExtraProposer(),)
    ```
    """


@hookspec(firstresult=True)
def ev3_assess(
    pipeline: Pipeline, assessors: tuple[AbstractAssessor, ...]
) -> tuple[AbstractAssessor, ...] | None:
    """Resolve the assess stage of a pipeline being built.

    **When / calling rule:** as `ev3_explore` (first result; built-in returns `assessors`
    unchanged; use a wrapper to add or wrap objectives).

    **Returns:** the assessors the engine will use; the first one is the primary objective
    unless the scheduler says otherwise.
    """


@hookspec(firstresult=True)
def ev3_adapt(pipeline: Pipeline, scheduler: AbstractScheduler) -> AbstractScheduler | None:
    """Resolve the adapt stage of a pipeline being built.

    **When / calling rule:** as `ev3_explore` (first result; built-in returns `scheduler`
    unchanged; use a wrapper to wrap or replace it).

    **Returns:** the scheduler the engine will use.
    """


# ------------------------------------------------------------------ lifecycle hooks
@hookspec
def ev3_run_start(engine: Engine, state: State, num_steps: int) -> None:
    """Called by `ev3core.run` once, before the first step, on the host.

    **Arguments:** the `engine`, the initial `state`, and the number of steps planned.

    **Calling rule:** collect-all; return values are ignored. An exception stops the run
    before any step is taken and names the plugin.
    """


@hookspec
def ev3_after_step(engine: Engine, state: State, info: StepInfo, step: int) -> None:
    """Called by `ev3core.run` after each EV3 step, on the host.

    **Arguments:** the `engine`, the `state` after the step, that step's `info` (a
    `StepInfo` of arrays for this step only) and its index `step` (0-based). When the run
    loop scans several steps in one compiled call (`chunk > 1`), the hook is called once per
    step after the chunk, and `state` is the state at the end of the chunk.

    **Calling rule:** collect-all; return values are ignored. Reading `info` forces a device
    synchronisation: loggers that need speed should read only every N steps.
    """


@hookspec
def ev3_run_end(engine: Engine, state: State, infos: list[StepInfo]) -> None:
    """Called by `ev3core.run` once after the last step (also when the run stops early).

    **Arguments:** the `engine`, the final `state`, and the per-step `infos` collected.

    **Calling rule:** collect-all; return values are ignored.
    """


__all__ = [
    "PROJECT_NAME",
    "hookimpl",
    "hookspec",
    "ev3_register_proposers",
    "ev3_register_assessors",
    "ev3_register_schedulers",
    "ev3_register_losses",
    "ev3_explore",
    "ev3_assess",
    "ev3_adapt",
    "ev3_run_start",
    "ev3_after_step",
    "ev3_run_end",
]


def _all_hook_names() -> list[str]:
    return [n for n in __all__ if n.startswith("ev3_")]


_ = Any  # keep typing import for annotations under TYPE_CHECKING
