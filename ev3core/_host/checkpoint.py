"""Checkpoints of the whole engine state: leaf-wise, atomic, checksummed, versioned.

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
import re
import uuid
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from .._types import State
from ..errors import CheckpointError, CheckpointWarning
from ..hookspecs import hookimpl
from . import orbax_store
from .ckpt_format import (
    _MANIFEST_RE,
    _MAX_MANIFEST_BYTES,
    _READABLE_VERSIONS,
    FORMAT,
    FORMAT_VERSION,
    _atomic_write,
    _from_raw,
    _is_key,
    _jsonable,
    _manifest_digest,
    _serialise_state,
    _sha256_file,
    _signature,
    _to_storable,
    _Unusable,
    _versions,
    _weak_like,
)

logger = logging.getLogger("ev3core")

__all__ = [
    "FORMAT_VERSION",
    "Checkpointer",
    "describe_engine",
    "latest_checkpoint",
    "list_checkpoints",
    "load_checkpoint",
    "newest_verified_manifest",
    "read_manifest",
    "save_checkpoint",
    "state_digest",
]


# ---------------------------------------------------------------------------- helpers
def state_digest(state: State) -> str:
    """SHA-256 of every leaf of `state` as a checkpoint stores them: equal digests mean
    bit-identical states (used to compare a resumed run with an uninterrupted one)."""
    return hashlib.sha256(_serialise_state(state)).hexdigest()


def describe_engine(engine: Any) -> dict[str, Any]:
    """A JSON description of an engine's pipeline (components, sizes), stored in checkpoints."""
    return {
        "proposers": [
            {
                "type": f"{type(p).__module__}.{type(p).__qualname__}",
                "num_candidates": int(p.num_candidates),
                "labels": list(p.labels()),
            }
            for p in engine.proposers
        ],
        "assessors": [
            {"type": f"{type(a).__module__}.{type(a).__qualname__}", "name": a.name}
            for a in engine.assessors
        ],
        "scheduler": f"{type(engine.scheduler).__module__}.{type(engine.scheduler).__qualname__}",
        "assess_size": int(engine.assess_size),
        "decide_size": int(engine.decide_size),
        "history_size": int(engine.history_size),
    }


# ---------------------------------------------------------------------------- listing
_LEAVES_RE = re.compile(r"^ckpt-\d+-[0-9a-f]{12}\.leaves$")
_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")


def _is_count(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


def _malformed(body: dict[str, Any], path: Path) -> str | None:
    """What is wrong with the fields of a checksummed manifest, or `None`.

    The manifest's own SHA-256 detects damage, not deliberate edits (anyone can recompute
    it), so every field that loading uses is checked for type and range before it is used;
    the leaves file must be a plain name in the checkpoint's own directory.
    """
    m = _MANIFEST_RE.match(path.name)
    if not _is_count(body.get("step")):
        return f"step {body.get('step')!r} is not a non-negative integer"
    if m is not None and int(m.group(1)) != body["step"]:
        return f"it is named for step {int(m.group(1))} but records step {body['step']}"
    if "storage" in body and body["storage"] != orbax_store.STORAGE:
        return f"storage {body['storage']!r} is not a checkpoint storage this ev3core reads"
    problem = (
        _malformed_orbax(body)
        if body.get("storage") == orbax_store.STORAGE
        else _malformed_leaves(body)
    )
    if problem is not None:
        return problem
    signature = body.get("signature")
    if not isinstance(signature, list) or not all(
        isinstance(e, list)
        and len(e) == 3
        and isinstance(e[0], str)
        and isinstance(e[1], list)
        and all(_is_count(n) for n in e[1])
        and isinstance(e[2], str)
        for e in signature
    ):
        return "signature is not a list of [path, shape, dtype] entries"
    if not isinstance(body.get("metadata", {}), dict):
        return "metadata is not a JSON object"
    if body.get("format_version", 1) >= 2:
        if not _is_count(body.get("sequence")) or body["sequence"] < 1:
            return f"sequence {body.get('sequence')!r} is not a positive integer"
        if not isinstance(body.get("run_id"), (str, type(None))):
            return "run_id is not a string"
    return None


def _malformed_leaves(body: dict[str, Any]) -> str | None:
    leaves = body.get("leaves_file")
    if not isinstance(leaves, str) or not _LEAVES_RE.match(leaves):
        return f"leaves_file {leaves!r} is not a ckpt-<step>-<digest>.leaves name in its directory"
    if not _is_count(body.get("leaves_bytes")):
        return f"leaves_bytes {body.get('leaves_bytes')!r} is not a non-negative integer"
    if not isinstance(body.get("leaves_sha256"), str) or not _SHA256_RE.match(
        body["leaves_sha256"]
    ):
        return "leaves_sha256 is not a SHA-256 hex digest"
    return None


def _malformed_orbax(body: dict[str, Any]) -> str | None:
    """An Orbax manifest names a checkpoint directory beside it and lists every file in it
    (a relative path inside that directory) with its size and SHA-256."""
    name = body.get("orbax_dir")
    if not isinstance(name, str) or not orbax_store.is_dir_name(name):
        return f"orbax_dir {name!r} is not a ckpt-<step>-<token>.orbax name in its directory"
    files = body.get("files")
    if not isinstance(files, dict):
        return "files is not a JSON object of {path: [bytes, sha256]}"
    for rel, entry in files.items():
        parts = Path(rel).parts
        if not parts or ".." in parts or Path(rel).is_absolute() or "\\" in rel:
            return f"files names {rel!r}, which is not a path inside {name}"
        if not (
            isinstance(entry, list)
            and len(entry) == 2
            and _is_count(entry[0])
            and isinstance(entry[1], str)
            and _SHA256_RE.match(entry[1])
        ):
            return f"the entry of files for {rel!r} is not [bytes, sha256]"
    if not _is_count(body.get("data_bytes", 0)):
        return f"data_bytes {body.get('data_bytes')!r} is not a non-negative integer"
    return None


def _read_manifest(path: Path) -> dict[str, Any]:
    """The verified content of a manifest; `_Unusable` for anything unreadable or malformed."""
    try:
        if path.stat().st_size > _MAX_MANIFEST_BYTES:
            raise _Unusable(f"the manifest has {path.stat().st_size} bytes, far too many for one")
        body = json.loads(path.read_bytes())
    except (OSError, ValueError, RecursionError, MemoryError) as exc:
        reason = "nested too deeply" if isinstance(exc, RecursionError) else str(exc)
        raise _Unusable(f"the manifest cannot be read as JSON ({reason})") from exc
    if not isinstance(body, dict) or body.get("format") != FORMAT:
        raise _Unusable("the manifest is not an ev3core checkpoint manifest")
    version = body.get("format_version")
    if not isinstance(version, int) or version not in _READABLE_VERSIONS:
        versions = body.get("versions")
        writer = versions.get("ev3core") if isinstance(versions, dict) else None
        raise _Unusable(
            f"it has format version {version!r} but this ev3core reads versions "
            f"{list(_READABLE_VERSIONS)}; load it with the ev3core version that wrote it "
            f"({writer!r})"
        )
    try:
        digest = _manifest_digest(body)
    except (ValueError, TypeError, RecursionError) as exc:
        raise _Unusable(f"the manifest's checksum cannot be computed ({exc})") from exc
    if body.get("manifest_sha256") != digest:
        raise _Unusable("the manifest's checksum does not match its content (edited on disk?)")
    problem = _malformed(body, path)
    if problem is not None:
        raise _Unusable(f"the manifest is malformed: {problem}")
    return body


class _Entry:
    """One manifest in a directory: its path, step, and its verified body (or why not)."""

    def __init__(self, path: Path, step: int):
        self.path = path
        self.step = step
        self.body: dict[str, Any] | None = None
        self.problem: str | None = None
        try:
            self.body = _read_manifest(path)
        except _Unusable as exc:
            self.problem = str(exc)

    @property
    def sequence(self) -> int | None:
        return None if self.body is None else self.body.get("sequence")


def _entries(directory: Path) -> list[_Entry]:
    """The manifests of `directory` in write order, oldest first.

    Write order is the manifests' `sequence` numbers. A manifest without one (unreadable, or
    written by format version 1) is placed by its step number just after the newest
    sequenced manifest of a lower or equal step.
    """
    if not directory.is_dir():
        return []
    found = []
    for p in directory.iterdir():
        m = _MANIFEST_RE.match(p.name)
        if m and p.is_file():
            found.append(_Entry(p, int(m.group(1))))
    known = [(e.step, e.sequence) for e in found if e.sequence is not None]

    def order(e: _Entry) -> tuple[float, int]:
        if e.sequence is not None:
            return (float(e.sequence), e.step)
        before = [s for step, s in known if step <= e.step]
        return (max(before, default=0) + 0.5, e.step)

    return sorted(found, key=order)


def list_checkpoints(directory: str | os.PathLike[str]) -> list[Path]:
    """Manifests of the checkpoints in `directory` in the order they were written, oldest
    first (none if it does not exist). Damaged manifests are listed too (by step)."""
    return [e.path for e in _entries(Path(directory))]


def latest_checkpoint(directory: str | os.PathLike[str]) -> Path | None:
    """The most recently written checkpoint manifest in `directory` (not verified), or `None`."""
    found = list_checkpoints(directory)
    return found[-1] if found else None


def read_manifest(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The content of the checkpoint manifest at `path`, verified: format, version, its own
    SHA-256 and the type of every field. Raises `CheckpointError` saying what is wrong.

    The checksum detects damage, not tampering: read the metadata of a checkpoint you did
    not write as you would any untrusted file.
    """
    path = Path(path)
    try:
        return _read_manifest(path)
    except _Unusable as exc:
        raise CheckpointError(f"checkpoint manifest {path} is unusable: {exc}.") from exc


def _verify_leaves(manifest_path: Path, body: dict[str, Any]) -> Path:
    leaves = manifest_path.parent / body["leaves_file"]
    if not leaves.is_file():
        raise _Unusable(f"its leaves file {leaves.name} is missing")
    size = leaves.stat().st_size
    if size != body["leaves_bytes"]:
        raise _Unusable(
            f"its leaves file {leaves.name} has {size} bytes, the manifest says "
            f"{body['leaves_bytes']} (truncated or overwritten)"
        )
    if _sha256_file(leaves) != body["leaves_sha256"]:
        raise _Unusable(f"the SHA-256 of {leaves.name} does not match the manifest (edited?)")
    return leaves


def newest_verified_manifest(
    directory: str | os.PathLike[str],
) -> tuple[Path, dict[str, Any], list[dict[str, str]]]:
    """The most recently written checkpoint in `directory` whose manifest and leaves file
    pass every check that `load_checkpoint` makes before reading leaves (format, version,
    checksums, sizes, field types): `(manifest path, manifest, skipped)`, where `skipped`
    lists the newer, unusable ones and why. Use it to read a run's metadata before its state
    can be loaded (for instance to rebuild the `like` state). Raises `CheckpointError`.
    """
    directory = Path(directory)
    skipped: list[dict[str, str]] = []
    for manifest in reversed(list_checkpoints(directory)):
        try:
            body = _read_manifest(manifest)
            if body.get("storage") == orbax_store.STORAGE:
                orbax_store.verify(manifest, body)
            else:
                _verify_leaves(manifest, body)
        except _Unusable as exc:
            skipped.append({"file": str(manifest), "reason": str(exc)})
            continue
        return manifest, body, skipped
    detail = "; ".join(f"{Path(s['file']).name}: {s['reason']}" for s in skipped)
    raise CheckpointError(
        f"no usable checkpoint in {directory}"
        + (f": {detail}" if detail else "")
        + ". Pass the directory of an earlier run (`ev3 run --out`), or start a new run."
    )


# ---------------------------------------------------------------------------- save
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


def next_sequence(directory: Path) -> int:
    """The write-order number of the next checkpoint written into `directory`."""
    return 1 + max((e.sequence or 0 for e in _entries(directory)), default=0)


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


def _signature_mismatch(stored: list[list[Any]], wanted: list[list[Any]]) -> str | None:
    stored_t = [(p, tuple(s), d) for p, s, d in stored]
    wanted_t = [(p, tuple(s), d) for p, s, d in wanted]
    if stored_t == wanted_t:
        return None
    by_path = {p: (s, d) for p, s, d in stored_t}
    for p, s, d in wanted_t:
        if p not in by_path:
            return f"`like` has a leaf {p} (shape {s}, {d}) that the checkpoint lacks"
        if by_path[p] != (s, d):
            ss, sd = by_path[p]
            return f"leaf {p} is {ss} {sd} in the checkpoint but {s} {d} in `like`"
    wanted_paths = {p for p, _, _ in wanted_t}
    extra = [p for p, _, _ in stored_t if p not in wanted_paths]
    if extra:
        return f"the checkpoint has leaves that `like` lacks: {', '.join(extra[:5])}"
    return "the leaves are stored in a different order than `like` has them"


def _load_leaves(path: Path, like: State) -> State:
    storable_like = _to_storable(like)

    def load(f: Any, x: Any) -> Any:
        if isinstance(x, (jax.Array, np.ndarray)) or eqx.is_array_like(x):
            arr = np.load(f, allow_pickle=False)
            if not isinstance(x, (jax.Array, np.ndarray)):  # Python scalar leaves
                return type(x)(arr.item())
            arr = _from_raw(arr, np.dtype(x.dtype))
            if arr.shape != tuple(x.shape):
                raise _Unusable(f"a stored leaf has shape {arr.shape} where {x.shape} was expected")
            if isinstance(x, np.ndarray):
                return arr
            out = jnp.asarray(arr)
            # Place it as `like` is placed. An uncommitted `like` (a fresh `init`) stays
            # uncommitted: a committed array would make the compiled step re-trace on resume.
            if getattr(x, "committed", True):
                with contextlib.suppress(AttributeError, ValueError, TypeError):
                    out = jax.device_put(out, x.sharding)
            return _weak_like(out, x)
        return x

    with open(path, "rb") as f:
        loaded = eqx.tree_deserialise_leaves(f, storable_like, filter_spec=load)
        if f.read(1):
            raise _Unusable("the leaves file has trailing bytes")

    def rewrap(new: Any, old: Any) -> Any:
        if _is_key(old):
            return jax.random.wrap_key_data(new, impl=jax.random.key_impl(old))
        return new

    return jax.tree.map(rewrap, loaded, like)


def _load_one(manifest_path: Path, like: State) -> tuple[State, dict[str, Any]]:
    body = _read_manifest(manifest_path)
    if body.get("storage") == orbax_store.STORAGE:
        return _load_orbax(manifest_path, body, like)
    leaves = _verify_leaves(manifest_path, body)
    _check_fits(manifest_path, body, like)
    try:
        state = _load_leaves(leaves, like)
    except _Unusable:
        raise
    except Exception as exc:  # noqa: BLE001 - any decoding failure means a corrupt file
        raise _Unusable(f"its leaves file cannot be decoded ({type(exc).__name__}: {exc})") from exc
    if int(state.step) != body["step"]:
        raise _Unusable(f"it stores step {int(state.step)} but the manifest says {body['step']}")
    return state, body


def _load_orbax(manifest_path: Path, body: dict[str, Any], like: State) -> tuple[State, Any]:
    root = orbax_store.verify(manifest_path, body)
    _check_fits(manifest_path, body, like)
    try:
        state = orbax_store.load(root, like)
    except CheckpointError:
        raise
    except Exception as exc:  # noqa: BLE001 - any decoding failure means a corrupt checkpoint
        raise _Unusable(f"{root.name} cannot be restored ({type(exc).__name__}: {exc})") from exc
    if int(state.step) != body["step"]:
        raise _Unusable(f"it stores step {int(state.step)} but the manifest says {body['step']}")
    return state, body


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


# ---------------------------------------------------------------------------- plugin
def _same_state(entries: list[_Entry], state: State, split: bool) -> dict[str, Any] | None:
    """The manifest of the most recently written of `entries` (verified manifests) whose
    checkpoint is `state`, or `None`. `split`: the state is not fully addressable here."""
    step, signature = int(state.step), _signature(state)
    digest = None if split else state_digest(state)
    for e in reversed(entries):
        body = e.body
        assert body is not None
        if body.get("storage") != orbax_store.STORAGE:
            if digest is not None and body["leaves_sha256"] == digest:
                return body
            continue
        if body["step"] != step or _signature_mismatch(body["signature"], signature) is not None:
            continue
        if split:
            return body
        try:
            loaded = orbax_store.load(orbax_store.verify(e.path, body), state)
        except Exception:  # noqa: BLE001 - a damaged checkpoint is not this state
            continue
        if state_digest(loaded) == digest:
            return body
    return None


class Checkpointer:
    """A lifecycle-hook plugin that checkpoints the run every `every` steps and at its end.

    Register it with the plugins passed to `ev3core.run`. It saves when the engine's step
    counter crosses a multiple of `every`, and once more when the run ends (normally, by
    Ctrl-C, or by an error) if the final state is consistent (every step it contains was
    seen by every `ev3_after_step` hook) and not saved yet. Its hooks run after the other
    plugins' (`trylast`), so metadata callables see counters that include the step.

    A directory belongs to one run. Each `Checkpointer` has a `run_id` that its manifests
    record; when it first saves or starts a run in a directory that holds checkpoints of
    another run, it continues that run only if the state it starts from is bit for bit one of
    those checkpoints (a resume: `load_checkpoint` from the same directory); otherwise it
    raises `CheckpointError` instead of mixing two runs (pruning would then delete one run's
    checkpoints for the other's).

    **Arguments:**

    - `directory`: where checkpoints go (see `save_checkpoint`).
    - `every`: steps between checkpoints (>= 1).
    - `keep`: checkpoints kept on disk.
    - `metadata`: a dict, or a callable returning one at save time, stored in every
      checkpoint next to the pipeline description (`metadata["pipeline"]`).
    - `stream`: the `ev3core.DataStream` the run reads; its position (of the next element
      the run will take) is stored as `metadata["data_position"]`, and
      `stream.restore(manifest)` resumes it, so a resumed run reads exactly what an
      uninterrupted one would have.
    - `storage`: as for `save_checkpoint`. With Orbax (always in a multi-process run, where
      every process registers its own `Checkpointer` and saves its shards), a save only
      blocks the run while the arrays are copied to host memory; the files, the commit and the
      manifest are written in the background. `wait()` blocks until the last save is
      committed; the run's end waits for it.

    ```python
    plugins = ev3core.load_plugins(extra=[ev3core.Checkpointer("ckpt", every=10)])
    state, infos = ev3core.run(engine, state, data, 100, plugins=plugins)
    ```
    """

    def __init__(
        self,
        directory: str | os.PathLike[str],
        every: int = 100,
        keep: int = 3,
        metadata: Mapping[str, Any] | Callable[[], Mapping[str, Any]] | None = None,
        stream: Any = None,
        storage: str = "auto",
    ):
        if int(every) < 1 or int(keep) < 1:
            raise CheckpointError(f"Checkpointer: every={every} and keep={keep} must both be >= 1.")
        self.storage = storage
        self._writer: orbax_store.OrbaxWriter | None = None
        self.directory = Path(directory)
        self.every = int(every)
        self.keep = int(keep)
        self.metadata = metadata
        self.stream = stream
        if stream is not None and not stream.resumable:
            stream.position()  # raises: explains why this stream cannot be checkpointed
        self.last_saved: int | None = None
        self.last_path: Path | None = None
        self.run_id = uuid.uuid4().hex
        self._claimed = False
        self._start: int | None = None
        self._pipeline: dict[str, Any] | None = None

    def _claim(self, state: State) -> None:
        """Check that the directory is this run's (see the class docstring), once.

        Checkpoints with this run's `run_id` are its own. Of another run's, the state must be
        one. When this process holds the whole state it is compared bit for bit: with a
        single-file checkpoint's `leaves_sha256`, or, for an Orbax checkpoint of the same step
        and leaf signature, by loading it (once, when a run starts in such a directory). A
        state split over processes cannot be hashed without gathering it, so there the step
        and the leaf signature must match (every process reads the same manifests and
        decides alike).
        """
        if self._claimed:
            return
        if jax.process_count() > 1:  # one id for the run: process 0's, as its manifests say
            from jax.experimental import multihost_utils

            raw = np.frombuffer(bytes.fromhex(self.run_id), np.uint8).copy()
            self.run_id = np.asarray(multihost_utils.broadcast_one_to_all(raw)).tobytes().hex()
        foreign = [
            e
            for e in _entries(self.directory)
            if e.body is not None and e.body.get("run_id") != self.run_id
        ]
        if foreign:
            split = orbax_store.not_addressable(state)
            what = (
                "by step and leaf signature: the state is split over processes"
                if split
                else "bit for bit"
            )
            same = _same_state(foreign, state, split)
            if same is None:
                steps = sorted({e.step for e in foreign})
                raise CheckpointError(
                    f"Checkpointer: {self.directory} holds checkpoints of another run (steps "
                    f"{', '.join(map(str, steps[:8]))}{' ...' if len(steps) > 8 else ''}), and "
                    f"the state this run starts from (step {int(state.step)}) matches none of "
                    f"them ({what}). Pass an empty directory, or resume that run: start from "
                    "the state that load_checkpoint(directory, like) returns."
                )
            if same.get("run_id"):  # a resume: continue the run that wrote it
                self.run_id = same["run_id"]
        self._claimed = True

    def _meta(self) -> dict[str, Any]:
        extra = self.metadata() if callable(self.metadata) else (self.metadata or {})
        out = {"pipeline": self._pipeline}
        out.update(extra)
        if self.stream is not None:
            out["data_position"] = self.stream.position()
        return out

    def save(self, state: State) -> Path:
        """Write a checkpoint of `state` now (with Orbax: start writing it, see `wait`)."""
        self._claim(state)
        if orbax_store.resolve_storage(self.storage, state) == orbax_store.STORAGE:
            if self._writer is None:
                self._writer = orbax_store.OrbaxWriter(next_sequence=next_sequence, prune=_prune)
            self.directory.mkdir(parents=True, exist_ok=True)
            meta = _jsonable(self._meta())
            self.last_path = self._writer.save(
                self.directory, state, meta, self.keep, block=False, run_id=self.run_id
            )
        else:
            self.last_path = save_checkpoint(
                self.directory,
                state,
                metadata=self._meta(),
                keep=self.keep,
                run_id=self.run_id,
                storage="leaves",
            )
        self.last_saved = int(state.step)
        return self.last_path

    def wait(self) -> None:
        """Block until the last save is committed (its manifest written); raise
        `CheckpointError` if writing it failed. A no-op for the single-file storage."""
        if self._writer is not None:
            self._writer.wait()

    @hookimpl
    def ev3_run_start(self, engine: Any, state: State) -> None:
        self._claim(state)
        self._start = int(state.step)
        self._pipeline = describe_engine(engine)
        if self.last_saved is None:
            self.last_saved = self._start

    @hookimpl(trylast=True)
    def ev3_after_step(self, state: State, step: int) -> None:
        if self._start is None:  # called outside ev3core.run: read the counter
            self._start = int(state.step) - step - 1
        # The engine step this info belongs to, known on the host: no device sync unless a
        # checkpoint is due (with chunk > 1, `state` is the chunk's last state; it is saved).
        reached = self._start + step + 1
        due = reached // self.every > (reached - 1) // self.every
        if due and int(state.step) != self.last_saved:
            self.save(state)

    @hookimpl(trylast=True)
    def ev3_run_end(self, state: State, infos: Sequence[Any]) -> None:
        step = int(state.step)
        consistent = self._start is None or step == self._start + len(infos)
        if not consistent:
            logger.warning(
                "ev3core: Checkpointer did not save the final state of step %d: the run "
                "stopped inside a step's hooks; the last checkpoint (step %s) is kept.",
                step,
                self.last_saved,
            )
            self.wait()  # an earlier save may still be committing
            return
        try:
            pending = self._writer is not None and self._writer.pending is not None
            if step != self.last_saved or not (list_checkpoints(self.directory) or pending):
                self.save(state)
        finally:
            self.wait()
