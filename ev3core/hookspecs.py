"""Hook specifications of the `ev3` pluggy project: the plugin reference.

A plugin is any module or object with functions marked `@ev3core.hookimpl` whose names
match the hooks below. Third-party plugins are found through the `ev3` entry-point group:

```toml
[project.entry-points.ev3]
mything = "ev3_mything.plugin"
```

Hooks come in three families.

* **Registration hooks** (`ev3_register_*`) add named components (and named experiments and
  observers). They are called once per kind, the first time one of that kind is looked up
  by name.
* **Stage hooks** (`ev3_explore`, `ev3_assess`, `ev3_adapt`) resolve each stage of a
  pipeline when `Pipeline.build()` runs, on components whose names were already resolved
  (they never see the `Pipeline`). They are host-side Python: pluggy is never
  dispatched inside the compiled step.
* **Lifecycle hooks** (`ev3_run_start`, `ev3_after_step`, `ev3_run_end`) are called by the
  host run loop `ev3core.run` between compiled steps, for loggers, checkpointers and progress
  display. A plugin's implementations run for every run; an object passed to
  `ev3core.run(observers=[...])` with methods of the same names runs for that run only, and
  so does an observer a plugin registered by name (`ev3_register_observers`) when a run
  names it (`observers=["name"]`, `ev3 run --observer name`).

Implementations may accept any subset of a hook's arguments (pluggy passes them by name), so
new arguments can be added to a hook without breaking existing plugins.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pluggy

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence

    from ._adapt.bounds import AbstractBound
    from ._adapt.priorities import AbstractPriority
    from ._engine.engine import Engine
    from ._interfaces import AbstractAssessor, AbstractProposer, AbstractScheduler
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


@hookspec
def ev3_register_bounds() -> dict[str, type[AbstractBound]] | None:
    """Register named confidence bounds (how the adapt stage decides "reliably better").

    **When:** once per plugin manager, the first time a bound is looked up by name
    (`EV3Scheduler(bound="name")`, `ev3core.make("bound", "name", ...)`, `ev3 plugins`).

    **Returns:** a mapping from name to a concrete subclass of `AbstractBound` (or `None`).
    A bound's `interval(utility, scores, reference, z, key, mask)` must be jittable and give,
    for every model of the stack, an interval whose one-sided level is `Phi(-z)` per side
    (after its correction over the models in `mask`); `paired` says whether intervals are of
    the advantage over `reference` or marginal. The built-in plugin registers `"normal"`
    (unpaired, the reference EV3 rule), `"paired"` (the default) and `"bootstrap"`.

    **Calling rule:** collect-all, like the other registration hooks; two plugins
    registering the same name is a `DuplicateComponentError` naming both.

    ```python
    @ev3core.hookimpl
    def ev3_register_bounds():
        return {"my_bound": MyBound}
    ```
    """


@hookspec
def ev3_register_priorities() -> dict[str, type[AbstractPriority]] | None:
    """Register named priority schedulers ("which objective matters now").

    **When:** once per plugin manager, the first time a priority scheduler is looked up by
    name (`EV3Scheduler(priority="name")`, `ev3core.make("priority", "name", ...)`,
    `ev3 plugins`).

    **Returns:** a mapping from name to a concrete subclass of `AbstractPriority` (or
    `None`). Its `priorities(state, history, key)` must not look at the step's data (it is
    called before the data is seen), and its state lives in the scheduler state (so it is
    jitted, scanned and checkpointed with the engine). The built-in plugin registers
    `"lexicographic"`, `"weighted_sum"`, `"chebyshev"`, `"stall"`, `"ucb"` and `"exp3"`.

    **Calling rule:** collect-all, like the other registration hooks; two plugins
    registering the same name is a `DuplicateComponentError` naming both.

    ```python
    @ev3core.hookimpl
    def ev3_register_priorities():
        return {"my_priority": MyPriority}
    ```
    """


@hookspec
def ev3_register_experiments() -> dict[str, Callable[..., dict]] | None:
    """Register named experiments: whole jobs that `ev3 run` can run.

    **When:** once per plugin manager, the first time an experiment is looked up (every
    `ev3 run`, and `ev3 plugins`).

    **Returns:** a mapping from name to a callable (or `None`). `ev3 run` calls it with keyword
    arguments only: `steps` (EV3 iterations, or `None` for the experiment's default),
    `seed`, `out` (output directory or `None`), `dataset` (or `None`), `pipeline` (path of a
    user's pipeline file, or `None`) and `progress` (show a progress bar). It returns a
    JSON-serialisable summary `dict`, which `ev3 run` prints (and writes with `--json`).
    An experiment should ignore `None` options and raise `ev3core.errors.ConfigurationError`
    for bad ones.

    `ev3 run` may also pass `resume` (a directory of an earlier run of this experiment, which
    `ev3 run --out` recorded as this experiment's), `checkpoint_every`, `keep`, `observers`
    (per-run lifecycle observer objects: the `--log-jsonl` logger and those named with
    `--observer`, already built; pass them to `ev3core.run(observers=...)`), and `chunk`,
    `examples`, `print_every` when given on the command line. `ev3 run` with no
    `--experiment` runs `ev3_default_experiment`'s answer; `ev3 run --smoke` runs the
    built-in `"smoke"` experiment, and `ev3 run FILE.py` the built-in `"file"` experiment
    (the file's own `model`, `data` and `pipeline`).

    **Calling rule:** collect-all, like the other registration hooks; two plugins
    registering the same name is a `DuplicateComponentError` naming both.

    ```python
    @ev3core.hookimpl
    def ev3_register_experiments():
        return {"my_job": my_job}  # def my_job(*, steps, seed, out, **options) -> dict
    ```
    """


@hookspec
def ev3_register_observers() -> dict[str, Callable[..., Any]] | None:
    """Register named lifecycle observers: loggers, progress displays, writers that users
    enable by name for one run, instead of hooks that run for every run.

    **When:** once per plugin manager, the first time an observer is looked up by name
    (`ev3core.run(observers=["name"])`, `ev3 run --observer name`,
    `ev3core.make("observer", "name", ...)`, `ev3 plugins`).

    **Returns:** a mapping from name to a factory (or `None`): a callable (often the
    observer's class) that takes keyword options only and returns an observer, an object
    with one or more methods named like the lifecycle hooks (`ev3_run_start`,
    `ev3_after_step`, `ev3_run_end`). `ev3core.run(observers=["name"])` calls it with no
    arguments; `ev3 run --observer name:key=value,...` passes the options given;
    `ev3core.make("observer", "name", **options)` any. A factory should raise
    `ev3core.errors.ConfigurationError` for bad options. The built-in plugin registers
    `"progress"` (`ProgressBar`) and `"jsonl"` (`JsonlLogger`, which needs `path=`).

    A registered observer does nothing until a run names it. (A plugin that implements the
    lifecycle hooks themselves is called by every run.)

    **Calling rule:** collect-all, like the other registration hooks; two plugins
    registering the same name is a `DuplicateComponentError` naming both.

    ```python
    @ev3core.hookimpl
    def ev3_register_observers():
        return {"my_logger": MyLogger}  # MyLogger(**options) has ev3_after_step(info, step)
    ```
    """


@hookspec(firstresult=True)
def ev3_default_experiment() -> str | None:
    """Name the experiment `ev3 run` runs when no `--experiment` is given.

    **When:** once per `ev3 run` without `--experiment`, `--smoke`, `--resume` or a run file
    (`ev3 run FILE.py` runs the built-in `"file"` experiment).

    **Returns:** the registered name of an experiment (this plugin's main job), or `None`.

    **Calling rule:** first result. The built-in implementation (`trylast`) answers
    `"smoke"`, so an installed plugin's answer wins.

    ```python
    @ev3core.hookimpl
    def ev3_default_experiment():
        return "my_job"
    ```
    """


# ------------------------------------------------------------------ conformance hook
@hookspec
def ev3_conformance_examples(kind: str, name: str, cls: type) -> list | None:
    """Give example instances of a registered component for the conformance kit.

    **When:** by `ev3core.testing` (`examples`, `registered_examples`, `check_registered`),
    never during a run: once per registered component that a test suite checks.

    **Arguments:** the component's `kind` (`"proposer"`, `"assessor"`, `"scheduler"`,
    `"loss"`, `"bound"`, `"priority"`), its registered `name` and its class `cls`.

    **Returns:** a list of instances of `cls` (or of `ev3core.testing.Example`, an instance
    with check options such as its own model, data or `num_objectives`), or `None` when this
    plugin has no example for that component. Answer for your own components only.
    Components that this hook gives no example for are checked as `cls()`; one whose
    constructor needs arguments must be given an example here.

    **Calling rule:** collect-all; the examples of every plugin are concatenated.

    ```python
    @ev3core.hookimpl
    def ev3_conformance_examples(kind, name, cls):
        if cls is MyProposer:
            return [MyProposer(scale=0.1), MyProposer(scale=0.1, population=2)]
    ```
    """


# ------------------------------------------------------------------ stage hooks
@hookspec(firstresult=True)
def ev3_explore(
    proposers: tuple[AbstractProposer, ...], assessors: tuple[AbstractAssessor, ...]
) -> tuple[AbstractProposer, ...] | None:
    """Resolve the explore stage of a pipeline being built.

    **When:** once per `Pipeline.build()`, after every name (nested ones included, such as
    `EV3Scheduler(bound="bootstrap")`) was resolved to a component.

    **Arguments:** the pipeline's `proposers`, in order, and its resolved `assessors` (the
    first is the primary objective), for proposers that score candidates themselves.

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
def ev3_assess(assessors: tuple[AbstractAssessor, ...]) -> tuple[AbstractAssessor, ...] | None:
    """Resolve the assess stage of a pipeline being built.

    **When / calling rule:** as `ev3_explore` (first result; built-in returns `assessors`
    unchanged; use a wrapper to add or wrap objectives).

    **Returns:** the assessors the engine will use; the first one is the primary objective
    unless the scheduler says otherwise.
    """


@hookspec(firstresult=True)
def ev3_adapt(
    scheduler: AbstractScheduler, assessors: tuple[AbstractAssessor, ...]
) -> AbstractScheduler | None:
    """Resolve the adapt stage of a pipeline being built.

    **When / calling rule:** as `ev3_explore` (first result; built-in returns `scheduler`
    unchanged; use a wrapper to wrap or replace it). `assessors` are the ones `ev3_assess`
    returned (the engine binds the scheduler to them afterwards).

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

    **Calling rule:** collect-all; return values are ignored. With `chunk > 1`, `info` holds
    read-only NumPy arrays, views of the run's info log (the run loop brings each chunk's
    infos to the host in one transfer, and builds the per-step `StepInfo`s only when a
    plugin or observer implements this hook); copy an array to change it. With `chunk=1` it
    holds device arrays, and reading them waits for the step, so loggers that need speed
    read every N steps.
    """


@hookspec
def ev3_run_end(engine: Engine, state: State, infos: Sequence[StepInfo]) -> None:
    """Called by `ev3core.run` once after the last step (also when the run stops early).

    **Arguments:** the `engine`, the final `state`, and the per-step `infos` collected (a
    sequence of `StepInfo`s of NumPy arrays, already copied off the device).

    After Ctrl-C the run stops at a step boundary and calls this hook before raising
    `ev3core.errors.RunInterrupted`, so a checkpointer can write a final checkpoint. When an
    error stopped the run, `int(state.step) == start_step + len(infos)` tells whether every
    step in `state` was seen by every `ev3_after_step` hook (`ev3core.Checkpointer` saves only
    then).

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
    "ev3_register_bounds",
    "ev3_register_priorities",
    "ev3_register_experiments",
    "ev3_register_observers",
    "ev3_default_experiment",
    "ev3_conformance_examples",
    "ev3_explore",
    "ev3_assess",
    "ev3_adapt",
    "ev3_run_start",
    "ev3_after_step",
    "ev3_run_end",
]


def _all_hook_names() -> list[str]:
    return [n for n in __all__ if n.startswith("ev3_")]
