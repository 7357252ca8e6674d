"""The paper's experiment (`ev3 run --experiment cifar`) end to end on a small synthetic set of
CIFAR's shapes generated here (no download), and the checks of its data directory, records
and teacher logits."""

import json
import os
import subprocess
import sys
from pathlib import Path

import equinox as eqx
import jax
import numpy as np
import pytest
from ev3_distill import (
    CIFAR_DEFAULTS,
    DistillConfig,
    count_params,
    describe,
    load_cifar,
    make_resnet,
    model_from_description,
    read_split,
    write_array_record,
    write_teacher_logits,
)
from ev3_distill._config import _teacher_columns

import ev3core
from ev3core.errors import ConfigurationError

CLASSES = 10
# Class-dependent mean colours, far apart: the labels are learnable from a few steps.
COLOURS = np.random.default_rng(0).uniform(30.0, 225.0, (CLASSES, 3))


def _images(n, seed):
    """`n` CIFAR-shaped uint8 images: each class a noisy image of its own colour."""
    rng = np.random.default_rng(seed)
    labels = rng.permutation(np.arange(n) % CLASSES)
    noise = rng.normal(0.0, 30.0, (n, 32, 32, 3))
    images = np.clip(COLOURS[labels][:, None, None, :] + noise, 0, 255).astype(np.uint8)
    return images, labels


def _teacher(images):
    """A teacher that knows the colours: logits from the distance to each class colour."""
    mean = images.astype(np.float32).mean(axis=(1, 2))
    return -np.sum((mean[:, None, :] - COLOURS[None]) ** 2, axis=-1) / 200.0


def _write(directory, n_train=256, n_test=128):
    write_array_record(directory, "train", *_images(n_train, 1), name="synthetic-cifar10")
    write_array_record(directory, "test", *_images(n_test, 2))
    return write_teacher_logits(directory, _teacher, batch_size=100)


# ---------------------------------------------------------------------------- the layout
def test_layout_round_trip_and_splits(tmp_path):
    data = tmp_path / "data"
    logits_file = _write(data)
    manifest = json.loads((data / "manifest.json").read_text())
    assert manifest == {
        "format": "ev3-images-1",
        "name": "synthetic-cifar10",
        "shape": [32, 32, 3],
        "dtype": "uint8",
        "num_classes": 10,
        "label_bytes": 2,
        "splits": {"train": 256, "test": 128},
    }
    images, labels = _images(256, 1)
    got_images, got_labels = read_split(data, "train", batch_size=100)  # a partial last batch
    assert got_images.dtype == np.uint8 and got_labels.dtype == np.int32
    np.testing.assert_array_equal(got_images, images)
    np.testing.assert_array_equal(got_labels, labels)
    logits = np.load(logits_file, allow_pickle=False)
    assert logits.shape == (256, 10) and logits.dtype == np.float32
    assert np.mean(np.argmax(logits, -1) == labels) == 1.0  # the colour teacher is exact
    assert np.load(data / "teacher_logits_test.npy").shape == (128, 10)

    splits = load_cifar(data, seed=3, holdout=0.25)
    assert splits.sizes() == {"train": 192, "assess": 26, "decide": 38, "test": 128}
    assert splits.in_shape == (32, 32, 3) and splits.num_classes == 10
    assert splits.name == "synthetic-cifar10"
    splits.check_disjoint()
    # the train, assess and decide splits are the train file's examples at their indices,
    # standardised per channel with the train file's statistics
    x = splits.train.x.reshape(-1, 32, 32, 3)
    np.testing.assert_array_equal(splits.train.y, labels[splits.train.index])
    pixels = images.reshape(-1, 3) / 255.0
    want = (images[splits.train.index] / 255.0 - pixels.mean(0)) / pixels.std(0)
    np.testing.assert_allclose(x, want, atol=1e-4)
    assert splits.test.index.min() == 256  # test positions follow the train file's


def test_data_errors_name_the_problem_and_the_fix(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(ConfigurationError, match="no such directory.*write_array_record"):
        load_cifar(missing)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigurationError, match="no manifest.json there"):
        load_cifar(tmp_path / "empty")

    data = tmp_path / "data"
    write_array_record(data, "train", *_images(20, 1))
    with pytest.raises(ConfigurationError, match="the 'test' split is missing"):
        load_cifar(data)
    with pytest.raises(ConfigurationError, match="32, 32, 3.*10 classes.*has \\[8, 8, 3\\]"):
        write_array_record(data, "test", np.zeros((4, 8, 8, 3), np.uint8), np.zeros(4, int))

    # a record of the wrong size (another image shape written under this manifest)
    other = tmp_path / "other"
    write_array_record(other, "test", np.zeros((3, 8, 8, 3), np.uint8), np.arange(3))
    os.replace(other / "test.array_record", data / "test.array_record")
    manifest = json.loads((data / "manifest.json").read_text())
    manifest["splits"]["test"] = 3
    (data / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ConfigurationError, match="record 0 has 194 bytes.*take 3074"):
        read_split(data, "test")
    # a count that disagrees with the manifest
    manifest["splits"]["test"] = 5
    (data / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ConfigurationError, match="3 records, but manifest.json says 5"):
        read_split(data, "test")
    # a label the manifest's classes do not have (record 2 of 3 holds label 2)
    write_array_record(data, "test", np.zeros((3, 32, 32, 3), np.uint8), np.arange(3))
    manifest = json.loads((data / "manifest.json").read_text())
    manifest["num_classes"] = 2
    (data / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ConfigurationError, match="record 2 has label 2, but the manifest has 2"):
        read_split(data, "test", batch_size=2)  # in the second batch
    (data / "manifest.json").write_text('{"format": "something else"}')
    with pytest.raises(ConfigurationError, match="not an 'ev3-images-1' manifest"):
        read_split(data, "train")


def _cifar(**options):
    from ev3_distill import cifar_experiment

    return cifar_experiment(progress=False, **options)


def test_teacher_logits_are_checked_before_training(tmp_path):
    data = tmp_path / "data"
    _write(data, n_train=40, n_test=10)
    out = tmp_path / "run"
    with pytest.raises(ConfigurationError, match="needs --data DIR"):
        _cifar(out=out)
    short = tmp_path / "short.npy"
    np.save(short, np.zeros((39, 10), np.float32))
    with pytest.raises(ConfigurationError, match=r"\(39, 10\), but the train split has 40"):
        _cifar(data=data, teacher_logits=short, out=out)
    pickled = tmp_path / "objects.npy"
    np.save(pickled, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(ConfigurationError, match="not a readable .npy array of numbers"):
        _cifar(data=data, teacher_logits=pickled, out=out)
    with pytest.raises(ConfigurationError, match="no such file.*write_teacher_logits"):
        _cifar(data=data, teacher_logits=tmp_path / "none.npy", out=out)
    with pytest.raises(ConfigurationError, match="drop --dataset"):
        _cifar(data=data, dataset="digits", out=out)
    assert not (out / "checkpoint").exists()  # nothing ran
    with pytest.raises(ConfigurationError, match="reads the directory given by --data"):
        DistillConfig(dataset="cifar")
    with pytest.raises(ConfigurationError, match="trains its own teacher"):
        DistillConfig(teacher_logits="t.npy")
    with pytest.raises(ConfigurationError, match="student='resnet' set baseline=False"):
        DistillConfig(**{**CIFAR_DEFAULTS, "baseline": True}, dataset="cifar", data="d")


def test_a_resnet_student_is_described_rebuilt_and_used_as_a_teacher():
    # one width everywhere: few distinct weight shapes, so few initialiser compilations
    net, state = make_resnet((8, 8, 3), 10, widths=(2, 2, 2), key=jax.random.key(0))
    student = ev3core.Stateful(net, state)
    description = describe(student)
    assert description == {
        "kind": "resnet",
        "in_shape": [8, 8, 3],
        "num_classes": 10,
        "widths": [2, 2, 2],
        "blocks": [1, 1, 1],
    }
    like = model_from_description(description, key=jax.random.key(1))
    assert isinstance(like, ev3core.Stateful) and describe(like) == description
    arrays = lambda m: jax.tree.leaves(eqx.filter(m, eqx.is_array))  # noqa: E731
    assert jax.tree.structure(like) == jax.tree.structure(student)
    assert [x.shape for x in arrays(like)] == [x.shape for x in arrays(student)]
    # parameters are the weights, not the BatchNorm running statistics
    weights = sum(x.size for x in arrays(net))
    assert count_params(student) == weights < sum(x.size for x in arrays(student))
    # a later pass's teacher columns: the precomputed logits beside an archived student's
    x = jax.random.normal(jax.random.key(2), (5, 8 * 8 * 3))
    logits = np.arange(50, dtype=np.float32).reshape(5, 10)
    columns = _teacher_columns([logits, student], x)
    assert columns.shape == (5, 2, 10)
    np.testing.assert_array_equal(columns[:, 0], logits)
    np.testing.assert_allclose(columns[:, 1], jax.vmap(student)(x), rtol=1e-6)


@pytest.mark.parametrize(
    ("experiment", "needle"),
    [
        (["--smoke"], "takes no --dataset, --scenario, --data, --teacher-logits"),
        (["--experiment", "value"], "takes no --data, --teacher-logits"),
        (["--experiment", "distill"], "reads the directory given by --data DIR, and only it"),
    ],
)
def test_other_experiments_refuse_data_options(tmp_path, capsys, experiment, needle):
    from ev3core._host.cli import main

    options = ["--data", str(tmp_path), "--teacher-logits", str(tmp_path / "t.npy")]
    assert main(["run", *experiment, "--steps", "1", *options]) == 2
    err = capsys.readouterr().err
    assert needle in err and "Traceback" not in err


# ---------------------------------------------------------------------------- ev3 run
# A tiny budget: a ResNet-8 of (4, 8, 16) filters that may widen once to (8, 16, 32),
# 2 candidates (labels, one KD loss) of 3 steps on batches of 16, 6 iterations.
PIPELINE = """
pipeline = None  # the built-in pipeline, with these options
config = {
    "start_width": 4, "max_width": 32, "max_depth": 8, "patience": 1, "trajectory": 3,
    "batch_size": 16, "temperatures": (4.0,), "weights": (0.9,), "learning_rates": (1e-2,),
    "holdout": 0.25, "passes": 1,
}
"""


def _env(**extra):
    env = {k: v for k, v in os.environ.items() if not k.startswith("EV3_")}
    env.update(extra)
    return env


# Two compilations of the ResNet EV3 step (before and after growth) are most of its time: about
# 70 s of CPU time, 2 to 3 minutes on a busy two-core machine.
@pytest.mark.slow
def test_ev3_run_cifar_end_to_end(tmp_path):
    data = tmp_path / "data"
    _write(data)
    pipeline = tmp_path / "tiny.py"
    pipeline.write_text(PIPELINE)
    out = tmp_path / "run"
    steps = 6
    res = subprocess.run(
        [
            str(Path(sys.executable).parent / "ev3"),
            "run",
            "--experiment",
            "cifar",
            str(pipeline),
            "--data",
            str(data),
            "--steps",
            str(steps),
            "--out",
            str(out),
            "--no-progress",
        ],
        env=_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    for name in ("metrics.jsonl", "summary.json", "report.png", "student.eqx"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    assert list((out / "checkpoint").iterdir())
    summary = json.loads((out / "summary.json").read_text())
    assert summary["experiment"] == "cifar" and summary["dataset"] == "synthetic-cifar10"
    assert summary["data"] == str(data.resolve())
    assert summary["splits"] == {"train": 192, "assess": 26, "decide": 38, "test": 128}
    assert summary["teacher"]["kind"] == "precomputed logits"
    assert summary["teacher"]["test_accuracy"] == 1.0
    assert summary["baseline_student"] is None
    student = summary["ev3_student"]
    assert student["architecture"]["kind"] == "resnet"
    assert student["architecture"]["blocks"] == [1, 1, 1]  # ResNet-8
    assert student["candidates_per_iteration"] == 2
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in rows] == list(range(1, steps + 1))
    assert rows[0]["student_widths"] == [4, 8, 16]
    # the student grew (widened, function-preserving) and its size is recorded
    assert student["growth"], rows
    assert student["growth"][0]["op"] == "widen [4, 8, 16] -> [8, 16, 32]"
    assert student["architecture"]["widths"] == [8, 16, 32]
    assert student["params"] > student["start_params"]
    # a handful of steps on colour classes beats chance (10%) on the test split
    assert student["test_accuracy"] > 0.2, student
