"""Resuming an interrupted run: the newest usable checkpoint of a run directory and the host-side
record saved with it."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import equinox as eqx
import jax

from ev3core import (
    load_checkpoint,
)
from ev3core._host.ckpt_manifest import list_checkpoints, newest_verified_manifest, read_manifest
from ev3core.errors import CheckpointError, ConfigurationError

from ._config import DistillConfig, _file_sha256, _inside
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
            record = read_manifest(manifest)["metadata"]["distill"]  # verified first
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
            return eqx.tree_deserialise_leaves(_inside(directory, entry["file"]), like)

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
    """The `distill` metadata of the newest verified checkpoint in `directory/checkpoint`."""
    if not list_checkpoints(directory / "checkpoint"):
        raise CheckpointError(
            f"--resume {directory}: no distillation checkpoint in {directory / 'checkpoint'}. "
            "Pass the --out directory of an earlier `ev3 run`."
        )
    _, body, _ = newest_verified_manifest(directory / "checkpoint")
    record = body["metadata"].get("distill")
    if not isinstance(record, dict) or not isinstance(record.get("config"), dict):
        raise CheckpointError(
            f"--resume {directory}: the newest checkpoint holds no distillation record; it "
            "was not written by `ev3 run` (distill)."
        )
    return record


def _resume_pipeline(directory: Path, record: dict[str, Any], named: Any) -> str | None:
    """The pipeline file to run again when resuming.

    A file is never run because a checkpoint names it (a checkpoint's checksums detect
    damage, not tampering): the user names it (`ev3 run FILE --resume DIR`), and when the
    run recorded a SHA-256 of its pipeline file, the named file must have that content.
    """
    recorded = record.get("pipeline_file")
    digest = record.get("pipeline_sha256")
    if recorded is None:
        if named is not None:
            raise ConfigurationError(
                f"--resume {directory}: that run used the built-in pipeline, not a pipeline "
                f"file; drop {named}."
            )
        return None
    if named is None:
        raise ConfigurationError(
            f"--resume {directory}: that run used the pipeline file {recorded!r}. ev3 does not "
            "run a file because a checkpoint names it; name it yourself to resume: "
            f"ev3 run {recorded} --resume {directory}"
        )
    if isinstance(digest, str) and _file_sha256(named) != digest:
        raise ConfigurationError(
            f"--resume {directory}: {named} is not the pipeline file the run was started with "
            f"({recorded!r}, SHA-256 {digest[:12]}...): its content differs. Resume with the "
            "same file, or start a new run."
        )
    return str(named)
