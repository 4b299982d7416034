"""CIFAR-10 in the official python-batches layout: find, read, validate, split.

Only numpy here, so the serving tests and `evaluate` can read the data without TensorFlow.
"""

from __future__ import annotations

import os
import pickle
from dataclasses import dataclass
from pathlib import Path

import numpy as np

CLASS_NAMES: tuple[str, ...] = (
    "airplane", "automobile", "bird", "cat", "deer",
    "dog", "frog", "horse", "ship", "truck",
)
TRAIN_FILES = tuple(f"data_batch_{i}" for i in range(1, 6))
TEST_FILE = "test_batch"
ROWS_PER_BATCH = 10_000
# ../shared/data/README.md: test rows 0..1016 are bit-exact copies of the official pixels;
# the rest were rebuilt from JPEG copies. Accuracy is reported on both.
BIT_EXACT_TEST_ROWS = 1017


class DatasetError(RuntimeError):
    """The CIFAR-10 directory is missing, partial or corrupt."""


@dataclass(frozen=True)
class Split:
    images: np.ndarray  # (N, 32, 32, 3) uint8, NHWC
    labels: np.ndarray  # (N,) int64 in 0..9

    def __len__(self) -> int:
        return len(self.labels)

    def take(self, indices: np.ndarray | slice) -> "Split":
        return Split(self.images[indices], self.labels[indices])


def default_data_dir() -> Path | None:
    """CIFAR10_DIR, else the project's shared copy beside the checkout, else None."""
    env = os.environ.get("CIFAR10_DIR")
    if env:
        return Path(env)
    repo_root = Path(__file__).resolve().parent.parent
    shared = repo_root.parent / "shared" / "data" / "cifar-10-batches-py"
    return shared if shared.is_dir() else None


def resolve_data_dir(data_dir: str | os.PathLike | None = None, allow_download: bool = True) -> Path:
    """The directory to read: the argument, the defaults above, or Keras's download cache."""
    if data_dir is not None:
        return Path(data_dir)
    found = default_data_dir()
    if found is not None:
        return found
    if allow_download:
        try:  # Only for users who are online; keras is a training dependency.
            from keras.utils import get_file

            archive = get_file(
                "cifar-10-batches-py",
                origin="https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
                untar=True,
            )
            return Path(archive)
        except Exception as exc:  # noqa: BLE001 - any failure becomes one clear message
            raise DatasetError(
                "no CIFAR-10 data: pass --data-dir, set CIFAR10_DIR, or place it at "
                f"../shared/data/cifar-10-batches-py (download failed: {exc})"
            ) from exc
    raise DatasetError("no CIFAR-10 data: pass --data-dir or set CIFAR10_DIR")


def data_dir_or_exit(data_dir: str | None, allow_download: bool = False) -> Path:
    """For command-line entry points: the data directory, or exit 2 with the reason."""
    try:
        return resolve_data_dir(data_dir, allow_download)
    except DatasetError as exc:
        raise SystemExit(f"error: {exc}") from None


def read_batch(path: Path) -> Split:
    """One pickled batch, validated: shapes, dtype, label range."""
    if not path.is_file():
        raise DatasetError(f"missing CIFAR-10 batch file: {path}")
    try:
        with open(path, "rb") as f:
            # The official format is a pickle; these are data files we chose to read,
            # never models (the serving side never unpickles anything).
            raw = pickle.load(f, encoding="bytes")
    except Exception as exc:  # noqa: BLE001
        raise DatasetError(f"corrupt CIFAR-10 batch {path}: {exc}") from exc
    if not isinstance(raw, dict) or b"data" not in raw or b"labels" not in raw:
        raise DatasetError(f"corrupt CIFAR-10 batch {path}: expected a dict with b'data' and b'labels'")
    data = np.asarray(raw[b"data"])
    labels = np.asarray(raw[b"labels"], dtype=np.int64)
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        raise DatasetError(f"corrupt CIFAR-10 batch {path}: data is {data.dtype}{data.shape}, expected uint8 (N, 3072)")
    if labels.shape != (data.shape[0],):
        raise DatasetError(f"corrupt CIFAR-10 batch {path}: {labels.shape[0]} labels for {data.shape[0]} images")
    if labels.size and (labels.min() < 0 or labels.max() > 9):
        raise DatasetError(f"corrupt CIFAR-10 batch {path}: labels outside 0..9")
    # Stored as 1024 R, 1024 G, 1024 B per row, row-major: to NHWC.
    images = data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    return Split(np.ascontiguousarray(images), labels)


def _check_complete(split: Split, name: str, per_class_min: int) -> None:
    counts = np.bincount(split.labels, minlength=10)
    if counts.min() < per_class_min:
        raise DatasetError(
            f"partial CIFAR-10 {name} set: per-class counts {counts.tolist()}, expected at least {per_class_min} each"
        )


def load_train(data_dir: Path) -> Split:
    parts = [read_batch(Path(data_dir) / name) for name in TRAIN_FILES]
    for name, part in zip(TRAIN_FILES, parts):
        if len(part) != ROWS_PER_BATCH:
            raise DatasetError(f"partial CIFAR-10 batch {name}: {len(part)} rows, expected {ROWS_PER_BATCH}")
    split = Split(np.concatenate([p.images for p in parts]), np.concatenate([p.labels for p in parts]))
    _check_complete(split, "training", per_class_min=4_500)
    return split


def load_test(data_dir: Path) -> Split:
    split = read_batch(Path(data_dir) / TEST_FILE)
    if len(split) != ROWS_PER_BATCH:
        raise DatasetError(f"partial CIFAR-10 test batch: {len(split)} rows, expected {ROWS_PER_BATCH}")
    _check_complete(split, "test", per_class_min=1_000)
    return split


def train_validation_split(train: Split, validation_size: int, seed: int) -> tuple[Split, Split]:
    """A seeded, stratified hold-out from the training batches (never from test_batch)."""
    rng = np.random.default_rng(seed)
    per_class = validation_size // 10
    val_idx = np.concatenate(
        [rng.permutation(np.flatnonzero(train.labels == c))[:per_class] for c in range(10)]
    )
    mask = np.ones(len(train), dtype=bool)
    mask[val_idx] = False
    return train.take(np.flatnonzero(mask)), train.take(np.sort(val_idx))
