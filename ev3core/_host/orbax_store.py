"""Checkpoint storage with Orbax: sharded, asynchronous, every process writes its own shards.

The legacy storage (`ckpt_io.py`, `storage="leaves"`) serialises the whole state from one
host, which needs every array to be addressable there: impossible in a multi-process run,
where each process holds only its own candidates. This storage hands the state's arrays to
`orbax.checkpoint` instead:

- **sharded**: each process writes the shards it holds (TensorStore, OCDBT layout) into one
  checkpoint directory; nothing is gathered to one host;
- **asynchronous**: `save` returns once the arrays are copied to host memory; the writing,
  the commit and the manifest happen in a background thread while the run continues;
- **atomic**: Orbax writes into a temporary directory and renames it when every process has
  finished (the commit); the ev3core manifest `ckpt-<step>.json` is written after the commit,
  by process 0, and a checkpoint exists only once its manifest exists, as in the legacy
  storage;
- **checked**: the manifest records the size and SHA-256 of every file of the committed
  directory, and the usual leaf signature; loading verifies them before reading, so damage
  is detected and an older checkpoint used, exactly as for the legacy storage;
- **re-sharded on load**: arrays are restored straight into the shardings of the `like`
  state, so a checkpoint written on N devices (or processes) loads onto M.

The arrays are stored as a flat dictionary `{"00000": leaf, ...}` in the state's leaf order
(the manifest's signature names each leaf's path), typed PRNG keys as their key data.
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import re
import shutil
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from .._types import State
from ..errors import CheckpointError
from .ckpt_format import (
    FORMAT,
    FORMAT_VERSION,
    _atomic_write,
    _is_key,
    _manifest_digest,
    _sha256_file,
    _signature,
    _to_storable,
    _Unusable,
    _versions,
    _weak_like,
)

logger = logging.getLogger("ev3core")

#: The value of a manifest's `storage` field for checkpoints written by this module.
STORAGE = "orbax"
_DIR_RE = re.compile(r"^ckpt-\d{10}-[0-9a-f]{12}\.orbax$")
_TMP_MARK = ".orbax-checkpoint-tmp"

# Asynchronous saves of this process not finished yet (their commit or manifest is still being
# written): `{directory: {checkpoint directory name, manifest name}}`. Pruning, from any
# writer in this process, never deletes them or their temporary files. Host bookkeeping of
# background file writes, nothing traced.
_IN_FLIGHT: dict[Path, set[str]] = {}
_IN_FLIGHT_LOCK = threading.Lock()


def is_dir_name(name: str) -> bool:
    """Whether `name` is the name of an Orbax checkpoint directory that this module writes."""
    return bool(_DIR_RE.match(name))


def in_flight(directory: Path) -> set[str]:
    """Names of the checkpoint directories and manifests that saves of this process are still
    writing in `directory`."""
    with _IN_FLIGHT_LOCK:
        return set(_IN_FLIGHT.get(directory.absolute(), ()))


def _track(directory: Path, names: set[str], busy: bool) -> None:
    with _IN_FLIGHT_LOCK:
        if busy:
            _IN_FLIGHT.setdefault(directory, set()).update(names)
        else:
            left = _IN_FLIGHT.get(directory, set()) - names
            if left:
                _IN_FLIGHT[directory] = left
            else:
                _IN_FLIGHT.pop(directory, None)


def _ocp() -> Any:
    try:
        import orbax.checkpoint as ocp
    except ImportError as exc:  # pragma: no cover - the test extra installs it
        raise CheckpointError(
            "storage='orbax' needs the orbax-checkpoint package, which is not installed. "
            "Install it with `pip install 'ev3core[orbax]'`, or use storage='leaves' "
            "(single-process runs only)."
        ) from exc
    return ocp


def _new_checkpointer() -> Any:
    ocp = _ocp()
    return ocp.AsyncCheckpointer(ocp.StandardCheckpointHandler())


def _token() -> str:
    """12 random hex digits, the same on every process (process 0's, broadcast): the name of
    a new checkpoint directory must be agreed by all the processes that write into it."""
    bits = np.frombuffer(os.urandom(8), np.uint32).copy()
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        bits = np.asarray(multihost_utils.broadcast_one_to_all(bits))
    return bits.astype(np.uint32).tobytes().hex()[:12]


def _flat(storable: State) -> dict[str, Any]:
    leaves = jax.tree.leaves(storable)
    return {
        f"{i:05d}": x if isinstance(x, jax.Array) else np.asarray(x) for i, x in enumerate(leaves)
    }


def _file_table(root: Path) -> dict[str, list[Any]]:
    """`{relative path: [bytes, sha256]}` of every file under `root`."""

    table = {}
    for p in sorted(root.rglob("*")):
        if p.is_file():
            table[p.relative_to(root).as_posix()] = [p.stat().st_size, _sha256_file(p)]
    return table


class OrbaxWriter:
    """Writes checkpoints with one `orbax.checkpoint.AsyncCheckpointer`, one at a time.

    `save` blocks only while the arrays are copied off the devices; `wait` blocks until the
    last save is committed and its manifest written, and re-raises its error, if any. A new
    `save` first waits for the previous one. Every process of a run calls `save` with the
    same state (it is a collective); process 0 writes the manifest and prunes.
    """

    def __init__(self, next_sequence: Callable[[Path], int], prune: Callable[..., None]) -> None:
        # The directory's write-order rules, from the single-file storage that owns them.
        self._next_sequence = next_sequence
        self._prune = prune
        self._ckptr: Any = None
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self.pending: Path | None = None

    def wait(self) -> None:
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        self.pending = None
        error, self._error = self._error, None
        if error is not None:
            raise CheckpointError(f"writing a checkpoint failed: {error}") from error

    def close(self) -> None:
        try:
            self.wait()
        finally:
            if self._ckptr is not None:
                self._ckptr.close()
                self._ckptr = None

    def save(
        self,
        directory: Path,
        state: State,
        metadata: dict[str, Any],
        keep: int,
        block: bool,
        run_id: str | None = None,
    ) -> Path:
        """Start writing `state` (`metadata` is JSON already) into `directory`.

        The manifest records the write order (`sequence`, numbered when it is written, after
        the commit, like a single-file checkpoint's) and `run_id`, so that pruning and the
        run-ownership check of a `Checkpointer` treat both storages alike.

        **Returns:** the path the manifest will have once the checkpoint is committed.
        """

        self.wait()
        if self._ckptr is None:
            self._ckptr = _new_checkpointer()
        directory = directory.absolute()  # Orbax (TensorStore) takes absolute paths only
        step = int(state.step)
        body: dict[str, Any] = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "step": step,
            "run_id": run_id,
            "signature": _signature(state),
            "versions": _versions(),
            "device_count": jax.device_count(),
            "backend": jax.default_backend(),
            "created_utc": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "metadata": metadata,
        }
        name = f"ckpt-{step:010d}-{_token()}.orbax"
        target = directory / name
        # Blocks until the arrays are on the host; the files are written in the background.
        self._ckptr.save(target, args=_ocp().args.StandardSave(_flat(_to_storable(state))))
        manifest = directory / f"ckpt-{step:010d}.json"
        self.pending = manifest
        primary = jax.process_index() == 0
        names = {name, manifest.name}
        _track(directory, names, busy=True)

        def finish() -> None:
            try:
                self._ckptr.wait_until_finished()  # committed: every process's shards are in
                if not primary:
                    return
                files = _file_table(target)
                full = dict(body)
                full.update(
                    sequence=self._next_sequence(directory),
                    storage=STORAGE,
                    orbax_dir=name,
                    files=files,
                    data_bytes=sum(size for size, _ in files.values()),
                    process_count=jax.process_count(),
                    versions={**body["versions"], **_orbax_versions()},
                    committed_utc=datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
                )
                full["manifest_sha256"] = _manifest_digest(full)
                text = json.dumps(full, indent=1, sort_keys=True).encode()
                _atomic_write(manifest, lambda f: f.write(text))
                _track(directory, names, busy=False)  # complete: prunable like any other
                self._prune(directory, keep, written=manifest)
                logger.info("ev3core: checkpoint of step %d committed to %s", step, manifest)
            except BaseException as exc:  # noqa: BLE001 - re-raised by wait()
                self._error = exc
            finally:
                _track(directory, names, busy=False)

        self._thread = threading.Thread(target=finish, name="ev3core-checkpoint", daemon=True)
        self._thread.start()
        if block:
            self.wait()
        return manifest


def _orbax_versions() -> dict[str, str | None]:
    import importlib.metadata

    out: dict[str, str | None] = {}
    for lib in ("orbax-checkpoint", "tensorstore"):
        try:
            out[lib] = importlib.metadata.version(lib)
        except importlib.metadata.PackageNotFoundError:
            out[lib] = None
    return out


def referenced_dirs(bodies: list[dict[str, Any]]) -> set[str]:
    return {str(b["orbax_dir"]) for b in bodies if b.get("storage") == STORAGE}


def prune_dirs(
    directory: Path,
    referenced: set[str],
    keep_prefixes: set[str],
    busy: frozenset[str] | set[str] = frozenset(),
) -> None:
    """Delete Orbax checkpoint directories that no kept manifest references, and temporary
    directories of saves that never committed, except those of the saves named in `busy`
    (still in flight in this process: no manifest yet). In a multi-process run only process
    0 prunes, after the commit, and the next save starts only once it has (its directory name
    is agreed by a collective), so no other process's save is in flight then."""
    for p in directory.glob("ckpt-*"):
        if not p.is_dir() or any(p.name.startswith(b) for b in busy):
            continue
        if _TMP_MARK in p.name or (
            _DIR_RE.match(p.name)
            and p.name not in referenced
            and p.name.rsplit("-", 1)[0] not in keep_prefixes
        ):
            shutil.rmtree(p, ignore_errors=True)


def verify(manifest_path: Path, body: dict[str, Any]) -> Path:
    """The checkpoint's Orbax directory, after checking every file's size and SHA-256.
    Raises the loader's `_Unusable` for anything missing, extra, truncated or edited."""

    name = body.get("orbax_dir")
    files = body.get("files")
    if not isinstance(name, str) or not _DIR_RE.match(name) or not isinstance(files, dict):
        raise _Unusable("the manifest is malformed: orbax_dir or files is missing or invalid")
    root = manifest_path.parent / name
    if not root.is_dir():
        raise _Unusable(f"its Orbax directory {name} is missing")
    for rel, entry in files.items():
        parts = Path(rel).parts
        if not parts or ".." in parts or Path(rel).is_absolute():
            raise _Unusable(f"the manifest names a file outside its directory: {rel!r}")
        if not (isinstance(entry, list) and len(entry) == 2):
            raise _Unusable(f"the manifest's entry for {rel!r} is not [bytes, sha256]")
        path = root / rel
        if not path.is_file():
            raise _Unusable(f"{name}/{rel} is missing")
        if path.stat().st_size != entry[0]:
            raise _Unusable(
                f"{name}/{rel} has {path.stat().st_size} bytes, the manifest says {entry[0]} "
                "(truncated or overwritten)"
            )
        if _sha256_file(path) != entry[1]:
            raise _Unusable(f"the SHA-256 of {name}/{rel} does not match the manifest (edited?)")
    return root


def load(root: Path, like: State) -> State:
    """Restore the arrays of `root` into the structure, dtypes and shardings of `like`.

    Arrays go straight to the devices that `like` places them on (re-sharding a checkpoint
    written on another device count); an uncommitted `like` leaf (a fresh single-device
    `init`) gives an uncommitted array, so the compiled step is reused on resume.
    """

    storable_like = _to_storable(like)
    leaves, treedef = jax.tree.flatten(storable_like)
    abstract: dict[str, Any] = {}
    for i, x in enumerate(leaves):
        if isinstance(x, jax.Array):
            abstract[f"{i:05d}"] = jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)
        else:
            abstract[f"{i:05d}"] = np.asarray(x)
    ckptr = _new_checkpointer()
    try:
        restored = ckptr.restore(root.absolute(), args=_ocp().args.StandardRestore(abstract))
    finally:
        ckptr.close()
    out = []
    for i, x in enumerate(leaves):
        new = restored[f"{i:05d}"]
        if isinstance(x, jax.Array):
            if not getattr(x, "committed", True):
                new = jnp.asarray(np.asarray(new))
            new = _weak_like(new, x)
        elif isinstance(x, np.ndarray):
            new = np.asarray(new)
        else:  # Python scalar leaves
            new = type(x)(np.asarray(new).item())
        out.append(new)
    loaded = jax.tree.unflatten(treedef, out)
    return jax.tree.map(
        lambda new, old: (
            jax.random.wrap_key_data(new, impl=jax.random.key_impl(old)) if _is_key(old) else new
        ),
        loaded,
        like,
    )


def not_addressable(state: State) -> bool:
    """Whether some array of `state` is not fully addressable from this process."""
    return any(
        isinstance(x, jax.Array) and not x.is_fully_addressable for x in jax.tree.leaves(state)
    )


def resolve_storage(storage: str, state: State) -> str:
    if storage not in ("auto", "leaves", STORAGE):
        raise CheckpointError(
            f"storage={storage!r} is not a checkpoint storage. Use 'auto' (Orbax in a "
            "multi-process run, the single-file format otherwise), 'leaves' or 'orbax'."
        )
    if storage == "auto":
        return STORAGE if jax.process_count() > 1 or not_addressable(state) else "leaves"
    if storage == "leaves" and not_addressable(state):
        raise CheckpointError(
            "storage='leaves' writes the whole state from one process, but this state is "
            "split over several processes (not fully addressable here). Use storage='orbax' "
            "(the default 'auto' does), which lets every process write its own shards."
        )
    return storage


__all__ = [
    "OrbaxWriter",
    "STORAGE",
    "in_flight",
    "is_dir_name",
    "load",
    "prune_dirs",
    "resolve_storage",
    "verify",
]
