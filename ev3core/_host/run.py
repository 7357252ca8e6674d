"""The host run loop: compiled steps with lifecycle hooks between them."""

from __future__ import annotations

import logging
import signal
import threading
import traceback
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np

from .._engine.engine import Engine
from .._faults import component_owner, describe_component
from .._plugins.manager import Plugins, plugin_manager
from .._types import Data, State, StepInfo
from ..errors import ComponentError, ConfigurationError, EV3Error, PluginError, RunInterrupted

logger = logging.getLogger("ev3core")

_LIFECYCLE = ("ev3_run_start", "ev3_after_step", "ev3_run_end")


class _StopOnInterrupt:
    """Turn the first Ctrl-C (SIGINT) into a request to stop at the next step boundary.

    A second Ctrl-C raises `KeyboardInterrupt` at once. Only installed from the main thread
    and only over Python's default handler (a handler the user installed is left alone).
    """

    def __init__(self) -> None:
        self.requested = False
        self._installed = False
        self._previous: Any = None

    def __enter__(self) -> _StopOnInterrupt:
        if threading.current_thread() is threading.main_thread():
            current = signal.getsignal(signal.SIGINT)
            if current is signal.default_int_handler:
                self._previous = signal.signal(signal.SIGINT, self._handle)
                self._installed = True
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        logger.warning(
            "ev3core: interrupted; stopping after the current step (Ctrl-C again to stop now)"
        )

    def __exit__(self, *exc: object) -> None:
        if self._installed:
            signal.signal(signal.SIGINT, self._previous)
            self._installed = False


def _culprit(hook_caller: Any, exc: BaseException, observers: Sequence[Any] = ()) -> str:
    codes = {
        impl.function.__code__: impl.plugin_name
        for impl in hook_caller.get_hookimpls()
        if hasattr(impl.function, "__code__")
    }
    name = hook_caller.name
    for obs in observers:
        method = getattr(obs, name, None)
        if method is not None and hasattr(method, "__code__"):
            codes[method.__code__] = f"observer {type(obs).__name__}"
    for frame, _ in traceback.walk_tb(exc.__traceback__):
        if frame.f_code in codes:
            return codes[frame.f_code]
    return "<unknown plugin>"


def _guarded(engine: Engine, plugins: Plugins, fn: Any, *args: Any) -> Any:
    """Call a compiled engine method; a component's exception becomes `ComponentError`."""
    try:
        return fn(*args)
    except EV3Error:
        raise
    except Exception as exc:
        owner = component_owner(engine, exc)
        if owner is None:
            raise
        who = describe_component(*owner, plugins=plugins)
        raise ComponentError(
            f"{who} raised {type(exc).__name__}: {exc}. The run was stopped before this step "
            "changed the state (checkpoints already written are intact). Fix the component "
            "or remove it from the pipeline."
        ) from exc


def call_lifecycle(
    plugins: Plugins, name: str, observers: Sequence[Any] = (), **kwargs: Any
) -> None:
    """Call a lifecycle hook on the plugins and on this run's `observers` (objects with
    methods named like the hooks); an exception is re-raised as `PluginError` naming the
    plugin or observer."""
    caller = getattr(plugins.pm.hook, name)
    extra = [m for m in (getattr(o, name, None) for o in observers) if m is not None]
    try:
        if extra:
            caller.call_extra(extra, kwargs)
        else:
            caller(**kwargs)
    except Exception as exc:
        raise PluginError(
            f"plugin {_culprit(caller, exc, observers)!r} raised in {name}: "
            f"{type(exc).__name__}: {exc}. The run was stopped; the state passed to the hook "
            "is intact."
        ) from exc


def _check_observers(observers: Sequence[Any]) -> None:
    for obs in observers:
        if not any(hasattr(obs, h) for h in _LIFECYCLE):
            raise ConfigurationError(
                f"run: observer {obs!r} has none of the lifecycle methods {list(_LIFECYCLE)}. "
                "An observer is an object with methods named like the lifecycle hooks, e.g. "
                "ev3core.ProgressBar() or ev3core.Checkpointer(dir)."
            )


def _host_steps(stacked: StepInfo, n: int) -> list[StepInfo]:
    """`n` per-step infos from a scanned chunk: one transfer, then NumPy views."""
    host = jax.device_get(stacked)
    return [jax.tree.map(lambda x, i=i: x[i], host) for i in range(n)]


def run(
    engine: Engine,
    state: State,
    data: Data,
    num_steps: int,
    *,
    plugins: Plugins | None = None,
    observers: Sequence[Any] = (),
    chunk: int = 1,
) -> tuple[State, StepInfo | None]:
    """Run `num_steps` EV3 steps on the host, calling the lifecycle hooks.

    **Arguments:**

    - `engine`, `state`, `data`: as for `Engine.step`.
    - `num_steps`: steps to take.
    - `plugins`: whose lifecycle hooks to call (default `ev3core.plugin_manager()`).
    - `observers`: objects for this run only (a `ProgressBar`, a `Checkpointer`, a
      `JsonlLogger`, your own) whose methods named like the lifecycle hooks are called
      after the plugins' implementations; nothing is registered on `plugins`.
    - `chunk`: steps per compiled call; `chunk > 1` runs `chunk` steps in one `lax.scan`
      (faster when the data lives on the device) and calls `ev3_after_step` for each of them
      after the chunk. Each chunk's infos come to the host in one transfer (hooks see
      `StepInfo`s of NumPy arrays); with `chunk=1` hooks see device arrays, and reading one
      waits for that step.

    **Returns:** `(final_state, infos)`, where `infos` is a `StepInfo` of NumPy arrays with a
    leading axis of size `num_steps` (`None` when `num_steps` is 0).

    **Raises:** `ev3core.errors.RunInterrupted` (a `KeyboardInterrupt`) after Ctrl-C: the run
    stops at the next step boundary, calls `ev3_run_end` (so a `Checkpointer` writes a final
    checkpoint) and raises with the state reached. `ComponentError` when a component's own
    code raises (naming it and its plugin); `PluginError` when a lifecycle hook raises.
    """
    if int(num_steps) < 0 or int(chunk) < 1:
        raise ConfigurationError(
            f"run: num_steps={num_steps} must be >= 0 and chunk={chunk} must be >= 1."
        )
    plugins = plugins if plugins is not None else plugin_manager()
    observers = tuple(observers)
    _check_observers(observers)
    # Abstract evaluation (no compilation) of every component on the data's shapes.
    _guarded(engine, plugins, engine.check_data, data, state)
    call_lifecycle(
        plugins, "ev3_run_start", observers, engine=engine, state=state, num_steps=num_steps
    )
    infos: list[StepInfo] = []
    done = 0
    # Ctrl-C stops at the next step boundary, so `ev3_run_end` (checkpointers) sees a
    # consistent state; a second Ctrl-C stops at once.
    with _StopOnInterrupt() as stop:
        try:
            while done < num_steps and not stop.requested:
                n = min(chunk, num_steps - done)
                if n == 1:
                    # device arrays: the host queues the next step unless a hook reads them
                    state, info = _guarded(engine, plugins, engine.step, state, data)
                    batch = [info]
                else:
                    state, stacked = _guarded(engine, plugins, engine.scan, state, data, n)
                    batch = _host_steps(stacked, n)
                for info in batch:
                    call_lifecycle(
                        plugins, "ev3_after_step", observers,
                        engine=engine, state=state, info=info, step=done,
                    )  # fmt: skip
                    infos.append(info)
                    done += 1
        finally:
            call_lifecycle(
                plugins, "ev3_run_end", observers, engine=engine, state=state, infos=infos
            )
    if infos:
        host = jax.device_get(infos)  # one transfer for the steps not yet on the host
        stacked_infos = jax.tree.map(lambda *xs: np.stack(xs), *host)
        masked = int(np.sum(stacked_infos.num_invalid))
        if masked:
            logger.warning(
                "ev3core: %d candidate(s) had non-finite parameters or scores in %d step(s) and "
                "were masked (never accepted).",
                masked,
                int(np.sum(stacked_infos.num_invalid > 0)),
            )
    else:
        stacked_infos = None
    if stop.requested and done < num_steps:
        raise RunInterrupted(
            f"ev3core.run was interrupted after {done} of {num_steps} step(s) (engine step "
            f"{int(state.step)}); the lifecycle hooks, checkpointers included, have run.",
            state=state,
            infos=stacked_infos,
            steps_done=done,
        )
    return state, stacked_infos
