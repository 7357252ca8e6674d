"""The host run loop: compiled steps with lifecycle hooks between them."""

from __future__ import annotations

import difflib
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
from .stream import DataStream

logger = logging.getLogger("ev3core")

_LIFECYCLE = ("ev3_run_start", "ev3_after_step", "ev3_run_end")


class _StopOnInterrupt:
    """Turn the first Ctrl-C (SIGINT) or SIGTERM into a request to stop at the next step
    boundary.

    SIGTERM is what batch schedulers and `kill` send before killing a job, so it gets the same
    treatment as Ctrl-C: the run stops cleanly and checkpointers write a final checkpoint. A
    second signal raises `KeyboardInterrupt` at once. Each handler is only installed from the
    main thread and only over the default one (a handler the user installed is left alone).
    """

    _DEFAULTS = {signal.SIGINT: signal.default_int_handler, signal.SIGTERM: signal.SIG_DFL}

    def __init__(self) -> None:
        self.requested = False
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> _StopOnInterrupt:
        if threading.current_thread() is threading.main_thread():
            for signum, default in self._DEFAULTS.items():
                if signal.getsignal(signum) is default:
                    self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        self.signum = signum
        logger.warning(
            "ev3core: %s; stopping after the current step (send it again to stop now)",
            "interrupted" if signum == signal.SIGINT else signal.Signals(signum).name,
        )

    def __exit__(self, *exc: object) -> None:
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)
        self._previous = {}


class _InfoLog(Sequence[StepInfo]):
    """The `StepInfo`s of a run, moved to host memory one chunk behind the device.

    Keeping every step's `StepInfo` on the device until the end of a run holds thousands of
    small device buffers (about 37 kB per step on CPU). Here each chunk's infos are copied
    into NumPy arrays allocated once for the whole run when the next chunk has been
    dispatched, so the copy never stalls the device and at most two chunks stay on it.
    """

    def __init__(self, capacity: int) -> None:
        self._capacity = capacity
        self._arrays: list[np.ndarray] | None = None
        self._treedef: Any = None
        self._n = 0
        self._pending: list[tuple[StepInfo, int | None]] = []

    def add(self, info: StepInfo, steps: int | None = None) -> None:
        """Queue one step's info, or (`steps=n`) a chunk's infos stacked on a leading axis."""
        self._pending.append((info, steps))

    def flush(self) -> None:
        """Copy the queued infos to the host."""
        pending, self._pending = self._pending, []
        for info, steps in jax.device_get(pending):
            leaves, treedef = jax.tree.flatten(info)
            if self._arrays is None:
                self._treedef = treedef
                self._arrays = [
                    np.empty(
                        (self._capacity, *np.shape(x)[steps is not None :]), np.asarray(x).dtype
                    )
                    for x in leaves
                ]
            n = 1 if steps is None else steps
            for arr, x in zip(self._arrays, leaves):
                arr[self._n : self._n + n] = x
            self._n += n

    def __len__(self) -> int:
        return self._n + sum(1 if n is None else n for _, n in self._pending)

    def __getitem__(self, index: Any) -> Any:
        self.flush()
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(self._n))]
        if not -self._n <= index < self._n:
            raise IndexError(index)
        assert self._arrays is not None
        return jax.tree.unflatten(self._treedef, [a[index % self._n] for a in self._arrays])

    def stacked(self) -> StepInfo | None:
        """Every info so far as one `StepInfo` of NumPy arrays (`None` if there are none)."""
        self.flush()
        if self._arrays is None or self._n == 0:
            return None
        return jax.tree.unflatten(self._treedef, [a[: self._n] for a in self._arrays])


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
    except EV3Error as exc:
        owner = getattr(exc, "component", None)
        if owner is None:
            raise
        # The engine's checks name the component; the plugin that registered it is known here.
        kind, index, comp = owner
        short = describe_component(kind, index, comp)
        who = describe_component(kind, index, comp, plugins=plugins)
        raise type(exc)(str(exc).replace(short, who, 1)) from exc
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
            # pluggy calls the methods it is given last-first: reversed, observers run in the
            # order given (a ProgressBar before the Checkpointer whose metadata reads its
            # counts, so a checkpoint's counts include its own step).
            caller.call_extra(list(reversed(extra)), kwargs)
        else:
            caller(**kwargs)
    except EV3Error:
        raise  # ev3core's own errors (a Checkpointer's CheckpointError) say what is wrong
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
                "ev3core.ProgressBar() or ev3core.Checkpointer(dir), or the name of one a "
                "plugin registered (ev3_register_observers; `ev3 plugins` lists them)."
            )


def make_observer(plugins: Plugins, name: str, options: dict[str, Any] | None = None) -> Any:
    """Build the observer a plugin registered as `name` (`ev3_register_observers`) with
    keyword `options`.

    **Raises:** `ConfigurationError` for a name no plugin registered (listing the registered
    ones) or options its factory does not take; `PluginError` naming the plugin when the
    factory itself fails.
    """
    options = dict(options or {})
    registered = plugins.components("observer")
    if name not in registered:
        close = difflib.get_close_matches(name, list(registered), n=3, cutoff=0.5)
        hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
        available = ", ".join(sorted(registered)) or "(none)"
        raise ConfigurationError(
            f"run: no observer named {name!r}.{hint} Registered observers: {available}. Pass "
            "one of these names, an observer object, or install the plugin that provides it "
            "(`ev3 plugins` lists plugins and their observers)."
        )
    info = registered[name]
    try:
        obs = info.cls(**options)
    except EV3Error:
        raise
    except TypeError as exc:
        given = ", ".join(f"{k}={v!r}" for k, v in options.items()) or "no options"
        raise ConfigurationError(
            f"run: the observer {name!r} (plugin {info.plugin!r}) cannot be built with "
            f"{given}: {exc}. Build it with ev3core.make('observer', {name!r}, ...) and pass "
            f"the object, or on the command line give its options: --observer "
            f"{name}:key=value,..."
        ) from exc
    except Exception as exc:
        raise PluginError(
            f"plugin {info.plugin!r} raised building the observer {name!r}: "
            f"{type(exc).__name__}: {exc}. Fix or uninstall that plugin."
        ) from exc
    _check_observers([obs])
    return obs


def resolve_observers(plugins: Plugins, observers: Sequence[Any]) -> tuple[Any, ...]:
    """The observer objects of `observers`: a string is the name of an observer a plugin
    registered (built with no options, see `make_observer`), anything else is used as is."""
    if isinstance(observers, str):
        raise ConfigurationError(
            f"run: observers={observers!r} is a string; pass a list of names or objects, "
            f"e.g. observers=[{observers!r}]."
        )
    out = tuple(make_observer(plugins, o) if isinstance(o, str) else o for o in observers)
    _check_observers(out)
    return out


def _host_steps(stacked: StepInfo, n: int) -> list[StepInfo]:
    """`n` per-step infos from a scanned chunk: one transfer, then NumPy views."""
    leaves, treedef = jax.tree.flatten(jax.device_get(stacked))
    return [jax.tree.unflatten(treedef, [x[i] for x in leaves]) for i in range(n)]


def run(
    engine: Engine,
    state: State,
    data: Data | DataStream,
    num_steps: int,
    *,
    plugins: Plugins | None = None,
    observers: Sequence[Any] = (),
    chunk: int = 1,
) -> tuple[State, StepInfo | None]:
    """Run `num_steps` EV3 steps on the host, calling the lifecycle hooks.

    **Arguments:**

    - `engine`, `state`: as for `Engine.step`.
    - `data`: a `Data` on the device (the fast path: the engine samples every batch on the
      device), or a `DataStream` yielding a fresh `Data` per step from the host (e.g. a grain
      loader; see `DataStream`), for data that does not fit on the device.
    - `num_steps`: steps to take.
    - `plugins`: whose lifecycle hooks to call (default `ev3core.plugin_manager()`).
    - `observers`: observers for this run only, called after the plugins' lifecycle
      hooks (nothing is registered on `plugins`): objects whose methods are named like the
      lifecycle hooks (a `ProgressBar`, a `Checkpointer`, a `JsonlLogger`, your own), or
      names of observers that plugins registered (`ev3_register_observers`; e.g.
      `"progress"`), each built with no options. For options, build it with
      `ev3core.make("observer", name, **options)`. An unknown name raises
      `ConfigurationError` listing the registered ones, before anything runs.
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
    observers = resolve_observers(plugins, observers)
    stream = data if isinstance(data, DataStream) else None
    if stream is not None and int(chunk) != 1:
        raise ConfigurationError(
            f"run: chunk={chunk} with a DataStream; streamed data gives one Data per step, "
            "so use chunk=1 (put the data on the device as one Data to scan chunks)."
        )
    # Abstract evaluation (no compilation) of every component on the data's shapes.
    if stream is None:
        _guarded(engine, plugins, engine.check_data, data, state)
    elif num_steps:
        _guarded(engine, plugins, engine.check_data, stream.peek(), state)
    call_lifecycle(
        plugins, "ev3_run_start", observers, engine=engine, state=state, num_steps=num_steps
    )
    infos = _InfoLog(int(num_steps))
    done = 0
    # Ctrl-C stops at the next step boundary, so `ev3_run_end` (checkpointers) sees a
    # consistent state; a second Ctrl-C stops at once.
    with _StopOnInterrupt() as stop:
        try:
            while done < num_steps and not stop.requested:
                n = min(chunk, num_steps - done)
                if stream is not None:
                    state, info = _guarded(engine, plugins, engine.step, state, next(stream))
                    batch = [info]
                elif n == 1:
                    # device arrays: the host queues the next step unless a hook reads them
                    state, info = _guarded(engine, plugins, engine.step, state, data)
                    batch = [info]
                else:
                    state, stacked = _guarded(engine, plugins, engine.scan, state, data, n)
                    stacked = jax.device_get(stacked)  # one transfer per chunk
                    batch = _host_steps(stacked, n)
                # The previous step's infos go to the host now that this one is dispatched:
                # at most one step's infos stay on the device (none after a chunk).
                infos.flush()
                for info in batch:
                    call_lifecycle(
                        plugins, "ev3_after_step", observers,
                        engine=engine, state=state, info=info, step=done,
                    )  # fmt: skip
                    if n == 1:
                        infos.add(info)
                    done += 1
                if n > 1:
                    infos.add(stacked, steps=n)
                del batch
        finally:
            infos.flush()
            call_lifecycle(
                plugins, "ev3_run_end", observers, engine=engine, state=state, infos=infos
            )
    stacked_infos = infos.stacked()
    if stacked_infos is not None:
        bad = int(np.sum(stacked_infos.bad_indices))
        if bad:
            logger.warning(
                "ev3core: the scheduler %s returned %d out-of-range index(es) in %d step(s); "
                "each kept the current model. Fix the scheduler's select/decide.",
                type(engine.scheduler).__qualname__,
                bad,
                int(np.sum(stacked_infos.bad_indices > 0)),
            )
        masked = int(np.sum(stacked_infos.num_invalid))
        if masked:
            logger.warning(
                "ev3core: %d candidate(s) had non-finite parameters or scores in %d step(s) and "
                "were masked (never accepted).",
                masked,
                int(np.sum(stacked_infos.num_invalid > 0)),
            )
    if stop.requested and done < num_steps:
        raise RunInterrupted(
            f"ev3core.run was interrupted after {done} of {num_steps} step(s) (engine step "
            f"{int(state.step)}); the lifecycle hooks, checkpointers included, have run.",
            state=state,
            infos=stacked_infos,
            steps_done=done,
            signum=stop.signum,
        )
    return state, stacked_infos
