"""Knowledge distillation with network growth for ev3core (the default `ev3 run` job).

```python
from ev3_distill import DistillLoss, MLP, widen, deepen, grow_state, distill_experiment
```
"""

from ._baseline import run_baseline as run_baseline, train_teacher as train_teacher
from ._cifar import (
    load_cifar as load_cifar,
    read_split as read_split,
    read_teacher_logits as read_teacher_logits,
    write_array_record as write_array_record,
    write_teacher_logits as write_teacher_logits,
)
from ._config import (
    DistillConfig as DistillConfig,
    default_pipeline as default_pipeline,
    image_augment as image_augment,
)
from ._data import DATASETS as DATASETS, Splits as Splits, load_dataset as load_dataset
from ._experiment import (
    CIFAR_DEFAULTS as CIFAR_DEFAULTS,
    cifar_experiment as cifar_experiment,
    distill_experiment as distill_experiment,
)
from ._growth import (
    GrowthPolicy as GrowthPolicy,
    StudentArchive as StudentArchive,
    grow_resnet as grow_resnet,
    grow_state as grow_state,
)
from ._loop import run_ev3 as run_ev3
from ._losses import DistillLoss as DistillLoss, LabelLoss as LabelLoss, kd_loss as kd_loss
from ._models import (
    CNN as CNN,
    MLP as MLP,
    count_params as count_params,
    deepen as deepen,
    describe as describe,
    max_abs_output_difference as max_abs_output_difference,
    model_from_description as model_from_description,
    widen as widen,
)
from ._resnet import (
    BasicBlock as BasicBlock,
    ResNet as ResNet,
    deepen_resnet as deepen_resnet,
    embed as embed,
    grow_tree as grow_tree,
    make_resnet as make_resnet,
    widen_resnet as widen_resnet,
)
from ._resume import load_resume_point as load_resume_point

__version__ = "0.1.0"

__all__ = [
    "BasicBlock",
    "ResNet",
    "deepen_resnet",
    "embed",
    "grow_resnet",
    "grow_tree",
    "make_resnet",
    "widen_resnet",
    "CIFAR_DEFAULTS",
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
    "cifar_experiment",
    "deepen",
    "default_pipeline",
    "describe",
    "distill_experiment",
    "grow_state",
    "image_augment",
    "kd_loss",
    "load_cifar",
    "load_dataset",
    "load_resume_point",
    "max_abs_output_difference",
    "model_from_description",
    "read_split",
    "read_teacher_logits",
    "run_baseline",
    "run_ev3",
    "train_teacher",
    "widen",
    "write_array_record",
    "write_teacher_logits",
]
