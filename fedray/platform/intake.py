"""Intake: what an aggregator (the driver, or an edge) received in a round, and the check every
update passes before it is folded."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from fedray.compression.codecs import Chain
from fedray.platform.aggregation import Partial
from fedray.platform.pool import Done
from fedray.update import Update, rejection_reason


@dataclass
class Intake:
    """Failure reasons per device (and edge), the bytes each upload took, the loss of the accepted
    updates, the staleness of late ones and the devices a robust rule flagged."""

    failures: dict[int, str] = field(default_factory=dict)
    failed_tasks: int = 0
    uploads: list[tuple[int, int]] = field(default_factory=list)  # (device, bytes) of each payload received
    loss_sum: float = 0.0
    samples: int = 0
    staleness: list[int] = field(default_factory=list)
    flagged: list[int] = field(default_factory=list)
    edge_failures: dict[int, str] = field(default_factory=dict)  # edges that failed or were down, with why
    accepted: list[int] = field(default_factory=list)  # the devices whose updates passed the check
    folded: list[int] = field(default_factory=list)  # asynchronous: the devices whose updates were folded
    stale_dropped: int = 0  # asynchronous: valid updates staler than strategy.max_staleness
    device_epsilon: dict[int, tuple[float, float]] = field(default_factory=dict)  # sample-level DP: spent, next
    residual_norms: list[float] = field(default_factory=list)  # compression: the accepted updates' error feedback

    @property
    def bytes_up(self) -> int:
        return sum(n for _, n in self.uploads)

    def fail(self, device: int, reason: str) -> None:
        self.failures[device] = reason
        self.failed_tasks += 1

    def accept(self, done: Done, expected_round: int, *, size: int, train_sizes: list[int],
               expect_control: bool, expect_sealed: bool = False, codec: Chain | None = None) -> Update | None:
        """The valid Update a finished task returned (its delta decoded by ``codec``, under
        compression), or None with the reason in ``failures``."""
        d = done.task.device
        if done.failure is not None:
            self.fail(d, done.failure)
            return None
        self.uploads.append((d, len(done.value)))
        try:
            update = Update.from_bytes(done.value)
        except ValueError as e:
            self.fail(d, str(e))
            return None
        told = (update.epsilon, update.epsilon_next)  # kept even if the update is rejected: it was sent
        if all(type(e) is float and math.isfinite(e) and e >= 0 for e in told):
            self.device_epsilon[d] = told
        if codec is not None:
            if update.delta.dtype != np.uint8:
                self.fail(d, f"rejected: device {d} sent a {update.delta.dtype} delta; this run's updates are compressed")
                return None
            try:
                update = replace(update, delta=codec.decode(update.delta, expected_round, d))
            except ValueError as e:
                self.fail(d, f"rejected: device {d}'s compressed update: {e}")
                return None
        reason = rejection_reason(update, expected_device=d, expected_round=expected_round, expected_size=size,
                                  expected_samples=train_sizes[d], expect_control=expect_control,
                                  expect_sealed=expect_sealed)
        if reason is not None:
            self.fail(d, f"rejected: {reason}")
            return None
        self.loss_sum += update.train_loss * update.num_samples
        self.samples += update.num_samples
        self.accepted.append(d)
        if update.residual_norm is not None:
            self.residual_norms.append(update.residual_norm)
        return update

    def fold_arrival(self, done: Done, staleness: int, strategy: Any, partial: Partial,
                     drift: Callable[[], np.ndarray], **check: Any) -> None:
        """Check an asynchronous task's update (``check``: as for ``accept``) and fold it into
        ``partial`` with an ``AsyncStrategy``, unless it is too stale."""
        update = self.accept(done, done.task.tag[0], **check)
        if update is None:
            return
        if strategy.fold(partial, update, staleness, drift):
            self.folded.append(done.task.device)
            self.staleness.append(staleness)
        else:
            self.stale_dropped += 1

    def merge(self, other: Intake) -> None:
        self.failures.update(other.failures)
        self.failed_tasks += other.failed_tasks
        self.uploads += other.uploads
        self.loss_sum += other.loss_sum
        self.samples += other.samples
        self.staleness += other.staleness
        self.flagged += other.flagged
        self.accepted += other.accepted
        self.folded += other.folded
        self.stale_dropped += other.stale_dropped
        self.device_epsilon.update(other.device_epsilon)
        self.residual_norms += other.residual_norms
