"""Streamed data: a fresh `Data` per step from the host, prefetched to the device.

Arrays on the device (`ev3core.run(engine, state, Data(...), n)`) stay the fast path: the
engine samples every batch on the device. For data sets that do not fit there, or that are
read and transformed by a loader, `DataStream` wraps any iterable of `Data` (typically a
grain `MapDataset` / `IterDataset` / `DataLoader`, which are deterministic and whose
iterators have a checkpointable position) and hands `ev3core.run` one `Data` per step.
"""

from __future__ import annotations

import collections
import copy
from collections.abc import Iterable, Mapping
from typing import Any

import jax
import numpy as np

from .._types import Data
from ..errors import CheckpointError, ConfigurationError


class DataStream:
    """A host-side source of one fresh `Data` per EV3 step, with device prefetch.

    Each element of `iterable` is one step's `Data` (NumPy or JAX arrays; keep the shapes
    fixed, or every new shape compiles the step again). The next `prefetch` elements are
    read ahead and put on the device asynchronously (`jax.device_put`), so the transfer of
    step `t + 1`'s data overlaps step `t`'s computation.

    The stream's *position* is the position of the next element `run` will take (not of the
    read-ahead), so it matches the engine state after the last step: it is what a
    `Checkpointer(stream=...)` stores, and `restore` resumes from it. A position exists when
    the iterator has `get_state` / `set_state` (grain's iterators do); other iterables
    stream fine but cannot be resumed.

    **Arguments:**

    - `iterable`: an iterable of `Data`, e.g.
      `grain.MapDataset.source(...).shuffle(seed=0).batch(...).map(to_data).repeat()`.
    - `prefetch`: elements put on the device ahead of use (>= 1).
    - `device`: a `jax.Device` or `Sharding` for the data (default: JAX's default device).

    ```python
    stream = ev3core.DataStream(grain_dataset)
    plugins = ev3core.load_plugins(extra=[ev3core.Checkpointer("ckpt", stream=stream)])
    state, infos = ev3core.run(engine, state, stream, 1_000, plugins=plugins)
    ```
    """

    def __init__(self, iterable: Iterable[Data], *, prefetch: int = 2, device: Any = None):
        if int(prefetch) < 1:
            raise ConfigurationError(f"DataStream: prefetch={prefetch} must be >= 1.")
        self.iterable = iterable
        self.prefetch = int(prefetch)
        self.device = device
        self._it: Any = iter(iterable)  # grain iterators add get_state / set_state
        self._ahead: collections.deque[tuple[Any, Data]] = collections.deque()
        self.taken = 0
        self._shapes: Any = None  # the first element's structure, shapes and dtypes

    @property
    def resumable(self) -> bool:
        """Whether the iterator has a checkpointable position (`get_state`/`set_state`)."""
        return hasattr(self._it, "get_state") and hasattr(self._it, "set_state")

    def _read(self) -> None:
        pos = copy.deepcopy(self._it.get_state()) if self.resumable else None
        try:
            item = next(self._it)
        except StopIteration:
            raise ConfigurationError(
                f"DataStream: the data ran out after {self.taken + len(self._ahead)} "
                "element(s). Give the run an endless stream (e.g. grain's .repeat()) or fewer "
                "steps."
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
        if self._shapes is None:
            self._shapes = shapes
        elif shapes != self._shapes:
            raise ConfigurationError(
                f"DataStream: element {self.taken + len(self._ahead)} has shapes {shapes}, but "
                f"the first had {self._shapes}; every step's Data needs the same shapes (a "
                "short last batch? batch with drop_remainder=True)."
            )
        self._ahead.append((pos, jax.device_put(item, self.device)))

    def peek(self) -> Data:
        """The next step's `Data`, without taking it."""
        while not self._ahead:
            self._read()
        return self._ahead[0][1]

    def __next__(self) -> Data:
        while len(self._ahead) < self.prefetch:
            self._read()
        _, data = self._ahead.popleft()
        self.taken += 1
        return data

    def __iter__(self) -> DataStream:
        return self

    def position(self) -> Any:
        """The position of the next element `run` will take (JSON-serialisable for grain)."""
        if not self.resumable:
            raise CheckpointError(
                f"DataStream: the iterator {type(self._it).__name__} has no get_state(), so "
                "its position cannot be saved. Stream from a grain dataset or loader (or an "
                "iterator with get_state/set_state) to resume runs."
            )
        if self._ahead:
            return self._ahead[0][0]
        return copy.deepcopy(self._it.get_state())

    def restore(self, position: Any) -> None:
        """Continue from a position saved by `position()`, or from a checkpoint manifest
        written by `Checkpointer(stream=...)` (`load_checkpoint(...)[1]`)."""
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
        self._ahead.clear()
        self._it.set_state(position)
