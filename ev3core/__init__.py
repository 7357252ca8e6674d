"""ev3core: a plugin-based EV3 meta-optimizer for JAX (explore, assess, adapt).

The public API is re-exported here; implementation lives in private modules.
"""

from . import errors as errors, hookspecs as hookspecs
from ._components import (
    Accuracy as Accuracy,
    CrossEntropy as CrossEntropy,
    NegCrossEntropy as NegCrossEntropy,
)
from ._engine import Engine as Engine
from ._interfaces import (
    AbstractAssessor as AbstractAssessor,
    AbstractLoss as AbstractLoss,
    AbstractProposer as AbstractProposer,
    AbstractScheduler as AbstractScheduler,
)
from ._pipeline import Pipeline as Pipeline
from ._plugins import (
    Plugins as Plugins,
    load_plugins as load_plugins,
    make as make,
    plugins as plugins,
)
from ._proposers import (
    GradientProposer as GradientProposer,
    GradientProposerState as GradientProposerState,
)
from ._run import run as run
from ._schedulers import (
    AlwaysAccept as AlwaysAccept,
    EV3Scheduler as EV3Scheduler,
    mean_and_stderr as mean_and_stderr,
)
from ._types import (
    CURRENT as CURRENT,
    STABLE as STABLE,
    WINNER as WINNER,
    Data as Data,
    Decision as Decision,
    History as History,
    Outcome as Outcome,
    State as State,
    StepInfo as StepInfo,
)
from .hookspecs import hookimpl as hookimpl

__version__ = "0.1.0"

__all__ = [
    "AbstractAssessor",
    "AbstractLoss",
    "AbstractProposer",
    "AbstractScheduler",
    "Accuracy",
    "AlwaysAccept",
    "CURRENT",
    "CrossEntropy",
    "Data",
    "Decision",
    "EV3Scheduler",
    "Engine",
    "GradientProposer",
    "GradientProposerState",
    "History",
    "NegCrossEntropy",
    "Outcome",
    "Pipeline",
    "Plugins",
    "STABLE",
    "State",
    "StepInfo",
    "WINNER",
    "errors",
    "hookimpl",
    "hookspecs",
    "load_plugins",
    "make",
    "mean_and_stderr",
    "plugins",
    "run",
]
