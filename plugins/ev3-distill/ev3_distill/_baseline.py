"""The teacher and the plain-distillation baseline the EV3 student is compared with."""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import optax

from ._config import DistillConfig, _teacher_columns, make_student
from ._data import Splits
from ._losses import DistillLoss, LabelLoss
from ._models import CNN, MLP, count_params
from ._report import _write_json
from ._train import accuracy, shift_augmented_loss, train

BASELINE_CHUNK = 50  # see `run_baseline`


def train_teacher(splits: Splits, key: jax.Array, steps: int | None = None) -> Any:
    """A teacher trained on the train split with labels.

    Digits: an MLP 64-256-256-10, AdamW with a cosine schedule, inputs shifted by up to one
    pixel (>= 97% test accuracy). MNIST-1D: a 1-D CNN (two 32-channel convolutions, a
    128-unit dense layer), AdamW.
    """
    k_model, k_train = jax.random.split(key)
    data = (jnp.asarray(splits.train.x), jnp.asarray(splits.train.y))
    if splits.name == "digits":
        model = MLP(splits.in_features, splits.num_classes, (256, 256), key=k_model)
        steps = 3000 if steps is None else steps
        loss: Any = shift_augmented_loss(splits.in_shape)
        opt = optax.adamw(optax.cosine_decay_schedule(3e-3, steps), weight_decay=1e-4)
    else:
        model = CNN(splits.in_shape, splits.num_classes, (32, 32), hidden=128, key=k_model)
        steps = 3000 if steps is None else steps
        loss = LabelLoss()
        opt = optax.adamw(1e-3, weight_decay=1e-4)
    return train(model, loss, opt, data, steps=steps, batch_size=64, key=k_train)


def _teacher_like(splits: Splits, key: jax.Array) -> Any:
    """A teacher with the architecture `train_teacher` builds (to load saved leaves into)."""
    if splits.name == "digits":
        return MLP(splits.in_features, splits.num_classes, (256, 256), key=key)
    return CNN(splits.in_shape, splits.num_classes, (32, 32), hidden=128, key=key)


def run_baseline(
    splits: Splits,
    teacher: Any | None,
    cfg: DistillConfig,
    key: jax.Array,
    *,
    widths: tuple[int, ...] | None = None,
) -> tuple[Any, list[tuple[int, float]]]:
    """Plain training of a fixed-size student for `steps * trajectory` optimizer steps.

    With a `teacher`: plain distillation (one `DistillLoss`, one Adam); with `teacher=None`:
    labels only. Returns the model and the test-accuracy curve `[(gradient_steps, acc)]`
    every `trajectory` steps.
    """
    k_model, k_train = jax.random.split(key)
    model = make_student(splits, cfg, k_model, cfg.cap_widths if widths is None else widths)
    x = jnp.asarray(splits.train.x)
    y = jnp.asarray(splits.train.y)
    if teacher is None:
        loss: Any = LabelLoss()
        data: Any = (x, y)
    else:
        loss = DistillLoss(cfg.baseline_temperature, cfg.baseline_weight)
        data = (x, y, _teacher_columns([teacher], x))
    curve: list[tuple[int, float]] = []
    # `train` draws one batch key per evaluation chunk, so the chunk length fixes the batch
    # stream: chunks of gcd(trajectory, 50) steps keep the baseline's batches (hence its
    # results) independent of EV3's trajectory length (any multiple of 50), and the curve
    # still has a point at every EV3 iteration.
    chunk = math.gcd(cfg.trajectory, BASELINE_CHUNK)
    model = train(
        model,
        loss,
        optax.adam(cfg.baseline_learning_rate),
        data,
        steps=cfg.steps * cfg.trajectory,
        batch_size=cfg.batch_size,
        key=k_train,
        eval_every=chunk,
        on_eval=lambda done, m: (
            curve.append((done, accuracy(m, splits.test.x, splits.test.y)))
            if done % cfg.trajectory == 0 or done == cfg.steps * cfg.trajectory
            else None
        ),
    )
    return model, curve


def teacher_and_baseline(
    out: Path,
    splits: Splits,
    cfg: DistillConfig,
    k_teacher: jax.Array,
    k_base: jax.Array,
    say: Callable[[str], None],
) -> tuple[Any, dict[str, Any], dict[str, Any] | None]:
    """The teacher (with its record) and the baseline's record (`None` without one): saved in
    `out` once done, so a resumed run reuses them."""
    if (out / "teacher.json").is_file() and (out / "teacher.eqx").is_file():
        teacher = eqx.tree_deserialise_leaves(out / "teacher.eqx", _teacher_like(splits, k_teacher))
        teacher_info = json.loads((out / "teacher.json").read_text())
        say(f"teacher: loaded from {out / 'teacher.eqx'}")
    else:
        t = time.perf_counter()
        teacher = train_teacher(splits, k_teacher, cfg.teacher_steps)
        teacher_info = {
            "test_accuracy": accuracy(teacher, splits.test.x, splits.test.y),
            "params": count_params(teacher),
            "architecture": teacher.describe(),
            "wall_seconds": time.perf_counter() - t,
        }
        eqx.tree_serialise_leaves(out / "teacher.eqx", teacher)
        _write_json(out / "teacher.json", teacher_info)
    teacher_acc = teacher_info["test_accuracy"]
    say(
        f"teacher: {teacher_info['params']} parameters, test accuracy {teacher_acc:.4f} "
        f"({teacher_info['wall_seconds']:.1f} s)"
    )

    baseline: dict[str, Any] | None = None
    if cfg.baseline:
        if (out / "baseline.json").is_file():
            baseline = json.loads((out / "baseline.json").read_text())
        else:
            t = time.perf_counter()
            baseline_model, curve = run_baseline(splits, teacher, cfg, k_base)
            baseline = {
                "method": f"plain distillation: DistillLoss(T={cfg.baseline_temperature:g}, "
                f"w={cfg.baseline_weight:g}), adam({cfg.baseline_learning_rate:g}), fixed size",
                "test_accuracy": curve[-1][1],
                "params": count_params(baseline_model),
                "architecture": baseline_model.describe(),
                "gradient_steps": cfg.steps * cfg.trajectory,
                "wall_seconds": time.perf_counter() - t,
                "curve": curve,
            }
            _write_json(out / "baseline.json", baseline)
        say(
            f"plain distillation baseline: test accuracy {baseline['test_accuracy']:.4f} "
            f"({baseline['wall_seconds']:.1f} s)"
        )
    return teacher, teacher_info, baseline
