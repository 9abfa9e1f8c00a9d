"""The ``compression`` section: the codecs a device's update goes through on its way up, in the
order sparsify (or factorize) -> quantize -> entropy-code, with error feedback. The codecs
themselves are ``fedray.compression``."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, model_validator

from fedray.config.base import PositiveInt, Section
from fedray.config.strategy import ASYNC_STRATEGIES

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
    uplink: list[Stage] = Field([], description=(
        "the codecs each update goes through, in order: at most one of topk, randk, lowrank; then at most one of "
        "quantize, sign; then optionally entropy"))
    downlink: list[Stage] = Field([], description=(
        "the codecs the broadcast model's change goes through (as uplink); the server keeps what they drop"))
    edge: list[Stage] = Field([], description=(
        "with a topology, the codecs each edge's sum goes through on its way to the driver: quantize, then "
        "optionally entropy (an edge keeps no residual, so only unbiased or lossless codecs)"))
    error_feedback: bool = Field(True, description=(
        "what a lossy codec drops is kept in the device's state record and added to its next update"))
    warmup_rounds: Annotated[int, Field(ge=0)] = Field(0, description=(
        "Deep Gradient Compression's warm-up: the kept fraction of topk or randk falls exponentially from all "
        "coordinates to its fraction over these rounds"))

    @model_validator(mode="after")
    def _check(self) -> CompressionSpec:
        if not self.uplink and not self.downlink and not self.edge:
            raise ValueError("compression needs uplink, downlink or edge codecs")
        for name, chain in (("uplink", self.uplink), ("downlink", self.downlink), ("edge", self.edge)):
            steps = [ORDER[s.kind] for s in chain]
            if steps != sorted(set(steps)):
                raise ValueError(f"compression.{name} {[s.kind for s in chain]} is out of order or repeats a step: "
                                 "give at most one of topk, randk, lowrank, then at most one of quantize, sign, "
                                 "then entropy")
        if biased := [s.kind for s in self.edge if s.kind not in ("quantize", "entropy")]:
            raise ValueError(f"compression.edge {biased[0]}: an edge keeps no residual between rounds for what a "
                             "sparsifier, low rank or sign drops (error feedback), so edges only quantize (unbiased) "
                             "and entropy-code (lossless)")
        if self.warmup_rounds and not any(c and c[0].kind in ("topk", "randk") for c in (self.uplink, self.downlink)):
            raise ValueError("compression.warmup_rounds ramps the sparsity of topk or randk; the chains have neither")
        return self


def check(job) -> None:
    """The compression section against the rest of the job; raises ValueError naming the field."""
    if job.peers is not None:
        raise ValueError("compression applies to updates sent to an aggregator; peers exchange models or "
                         "predictions with each other")
    if job.secure is not None:
        _check_secure(job, job.compression)
    if job.compression.downlink and (job.strategy.name in ASYNC_STRATEGIES or job.topology is not None):
        raise ValueError("compression.downlink applies to synchronous rounds without a topology for now: "
                         "asynchronous devices train from different versions, and edges would relay the messages")
    if job.compression.downlink and job.privacy is not None and job.privacy.level == "client":
        raise ValueError("compression.downlink with client-level DP is not supported: which messages each device "
                         "has applied tells who took part in which round, which client-level DP keeps secret")
    if job.compression.edge:
        _check_edge(job)
    if job.model.unfreeze:
        raise ValueError("compression codes the federated vector, which model.unfreeze grows during the run; "
                         "drop one of them")


def _check_edge(job) -> None:
    if job.topology is None:
        raise ValueError("compression.edge compresses what edges send to the driver; the job has no topology")
    if job.secure is not None:
        raise ValueError("compression.edge with secure aggregation: an edge's sum is ciphertext, which does not "
                         "compress")
    if job.privacy is not None and job.privacy.level == "client":
        raise ValueError("compression.edge with client-level DP is not supported: the quantizer's range and rounding "
                         "depend on every device in an edge's sum, so one device could move the decoded sum by more "
                         "than the clip bound the noise is calibrated to")


# why each codec cannot run inside encrypted aggregation, where aggregators add ciphertexts
NOT_ENCRYPTABLE = {
    "topk": "each device would send its own coordinates, which reveals where its update is largest and "
            "does not add up in a sum of ciphertexts (use randk with shared: true)",
    "lowrank": "the sum of devices' low-rank factors is not a factorization of the sum of their updates",
    "sign": "each device scales its signs by its own magnitude, which a sum of ciphertexts cannot apply",
    "entropy": "ciphertexts look random and do not compress",
}


def _check_secure(job, spec: CompressionSpec) -> None:
    """Under encrypted aggregation only shared random-k (fewer values to encrypt) and quantize
    (fewer bits per value, so more values per slot) apply, to the encrypted coordinates."""
    for stage in spec.uplink:
        if stage.kind in NOT_ENCRYPTABLE:
            raise ValueError(f"compression.uplink {stage.kind} with secure aggregation: {NOT_ENCRYPTABLE[stage.kind]}")
        if stage.kind == "randk" and not stage.shared:
            raise ValueError("compression.uplink randk with secure aggregation needs shared: true: a sum of "
                             "ciphertexts adds the same coordinates of every device")
        if stage.kind == "quantize" and stage.bits == 1:
            raise ValueError("compression.uplink quantize bits 1 with secure aggregation: encrypted values are "
                             "signed fixed point, and 1 bit leaves no level beside 0 (use 2 or more)")
    if job.privacy is not None and job.privacy.level == "client" and spec.uplink:
        raise ValueError("compression.uplink with secure aggregation and client-level DP is not supported: coarse "
                         "rounding and error feedback can move what a device sends beyond the clip bound the "
                         "noise is calibrated to")
    if getattr(job.secure, "values_per_slot", None) is not None and any(s.kind == "quantize" for s in spec.uplink):
        raise ValueError("secure.values_per_slot and a quantize codec both set how many values a slot holds: "
                         "drop one (the codec's bits give as many values per slot as fit)")
    if any(s.kind == "randk" for s in spec.uplink):
        if job.strategy.name in ASYNC_STRATEGIES or job.devices.late == "next_round":
            raise ValueError("compression.uplink randk with secure aggregation draws each round's coordinates, so "
                             "one sum must hold updates of one round: it excludes asynchronous strategies and "
                             "devices.late next_round")
        if spec.warmup_rounds:
            raise ValueError("compression.warmup_rounds with secure aggregation: the number of encrypted values "
                             "is fixed for the run")
