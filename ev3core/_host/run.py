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
from .._sharding import to_host
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


#: `StepInfo`'s fields, in the order `jax.tree.flatten` gives its leaves, and its treedef.
def _step_views(treedef: Any, leaves: Sequence[np.ndarray], n: int) -> list[StepInfo]:
    """`n` per-step `StepInfo`s of row views into `leaves` (NumPy arrays stacked on a leading
    axis of size `n`): no copy, built only when a hook or observer takes per-step infos."""
    # `x[i, ...]`: a 0-d array view, not a NumPy scalar (`Choice[item]` reads only arrays).
    return [jax.tree.unflatten(treedef, [x[i, ...] for x in leaves]) for i in range(n)]


class _InfoLog(Sequence[StepInfo]):
    """The `StepInfo`s of a run, moved to host memory one chunk behind the device.

    Keeping every step's `StepInfo` on the device until the end of a run holds thousands of
    small device buffers (about 37 kB per step on CPU). Here each step's infos are copied
    into NumPy arrays allocated once for the whole run: a single step's when the next step
    has been dispatched (so the copy never stalls the device), a scanned chunk's in one
    `device_get` as soon as it is returned (`add_chunk`). In a multi-process run the
    candidate-sharded fields (`valid`, `assess_mean`) are gathered from every process
    (`to_host`); every process runs the same loop, so the gathers line up.
    """

    def __init__(self, capacity: int) -> None:
        self._capacity = capacity
        self._arrays: list[np.ndarray] | None = None
        self._treedef: Any = None
        self._n = 0
        self._pending: list[StepInfo] = []

    def add(self, info: StepInfo) -> None:
        """Queue one step's info (copied to the host by the next `flush`)."""
        self._pending.append(info)

    def _store(self, leaves: Sequence[Any], treedef: Any, n: int | None) -> None:
        """Copy host leaves of one step (`n=None`) or of `n` stacked steps into the log,
        after its last step (`commit` makes stored steps part of it)."""
        if self._arrays is None:
            self._treedef = treedef
            self._arrays = [
                np.empty((self._capacity, *np.shape(x)[n is not None :]), np.asarray(x).dtype)
                for x in leaves
            ]
        k = 1 if n is None else n
        for arr, x in zip(self._arrays, leaves, strict=True):
            arr[self._n : self._n + k] = x

    def commit(self, k: int) -> None:
        """Count `k` more stored steps in the log (their hooks have all run)."""
        self._n += k

    def flush(self) -> None:
        """Copy the queued single-step infos to the host."""
        if not self._pending:
            return
        pending, self._pending = self._pending, []
        for info in to_host(pending):
            leaves, treedef = jax.tree.flatten(info)
            self._store(leaves, treedef, None)
            self.commit(1)

    def add_chunk(self, stacked: StepInfo, n: int) -> list[np.ndarray]:
        """Copy a scanned chunk's infos (a `StepInfo` stacked on a leading axis of size `n`)
        to the host in one `device_get`; its steps join the log as they are committed.

        **Returns:** the chunk's rows of the log, one read-only NumPy array per leaf (for
        per-step views, see `_step_views`).
        """
        self.flush()
        leaves, treedef = jax.tree.flatten(stacked)
        self._store(to_host(leaves), treedef, n)
        assert self._arrays is not None
        rows = [a[self._n : self._n + n] for a in self._arrays]
        for r in rows:
            r.flags.writeable = False  # hooks get views of the log: they must not edit it
        return rows

    def __len__(self) -> int:
        return self._n + len(self._pending)

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


def _host_chunk(
    infos: _InfoLog, stacked: StepInfo, n: int, per_step: bool
) -> list[StepInfo] | None:
    """The run loop's host work for one scanned chunk: its infos into the log in one
    transfer, and, only when a hook or observer takes per-step infos (`per_step`), one
    `StepInfo` of NumPy row views per step."""
    rows = infos.add_chunk(stacked, n)
    return _step_views(infos._treedef, rows, n) if per_step else None


def _wants_steps(plugins: Plugins, observers: Sequence[Any]) -> bool:
    """Whether anything takes `ev3_after_step` calls: a plugin's implementation, an
    observer's method, or hook tracing (which shows every call)."""
    return (
        bool(plugins.pm.hook.ev3_after_step.get_hookimpls())
        or any(hasattr(o, "ev3_after_step") for o in observers)
        or plugins.tracing
    )


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

    **Raises:** `UnknownComponentError` (a `ConfigurationError`) for a name no plugin
    registered, as `Plugins.get` does (listing the registered ones); `ConfigurationError` for
    options its factory does not take; `PluginError` naming the plugin when the factory
    itself fails.
    """
    options = dict(options or {})
    plugins.get("observer", name)  # the registry's lookup: its error for an unknown name
    info = plugins.components("observer")[name]
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


def _checked_run(
    engine: Engine,
    state: State,
    data: Data | DataStream,
    num_steps: int,
    plugins: Plugins,
    observers: Sequence[Any],
    chunk: int,
) -> tuple[Any, ...]:
    """`run`'s arguments checked, and every component evaluated abstractly (no compilation)
    on the data's shapes, before anything runs: the run's observer objects."""
    if int(num_steps) < 0 or int(chunk) < 1:
        raise ConfigurationError(
            f"run: num_steps={num_steps} must be >= 0 and chunk={chunk} must be >= 1."
        )
    observers = resolve_observers(plugins, observers)
    stream = data if isinstance(data, DataStream) else None
    if stream is not None and int(chunk) != 1:
        raise ConfigurationError(
            f"run: chunk={chunk} with a DataStream; streamed data gives one Data per step, "
            "so use chunk=1 (put the data on the device as one Data to scan chunks)."
        )
    if stream is None:
        _guarded(engine, plugins, engine.check_data, data, state)
    elif num_steps:
        _guarded(engine, plugins, engine.check_data, stream.peek(), state)
    return observers


def _warn_about_masked(engine: Engine, infos: StepInfo) -> None:
    """Log the out-of-range indices a scheduler returned and the candidates masked."""
    bad = int(np.sum(infos.bad_indices))
    if bad:
        logger.warning(
            "ev3core: the scheduler %s returned %d out-of-range index(es) in %d step(s); "
            "each kept the current model. Fix the scheduler's select/decide.",
            type(engine.scheduler).__qualname__,
            bad,
            int(np.sum(infos.bad_indices > 0)),
        )
    masked = int(np.sum(infos.num_invalid))
    if masked:
        logger.warning(
            "ev3core: %d candidate(s) had non-finite parameters or scores in %d step(s) and "
            "were masked (never accepted).",
            masked,
            int(np.sum(infos.num_invalid > 0)),
        )


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
      `UnknownComponentError` (a `ConfigurationError`) listing the registered ones, before
      anything runs.
    - `chunk`: steps per compiled call; `chunk > 1` runs `chunk` steps in one `lax.scan`
      (faster when the data lives on the device) and calls `ev3_after_step` for each of them
      after the chunk. Each chunk's infos come to the host in one transfer (hooks see
      `StepInfo`s of read-only NumPy arrays, built only when a plugin or an observer
      implements `ev3_after_step`); with `chunk=1` hooks see device arrays, and reading one
      waits for that step.

    **Returns:** `(final_state, infos)`, where `infos` is a `StepInfo` of NumPy arrays with a
    leading axis of size `num_steps` (`None` when `num_steps` is 0).

    **Raises:** `ev3core.errors.RunInterrupted` (a `KeyboardInterrupt`) after Ctrl-C: the run
    stops at the next step boundary, calls `ev3_run_end` (so a `Checkpointer` writes a final
    checkpoint) and raises with the state reached. `ComponentError` when a component's own
    code raises (naming it and its plugin); `PluginError` when a lifecycle hook raises.
    """
    plugins = plugins if plugins is not None else plugin_manager()
    observers = _checked_run(engine, state, data, num_steps, plugins, observers, chunk)
    stream = data if isinstance(data, DataStream) else None
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
                per_step = _wants_steps(plugins, observers)
                batch: list[StepInfo] | None
                single = stream is not None or n == 1
                if single:
                    # device arrays: the host queues the next step unless a hook reads them
                    step_data = next(stream) if stream is not None else data
                    state, info = _guarded(engine, plugins, engine.step, state, step_data)
                    # The previous step's info goes to the host now that this one is
                    # dispatched: at most one step's info stays on the device.
                    infos.flush()
                    batch = [info]
                else:
                    state, stacked = _guarded(engine, plugins, engine.scan, state, data, n)
                    # one transfer per chunk; per-step infos only for hooks that take them
                    batch = _host_chunk(infos, stacked, n, per_step)
                    del stacked
                if batch is None:  # nothing takes per-step infos
                    infos.commit(n)
                    done += n
                    continue
                # A step joins `infos` once every hook has seen it, so after an error
                # `len(infos)` counts the steps every `ev3_after_step` saw.
                for info in batch:
                    call_lifecycle(
                        plugins, "ev3_after_step", observers,
                        engine=engine, state=state, info=info, step=done,
                    )  # fmt: skip
                    if single:
                        infos.add(info)
                    else:
                        infos.commit(1)
                    done += 1
                del batch
        finally:
            infos.flush()
            call_lifecycle(
                plugins, "ev3_run_end", observers, engine=engine, state=state, infos=infos
            )
    stacked_infos = infos.stacked()
    if stacked_infos is not None:
        _warn_about_masked(engine, stacked_infos)
    if stop.requested and done < num_steps:
        raise RunInterrupted(
            f"ev3core.run was interrupted after {done} of {num_steps} step(s) (engine step "
            f"{int(to_host(state.step))}); the lifecycle hooks, checkpointers included, have run.",
            state=state,
            infos=stacked_infos,
            steps_done=done,
            signum=stop.signum,
        )
    return state, stacked_infos
