"""ev3core: a plugin-based EV3 meta-optimizer for JAX (explore, assess, adapt).

The public API is re-exported here; implementation lives in private modules.
"""

from . import errors as errors
from . import hookspecs as hookspecs
from ._bounds import (
    AbstractBound as AbstractBound,
)
from ._bounds import (
    BootstrapBound as BootstrapBound,
)
from ._bounds import (
    Interval as Interval,
)
from ._bounds import (
    NormalBound as NormalBound,
)
from ._bounds import (
    PairedBound as PairedBound,
)
from ._bounds import (
    level_for_z as level_for_z,
)
from ._bounds import (
    z_for_level as z_for_level,
)
from ._checkpoint import (
    Checkpointer as Checkpointer,
)
from ._checkpoint import (
    latest_checkpoint as latest_checkpoint,
)
from ._checkpoint import (
    load_checkpoint as load_checkpoint,
)
from ._checkpoint import (
    save_checkpoint as save_checkpoint,
)
from ._components import (
    Accuracy as Accuracy,
)
from ._components import (
    CrossEntropy as CrossEntropy,
)
from ._components import (
    NegBrierScore as NegBrierScore,
)
from ._components import (
    NegCrossEntropy as NegCrossEntropy,
)
from ._engine import Engine as Engine
from ._interfaces import (
    AbstractAssessor as AbstractAssessor,
)
from ._interfaces import (
    AbstractLoss as AbstractLoss,
)
from ._interfaces import (
    AbstractProposer as AbstractProposer,
)
from ._interfaces import (
    AbstractScheduler as AbstractScheduler,
)
from ._metrics import (
    AUC as AUC,
)
from ._metrics import (
    AbstractBatchAssessor as AbstractBatchAssessor,
)
from ._metrics import (
    F1Score as F1Score,
)
from ._metrics import (
    NegExpectedCalibrationError as NegExpectedCalibrationError,
)
from ._observe import (
    JsonlLogger as JsonlLogger,
)
from ._observe import (
    ProgressBar as ProgressBar,
)
from ._pipeline import Pipeline as Pipeline
from ._plugins import (
    Plugins as Plugins,
)
from ._plugins import (
    load_plugins as load_plugins,
)
from ._plugins import (
    make as make,
)
from ._plugins import (
    plugins as plugins,
)
from ._priorities import (
    AbstractPriority as AbstractPriority,
)
from ._priorities import (
    Constraint as Constraint,
)
from ._priorities import (
    EXP3Priority as EXP3Priority,
)
from ._priorities import (
    Feedback as Feedback,
)
from ._priorities import (
    Lexicographic as Lexicographic,
)
from ._priorities import (
    Objective as Objective,
)
from ._priorities import (
    StallPriority as StallPriority,
)
from ._priorities import (
    UCBPriority as UCBPriority,
)
from ._priorities import (
    WeightedChebyshev as WeightedChebyshev,
)
from ._priorities import (
    WeightedSum as WeightedSum,
)
from ._proposers import (
    GradientProposer as GradientProposer,
)
from ._proposers import (
    GradientProposerState as GradientProposerState,
)
from ._run import run as run
from ._schedulers import (
    AlwaysAccept as AlwaysAccept,
)
from ._schedulers import (
    EV3Scheduler as EV3Scheduler,
)
from ._schedulers import (
    EV3SchedulerState as EV3SchedulerState,
)
from ._schedulers import (
    mean_and_stderr as mean_and_stderr,
)
from ._sharding import (
    candidate_mesh as candidate_mesh,
)
from ._sharding import (
    replicate as replicate,
)
from ._sharding import (
    shard_state as shard_state,
)
from ._types import (
    CURRENT as CURRENT,
)
from ._types import (
    STABLE as STABLE,
)
from ._types import (
    WINNER as WINNER,
)
from ._types import (
    Data as Data,
)
from ._types import (
    Decision as Decision,
)
from ._types import (
    History as History,
)
from ._types import (
    Outcome as Outcome,
)
from ._types import (
    State as State,
)
from ._types import (
    StepInfo as StepInfo,
)
from .hookspecs import hookimpl as hookimpl

__version__ = "0.1.0"

__all__ = [
    "AUC",
    "AbstractAssessor",
    "AbstractBatchAssessor",
    "AbstractBound",
    "AbstractLoss",
    "AbstractPriority",
    "AbstractProposer",
    "AbstractScheduler",
    "Accuracy",
    "AlwaysAccept",
    "BootstrapBound",
    "CURRENT",
    "Checkpointer",
    "Constraint",
    "CrossEntropy",
    "Data",
    "Decision",
    "EV3Scheduler",
    "EV3SchedulerState",
    "EXP3Priority",
    "Engine",
    "F1Score",
    "Feedback",
    "GradientProposer",
    "GradientProposerState",
    "History",
    "Interval",
    "JsonlLogger",
    "Lexicographic",
    "NegBrierScore",
    "NegCrossEntropy",
    "NegExpectedCalibrationError",
    "NormalBound",
    "Objective",
    "Outcome",
    "PairedBound",
    "Pipeline",
    "Plugins",
    "ProgressBar",
    "STABLE",
    "StallPriority",
    "State",
    "StepInfo",
    "UCBPriority",
    "WINNER",
    "WeightedChebyshev",
    "WeightedSum",
    "candidate_mesh",
    "errors",
    "hookimpl",
    "hookspecs",
    "latest_checkpoint",
    "level_for_z",
    "load_checkpoint",
    "load_plugins",
    "make",
    "mean_and_stderr",
    "plugins",
    "replicate",
    "run",
    "save_checkpoint",
    "shard_state",
    "z_for_level",
]
