"""KeyAuthority: the only holder of the secret key (CKKS or Paillier). A plain class; the driver
makes it an actor.

It hands out the public key material, gives each device a secret tag seed when the device enrolls, and
decrypts a sum only if it verifiably is the plain sum of at least ``min_clients`` different
devices' updates, none of which it has decrypted before: the tag digits in every ciphertext must
equal the sum of the claimed contributions' tags, which only the devices and the authority can
compute. So an aggregator cannot get one update decrypted, alone, scaled, added to itself, under
another context, or as the difference of two sums.

Trust: the authority holds the secret key and does not collude with aggregators. In this simulation
it gives a device's seed to whichever actor enrolls it; a deployment authenticates devices before
enrolling them.
"""

from __future__ import annotations

import secrets

import numpy as np

from fedray.secure import packing
from fedray.secure.ciphers import CipherSum, keys_for, public_for
from fedray.secure.plan import SecurePlan


class DecryptionRefused(ValueError):
    """The authority will not decrypt a sum; the message says why."""


class KeyAuthority:
    def __init__(self, plan: SecurePlan) -> None:
        self.plan = plan
        self._keys = keys_for(plan.scheme, plan.params)
        self._public_bytes = self._keys.public_bytes()
        self._public = public_for(plan.scheme, self._public_bytes, plan.layout.slots)
        self._seeds: dict[int, int] = {}
        self._decrypted: set[tuple[int, int]] = set()

    def public_context(self) -> bytes:
        """The serialized public key material (a CKKS context without its secret key): it encrypts
        and adds, and cannot decrypt."""
        return self._public_bytes

    def enroll(self, devices: list[int]) -> tuple[bytes, dict[int, int]]:
        """The public context and each of ``devices``' secret tag seed, drawn when it first enrolls:
        a replaced worker gets its devices' seeds again, so their updates already summed still verify."""
        for d in devices:
            self._seeds.setdefault(int(d), secrets.randbits(128))
        return self._public_bytes, {int(d): self._seeds[int(d)] for d in devices}

    def decrypt(self, sealed: bytes) -> np.ndarray:
        """The integer field sums (int64, ``plan.layout.length``) of an encrypted sum given as
        ``CipherSum.to_bytes``. Raises ``DecryptionRefused`` for fewer than ``min_clients``
        devices, a contribution claimed twice or decrypted before, an unknown device, or tags that
        do not match the claimed contributions; ValueError for a sum that does not decode."""
        plan, layout = self.plan, self.plan.layout
        total = CipherSum.from_bytes(self._public, layout.chunks, sealed)
        claimed = total.contributions
        devices = {d for d, _ in claimed}
        if len(devices) < plan.min_clients:
            raise DecryptionRefused(f"the sum holds updates of {len(devices)} device(s); the authority decrypts only "
                                    f"sums of at least secure.min_clients = {plan.min_clients} devices")
        if len(set(claimed)) < len(claimed):
            raise DecryptionRefused("the sum claims a contribution twice")
        if len(claimed) > plan.max_contributions:
            raise DecryptionRefused(f"the sum claims {len(claimed)} contributions, more than the "
                                    f"{plan.max_contributions} its fields have headroom for")
        unknown = sorted(devices - set(self._seeds))
        if unknown:
            raise DecryptionRefused(f"devices {unknown} never enrolled")
        again = sorted(set(claimed) & self._decrypted)
        if again:
            raise DecryptionRefused(f"contributions {again} (device, round) were decrypted before; another sum "
                                    "over them could reveal a difference")
        values, tags = layout.unpack(self._keys.decrypt(total.items))
        expected = sum(packing.tags(self._seeds[d], r, layout.chunks, layout.tag_fields, plan.bits) for d, r in claimed)
        if not np.array_equal(tags, expected):
            raise DecryptionRefused(f"the ciphertext is not the plain sum of the {len(claimed)} contributions it claims: "
                                    "its tags do not match (altered, scaled, or made under another context)")
        self._decrypted.update(claimed)
        return values
