"""Knowledge distillation with network growth for ev3core (the default `ev3 run` job).

```python
from ev3_distill import DistillLoss, MLP, widen, deepen, grow_state, distill_experiment
```
"""

from ._baseline import run_baseline as run_baseline, train_teacher as train_teacher
from ._config import DistillConfig as DistillConfig, default_pipeline as default_pipeline
from ._data import DATASETS as DATASETS, Splits as Splits, load_dataset as load_dataset
from ._experiment import distill_experiment as distill_experiment
from ._growth import (
    GrowthPolicy as GrowthPolicy,
    StudentArchive as StudentArchive,
    grow_state as grow_state,
)
from ._loop import run_ev3 as run_ev3
from ._losses import DistillLoss as DistillLoss, LabelLoss as LabelLoss, kd_loss as kd_loss
from ._models import (
    CNN as CNN,
    MLP as MLP,
    count_params as count_params,
    deepen as deepen,
    max_abs_output_difference as max_abs_output_difference,
    model_from_description as model_from_description,
    widen as widen,
)
from ._resume import load_resume_point as load_resume_point

__version__ = "0.1.0"

__all__ = [
    "CNN",
    "DATASETS",
    "DistillConfig",
    "DistillLoss",
    "GrowthPolicy",
    "LabelLoss",
    "MLP",
    "Splits",
    "StudentArchive",
    "count_params",
    "deepen",
    "default_pipeline",
    "distill_experiment",
    "grow_state",
    "kd_loss",
    "load_dataset",
    "load_resume_point",
    "max_abs_output_difference",
    "model_from_description",
    "run_baseline",
    "run_ev3",
    "train_teacher",
    "widen",
]
