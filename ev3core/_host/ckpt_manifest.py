"""Checkpoint manifests: reading and checking them, listing a directory's checkpoints in
write order, and verifying a single-file checkpoint's leaves file before it is read.

A manifest `ckpt-<step>.json` is written last (a checkpoint exists once its manifest
exists). Its own SHA-256 detects damage; every field that loading uses is checked for type
and range before it is used (`_malformed`).
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

from ..errors import CheckpointError
from . import orbax_store
from .ckpt_format import (
    _MANIFEST_RE,
    _MAX_MANIFEST_BYTES,
    _READABLE_VERSIONS,
    FORMAT,
    _manifest_digest,
    _sha256_file,
    _Unusable,
)

__all__ = [
    "latest_checkpoint",
    "list_checkpoints",
    "newest_verified_manifest",
    "next_sequence",
    "read_manifest",
]

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


def next_sequence(directory: Path) -> int:
    """The write-order number of the next checkpoint written into `directory`."""
    return 1 + max((e.sequence or 0 for e in _entries(directory)), default=0)
