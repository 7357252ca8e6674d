"""Test configuration: strict dtype promotion and 8 virtual CPU devices for sharding tests.

Warnings are errors (pyproject.toml) and jaxtyping checks every ev3core signature at run
time (`--jaxtyping-packages=ev3core,beartype.beartype`).
"""

import os

os.environ.setdefault("EV3_DISABLE_PLUGIN_AUTOLOAD", "")  # tests choose explicitly

import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)
jax.config.update("jax_numpy_dtype_promotion", "strict")


import subprocess  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402


def _pip_install_target(target: Path, *packages: Path) -> Path:
    """A real `pip install` of plugin source trees into the directory `target` (no deps:
    they are in the test environment already), as a user's `pip install` would lay them out."""
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
            *map(str, packages),
        ],
        check=True,
        capture_output=True,
        timeout=300,
    )
    return target


@pytest.fixture(scope="session")
def pip_install_target():
    """`pip_install_target(target, *package_dirs) -> target`: see `_pip_install_target`."""
    return _pip_install_target
