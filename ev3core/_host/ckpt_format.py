"""The checkpoint format: constants, leaf encoding (every JAX dtype, typed keys), checksums,
atomic writes and signatures, shared by the single-file storage (`ckpt_io.py`) and the
Orbax storage (`orbax_store.py`)."""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import io
import json
import os
import platform
import re
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from .._types import State
from ..errors import CheckpointError

#: Identifies ev3core checkpoint manifests.
FORMAT = "ev3core-checkpoint"
#: Bumped whenever the on-disk layout changes incompatibly. Version 2 stores dtypes that NumPy
#: cannot write natively (bfloat16, float8, int4 ...) as their raw bits and records the write
#: order (`sequence`) and the writing run (`run_id`); version 1 manifests are still read.
FORMAT_VERSION = 2
_READABLE_VERSIONS = (1, 2)
#: Manifests bigger than this are not parsed (a manifest is a few kB; a huge one is damage).
_MAX_MANIFEST_BYTES = 64 << 20

_MANIFEST_RE = re.compile(r"^ckpt-(\d+)\.json$")
_LIBRARIES = ("ev3core", "jax", "jaxlib", "equinox", "optax", "numpy")


def _is_key(x: Any) -> bool:
    return isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)


def _to_storable(state: State) -> State:
    """`state` with every typed PRNG key replaced by its raw key data."""
    return jax.tree.map(lambda x: jax.random.key_data(x) if _is_key(x) else x, state)


def _raw_view(arr: np.ndarray) -> np.ndarray:
    """`arr`, or its raw bits as unsigned integers when NumPy cannot save its dtype natively.

    `np.save` writes the extension dtypes that JAX uses (bfloat16, the float8 and float4
    kinds, int4/uint4, ...) as opaque `|V<n>` records that `np.load(allow_pickle=False)`
    cannot turn back into numbers; their bits are stored instead, and `_from_raw` views them
    back as the dtype that the manifest's signature and the `like` state name.
    """
    if arr.dtype.isbuiltin == 2 or arr.dtype.kind == "V":  # user-defined (ml_dtypes) dtype
        return arr.view(np.dtype(f"uint{8 * arr.dtype.itemsize}"))
    return arr


def _from_raw(arr: np.ndarray, want: np.dtype) -> np.ndarray:
    if arr.dtype == want:
        return arr
    if (want.isbuiltin == 2 or want.kind == "V") and arr.dtype == np.dtype(
        f"uint{8 * want.itemsize}"
    ):
        return arr.view(want)
    raise _Unusable(f"a stored leaf has dtype {arr.dtype} where {want} was expected")


def _serialise(f: Any, x: Any) -> None:
    if isinstance(x, (jax.Array, np.ndarray, np.generic)):
        np.save(f, _raw_view(np.asarray(x)), allow_pickle=False)
    elif eqx.is_array_like(x):  # Python scalars
        np.save(f, np.asarray(x), allow_pickle=False)


def _serialise_state(state: State) -> bytes:
    buf = io.BytesIO()
    eqx.tree_serialise_leaves(buf, _to_storable(state), filter_spec=_serialise)
    return buf.getvalue()


def _dtype_name(x: Any) -> str:
    if _is_key(x):
        return f"key<{jax.random.key_impl(x)}>"
    return str(np.asarray(x).dtype) if not hasattr(x, "dtype") else str(x.dtype)


def _signature(state: State) -> list[list[Any]]:
    """`[path, shape, dtype]` of every leaf, in serialisation order."""
    out = []
    for path, x in jax.tree_util.tree_flatten_with_path(state)[0]:
        shape = list(jnp.shape(x))
        if _is_key(x):  # the stored array is the key data
            shape = list(jax.random.key_data(x).shape)
        out.append([jax.tree_util.keystr(path), shape, _dtype_name(x)])
    return out


def _versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for lib in _LIBRARIES:
        try:
            out[lib] = importlib.metadata.version(lib)
        except importlib.metadata.PackageNotFoundError:
            out[lib] = None
    out["python"] = platform.python_version()
    return out


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _manifest_digest(body: Mapping[str, Any]) -> str:
    blob = json.dumps({k: v for k, v in body.items() if k != "manifest_sha256"}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def _fsync_dir(directory: Path) -> None:
    with contextlib.suppress(OSError):  # not every platform can open a directory
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _atomic_write(path: Path, write: Callable[[Any], None]) -> None:
    """Write through `write(file)` into a temporary file, fsync it, rename it to `path`."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)


def _json_default(x: Any) -> Any:
    if isinstance(x, os.PathLike):
        return os.fspath(x)
    if isinstance(x, (np.ndarray, np.generic, jax.Array)) and not _is_key(x):
        return np.asarray(x).tolist()
    raise TypeError(f"{type(x).__name__} {x!r} is not JSON-serialisable")


def _jsonable(metadata: Mapping[str, Any]) -> dict[str, Any]:
    try:
        return json.loads(json.dumps(dict(metadata), default=_json_default))
    except (TypeError, ValueError) as exc:
        raise CheckpointError(
            f"save_checkpoint: metadata is not JSON-serialisable ({exc}). Pass plain "
            "dicts, lists, strings and numbers as metadata."
        ) from exc


class _Unusable(Exception):
    """A checkpoint that is corrupt or incompatible (fall back to an older one)."""


def _weak_like(new: jax.Array, old: Any) -> jax.Array:
    if getattr(old, "weak_type", False):
        try:  # keep Python-scalar ("weak") typing so the jitted step sees the same types
            from jax._src.lax.lax import _convert_element_type

            return _convert_element_type(new, None, weak_type=True)
        except (ImportError, TypeError):
            return new
    return new


def state_digest(state: State) -> str:
    """SHA-256 of every leaf of `state` as a checkpoint stores them: equal digests mean
    bit-identical states (used to compare a resumed run with an uninterrupted one)."""
    return hashlib.sha256(_serialise_state(state)).hexdigest()


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
            out = jax.device_put(arr)  # a transfer; `jnp.asarray` compiles a copy per shape
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
