"""`TensorBoardLogger`: scalars of every EV3 step in a TensorBoard event file."""

from __future__ import annotations

import os
from typing import Any

import jax
import numpy as np

from ev3core import hookimpl
from ev3core._host.observe import step_record

__all__ = ["TensorBoardLogger"]


class TensorBoardLogger:
    """A lifecycle-hook plugin that writes every step's outcome as TensorBoard scalars.

    Scalars, at global step `info.step` (0 for the run's first step):

    - `decide/<objective>/{winner,current,stable}`: decide-set means;
    - `priority/<objective>`: the objective priorities;
    - `decision/accepted`, `decision/rolled_back`, `decision/significant` (0 or 1) and
      `decision/num_invalid` (masked candidates);
    - `totals/accepted`, `totals/rolled_back`, `totals/significant`: running counts over
      this run.

    On a resumed run (a state with `step > 0`), events of steps at or after the resume point
    that an earlier run wrote are purged (`purge_step`), so a crash after the last
    checkpoint leaves no duplicate curve.

    **Arguments:**

    - `logdir`: TensorBoard log directory (`tensorboard --logdir` it).
    - `every`: steps between reads of the step infos from the device (each step is still
      logged).
    - `flush_secs`: how often the writer flushes to disk (it always flushes at run end).

    ```python
    from ev3_tensorboard import TensorBoardLogger
    plugins = ev3core.load_plugins(extra=[TensorBoardLogger("runs/exp1")])
    state, infos = ev3core.run(engine, state, data, 100, plugins=plugins)
    ```
    """

    def __init__(self, logdir: str | os.PathLike[str], every: int = 1, flush_secs: int = 10):
        if int(every) < 1:
            raise ValueError(f"TensorBoardLogger: every={every} must be >= 1.")
        self.logdir = os.fspath(logdir)
        self.every = int(every)
        self.flush_secs = int(flush_secs)
        self.writer: Any = None
        self._pending: list[Any] = []
        self._names: tuple[str, ...] = ()
        self._labels: tuple[str, ...] = ()
        self._num_steps: int | None = None
        self._totals = {"accepted": 0, "rolled_back": 0, "significant": 0}

    @hookimpl
    def ev3_run_start(self, engine: Any, state: Any, num_steps: int) -> None:
        from tensorboardX import SummaryWriter

        start = int(state.step)
        self._names = tuple(engine.objective_names)
        self._labels = tuple(engine.labels())
        self._num_steps = int(num_steps)
        self.writer = SummaryWriter(
            self.logdir, purge_step=start if start > 0 else None, flush_secs=self.flush_secs
        )

    def _write(self) -> None:
        if not self._pending or self.writer is None:
            return
        infos = jax.device_get(self._pending)
        self._pending = []
        for info in infos:
            rec = step_record(info, self._names, self._labels)
            step = rec["step"]
            add = self.writer.add_scalar
            for name, means in rec["decide_mean"].items():
                for which, value in means.items():
                    if value is not None:
                        add(f"decide/{name}/{which}", value, step)
            for name, value in rec["priorities"].items():
                if value is not None:
                    add(f"priority/{name}", value, step)
            for key in ("accepted", "rolled_back", "significant"):
                self._totals[key] += int(rec[key])
                add(f"decision/{key}", float(rec[key]), step)
                add(f"totals/{key}", float(self._totals[key]), step)
            add("decision/num_invalid", float(np.asarray(rec["num_invalid"])), step)

    @hookimpl
    def ev3_after_step(self, info: Any, step: int) -> None:
        self._pending.append(info)
        last = self._num_steps is not None and step + 1 >= self._num_steps
        if (step + 1) % self.every == 0 or last:
            self._write()

    @hookimpl
    def ev3_run_end(self) -> None:
        self._write()
        if self.writer is not None:
            self.writer.close()
            self.writer = None
