"""The `tensorboard` entry point of the `ev3` group.

Installed, this plugin does nothing until `EV3_TENSORBOARD_LOGDIR` is set: then every
`ev3core.run` that uses the default plugins (`ev3 run --smoke` included) writes TensorBoard
scalars there (a sub-directory per run). To log one run from Python, register a
`TensorBoardLogger` yourself instead; to switch the plugin off entirely, unset the variable,
or load only other plugins (`EV3_LOAD_PLUGINS=...`, `EV3_DISABLE_PLUGIN_AUTOLOAD=1`).
"""

from __future__ import annotations

import datetime
import os
from typing import Any

from ev3core import hookimpl

from ._logger import TensorBoardLogger

ENV = "EV3_TENSORBOARD_LOGDIR"
_active: TensorBoardLogger | None = None


@hookimpl
def ev3_run_start(engine: Any, state: Any, num_steps: int) -> None:
    global _active
    root = os.environ.get(ENV, "").strip()
    if not root:
        _active = None
        return
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S-%f")
    _active = TensorBoardLogger(os.path.join(root, f"run-{stamp}"))
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
