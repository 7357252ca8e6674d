"""Test configuration: strict dtype promotion and 8 virtual CPU devices for sharding tests.

Warnings are errors (pyproject.toml) and jaxtyping checks every ev3core signature at run
time (`--jaxtyping-packages=ev3core,beartype.beartype`).
"""

import os

os.environ.setdefault("EV3_DISABLE_PLUGIN_AUTOLOAD", "")  # tests choose explicitly

import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)
jax.config.update("jax_numpy_dtype_promotion", "strict")
