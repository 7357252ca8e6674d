"""Saving and loading the whole engine state: leaf-wise, atomic, checksummed, versioned.

A checkpoint directory holds, per saved step `k`:

- `ckpt-<k>-<digest>.leaves`: the array leaves of the `State`, written with
  `equinox.tree_serialise_leaves` (NumPy `.npy` records, never pickle: loading a checkpoint
  cannot run code). Typed PRNG keys are stored as their raw key data.
- `ckpt-<k>.json`: the manifest, written last. It records the format version, the step, the
  leaves file's name, size and SHA-256, a signature of every leaf (path, shape, dtype), the
  library versions, the device count, user metadata (for instance the pipeline description)
  and a SHA-256 of the manifest itself. A checkpoint exists once its manifest exists.

Both files are written to a temporary file, flushed, `fsync`ed and renamed into place, so a
crash leaves either the previous checkpoint or the new one, never a torn file. Loading checks
the manifest, the leaves file's size and checksum and the leaf signature; a corrupt or
incompatible newest checkpoint is skipped with a `CheckpointWarning` and the previous good
one is used.
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import json
import logging
import os
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax

from .._types import State
from ..errors import CheckpointError, CheckpointWarning
from . import orbax_store
from .ckpt_format import (
    FORMAT,
    FORMAT_VERSION,
    _atomic_write,
    _jsonable,
    _load_leaves,
    _manifest_digest,
    _serialise_state,
    _signature,
    _signature_mismatch,
    _Unusable,
    _versions,
)
from .ckpt_manifest import _entries, _read_manifest, _verify_leaves, list_checkpoints, next_sequence

logger = logging.getLogger("ev3core")

__all__ = ["load_checkpoint", "save_checkpoint"]


def save_checkpoint(
    directory: str | os.PathLike[str],
    state: State,
    *,
    metadata: Mapping[str, Any] | None = None,
    keep: int = 3,
    run_id: str | None = None,
    storage: str = "auto",
) -> Path:
    """Save the whole engine state to `directory`, atomically, keeping the newest `keep`.

    **Arguments:**

    - `directory`: created if needed.
    - `state`: the engine `State` (current and stable parameters, proposer and scheduler
      states, PRNG key, step, history).
    - `metadata`: JSON-serialisable extra information (pipeline description, run options,
      counters...), returned by `load_checkpoint`.
    - `keep`: how many checkpoints to keep, counted in the order they were written (a
      sequence number in each manifest, whatever the storage), so the checkpoint just
      written is always kept; older ones are deleted after the new one is safely on disk.
      At least 1.
    - `run_id`: recorded in the manifest (a `Checkpointer` passes its run's id).
    - `storage`: `"leaves"` (one file written from this process), `"orbax"` (sharded: every
      process writes its own shards with `orbax.checkpoint`; needed in multi-process runs)
      or `"auto"` (default: Orbax when the run has several processes, else `"leaves"`).
      Loading reads either. `save_checkpoint` returns once the checkpoint is committed;
      `Checkpointer(storage="orbax")` saves asynchronously.

    **Returns:** the path of the new checkpoint's manifest.

    ```python
    path = ev3core.save_checkpoint("ckpt", state, metadata={"pipeline": "smoke"})
    state, manifest = ev3core.load_checkpoint("ckpt", like=engine.init(model, key))
    ```
    """
    if int(keep) < 1:
        raise CheckpointError(
            f"save_checkpoint: keep={keep} would delete the checkpoint just written. Use keep >= 1."
        )
    if not isinstance(state, State):
        raise CheckpointError(
            f"save_checkpoint: expected an ev3core.State, got {type(state).__name__}. Pass the "
            "state returned by Engine.init / Engine.step / ev3core.run."
        )
    directory = Path(directory)
    meta = _jsonable(metadata or {})
    if orbax_store.resolve_storage(storage, state) == orbax_store.STORAGE:
        directory.mkdir(parents=True, exist_ok=True)
        writer = orbax_store.OrbaxWriter(next_sequence=next_sequence, prune=_prune)
        try:
            return writer.save(directory, state, meta, int(keep), block=True, run_id=run_id)
        finally:
            writer.close()
    directory.mkdir(parents=True, exist_ok=True)
    step = int(state.step)
    sequence = next_sequence(directory)

    blob = _serialise_state(state)
    digest = hashlib.sha256(blob).hexdigest()
    leaves_path = directory / f"ckpt-{step:010d}-{digest[:12]}.leaves"
    _atomic_write(leaves_path, lambda f: f.write(blob))

    body: dict[str, Any] = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "step": step,
        "sequence": sequence,
        "run_id": run_id,
        "leaves_file": leaves_path.name,
        "leaves_bytes": len(blob),
        "leaves_sha256": digest,
        "signature": _signature(state),
        "versions": _versions(),
        "device_count": jax.device_count(),
        "backend": jax.default_backend(),
        "created_utc": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "metadata": meta,
    }
    body["manifest_sha256"] = _manifest_digest(body)
    manifest = directory / f"ckpt-{step:010d}.json"
    text = json.dumps(body, indent=1, sort_keys=True).encode()
    _atomic_write(manifest, lambda f: f.write(text))
    _prune(directory, int(keep), written=manifest)
    logger.info("ev3core: checkpoint of step %d written to %s", step, manifest)
    return manifest


def _prune(directory: Path, keep: int, written: Path) -> None:
    """Delete all but the `keep` most recently written checkpoints (never `written`), whatever
    their storage: the leaves files and Orbax directories no kept manifest references, and the
    temporary files and directories of interrupted saves (never those of a save in flight)."""
    entries = _entries(directory)
    kept = entries[-keep:]
    if not any(e.path == written for e in kept):  # cannot happen unless the clock of
        kept = [*kept[1:], *(e for e in entries if e.path == written)]  # sequences is broken
    referenced = set()
    for e in entries:
        if e in kept:
            if e.body is not None:
                referenced.add(_data_name(e.body))
            else:  # a damaged manifest keeps every leaves file / Orbax dir with its step prefix
                referenced.add(e.path.stem)
        else:
            with contextlib.suppress(OSError):
                e.path.unlink()
    for p in directory.glob("ckpt-*.leaves"):
        prefix = p.name.rsplit("-", 1)[0]
        if p.name not in referenced and prefix not in referenced:
            with contextlib.suppress(OSError):
                p.unlink()
    # An Orbax save still in flight in this process (an asynchronous save whose commit or
    # manifest is not written yet) is spared, as are its temporary files and directories.
    busy = orbax_store.in_flight(directory)
    orbax_store.prune_dirs(directory, referenced, referenced, busy)
    # A save killed between creating its temporary file and renaming it leaves the file
    # behind. One run writes a directory at a time (a Checkpointer refuses a directory of
    # another run), and this run's own writes are complete here, so every one is stale.
    for p in directory.glob(".ckpt-*.tmp"):
        if any(p.name.startswith(f".{name}.") for name in busy):
            continue
        with contextlib.suppress(OSError):
            p.unlink()


def _data_name(body: Mapping[str, Any]) -> str:
    """The leaves file or Orbax directory that a verified manifest names."""
    if body.get("storage") == orbax_store.STORAGE:
        return str(body["orbax_dir"])
    return str(body["leaves_file"])


# ---------------------------------------------------------------------------- load
def _load_one(manifest_path: Path, like: State) -> tuple[State, dict[str, Any]]:
    body = _read_manifest(manifest_path)
    if body.get("storage") == orbax_store.STORAGE:
        state = _load_orbax(manifest_path, body, like)
    else:
        state = _load_leaves_file(manifest_path, body, like)
    if int(state.step) != body["step"]:
        raise _Unusable(f"it stores step {int(state.step)} but the manifest says {body['step']}")
    return state, body


def _load_leaves_file(manifest_path: Path, body: dict[str, Any], like: State) -> State:
    leaves = _verify_leaves(manifest_path, body)
    _check_fits(manifest_path, body, like)
    try:
        return _load_leaves(leaves, like)
    except _Unusable:
        raise
    except Exception as exc:  # noqa: BLE001 - any decoding failure means a corrupt file
        raise _Unusable(f"its leaves file cannot be decoded ({type(exc).__name__}: {exc})") from exc


def _load_orbax(manifest_path: Path, body: dict[str, Any], like: State) -> State:
    root = orbax_store.verify(manifest_path, body)
    _check_fits(manifest_path, body, like)
    try:
        return orbax_store.load(root, like)
    except CheckpointError:
        raise
    except Exception as exc:  # noqa: BLE001 - any decoding failure means a corrupt checkpoint
        raise _Unusable(f"{root.name} cannot be restored ({type(exc).__name__}: {exc})") from exc


def _check_fits(manifest_path: Path, body: dict[str, Any], like: State) -> None:
    mismatch = _signature_mismatch(body["signature"], _signature(like))
    if mismatch is not None:
        raise CheckpointError(
            f"checkpoint {manifest_path} (step {body['step']}) does not fit the state passed as "
            f"`like`: {mismatch}. Build `like` with engine.init(model, key) using the same "
            "pipeline and the same model architecture as the run that wrote it (after network "
            "growth, the grown architecture)."
        )


def load_checkpoint(
    directory_or_file: str | os.PathLike[str], like: State
) -> tuple[State, dict[str, Any]]:
    """Load the newest usable checkpoint.

    **Arguments:**

    - `directory_or_file`: a checkpoint directory (the newest usable checkpoint is loaded;
      corrupt or incompatible newer ones are skipped with a `CheckpointWarning`), or one
      manifest file `ckpt-<step>.json` (loaded or an error, no fallback).
    - `like`: a state with the right structure, e.g. `engine.init(model, key)` with the same
      pipeline and model architecture. Only its structure, shapes, dtypes, key
      implementation and shardings are used.

    **Returns:** `(state, manifest)`; `manifest["metadata"]` is what was passed to
    `save_checkpoint`, `manifest["skipped"]` lists the newer checkpoints that were unusable
    and why.

    **Raises:** `CheckpointError` when no checkpoint is usable, or when the newest intact
    checkpoint does not fit `like` (then no older one is tried: the structure is wrong, not
    the file).
    """
    path = Path(directory_or_file)
    if not isinstance(like, State):
        raise CheckpointError(
            f"load_checkpoint: like must be an ev3core.State (from engine.init(model, key)), "
            f"got {type(like).__name__}."
        )
    if path.is_file():
        try:
            state, body = _load_one(path, like)
        except _Unusable as exc:
            raise CheckpointError(f"checkpoint {path} is unusable: {exc}.") from exc
        body["skipped"] = []
        return state, body
    candidates = list_checkpoints(path)
    if not candidates:
        where = "does not exist" if not path.exists() else "holds no ckpt-<step>.json manifest"
        raise CheckpointError(
            f"no checkpoint to load: {path} {where}. Pass the directory given to "
            "save_checkpoint / Checkpointer / `ev3 run --out`."
        )
    skipped: list[dict[str, str]] = []
    for manifest in reversed(candidates):
        try:
            state, body = _load_one(manifest, like)
        except _Unusable as exc:
            skipped.append({"file": str(manifest), "reason": str(exc)})
            continue
        if skipped:
            detail = "; ".join(f"{Path(s['file']).name}: {s['reason']}" for s in skipped)
            warnings.warn(
                f"ev3core: skipped {len(skipped)} unusable checkpoint(s) in {path} ({detail}); "
                f"resuming from {manifest.name} (step {body['step']}).",
                CheckpointWarning,
                stacklevel=2,
            )
        body["skipped"] = skipped
        return state, body
    detail = "; ".join(f"{Path(s['file']).name}: {s['reason']}" for s in skipped)
    raise CheckpointError(
        f"no usable checkpoint in {path}: {detail}. Restore the files from a backup or start "
        "a new run."
    )
