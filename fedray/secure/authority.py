"""KeyAuthority: the only holder of the secret key (CKKS or Paillier). A plain class; the driver
makes it an actor.

It hands out the public key material, starts the device workers (handing each its devices' secret
tag seeds as it creates them: no call of the authority returns a seed, so nothing that holds only
its handle, the driver or an edge, can enroll as a device or learn a seed), and decrypts a sum only
if it verifiably is the plain sum of at least ``min_clients`` different devices' updates, each of
which the device sent and none of which it has decrypted or refused before:
- every claimed contribution carries the device's receipt for its round (an HMAC under its seed),
  so a sum cannot claim an update nobody sent;
- the tag digits in every ciphertext (``fedray.config.secure.TAG_BITS`` secret bits) must equal the sum of the
  claimed contributions' tags, which only the devices and the authority can compute;
- a refused sum burns the contributions it claimed with valid receipts: they are never decrypted,
  so a forger gets one guess, not one per retry.
So an aggregator cannot get one update decrypted, alone, scaled, added to itself, padded with
claims of devices that sent nothing, under another context, or as the difference of two sums.

Trust: the authority holds the secret key and does not collude with aggregators. The threat model,
and what the simulation cannot enforce (the driver loads every device's data; any holder of a Ray
actor handle can run code in that actor), is in docs/secure.md.
"""

from __future__ import annotations

import hmac
import secrets
from typing import Any

import numpy as np

from fedray.secure import packing
from fedray.secure.ciphers import CipherSum, keys_for, public_for
from fedray.secure.plan import SecurePlan


class DecryptionRefused(ValueError):
    """The authority will not decrypt a sum; the message says why."""


class KeyAuthority:
    """With ``checkpoints`` (a run's checkpoint location) it writes what it decrypts there before
    decrypting, and starts from what the run's earlier authorities decrypted: a resumed run's
    authority, which has new keys and seeds (no secret is ever written), still refuses every
    contribution decrypted before the crash."""

    def __init__(self, plan: SecurePlan, checkpoints: str | None = None) -> None:
        from fedray.platform.checkpoint import CheckpointStore

        self.plan = plan
        self._store = checkpoints and CheckpointStore(checkpoints)
        self._keys = keys_for(plan.scheme, plan.params)
        self._public_bytes = self._keys.public_bytes()
        self._public = public_for(plan.scheme, self._public_bytes, plan.layout.slots)
        self._seeds: dict[int, int] = {}
        # (device, round) contributions decrypted or burned, by this authority or the run's before it
        self._spent: set[tuple[int, int]] = self._store.decrypted() if self._store else set()

    def public_context(self) -> bytes:
        """The serialized public key material (a CKKS context without its secret key): it encrypts
        and adds, and cannot decrypt."""
        return self._public_bytes

    def spawn(self, options: dict[str, Any], args: list, keywords: dict[str, Any] | None = None) -> list:
        """Start a device worker actor (``ray.remote(DeviceWorker).options(**options)``) with the
        constructor arguments ``args[0]`` (job, data, classes, shards, attackers), ``keywords`` and
        its devices' tag seeds, drawn when a device is first provisioned: a replaced worker gets its devices'
        seeds again, so their updates already summed still verify. Returns ``[handle]``."""
        import ray

        from fedray.agents.worker import DeviceWorker

        job, data, num_classes, shards, attackers = args[0]
        seeds = {int(d): self._seeds.setdefault(int(d), secrets.randbits(128)) for d in shards.devices}
        sealing = (self.plan, self._public_bytes, seeds)
        return [ray.remote(DeviceWorker).options(**options).remote(job, data, num_classes, shards, attackers, sealing,
                                                                   **(keywords or {}))]

    def decrypt(self, sealed: bytes) -> np.ndarray:
        """The integer field sums (int64, ``plan.layout.length``) of an encrypted sum given as
        ``CipherSum.to_bytes``. Raises ``DecryptionRefused`` (burning the claimed contributions
        that have valid receipts) for a contribution without a valid receipt, fewer than
        ``min_clients`` devices, a contribution claimed twice or spent before, or tags that do not
        match the claimed contributions; ValueError for a sum that does not decode."""
        total = CipherSum.from_bytes(self._public, self.plan.layout.chunks, sealed)
        sent = [(d, r) for d, r, receipt in total.contributions
                if d in self._seeds and hmac.compare_digest(packing.receipt(self._seeds[d], d, r).hex(), receipt)]
        if self._store and sent:
            self._store.record_decryption(sent)
        try:  # decrypted or refused, each contribution with a valid receipt is spent
            return _open(self.plan, self._keys, self._seeds, self._spent, total, sent)
        finally:
            self._spent.update(sent)


def _open(plan: SecurePlan, keys: Any, seeds: dict[int, int], spent: set[tuple[int, int]], total: CipherSum,
          sent: list[tuple[int, int]]) -> np.ndarray:
    """Decrypt ``total`` if its claimed contributions are all ``sent``, different, enough, not
    ``spent``, and its tags match them. (A function, not a method: an actor offers every method.)"""
    layout = plan.layout
    claimed = [(d, r) for d, r, _ in total.contributions]
    unsent = sorted(set(claimed) - set(sent))
    if unsent:
        raise DecryptionRefused(f"the sum claims contributions {unsent} (device, round) that no device sent: "
                                "their receipts do not verify")
    devices = {d for d, _ in claimed}
    if len(devices) < plan.min_clients:
        raise DecryptionRefused(f"the sum holds updates of {len(devices)} device(s); the authority decrypts only "
                                f"sums of at least secure.min_clients = {plan.min_clients} devices")
    if len(set(claimed)) < len(claimed):
        raise DecryptionRefused("the sum claims a contribution twice")
    if len(claimed) > plan.max_contributions:
        raise DecryptionRefused(f"the sum claims {len(claimed)} contributions, more than the "
                                f"{plan.max_contributions} its fields have headroom for")
    again = sorted(set(claimed) & spent)
    if again:
        raise DecryptionRefused(f"contributions {again} (device, round) were decrypted or refused before; another "
                                "sum over them could reveal a difference")
    values, tags = layout.unpack(keys.decrypt(total.items))
    expected = sum(packing.tags(seeds[d], r, layout.chunks, layout.tag_fields, plan.bits) for d, r in claimed)
    if not np.array_equal(tags, expected):
        raise DecryptionRefused(f"the ciphertext is not the plain sum of the {len(claimed)} contributions it claims: "
                                "its tags do not match (altered, scaled, or made under another context)")
    return values
