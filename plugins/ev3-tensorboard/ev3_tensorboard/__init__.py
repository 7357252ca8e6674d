"""ev3-tensorboard: TensorBoard logging of EV3 runs (a lifecycle-hook plugin for ev3core)."""

from ._logger import TensorBoardLogger as TensorBoardLogger

__all__ = ["TensorBoardLogger"]
__version__ = "0.1.0"
