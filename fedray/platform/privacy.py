"""The server side of differential privacy. Client level (DP-FedAvg): Poisson sampling, the
release of a round's sum (central noise, fixed denominator) and the epsilon ledger. Sample level
(DP-SGD on the devices): the model check, the per-device plan and the report. The device side
(clipping, noise shares, device accountants) is ``fedray.agents.privacy``. No Ray, no I/O.
"""

from __future__ import annotations

import math

import numpy as np

from fedray.agents.heterogeneity import planned_steps
from fedray.agents.privacy import Mechanism, compose, epsilon, noise, sample_mechanism, sgd_noise
from fedray.config import JobSpec
from fedray.config.privacy import (count_noise, delta_noise_multiplier, expected_participants, min_participants,
                                   sampling_rate)
from fedray.platform.aggregation import Partial

ACCOUNTANTS = ("rdp", "prv")


def poisson_sample(rng: np.random.Generator, count: int, rate: float) -> np.ndarray:
    """Each of ``count`` devices independently with probability ``rate``: a round of random size."""
    return np.flatnonzero(rng.random(count) < rate)


def release(partial: Partial, job: JobSpec, clip: float, rng: np.random.Generator | None = None,
            ) -> tuple[Partial, float | None]:
    """The Partial the server steps on: the sum of deltas clipped to ``clip`` (plus central noise
    of std z C, unless the devices added shares), over the fixed denominator q N. With adaptive
    clipping, also the noised fraction of devices within the bound (else None): the sum of the
    centred indicators (+-1/2) plus noise of std sigma_b, over q N, plus 1/2; the deltas' noise
    multiplier is then lowered so that the two releases are accounted as z together."""
    privacy = job.privacy
    total, below = partial.weighted_sum, partial.below_clip
    if privacy.mode == "central":  # OS-seeded noise by default
        total = total + noise(total.size, delta_noise_multiplier(job) * clip, rng)
        if privacy.adaptive_clip is not None:
            below += float(noise(1, count_noise(job), rng)[0])
    expected = expected_participants(job)
    fraction = None if privacy.adaptive_clip is None else below / expected + 0.5  # the indicators are centred
    return Partial(total, expected, expected, partial.count), fraction


def next_clip(job: JobSpec, clip: float, fraction: float) -> float:
    """Adaptive clipping's geometric step: ``C exp(-lr (b - target_quantile))``."""
    adaptive = job.privacy.adaptive_clip
    return clip * math.exp(-adaptive.lr * (fraction - adaptive.target_quantile))


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
        return epsilon(self.kind, [(self.noise_multiplier, self.rate, rounds)], self.delta)

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


def budget_stop(job: JobSpec, ledger: Ledger | None, device_epsilon: dict[int, tuple[float, float]], r: int,
                ) -> str | None:
    """Why round ``r`` must not run under ``privacy.budget``, or None. Client level: the round
    would bring the ``ledger`` past the budget. Sample level: a device that has trained would pass
    it if sampled again (``device_epsilon``: each device's spent and next epsilon; devices also
    refuse such a round themselves)."""
    budget = job.privacy and job.privacy.budget
    if not budget:
        return None
    if ledger is not None and (spent := ledger.epsilon(ledger.rounds + 1)) > budget.epsilon:
        return (f"privacy budget: round {r} would bring epsilon to {spent:.3f}, over privacy.budget.epsilon "
                f"{budget.epsilon:g}")
    over = {d: after for d, (_, after) in device_epsilon.items() if after > budget.epsilon}
    if not over:
        return None
    d = max(over, key=over.get)
    return (f"privacy budget: before round {r}, device {d} would reach epsilon {over[d]:.3f} in its next round, over "
            f"privacy.budget.epsilon {budget.epsilon:g} ({len(over)} devices would)")


def client_report(job: JobSpec, ledger: Ledger, clip: float) -> dict:
    """The privacy report of a client-level run: the mechanism, its parameters and the epsilon its
    ``ledger`` spent by each accountant; ``clip`` is the last bound (adaptive clipping moves it)."""
    spec = job.privacy
    return {"level": "client", "algorithm": "DP-FedAvg (McMahan et al. 2018), Gaussian mechanism",
            "mode": spec.mode, "clip": spec.clip, "noise_multiplier": spec.noise_multiplier,
            "adaptive_clip": spec.adaptive_clip and spec.adaptive_clip.model_dump() | {
                "count_noise": count_noise(job), "delta_noise_multiplier": delta_noise_multiplier(job),
                "last_clip": clip},
            "sampling": "poisson", "sampling_rate": ledger.rate, "denominator": expected_participants(job),
            "min_participants": min_participants(job), "rounds": ledger.rounds, "delta": spec.delta,
            "accountant": spec.accountant,
            "epsilon": {kind: Ledger.of(job, kind).epsilon(ledger.rounds) for kind in ACCOUNTANTS},
            "budget": spec.budget.epsilon if spec.budget else None}


def check_model(model, x: np.ndarray, y: np.ndarray) -> None:
    """Refuse a model DP-SGD cannot clip: one whose layers mix a batch's samples (BatchNorm), or
    whose per-sample clipping would miss a gradient on the real batch ``(x, y)`` (``dpsgd.check``).
    Raises ValueError naming the layer or parameter."""
    import torch
    from opacus.validators import ModuleValidator

    from fedray.agents.dpsgd import check

    errors = ModuleValidator.validate(model, strict=False)
    if errors:
        reasons = "; ".join(str(e).split(". ")[0] for e in errors[:3])
        raise ValueError(f"privacy.level sample: DP-SGD cannot train this model: {reasons}. Replace BatchNorm with "
                         "GroupNorm (or LayerNorm/InstanceNorm), which normalize each sample on its own")
    check(model, torch.from_numpy(x), torch.from_numpy(y))


def sample_plan(job: JobSpec, train_sizes: list[int]) -> list[tuple[float, float, int]]:
    """Each device's DP-SGD (noise multiplier, batch sampling rate, planned steps per training)."""
    return [(*sgd_noise(job, n, planned_steps(job, n)), planned_steps(job, n)) for n in train_sizes]


class DeviceLedger:
    """Sample-level DP: every device's spend, kept by the run (not by the worker hosting the device,
    whose death or replacement would lose it). A device is charged when it is sent the model, with
    the mechanism it will run (``sample_mechanism``), so a device whose update is lost, late or
    rejected has still spent; the device is given its history with the task and keeps its own
    accountant from it. ``told`` takes what devices report: the view of a device is the larger.
    A device's spend never goes down."""

    def __init__(self, job: JobSpec, train_sizes: list[int]) -> None:
        self._job, self._sizes = job, train_sizes
        self._per_round = job.topology.edge_rounds if job.topology is not None else 1  # trainings per round
        self.history: dict[int, list[Mechanism]] = {}
        self._view: dict[int, tuple[float, float]] = {}  # device -> (spent, after one more round), cached
        self.changed: set[int] = set()  # devices charged or told since the last checkpoint

    def charge(self, device: int, round: int) -> list[Mechanism]:
        """Charge ``device`` for training in ``round``; its history before the charge."""
        before = self.history.get(device, [])
        mechanism = sample_mechanism(self._job, self._sizes[device], round, device)
        after = compose(before, mechanism)
        planned = (*mechanism[:2], planned_steps(self._job, self._sizes[device]) * self._per_round)
        kind, delta = self._job.privacy.accountant, self._job.privacy.delta
        spent, told = epsilon(kind, after, delta), self._view.get(device, (0.0, 0.0))
        self.history[device] = after
        self.changed.add(device)
        self._view[device] = (max(spent, told[0]), max(epsilon(kind, compose(after, planned), delta), told[1]))
        return before

    def told(self, reported: dict[int, tuple[float, float]]) -> None:
        """What devices reported they spent (and would after one more round): kept where larger."""
        for d, (spent, after) in reported.items():
            old = self._view.get(d, (0.0, 0.0))
            self._view[d] = (max(spent, old[0]), max(after, old[1]))
            self.changed.add(d)

    def view(self) -> dict[int, tuple[float, float]]:
        """Each device that has trained: (epsilon spent, epsilon after one more round)."""
        return dict(self._view)

    def exhausted(self) -> set[int]:
        """The devices one more round would take past ``privacy.budget`` (none without one): they
        train no more."""
        budget = self._job.privacy.budget
        return set() if budget is None else {d for d, (_, after) in self._view.items() if after > budget.epsilon}


def sample_report(job: JobSpec, train_sizes: list[int], device_epsilon: dict[int, tuple[float, float]]) -> dict:
    """The privacy report of a sample-level run: the mechanism, the devices' noise and what they spent."""
    spec = job.privacy
    plans = sample_plan(job, train_sizes)
    spent = [e for e, _ in device_epsilon.values()]
    return {"level": "sample", "algorithm": "DP-SGD (Abadi et al. 2016) with Opacus, Poisson batches",
            "max_grad_norm": spec.max_grad_norm, "target_epsilon": spec.target_epsilon,
            "noise_multiplier": {"min": min(z for z, _, _ in plans), "max": max(z for z, _, _ in plans)},
            "sampling_rate": {"min": min(q for _, q, _ in plans), "max": max(q for _, q, _ in plans)},
            "delta": spec.delta, "accountant": spec.accountant,
            "epsilon": {spec.accountant: {"devices_trained": len(spent), "max": max(spent, default=0.0),
                                          "mean": float(np.mean(spent)) if spent else 0.0,
                                          "min": min(spent, default=0.0)}},
            "device_epsilon": {str(d): e for d, (e, _) in sorted(device_epsilon.items())},
            "budget": spec.budget.epsilon if spec.budget else None}
