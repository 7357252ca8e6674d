"""ev3core: a plugin-based EV3 meta-optimizer for JAX (explore, assess, adapt).

The public API is re-exported here; implementation lives in private modules.
"""

import importlib.metadata

from . import errors as errors, hookspecs as hookspecs
from ._adapt.bounds import (
    AbstractBound as AbstractBound,
    BootstrapBound as BootstrapBound,
    Interval as Interval,
    NormalBound as NormalBound,
    PairedBound as PairedBound,
    level_for_z as level_for_z,
    z_for_level as z_for_level,
)
from ._adapt.priorities import (
    AbstractPriority as AbstractPriority,
    Constraint as Constraint,
    EXP3Priority as EXP3Priority,
    Feedback as Feedback,
    Lexicographic as Lexicographic,
    Objective as Objective,
    StallPriority as StallPriority,
    UCBPriority as UCBPriority,
    WeightedChebyshev as WeightedChebyshev,
    WeightedSum as WeightedSum,
)
from ._adapt.schedulers import (
    AlwaysAccept as AlwaysAccept,
    EV3Scheduler as EV3Scheduler,
    EV3SchedulerState as EV3SchedulerState,
)
from ._assess.metrics import (
    AUC as AUC,
    AbstractBatchAssessor as AbstractBatchAssessor,
    F1Score as F1Score,
    NegExpectedCalibrationError as NegExpectedCalibrationError,
)
from ._assess.scores import (
    Accuracy as Accuracy,
    NegBrierScore as NegBrierScore,
    NegCrossEntropy as NegCrossEntropy,
)
from ._engine.engine import Engine as Engine
from ._explore.augment import (
    AbstractAugment as AbstractAugment,
    Compose as Compose,
    HorizontalFlip as HorizontalFlip,
    RandomCrop as RandomCrop,
    Reshaped as Reshaped,
    Shift1D as Shift1D,
    augment_batch as augment_batch,
)
from ._explore.blocks import GradientProposerState as GradientProposerState
from ._explore.compute import gradient_evaluations as gradient_evaluations
from ._explore.gradient import GradientProposer as GradientProposer
from ._explore.hyper import Evolve as Evolve, Optimizer as Optimizer
from ._explore.losses import (
    CrossEntropy as CrossEntropy,
    Relabel as Relabel,
    SelfDistill as SelfDistill,
)
from ._explore.pbt import PBTProposer as PBTProposer
from ._host.cache import (
    default_cache_dir as default_cache_dir,
    disable_compilation_cache as disable_compilation_cache,
    enable_compilation_cache as enable_compilation_cache,
)
from ._host.checkpoint import Checkpointer as Checkpointer
from ._host.ckpt_io import load_checkpoint as load_checkpoint, save_checkpoint as save_checkpoint
from ._host.ckpt_manifest import (
    latest_checkpoint as latest_checkpoint,
    list_checkpoints as list_checkpoints,
)
from ._host.observe import (
    JsonlLogger as JsonlLogger,
    ProgressBar as ProgressBar,
    step_record as step_record,
)
from ._host.run import run as run
from ._host.stream import DataStream as DataStream
from ._interfaces import (
    AbstractAssessor as AbstractAssessor,
    AbstractLoss as AbstractLoss,
    AbstractProposer as AbstractProposer,
    AbstractReferenceLoss as AbstractReferenceLoss,
    AbstractScheduler as AbstractScheduler,
    ComponentName as ComponentName,
    objective_value as objective_value,
)
from ._plugins.manager import (
    Plugins as Plugins,
    load_plugins as load_plugins,
    make as make,
    plugin_manager as plugin_manager,
)
from ._plugins.pipeline import Pipeline as Pipeline
from ._precision import MixedPrecision as MixedPrecision
from ._sharding import (
    candidate_mesh as candidate_mesh,
    replicate as replicate,
    shard_state as shard_state,
    split_examples as split_examples,
)
from ._stateful import (
    Stateful as Stateful,
    TrainingView as TrainingView,
    batch_apply as batch_apply,
)
from ._toy import toy_model as toy_model, toy_problem as toy_problem
from ._types import (
    CURRENT as CURRENT,
    STABLE as STABLE,
    WINNER as WINNER,
    Choice as Choice,
    Data as Data,
    Decision as Decision,
    History as History,
    Outcome as Outcome,
    State as State,
    StepInfo as StepInfo,
    choice_at as choice_at,
    choice_index as choice_index,
)
from .hookspecs import hookimpl as hookimpl

try:
    __version__ = importlib.metadata.version("ev3core")
except importlib.metadata.PackageNotFoundError:  # a source tree that was never installed
    __version__ = "0+unknown"

__all__ = [
    "AUC",
    "AbstractAssessor",
    "AbstractAugment",
    "AbstractBatchAssessor",
    "AbstractBound",
    "AbstractLoss",
    "AbstractPriority",
    "AbstractProposer",
    "AbstractReferenceLoss",
    "AbstractScheduler",
    "ComponentName",
    "objective_value",
    "Accuracy",
    "AlwaysAccept",
    "BootstrapBound",
    "CURRENT",
    "Checkpointer",
    "Choice",
    "Compose",
    "Constraint",
    "CrossEntropy",
    "Data",
    "DataStream",
    "Decision",
    "EV3Scheduler",
    "EV3SchedulerState",
    "EXP3Priority",
    "Engine",
    "Evolve",
    "F1Score",
    "Feedback",
    "GradientProposer",
    "GradientProposerState",
    "History",
    "HorizontalFlip",
    "Interval",
    "JsonlLogger",
    "Lexicographic",
    "NegBrierScore",
    "NegCrossEntropy",
    "NegExpectedCalibrationError",
    "NormalBound",
    "Objective",
    "Optimizer",
    "MixedPrecision",
    "Outcome",
    "PBTProposer",
    "PairedBound",
    "Pipeline",
    "toy_model",
    "toy_problem",
    "Plugins",
    "ProgressBar",
    "RandomCrop",
    "Relabel",
    "Reshaped",
    "STABLE",
    "SelfDistill",
    "Shift1D",
    "StallPriority",
    "State",
    "Stateful",
    "StepInfo",
    "TrainingView",
    "UCBPriority",
    "WINNER",
    "WeightedChebyshev",
    "WeightedSum",
    "augment_batch",
    "batch_apply",
    "candidate_mesh",
    "choice_at",
    "choice_index",
    "default_cache_dir",
    "disable_compilation_cache",
    "enable_compilation_cache",
    "errors",
    "gradient_evaluations",
    "hookimpl",
    "hookspecs",
    "latest_checkpoint",
    "list_checkpoints",
    "level_for_z",
    "load_checkpoint",
    "load_plugins",
    "make",
    "plugin_manager",
    "replicate",
    "run",
    "save_checkpoint",
    "shard_state",
    "split_examples",
    "step_record",
    "z_for_level",
]
