"""Knowledge distillation with network growth for ev3core (the default `ev3 run` job).

```python
from ev3_distill import DistillLoss, MLP, widen, deepen, grow_state, distill_experiment
```
"""

from ._data import DATASETS as DATASETS
from ._data import Splits as Splits
from ._data import load_dataset as load_dataset
from ._experiment import (
    DistillConfig as DistillConfig,
)
from ._experiment import (
    default_pipeline as default_pipeline,
)
from ._experiment import (
    distill_experiment as distill_experiment,
)
from ._experiment import (
    load_resume_point as load_resume_point,
)
from ._experiment import (
    run_baseline as run_baseline,
)
from ._experiment import (
    run_ev3 as run_ev3,
)
from ._experiment import (
    train_teacher as train_teacher,
)
from ._growth import (
    GrowthPolicy as GrowthPolicy,
)
from ._growth import (
    StudentArchive as StudentArchive,
)
from ._growth import (
    grow_state as grow_state,
)
from ._losses import DistillLoss as DistillLoss
from ._losses import LabelLoss as LabelLoss
from ._losses import kd_loss as kd_loss
from ._models import (
    CNN as CNN,
)
from ._models import (
    MLP as MLP,
)
from ._models import (
    count_params as count_params,
)
from ._models import (
    deepen as deepen,
)
from ._models import (
    max_abs_output_difference as max_abs_output_difference,
)
from ._models import (
    model_from_description as model_from_description,
)
from ._models import (
    widen as widen,
)

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
