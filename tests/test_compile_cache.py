"""The persistent compilation cache of `ev3 run`: a second process with the same pipeline
loads its programs instead of compiling them, and switching the cache off is honoured.

Compiles are counted from JAX's own compile log (`JAX_LOG_COMPILES`, `JAX_EXPLAIN_CACHE_MISSES`)
in real `ev3 run` processes.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from ev3core._host.cache import cache_dir_from_env, default_cache_dir

# `make test` runs `pytest -n 2 --dist loadgroup`: this module's tests run
# in one worker, which runs the first `ev3 run` (`filled`) once for all of them.
pytestmark = pytest.mark.xdist_group("compile_cache")


FINISHED = "Finished XLA compilation of"  # every program: compiled or read from the cache
HIT = "Persistent compilation cache hit for"
MISS = "PERSISTENT COMPILATION CACHE MISS for"


def _ev3(*args: str, **env_extra: str) -> str:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("EV3_", "JAX_"))}
    env.update(JAX_LOG_COMPILES="1", JAX_EXPLAIN_CACHE_MISSES="1", **env_extra)
    res = subprocess.run(
        [
            str(Path(sys.executable).parent / "ev3"),
            "run",
            "--smoke",
            "--steps",
            "1",
            "--examples",
            "2048",
            "--no-progress",
            *args,
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    return res.stderr


def _count(log: str, marker: str) -> int:
    return sum(marker in line for line in log.splitlines())


@pytest.fixture(scope="module")
def filled(tmp_path_factory):
    """A first `ev3 run` with no cache option: it fills the per-user cache directory."""
    xdg = tmp_path_factory.mktemp("xdg")
    return xdg, _ev3(XDG_CACHE_HOME=str(xdg))


def test_the_first_run_compiles_into_the_user_cache_directory(filled):
    xdg, log = filled
    assert _count(log, FINISHED) > 0 and _count(log, MISS) > 0
    assert any((xdg / "ev3core" / "jax").iterdir()), "nothing written to the cache directory"


def test_a_second_process_reads_every_program_from_the_cache(filled, tmp_path):
    xdg, first = filled
    # EV3_COMPILE_CACHE names the directory (the per-user one is empty here: not used).
    log = _ev3(EV3_COMPILE_CACHE=str(xdg / "ev3core" / "jax"), XDG_CACHE_HOME=str(tmp_path))
    assert _count(log, FINISHED) == _count(first, FINISHED)
    assert _count(log, MISS) == 0, log
    assert _count(log, HIT) == _count(log, FINISHED)
    assert not (tmp_path / "ev3core").exists()


def test_compile_cache_flag_chooses_the_directory(tmp_path):
    log = _ev3("--compile-cache", str(tmp_path / "mine"), XDG_CACHE_HOME=str(tmp_path / "xdg"))
    assert _count(log, MISS) > 0 and any((tmp_path / "mine").iterdir())
    assert not (tmp_path / "xdg").exists()


@pytest.mark.parametrize("how", ["flag", "env"])
def test_switching_the_cache_off_is_honoured(filled, how):
    xdg, _ = filled
    filled_dir = xdg / "ev3core" / "jax"
    before = sorted(p.name for p in filled_dir.iterdir())
    args, env = (("--no-compile-cache",), {}) if how == "flag" else ((), {"EV3_COMPILE_CACHE": "0"})
    # A filled cache that must be neither read nor written, named every other way there is.
    log = _ev3(*args, XDG_CACHE_HOME=str(xdg), JAX_COMPILATION_CACHE_DIR=str(filled_dir), **env)
    assert _count(log, FINISHED) > 0
    assert _count(log, HIT) == 0 and _count(log, MISS) == 0, log
    assert sorted(p.name for p in filled_dir.iterdir()) == before


def test_cache_directory_follows_the_platform_and_the_environment(monkeypatch, tmp_path):
    monkeypatch.setattr(sys, "platform", "linux")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert default_cache_dir() == tmp_path / "ev3core" / "jax"
    monkeypatch.setenv("XDG_CACHE_HOME", "relative/ignored")  # the XDG spec: absolute only
    assert default_cache_dir() == Path.home() / ".cache" / "ev3core" / "jax"
    monkeypatch.setattr(sys, "platform", "darwin")
    assert default_cache_dir() == Path.home() / "Library" / "Caches" / "ev3core" / "jax"
    monkeypatch.setenv("EV3_COMPILE_CACHE", "off")
    assert cache_dir_from_env() is None
    monkeypatch.setenv("EV3_COMPILE_CACHE", str(tmp_path / "here"))
    assert cache_dir_from_env() == tmp_path / "here"
