"""Where a device's samples come from, on the worker that trains it.

``Shards``: index arrays into the job's shared arrays (a real dataset partitioned over devices).
``Generated``: synthetic samples drawn from the device's own seed each time it trains, so a run can
have millions of virtual devices and hold data only for those training now. Both answer
``samples(device, data)`` with the device's (train, test) arrays. No Ray, no I/O.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

Arrays = tuple[np.ndarray, np.ndarray]


@dataclass(frozen=True)
class Shards:
    """Devices ``devices``: device ``devices[i]`` holds the samples ``train[i]`` and ``test[i]`` of
    the shared ``data``."""

    devices: np.ndarray
    train: list[np.ndarray]
    test: list[np.ndarray]

    def samples(self, device: int, data: Arrays) -> tuple[Arrays, Arrays]:
        i = int(np.searchsorted(self.devices, device))
        (x, y), train, test = data, self.train[i], self.test[i]
        return (x[train], y[train]), (x[test], y[test])


@dataclass(frozen=True)
class Generated:
    """Devices ``devices``, each with ``train + test`` samples of the seeded Gaussian class clusters
    (``datasets.synthetic``'s, same ``centers``), drawn from the device's seed: labels uniform, or
    from class proportions ~ Dir(``alpha``) per device (label skew)."""

    devices: np.ndarray
    centers: np.ndarray
    noise: float
    train: int
    test: int
    alpha: float | None
    seed: int

    def samples(self, device: int, data: Arrays | None = None) -> tuple[Arrays, Arrays]:
        rng = np.random.default_rng([self.seed, 7, device])
        classes, n = len(self.centers), self.train + self.test
        p = None if self.alpha is None else rng.dirichlet(np.full(classes, self.alpha))
        y = rng.choice(classes, n, p=p)
        x = self.centers[y] + np.float32(self.noise) * rng.standard_normal((n, *self.centers.shape[1:]),
                                                                            dtype=np.float32)
        return (x[:self.train], y[:self.train]), (x[self.train:], y[self.train:])
