"""Flat: the tier of a run without edges, where the driver takes its devices' updates and folds
them itself. It answers the driver as ``edge.Edges`` does (``run_round`` for a synchronous round,
``fold_arrivals`` for asynchronous arrivals), so the driver's round loops do not depend on the
topology."""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import ray

from fedray.config import JobSpec
from fedray.platform import topology
from fedray.platform.aggregation import Partial
from fedray.platform.intake import Intake
from fedray.platform.pool import Task, WorkerPool
from fedray.update import Update


class Flat:
    """The devices of ``pool`` report to the driver. ``check`` is what every update is checked
    against (``Intake.accept``); ``sums`` the encrypted sums' loader, with encrypted aggregation."""

    def __init__(self, job: JobSpec, strategy: Any, pool: WorkerPool, check: dict[str, Any], sums: Any = None) -> None:
        self._job, self._strategy, self._pool, self._check, self._sums = job, strategy, pool, check, sums

    def run_round(self, r: int, sampled: np.ndarray, refs: list[ray.ObjectRef], options: dict[str, Any], down: int,
                  intake: Intake) -> tuple[Partial, list[Update], dict[str, float]]:
        """Train round ``r``'s ``sampled`` devices (``refs``: the broadcast objects, ``options``:
        keyword arguments of ``fit``, ``down``: bytes a device downloads, on average) and fold their updates:
        the Partial of a linear strategy, or the raw updates for a robust rule; and the round's
        metrics so far. Late updates of the last round join if they arrive."""
        pool, strategy = self._pool, self._strategy
        carried = list(pool.pending)
        fresh = pool.fit_all(sampled, r, time.time(), *refs, tag=r, **options)
        partial, raw = Partial.zeros(self._check["size"], self._sums), []  # raw kept whole for robust rules
        for done in pool.as_completed(fresh + carried, time.monotonic() + self._job.devices.round_wait_s):
            update = intake.accept(done, done.task.tag, **self._check)
            if update is None:
                continue
            if done.task.tag < r:
                intake.staleness.append(r - done.task.tag)
            if strategy.reduce is None:
                strategy.fold(partial, update)
            else:
                raw.append(update)
        metrics: dict[str, float] = {"bytes_down": len(sampled) * down}
        late = pool.settle(r, fresh, carried, intake)
        if late is not None:
            metrics["late"] = late
        if self._job.network is not None:
            metrics["sim_comm_seconds"] = topology.flat_seconds(self._job.network, down, [n for _, n in intake.uploads])
        return partial, raw, metrics

    def fold_arrivals(self, arrivals: list[tuple[ray.ObjectRef, Task, int]], models: dict[int, ray.ObjectRef],
                      current: int, down: dict[int, str], intake: Intake) -> tuple[Partial, dict[str, float]]:
        """Asynchronous strategies: check and fold finished tasks, given as (result ref, task,
        staleness); ``models`` holds the model versions a mixing strategy rebases stale deltas on,
        ``current`` the current one. Returns their Partial and no tier metrics (no edges)."""
        partial = Partial.zeros(self._check["size"], self._sums)
        for ref, task, staleness in arrivals:
            version = task.tag[1]
            intake.fold_arrival(self._pool.resolve(ref, task), staleness, self._strategy, partial,
                                lambda: ray.get(models[version]) - ray.get(models[current]), **self._check)
        return partial, {}
