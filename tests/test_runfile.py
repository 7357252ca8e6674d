"""`ev3 run FILE.py`: the user's model, data and pipeline from a file (the built-in file
experiment): every output, exact resume after Ctrl-C, and checks before any training."""

import importlib.util
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ev3core import list_checkpoints

HEADER = """\
import equinox as eqx, jax, optax
import ev3core as ev3
"""
DEFINITIONS = {
    "model": "model = lambda key: eqx.nn.MLP(2, 2, 8, 1, activation=jax.nn.relu, key=key)",
    "data": "data = lambda key: ev3.toy_problem(key, n=2048)[0]",
    "pipeline": (
        "pipeline = ev3.Pipeline(proposers=[ev3.GradientProposer([ev3.CrossEntropy(0.5), "
        "ev3.CrossEntropy(1.0)], [optax.sgd(0.1)], steps=10, batch_size=32)], "
        'assessors=["accuracy"], assess_size=128, decide_size=1024)'
    ),
    "steps": "steps = 4",
}

# One fresh Data per step from a checkpointable position (as a grain iterator has), slow
# enough that Ctrl-C lands in the middle of the run.
STREAM = """
import time


class Steps:
    def __init__(self):
        self.i = 0

    def __iter__(self):
        return self

    def __next__(self):
        time.sleep(0.1)
        d = ev3.toy_problem(jax.random.fold_in(jax.random.key(7), self.i), n=1024)[0]
        self.i += 1
        return d

    def get_state(self):
        return {"i": self.i}

    def set_state(self, state):
        self.i = state["i"]


data = ev3.DataStream(Steps())
"""


def _write(path: Path, extra: str = "", **changes: str | None) -> Path:
    """A run file: the tiny definitions, with `changes` (`None` drops a definition)."""
    lines = {**DEFINITIONS, **changes}
    path.write_text(HEADER + "\n".join(v for v in lines.values() if v is not None) + extra)
    return path


def _ev3(*args, cwd=None):
    return subprocess.Popen(
        [sys.executable, "-m", "ev3core._host.cli", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=cwd,
    )


def _summary(path: Path) -> dict:
    s = json.loads(path.read_text())
    for key in ("wall_seconds", "resumed_from", "out"):
        s.pop(key)
    return s


def test_run_file_writes_every_output(tmp_path, procs):
    run_file = _write(tmp_path / "tiny.py")
    out = tmp_path / "out"
    proc = _ev3(
        "run", str(run_file), "--out", str(out), "--checkpoint-every", "2",
        "--print-every", "1", "--no-progress", "--no-compile-cache",
    )  # fmt: skip
    procs.append(proc)
    stdout, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    summary = json.loads((out / "summary.json").read_text())
    assert json.loads(stdout) == summary
    assert json.loads((out / "ev3-run.json").read_text()) == {"experiment": "file"}
    assert summary["experiment"] == "file" and summary["file"] == str(run_file.resolve())
    assert summary["steps"] == 4  # the file's `steps`
    assert summary["accepted"] + summary["kept"] + summary["rolled_back"] == 4
    assert len(summary["file_sha256"]) == 64 and len(summary["state_sha256"]) == 64
    assert summary["resumed_from"] is None and summary["wall_seconds"] > 0
    final = summary["final_decide"]["accuracy"]
    assert 0.5 < final["current"] <= 1 and 0 < final["stable"] <= 1
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == [0, 1, 2, 3]
    assert set(lines[-1]["decide_mean"]["accuracy"]) == {"winner", "current", "stable"}
    steps = [json.loads(m.read_text())["step"] for m in list_checkpoints(out)]
    assert sorted(steps) == [2, 4]
    if importlib.util.find_spec("matplotlib") is not None:
        assert summary["report"] == "report.png"
        assert (out / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    else:
        assert summary["report"].startswith("skipped") and not (out / "report.png").exists()


def test_sigint_then_resume_gives_the_uninterrupted_state(tmp_path, procs):
    run_file = _write(tmp_path / "streamed.py", STREAM, data=None, steps="steps = 10")
    # The runs use the session's compilation cache: the first run compiles the programs, the
    # uninterrupted and the resumed run, started once it has checkpointed, load them.
    common = ["--checkpoint-every", "1", "--print-every", "1"]
    interrupted = tmp_path / "interrupted"
    proc = _ev3("run", str(run_file), "--out", str(interrupted), *common)
    procs.append(proc)
    deadline = time.monotonic() + 240
    while not list_checkpoints(interrupted):
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    # No --out: a new directory under runs/ (of the working directory).
    straight = _ev3("run", str(run_file), *common, cwd=tmp_path)
    procs.append(straight)
    _, err = proc.communicate(timeout=240)
    assert proc.returncode == 130, err
    assert f"Continue with: ev3 run {run_file} --resume {interrupted}" in err
    assert "Traceback" not in err
    stopped = max(json.loads(m.read_text())["step"] for m in list_checkpoints(interrupted))
    assert 1 <= stopped < 10
    assert not (interrupted / "summary.json").exists()

    # Resuming needs the file named again (a checkpoint never runs a file) ...
    refused = _ev3("run", "--resume", str(interrupted), "--no-compile-cache")
    procs.append(refused)
    _, err = refused.communicate(timeout=240)
    assert refused.returncode == 2 and f"ev3 run {run_file.resolve()} --resume" in err
    # ... and with its recorded content.
    edited = tmp_path / "edited.py"
    edited.write_text(run_file.read_text() + "\n# edited\n")
    refused = _ev3("run", str(edited), "--resume", str(interrupted), "--no-compile-cache")
    procs.append(refused)
    _, err = refused.communicate(timeout=240)
    assert refused.returncode == 2 and "its content differs" in err

    resumed = _ev3("run", str(run_file), "--resume", str(interrupted), *common)
    procs.append(resumed)
    _, err = resumed.communicate(timeout=240)
    assert resumed.returncode == 0, err
    assert f"at step {stopped} of 10" in err
    _, err = straight.communicate(timeout=240)
    assert straight.returncode == 0, err
    [default_out] = (tmp_path / "runs").iterdir()
    assert default_out.name.startswith("streamed-")
    a, b = _summary(default_out / "summary.json"), _summary(interrupted / "summary.json")
    assert a == b  # includes state_sha256: the final engine states are bit-identical
    assert (
        a["steps"] == 10
        and json.loads((interrupted / "summary.json").read_text())["resumed_from"] == stopped
    )

    def steps(path):
        return [
            {k: v for k, v in json.loads(line).items() if k != "time"}
            for line in (path / "metrics.jsonl").read_text().splitlines()
        ]

    assert steps(default_out) == steps(interrupted)  # every step logged once, as uninterrupted


BAD_FILES = {
    "no such file": (None, "does not exist"),
    "not python": ("txt", "is not a Python file (.py)"),
    "no model": ({"model": None}, "defines no `model`"),
    "no data or pipeline": ({"data": None, "pipeline": None}, "defines no `data` or `pipeline`"),
    "data is a tuple": (
        {"data": "data = ev3.toy_problem(jax.random.key(0), n=2048)[1]"},
        "`data` is a tuple; it must be an ev3core.Data",
    ),
    "data factory returns a list": (
        {"data": "data = lambda key: [1, 2]"},
        "what `data(key)` returned is a list",
    ),
    "pipeline is an int": ({"pipeline": "pipeline = 3"}, "`pipeline` is int 3"),
    "pipeline factory returns None": (
        {"pipeline": "pipeline = lambda: None"},
        "`pipeline()` returned NoneType",
    ),
    "model is a string": ({"model": "model = 'mlp'"}, "`model` is str"),
    "model factory raises": (
        {"model": "model = lambda key: 1 / 0"},
        "the factory `model(key)` raised ZeroDivisionError",
    ),
    "file raises": ({"steps": "steps = undefined_name"}, "raised NameError at line"),
    "steps negative": ({"steps": "steps = -1"}, "`steps` is -1"),
    "shapes do not fit": (
        {"model": "model = lambda key: eqx.nn.MLP(3, 2, 8, 1, key=key)"},
        "`data` does not fit `model` and `pipeline`",
    ),
}


@pytest.mark.parametrize("case", list(BAD_FILES), ids=list(BAD_FILES))
def test_bad_run_files_fail_before_training(case, tmp_path, monkeypatch, capsys):
    from ev3core._host.cli import main

    spec, message = BAD_FILES[case]
    if spec is None:
        path = tmp_path / "missing.py"
    elif spec == "txt":
        path = _write(tmp_path / "run.txt")
    else:
        path = _write(tmp_path / "run.py", **spec)
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "out"
    assert main(["run", str(path), "--out", str(out), "--no-compile-cache"]) == 2
    err = capsys.readouterr().err
    assert message in err, err
    assert "Traceback" not in err
    # nothing trained or written: no checkpoint, metrics or summary, no default run directory
    assert sorted(p.name for p in out.iterdir()) == ["ev3-run.json"]
    assert not (tmp_path / "runs").exists()
