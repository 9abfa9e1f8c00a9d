"""What a device does for differential privacy. Client level: clip its delta and, in distributed
mode, add its own share of the noise before the update leaves it. Sample level: keep its own
accountant over the DP-SGD steps it takes (``DeviceAccountant``). And the accounting both levels
share (Opacus's accountants). No Ray, no I/O.

DP noise is drawn from a generator seeded by the operating system's entropy, never from the job's
seed, so nobody who knows the job can subtract it; DP runs are therefore not bit-reproducible.
"""

from __future__ import annotations

import warnings
from functools import lru_cache

import numpy as np


def clip(delta: np.ndarray, bound: float) -> np.ndarray:
    """``delta`` scaled down to L2 norm ``bound`` if it is longer."""
    norm = float(np.linalg.norm(delta))
    return delta if norm <= bound else delta * np.float32(bound / norm)


def noise(size: int, std: float, rng: np.random.Generator | None = None) -> np.ndarray:
    """Gaussian noise of ``std`` per coordinate, float32; OS-seeded unless ``rng`` is given (tests)."""
    rng = rng or np.random.default_rng()
    return rng.normal(0.0, std, size).astype(np.float32)


def privatize(delta: np.ndarray, clip_bound: float, std: float, rng: np.random.Generator | None = None) -> np.ndarray:
    """The delta a device sends: clipped to ``clip_bound``, plus its noise share of ``std`` (0: none)."""
    delta = clip(delta, clip_bound)
    return delta + noise(delta.size, std, rng) if std else delta


def below_clip(delta: np.ndarray, clip_bound: float, std: float, rng: np.random.Generator | None = None) -> float:
    """Adaptive clipping's indicator, centred: +1/2 if ``delta`` (unclipped) is within ``clip_bound``,
    else -1/2, plus a noise share of ``std`` (0: none). Centred, one device adds or removes at most
    1/2 from the sum: the sensitivity the noise split assumes (``delta_noise_multiplier``)."""
    value = 0.5 if np.linalg.norm(delta) <= clip_bound else -0.5
    return value + float(noise(1, std, rng)[0]) if std else value


Mechanism = tuple[float, float, int]  # (noise multiplier, sampling rate, steps), as Opacus's history


def epsilon(kind: str, history: list[Mechanism], delta: float) -> float:
    """Epsilon at ``delta`` of the composed sampled Gaussian mechanisms ``history``, by Opacus's
    ``rdp`` or ``prv`` accountant. RDP is Opacus's sum of each mechanism's RDP curve (steps times
    one step's, which is computed once per noise multiplier and rate: a device's history is
    composed again at every round)."""
    history = [entry for entry in history if entry[2]]
    if not history:
        return 0.0
    with warnings.catch_warnings():  # RDP at very high noise: "optimal order is the largest alpha";
        warnings.simplefilter("ignore", UserWarning)  # the bound holds, only looser
        if kind == "rdp":
            from opacus.accountants.analysis.rdp import get_privacy_spent
            from opacus.accountants.rdp import RDPAccountant

            rdp = sum(_step_rdp(z, q) * steps for z, q, steps in history)
            return float(get_privacy_spent(orders=RDPAccountant.DEFAULT_ALPHAS, rdp=rdp, delta=delta)[0])
        from opacus.accountants import create_accountant

        accountant = create_accountant(kind)
        accountant.history = history
        return float(accountant.get_epsilon(delta=delta))


@lru_cache(maxsize=4096)
def _step_rdp(noise_multiplier: float, rate: float) -> np.ndarray:
    """One step's RDP curve at Opacus's orders (read only: the cache hands out this array)."""
    from opacus.accountants.analysis.rdp import compute_rdp
    from opacus.accountants.rdp import RDPAccountant

    curve = compute_rdp(q=rate, noise_multiplier=noise_multiplier, steps=1, orders=RDPAccountant.DEFAULT_ALPHAS)
    curve.flags.writeable = False
    return curve


def sgd_noise(job, samples: int, planned: int) -> tuple[float, float]:
    """A device's DP-SGD (noise multiplier, batch sampling rate) under ``job``'s sample-level
    privacy: ``target_epsilon`` gives the noise that reaches it after ``planned`` steps in every
    training the job can give it (``config.privacy.trainings``)."""
    from fedray.config.privacy import trainings

    spec, rate = job.privacy, min(1.0, job.devices.local.batch_size / samples)
    if spec.noise_multiplier is not None:
        return spec.noise_multiplier, rate
    return noise_for(spec.accountant, spec.target_epsilon, spec.delta, rate, planned * trainings(job)), rate


def sample_mechanism(job, samples: int, round: int, device: int) -> Mechanism:
    """What ``device`` (of ``samples`` training samples) spends training for ``round`` under
    sample-level DP: its (noise multiplier, batch sampling rate, steps); the steps are those it
    will take (``heterogeneity.round_steps``), so whoever knows the job can charge them before the
    device trains."""
    from fedray.agents.heterogeneity import round_steps

    planned, steps = round_steps(job, samples, round, device)
    return (*sgd_noise(job, samples, planned), steps)


@lru_cache(maxsize=1024)
def noise_for(kind: str, target: float, delta: float, rate: float, steps: int) -> float:
    """The noise multiplier whose ``steps`` at ``rate`` spend ``target`` epsilon (Opacus's search,
    to within 0.01 below it)."""
    from opacus.accountants.utils import get_noise_multiplier

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return float(get_noise_multiplier(target_epsilon=target, target_delta=delta, sample_rate=rate, steps=steps,
                                          accountant=kind))


class DeviceAccountant:
    """One device's DP-SGD spend: the ``history`` of what it spent before (its state record, kept
    outside any worker) and what it spends now."""

    def __init__(self, kind: str, delta: float, history: list[Mechanism] = ()) -> None:
        self.kind, self.delta = kind, delta
        self.history: list[Mechanism] = [tuple(m) for m in history]

    def spend(self, noise_multiplier: float, rate: float, steps: int) -> None:
        self.history = compose(self.history, (noise_multiplier, rate, steps))

    def epsilon(self, then: Mechanism | None = None) -> float:
        """Epsilon spent so far, or after also spending ``then``."""
        return epsilon(self.kind, self.history if then is None else compose(self.history, then), self.delta)


def compose(history: list[Mechanism], mechanism: Mechanism) -> list[Mechanism]:
    if history and history[-1][:2] == mechanism[:2]:
        return history[:-1] + [(*mechanism[:2], history[-1][2] + mechanism[2])]
    return history + [mechanism]
