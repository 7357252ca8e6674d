"""Streamed data: a fresh `Data` per step from the host, prefetched to the device.

Arrays on the device (`ev3core.run(engine, state, Data(...), n)`) stay the fast path: the
engine samples every batch on the device. For data sets that do not fit there, or that are
read and transformed by a loader, `DataStream` wraps any iterable of `Data` (typically a
grain `MapDataset` / `IterDataset` / `DataLoader`, which are deterministic and whose
iterators have a checkpointable position) and hands `ev3core.run` one `Data` per step.
"""

from __future__ import annotations

import atexit
import collections
import copy
import threading
import weakref
from collections.abc import Iterable, Mapping
from types import TracebackType
from typing import Any, NamedTuple

import jax
import numpy as np

from .._types import Data
from ..errors import CheckpointError, ConfigurationError


class _Entry(NamedTuple):
    """One element read: the iterator's position before it, and its `Data` on the device or
    the exception reading it raised (re-raised when `run` takes this element)."""

    position: Any
    data: Data | None
    error: BaseException | None


# The readers whose thread may be running. At interpreter exit their threads are stopped and
# joined (`atexit`, which runs while threads still do): a daemon thread still inside XLA's or
# grain's native code when Python finalizes is killed there, which aborts the process
# ("FATAL: exception not rethrown", SIGABRT) after a run has ended cleanly.
_LIVE: weakref.WeakSet[_Reader] = weakref.WeakSet()


@atexit.register
def _stop_all_at_exit() -> None:
    # (an iterator that never returns must not keep the process from exiting)
    for reader in list(_LIVE):
        reader.stop(timeout=_EXIT_JOIN_SECONDS)


_EXIT_JOIN_SECONDS = 30.0


class _Reader:
    """The iterator, its read-ahead, and the background thread (if any) that fills it.

    It holds no reference to its `DataStream`, so a stream dropped without `close()` is
    collected and its finalizer stops the thread. While the thread runs, only it touches the
    iterator, except under `cond` while it is not reading (`in_flight` false).
    """

    def __init__(self, it: Any, prefetch: int, device: Any, background: bool):
        self.it = it
        self.prefetch = prefetch
        self.device = device
        self.background = background
        self.resumable = hasattr(it, "get_state") and hasattr(it, "set_state")
        self.ahead: collections.deque[_Entry] = collections.deque()
        self.index = 0  # the element number of the next read (for the error messages)
        self.shapes: Any = None  # the first element's structure, shapes and dtypes
        self.cond = threading.Condition()
        self.thread: threading.Thread | None = None
        self.stop_event: threading.Event | None = None  # the running thread's
        self.running = False  # a thread is started and has not finished
        self.in_flight = False  # the thread is reading the iterator, outside `cond`
        self.reading: Any = None  # the position of the element it is reading

    def _element(self) -> Data:
        """The iterator's next element, checked and put on the device."""
        try:
            item = next(self.it)
        except StopIteration:
            raise ConfigurationError(
                f"DataStream: the data ran out after {self.index} element(s). Give the run "
                "an endless stream (e.g. grain's .repeat()) or fewer steps."
            ) from None
        if not isinstance(item, Data):
            raise ConfigurationError(
                f"DataStream: the iterable yielded a {type(item).__name__}, not an "
                "ev3core.Data. Map each element to Data(propose=..., assess=..., decide=...) "
                "(e.g. grain's .map(to_data))."
            )
        shapes = [
            (name, [(tuple(np.shape(a)), np.result_type(a).name) for a in jax.tree.leaves(part)])
            for name, part in (
                ("propose", item.propose),
                ("assess", item.assess),
                ("decide", item.decide),
            )
        ]
        if self.shapes is None:
            self.shapes = shapes
        elif shapes != self.shapes:
            raise ConfigurationError(
                f"DataStream: element {self.index} has shapes {shapes}, but the first had "
                f"{self.shapes}; every step's Data needs the same shapes (a short last batch? "
                "batch with drop_remainder=True)."
            )
        return jax.device_put(item, self.device)

    def _read(self) -> _Entry:
        """Reads one element (the thread, outside `cond`; or the caller, without a thread)."""
        position = self.reading
        try:
            data = self._element()
        except BaseException as exc:  # re-raised where `run` takes this element
            return _Entry(position, None, exc)
        self.index += 1
        return _Entry(position, data, None)

    def _position_now(self) -> Any:
        return copy.deepcopy(self.it.get_state()) if self.resumable else None

    def _work(self, stop: threading.Event) -> None:
        """The thread: keeps `prefetch` elements read ahead until stopped or an error."""
        try:
            while True:
                with self.cond:
                    while len(self.ahead) >= self.prefetch and not stop.is_set():
                        self.cond.wait()
                    if stop.is_set():
                        return
                    self.reading = self._position_now()
                    self.in_flight = True
                entry = self._read()
                with self.cond:
                    # kept even when stopped: the iterator has moved past it (`restore`
                    # drops it after the join)
                    self.ahead.append(entry)
                    self.in_flight = False
                    self.cond.notify_all()
                if entry.error is not None:
                    return
        finally:
            with self.cond:
                if self.stop_event is stop:  # (a thread started after it is not done)
                    self.running = False
                    self.in_flight = False
                self.cond.notify_all()

    def _start(self) -> None:
        """Starts the thread (with `cond` held)."""
        self.stop_event = threading.Event()
        self.thread = threading.Thread(
            target=self._work, args=(self.stop_event,), name="ev3core-DataStream", daemon=True
        )
        self.running = True
        _LIVE.add(self)
        self.thread.start()

    def take(self, pop: bool) -> Data:
        """The next element (removed when `pop`); its error raised (and removed) instead."""
        with self.cond:
            if self.background:
                while not self.ahead:
                    if not self.running:  # not started yet, stopped, or ended on an error
                        self._start()
                    self.cond.wait()
            else:
                want = self.prefetch if pop else 1
                while len(self.ahead) < want and not (self.ahead and self.ahead[-1].error):
                    self.reading = self._position_now()
                    self.ahead.append(self._read())
            entry = self.ahead[0]
            if pop or entry.error is not None:
                self.ahead.popleft()
                self.cond.notify_all()
        if entry.error is not None:
            raise entry.error
        assert entry.data is not None
        return entry.data

    def position(self) -> Any:
        with self.cond:
            if self.ahead:
                return self.ahead[0].position
            if self.in_flight:
                return self.reading
            return self._position_now()

    def stop(self, join: bool = True, timeout: float | None = None) -> None:
        """Stops the thread (and, with `join`, waits for it: at most one element's read, or
        `timeout` seconds)."""
        with self.cond:
            thread, stop_event = self.thread, self.stop_event
            if stop_event is not None:
                stop_event.set()
                self.cond.notify_all()
        if join and thread is not None and thread is not threading.current_thread():
            thread.join(timeout)

    def reset(self, position: Any, index: int) -> None:
        """Drops the read-ahead and moves the iterator to `position` (the thread stopped)."""
        self.stop()
        with self.cond:
            self.ahead.clear()
            self.it.set_state(position)
            self.index = index


class DataStream:
    """A host-side source of one fresh `Data` per EV3 step, read in the background and
    prefetched to the device.

    Each element of `iterable` is one step's `Data` (NumPy or JAX arrays; keep the shapes
    fixed, or every new shape compiles the step again). A background thread reads the
    elements in the iterator's order (a grain loader's batching and transformations), checks
    them and puts them on the device (`jax.device_put`), keeping up to `prefetch` of them
    ahead of use, so that reading and transferring step `t + 1`'s data overlaps step `t`'s
    computation. The thread starts at the first `next()` / `peek()`; only it touches the
    iterator while it runs.

    An error while reading an element (the data ran out, an element that is not a `Data` or
    has other shapes than the first, an exception from the iterator itself) is raised by the
    `next()` / `peek()` that would have returned that element; the elements before it are
    returned first.

    The stream's *position* is the position of the next element `run` will take (not of the
    read-ahead), so it matches the engine state after the last step: it is what a
    `Checkpointer(stream=...)` stores, and `restore` resumes from it. A position exists when
    the iterator has `get_state` / `set_state` (grain's iterators do); other iterables
    stream fine but cannot be resumed.

    `ev3core.run` does not close a stream. `close()` (or leaving a `with DataStream(...)`
    block) stops the thread; the elements already read stay queued, so the position is
    unchanged, and a later `next()` starts reading again. The thread is a daemon (it never
    keeps the interpreter from exiting) and stops when the stream is garbage-collected; at
    interpreter exit a running thread is stopped and joined before Python finalizes (a
    thread killed inside XLA's or grain's native code would abort the process).

    **Arguments:**

    - `iterable`: an iterable of `Data`, e.g.
      `grain.MapDataset.source(...).shuffle(seed=0).batch(...).map(to_data).repeat()`.
    - `prefetch`: elements read and put on the device ahead of use (>= 1).
    - `device`: a `jax.Device` or `Sharding` for the data (default: JAX's default device).
    - `background`: read in a background thread (default). `False` reads on the calling
      thread, inside `next()`, while the device waits.

    ```python
    with ev3core.DataStream(grain_dataset) as stream:
        plugins = ev3core.load_plugins(extra=[ev3core.Checkpointer("ckpt", stream=stream)])
        state, infos = ev3core.run(engine, state, stream, 1_000, plugins=plugins)
    ```
    """

    def __init__(
        self,
        iterable: Iterable[Data],
        *,
        prefetch: int = 2,
        device: Any = None,
        background: bool = True,
    ):
        if int(prefetch) < 1:
            raise ConfigurationError(f"DataStream: prefetch={prefetch} must be >= 1.")
        self.iterable = iterable
        self.prefetch = int(prefetch)
        self.device = device
        self.background = bool(background)
        # grain iterators add get_state / set_state
        self._reader = _Reader(iter(iterable), self.prefetch, device, self.background)
        self._finalizer = weakref.finalize(self, self._reader.stop, False)
        self.taken = 0

    @property
    def resumable(self) -> bool:
        """Whether the iterator has a checkpointable position (`get_state`/`set_state`)."""
        return self._reader.resumable

    def peek(self) -> Data:
        """The next step's `Data`, without taking it."""
        return self._reader.take(pop=False)

    def __next__(self) -> Data:
        data = self._reader.take(pop=True)
        self.taken += 1
        return data

    def __iter__(self) -> DataStream:
        return self

    def position(self) -> Any:
        """The position of the next element `run` will take (JSON-serialisable for grain)."""
        if not self.resumable:
            raise CheckpointError(
                f"DataStream: the iterator {type(self._reader.it).__name__} has no "
                "get_state(), so its position cannot be saved. Stream from a grain dataset or "
                "loader (or an iterator with get_state/set_state) to resume runs."
            )
        return self._reader.position()

    def restore(self, position: Any) -> None:
        """Continue from a position saved by `position()`, or from a checkpoint manifest
        written by `Checkpointer(stream=...)` (`load_checkpoint(...)[1]`).

        Stops the background thread, drops the elements read ahead and moves the iterator;
        the next `next()` or `peek()` reads from `position`."""
        if isinstance(position, Mapping) and "metadata" in position:
            meta = position["metadata"]
            if "data_position" not in meta:
                raise CheckpointError(
                    "DataStream.restore: the checkpoint has no data position; it was not "
                    "written by a Checkpointer(stream=...)."
                )
            position = meta["data_position"]
        if not self.resumable:
            self.position()  # raises the explanation
        self._reader.reset(position, self.taken)

    def close(self) -> None:
        """Stops the background thread and waits for it (at most one element's read).

        Idempotent. The elements already read stay queued (the position is unchanged); a
        later `next()` or `peek()` starts the thread again."""
        self._reader.stop()

    def __enter__(self) -> DataStream:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
