"""The ``compression`` section: the codecs a device's update goes through on its way up, in the
order sparsify (or factorize) -> quantize -> entropy-code, with error feedback. The codecs
themselves are ``fedray.compression``."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, model_validator

from fedray.config.base import PositiveInt, Section

Share = Annotated[float, Field(gt=0, le=1)]


class TopK(Section):
    """Send the ``fraction`` of coordinates largest in magnitude, with their positions: of the
    whole vector, or of each parameter (``per_layer``)."""

    kind: Literal["topk"]
    fraction: Share = 0.01
    per_layer: bool = Field(False, description="choose within each parameter, so that layers whose updates are "
                                               "small in magnitude still send their share")


class RandK(Section):
    """Send a random ``fraction`` of coordinates, drawn from a seed the receiver shares, so no
    positions are sent. ``shared``: every device of a round draws the same coordinates."""

    kind: Literal["randk"]
    fraction: Share = 0.1
    shared: bool = False


class LowRank(Section):
    """PowerSGD: each weight matrix (a convolution's kernel as out x rest) as a rank-``rank``
    product ``P Q^T`` after one power iteration; vectors and small matrices go as they are."""

    kind: Literal["lowrank"]
    rank: PositiveInt = 2


class Quantize(Section):
    """Stochastic rounding of each value to one of ``2^bits`` levels spanning the values' range:
    unbiased, ``bits`` bits per value."""

    kind: Literal["quantize"]
    bits: Literal[1, 2, 4, 8] = 8


class Sign(Section):
    """The sign of each value times their mean magnitude (EF-signSGD): 1 bit per value."""

    kind: Literal["sign"]


class Entropy(Section):
    """Lossless: the encoded bytes through zlib at ``level``, kept only when that is smaller."""

    kind: Literal["entropy"]
    level: Annotated[int, Field(ge=1, le=9)] = 9


Stage = Annotated[TopK | RandK | LowRank | Quantize | Sign | Entropy, Field(discriminator="kind")]
ORDER = {"topk": 0, "randk": 0, "lowrank": 0, "quantize": 1, "sign": 1, "entropy": 2}  # the chain's steps


class CompressionSpec(Section):
    uplink: list[Stage] = Field(min_length=1, description=(
        "the codecs each update goes through, in order: at most one of topk, randk, lowrank; then at most one of "
        "quantize, sign; then optionally entropy"))
    error_feedback: bool = Field(True, description=(
        "what a lossy codec drops is kept in the device's state record and added to its next update"))
    warmup_rounds: Annotated[int, Field(ge=0)] = Field(0, description=(
        "Deep Gradient Compression's warm-up: the kept fraction of topk or randk falls exponentially from all "
        "coordinates to its fraction over these rounds"))

    @model_validator(mode="after")
    def _check(self) -> CompressionSpec:
        steps = [ORDER[s.kind] for s in self.uplink]
        if steps != sorted(set(steps)):
            kinds = [s.kind for s in self.uplink]
            raise ValueError(f"compression.uplink {kinds} is out of order or repeats a step: give at most one of "
                             "topk, randk, lowrank, then at most one of quantize, sign, then entropy")
        if self.warmup_rounds and self.uplink[0].kind not in ("topk", "randk"):
            raise ValueError("compression.warmup_rounds ramps the sparsity of topk or randk; the chain has neither")
        return self

    @property
    def lossy(self) -> bool:
        return any(s.kind != "entropy" for s in self.uplink)


def check(job) -> None:
    """The compression section against the rest of the job; raises ValueError naming the field."""
    kinds = [s.kind for s in job.compression.uplink]
    if job.peers is not None:
        raise ValueError("compression applies to updates sent to an aggregator; peers exchange models or "
                         "predictions with each other")
    if job.secure is not None:
        raise ValueError(f"compression {kinds} with secure aggregation is not supported yet: a sum of ciphertexts "
                         "needs every device to send the same coordinates, which independent sparsification breaks")
    if job.model.unfreeze:
        raise ValueError("compression codes the federated vector, which model.unfreeze grows during the run; "
                         "drop one of them")
