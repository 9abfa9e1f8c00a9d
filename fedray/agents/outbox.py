"""What a device sends: its trained (and, under DP, privatized) update as the wire carries it:
float32, through the job's codecs, or sealed for encrypted aggregation, the part a lossy codec drops
kept in the device's record (error feedback). No Ray."""

from __future__ import annotations

from dataclasses import replace
from typing import NamedTuple

import numpy as np

from fedray.agents.state import DeviceState
from fedray.compression.codecs import Chain
from fedray.config.secure import value_range
from fedray.secure.plan import SecurePlan, Sealer


class Sent(NamedTuple):
    """The Update's fields that depend on how it travels."""

    delta: np.ndarray  # float32, the encoded bytes (uint8) or, sealed, the plaintext coordinates
    loss: float
    below_clip: float | None
    sealed: bytes | None
    residual_norm: float | None


class Outbox:
    """A worker's sending side for ``job``: ``strategy`` weighs sealed updates, ``shapes`` are the
    federated parameters', ``sealing`` the plan, public context and tag seeds (encrypted aggregation)."""

    def __init__(self, job, strategy, shapes, sealing: tuple[SecurePlan, bytes, dict[int, int]] | None) -> None:
        self._job, self._strategy = job, strategy
        self._sealer = None if sealing is None else Sealer(*sealing)
        self._codec = Chain.uplink(job, shapes)
        self._feedback = bool(job.compression and job.compression.uplink and job.compression.error_feedback)

    def send(self, device: int, round: int, samples: int, steps: int, delta: np.ndarray, loss: float,
             indicator: float | None, state: DeviceState, clip: float | None, bound: float | None
             ) -> tuple[Sent, DeviceState]:
        """``delta`` (with the ``loss`` and adaptive-clip ``indicator`` to report) as it travels,
        and ``state`` with its new residual. ``clip``: the round's DP clip (for the encrypted range);
        ``bound``: client-level DP's, which what a codec sends stays within. Randomness that rounds
        what is sent is secret under privacy (OS entropy). The residual's norm is reported only
        without privacy and encryption: it is a statistic of the device's data, which those keep
        from the aggregators (as they do its loss)."""
        private = self._job.privacy is not None
        residual = (np.zeros_like(delta) if state.residual is None else state.residual) if self._feedback else None
        if self._sealer is not None:
            rng = np.random.default_rng() if private else np.random.default_rng([self._job.seed, round, device, 5])
            target = delta if residual is None else delta + residual
            plain, sealed, sent = self._seal(device, round, samples, steps, target, loss, indicator, clip, rng,
                                             count_clipped=not private)
            if residual is not None:  # the plaintext coordinates go exactly, the sealed ones as rounded
                residual = np.zeros_like(target)
                coordinates = self._sealer.plan.sent(round)
                residual[self._sealer.plan.encrypted] = target[self._sealer.plan.encrypted]
                residual[coordinates] -= sent
            out = Sent(plain, 0.0, None, sealed, None)
        elif self._codec is not None:
            rng = np.random.default_rng() if private else np.random.default_rng([self._job.seed, round, device, 13])
            blob, _, residual = self._codec.compress(delta, residual, round, device, rng, bound)
            out = Sent(np.frombuffer(blob, dtype=np.uint8), loss, indicator, None, None)
        else:
            return Sent(delta, loss, indicator, None, None), state
        if residual is None:
            return out, state
        norm = None if private or out.sealed is not None else float(np.linalg.norm(residual))
        return out._replace(residual_norm=norm), replace(state, residual=residual.astype(np.float32))

    def _seal(self, device: int, round: int, samples: int, steps: int, delta: np.ndarray, loss: float,
              indicator: float | None, clip: float | None, rng: np.random.Generator, count_clipped: bool
              ) -> tuple[np.ndarray, bytes, np.ndarray]:
        """Encrypt the round's coordinates of ``delta``, pre-weighted as the strategy weighs the
        update, with the loss (weighted by its samples) and the adaptive-clip indicator: the
        plaintext coordinates, the blob, and what was sealed (``Sealer.seal``). ``count_clipped``:
        send the share of values beyond the range (not under privacy: a count of noised values)."""
        plan = self._sealer.plan
        weight, effective = self._strategy.weigh(samples, steps)
        extras = (loss * samples / plan.sample_scale, indicator or 0.0)
        return self._sealer.seal(device, round, delta, weight / effective / plan.weight_scale,
                                 value_range(self._job, clip), extras, rng, count_clipped=count_clipped)
