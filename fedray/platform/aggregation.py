"""Partial: the associative running sum that every aggregation tier folds updates into."""

from __future__ import annotations

import math
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from fedray.update import Update

# weight, steps_weight, below-clip count, count, vector length, has control sums, encrypted bytes, bytes of the sum
_HEADER = struct.Struct("<dddqq?qq")


@dataclass
class Partial:
    """Sums over the updates folded in: ``weighted_sum = sum w_i delta_i / a_i``, ``weight = sum w_i``,
    ``steps_weight = sum w_i a_i`` and ``count``, where ``w_i`` is the update's weight (its samples)
    and ``a_i`` its effective local steps (1 unless the strategy normalizes, as FedNova does).

    ``control_sum`` is the plain sum of the devices' control-variate changes (SCAFFOLD), or None;
    ``below_clip`` the sum of their below-clip indicators (adaptive clipping under client-level DP).
    With encrypted aggregation ``weighted_sum`` covers the plaintext coordinates and ``sealed`` (a
    ``fedray.secure.ciphers.CipherSum``) sums the encrypted rest, which the devices weighted themselves.

    Partials from disjoint sets of devices merge by addition, so devices -> edge -> cloud is the
    same fold at every tier. ``add`` and ``merge`` accumulate in place, in float64, so the order in
    which updates arrive does not change the float32 results; the wire format is float32.
    """

    weighted_sum: np.ndarray
    weight: float = 0.0
    steps_weight: float = 0.0
    count: int = 0
    control_sum: np.ndarray | None = None
    below_clip: float = 0.0
    sealed: Any = None  # CipherSum

    @classmethod
    def zeros(cls, size: int, sums: Any = None) -> Partial:
        """An empty Partial of ``size`` plaintext coordinates; with ``sums`` (an aggregator's
        ``SumLoader``, under encrypted aggregation) also an empty encrypted sum."""
        return cls(np.zeros(size), sealed=None if sums is None else sums.empty())

    def fold(self, update: Update, weight: float, steps: float = 1.0) -> None:
        """Add ``update`` with ``weight`` and effective ``steps``: its delta, control change,
        below-clip indicator and encrypted part."""
        self.add(update.delta, weight, steps, update.control)
        self.below_clip += update.below_clip or 0.0
        if update.sealed is not None:
            self.sealed.add(update.sealed, update.device_id, update.round)

    def add(self, delta: np.ndarray, weight: float, steps: float = 1.0, control: np.ndarray | None = None) -> None:
        if weight <= 0 or steps <= 0:
            raise ValueError(f"update weight and steps must be > 0, got {weight} and {steps}")
        self.weighted_sum += (weight / steps) * delta.astype(np.float64)
        self.weight += weight
        self.steps_weight += weight * steps
        self.count += 1
        self._add_control(control)

    def merge(self, other: Partial) -> None:
        self.weighted_sum += other.weighted_sum
        self.weight += other.weight
        self.steps_weight += other.steps_weight
        self.count += other.count
        self.below_clip += other.below_clip
        self._add_control(other.control_sum)
        if other.sealed is not None:
            self.sealed.merge(other.sealed)

    def _add_control(self, control: np.ndarray | None) -> None:
        if control is None:
            return
        if self.control_sum is None:
            self.control_sum = np.zeros_like(self.weighted_sum)
        self.control_sum += control

    def to_bytes(self, encode: Callable[[np.ndarray], bytes] | None = None) -> bytes:
        """The wire format an edge sends up: a fixed header, the weighted sum (float32, or as
        ``encode`` writes it), the control sums (float32) and the encrypted sum."""
        body = self.weighted_sum.astype(np.float32)
        body = body.tobytes() if encode is None else encode(body)
        control = b"" if self.control_sum is None else self.control_sum.astype(np.float32).tobytes()
        sealed = b"" if self.sealed is None else self.sealed.to_bytes()
        return (_HEADER.pack(self.weight, self.steps_weight, self.below_clip, self.count, self.weighted_sum.size,
                             self.control_sum is not None, len(sealed), len(body))
                + body + control + sealed)

    @classmethod
    def from_bytes(cls, payload: bytes, size: int, load_sealed: Callable[[bytes], Any] | None = None,
                   decode: Callable[[bytes], np.ndarray] | None = None) -> Partial:
        """Decode and check a Partial of vectors of ``size`` (its weighted sum with ``decode`` when
        compressed, its encrypted sum with ``load_sealed``); raises ValueError naming what is wrong."""
        if len(payload) < _HEADER.size:
            raise ValueError(f"partial payload of {len(payload)} bytes is shorter than its header")
        weight, steps_weight, below_clip, count, length, has_control, sealed, body = _HEADER.unpack_from(payload)
        controls = 4 * size * has_control
        if (length != size or min(sealed, body) < 0 or (decode is None and body != 4 * size)
                or len(payload) != _HEADER.size + body + controls + sealed):
            raise ValueError(f"partial holds {len(payload) - _HEADER.size} bytes for a {body}-byte sum of {length} "
                             f"values, {controls} bytes of control sums and {sealed} encrypted bytes, expected "
                             f"vectors of {size}" + ("" if decode is None else " (the sum compressed)"))
        if sealed and load_sealed is None:
            raise ValueError("partial has an encrypted sum, but this run aggregates in plaintext")
        if load_sealed is not None and count and not sealed:
            raise ValueError(f"partial of {count} updates has no encrypted sum")
        raw = payload[_HEADER.size:_HEADER.size + body]
        weighted = np.frombuffer(raw, dtype=np.float32).copy() if decode is None else decode(raw)
        control = (np.frombuffer(payload, dtype=np.float32, offset=_HEADER.size + body, count=size).copy()
                   if has_control else None)
        if not (np.isfinite(weighted).all() and (control is None or np.isfinite(control).all())
                and math.isfinite(weight) and math.isfinite(steps_weight) and math.isfinite(below_clip)):
            raise ValueError("partial has non-finite sums")
        if count < 0 or weight < 0 or (count == 0) != (weight == 0):
            raise ValueError(f"partial has count {count} and weight {weight}")
        return cls(weighted, weight, steps_weight, count, control, below_clip,
                   None if load_sealed is None else load_sealed(payload[len(payload) - sealed:] if sealed else b""))

    def mean(self) -> np.ndarray:
        """The weighted mean of the (normalized) deltas. Raises ValueError on an empty Partial."""
        if self.count == 0:
            raise ValueError("cannot take the mean of an empty aggregate")
        return (self.weighted_sum / self.weight).astype(np.float32)

    def effective_steps(self) -> float:
        """``sum w_i a_i / sum w_i``: 1 for plain averaging, FedNova's tau_eff when normalizing."""
        return self.steps_weight / self.weight
