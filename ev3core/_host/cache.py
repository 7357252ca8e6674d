"""JAX's persistent compilation cache for `ev3 run` (and for your own scripts).

A compiled EV3 step is written to a directory on disk; a later process that builds the same
pipeline on the same shapes loads the executable instead of compiling it again (seconds
instead of the compile time). `ev3 run` turns it on by default; `--no-compile-cache` or
`EV3_COMPILE_CACHE=0` turn it off, and `--compile-cache DIR` or `EV3_COMPILE_CACHE=DIR`
choose the directory.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

#: Environment variable: `0`/`off`/`false`/`no` disables the cache, any other value is its
#: directory.
ENV_VAR = "EV3_COMPILE_CACHE"
_OFF = {"0", "off", "false", "no", "none", "disable", "disabled"}


def default_cache_dir() -> Path:
    """The platform's per-user cache directory for ev3core's compiled programs.

    `$XDG_CACHE_HOME/ev3core/jax` (default `~/.cache/ev3core/jax`) on Linux and other
    Unix systems, `~/Library/Caches/ev3core/jax` on macOS, `%LOCALAPPDATA%\\ev3core\\Cache\\jax`
    on Windows.
    """
    if sys.platform == "win32":
        base = Path(os.environ.get("LOCALAPPDATA") or Path.home() / "AppData" / "Local")
        return base / "ev3core" / "Cache" / "jax"
    if sys.platform == "darwin":
        return Path.home() / "Library" / "Caches" / "ev3core" / "jax"
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg) if xdg and os.path.isabs(xdg) else Path.home() / ".cache"
    return base / "ev3core" / "jax"


def cache_dir_from_env(default: Path | None = None) -> Path | None:
    """The directory `EV3_COMPILE_CACHE` asks for: `None` when it disables the cache,
    `default` (the platform's cache directory when `None`) when it is unset or empty."""
    value = os.environ.get(ENV_VAR, "").strip()
    if value.lower() in _OFF:
        return None
    if value:
        return Path(value).expanduser()
    return default if default is not None else default_cache_dir()


def enable_compilation_cache(directory: str | os.PathLike[str] | None = None) -> Path:
    """Turn on JAX's persistent compilation cache in `directory` for this process.

    Every program is cached, however small or quick to compile (JAX's defaults skip programs
    that compile in under a second, which would leave most of an EV3 run's start-up
    uncached). Call it before the first compilation: programs compiled earlier in the process
    are not written. The cache is keyed on the program, the JAX version and the device, so a
    changed pipeline, shape or JAX upgrade compiles afresh; entries are never stale, only
    unused (delete the directory to reclaim the space). Several processes may share one
    directory; JAX writes an entry in place, so a process that reads an entry while another
    is still writing it warns ("Error reading persistent compilation cache entry") and
    compiles that program itself; no result changes.

    **Arguments:**

    - `directory`: where to keep the compiled programs; `None` (default): the platform's
      per-user cache directory (`default_cache_dir()`, e.g. `~/.cache/ev3core/jax`).

    **Returns:** the directory used.

    ```python
    import ev3core

    ev3core.enable_compilation_cache()  # a second run of this script skips compiling
    ```
    """
    import jax

    path = Path(directory).expanduser() if directory is not None else default_cache_dir()
    path.mkdir(parents=True, exist_ok=True)
    jax.config.update("jax_enable_compilation_cache", True)
    jax.config.update("jax_compilation_cache_dir", str(path))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)
    _reset_jax_cache_state()
    return path


def disable_compilation_cache() -> None:
    """Turn JAX's persistent compilation cache off for this process (including a directory
    given through JAX's own `JAX_COMPILATION_CACHE_DIR`)."""
    import jax

    jax.config.update("jax_enable_compilation_cache", False)
    _reset_jax_cache_state()


def _reset_jax_cache_state() -> None:
    # JAX decides once per process whether the cache is in use (at the first compilation);
    # forget that decision so the new setting applies to the next compilation.
    try:
        from jax._src import compilation_cache
    except ImportError:  # pragma: no cover - a JAX without the module has no cache to reset
        return
    reset = getattr(compilation_cache, "reset_cache", None)
    if reset is not None:
        reset()
