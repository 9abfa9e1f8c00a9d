"""Edge aggregators: the tier between devices and the driver.

``EdgeAggregator`` (one actor per edge, on its edge's nodes) waits for its devices' updates,
checks them and folds them into a Partial, and sends that one Partial up. Under HierFAVG it also
keeps an edge model and averages into it for several edge rounds per cloud round. ``Edges`` is the
driver's handle on them: it creates, calls and recreates the actors.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import ray
from ray.exceptions import GetTimeoutError, RayError

from fedray.config import JobSpec
from fedray.platform import strategies
from fedray.platform.aggregation import Partial
from fedray.platform.intake import Intake
from fedray.platform.pool import START_TIMEOUT_S, Task, finished, first_line, node_ids, outcome

EDGE_GRACE_S = 60.0  # an edge that has not answered this long after its devices' time is hung


@dataclass
class EdgeReport:
    """What an edge sends up after an edge round: after the last, its Partial (``partial``, the
    wire bytes); before it (HierFAVG), a ref to its new edge model. ``collected`` lists the tasks
    it took a result of, as (index into the tasks it was given, whether the worker died)."""

    intake: Intake
    collected: list[tuple[int, bool]] = field(default_factory=list)
    partial: bytes | None = None
    model: Any = None  # ray.ObjectRef


class EdgeAggregator:
    """Edge ``edge`` of a job. A plain class; ``Edges`` makes it an actor."""

    def __init__(self, job: JobSpec, edge: int, size: int, train_sizes: list[int]) -> None:
        self.edge = edge
        self._strategy = strategies.build(job.strategy, job.devices.local.momentum, job.devices.count)
        self._size, self._train_sizes = size, train_sizes
        self._edge_rounds = job.topology.edge_rounds
        self._global: np.ndarray | None = None
        self._model: np.ndarray | None = None

    def node_id(self) -> str:
        """The Ray node this edge runs on (answering also says it has started)."""
        return ray.get_runtime_context().get_node_id()

    def collect(self, edge_round: int, k: int, tasks: list[tuple[Task, list[ray.ObjectRef]]], seconds: float,
                start: np.ndarray | None = None) -> EdgeReport:
        """Edge round ``k`` (0-based; ``edge_round`` counts all edge rounds of the run and is the
        round devices trained for): take the results of ``tasks`` (each ref wrapped in a list, so
        Ray hands it over unresolved) that finish within ``seconds``, check and fold them. ``start``
        (edge round 0) is the global model the devices trained from."""
        until = time.monotonic() + seconds
        if k == 0:
            self._global = self._model = start
        intake, partial = Intake(), Partial.zeros(self._size)
        report = EdgeReport(intake)
        index = {refs[0]: i for i, (_, refs) in enumerate(tasks)}
        left = list(index)
        while left and (remaining := until - time.monotonic()) > 0:
            for ref in finished(left, remaining):
                left.remove(ref)
                task = tasks[index[ref]][0]
                done = outcome(ref, task)
                report.collected.append((index[ref], done.worker_lost))
                update = intake.accept(done, task.tag, size=self._size, train_sizes=self._train_sizes,
                                       expect_control=self._strategy.control_variates)
                if update is None:
                    continue
                if task.tag < edge_round:  # a late update carried over from an earlier round
                    intake.staleness.append(edge_round - task.tag)
                self._strategy.fold(partial, update)
        if self._edge_rounds == 1:
            report.partial = partial.to_bytes()
            return report
        if partial.count:  # HierFAVG: the edge model moves to its devices' average
            self._model = self._model + partial.mean()
        if k < self._edge_rounds - 1:
            report.model = ray.put(self._model)
            return report
        weight = partial.weight  # the edge's last edge round weighs its whole edge model's change
        change = (self._model - self._global) * np.float32(weight)
        report.partial = Partial(change, weight, weight, partial.count).to_bytes()
        return report


class Edges:
    """The edge actors of a run, created once with per-edge ``options`` (placement) and recreated
    when one dies. An edge whose actor has not started (its node is gone and none replaced it) is
    down; its devices fail for the round without being asked to train."""

    def __init__(self, job: JobSpec, size: int, train_sizes: list[int], options: list[dict[str, Any]]) -> None:
        self._job, self._size, self._train_sizes = job, size, train_sizes
        self._options = options
        self._started: dict[int, ray.ObjectRef] = {}  # edge -> its node id, once its actor has started
        self.actors = [self._spawn(e) for e in range(len(options))]
        try:  # started before the first round, as the workers are
            ray.get(list(self._started.values()), timeout=START_TIMEOUT_S)
        except GetTimeoutError:
            raise RuntimeError(f"the {len(options)} edge aggregators did not start within {START_TIMEOUT_S}s") from None

    def _spawn(self, e: int) -> Any:
        actor = ray.remote(EdgeAggregator).options(num_cpus=0, max_restarts=0, **self._options[e]).remote(
            self._job, e, self._size, self._train_sizes)
        self._started[e] = actor.node_id.remote()
        return actor

    def down(self) -> dict[int, str]:
        """``{edge: reason}`` for the edges that cannot take a round now; recreates dead ones."""
        down = {}
        for e, ref in self._started.items():
            if not finished([ref], 0):
                down[e] = f"edge {e} is not up (its actor awaits a node: {self._options[e] or 'any'})"
                continue
            try:
                ray.get(ref)
            except RayError as err:
                down[e] = f"edge {e} died: {type(err).__name__}"
                self.replace(e)
        return down

    def collect(self, edge_round: int, k: int, tasks: dict[int, list[tuple[Task, list[ray.ObjectRef]]]],
                seconds: float, start: ray.ObjectRef | None) -> tuple[dict[int, EdgeReport], dict[int, str]]:
        """Run edge round ``k`` on the edges in ``tasks``; return each answering edge's report and
        ``{edge: reason}`` for the edges that failed, which are recreated for later rounds."""
        calls = {self.actors[e].collect.remote(edge_round, k, edge_tasks, seconds, start): e
                 for e, edge_tasks in tasks.items()}
        reports, failed = {}, {}
        until = time.monotonic() + seconds + EDGE_GRACE_S
        left = list(calls)
        while left and (remaining := until - time.monotonic()) > 0:
            for ref in finished(left, remaining):
                left.remove(ref)
                e = calls[ref]
                try:
                    reports[e] = ray.get(ref)
                except RayError as err:
                    failed[e] = f"edge {e} failed: {type(err).__name__}: {first_line(err)}"
                    self.replace(e)
        for ref in left:
            e = calls[ref]
            failed[e] = f"edge {e} did not answer within {seconds + EDGE_GRACE_S:g}s"
            self.replace(e)
        return reports, failed

    def replace(self, e: int) -> None:
        ray.kill(self.actors[e], no_restart=True)
        self.actors[e] = self._spawn(e)

    def nodes(self, timeout: float = 60) -> list[str | None]:
        """The node each edge runs on, None for one not up within ``timeout`` seconds."""
        return node_ids(list(self._started.values()), timeout)
