"""The host run loop: compiled steps with lifecycle hooks between them."""

from __future__ import annotations

import traceback
from typing import Any

import jax
import numpy as np

from ._engine import Engine
from ._plugins import Plugins, plugins as default_plugins
from ._types import Data, State, StepInfo
from .errors import ConfigurationError, PluginError


def _culprit(hook_caller: Any, exc: BaseException) -> str:
    codes = {impl.function.__code__: impl.plugin_name for impl in hook_caller.get_hookimpls()
             if hasattr(impl.function, "__code__")}
    for frame, _ in traceback.walk_tb(exc.__traceback__):
        if frame.f_code in codes:
            return codes[frame.f_code]
    return "<unknown plugin>"


def call_lifecycle(plugins: Plugins, name: str, **kwargs: Any) -> None:
    """Call a lifecycle hook; an exception is re-raised as `PluginError` naming the plugin."""
    caller = getattr(plugins.pm.hook, name)
    try:
        caller(**kwargs)
    except Exception as exc:
        raise PluginError(
            f"plugin {_culprit(caller, exc)!r} raised in {name}: {type(exc).__name__}: {exc}. "
            "The run was stopped; the state passed to the hook is intact."
        ) from exc


def run(
    engine: Engine,
    state: State,
    data: Data,
    num_steps: int,
    *,
    plugins: Plugins | None = None,
    chunk: int = 1,
) -> tuple[State, StepInfo]:
    """Run `num_steps` EV3 steps on the host, calling the lifecycle hooks.

    **Arguments:**

    - `engine`, `state`, `data`: as for `Engine.step`.
    - `num_steps`: steps to take.
    - `plugins`: whose lifecycle hooks to call (default `ev3core.plugins()`).
    - `chunk`: steps per compiled call; `chunk > 1` runs `chunk` steps in one `lax.scan`
      (faster when the data lives on the device) and calls `ev3_after_step` for each of them
      after the chunk.

    **Returns:** `(final_state, infos)`, where `infos` is a `StepInfo` of NumPy arrays with a
    leading axis of size `num_steps`.
    """
    if int(num_steps) < 0 or int(chunk) < 1:
        raise ConfigurationError(
            f"run: num_steps={num_steps} must be >= 0 and chunk={chunk} must be >= 1."
        )
    engine.check_data(data)
    plugins = plugins if plugins is not None else default_plugins()
    call_lifecycle(plugins, "ev3_run_start", engine=engine, state=state, num_steps=num_steps)
    infos: list[StepInfo] = []
    try:
        done = 0
        while done < num_steps:
            n = min(chunk, num_steps - done)
            if n == 1:
                state, info = engine.step(state, data)
                batch = [info]
            else:
                state, stacked = engine.scan(state, data, n)
                batch = [jax.tree.map(lambda x, i=i: x[i], stacked) for i in range(n)]
            for info in batch:
                call_lifecycle(
                    plugins, "ev3_after_step", engine=engine, state=state, info=info, step=done
                )
                infos.append(info)
                done += 1
    finally:
        call_lifecycle(plugins, "ev3_run_end", engine=engine, state=state, infos=infos)
    if infos:
        host = jax.device_get(infos)
        stacked_infos = jax.tree.map(lambda *xs: np.stack(xs), *host)
    else:
        stacked_infos = None
    return state, stacked_infos
