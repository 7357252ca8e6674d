"""The `tensorboard` entry point of the `ev3` group.

It registers the observer `"tensorboard"` (`ev3_register_observers`), which a run enables by
name: `ev3core.run(..., observers=["tensorboard"])` or `ev3 run --observer tensorboard`
(options: `--observer tensorboard:logdir=runs/exp1,every=10`). Without `logdir` it writes to
a new `run-<time>` directory under `EV3_TENSORBOARD_LOGDIR`, or under `runs`.

Installed, it also logs every run on the default plugins while `EV3_TENSORBOARD_LOGDIR` is
set (its lifecycle hooks, `ev3 run --smoke` included), and does nothing otherwise. To switch
that off, unset the variable, or load only other plugins (`EV3_LOAD_PLUGINS=...`,
`EV3_DISABLE_PLUGIN_AUTOLOAD=1`).
"""

from __future__ import annotations

import datetime
import os
from typing import Any

from ev3core import hookimpl

from ._logger import TensorBoardLogger

ENV = "EV3_TENSORBOARD_LOGDIR"
_active: TensorBoardLogger | None = None


def _run_dir(root: str) -> str:
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S-%f")
    return os.path.join(root, f"run-{stamp}")


def tensorboard_observer(
    *, logdir: str | os.PathLike[str] | None = None, every: int = 1, flush_secs: int = 10
) -> TensorBoardLogger:
    """The `"tensorboard"` observer: a `TensorBoardLogger` writing to `logdir` (default: a new
    `run-<time>` directory under `EV3_TENSORBOARD_LOGDIR`, or under `runs`)."""
    if logdir is None:
        logdir = _run_dir(os.environ.get(ENV, "").strip() or "runs")
    return TensorBoardLogger(logdir, every=every, flush_secs=flush_secs)


@hookimpl
def ev3_register_observers() -> dict[str, Any]:
    return {"tensorboard": tensorboard_observer}


@hookimpl
def ev3_run_start(engine: Any, state: Any, num_steps: int) -> None:
    global _active
    root = os.environ.get(ENV, "").strip()
    if not root:
        _active = None
        return
    _active = TensorBoardLogger(_run_dir(root))
    _active.ev3_run_start(engine=engine, state=state, num_steps=num_steps)


@hookimpl
def ev3_after_step(info: Any, step: int) -> None:
    if _active is not None:
        _active.ev3_after_step(info=info, step=step)


@hookimpl
def ev3_run_end() -> None:
    global _active
    if _active is not None:
        _active.ev3_run_end()
        _active = None
