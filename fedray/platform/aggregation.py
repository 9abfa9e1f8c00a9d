"""Partial: the associative running sum that every aggregation tier folds updates into."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class Partial:
    """Weighted sum of deltas, sum of weights and number of updates folded in.

    Partials from disjoint sets of devices merge by addition, so devices -> edge -> cloud is the
    same fold at every tier. ``add`` and ``merge`` accumulate in place.
    """

    weighted_sum: np.ndarray
    weight: float = 0.0
    count: int = 0

    @classmethod
    def zeros(cls, size: int) -> Partial:
        return cls(np.zeros(size, dtype=np.float32))

    def add(self, delta: np.ndarray, weight: float) -> None:
        if weight <= 0:
            raise ValueError(f"update weight must be > 0, got {weight}")
        self.weighted_sum += np.float32(weight) * delta
        self.weight += weight
        self.count += 1

    def merge(self, other: Partial) -> None:
        self.weighted_sum += other.weighted_sum
        self.weight += other.weight
        self.count += other.count

    def mean(self) -> np.ndarray:
        """The weighted mean delta. Raises ValueError on an empty Partial."""
        if self.count == 0:
            raise ValueError("cannot take the mean of an empty aggregate")
        return self.weighted_sum / np.float32(self.weight)
