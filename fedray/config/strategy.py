"""The ``strategy`` section: one class per strategy family, told apart by ``name``.

Every strategy has defaults for its own hyperparameters, so ``--set strategy.name=X`` works on any
job; cross-checks against the rest of the job (Krum's quorum, SGD for FedNova) live in ``JobSpec``.
"""

from __future__ import annotations

import math

from typing import Annotated, Literal

from pydantic import Field, model_validator

from fedray.config.base import PositiveFloat, PositiveInt, Section

Beta = Annotated[float, Field(ge=0, lt=1)]


class _Synchronous(Section):
    server_lr: PositiveFloat = 1.0
    norm_bound: PositiveFloat | None = Field(None, description="clip each update to this L2 norm first")


class FedAvg(_Synchronous):
    """FedAvg: step by ``server_lr`` x the sample-weighted mean delta."""

    name: Literal["fedavg"] = "fedavg"


class FedAvgM(_Synchronous):
    """FedAvg with server momentum (Hsu et al. 2019)."""

    name: Literal["fedavgm"]
    momentum: Beta = 0.9


class FedProx(_Synchronous):
    """FedAvg whose devices add (mu/2)||w - w_global||^2 to their loss (Li et al. 2020)."""

    name: Literal["fedprox"]
    mu: PositiveFloat = 0.01


class FedNova(_Synchronous):
    """Normalized averaging: each delta divided by its device's effective local steps (Wang et al. 2020)."""

    name: Literal["fednova"]


class Scaffold(_Synchronous):
    """SCAFFOLD: control variates correct client drift; each device keeps its own between rounds."""

    name: Literal["scaffold"]


class FedAdam(_Synchronous):
    """Adaptive server optimizers on the pseudo-gradient (Reddi et al. 2021)."""

    name: Literal["fedadam", "fedyogi"]
    server_lr: PositiveFloat = 0.01
    beta1: Beta = 0.9
    beta2: Beta = 0.99
    tau: PositiveFloat = 1e-3


class FedAdagrad(_Synchronous):
    name: Literal["fedadagrad"]
    server_lr: PositiveFloat = 0.1
    beta1: Beta = 0.0
    tau: PositiveFloat = 1e-3


class _Robust(_Synchronous):
    """Robust rules need the round's raw updates in one place (not linear: no tiers or CKKS)."""

    bucket_size: PositiveInt = Field(1, description="first average random buckets of this many updates "
                                                    "(Karimireddy et al. 2022; helps on non-IID data); 1: off")


class Median(_Robust):
    """Coordinate-wise median of the round's updates."""

    name: Literal["median"]


class TrimmedMean(_Robust):
    """Coordinate-wise mean without the beta fraction of largest and smallest values."""

    name: Literal["trimmed_mean"]
    beta: Annotated[float, Field(ge=0, lt=0.5)] = 0.1


class Krum(_Robust):
    """Krum / Multi-Krum: average the ``selected`` updates (or buckets) closest to their neighbours,
    tolerating ``byzantine`` bad ones per round (Krum selects 1; Multi-Krum defaults to n - f)."""

    name: Literal["krum", "multi_krum"]
    byzantine: Annotated[int, Field(ge=0)] = 1
    selected: PositiveInt | None = None


class Staleness(Section):
    """How much an update trained ``t`` server steps ago counts (Xie et al. 2019): ``constant`` 1,
    ``polynomial`` ``(1 + t)^-a``, ``hinge`` 1 up to ``t = b`` then ``1 / (1 + a (t - b))``."""

    kind: Literal["constant", "polynomial", "hinge"] = "polynomial"
    a: PositiveFloat = 0.5
    b: Annotated[int, Field(ge=0)] = 4

    @model_validator(mode="after")
    def _check(self) -> Staleness:
        unused = {"constant": {"a", "b"}, "polynomial": {"b"}, "hinge": set()}[self.kind] & self.model_fields_set
        if unused:
            raise ValueError(f"staleness {', '.join(sorted(unused))} does not apply to kind {self.kind!r}")
        return self


class _Asynchronous(Section):
    """Asynchronous rounds: up to ``concurrency`` devices train at once (default devices.per_round);
    an update more than ``max_staleness`` server steps old is dropped (default: none is)."""

    concurrency: PositiveInt | None = None
    max_staleness: Annotated[int, Field(ge=0)] | None = None
    staleness: Staleness = Staleness()

    def devices_at_once(self, per_round: int) -> int:
        """How many devices train at once: ``concurrency``, else devices.per_round."""
        return self.concurrency or per_round


class FedAsync(_Asynchronous):
    """FedAsync (Xie et al. 2019): each arriving local model is mixed into the global one with
    weight ``alpha`` x staleness weight."""

    name: Literal["fedasync"]
    alpha: Annotated[float, Field(gt=0, le=1)] = 0.6


class FedBuff(_Asynchronous):
    """FedBuff (Nguyen et al. 2022): the server steps by ``server_lr`` x the staleness-weighted mean
    of every ``buffer_size`` arriving deltas (default: half the concurrency, rounded up)."""

    name: Literal["fedbuff"]
    buffer_size: PositiveInt | None = None
    server_lr: PositiveFloat = 1.0

    def buffer(self, per_round: int) -> int:
        """Arrivals per server step: ``buffer_size``, else half the devices training at once."""
        return self.buffer_size or math.ceil(self.devices_at_once(per_round) / 2)


StrategySpec = Annotated[FedAvg | FedAvgM | FedProx | FedNova | Scaffold | FedAdam | FedAdagrad | Median | TrimmedMean
                         | Krum | FedAsync | FedBuff, Field(discriminator="name")]

ASYNC_STRATEGIES = frozenset({"fedasync", "fedbuff"})
ROBUST_STRATEGIES = frozenset({"median", "trimmed_mean", "krum", "multi_krum"})
