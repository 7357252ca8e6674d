"""Test configuration shared by `tests/` and every `plugins/*/tests/` (it lives at the repository
root so that pytest applies it to both): strict dtype and rank promotion, 8 virtual CPU
devices for sharding tests, and the plugin sets tests share.

Warnings are errors (pyproject.toml) and jaxtyping checks every ev3core signature at run
time (`--jaxtyping-packages=ev3core,beartype.beartype`).
"""

import os
import signal

os.environ.setdefault("EV3_DISABLE_PLUGIN_AUTOLOAD", "")  # tests choose explicitly

# Tests check how `ev3core.run` and `ev3 run` handle Ctrl-C, which they do only where SIGINT
# has Python's default handler. A shell starts a background job (`pytest ... &`) with SIGINT
# ignored, and the workers and the `ev3 run` processes the tests start would inherit that:
# the suite restores the default, so it checks the same thing however it was started.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

import jax  # noqa: E402

# Before anything else touches a device (ev3core is imported below).
jax.config.update("jax_num_cpu_devices", 8)
jax.config.update("jax_numpy_dtype_promotion", "strict")
jax.config.update("jax_numpy_rank_promotion", "raise")  # no silent broadcasting of ranks

import shutil  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import equinox as eqx  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import pytest  # noqa: E402

import ev3core  # noqa: E402


def _pip_install_target(target: Path, *packages: Path) -> Path:
    """A real `pip install` of plugin source trees into the directory `target` (no deps:
    they are in the test environment already), as a user's `pip install` would lay them out.

    pip builds a local directory in place (setuptools writes `build/` and `*.egg-info` into
    it), so each tree is copied next to `target` first: tests in parallel worker processes
    that install the same tree never build in one directory at once, nor in the checkout."""
    sources = target.parent / f"{target.name}-src"
    copies = []
    for package in packages:
        copies.append(sources / package.name)
        shutil.copytree(
            package, copies[-1], ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__")
        )
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--quiet",
            "--no-deps",
            "--no-build-isolation",
            "--target",
            str(target),
            *map(str, copies),
        ],
        check=True,
        capture_output=True,
        timeout=300,
    )
    return target


def pytest_collection_modifyitems(config, items):
    """Tests marked `slow` come first (otherwise in collection order). `make test` runs two
    workers (`pytest -n 2 --dist loadgroup`) that take tests in this order as they go, so the
    long ones start early and the two workers finish together, instead of one running the
    last long test while the other has nothing left."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)


@pytest.fixture
def procs():
    """A list the test appends the `subprocess.Popen`s it starts to: any still running at
    the end are killed, even when the test fails."""
    started: list[subprocess.Popen] = []
    yield started
    for p in started:
        if p.poll() is None:
            p.kill()
        p.communicate()


@pytest.fixture(scope="session")
def pip_install_target():
    """`pip_install_target(target, *package_dirs) -> target`: see `_pip_install_target`."""
    return _pip_install_target


def _session_compile_cache(tmp_path_factory) -> Path:
    """One persistent compilation cache per test process: shared by the `ev3 run` processes
    the process's tests start, so a program compiled by one (the smoke pipeline, a resumed
    run's step) is loaded by the next instead of compiled again. Entries are keyed on the
    program, so sharing never changes a result; tests of the cache itself use directories
    of their own.

    The worker processes of a parallel run (`pytest -n 2`) do not share one: JAX writes an
    entry in place, so a worker that read an entry while the other worker's `ev3 run`
    process was writing it got a truncated file (a warning, which the suite turns into an
    error; seen once in CI)."""
    path = tmp_path_factory.getbasetemp() / "compile-cache"
    path.mkdir(parents=True, exist_ok=True)
    return path


@pytest.fixture(scope="session", autouse=True)
def _private_user_cache(tmp_path_factory):
    """The tests never touch the user's cache directory (`XDG_CACHE_HOME` is a directory of
    the session), and every process of the session, this one and the `ev3 run` processes the
    tests start, shares one persistent compilation cache (`_session_compile_cache`);
    tests/test_compile_cache.py clears `EV3_*` and `JAX_*` for the processes whose cache it
    checks."""
    saved = {k: os.environ.get(k) for k in ("XDG_CACHE_HOME", "EV3_COMPILE_CACHE")}
    os.environ["XDG_CACHE_HOME"] = str(tmp_path_factory.mktemp("user-cache"))
    shared = _session_compile_cache(tmp_path_factory)
    os.environ["EV3_COMPILE_CACHE"] = str(shared)
    ev3core.enable_compilation_cache(shared)
    # In this process only programs that take a while to compile are worth a file (the
    # suite's many eager operations compile in milliseconds); `ev3 run` processes keep
    # ev3core's setting (every program).
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.3)
    yield
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture(scope="module", autouse=True)
def _release_compiled_programs():
    """Each test module's compiled programs are released when the module ends.

    XLA's CPU backend maps every compiled program's code into the process; a test worker
    that kept all of them reached 59,911 memory maps in a full run of the suite, against the
    kernel's limit of 65,530 (`vm.max_map_count`), past which a compilation fails and takes
    the worker down. A later module that needs a program again compiles it again or loads
    it from the session's persistent compilation cache."""
    yield
    jax.clear_caches()


@pytest.fixture(scope="session")
def tiny_problem():
    """`(data, model)`: 256 2-D points, label `x0 + x1 > 0` in every stream, and an MLP
    2-4-2: the smallest real problem for tests of the host loop and of plugins."""
    x = jax.random.normal(jax.random.key(0), (256, 2))
    y = (x[:, 0] + x[:, 1] > 0).astype(jnp.int32)
    data = ev3core.Data(propose=(x, y), assess=(x, y), decide=(x, y))
    model = eqx.nn.MLP(2, 2, 4, 1, key=jax.random.key(1))
    return data, model


@pytest.fixture(scope="session")
def builtin_plugins():
    """The built-in plugins only (no entry points): names resolve to ev3core's components.

    Shared by every test that only needs built-in names; a test that registers its own
    plugin objects loads a fresh set with `ev3core.load_plugins(extra=[...])`.
    """
    return ev3core.load_plugins(autoload=False)
