"""Partitioners: split sample indices over devices, deterministically given a seed.

Each returns a list with one int64 index array per device. No Ray, no I/O.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from fedray.config import DataSpec
from fedray.data.datasets import cluster_centers
from fedray.data.devices import Generated, Shards

MIN_SAMPLES = 2  # every device gets at least this many samples (one to train, one to test)
_MAX_DRAWS = 100


def iid(num_samples: int, num_devices: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Shuffle, then split into ``num_devices`` parts whose sizes differ by at most one."""
    _check_enough(num_samples, num_devices)
    return [np.sort(part) for part in np.array_split(rng.permutation(num_samples), num_devices)]


def dirichlet(labels: np.ndarray, num_devices: int, alpha: float, rng: np.random.Generator) -> list[np.ndarray]:
    """Label skew: each class's samples are split over devices in proportions drawn from Dir(alpha).

    Smaller ``alpha`` gives each device fewer classes. Draws again (up to 100 times) until every
    device holds at least ``MIN_SAMPLES`` samples, and raises ValueError if that never happens.
    """
    _check_enough(len(labels), num_devices)
    by_class = [rng.permutation(np.flatnonzero(labels == c)) for c in np.unique(labels)]
    for _ in range(_MAX_DRAWS):
        parts: list[list[np.ndarray]] = [[] for _ in range(num_devices)]
        for idx in by_class:
            cuts = (np.cumsum(rng.dirichlet(np.full(num_devices, alpha))) * len(idx)).astype(int)[:-1]
            for device, chunk in enumerate(np.split(idx, cuts)):
                parts[device].append(chunk)
        result = [np.sort(np.concatenate(p)) for p in parts]
        if min(len(p) for p in result) >= MIN_SAMPLES:
            return result
    raise ValueError(f"dirichlet alpha={alpha} left a device with fewer than {MIN_SAMPLES} samples in "
                     f"{_MAX_DRAWS} draws; use a larger alpha or fewer devices")


def shards(labels: np.ndarray, num_devices: int, labels_per_device: int,
           rng: np.random.Generator) -> list[np.ndarray]:
    """Pathological non-IID (FedAvg paper): sort by label, cut into ``num_devices * labels_per_device``
    equal shards, and give each device ``labels_per_device`` random shards."""
    _check_enough(len(labels), num_devices)
    num_shards = num_devices * labels_per_device
    if num_shards > len(labels):
        raise ValueError(f"{len(labels)} samples are too few for {num_devices} devices x "
                         f"{labels_per_device} shards")
    order = np.argsort(labels, kind="stable")
    pieces = np.array_split(order, num_shards)
    assignment = rng.permutation(num_shards).reshape(num_devices, labels_per_device)
    return [np.sort(np.concatenate([pieces[s] for s in row])) for row in assignment]


def quantity_skew(num_samples: int, num_devices: int, beta: float, rng: np.random.Generator) -> list[np.ndarray]:
    """Size skew with IID labels: device sizes are proportional to a Dir(beta) draw, each at least
    ``MIN_SAMPLES``. Smaller ``beta`` makes sizes more unequal."""
    _check_enough(num_samples, num_devices)
    spare = num_samples - MIN_SAMPLES * num_devices
    sizes = MIN_SAMPLES + np.floor(rng.dirichlet(np.full(num_devices, beta)) * spare).astype(int)
    sizes[: num_samples - sizes.sum()] += 1  # hand out what flooring left over
    return [np.sort(part) for part in np.split(rng.permutation(num_samples), np.cumsum(sizes)[:-1])]


def test_count(samples: int, test_fraction: float) -> int:
    """How many of a device's ``samples`` test: with ``test_fraction > 0`` at least one, and the
    train part always keeps at least one."""
    n_test = int(round(samples * test_fraction))
    return min(max(n_test, 1), samples - 1) if test_fraction > 0 else n_test


def train_test_split(indices: np.ndarray, test_fraction: float, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Split one device's indices into (train, test), ``test_count`` of them testing."""
    n_test = test_count(len(indices), test_fraction)
    shuffled = rng.permutation(indices)
    return np.sort(shuffled[n_test:]), np.sort(shuffled[:n_test])


def _check_enough(num_samples: int, num_devices: int) -> None:
    if num_samples < MIN_SAMPLES * num_devices:
        raise ValueError(f"{num_samples} samples are too few for {num_devices} devices "
                         f"(each needs at least {MIN_SAMPLES})")


@dataclass(frozen=True)
class Split:
    """Sample indices of the server's held-out test set and of each device's train and test parts;
    or, for generated devices (``data.synthetic.per_device``), no parts and their ``generated``."""

    holdout: np.ndarray
    train: list[np.ndarray]
    test: list[np.ndarray]
    generated: Generated | None = None
    reference: np.ndarray | None = None  # peers' distillation: public samples, their labels unused

    def with_reference(self, size: int, seed: int) -> Split:
        """This split with ``size`` samples of the held-out set, drawn from ``seed``, set aside as
        the public reference set."""
        if size >= len(self.holdout):
            raise ValueError(f"the public reference set of {size} samples needs more than the {len(self.holdout)} "
                             "held-out samples (data.holdout)")
        chosen = np.random.default_rng([seed, 8]).permutation(len(self.holdout))
        return replace(self, holdout=np.sort(self.holdout[chosen[size:]]), reference=np.sort(self.holdout[chosen[:size]]))

    @property
    def train_sizes(self) -> np.ndarray:
        """Each device's number of training samples."""
        if self.generated is not None:
            return np.full(len(self.generated.devices), self.generated.train)
        return np.array([len(t) for t in self.train], dtype=np.int64)

    def of(self, devices: np.ndarray) -> Shards | Generated:
        """What a worker of ``devices`` (sorted ids) needs to produce their samples."""
        if self.generated is not None:
            return replace(self.generated, devices=np.asarray(devices))
        return Shards(np.asarray(devices), [self.train[d] for d in devices], [self.test[d] for d in devices])


def split(labels: np.ndarray, spec: DataSpec, num_devices: int, seed: int) -> Split:
    """Hold out ``spec.holdout`` of the samples for the server, partition the rest over devices with
    ``spec.partition``, and split each device's part by ``spec.test_fraction``. Deterministic in ``seed``."""
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(labels))
    n_holdout = int(round(len(labels) * spec.holdout))
    holdout, pool = np.sort(order[:n_holdout]), order[n_holdout:]
    p = spec.partition
    if spec.dataset == "synthetic" and (n := spec.synthetic.per_device) is not None:  # drawn by each device
        centers = cluster_centers(spec.synthetic.shape, spec.synthetic.classes, np.random.default_rng(seed))
        n_test = test_count(n, spec.test_fraction)
        return Split(holdout, [], [], Generated(np.arange(num_devices), centers, spec.synthetic.noise, n - n_test,
                                                n_test, p.alpha if p.kind == "dirichlet" else None, seed))
    if p.kind == "iid":
        parts = iid(len(pool), num_devices, rng)
    elif p.kind == "dirichlet":
        parts = dirichlet(labels[pool], num_devices, p.alpha, rng)
    elif p.kind == "shards":
        parts = shards(labels[pool], num_devices, p.labels_per_device, rng)
    else:
        parts = quantity_skew(len(pool), num_devices, p.beta, rng)
    train, test = zip(*(train_test_split(pool[part], spec.test_fraction, rng) for part in parts))
    return Split(holdout, list(train), list(test))
