"""Resuming an interrupted run: the newest usable checkpoint of a run directory and the host-side
record saved with it."""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import equinox as eqx
import jax

from ev3core import (
    load_checkpoint,
)
from ev3core._host.checkpoint import list_checkpoints
from ev3core.errors import CheckpointError

from ._config import DistillConfig
from ._data import Splits
from ._models import model_from_description


@dataclasses.dataclass
class ResumePoint:
    """Where an interrupted `run_ev3` continues: the engine state and the host-side record
    saved with it (the `distill` entry of the checkpoint's metadata)."""

    state: Any
    record: dict[str, Any]
    teachers: list[Any]  # the extra (archived-student) teachers of the current pass
    archive: dict[int, tuple[float, int, Any]]  # params -> (decide accuracy, iteration, model)


def load_resume_point(
    directory: str | os.PathLike[str],
    splits: Splits,
    cfg: DistillConfig,
    engine_for: Callable[[int], Any],
) -> ResumePoint:
    """The newest usable checkpoint of a distillation run in `directory` (its `checkpoint/`).

    The checkpoint's metadata records the student's (grown) architecture and the number of
    teachers, so the `like` state is rebuilt before the leaves are read; the archived
    students and extra teachers are read from `students/`.
    """
    directory = Path(directory)
    manifests = list_checkpoints(directory / "checkpoint")
    errors = []
    for manifest in reversed(manifests):
        try:
            record = json.loads(manifest.read_text())["metadata"]["distill"]
            key = jax.random.key(0)
            like_model = model_from_description(record["architecture"], key=key)
            engine = engine_for(1 + len(record["teachers"]))
            like = engine.init(like_model, key)
            state, _ = load_checkpoint(manifest, like=like)
        except (OSError, ValueError, KeyError, TypeError, CheckpointError) as exc:
            errors.append(f"{manifest.name}: {exc}")
            continue

        def load(entry: dict[str, Any]) -> Any:
            like = model_from_description(entry["architecture"], key=jax.random.key(0))
            return eqx.tree_deserialise_leaves(directory / entry["file"], like)

        teachers = [load(t) for t in record["teachers"]]
        archive = {
            int(e["params"]): (float(e["decide_accuracy"]), int(e["iteration"]), load(e))
            for e in record["archive"]
        }
        return ResumePoint(state=state, record=record, teachers=teachers, archive=archive)
    raise CheckpointError(
        f"--resume {directory}: no usable distillation checkpoint in {directory / 'checkpoint'}"
        + (f" ({'; '.join(errors)})" if errors else "")
        + ". Pass the --out directory of an earlier `ev3 run`, or start a new run."
    )


def _resume_record(directory: Path) -> dict[str, Any]:
    """The `distill` metadata of the newest checkpoint manifest in `directory/checkpoint`."""
    for manifest in reversed(list_checkpoints(directory / "checkpoint")):
        try:
            return json.loads(manifest.read_text())["metadata"]["distill"]
        except (OSError, ValueError, KeyError, TypeError):
            continue
    raise CheckpointError(
        f"--resume {directory}: no distillation checkpoint in {directory / 'checkpoint'}. Pass "
        "the --out directory of an earlier `ev3 run`."
    )
