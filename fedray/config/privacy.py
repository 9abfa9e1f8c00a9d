"""The ``privacy`` section: differential privacy at the client level (DP-FedAvg: each device's whole
update is clipped and Gaussian noise hides any one device) or the sample level (DP-SGD inside each
device's training: noise hides any one sample), with the accountant, delta and an optional epsilon
budget. Told apart by ``level``.
"""

from __future__ import annotations

import math

from typing import Annotated, Literal

from pydantic import Field, model_validator

from fedray.config.base import PositiveFloat, PositiveInt, Section, quorum
from fedray.config.strategy import ASYNC_STRATEGIES, ROBUST_STRATEGIES


# below 0.3 a guarantee is void (epsilon in the hundreds) and the prv accountant's grid explodes
NoiseMultiplier = Annotated[float, Field(ge=0.3, le=1000)]


class Budget(Section):
    epsilon: PositiveFloat = Field(description="stop the run before the round that would spend more")


class _Accounting(Section):
    delta: Annotated[float, Field(ge=1e-12, lt=0.1)] = 1e-5  # above 0.1 it protects no one
    accountant: Literal["rdp", "prv"] = Field("rdp", description="Opacus accountant for the logged epsilon")
    budget: Budget | None = None


class AdaptiveClip(Section):
    """Adaptive clipping (Andrew et al. 2021): each round the clip bound moves geometrically
    towards the ``target_quantile`` of the devices' update norms, ``C <- C exp(-lr (b - q))``,
    where b is the noised fraction of devices whose update was within C (each device sends +-1/2,
    so the count's sensitivity is 1/2). ``count_noise`` is the
    std of the noise on that count (default q N / 20); the deltas' noise multiplier is lowered so
    that both releases together are accounted as ``noise_multiplier``."""

    target_quantile: Annotated[float, Field(gt=0, lt=1)] = 0.5
    lr: PositiveFloat = 0.2
    count_noise: PositiveFloat | None = None


class ClientLevel(_Accounting):
    """DP-FedAvg (McMahan et al. 2018). Devices are Poisson-sampled at ``sampling_rate`` q (default
    devices.per_round / devices.count); each clips its delta to L2 norm ``clip`` C; Gaussian noise of
    standard deviation ``noise_multiplier`` z x C is added to the sum, by the driver (``central``) or
    as independent shares each device adds before its update leaves it (``distributed``: std
    z C / sqrt(m) each, so any ``min_participants`` m shares or more carry the full noise; a round
    with fewer valid updates is not applied). The mean divides by the expected number of
    participants q N, not by how many answered. ``clip`` is the first bound with ``adaptive_clip``."""

    level: Literal["client"]
    mode: Literal["central", "distributed"] = "central"
    clip: PositiveFloat = 1.0
    noise_multiplier: NoiseMultiplier = 1.0
    sampling_rate: Annotated[float, Field(gt=0, le=1)] | None = None
    min_participants: PositiveInt | None = Field(None, description="distributed: the fewest valid updates a round "
                                                                   "applies; default ceil(min_completion x q N)")
    adaptive_clip: AdaptiveClip | None = None



class SampleLevel(_Accounting):
    """DP-SGD (Abadi et al. 2016) inside each device's training, with Opacus: every local step
    draws a Poisson batch (each sample with chance q = batch_size / its samples), clips each
    sample's gradient to ``max_grad_norm`` and adds Gaussian noise of ``noise_multiplier`` x
    max_grad_norm to their sum. Or ``target_epsilon``: each device picks the noise multiplier
    that reaches it if it trains in every one of the job's rounds. Each device keeps its own
    accountant; a device refuses a round that would take it past ``budget``."""

    level: Literal["sample"]
    max_grad_norm: PositiveFloat = 1.0
    noise_multiplier: NoiseMultiplier | None = None
    target_epsilon: PositiveFloat | None = None

    @model_validator(mode="after")
    def _check(self) -> SampleLevel:
        if (self.noise_multiplier is None) == (self.target_epsilon is None):
            raise ValueError("privacy.level sample takes exactly one of noise_multiplier and target_epsilon")
        return self


PrivacySpec = Annotated[ClientLevel | SampleLevel, Field(discriminator="level")]


# derived values; ``job`` is a JobSpec with a ``privacy`` section

def client_level(job) -> ClientLevel | None:
    return job.privacy if job.privacy is not None and job.privacy.level == "client" else None


def sample_level(job) -> SampleLevel | None:
    return job.privacy if job.privacy is not None and job.privacy.level == "sample" else None


def sampling_rate(job) -> float:
    """q: each device's chance to take part in a round."""
    return job.privacy.sampling_rate or job.devices.per_round / job.devices.count


def expected_participants(job) -> float:
    """q N, the fixed denominator of the mean."""
    return sampling_rate(job) * job.devices.count


def min_participants(job) -> int:
    """The fewest valid updates a round applies: distributed shares are sized for this many
    (default ``ceil(min_completion x q N)``); one under central noise."""

    privacy = job.privacy
    if privacy.mode == "central":
        return 1
    return privacy.min_participants or max(1, quorum(job.devices.min_completion, expected_participants(job)))


def trainings(job) -> int:
    """The most times a device trains in a synchronous run: once in each edge round (HierFAVG's
    ``topology.edge_rounds`` per round) of each of the job's rounds. Sample-level
    ``target_epsilon`` is sized for all of them."""
    return job.rounds * (job.topology.edge_rounds if job.topology is not None else 1)


def count_noise(job) -> float:
    """sigma_b: the std of the noise on the adaptive clip's below-clip count."""
    return job.privacy.adaptive_clip.count_noise or expected_participants(job) / 20


def delta_noise_multiplier(job) -> float:
    """The noise multiplier on the deltas: ``noise_multiplier``, or with adaptive clipping
    ``(z^-2 - (2 sigma_b)^-2)^-1/2``, so that deltas and count together are accounted as z. The
    count sums centred indicators (+-1/2, sensitivity 1/2), so its noise multiplier is 2 sigma_b;
    one Poisson-sampled release of both Gaussians is the Gaussian mechanism with
    ``z^-2 = z_delta^-2 + (2 sigma_b)^-2`` (Andrew et al. 2021, Theorem 1)."""
    privacy = job.privacy
    if privacy.adaptive_clip is None:
        return privacy.noise_multiplier
    return (privacy.noise_multiplier ** -2 - (2 * count_noise(job)) ** -2) ** -0.5


def check(job) -> None:
    """The privacy section against the rest of the job; raises ValueError naming the field."""
    if job.evaluation.federated:
        raise ValueError("evaluation.federated: each device's accuracy and loss on its own test split would leave "
                         f"it un-noised, outside what privacy.level {job.privacy.level} accounts (evaluate on the "
                         "server's holdout: set evaluation.federated false)")
    if job.privacy.level == "client":
        _check_client(job)
    elif job.strategy.name in ASYNC_STRATEGIES and job.privacy.target_epsilon is not None:
        raise ValueError(f"privacy.target_epsilon: under strategy {job.strategy.name} a device may train any number "
                         "of times, so no noise can be sized for all of them (set privacy.noise_multiplier and "
                         "privacy.budget, which stops the run before a device passes it)")


def _check_client(job) -> None:
    privacy = job.privacy
    name = job.strategy.name
    if privacy.mode == "distributed" and job.secure is None:
        raise ValueError("privacy.mode distributed: each device adds only a share of the noise, so whoever reads a "
                         "single update (the driver, an edge) sees it barely noised; add a secure section, so "
                         "aggregators see only sums of at least secure.min_clients updates, or use mode central")
    if name in ROBUST_STRATEGIES:
        raise ValueError(f"privacy.level client bounds each device's influence on a sum; strategy {name} is not a "
                         "sum of the updates, so the noise would not cover it (use a linear strategy)")
    if name in ASYNC_STRATEGIES:
        raise ValueError(f"privacy.level client accounts Poisson-sampled rounds; strategy {name} has no rounds "
                         "(use a synchronous strategy)")
    if name in ("scaffold", "fednova"):
        raise ValueError(f"privacy.level client: strategy {name} uses per-device "
                         f"{'control variates' if name == 'scaffold' else 'step counts'} at the server, "
                         "which the clip and noise do not cover (use fedavg, fedprox or a server optimizer)")
    if job.strategy.norm_bound is not None:
        raise ValueError("strategy.norm_bound: privacy.level client already clips each update to privacy.clip")
    if job.devices.late == "next_round":
        raise ValueError("privacy.level client: devices.late 'next_round' would fold updates outside their "
                         "round's sample (use late 'drop')")
    if job.topology is not None and job.topology.edge_rounds > 1:
        raise ValueError("privacy.level client: topology.edge_rounds > 1 (HierFAVG) folds each device several "
                         "times per round; the accountant counts one (use edge_rounds 1)")
    if privacy.adaptive_clip is not None:
        if 2 * count_noise(job) <= privacy.noise_multiplier:
            raise ValueError(f"privacy.adaptive_clip.count_noise ({count_noise(job):g}) must exceed half of "
                             f"privacy.noise_multiplier ({privacy.noise_multiplier:g}): the count's noise is part "
                             "of the accounted noise (raise count_noise or lower noise_multiplier)")
    if privacy.min_participants is not None:
        if privacy.mode != "distributed":
            raise ValueError("privacy.min_participants applies to mode 'distributed' (central noise does not "
                             "depend on how many answer)")
        if privacy.min_participants > job.devices.count:
            raise ValueError(f"privacy.min_participants ({privacy.min_participants}) exceeds devices.count "
                             f"({job.devices.count})")


def share_std(noise_multiplier: float, clip_bound: float, participants: int) -> float:
    """A distributed share's std: any ``participants`` shares sum to std z C."""
    return noise_multiplier * clip_bound / math.sqrt(participants)
