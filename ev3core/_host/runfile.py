"""A user's run file for `ev3 run FILE.py`: the model, the data and the pipeline, checked.

The file is ordinary Python, run once (`runpy.run_path`) in the process that trains. It
defines:

- `model`: an Equinox module (called on one example), or a function `model(key)` returning
  one;
- `data`: an `ev3core.Data` of arrays, an `ev3core.DataStream`, or a function `data(key)`
  returning either;
- `pipeline`: an `ev3core.Pipeline`, or a function `pipeline()` returning one;
- optionally `steps`: the number of EV3 iterations when `--steps` is not given.

Every name is checked here, before anything is trained or written, and each error names the
attribute and the fix. The same rules as for the distillation job's pipeline files hold: a
file is never run because a checkpoint names it (`ev3 run FILE --resume DIR`, and FILE must
have the SHA-256 that the run recorded).
"""

from __future__ import annotations

import copy
import hashlib
import os
import re
import runpy
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import equinox as eqx
import jax
import numpy as np

from .._plugins.manager import plugin_manager
from .._plugins.pipeline import Pipeline
from .._types import Data
from ..errors import CheckpointError, ConfigurationError, EV3Error
from .run import _guarded
from .stream import DataStream

_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")

EXAMPLE = """\
    import equinox as eqx, jax, optax
    import ev3core as ev3

    model = lambda key: eqx.nn.MLP(2, 2, 8, 1, key=key)
    data = lambda key: ev3.toy_problem(key, n=4096)[0]
    pipeline = ev3.Pipeline(proposers=[ev3.GradientProposer([ev3.CrossEntropy()],
                            [optax.sgd(0.1)], steps=20, batch_size=32)],
                            assessors=["accuracy"], assess_size=128, decide_size=1024)"""


def file_sha256(path: str | os.PathLike[str]) -> str:
    """The SHA-256 (hex) of a file's bytes."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


@dataclass
class RunFile:
    """What a run file defines, checked and built.

    **Attributes:** `path` (absolute), `sha256` (of its bytes), `model` (the Equinox module
    to start from), `data` (a `Data` of arrays or a `DataStream`), `pipeline` (a `Pipeline`)
    and `steps` (the file's `steps`, or `None`).
    """

    path: Path
    sha256: str
    model: Any
    data: Data | DataStream
    pipeline: Pipeline
    steps: int | None


def _where(path: Path) -> str:
    return f"run file {str(path)!r}"


def _raising_line(path: Path, exc: BaseException) -> str | None:
    """`"line N"` of the innermost frame of `exc`'s traceback inside the file `path`."""
    lines = [
        f"line {frame.f_lineno}"
        for frame, _ in traceback.walk_tb(exc.__traceback__)
        if Path(frame.f_code.co_filename).resolve() == path
    ]
    return lines[-1] if lines else None


def _call(path: Path, name: str, factory: Any, *args: Any) -> Any:
    """`factory(*args)`; an exception becomes a `ConfigurationError` naming the factory and
    the line of the file that raised."""
    try:
        return factory(*args)
    except Exception as exc:
        line = _raising_line(path, exc)
        at = f" ({line} of the file)" if line else ""
        signature = f"{name}({', '.join(('key',) * len(args))})"
        raise ConfigurationError(
            f"{_where(path)}: the factory `{signature}` raised {type(exc).__name__}: "
            f"{exc}{at}. Fix the function, or define `{name}` as a value."
        ) from exc


def _is_array(x: Any) -> bool:
    return isinstance(x, (jax.Array, np.ndarray))


def _check_data(path: Path, data: Any, what: str) -> Data | DataStream:
    where = _where(path)
    if isinstance(data, DataStream):
        if not data.resumable:
            raise ConfigurationError(
                f"{where}: {what} is a DataStream over {type(data.iterable).__name__}, whose "
                "iterator has no position (get_state/set_state), so the run cannot be "
                "checkpointed. Stream a grain dataset or loader, or give the arrays as "
                "ev3core.Data(propose=..., assess=..., decide=...)."
            )
        return data
    if isinstance(data, Data):
        leaves = jax.tree.leaves(data)
        bad = sorted({type(x).__name__ for x in leaves if not _is_array(x)})
        if not leaves or bad:
            raise ConfigurationError(
                f"{where}: {what} is an ev3core.Data whose leaves are "
                f"{', '.join(bad) or 'missing'}, not arrays. Give every stream as arrays "
                "with a leading example axis, e.g. Data(propose=(x, y), assess=(x2, y2), "
                "decide=(x3, y3)) of jax or NumPy arrays."
            )
        return data
    hint = (
        " Wrap the arrays: data = ev3core.Data(propose=(x, y), assess=(x_a, y_a), "
        "decide=(x_d, y_d)) (three independent splits)."
        if isinstance(data, (tuple, list, dict)) or _is_array(data)
        else " Wrap an iterable of Data (e.g. a grain dataset) in ev3core.DataStream(...)."
        if hasattr(data, "__iter__")
        else ""
    )
    raise ConfigurationError(
        f"{where}: {what} is a {type(data).__name__}; it must be an ev3core.Data of arrays "
        f"or an ev3core.DataStream (or a function `data(key)` returning one).{hint}"
    )


def _load_namespace(path: Path) -> dict[str, Any]:
    where = _where(path)
    try:
        return runpy.run_path(str(path), run_name="__ev3_run_file__")
    except Exception as exc:
        line = _raising_line(path, exc)
        at = f" at {line}" if line else ""
        raise ConfigurationError(
            f"{where} raised {type(exc).__name__}{at} while it was being run: {exc}. Fix the "
            "file (run it with `python FILE.py` to see the traceback)."
        ) from exc


def check_run_file_path(path: str | os.PathLike[str]) -> Path:
    """The absolute path of a run file that exists and ends in `.py`."""
    p = Path(path)
    if p.suffix != ".py":
        raise ConfigurationError(
            f"{str(p)!r} is not a Python file (.py). `ev3 run FILE.py` runs a file that "
            "defines `model`, `data` and `pipeline`; pass --experiment NAME (see `ev3 plugins`) "
            "for a registered experiment."
        )
    if not p.is_file():
        raise ConfigurationError(
            f"run file {str(p)!r} does not exist (or is not a file). Pass the path of a .py "
            "file that defines `model`, `data` and `pipeline`."
        )
    return p.resolve()


def load_run_file(path: str | os.PathLike[str], key: jax.Array) -> RunFile:
    """Run the file and check what it defines (see the module docstring).

    **Arguments:**

    - `path`: the file.
    - `key`: a PRNG key; `model(key)` and `data(key)` factories get independent keys
      derived from it.

    **Raises:** `ConfigurationError` naming the attribute and the fix when the file is
    missing, not a `.py` file, raises, lacks `model`, `data` or `pipeline`, defines one of the
    wrong type, or a factory raises or returns the wrong type.
    """
    p = check_run_file_path(path)
    sha = file_sha256(p)
    where = _where(p)
    namespace = _load_namespace(p)
    missing = [n for n in ("model", "data", "pipeline") if n not in namespace]
    if missing:
        names = " or ".join(f"`{n}`" for n in missing)
        raise ConfigurationError(
            f"{where} defines no {names}. A run file defines `model` (an Equinox module or "
            "`model(key)`), `data` (an ev3core.Data or DataStream, or `data(key)`) and "
            f"`pipeline` (an ev3core.Pipeline or `pipeline()`), for example:\n{EXAMPLE}"
        )
    k_model, k_data = jax.random.split(key)

    model = namespace["model"]
    if not isinstance(model, eqx.Module):
        if not callable(model) or isinstance(model, type):
            kind = f"the class {model.__name__}" if isinstance(model, type) else None
            raise ConfigurationError(
                f"{where}: `model` is {kind or type(model).__name__}; it must be an Equinox "
                "module (e.g. eqx.nn.MLP(2, 2, 8, 1, key=jax.random.key(0))) or a function "
                "`model(key)` returning one."
            )
        model = _call(p, "model", model, k_model)
        if not isinstance(model, eqx.Module):
            raise ConfigurationError(
                f"{where}: `model(key)` returned {type(model).__name__}; it must return an "
                "Equinox module."
            )

    data = namespace["data"]
    if isinstance(data, (Data, DataStream)):
        data = _check_data(p, data, "`data`")
    elif callable(data) and not isinstance(data, type):
        data = _check_data(p, _call(p, "data", data, k_data), "what `data(key)` returned")
    else:
        data = _check_data(p, data, "`data`")

    pipe = namespace["pipeline"]
    if not isinstance(pipe, Pipeline):
        if not callable(pipe) or isinstance(pipe, type):
            raise ConfigurationError(
                f"{where}: `pipeline` is {type(pipe).__name__} {pipe!r}; it must be an "
                "ev3core.Pipeline(proposers=..., assessors=..., ...) or a function "
                "`pipeline()` returning one."
            )
        pipe = _call(p, "pipeline", pipe)
        if not isinstance(pipe, Pipeline):
            raise ConfigurationError(
                f"{where}: `pipeline()` returned {type(pipe).__name__}; it must return an "
                "ev3core.Pipeline."
            )

    steps = namespace.get("steps")
    if steps is not None and (not isinstance(steps, int) or isinstance(steps, bool) or steps < 0):
        raise ConfigurationError(
            f"{where}: `steps` is {steps!r}; it must be a whole number >= 0 (the EV3 "
            "iterations when --steps is not given), or left out."
        )
    return RunFile(path=p, sha256=sha, model=model, data=data, pipeline=pipe, steps=steps)


def build_engine(run_file: RunFile, plugins: Any = None) -> Any:
    """`run_file.pipeline.build()`, with `plugins` when the pipeline names none; a build
    error names the file's `pipeline`."""
    pipe = run_file.pipeline
    if plugins is not None and pipe.plugins is None:
        pipe = copy.copy(pipe)
        pipe.plugins = plugins
    try:
        return pipe.build()
    except ConfigurationError as exc:
        raise ConfigurationError(f"{_where(run_file.path)}: `pipeline`: {exc}") from exc


def check_fits(run_file: RunFile, engine: Any, state: Any, plugins: Any) -> None:
    """The engine's data checks (shapes, sizes, labels; every component evaluated abstractly
    on the data's shapes, nothing compiled), naming the file's `model` and `data`."""
    plugins = plugins if plugins is not None else plugin_manager()
    data = run_file.data
    try:
        sample = data.peek() if isinstance(data, DataStream) else data
        _guarded(engine, plugins, engine.check_data, sample, state)
    except EV3Error as exc:
        raise ConfigurationError(
            f"{_where(run_file.path)}: `data` does not fit `model` and `pipeline`: {exc}"
        ) from exc


def resumed_file(directory: str | os.PathLike[str], record: dict[str, Any], named: Any) -> Path:
    """The run file to run again when resuming the run in `directory`.

    A file is never run because a checkpoint names it (a checkpoint's checksums detect
    damage, not tampering): the user names it (`ev3 run FILE --resume DIR`), and it must have
    the SHA-256 that the run recorded (`record["file_sha256"]`, next to `record["file"]`).
    """
    recorded, digest = record.get("file"), record.get("file_sha256")
    if not isinstance(recorded, str) or not isinstance(digest, str) or not _SHA256_RE.match(digest):
        raise CheckpointError(
            f"--resume {directory}: the checkpoint records no valid run file and SHA-256 "
            f"(file={recorded!r}); the run directory was edited. Start a new run."
        )
    if named is None:
        raise ConfigurationError(
            f"--resume {directory}: that run used the run file {recorded!r}. ev3 does not "
            "run a file because a checkpoint names it; name it yourself to resume: "
            f"ev3 run {recorded} --resume {directory}"
        )
    path = check_run_file_path(named)
    if file_sha256(path) != digest:
        raise ConfigurationError(
            f"--resume {directory}: {named} is not the run file the run was started with "
            f"({recorded!r}, SHA-256 {digest[:12]}...): its content differs. Resume with the "
            "same file, or start a new run."
        )
    return path
