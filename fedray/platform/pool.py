"""WorkerPool: the DeviceWorker actors of one run, and calling them with a deadline.

Ray errors and timeouts become per-device failure reasons; a dead or hung worker is replaced
before the next call, so one bad round does not poison the run.
"""

from __future__ import annotations

import time
from collections import defaultdict
from typing import Any

import numpy as np
import ray
from ray.exceptions import GetTimeoutError, RayError

from fedray.agents.attacks import choose_attackers
from fedray.agents.worker import DeviceWorker
from fedray.config import JobSpec
from fedray.data.partition import Split


class WorkerPool:
    """Creates the workers once and routes each device to its sticky worker.

    Simulation: ``devices.workers`` workers (default: one per CPU of the cluster), devices spread
    so that every worker holds about the same number of training samples (``balanced_assignment``).
    Deployment: one worker per device.
    """

    def __init__(self, job: JobSpec, data: ray.ObjectRef, num_classes: int, split: Split) -> None:
        count = job.devices.count
        cpus = max(1, int(ray.cluster_resources().get("CPU", 1)))
        if job.devices.mode == "deployment":
            num_workers = count
        else:
            num_workers = min(job.devices.workers or cpus, count)
        self.worker_of = balanced_assignment([len(t) for t in split.train], num_workers)
        self._shards = [{int(d): (split.train[d], split.test[d]) for d in np.flatnonzero(self.worker_of == w)}
                        for w in range(num_workers)]
        # more workers than CPUs share them rather than waiting for a free one
        self._actor_class = ray.remote(DeviceWorker).options(num_cpus=min(1.0, cpus / num_workers), max_restarts=0)
        self.attackers = (choose_attackers(count, job.attack.fraction, job.seed) if job.attack else frozenset())
        self._args = (job, data, num_classes)
        self.actors = [self._spawn(w) for w in range(num_workers)]

    def _spawn(self, w: int) -> Any:
        return self._actor_class.remote(*self._args, self._shards[w], self.attackers.intersection(self._shards[w]))

    def call(self, method: str, device_ids: np.ndarray, *args: Any, timeout: float
             ) -> tuple[list[tuple[dict, dict]], dict[int, str]]:
        """Call ``method(ids, *args)`` on every worker hosting some of ``device_ids``, wait at most
        ``timeout`` seconds in all, and return the workers' results and ``{device: reason}`` for the
        devices of workers that died or did not answer in time."""
        by_worker: dict[int, list[int]] = defaultdict(list)
        for d in device_ids:
            by_worker[int(self.worker_of[d])].append(int(d))
        pending = {getattr(self.actors[w], method).remote(ids, *args): w for w, ids in by_worker.items()}
        results, failures = [], {}
        deadline = time.monotonic() + timeout
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1, timeout=max(0.0, deadline - time.monotonic()))
            if not ready:
                break
            w = pending.pop(ready[0])
            try:
                results.append(ray.get(ready[0], timeout=timeout))
            except (RayError, GetTimeoutError) as e:
                failures.update({d: f"worker {w} failed: {type(e).__name__}: {_first_line(e)}" for d in by_worker[w]})
                self._replace(w)
        for w in pending.values():
            failures.update({d: f"no answer within {timeout:g}s (devices.timeout_s)" for d in by_worker[w]})
            self._replace(w)
        return results, failures

    def _replace(self, w: int) -> None:
        ray.kill(self.actors[w], no_restart=True)
        self.actors[w] = self._spawn(w)


def balanced_assignment(sizes: list[int], num_workers: int) -> np.ndarray:
    """Worker index per device: largest devices first, each to the worker with the fewest samples so
    far (LPT). Every device is equally likely to be sampled, so this balances the expected work."""
    load = np.zeros(num_workers, dtype=np.int64)
    worker_of = np.empty(len(sizes), dtype=np.int64)
    for d in np.argsort(sizes, kind="stable")[::-1]:
        w = int(np.argmin(load))
        worker_of[d] = w
        load[w] += sizes[d]
    return worker_of


def _first_line(error: Exception) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else ""
