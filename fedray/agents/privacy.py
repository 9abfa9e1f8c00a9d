"""What a device does for client-level differential privacy: clip its delta and, in distributed
mode, add its own share of the noise before the update leaves it. No Ray, no I/O.

DP noise is drawn from a generator seeded by the operating system's entropy, never from the job's
seed, so nobody who knows the job can subtract it; DP runs are therefore not bit-reproducible.
"""

from __future__ import annotations

import math

import numpy as np


def clip(delta: np.ndarray, bound: float) -> np.ndarray:
    """``delta`` scaled down to L2 norm ``bound`` if it is longer."""
    norm = float(np.linalg.norm(delta))
    return delta if norm <= bound else delta * np.float32(bound / norm)


def noise(size: int, std: float, rng: np.random.Generator | None = None) -> np.ndarray:
    """Gaussian noise of ``std`` per coordinate, float32; OS-seeded unless ``rng`` is given (tests)."""
    rng = rng or np.random.default_rng()
    return rng.normal(0.0, std, size).astype(np.float32)


def share_std(noise_multiplier: float, clip_bound: float, participants: int) -> float:
    """A distributed share's std: any ``participants`` shares sum to std z C."""
    return noise_multiplier * clip_bound / math.sqrt(participants)


def privatize(delta: np.ndarray, clip_bound: float, std: float, rng: np.random.Generator | None = None) -> np.ndarray:
    """The delta a device sends: clipped to ``clip_bound``, plus its noise share of ``std`` (0: none)."""
    delta = clip(delta, clip_bound)
    return delta + noise(delta.size, std, rng) if std else delta
