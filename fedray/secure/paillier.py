"""Paillier (python-paillier, ``phe``) as the second additive scheme, for small models: a
ciphertext is one integer modulo n^2, and adding is multiplying. No Ray.

A plaintext is an integer modulo n; fedray packs a whole ciphertext's values into it (the
"slot" is the plaintext) and reads it back centred, in (-n/2, n/2).
"""

from __future__ import annotations

import json

import numpy as np

from fedray.secure.ciphers import Public


def _phe():
    try:
        from phe import paillier
    except ImportError:
        raise ImportError("secure.scheme paillier needs python-paillier: pip install 'fedray[paillier]'") from None
    return paillier


class PaillierKeys:
    """A fresh Paillier key pair: only the key authority makes and keeps one."""

    def __init__(self, key_bits: int) -> None:
        self.public, self.private = _phe().generate_paillier_keypair(n_length=key_bits)

    def public_bytes(self) -> bytes:
        return json.dumps({"n": str(self.public.n)}).encode()

    def decrypt(self, items: list[int]) -> np.ndarray:
        """``(chunks, 1)`` plaintexts as Python integers, centred."""
        n = self.public.n
        values = [self.private.raw_decrypt(c) for c in items]
        return np.array([[v - n if v > n // 2 else v] for v in values], dtype=object)


class PaillierPublic(Public):
    def __init__(self, public: bytes, slots: int) -> None:
        super().__init__(public, slots)
        self.key = _phe().PaillierPublicKey(int(json.loads(public)["n"]))
        self._width = (self.key.nsquare.bit_length() + 7) // 8

    def encrypt_row(self, row: np.ndarray) -> int:
        return self.key.raw_encrypt(int(row[0]) % self.key.n)

    def add(self, total: int, item: int) -> int:
        return total * item % self.key.nsquare

    def item_bytes(self, item: int) -> bytes:
        return item.to_bytes(self._width, "big")

    def item_from(self, blob: bytes) -> int:
        if len(blob) != self._width:
            raise ValueError(f"a ciphertext of {len(blob)} bytes, expected {self._width}")
        item = int.from_bytes(blob, "big")
        if not 0 < item < self.key.nsquare:
            raise ValueError("a ciphertext outside (0, n^2)")
        return item
