"""What both additive schemes share: the public side's wire format, and the running encrypted sum.
No Ray.

An update's ciphertexts travel as one blob: the 16-byte fingerprint of the public key material they
were made under, their count, then each ciphertext behind its length. A scheme (``fedray.secure.
ckks``, ``fedray.secure.paillier``) gives the key authority's ``Keys`` (``public_bytes()``,
``decrypt(items)``) and a ``Public`` subclass that encrypts one row of slots, adds two ciphertexts
and (de)serializes one.
"""

from __future__ import annotations

import hashlib
import json
import struct
from typing import Any

import numpy as np

from fedray.secure.packing import RECEIPT_BYTES

_LENGTH = struct.Struct("<I")


class Public:
    """The public key material from its bytes: encrypts and adds, cannot decrypt. ``id``
    fingerprints it; ``slots`` is a ciphertext's number of slots."""

    def __init__(self, public: bytes, slots: int) -> None:
        self.id = hashlib.sha256(public).digest()[:16]
        self.slots = slots

    def encrypt_row(self, row: np.ndarray) -> Any:
        raise NotImplementedError

    def add(self, total: Any, item: Any) -> Any:
        """The ciphertext of the sum (``total`` may be reused)."""
        raise NotImplementedError

    def item_bytes(self, item: Any) -> bytes:
        raise NotImplementedError

    def item_from(self, blob: bytes) -> Any:
        """Raises ValueError (or the scheme's error) if ``blob`` is not one of this key's ciphertexts."""
        raise NotImplementedError

    def encrypt(self, packed: np.ndarray) -> bytes:
        """Encrypt each row of ``packed`` (``(chunks, slots)`` slot integers) as one ciphertext; the blob."""
        return self.dump([self.encrypt_row(row) for row in packed])

    def dump(self, items: list[Any]) -> bytes:
        parts = [self.id, _LENGTH.pack(len(items))]
        for item in items:
            blob = self.item_bytes(item)
            parts += [_LENGTH.pack(len(blob)), blob]
        return b"".join(parts)

    def load(self, payload: bytes, chunks: int) -> list[Any]:
        """The ``chunks`` ciphertexts in a blob; raises ValueError if it was made under other key
        material or does not decode."""
        if payload[:16] != self.id:
            raise ValueError("ciphertext was made under another context (its key fingerprint differs)")
        try:
            (count,), offset = _LENGTH.unpack_from(payload, 16), 16 + _LENGTH.size
            if count != chunks:
                raise ValueError(f"{count} ciphertexts, expected {chunks}")
            items = []
            for _ in range(count):
                (length,) = _LENGTH.unpack_from(payload, offset)
                offset += _LENGTH.size
                items.append(self.item_from(payload[offset:offset + length]))
                offset += length
            if offset != len(payload):
                raise ValueError(f"{len(payload) - offset} bytes after the ciphertexts")
        except (struct.error, RuntimeError, ValueError) as e:  # RuntimeError: SEAL's "ciphertext data is invalid"
            raise ValueError(f"ciphertext does not decode: {e}") from e
        return items


class CipherSum:
    """The running sum of encrypted updates an aggregator holds, and the contributions in it:
    ``(device, round, receipt)`` of each update added, the receipt (hex) being the device's proof
    that it sent it (``packing.receipt``). Sums merge by adding, like a ``Partial``."""

    def __init__(self, public: Public, chunks: int) -> None:
        self.public, self.chunks = public, chunks
        self.items: list[Any] | None = None
        self.contributions: list[tuple[int, int, str]] = []

    def add(self, payload: bytes, device: int, round: int) -> None:
        """Add one device's sealed update (its receipt, then its ciphertexts); raises ValueError if
        the blob does not load."""
        receipt, blob = payload[:RECEIPT_BYTES], payload[RECEIPT_BYTES:]
        self._add(self.public.load(blob, self.chunks), [(device, round, receipt.hex())])

    def merge(self, other: CipherSum) -> None:
        if other.items is not None:
            self._add(other.items, other.contributions)

    def _add(self, items: list[Any], contributions: list[tuple[int, int, str]]) -> None:
        self.items = items if self.items is None else [self.public.add(t, i) for t, i in zip(self.items, items)]
        self.contributions += contributions

    def to_bytes(self) -> bytes:
        """The contributions (JSON) and the summed ciphertexts; empty for an empty sum."""
        if self.items is None:
            return b""
        header = json.dumps(self.contributions).encode()
        return _LENGTH.pack(len(header)) + header + self.public.dump(self.items)

    @classmethod
    def from_bytes(cls, public: Public, chunks: int, payload: bytes) -> CipherSum:
        """Decode ``to_bytes``; raises ValueError when it is malformed."""
        total = cls(public, chunks)
        if payload:
            try:
                (n,) = _LENGTH.unpack_from(payload)
                contributions = [(int(d), int(r), str(receipt))
                                 for d, r, receipt in json.loads(payload[_LENGTH.size:_LENGTH.size + n])]
            except (struct.error, ValueError, TypeError) as e:
                raise ValueError(f"encrypted sum has malformed contributions: {e}") from e
            total._add(public.load(payload[_LENGTH.size + n:], chunks), contributions)
        return total


def public_for(scheme: str, public: bytes, slots: int) -> Public:
    """The ``Public`` side of ``scheme`` ("ckks" or "paillier")."""
    if scheme == "ckks":
        from fedray.secure.ckks import CKKSPublic

        return CKKSPublic(public, slots)
    from fedray.secure.paillier import PaillierPublic

    return PaillierPublic(public, slots)


def keys_for(scheme: str, params: dict) -> Any:
    """The key authority's ``Keys`` of ``scheme``, made from its ``params``."""
    if scheme == "ckks":
        from fedray.secure.ckks import CKKSKeys

        return CKKSKeys(**params)
    from fedray.secure.paillier import PaillierKeys

    return PaillierKeys(**params)
