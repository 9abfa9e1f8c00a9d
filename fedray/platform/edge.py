"""Edge aggregators: the tier between devices and the driver.

``EdgeAggregator`` (one actor per edge, on its edge's nodes) waits for its devices' updates,
checks them and folds them into a Partial, and sends that one Partial up. Under HierFAVG it also
keeps an edge model and averages into it for several edge rounds per cloud round. ``Edges`` is the
driver's handle on them: it creates, calls and recreates the actors and runs a round through them.
``start_tiers`` creates the device workers and the edges, each placed on its nodes.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from fedray.compression.codecs import Chain
from fedray.config import JobSpec
from fedray.data.partition import Split
from fedray.platform import strategies, topology
from fedray.platform.actors import ActorGroup, finished
from fedray.platform.aggregation import Partial
from fedray.platform.intake import Intake
from fedray.platform.pool import START_TIMEOUT_S, Task, WorkerPool, outcome
from fedray.secure.plan import SecurePlan, SumLoader

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

    def __init__(self, job: JobSpec, edge: int, size: int, train_sizes: list[int],
                 sealing: tuple[SecurePlan, bytes] | None = None, codec: Chain | None = None) -> None:
        self.edge = edge
        self._strategy = strategies.for_job(job)
        self._check = {"size": size, "train_sizes": train_sizes, "expect_control": self._strategy.control_variates,
                       "expect_sealed": sealing is not None, "codec": codec}
        self._size = size
        self._sums = None if sealing is None else SumLoader(*sealing)  # encrypted aggregation: add ciphertexts
        self._up = Chain.edge(job, size)  # compression.edge: what the Partial's sum goes up as
        self._seed = None if job.privacy else job.seed  # rounding from OS entropy under privacy, as on devices
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
        intake, partial = Intake(), Partial.zeros(self._size, self._sums)
        report = EdgeReport(intake)
        index = {refs[0]: i for i, (_, refs) in enumerate(tasks)}
        left = list(index)
        while left and (remaining := until - time.monotonic()) > 0:
            for ref in finished(left, remaining):
                left.remove(ref)
                task = tasks[index[ref]][0]
                done = outcome(ref, task)
                report.collected.append((index[ref], done.worker_lost))
                update = intake.accept(done, task.tag, **self._check)
                if update is None:
                    continue
                if task.tag < edge_round:  # a late update carried over from an earlier round
                    intake.staleness.append(edge_round - task.tag)
                self._strategy.fold(partial, update)
        if self._edge_rounds == 1:
            report.partial = self._wire(partial, edge_round)
            return report
        if partial.count:  # HierFAVG: the edge model moves to its devices' average
            self._model = self._model + partial.mean()
        if k < self._edge_rounds - 1:
            report.model = ray.put(self._model)
            return report
        weight = partial.weight  # the edge's last edge round weighs its whole edge model's change
        change = (self._model - self._global) * np.float32(weight)
        report.partial = self._wire(Partial(change, weight, weight, partial.count), edge_round)
        return report

    def fold_arrivals(self, arrivals: list[tuple[Task, list[ray.ObjectRef], int]], models: dict[int, ray.ObjectRef],
                      current: int) -> EdgeReport:
        """Asynchronous strategies: check and fold finished device tasks, each given as (task, [its
        result ref], staleness), into one Partial. ``models`` holds refs to the model versions
        (``current`` is the server's) that FedAsync rebases stale deltas on."""
        intake, partial = Intake(), Partial.zeros(self._size, self._sums)
        report = EdgeReport(intake)
        for i, (task, (ref,), staleness) in enumerate(arrivals):
            done = outcome(ref, task)
            report.collected.append((i, done.worker_lost))
            started = task.tag[1]
            intake.fold_arrival(done, staleness, self._strategy, partial,
                                lambda: ray.get(models[started]) - ray.get(models[current]), **self._check)
        report.partial = self._wire(partial, current)
        return report

    def _wire(self, partial: Partial, round: int) -> bytes:
        """``partial``'s bytes, its sum through compression.edge's codecs (which ignore the round;
        ``round`` seeds the rounding)."""
        if self._up is None:
            return partial.to_bytes()
        rng = np.random.default_rng(None if self._seed is None else [self._seed, round, self.edge, 17])
        return partial.to_bytes(lambda x: self._up.encode(x, 0, self.edge, rng))


def start_tiers(job: JobSpec, data: ray.ObjectRef, num_classes: int, split: Split, size: int,
                sealing: tuple[SecurePlan, Any, bytes] | None = None, initial: ray.ObjectRef | None = None,
                codec: Chain | None = None) -> tuple[WorkerPool, Edges | None]:
    """The device workers, and with a topology the edge actors, each edge and its devices' workers
    placed on the edge's nodes. ``size`` is what the tiers sum in plaintext; with encrypted
    aggregation ``sealing`` is the plan, the key authority and its public context. ``initial``:
    the model's starting state dict (``model.start``); ``codec``: the edges' decoder, under compression."""
    tree = job.topology
    authority = None if sealing is None else sealing[1]
    edges = None if sealing is None else (sealing[0], sealing[2])
    if tree is None:
        return WorkerPool(job, data, num_classes, split, authority=authority, initial=initial), None
    missing = topology.missing_placement(tree, ray.nodes())
    if missing:
        raise RuntimeError(f"topology.placement: no alive node offers {', '.join(missing)}; start edge nodes "
                           "with ray start --resources '{\"edge_0\": 1}' or --labels region=..., to match")
    if tree.assign == "colocated":
        pool = WorkerPool(job, data, num_classes, split, [(np.arange(job.devices.count), {"scheduling_strategy": "SPREAD"})],
                          authority, initial)
        edge_of_worker, nodes = topology.colocated(pool.workers.nodes(), tree.edges)
        edge_of = np.arange(job.devices.count) % tree.edges
        pool.regroup(edge_of, [np.flatnonzero(edge_of_worker == e).tolist() for e in range(tree.edges)])
        options = [{"scheduling_strategy": NodeAffinitySchedulingStrategy(node, soft=True)} for node in nodes]
    else:
        edge_of = topology.assign(job)
        options = [topology.placement_options(tree, e) for e in range(tree.edges)]
        pool = WorkerPool(job, data, num_classes, split,
                          [(np.flatnonzero(edge_of == e), options[e]) for e in range(tree.edges)], authority, initial)
    return pool, Edges(job, size, split.train_sizes.tolist(), options, edge_of.tolist(), pool, edges, codec)


class Edges:
    """The edge actors of a run (an ``ActorGroup``), created once with per-edge ``options``
    (placement) and recreated when one dies; ``edge_of[d]`` is device d's edge, ``pool`` the
    workers hosting the devices. An edge whose actor has not started (its node is gone and none
    replaced it) is down; its devices fail for the round without being asked to train."""

    def __init__(self, job: JobSpec, size: int, train_sizes: list[int], options: list[dict[str, Any]],
                 edge_of: list[int], pool: WorkerPool, sealing: tuple[SecurePlan, bytes] | None = None,
                 codec: Chain | None = None) -> None:
        self._job, self._size, self._train_sizes, self._codec = job, size, train_sizes, codec
        self._up = Chain.edge(job, size)
        self._sealing, self._sums = sealing, None if sealing is None else SumLoader(*sealing)
        self.edge_of, self._pool = edge_of, pool
        self.group = ActorGroup(self._spawn, options, "edge")
        self.group.wait_started(len(options), START_TIMEOUT_S)  # before the first round, as the workers are

    def _spawn(self, e: int, placement: dict[str, Any]) -> Any:
        return ray.remote(EdgeAggregator).options(num_cpus=0, max_restarts=0, **placement).remote(
            self._job, e, self._size, self._train_sizes, self._sealing, self._codec)

    def run_round(self, r: int, sampled: np.ndarray, refs: list[ray.ObjectRef], options: dict[str, Any], down: int,
                  intake: Intake) -> tuple[Partial, list, dict[str, float]]:
        """Train cloud round ``r``'s sampled devices through their edges (``refs``: the broadcast
        objects, ``options``: keyword arguments of ``fit``, ``down``: bytes a device downloads),
        which fold their updates for ``topology.edge_rounds`` edge rounds; return the merged
        Partial, no raw updates (edges only fold) and the round's tier metrics. A device of an
        edge that is down or fails fails with the edge's reason."""
        pool, edge_of, edge_rounds = self._pool, self.edge_of, self._job.topology.edge_rounds
        intake.edge_failures = self.group.down()
        if intake.edge_failures:
            pool.workers.replace_lost()
        live = []
        for d in sampled.tolist():
            if edge_of[d] in intake.edge_failures:
                intake.fail(d, intake.edge_failures[edge_of[d]])
            else:
                live.append(d)
        partial, metrics = Partial.zeros(self._size, self._sums), {}
        models: dict[int, ray.ObjectRef] = {}  # edge -> the edge model its devices train from next
        uploads: dict[int, list[list[int]]] = {}  # edge -> bytes of each upload, per edge round
        sent_up: dict[int, int] = {}  # edge -> bytes of its Partial
        carried, dispatched, reached = list(pool.pending), 0, 0
        wait = self._job.devices.round_wait_s
        for k in range(edge_rounds):
            t = (r - 1) * edge_rounds + k + 1  # the edge round devices train for
            sent_at = time.time()
            fresh = [pool.fit(d, t, sent_at, models.get(edge_of[d], refs[0]), *refs[1:], tag=t, **options)
                     for d in live]
            dispatched += len(fresh)
            tasks: dict[int, list[tuple[Task, list[ray.ObjectRef]]]] = {}
            for ref in fresh + carried:
                task = pool.pending[ref]
                tasks.setdefault(edge_of[task.device], []).append((task, [ref]))
            reached = reached or len(tasks)  # the edges sent the global model
            start = refs[0] if k == 0 else None
            reports, failed = self.group.gather({self.group.actors[e].collect.remote(t, k, edge_tasks, wait, start): e
                                                 for e, edge_tasks in tasks.items()}, wait + EDGE_GRACE_S)
            for e, report in reports.items():
                for i, lost in report.collected:
                    pool.returned(pool.pending.pop(tasks[e][i][1][0]), lost)
                if report.model is not None:
                    models[e] = report.model
                    intake.merge(report.intake)
                elif self._merge(e, report, partial, intake, metrics, failed):
                    sent_up[e] = len(report.partial)
                else:
                    continue
                uploads.setdefault(e, []).append([n for _, n in report.intake.uploads])
            for e in failed:
                pool.drop([ref for _, (ref,) in tasks[e]])
            self._failed(failed, [task for e in failed for task, _ in tasks[e]], intake)
            live = [d for d in live if edge_of[d] not in failed]
            late = pool.settle(t, fresh, carried, intake)
            if late is not None:
                metrics["late"] = metrics.get("late", 0) + late
            carried = []
        metrics.update(bytes_down=dispatched * down, bytes_device_edge=intake.bytes_up + dispatched * down,
                       bytes_edge_cloud=reached * down + sum(sent_up.values()))
        if self._job.network is not None:
            metrics["sim_comm_seconds"] = max((topology.edge_seconds(self._job.network, down, uploads[e], sent_up.get(e, 0))
                                               for e in uploads), default=0.0)
        return partial, [], metrics

    def fold_arrivals(self, arrivals: list[tuple[ray.ObjectRef, Task, int]], models: dict[int, ray.ObjectRef],
                      current: int, down: dict[int, str], intake: Intake) -> tuple[Partial, dict[str, float]]:
        """Asynchronous strategies: have each device's edge fold its finished tasks, given as (result
        ref, task, staleness); return the merged Partial and the tier metrics (per-edge
        participants, the bytes sent up). The tasks of an edge that is ``down`` (``{edge: reason}``)
        or fails fail with the edge's reason."""
        pool, partial, metrics, sent_up = self._pool, Partial.zeros(self._size, self._sums), {}, 0
        by_edge: dict[int, list[tuple[Task, list[ray.ObjectRef], int]]] = {}
        for ref, task, staleness in arrivals:
            by_edge.setdefault(self.edge_of[task.device], []).append((task, [ref], staleness))
        self._failed(down, [task for e in down for task, _, _ in by_edge.pop(e, [])], intake)
        reports, failed = self.group.gather({self.group.actors[e].fold_arrivals.remote(batch, models, current): e
                                             for e, batch in by_edge.items()}, EDGE_GRACE_S)
        for e, report in reports.items():
            for i, lost in report.collected:
                pool.returned(by_edge[e][i][0], lost)
            if self._merge(e, report, partial, intake, metrics, failed):
                sent_up += len(report.partial)
        self._failed(failed, [task for e in failed for task, _, _ in by_edge[e]], intake)
        return partial, metrics | {"bytes_edge_cloud": sent_up}

    def _merge(self, e: int, report: EdgeReport, partial: Partial, intake: Intake, metrics: dict[str, float],
               failed: dict[int, str]) -> bool:
        """Merge edge ``e``'s Partial and intake into the round's; False (with the reason in
        ``failed``) if its Partial does not decode."""
        try:
            decode = None if self._up is None else (lambda blob: self._up.decode(blob, 0, e))
            edge_partial = Partial.from_bytes(report.partial, self._size, self._sums and self._sums.load, decode)
        except ValueError as err:
            failed[e] = f"edge {e} sent a bad partial: {err}"
            return False
        partial.merge(edge_partial)
        intake.merge(report.intake)
        metrics[f"participants_edge_{e}"] = metrics.get(f"participants_edge_{e}", 0) + edge_partial.count
        return True

    def _failed(self, failed: dict[int, str], tasks: list[Task], intake: Intake) -> None:
        """Fail ``tasks`` with the reason (in ``failed``) of their edge, and record the edges in
        ``intake.edge_failures`` (an edge's first reason in a round stays)."""
        for task in tasks:
            intake.fail(task.device, failed[self.edge_of[task.device]])
        intake.edge_failures = failed | intake.edge_failures
        if failed:
            self._pool.workers.replace_lost()
