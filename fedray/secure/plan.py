"""SecurePlan: what every party of a job's encrypted aggregation knows (all of it public), and the
device's side: quantize, pack, tag and encrypt its update. No Ray.

A device encrypts ``(w / a) / weight_scale x delta`` on the encrypted coordinates, where ``(w, a)``
are its update's weight and effective steps in the strategy's sum and ``weight_scale`` is the
largest weight a device can have, so every encrypted value is its delta scaled by at most 1; then
the extras: its loss weighted by its samples over the most samples a device holds (unless it must
not send a loss), its adaptive-clipping indicator, and the fraction of its values that were clipped
to the range. The extras keep ``EXTRA_BITS`` of precision however few bits a value has: each is
written as balanced digits in base ``2 limit + 1``, one field per digit, and digit sums recombine.

Compression inside encryption (``compression.uplink``): shared random-k encrypts the same ``kept``
of the encrypted coordinates for every device of a round (drawn from the job's seed and the round,
so the aggregate's positions are public and no device's choice shows); quantize sets the bits of a
value, so more values share a slot.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass

import numpy as np

from fedray.secure import packing
from fedray.secure.ciphers import CipherSum, public_for

EXTRAS = ("loss", "below_clip", "clipped")
EXTRA_RANGE = 32.0  # the extras are quantized over [-32, 32]
EXTRA_BITS = 24  # ... to this many bits, sign included


@dataclass(frozen=True)
class SecurePlan:
    encrypted: np.ndarray  # indices of the encrypted coordinates of the flat vector
    plain: np.ndarray  # the others, aggregated in plaintext
    names: tuple[str, ...]  # the encrypted parameters
    layout: packing.Layout
    bits: int  # bits of each quantized value
    weight_scale: float  # the largest weight a device's update has in the sum
    sample_scale: int  # the most training samples a device holds
    scheme: str  # ckks | paillier
    params: dict  # the scheme's key parameters
    min_clients: int
    max_contributions: int
    kept: int  # encrypted coordinates each update carries: all, or shared random-k's share
    seed: int  # the job's: it draws random-k's coordinates

    @property
    def base(self) -> int:
        """The base of the extras' balanced digits: a digit's levels, ``-limit..limit``."""
        return 2 * self.limit + 1

    @property
    def digits(self) -> int:
        """Digits (fields) of one extra."""
        return digits_for(self.bits)

    def sent(self, round: int) -> np.ndarray:
        """The flat vector's coordinates every device encrypts in ``round``: the encrypted ones, or
        (shared random-k) ``kept`` of them drawn from the seed and the round."""
        if self.kept == len(self.encrypted):
            return self.encrypted
        rng = np.random.default_rng([self.seed, round, 14])
        return self.encrypted[np.sort(rng.choice(len(self.encrypted), self.kept, replace=False))]

    @classmethod
    def of(cls, job, names: tuple[str, ...], sizes: list[int], train_sizes: list[int], weigh) -> SecurePlan:
        """The plan of ``job`` for parameters ``names`` of ``sizes`` entries; ``weigh(samples)`` is
        the weight in the strategy's sum of an update from ``samples`` training samples."""
        from fedray.compression.codecs import round_half_up
        from fedray.config.privacy import client_level, min_participants
        from fedray.config.secure import max_contributions, quantized_bits

        spec = job.secure
        # distributed DP's noise shares are sized for min_participants: the authority never decrypts fewer
        shares = min_participants(job) if client_level(job) and job.privacy.mode == "distributed" else 0
        chosen = [any(fnmatch.fnmatchcase(name, pattern) for pattern in spec.encrypt) for name in names]
        mask = np.repeat(chosen, sizes)
        encrypted = np.flatnonzero(mask)
        if not len(encrypted):
            raise ValueError(f"secure.encrypt {list(spec.encrypt)} matches none of the model's parameters "
                             f"({', '.join(names)})")
        most = max_contributions(job)
        fields = spec.fields(most, quantized_bits(job))
        randk = next((s for s in (job.compression.uplink if job.compression else []) if s.kind == "randk"), None)
        kept = len(encrypted) if randk is None else max(1, round_half_up(randk.fraction * len(encrypted)))
        layout = packing.Layout(fields.slots, fields.per_slot, fields.field_bits,
                                kept + len(EXTRAS) * digits_for(fields.value_bits), fields.tag_fields)
        return cls(encrypted, np.flatnonzero(~mask), tuple(n for n, c in zip(names, chosen) if c), layout,
                   fields.value_bits, max(weigh(n) for n in train_sizes), max(train_sizes), spec.scheme, spec.keys,
                   max(spec.min_clients, shares), most, kept, job.seed)

    @property
    def limit(self) -> int:
        """The largest quantized value."""
        return 2 ** (self.bits - 1) - 1

    def decode(self, values: np.ndarray, value_range: float) -> tuple[np.ndarray, dict[str, float]]:
        """From the integer sums the authority decrypted: the sum of the devices' ``(w / a) x delta``
        on the coordinates encrypted in the round (``sent``; float32), and the summed extras."""
        total = values[:self.kept] * (value_range / self.limit * self.weight_scale)
        sums = values[self.kept:].reshape(len(EXTRAS), self.digits)
        extras = sums @ (self.base ** np.arange(self.digits, dtype=np.int64)) * _EXTRA_STEP
        return total.astype(np.float32), dict(zip(EXTRAS, extras.tolist()))

    def summary(self) -> dict:
        """The split and the parameters, for the run's record."""
        return {"scheme": self.scheme, **{k: list(v) if isinstance(v, tuple) else v for k, v in self.params.items()},
                "slots": self.layout.slots, "values_per_slot": self.layout.per_slot, "value_bits": self.bits,
                "field_bits": self.layout.field_bits, "ciphertexts_per_update": self.layout.chunks,
                "min_clients": self.min_clients, "max_contributions": self.max_contributions,
                "encrypted_values": len(self.encrypted), "encrypted_per_update": self.kept,
                "plaintext_values": len(self.plain),
                "encrypted_parameters": list(self.names)}


class Sealer:
    """A device worker's side of encrypted aggregation: its devices' tag seeds (from the key
    authority, which started the worker) and the public context."""

    def __init__(self, plan: SecurePlan, public: bytes, seeds: dict[int, int]) -> None:
        self.plan, self.seeds = plan, seeds
        self.public = public_for(plan.scheme, public, plan.layout.slots)

    def seal(self, device: int, round: int, delta: np.ndarray, scale: float, value_range: float,
             extras: tuple[float, float], rng: np.random.Generator, count_clipped: bool = True,
             ) -> tuple[np.ndarray, bytes, np.ndarray]:
        """``(plaintext part of delta, sealed blob, what was sealed)``: the blob is the device's
        receipt for ``round`` and then the ciphertexts: the coordinates encrypted in ``round``
        (``plan.sent``) times ``scale`` (``(w / a) / weight_scale``) quantized over
        ``+-value_range``, then ``extras`` (weighted loss, below-clip indicator) and the clipped
        fraction (0 unless ``count_clipped``: under DP it would be an un-noised statistic), tagged
        for ``round``. What was sealed is those coordinates as the sum will hold them, in delta's
        units (for error feedback). Raises ValueError for a non-finite delta or extra, which no
        aggregator could see to reject."""
        plan, layout = self.plan, self.plan.layout
        bad = int(np.count_nonzero(~np.isfinite(delta)))
        if bad or not np.isfinite(extras).all():
            raise ValueError(f"delta has {bad} non-finite values (loss and indicator: {extras}); device {device} "
                             "does not send it")
        step = value_range / plan.limit
        values, clipped = packing.quantize(delta[plan.sent(round)] * np.float32(scale), step, plan.bits, rng)
        tail, _ = packing.quantize(np.array([*extras, count_clipped * clipped / plan.kept]), _EXTRA_STEP,
                                   EXTRA_BITS, rng)
        seed = self.seeds[device]
        tag = packing.tags(seed, round, layout.chunks, layout.tag_fields, plan.bits)
        blob = self.public.encrypt(layout.pack(np.concatenate([values, balanced_digits(tail, plan.base,
                                                                                        plan.digits).ravel()]), tag))
        sealed = values * (step / scale) if scale > 0 else np.zeros(len(values))
        return delta[plan.plain], packing.receipt(seed, device, round) + blob, sealed.astype(np.float32)


_EXTRA_STEP = EXTRA_RANGE / (2 ** (EXTRA_BITS - 1) - 1)


def digits_for(bits: int) -> int:
    """Balanced digits of levels ``-limit..limit`` (``limit = 2^(bits-1) - 1``) that an extra of
    ``EXTRA_BITS`` needs."""
    base, count = 2 ** bits - 1, 1
    while base ** count < 2 ** EXTRA_BITS:
        count += 1
    return count


def balanced_digits(values: np.ndarray, base: int, count: int) -> np.ndarray:
    """``(len(values), count)`` digits in ``[-(base // 2), base // 2]`` (``base`` odd), least
    significant first: ``values == digits @ base^k``."""
    half, rest, out = base // 2, values.astype(np.int64), []
    for _ in range(count):
        digit = (rest + half) % base - half
        out.append(digit)
        rest = (rest - digit) // base
    return np.stack(out, axis=1)


class SumLoader:
    """An aggregator's (an edge's, the driver's) side: new and received encrypted sums, under the
    public context."""

    def __init__(self, plan: SecurePlan, public: bytes) -> None:
        self.public, self.chunks = public_for(plan.scheme, public, plan.layout.slots), plan.layout.chunks

    def empty(self) -> CipherSum:
        return CipherSum(self.public, self.chunks)

    def load(self, payload: bytes) -> CipherSum:
        """A sum an edge sent up (``CipherSum.to_bytes``); raises ValueError if it does not decode."""
        return CipherSum.from_bytes(self.public, self.chunks, payload)
