"""The server side of client-level differential privacy (DP-FedAvg): Poisson sampling, the
release of a round's sum (central noise, fixed denominator) and the epsilon ledger (Opacus
accountants). The device side (clipping, noise shares) is ``fedray.agents.privacy``. No Ray, no I/O.
"""

from __future__ import annotations

import warnings

import numpy as np
from opacus.accountants import create_accountant

from fedray.agents.privacy import noise
from fedray.config import JobSpec
from fedray.config.privacy import expected_participants, sampling_rate
from fedray.platform.aggregation import Partial

ACCOUNTANTS = ("rdp", "prv")


def poisson_sample(rng: np.random.Generator, count: int, rate: float) -> np.ndarray:
    """Each of ``count`` devices independently with probability ``rate``: a round of random size."""
    return np.flatnonzero(rng.random(count) < rate)


def release(partial: Partial, job: JobSpec, rng: np.random.Generator | None = None) -> Partial:
    """The Partial the server steps on: the sum of clipped deltas (plus central noise of std z C,
    unless the devices added shares), over the fixed denominator q N."""
    privacy = job.privacy
    total = partial.weighted_sum
    if privacy.mode == "central":
        total = total + noise(total.size, privacy.noise_multiplier * privacy.clip, rng)  # OS-seeded by default
    expected = expected_participants(job)
    return Partial(total, expected, expected, partial.count)


class Ledger:
    """The run's privacy spend: one Gaussian mechanism (z, q) per round, composed by an Opacus
    accountant (``rdp`` or ``prv``)."""

    def __init__(self, noise_multiplier: float, rate: float, delta: float, kind: str = "rdp") -> None:
        self.noise_multiplier, self.rate, self.delta, self.kind = noise_multiplier, rate, delta, kind
        self.rounds = 0

    @classmethod
    def of(cls, job: JobSpec, kind: str | None = None) -> Ledger:
        privacy = job.privacy
        return cls(privacy.noise_multiplier, sampling_rate(job), privacy.delta, kind or privacy.accountant)

    def step(self) -> None:
        self.rounds += 1

    def epsilon(self, rounds: int | None = None) -> float:
        """Epsilon at ``delta`` after ``rounds`` rounds (default: those stepped)."""
        rounds = self.rounds if rounds is None else rounds
        if rounds == 0:
            return 0.0
        accountant = create_accountant(self.kind)
        accountant.history = [(self.noise_multiplier, self.rate, rounds)]
        with warnings.catch_warnings():  # RDP at very high noise: "optimal order is the largest alpha";
            warnings.simplefilter("ignore", UserWarning)  # the bound holds, only looser
            return float(accountant.get_epsilon(delta=self.delta))

    def affordable(self, budget: float, limit: int = 100_000) -> int:
        """The most rounds whose epsilon stays within ``budget`` (at most ``limit``)."""
        high = 1
        while self.epsilon(high) <= budget:
            if high >= limit:
                return limit
            high *= 2
        low = high // 2  # epsilon(low) <= budget < epsilon(high)
        while high - low > 1:
            middle = (low + high) // 2
            low, high = (middle, high) if self.epsilon(middle) <= budget else (low, middle)
        return low
