"""Observability plugins: a progress bar and a JSON-lines step logger.

Both are lifecycle observers (methods `ev3_run_start`, `ev3_after_step`, `ev3_run_end`), like
`ev3core.Checkpointer`: pass them to `ev3core.run(observers=[...])`, or by their registered
names `"progress"` and `"jsonl"` (this module is a built-in plugin implementing
`ev3_register_observers`; `ev3 run --observer jsonl:path=steps.jsonl`). Nothing is shown or
written unless a run asks for them (`ev3 run` adds a progress bar unless `--no-progress`, and
a JSON-lines logger with `--log-jsonl PATH`).

Reading a `StepInfo` on the host waits for the step to finish. Both plugins keep the infos of
the last steps on the device and read them together every `every` steps, so with `every > 1`
the host can dispatch the next steps while earlier ones still run.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import IO, Any

import numpy as np

from .._sharding import to_host
from .._types import CURRENT, STABLE, WINNER, Choice, choice_name
from ..errors import ConfigurationError
from ..hookspecs import hookimpl

__all__ = ["JsonlLogger", "ProgressBar", "step_record"]

#: `ProgressBar.counts` key of each decision (by its `Choice` name).
_COUNT_KEY = {
    choice_name(Choice.winner): "accepted",
    choice_name(Choice.current): "kept",
    choice_name(Choice.stable): "rolled_back",
}
#: Position in `StepInfo.decide_mean` of each decision (by its `Choice` name).
_POSITION = {
    choice_name(Choice.winner): WINNER,
    choice_name(Choice.current): CURRENT,
    choice_name(Choice.stable): STABLE,
}


def _choice_name(choice: Any) -> str:
    """`Choice[choice]` for one step's choice on the host (`"winner"`, `"current"` or
    `"stable"`; `"invalid"` for a hand-made item past the last one, which the engine never
    reports)."""
    try:
        return choice_name(choice)
    except (IndexError, ValueError):
        return "invalid"


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def _finite(x: Any) -> float | None:
    x = float(x)
    return x if math.isfinite(x) else None  # JSON has no NaN / Infinity


def step_record(
    info: Any, objective_names: tuple[str, ...] = (), labels: tuple[str, ...] = ()
) -> dict[str, Any]:
    """One step's `StepInfo` (already on the host) as a JSON-serialisable dict.

    **Arguments:**

    - `info`: a `StepInfo` of one step (NumPy arrays or scalars, e.g. after `jax.device_get`).
    - `objective_names`: the engine's `objective_names` (default: `objective0`, ...).
    - `labels`: the engine's candidate `labels()` (default: the winner's index as a string).

    **Returns:** a dict with `step`, `choice` (`"winner"`, `"current"` or `"stable"`),
    `accepted`, `rolled_back`, `significant`, `num_invalid`, `winner` (index) and
    `winner_label`, `decide_mean` (objective -> `{"winner", "current", "stable"}` means on the
    decide set) and `priorities` (objective -> weight). Non-finite numbers become `None`.
    """
    decide = np.asarray(info.decide_mean)
    prios = np.asarray(info.priorities)
    names = tuple(objective_names) or tuple(f"objective{i}" for i in range(decide.shape[0]))
    winner = int(info.winner)
    return {
        "step": int(info.step),
        "choice": _choice_name(info.choice),
        "accepted": bool(info.accepted),
        "rolled_back": bool(info.rolled_back),
        "significant": bool(info.significant),
        "num_invalid": int(info.num_invalid),
        "winner": winner,
        "winner_label": labels[winner] if 0 <= winner < len(labels) else str(winner),
        "decide_mean": {
            name: {
                "winner": _finite(decide[i, WINNER]),
                "current": _finite(decide[i, CURRENT]),
                "stable": _finite(decide[i, STABLE]),
            }
            for i, name in enumerate(names)
        },
        "priorities": {name: _finite(prios[i]) for i, name in enumerate(names)},
    }


class _Buffered:
    """Keeps the `StepInfo`s of the last steps on the device; reads them every `every` steps."""

    def __init__(self, every: int):
        if int(every) < 1:
            raise ConfigurationError(
                f"{type(self).__name__}: every={every} must be >= 1 (steps between reads)."
            )
        self.every = int(every)
        self._pending: list[Any] = []
        self._num_steps: int | None = None

    def _due(self, step: int) -> bool:
        return (step + 1) % self.every == 0 or (
            self._num_steps is not None and step + 1 >= self._num_steps
        )

    def _take(self) -> list[Any]:
        """The pending infos, on the host, in step order."""
        if not self._pending:
            return []
        host = to_host(self._pending)  # also in a multi-process run
        self._pending = []
        return host


class ProgressBar(_Buffered):
    """A lifecycle-hook plugin that shows a progress bar (tqdm) and counts the decisions.

    On a terminal it draws a tqdm bar with the decide-set mean of the primary objective and
    the counts of accepted, kept and rolled-back steps; on any other stream (a log file, CI)
    it prints one plain line every `every` steps instead. It keeps counting when disabled,
    so `counts` can be stored in checkpoints either way.

    **Arguments:**

    - `every`: steps between refreshes; the step infos are read from the device then (`1`:
      after every step).
    - `file`: the stream to draw on (default `sys.stderr`).
    - `style`: `"auto"` (bar on a terminal, lines otherwise), `"bar"` or `"lines"`.
    - `desc`: the bar's label.
    - `disable`: draw nothing (still count). Default: `EV3_NO_PROGRESS=1` in the environment.
    - `leave`: keep the finished bar on screen.

    **Attributes:** `counts`, a dict with `accepted`, `kept`, `rolled_back`, `significant`
    and `masked` (non-finite candidates) totals over the steps seen.

    ```python
    bar = ev3core.ProgressBar(every=10)
    plugins = ev3core.load_plugins(extra=[bar])
    state, infos = ev3core.run(engine, state, data, 100, plugins=plugins)
    print(bar.counts)
    ```
    """

    def __init__(
        self,
        every: int = 1,
        *,
        file: Any = None,  # a text stream (anything with write and flush)
        style: str = "auto",
        desc: str = "ev3",
        disable: bool | None = None,
        leave: bool = True,
    ):
        super().__init__(every)
        if style not in ("auto", "bar", "lines"):
            raise ConfigurationError(
                f"ProgressBar: style={style!r} is not one of 'auto', 'bar', 'lines'."
            )
        self.file = file
        self.style = style
        self.desc = desc
        self.disable = _env_flag("EV3_NO_PROGRESS") if disable is None else bool(disable)
        self.leave = leave
        self._counts = {"accepted": 0, "rolled_back": 0, "kept": 0, "significant": 0, "masked": 0}
        self._bar: Any = None
        self._start = 0
        self._seen = 0
        self._last: str = ""

    @property
    def counts(self) -> dict[str, int]:
        """Decision totals over every step seen so far (reads pending infos first)."""
        self._drain()
        return self._counts

    def _stream(self) -> Any:
        return self.file if self.file is not None else sys.stderr

    def _drain(self) -> None:
        for info in self._take():
            name = _choice_name(info.choice)
            self._counts[_COUNT_KEY.get(name, "kept")] += 1
            self._counts["significant"] += bool(info.significant)
            self._counts["masked"] += int(info.num_invalid)
            acc = float(np.asarray(info.decide_mean)[0, _POSITION.get(name, CURRENT)])
            self._last = f"{acc:.4f}"
            self._seen = int(info.step) + 1

    def _postfix(self) -> str:
        c = self._counts
        return (
            f"decide {self._last}  accepted {c['accepted']}  kept {c['kept']}  rolled back "
            f"{c['rolled_back']}  significant {c['significant']}"
        )

    @hookimpl
    def ev3_run_start(self, state: Any, num_steps: int) -> None:
        self._start = int(to_host(state.step))  # replicated: read locally
        self._num_steps = int(num_steps)
        self._seen = self._start
        if self.disable:
            return
        stream = self._stream()
        use_bar = self.style == "bar" or (
            self.style == "auto" and hasattr(stream, "isatty") and stream.isatty()
        )
        if use_bar:
            from tqdm.auto import tqdm

            self._bar = tqdm(
                total=self._start + self._num_steps,
                initial=self._start,
                desc=self.desc,
                unit="step",
                file=stream,
                leave=self.leave,
                dynamic_ncols=True,
            )

    @hookimpl
    def ev3_after_step(self, info: Any, step: int) -> None:
        self._pending.append(info)
        if not self._due(step):
            return
        self._drain()
        if self.disable:
            return
        total = self._start + (self._num_steps or 0)
        if self._bar is not None:
            self._bar.set_postfix_str(self._postfix(), refresh=False)
            self._bar.update(self._seen - self._bar.n)
        else:
            print(
                f"{self.desc} step {self._seen:>4}/{total}  {self._postfix()}",
                file=self._stream(),
                flush=True,
            )

    @hookimpl
    def ev3_run_end(self) -> None:
        self._drain()
        if self._bar is not None:
            self._bar.set_postfix_str(self._postfix(), refresh=False)
            self._bar.update(self._seen - self._bar.n)
            self._bar.close()
            self._bar = None


class JsonlLogger(_Buffered):
    """A lifecycle-hook plugin that appends one JSON line per step to a file.

    Each line is `step_record(info, engine.objective_names, engine.labels())` plus `time`
    (Unix seconds when the line was written): step, choice, accepted, rolled_back,
    significant, num_invalid, the winner's index and label, decide-set means per objective
    and the objective priorities. Lines are flushed as they are written.

    The file is opened in append mode, so a resumed run continues it. Lines of steps that the
    run is about to take again (a crash after the last checkpoint, then a resume from it) are
    removed when the run starts, so every step appears once.

    **Arguments:**

    - `path`: the file (its directory is created if needed).
    - `every`: steps between reads of the step infos (each step still gets its own line).

    ```python
    logger = ev3core.JsonlLogger("steps.jsonl")
    plugins = ev3core.load_plugins(extra=[logger])
    ```
    """

    def __init__(self, path: str | os.PathLike[str], every: int = 1):
        super().__init__(every)
        self.path = Path(path)
        self._file: IO[str] | None = None
        self._names: tuple[str, ...] = ()
        self._labels: tuple[str, ...] = ()

    def _forget_from(self, start: int) -> None:
        """Drop lines of steps >= `start` (they are about to be taken again)."""
        if not self.path.is_file():
            return
        lines = self.path.read_text().splitlines(keepends=True)
        keep = []
        for line in lines:
            try:
                step = int(json.loads(line)["step"])
            except (ValueError, KeyError, TypeError):
                continue  # a torn last line of a crashed run
            if step < start:
                keep.append(line if line.endswith("\n") else line + "\n")
        if len(keep) != len(lines):
            tmp = self.path.with_name(f".{self.path.name}.tmp")
            tmp.write_text("".join(keep))
            os.replace(tmp, self.path)

    @hookimpl
    def ev3_run_start(self, engine: Any, state: Any, num_steps: int) -> None:
        self._num_steps = int(num_steps)
        self._names = tuple(engine.objective_names)
        self._labels = tuple(engine.labels())
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._forget_from(int(to_host(state.step)))
        self._file = open(self.path, "a")  # noqa: SIM115 - closed in ev3_run_end

    def _write(self) -> None:
        infos = self._take()
        if not infos:
            return
        if self._file is None:  # called outside ev3core.run (no ev3_run_start)
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._file = open(self.path, "a")  # noqa: SIM115 - closed in ev3_run_end
        now = time.time()
        for info in infos:
            record = step_record(info, self._names, self._labels)
            record["time"] = now
            self._file.write(json.dumps(record) + "\n")
        self._file.flush()

    @hookimpl
    def ev3_after_step(self, info: Any, step: int) -> None:
        self._pending.append(info)
        if self._due(step):
            self._write()

    @hookimpl
    def ev3_run_end(self) -> None:
        self._write()
        if self._file is not None:
            with contextlib.suppress(OSError):
                self._file.close()
            self._file = None


@hookimpl
def ev3_register_observers() -> dict[str, Any]:
    return {"progress": ProgressBar, "jsonl": JsonlLogger}
