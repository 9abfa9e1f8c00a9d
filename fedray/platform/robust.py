"""Robust aggregation rules over raw updates, and norm bounding. Pure NumPy; no Ray, no MLflow.

The rules are not linear (they are not sums), so they cannot be folded through aggregation tiers
or run under encryption: they need every update of the round in one ``(n, d)`` array.
"""

from __future__ import annotations

import numpy as np


def clip_to_norm(delta: np.ndarray, bound: float) -> np.ndarray:
    """``delta`` scaled down to L2 norm ``bound`` if it is longer (norm bounding)."""
    norm = float(np.linalg.norm(delta))
    return delta if norm <= bound else delta * np.float32(bound / norm)


def bucket_means(deltas: np.ndarray, size: int, rng: np.random.Generator) -> tuple[np.ndarray, list[np.ndarray]]:
    """Bucketing (Karimireddy et al. 2022): the rows in a random order, cut into buckets of ``size``
    (the last may be smaller), and each bucket's mean. Returns the means and each bucket's rows."""
    buckets = np.array_split(rng.permutation(len(deltas)), -(-len(deltas) // size))
    return np.stack([deltas[b].mean(axis=0, dtype=np.float64) for b in buckets]).astype(np.float32), buckets


def coordinate_median(deltas: np.ndarray) -> np.ndarray:
    """Coordinate-wise median of the rows of ``deltas`` (Yin et al. 2018)."""
    return np.median(deltas, axis=0).astype(np.float32)


def trimmed_mean(deltas: np.ndarray, beta: float) -> np.ndarray:
    """Coordinate-wise mean after dropping the ``floor(beta * n)`` largest and smallest values of
    each coordinate (Yin et al. 2018). ``0 <= beta < 0.5``."""
    if not 0 <= beta < 0.5:
        raise ValueError(f"trimmed mean needs 0 <= beta < 0.5, got {beta}")
    n = len(deltas)
    k = int(np.floor(beta * n))
    return np.sort(deltas, axis=0)[k:n - k].mean(axis=0, dtype=np.float64).astype(np.float32)


def trimmed_share(deltas: np.ndarray, beta: float) -> np.ndarray:
    """For each row, the fraction of coordinates at which its value lies outside the range that
    ``trimmed_mean`` keeps (values tied with the range's ends count as kept)."""
    n = len(deltas)
    k = int(np.floor(beta * n))
    ordered = np.sort(deltas, axis=0)
    outside = (deltas < ordered[k]) | (deltas > ordered[n - k - 1])
    return outside.mean(axis=1)


def krum_scores(deltas: np.ndarray, byzantine: int) -> np.ndarray:
    """Krum's score of each row: the sum of squared distances to its ``n - f - 2`` nearest other
    rows (Blanchard et al. 2017). Needs ``n > 2f + 2``."""
    n = len(deltas)
    if n <= 2 * byzantine + 2:
        raise ValueError(f"Krum needs more than 2f + 2 = {2 * byzantine + 2} updates, got {n}")
    sq = np.einsum("ij,ij->i", deltas, deltas, dtype=np.float64)
    dist = sq[:, None] + sq[None, :] - 2 * (deltas.astype(np.float64) @ deltas.T.astype(np.float64))
    np.fill_diagonal(dist, np.inf)
    nearest = np.sort(np.maximum(dist, 0), axis=1)[:, : n - byzantine - 2]
    return nearest.sum(axis=1)


def multi_krum(deltas: np.ndarray, byzantine: int, selected: int) -> tuple[np.ndarray, np.ndarray]:
    """Mean of the ``selected`` rows with the lowest Krum scores (``selected = 1`` is Krum), and
    the indices of those rows."""
    if not 1 <= selected <= len(deltas) - byzantine:
        raise ValueError(f"Multi-Krum selects 1..n - f = {len(deltas) - byzantine} updates, got {selected}")
    chosen = np.sort(np.argsort(krum_scores(deltas, byzantine), kind="stable")[:selected])
    return deltas[chosen].mean(axis=0, dtype=np.float64).astype(np.float32), chosen
