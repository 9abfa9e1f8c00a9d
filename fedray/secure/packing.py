"""Fixed-point packing for additive encryption: plain NumPy, no TenSEAL, no Ray.

A device's values (its pre-weighted delta, then a few extras) are quantized to signed integers of
``bits`` bits by stochastic rounding (unbiased), and ``per_slot`` of them share one CKKS slot as
the digits of one integer in base ``2^field_bits``: ``P = sum_j v_j 2^(j field_bits)``. A field is
wider than a value by the headroom that the sum of up to ``2^headroom`` devices needs, so sums of
packed slots are the packed sums, digit by digit. The first fields of every ciphertext hold the
device's tag digits, secret numbers only it and the key authority can compute, so the authority can
check that a ciphertext is the plain sum of the contributions it is claimed to be. (Paillier's
"slot" is its whole plaintext, a few thousand bits: hundreds of values share it.)
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass

import numpy as np

RECEIPT_BYTES = 16


def quantize(values: np.ndarray, step: float, bits: int, rng: np.random.Generator) -> tuple[np.ndarray, int]:
    """``values / step`` stochastically rounded (unbiased) to int64 within ``+-(2^(bits-1) - 1)``;
    and how many values were beyond that and clipped."""
    limit = 2 ** (bits - 1) - 1
    scaled = np.asarray(values, dtype=np.float64) / step
    clipped = int(np.count_nonzero(np.abs(scaled) > limit))
    rounded = np.floor(scaled + rng.random(scaled.size))
    return np.clip(rounded, -limit, limit).astype(np.int64), clipped


def tags(seed: int, round: int, chunks: int, fields: int, bits: int) -> np.ndarray:
    """A device's tag digits for ``round``: ``(chunks, fields)`` integers in ``[0, 2^(bits-1))``,
    drawn from its secret ``seed``."""
    return np.random.default_rng([seed, round]).integers(0, 2 ** (bits - 1), (chunks, fields), dtype=np.int64)


def receipt(seed: int, device: int, round: int) -> bytes:
    """A device's proof that it sent an update for ``round``: an HMAC-SHA256 of the device and round
    under its secret ``seed`` (``RECEIPT_BYTES`` bytes). It travels beside the ciphertexts, so the
    key authority can refuse a sum that claims a contribution nobody sent."""
    message = device.to_bytes(8, "little", signed=True) + round.to_bytes(8, "little", signed=True)
    return hmac.new(seed.to_bytes(16, "little"), b"fedray-receipt" + message, hashlib.sha256).digest()[:RECEIPT_BYTES]


@dataclass(frozen=True)
class Layout:
    """How ``length`` values fill ciphertexts of ``slots`` slots, ``per_slot`` fields of
    ``field_bits`` bits in each; the first ``tag_fields`` fields of every ciphertext hold its tag.
    A slot is an int64 while it fits (CKKS), else a Python integer (Paillier's thousands of bits)."""

    slots: int
    per_slot: int
    field_bits: int
    length: int
    tag_fields: int

    @property
    def per_chunk(self) -> int:
        """Values per ciphertext."""
        return self.slots * self.per_slot - self.tag_fields

    @property
    def chunks(self) -> int:
        """Ciphertexts per update."""
        return -(-self.length // self.per_chunk)

    def pack(self, values: np.ndarray, tag: np.ndarray) -> np.ndarray:
        """``(chunks, slots)`` slot integers holding ``values`` (int64, ``length``) and the
        ``(chunks, tag_fields)`` tag digits."""
        payload = np.zeros(self.chunks * self.per_chunk, dtype=np.int64)
        payload[:self.length] = values
        fields = np.concatenate([tag, payload.reshape(self.chunks, -1)], axis=1)
        fields = fields.reshape(self.chunks, self.slots, self.per_slot)
        if self.per_slot * self.field_bits > 62:
            fields = fields.astype(object)
        packed = fields[:, :, 0].copy()
        for j in range(1, self.per_slot):
            packed += fields[:, :, j] << (j * self.field_bits)
        return packed

    def unpack(self, totals: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The field sums in summed slot integers ``totals`` (``(chunks, slots)``; floats within 1/2
        of integers, as CKKS decrypts them, are rounded): ``(values (length,), tag digits (chunks,
        tag_fields))``, int64."""
        packed = np.rint(totals).astype(np.int64) if totals.dtype.kind == "f" else totals
        fields = np.empty((self.chunks, self.slots, self.per_slot), dtype=np.int64)
        half, base = 1 << (self.field_bits - 1), 1 << self.field_bits
        for j in range(self.per_slot):  # balanced digits: each in [-half, half)
            digit = (packed + half) % base - half
            fields[:, :, j] = digit
            packed = (packed - digit) >> self.field_bits
        fields = fields.reshape(self.chunks, -1)
        return fields[:, self.tag_fields:].reshape(-1)[:self.length], fields[:, :self.tag_fields]
