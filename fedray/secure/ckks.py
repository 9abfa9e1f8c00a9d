"""CKKS with TenSEAL: the key authority's secret context, and the public context devices and
aggregators hold (encrypt and add only). No Ray."""

from __future__ import annotations

import numpy as np
import tenseal as ts

from fedray.secure.ciphers import Public


class CKKSKeys:
    """A fresh CKKS context with its secret key: only the key authority makes and keeps one."""

    def __init__(self, degree: int, moduli: tuple[int, ...], scale_bits: int) -> None:
        self.context = ts.context(ts.SCHEME_TYPE.CKKS, poly_modulus_degree=degree, coeff_mod_bit_sizes=list(moduli),
                                  n_threads=1)
        self.context.global_scale = 2.0 ** scale_bits

    def public_bytes(self) -> bytes:
        """The context without its secret key (nor the key-switching keys adding never needs)."""
        return self.context.serialize(save_public_key=True, save_secret_key=False, save_galois_keys=False,
                                      save_relin_keys=False)

    def decrypt(self, vectors: list[ts.CKKSVector]) -> np.ndarray:
        """``(chunks, slots)`` float64 plaintext slots."""
        key = self.context.secret_key()
        return np.array([vector.decrypt(key) for vector in vectors])


class CKKSPublic(Public):
    def __init__(self, public: bytes, slots: int) -> None:
        super().__init__(public, slots)
        self.context = ts.context_from(public, n_threads=1)
        if self.context.is_private():
            raise ValueError("a public context must not hold a secret key")

    def encrypt_row(self, row: np.ndarray) -> ts.CKKSVector:
        return ts.ckks_vector(self.context, row.astype(np.float64).tolist())

    def add(self, total: ts.CKKSVector, item: ts.CKKSVector) -> ts.CKKSVector:
        total += item
        return total

    def item_bytes(self, item: ts.CKKSVector) -> bytes:
        return item.serialize()

    def item_from(self, blob: bytes) -> ts.CKKSVector:
        vector = ts.ckks_vector_from(self.context, blob)
        if vector.size() != self.slots:
            raise ValueError(f"a ciphertext holds {vector.size()} slots, expected {self.slots}")
        return vector
