"""CKKS with TenSEAL: the key authority's secret context, the public context that devices and
aggregators hold (encrypt and add only), and the running sum of encrypted updates. No Ray.

Contexts and ciphertexts cross processes serialized. An update's ciphertexts travel as one blob:
the 16-byte fingerprint of the public context they were made under, their count, then each
ciphertext (TenSEAL's serialization) behind its length.
"""

from __future__ import annotations

import hashlib
import json
import struct

import numpy as np
import tenseal as ts

_COUNT = struct.Struct("<I")


def new_context(degree: int, moduli: tuple[int, ...], scale_bits: int) -> ts.Context:
    """A fresh CKKS context with its secret key: only the key authority makes and keeps one."""
    context = ts.context(ts.SCHEME_TYPE.CKKS, poly_modulus_degree=degree, coeff_mod_bit_sizes=list(moduli),
                         n_threads=1)
    context.global_scale = 2.0 ** scale_bits
    return context


def public_bytes(context: ts.Context) -> bytes:
    """``context`` serialized without its secret key (nor the key-switching keys adding never needs)."""
    return context.serialize(save_public_key=True, save_secret_key=False, save_galois_keys=False,
                             save_relin_keys=False)


class PublicContext:
    """A public context from its bytes: encrypts and adds, cannot decrypt. ``id`` fingerprints it."""

    def __init__(self, public: bytes, slots: int) -> None:
        self.context = ts.context_from(public, n_threads=1)
        if self.context.is_private():
            raise ValueError("a public context must not hold a secret key")
        self.id = hashlib.sha256(public).digest()[:16]
        self.slots = slots

    def encrypt(self, slots: np.ndarray) -> bytes:
        """Encrypt each row of ``slots`` (``(chunks, slots)`` float64) as one ciphertext; the blob."""
        return self.dump([ts.ckks_vector(self.context, row.tolist()) for row in slots])

    def dump(self, vectors: list[ts.CKKSVector]) -> bytes:
        parts = [self.id, _COUNT.pack(len(vectors))]
        for vector in vectors:
            blob = vector.serialize()
            parts += [_COUNT.pack(len(blob)), blob]
        return b"".join(parts)

    def load(self, payload: bytes, chunks: int) -> list[ts.CKKSVector]:
        """The ``chunks`` ciphertexts in a blob; raises ValueError if it was made under another
        context or does not decode."""
        if payload[:16] != self.id:
            raise ValueError("ciphertext was made under another context (its context fingerprint differs)")
        try:
            (count,), offset = _COUNT.unpack_from(payload, 16), 16 + _COUNT.size
            if count != chunks:
                raise ValueError(f"{count} ciphertexts, expected {chunks}")
            vectors = []
            for _ in range(count):
                (length,) = _COUNT.unpack_from(payload, offset)
                offset += _COUNT.size
                vectors.append(ts.ckks_vector_from(self.context, payload[offset:offset + length]))
                offset += length
                if vectors[-1].size() != self.slots:
                    raise ValueError(f"a ciphertext holds {vectors[-1].size()} slots, expected {self.slots}")
            if offset != len(payload):
                raise ValueError(f"{len(payload) - offset} bytes after the ciphertexts")
        except (struct.error, RuntimeError, ValueError) as e:  # RuntimeError: SEAL's "ciphertext data is invalid"
            raise ValueError(f"ciphertext does not decode: {e}") from e
        return vectors


class CipherSum:
    """The running sum of encrypted updates an aggregator holds, and the contributions in it:
    ``(device, round)`` of each update added. Sums merge by adding, like a ``Partial``."""

    def __init__(self, public: PublicContext, chunks: int) -> None:
        self.public, self.chunks = public, chunks
        self.vectors: list[ts.CKKSVector] | None = None
        self.contributions: list[tuple[int, int]] = []

    def add(self, payload: bytes, contribution: tuple[int, int]) -> None:
        """Add one device's encrypted update; raises ValueError if the blob does not load."""
        self._add(self.public.load(payload, self.chunks), [contribution])

    def merge(self, other: CipherSum) -> None:
        if other.vectors is not None:
            self._add(other.vectors, other.contributions)

    def _add(self, vectors: list[ts.CKKSVector], contributions: list[tuple[int, int]]) -> None:
        if self.vectors is None:
            self.vectors = vectors
        else:
            for total, vector in zip(self.vectors, vectors):
                total += vector
        self.contributions += contributions

    def to_bytes(self) -> bytes:
        """The contributions (JSON) and the summed ciphertexts; empty for an empty sum."""
        if self.vectors is None:
            return b""
        header = json.dumps(self.contributions).encode()
        return _COUNT.pack(len(header)) + header + self.public.dump(self.vectors)

    @classmethod
    def from_bytes(cls, public: PublicContext, chunks: int, payload: bytes) -> CipherSum:
        """Decode ``to_bytes``; raises ValueError when it is malformed."""
        total = cls(public, chunks)
        if payload:
            try:
                (n,) = _COUNT.unpack_from(payload)
                contributions = [(int(d), int(r)) for d, r in json.loads(payload[_COUNT.size:_COUNT.size + n])]
            except (struct.error, ValueError, TypeError) as e:
                raise ValueError(f"encrypted sum has malformed contributions: {e}") from e
            total._add(public.load(payload[_COUNT.size + n:], chunks), contributions)
        return total


def decrypt(context: ts.Context, vectors: list[ts.CKKSVector]) -> np.ndarray:
    """``(chunks, slots)`` float64 plaintext slots; ``context`` must hold the secret key."""
    key = context.secret_key()
    return np.array([vector.decrypt(key) for vector in vectors])
