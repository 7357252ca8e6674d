"""The `Checkpointer` lifecycle-hook plugin: checkpoints a run every `every` steps and at its
end, into a directory that belongs to one run.

The storage is in `ckpt_io.py` (`save_checkpoint`, `load_checkpoint`), `ckpt_manifest.py`
(manifests, listing, verification), `ckpt_format.py` (the on-disk format) and
`orbax_store.py` (sharded storage).
"""

from __future__ import annotations

import logging
import os
import uuid
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np

from .._types import State
from ..errors import CheckpointError
from ..hookspecs import hookimpl
from . import orbax_store
from .ckpt_format import _jsonable, _signature, _signature_mismatch, state_digest
from .ckpt_io import _prune, save_checkpoint
from .ckpt_manifest import _entries, _Entry, list_checkpoints, next_sequence

logger = logging.getLogger("ev3core")

__all__ = ["Checkpointer", "describe_engine"]


def describe_engine(engine: Any) -> dict[str, Any]:
    """A JSON description of an engine's pipeline (components, sizes), stored in checkpoints."""
    return {
        "proposers": [
            {
                "type": f"{type(p).__module__}.{type(p).__qualname__}",
                "num_candidates": int(p.num_candidates),
                "labels": list(p.labels()),
            }
            for p in engine.proposers
        ],
        "assessors": [
            {"type": f"{type(a).__module__}.{type(a).__qualname__}", "name": a.name}
            for a in engine.assessors
        ],
        "scheduler": f"{type(engine.scheduler).__module__}.{type(engine.scheduler).__qualname__}",
        "assess_size": int(engine.assess_size),
        "decide_size": int(engine.decide_size),
        "history_size": int(engine.history_size),
    }


def _same_state(entries: list[_Entry], state: State, split: bool) -> dict[str, Any] | None:
    """The manifest of the most recently written of `entries` (verified manifests) whose
    checkpoint is `state`, or `None`. `split`: the state is not fully addressable here."""
    step, signature = int(state.step), _signature(state)
    digest = None if split else state_digest(state)
    for e in reversed(entries):
        body = e.body
        assert body is not None
        if body.get("storage") != orbax_store.STORAGE:
            if digest is not None and body["leaves_sha256"] == digest:
                return body
            continue
        if body["step"] != step or _signature_mismatch(body["signature"], signature) is not None:
            continue
        if split:
            return body
        try:
            loaded = orbax_store.load(orbax_store.verify(e.path, body), state)
        except Exception:  # noqa: BLE001 - a damaged checkpoint is not this state
            continue
        if state_digest(loaded) == digest:
            return body
    return None


class Checkpointer:
    """A lifecycle-hook plugin that checkpoints the run every `every` steps and at its end.

    Register it with the plugins passed to `ev3core.run`. It saves when the engine's step
    counter crosses a multiple of `every`, and once more when the run ends (normally, by
    Ctrl-C, or by an error) if the final state is consistent (every step it contains was
    seen by every `ev3_after_step` hook) and not saved yet. Its hooks run after the other
    plugins' (`trylast`), so metadata callables see counters that include the step.

    A directory belongs to one run. Each `Checkpointer` has a `run_id` that its manifests
    record; when it first saves or starts a run in a directory that holds checkpoints of
    another run, it continues that run only if the state it starts from is bit for bit one of
    those checkpoints (a resume: `load_checkpoint` from the same directory); otherwise it
    raises `CheckpointError` instead of mixing two runs (pruning would then delete one run's
    checkpoints for the other's).

    **Arguments:**

    - `directory`: where checkpoints go (see `save_checkpoint`).
    - `every`: steps between checkpoints (>= 1).
    - `keep`: checkpoints kept on disk.
    - `metadata`: a dict, or a callable returning one at save time, stored in every
      checkpoint next to the pipeline description (`metadata["pipeline"]`).
    - `stream`: the `ev3core.DataStream` the run reads; its position (of the next element
      the run will take) is stored as `metadata["data_position"]`, and
      `stream.restore(manifest)` resumes it, so a resumed run reads exactly what an
      uninterrupted one would have.
    - `storage`: as for `save_checkpoint`. With Orbax (always in a multi-process run, where
      every process registers its own `Checkpointer` and saves its shards), a save only
      blocks the run while the arrays are copied to host memory; the files, the commit and the
      manifest are written in the background. `wait()` blocks until the last save is
      committed; the run's end waits for it.

    ```python
    plugins = ev3core.load_plugins(extra=[ev3core.Checkpointer("ckpt", every=10)])
    state, infos = ev3core.run(engine, state, data, 100, plugins=plugins)
    ```
    """

    def __init__(
        self,
        directory: str | os.PathLike[str],
        every: int = 100,
        keep: int = 3,
        metadata: Mapping[str, Any] | Callable[[], Mapping[str, Any]] | None = None,
        stream: Any = None,
        storage: str = "auto",
    ):
        if int(every) < 1 or int(keep) < 1:
            raise CheckpointError(f"Checkpointer: every={every} and keep={keep} must both be >= 1.")
        self.storage = storage
        self._writer: orbax_store.OrbaxWriter | None = None
        self.directory = Path(directory)
        self.every = int(every)
        self.keep = int(keep)
        self.metadata = metadata
        self.stream = stream
        if stream is not None and not stream.resumable:
            stream.position()  # raises: explains why this stream cannot be checkpointed
        self.last_saved: int | None = None
        self.last_path: Path | None = None
        self.run_id = uuid.uuid4().hex
        self._claimed = False
        self._start: int | None = None
        self._pipeline: dict[str, Any] | None = None

    def _claim(self, state: State) -> None:
        """Check that the directory is this run's (see the class docstring), once.

        Checkpoints with this run's `run_id` are its own. Of another run's, the state must be
        one. When this process holds the whole state it is compared bit for bit: with a
        single-file checkpoint's `leaves_sha256`, or, for an Orbax checkpoint of the same step
        and leaf signature, by loading it (once, when a run starts in such a directory). A
        state split over processes cannot be hashed without gathering it, so there the step
        and the leaf signature must match (every process reads the same manifests and
        decides alike).
        """
        if self._claimed:
            return
        if jax.process_count() > 1:  # one id for the run: process 0's, as its manifests say
            from jax.experimental import multihost_utils

            raw = np.frombuffer(bytes.fromhex(self.run_id), np.uint8).copy()
            self.run_id = np.asarray(multihost_utils.broadcast_one_to_all(raw)).tobytes().hex()
        foreign = [
            e
            for e in _entries(self.directory)
            if e.body is not None and e.body.get("run_id") != self.run_id
        ]
        if foreign:
            split = orbax_store.not_addressable(state)
            what = (
                "by step and leaf signature: the state is split over processes"
                if split
                else "bit for bit"
            )
            same = _same_state(foreign, state, split)
            if same is None:
                steps = sorted({e.step for e in foreign})
                raise CheckpointError(
                    f"Checkpointer: {self.directory} holds checkpoints of another run (steps "
                    f"{', '.join(map(str, steps[:8]))}{' ...' if len(steps) > 8 else ''}), and "
                    f"the state this run starts from (step {int(state.step)}) matches none of "
                    f"them ({what}). Pass an empty directory, or resume that run: start from "
                    "the state that load_checkpoint(directory, like) returns."
                )
            if same.get("run_id"):  # a resume: continue the run that wrote it
                self.run_id = same["run_id"]
        self._claimed = True

    def _meta(self) -> dict[str, Any]:
        extra = self.metadata() if callable(self.metadata) else (self.metadata or {})
        out = {"pipeline": self._pipeline}
        out.update(extra)
        if self.stream is not None:
            out["data_position"] = self.stream.position()
        return out

    def save(self, state: State) -> Path:
        """Write a checkpoint of `state` now (with Orbax: start writing it, see `wait`)."""
        self._claim(state)
        if orbax_store.resolve_storage(self.storage, state) == orbax_store.STORAGE:
            if self._writer is None:
                self._writer = orbax_store.OrbaxWriter(next_sequence=next_sequence, prune=_prune)
            self.directory.mkdir(parents=True, exist_ok=True)
            meta = _jsonable(self._meta())
            self.last_path = self._writer.save(
                self.directory, state, meta, self.keep, block=False, run_id=self.run_id
            )
        else:
            self.last_path = save_checkpoint(
                self.directory,
                state,
                metadata=self._meta(),
                keep=self.keep,
                run_id=self.run_id,
                storage="leaves",
            )
        self.last_saved = int(state.step)
        return self.last_path

    def wait(self) -> None:
        """Block until the last save is committed (its manifest written); raise
        `CheckpointError` if writing it failed. A no-op for the single-file storage."""
        if self._writer is not None:
            self._writer.wait()

    @hookimpl
    def ev3_run_start(self, engine: Any, state: State) -> None:
        self._claim(state)
        self._start = int(state.step)
        self._pipeline = describe_engine(engine)
        if self.last_saved is None:
            self.last_saved = self._start

    @hookimpl(trylast=True)
    def ev3_after_step(self, state: State, step: int) -> None:
        if self._start is None:  # called outside ev3core.run: read the counter
            self._start = int(state.step) - step - 1
        # The engine step this info belongs to, known on the host: no device sync unless a
        # checkpoint is due (with chunk > 1, `state` is the chunk's last state; it is saved).
        reached = self._start + step + 1
        due = reached // self.every > (reached - 1) // self.every
        if due and int(state.step) != self.last_saved:
            self.save(state)

    @hookimpl(trylast=True)
    def ev3_run_end(self, state: State, infos: Sequence[Any]) -> None:
        step = int(state.step)
        consistent = self._start is None or step == self._start + len(infos)
        if not consistent:
            logger.warning(
                "ev3core: Checkpointer did not save the final state of step %d: the run "
                "stopped inside a step's hooks; the last checkpoint (step %s) is kept.",
                step,
                self.last_saved,
            )
            self.wait()  # an earlier save may still be committing
            return
        try:
            pending = self._writer is not None and self._writer.pending is not None
            if step != self.last_saved or not (list_checkpoints(self.directory) or pending):
                self.save(state)
        finally:
            self.wait()
