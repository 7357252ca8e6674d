"""CIFAR-10/100 (or any image classification set of fixed-size uint8 images) on disk: the
layout the `cifar` experiment reads through grain, its converter, and the teacher's logits
precomputed to a file.

A data directory holds:

- `manifest.json`: `{"format": "ev3-images-1", "name": "cifar10", "shape": [32, 32, 3],
  "dtype": "uint8", "num_classes": 10, "label_bytes": 2, "splits": {"train": 50000,
  "test": 10000}}`;
- `train.array_record`, `test.array_record`: one record per example, in the split's order;
- `teacher_logits.npy`: the teacher's logits on the train split, float32
  `[train count, classes]`, and optionally `teacher_logits_test.npy`, the same on the test
  split (the teacher's test accuracy in the summary).

A record is the image's `height * width * channels` bytes (uint8, row-major
`(height, width, channels)`) followed by its label as a little-endian uint16 (2 bytes):
3,074 bytes for CIFAR. Records are decoded with `np.frombuffer` and `.npy` files are read
with `allow_pickle=False`, so a file can hold numbers only; nothing in a data directory is
ever run as code.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from ev3core.errors import ConfigurationError

from ._data import Split, Splits

FORMAT = "ev3-images-1"
MANIFEST = "manifest.json"
LABEL_BYTES = 2  # a little-endian uint16 after the pixels
TEACHER_LOGITS = "teacher_logits.npy"
_LABEL = np.dtype("<u2")


def _split_file(directory: Path, split: str) -> Path:
    return directory / f"{split}.array_record"


def _test_logits_file(path: Path) -> Path:
    """`FILE_test.npy`, the test-split counterpart of the teacher logits `FILE.npy`."""
    return path.with_name(f"{path.stem}_test{path.suffix}")


def _fix(directory: Path) -> str:
    return (
        f"Write the layout with ev3_distill.write_array_record({str(directory)!r}, split, "
        "images, labels) (see docs/distillation.md, 'The paper's experiment')."
    )


def write_array_record(
    directory: str | os.PathLike[str],
    split: str,
    images: np.ndarray,
    labels: np.ndarray,
    *,
    num_classes: int | None = None,
    name: str = "cifar",
) -> Path:
    """Write one split of an image data set in the layout the `cifar` experiment reads.

    Writes `directory/<split>.array_record` (one record per example, in the given order) and
    adds the split to `directory/manifest.json` (created on the first split; a later split
    must have the same image shape and number of classes).

    **Arguments:**

    - `directory`: the data directory (created if missing).
    - `split`: `"train"` or `"test"` (the experiment reads both).
    - `images`: uint8 `[n, height, width, channels]`, e.g. `(50000, 32, 32, 3)`.
    - `labels`: integer classes `[n]` in `[0, num_classes)`.
    - `num_classes`: default: the manifest's, else `labels.max() + 1`.
    - `name`: the data set's name in the manifest and the run's summary.

    **Returns:** the path of the written file.
    """
    from array_record.python.array_record_module import ArrayRecordWriter

    directory = Path(directory)
    images = np.asarray(images)
    labels = np.asarray(labels)
    if images.dtype != np.uint8 or images.ndim != 4:
        raise ConfigurationError(
            f"write_array_record: images must be uint8 [n, height, width, channels], got "
            f"{images.dtype} {images.shape}. Convert them with np.asarray(images, np.uint8)."
        )
    if labels.shape != images.shape[:1] or not np.issubdtype(labels.dtype, np.integer):
        raise ConfigurationError(
            f"write_array_record: labels must be integers of shape ({images.shape[0]},), got "
            f"{labels.dtype} {labels.shape}."
        )
    directory.mkdir(parents=True, exist_ok=True)
    manifest = _read_manifest(directory) if (directory / MANIFEST).is_file() else None
    if num_classes is None:
        num_classes = manifest["num_classes"] if manifest else int(labels.max()) + 1
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes or num_classes > 65535):
        raise ConfigurationError(
            f"write_array_record: labels span [{labels.min()}, {labels.max()}], outside "
            f"[0, {num_classes}) (at most 65,535 classes)."
        )
    shape = list(images.shape[1:])
    if manifest is None:
        manifest = {
            "format": FORMAT,
            "name": name,
            "shape": shape,
            "dtype": "uint8",
            "num_classes": int(num_classes),
            "label_bytes": LABEL_BYTES,
            "splits": {},
        }
    elif manifest["shape"] != shape or manifest["num_classes"] != num_classes:
        raise ConfigurationError(
            f"write_array_record: {directory} holds images of shape {manifest['shape']} with "
            f"{manifest['num_classes']} classes; split {split!r} has {shape} and "
            f"{num_classes}. Use another directory."
        )
    path = _split_file(directory, split)
    tmp = path.with_name(path.name + ".tmp")
    writer = ArrayRecordWriter(str(tmp), "group_size:1")  # group_size 1: fast random access
    try:
        for image, label in zip(images, labels.astype(_LABEL)):
            writer.write(image.tobytes() + label.tobytes())
    finally:
        writer.close()
    os.replace(tmp, path)
    manifest["splits"][split] = int(images.shape[0])
    _write_manifest(directory, manifest)
    return path


def _write_manifest(directory: Path, manifest: dict[str, Any]) -> None:
    tmp = directory / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=2))
    os.replace(tmp, directory / MANIFEST)


def _read_manifest(directory: Path) -> dict[str, Any]:
    """The checked manifest of a data directory (ConfigurationError naming the fix)."""
    if not directory.is_dir():
        raise ConfigurationError(
            f"--data {directory}: no such directory. Pass the directory holding "
            f"{MANIFEST} and the .array_record files. " + _fix(directory)
        )
    path = directory / MANIFEST
    if not path.is_file():
        raise ConfigurationError(
            f"--data {directory}: no {MANIFEST} there, so it is not an image data directory. "
            + _fix(directory)
        )
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ConfigurationError(f"{path}: not readable JSON ({exc}). " + _fix(directory)) from exc
    ok = (
        isinstance(manifest, dict)
        and manifest.get("format") == FORMAT
        and manifest.get("dtype") == "uint8"
        and manifest.get("label_bytes") == LABEL_BYTES
        and isinstance(manifest.get("shape"), list)
        and len(manifest["shape"]) == 3
        and all(isinstance(s, int) and s > 0 for s in manifest["shape"])
        and isinstance(manifest.get("num_classes"), int)
        and 2 <= manifest["num_classes"] <= 65535
        and isinstance(manifest.get("splits"), dict)
        and all(isinstance(n, int) and n >= 0 for n in manifest["splits"].values())
    )
    if not ok:
        raise ConfigurationError(
            f"{path}: not an {FORMAT!r} manifest (format, shape [height, width, channels], "
            "dtype 'uint8', num_classes >= 2, label_bytes 2, splits {name: count}). "
            + _fix(directory)
        )
    return manifest


def read_split(
    directory: str | os.PathLike[str], split: str, *, batch_size: int = 1024
) -> tuple[np.ndarray, np.ndarray]:
    """Read one split of a data directory through grain (`ArrayRecordDataSource`).

    Every record is checked (its size, its label) and the count against the manifest; a
    problem is a `ConfigurationError` naming the file, the record and the fix.

    **Arguments:**

    - `directory`: the data directory (see the module docstring for its layout).
    - `split`: `"train"` or `"test"`.
    - `batch_size`: records decoded per grain batch.

    **Returns:** `(images, labels)`: uint8 `[n, height, width, channels]` and int32 `[n]`.
    """
    import grain

    directory = Path(directory)
    manifest = _read_manifest(directory)
    path = _split_file(directory, split)
    if split not in manifest["splits"] or not path.is_file():
        raise ConfigurationError(
            f"--data {directory}: the {split!r} split is missing (manifest splits: "
            f"{sorted(manifest['splits'])}; {path.name} "
            f"{'exists' if path.is_file() else 'does not exist'}). " + _fix(directory)
        )
    shape = tuple(manifest["shape"])
    pixels = int(np.prod(shape))
    size = pixels + LABEL_BYTES
    classes = manifest["num_classes"]
    source = grain.sources.ArrayRecordDataSource([str(path)])
    count = len(source)
    if count != manifest["splits"][split]:
        raise ConfigurationError(
            f"{path}: {count} records, but {MANIFEST} says {manifest['splits'][split]}. The "
            "directory is incomplete or was edited; write the split again. " + _fix(directory)
        )

    def read(start: int) -> tuple[np.ndarray, np.ndarray]:
        """Records `start, ..., start + batch_size - 1`, read at once and decoded."""
        records = source.__getitems__(list(range(start, min(start + batch_size, count))))
        for i, record in enumerate(records):
            if len(record) != size:
                raise ConfigurationError(
                    f"{path}: record {start + i} has {len(record)} bytes; a {list(shape)} uint8 "
                    f"image and a {LABEL_BYTES}-byte label take {size}. The file does not "
                    f"match {MANIFEST}; write the split again. " + _fix(directory)
                )
        rows = np.frombuffer(b"".join(records), np.uint8).reshape(len(records), size)
        labels = rows[:, pixels:].copy().view(_LABEL)[:, 0].astype(np.int32)
        bad = np.flatnonzero(labels >= classes)
        if bad.size:
            raise ConfigurationError(
                f"{path}: record {start + int(bad[0])} has label {int(labels[bad[0]])}, but the "
                f"manifest has {classes} classes. Write the split again. " + _fix(directory)
            )
        return rows[:, :pixels].reshape(len(records), *shape), labels

    # One grain element per batch of records: a batched read is ~15 times faster than
    # reading the records one by one (CIFAR's 50,000 in about a second).
    dataset = grain.MapDataset.range(0, count, batch_size).map(read)
    images = np.empty((count, *shape), np.uint8)
    labels = np.empty((count,), np.int32)
    for i, (xs, ys) in enumerate(dataset):
        images[i * batch_size : i * batch_size + len(ys)] = xs
        labels[i * batch_size : i * batch_size + len(ys)] = ys
    return images, labels


def _standardise(images: np.ndarray, mean: np.ndarray, std: np.ndarray) -> np.ndarray:
    x = (images.astype(np.float32) / 255.0 - mean) / std
    return x.reshape(len(images), -1)


def load_cifar(directory: str | os.PathLike[str], seed: int = 0, holdout: float = 0.1) -> Splits:
    """The four splits of an image data directory, read through grain.

    The directory's train split is shuffled with `seed`; its first `holdout` fraction is held
    out, 40% of it as the assess split and 60% as the decide split, and the rest is the
    train (propose) split. The test split is the directory's `test` split: it is reported,
    never used to select. Pixels are scaled to `[0, 1]` and standardised per channel with the
    mean and standard deviation of the directory's whole train split, and flattened (the
    ResNet reshapes them to `Splits.in_shape`). `Split.index` is the position in the
    directory's train split (test examples: the train count plus their position).

    **Arguments:**

    - `directory`: the data directory (see `write_array_record`).
    - `seed`: shuffles the train split before the hold-out is taken.
    - `holdout`: fraction of the train split held out for assess and decide.
    """
    directory = Path(directory)
    manifest = _read_manifest(directory)
    if not 0.0 < holdout < 1.0:
        raise ConfigurationError(f"holdout={holdout}: must be in (0, 1), e.g. 0.1.")
    train_images, train_labels = read_split(directory, "train")
    test_images, test_labels = read_split(directory, "test")
    n = len(train_labels)
    n_hold = int(round(holdout * n))
    n_assess = int(round(0.4 * n_hold))
    if n_assess < 1 or n_hold - n_assess < 1 or n - n_hold < 1 or len(test_labels) < 1:
        raise ConfigurationError(
            f"--data {directory}: {n} train and {len(test_labels)} test examples with "
            f"holdout={holdout} leave an empty split; every split needs at least one example."
        )
    pixels = train_images.reshape(-1, train_images.shape[-1]).astype(np.float64) / 255.0
    mean = pixels.mean(axis=0).astype(np.float32)
    std = np.maximum(pixels.std(axis=0), 1e-3).astype(np.float32)
    x = _standardise(train_images, mean, std)
    perm = np.random.default_rng(seed).permutation(n)

    def part(index: np.ndarray) -> Split:
        return Split(x=x[index], y=train_labels[index], index=index)

    return Splits(
        name=str(manifest.get("name", "cifar")),
        train=part(perm[n_hold:]),
        assess=part(perm[:n_assess]),
        decide=part(perm[n_assess:n_hold]),
        test=Split(
            x=_standardise(test_images, mean, std),
            y=test_labels,
            index=n + np.arange(len(test_labels)),
        ),
        in_shape=tuple(manifest["shape"]),
        num_classes=int(manifest["num_classes"]),
    )


def read_teacher_logits(
    path: str | os.PathLike[str], count: int, num_classes: int, *, split: str = "train"
) -> np.ndarray:
    """Precomputed teacher logits `[count, num_classes]` (float32), read without pickle.

    A missing file, another shape or non-finite values are a `ConfigurationError` naming the
    fix (`write_teacher_logits`).
    """
    path = Path(path)
    fix = (
        "Compute them with ev3_distill.write_teacher_logits(DATA_DIR, teacher), or pass "
        "--teacher-logits FILE (see docs/distillation.md, 'The paper's experiment')."
    )
    if not path.is_file():
        raise ConfigurationError(f"teacher logits {path}: no such file. " + fix)
    try:
        logits = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise ConfigurationError(
            f"teacher logits {path}: not a readable .npy array of numbers ({exc}). " + fix
        ) from exc
    if logits.shape != (count, num_classes) or not np.issubdtype(logits.dtype, np.floating):
        raise ConfigurationError(
            f"teacher logits {path}: {logits.dtype} {logits.shape}, but the {split} split has "
            f"{count} examples of {num_classes} classes, so float [{count}, {num_classes}] is "
            "needed; they were computed for another data set or split. " + fix
        )
    if not np.all(np.isfinite(logits)):
        raise ConfigurationError(f"teacher logits {path}: non-finite values. " + fix)
    return logits.astype(np.float32)


def write_teacher_logits(
    directory: str | os.PathLike[str],
    teacher: Callable[[np.ndarray], Any],
    *,
    batch_size: int = 500,
) -> Path:
    """Precompute a teacher's logits on a data directory's splits, once, before EV3 runs.

    Writes `teacher_logits.npy` (the train split, in its order: what the propose batches
    carry) and, when the directory has a test split, `teacher_logits_test.npy` (the teacher's
    test accuracy in the run's summary), float32 `[count, classes]`.

    **Arguments:**

    - `directory`: the data directory (see `write_array_record`).
    - `teacher`: maps a batch of uint8 images `[b, height, width, channels]`, as stored, to
      logits `[b, classes]` (any array type NumPy can read: a jitted JAX model, a wrapped
      model of another framework); it does its own preprocessing.
    - `batch_size`: images per call.

    **Returns:** the path of `teacher_logits.npy`.
    """
    directory = Path(directory)
    manifest = _read_manifest(directory)
    path = directory / TEACHER_LOGITS
    for split, target in (("train", path), ("test", _test_logits_file(path))):
        if split == "test" and "test" not in manifest["splits"]:
            break
        images, _ = read_split(directory, split)
        parts = [
            np.asarray(teacher(images[i : i + batch_size]), np.float32)
            for i in range(0, len(images), batch_size)
        ]
        logits = np.concatenate(parts) if parts else np.zeros((0, manifest["num_classes"]))
        if logits.shape != (len(images), manifest["num_classes"]):
            raise ConfigurationError(
                f"write_teacher_logits: the teacher returned {logits.shape} logits for "
                f"{len(images)} images of {manifest['num_classes']} classes."
            )
        np.save(target, logits.astype(np.float32), allow_pickle=False)
    return path


def teacher_from_logits(
    directory: str | os.PathLike[str], path: str | os.PathLike[str] | None, splits: Splits
) -> tuple[np.ndarray, dict[str, Any]]:
    """The teacher's logits on `splits.train` (rows of the train file's logits at
    `splits.train.index`) and the teacher's record for the summary."""
    directory = Path(directory)
    manifest = _read_manifest(directory)
    path = directory / TEACHER_LOGITS if path is None else Path(path)
    n_train = int(manifest["splits"]["train"])
    logits = read_teacher_logits(path, n_train, splits.num_classes)
    mine = logits[splits.train.index]
    info: dict[str, Any] = {
        "kind": "precomputed logits",
        "file": str(path),
        "train_accuracy": float(np.mean(np.argmax(mine, axis=-1) == splits.train.y)),
        "test_accuracy": None,
        "params": None,
        "wall_seconds": 0.0,
    }
    test_path = _test_logits_file(path)
    if test_path.is_file():
        test = read_teacher_logits(test_path, len(splits.test), splits.num_classes, split="test")
        info["test_file"] = str(test_path)
        info["test_accuracy"] = float(np.mean(np.argmax(test, axis=-1) == splits.test.y))
    return mine, info
