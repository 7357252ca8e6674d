"""ev3-template: a worked example ev3 plugin (see `docs/writing-plugins.md`)."""

from ._components import (
    MarginScheduler as MarginScheduler,
    MarginState as MarginState,
    Signum as Signum,
    TopKAccuracy as TopKAccuracy,
)

__version__ = "0.1.0"
__all__ = ["MarginScheduler", "MarginState", "Signum", "TopKAccuracy"]
