"""Data sets that need no download, split into train / assess / decide / test.

- `"digits"`: scikit-learn's handwritten digits (8x8 images, 1,797 examples, shipped inside
  the scikit-learn package), pixels scaled to [0, 1].
- `"mnist1d"`: MNIST-1D (40-sample 1-D signals, 10 classes) generated offline by the `mnist1d`
  package's synthetic generator (`mnist1d.data.make_dataset`, never its download path):
  5,000 examples, the package's 4,000 / 1,000 split; the 1,000 are the test set.

Splits never overlap (`Splits.check_disjoint` proves it on the example indices).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from ev3core.errors import ConfigurationError

DATASETS = ("digits", "mnist1d")


@dataclasses.dataclass(frozen=True)
class Split:
    x: np.ndarray  # float32 [n, features]
    y: np.ndarray  # int32 [n]
    index: np.ndarray  # positions in the source data set (for overlap checks)

    def __len__(self) -> int:
        return int(self.y.shape[0])


@dataclasses.dataclass(frozen=True)
class Splits:
    """The four disjoint splits of a data set and its example shape."""

    name: str
    train: Split
    assess: Split
    decide: Split
    test: Split
    in_shape: tuple[int, ...]  # one example without channels, e.g. (8, 8) or (40,)
    num_classes: int

    @property
    def in_features(self) -> int:
        return int(np.prod(self.in_shape))

    def sizes(self) -> dict[str, int]:
        return {k: len(getattr(self, k)) for k in ("train", "assess", "decide", "test")}

    def check_disjoint(self) -> None:
        parts = [self.train.index, self.assess.index, self.decide.index, self.test.index]
        allidx = np.concatenate(parts)
        if len(np.unique(allidx)) != len(allidx):
            raise AssertionError(f"{self.name}: splits overlap")


def _split(x: np.ndarray, y: np.ndarray, index: np.ndarray) -> Split:
    return Split(x=x[index].astype(np.float32), y=y[index].astype(np.int32), index=index)


def _digits(seed: int) -> Splits:
    from sklearn.datasets import load_digits

    d = load_digits()
    x = (d.data / 16.0).astype(np.float32)
    y = d.target.astype(np.int32)
    n = len(y)
    perm = np.random.default_rng(seed).permutation(n)
    n_test, n_decide, n_assess = 360, 270, 180  # 20% / 15% / 10%; train gets the rest (987)
    test = perm[:n_test]
    decide = perm[n_test : n_test + n_decide]
    assess = perm[n_test + n_decide : n_test + n_decide + n_assess]
    train = perm[n_test + n_decide + n_assess :]
    return Splits(
        name="digits",
        train=_split(x, y, train),
        assess=_split(x, y, assess),
        decide=_split(x, y, decide),
        test=_split(x, y, test),
        in_shape=(8, 8),
        num_classes=10,
    )


def make_mnist1d(num_samples: int = 5000, seed: int = 42) -> tuple[np.ndarray, np.ndarray]:
    """MNIST-1D from the `mnist1d` package's synthetic generator (no download).

    Returns `(x, y)` in generation order; the first 80% are the package's training split.
    The generator seeds NumPy's global RNG; its previous state is restored afterwards.
    """
    from mnist1d.data import get_dataset_args, make_dataset

    args = get_dataset_args()
    args.num_samples = int(num_samples)
    args.train_split = 0.8
    args.seed = int(seed)
    saved = np.random.get_state()
    try:
        data = make_dataset(args)
    finally:
        np.random.set_state(saved)
    x = np.concatenate([data["x"], data["x_test"]]).astype(np.float32)
    y = np.concatenate([data["y"], data["y_test"]]).astype(np.int32)
    return x, y


def _mnist1d(seed: int) -> Splits:
    x, y = make_mnist1d()
    n_train_all = 4000
    test = np.arange(n_train_all, len(y))
    perm = np.random.default_rng(seed).permutation(n_train_all)
    n_decide, n_assess = 600, 400
    decide = perm[:n_decide]
    assess = perm[n_decide : n_decide + n_assess]
    train = perm[n_decide + n_assess :]  # 3,000
    return Splits(
        name="mnist1d",
        train=_split(x, y, train),
        assess=_split(x, y, assess),
        decide=_split(x, y, decide),
        test=_split(x, y, test),
        in_shape=(40,),
        num_classes=10,
    )


def load_dataset(name: str, seed: int = 0) -> Splits:
    """Load data set `name` (`"digits"` or `"mnist1d"`) split with `seed`.

    The test split of MNIST-1D is fixed (the generator's last 1,000 examples); `seed` only
    shuffles train / assess / decide. For digits `seed` shuffles all four.
    """
    if name == "digits":
        return _digits(seed)
    if name == "mnist1d":
        return _mnist1d(seed)
    raise ConfigurationError(f"Unknown dataset {name!r}; choose one of {DATASETS}.")
