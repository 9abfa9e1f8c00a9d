"""WorkerPool: the DeviceWorker actors of one run, and the device tasks in flight on them.

Every call trains or evaluates one device. Ray errors become per-device failure reasons; a worker
that dies or hangs is replaced (its other tasks fail with it), so one bad device does not poison
the run. The workers themselves are an ``ActorGroup``.
"""

from __future__ import annotations

import time
from collections import Counter, deque
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import ray
from ray.autoscaler.sdk import request_resources

from fedray.agents.attacks import choose_attackers
from fedray.agents.heterogeneity import planned_steps
from fedray.agents.state import DeviceState
from fedray.agents.worker import DeviceWorker
from fedray.config import JobSpec
from fedray.config.privacy import sample_level
from fedray.config.resources import gpus_to_ask
from fedray.data.partition import Split
from fedray.platform import privacy
from fedray.platform.actors import ActorGroup, finished, result
from fedray.platform.records import DeviceRecords

if TYPE_CHECKING:  # intake imports this module
    from fedray.platform.intake import Intake

START_TIMEOUT_S = 600  # workers may wait for the autoscaler to add nodes


@dataclass(frozen=True)
class Task:
    """A device call in flight: ``tag`` is the caller's (the round or model version it serves)."""

    device: int
    tag: Any
    worker: int
    generation: int
    submitted: float
    record: ray.ObjectRef | None = None  # a fit's new device record (simulation)
    published: ray.ObjectRef | None = None  # what a peer published for its neighbours


@dataclass(frozen=True)
class Done:
    """A finished task: its ``value``, or why it failed (``failure``)."""

    task: Task
    value: Any = None
    failure: str | None = None
    worker_lost: bool = False  # the failure is the worker's death, not the device's error


class WorkerPool:
    """Creates the workers once and sends each device task to a worker of the device's group.

    ``groups`` splits the devices into groups with worker options of their own (an edge's devices
    and the node resources or labels that place them); default one group of all devices.
    Simulation: ``devices.workers`` workers (default: one per CPU of the cluster) shared out over
    the groups, at least one each; any worker of a group trains any of its devices, and the
    device's state record (``DeviceState``, kept in ``records``) travels with the task. Deployment:
    one worker per device, which keeps the device's record itself. Under sample-level DP the pool
    keeps every device's spend (``spend``) and charges it in ``fit``. With encrypted aggregation
    the key ``authority`` (an actor) starts the workers. ``initial``: the model's starting state
    dict, when the job starts from other weights.
    """

    def __init__(self, job: JobSpec, data: ray.ObjectRef, num_classes: int, split: Split,
                 groups: list[tuple[np.ndarray, dict[str, Any]]] | None = None, authority: Any = None,
                 initial: ray.ObjectRef | None = None) -> None:
        count = job.devices.count
        self.deployment = job.devices.mode == "deployment"
        groups = groups or [(np.arange(count), {})]
        if self.deployment:  # a device's worker is the device
            groups = [(np.array([d]), options) for devices, options in groups for d in devices]
        cluster = ray.cluster_resources()
        cpus = max(1, int(cluster.get("CPU", 1)))
        resources = job.devices.resources
        # GPUs each worker asks for (0 on a cluster without, under gpu: auto; said in ``note``)
        self._gpus_per_worker, self.note = gpus_to_ask(resources, cluster.get("GPU", 0.0))
        default = int(cluster["GPU"] // self._gpus_per_worker) if self._gpus_per_worker else cpus
        per_group = max(1, (job.devices.workers or default) // len(groups))
        sizes = split.train_sizes
        self.group_of = np.empty(count, dtype=np.int64)
        self.group_workers: list[list[int]] = []
        self._options: list[dict[str, Any]] = []
        for g, (devices, options) in enumerate(groups):
            n = min(per_group, len(devices))
            self.group_of[devices] = g
            self.group_workers.append(list(range(len(self._options), len(self._options) + n)))
            self._options += [options] * n
        num_workers = len(self._options)
        self._split = split
        # expected work of a device's training: its planned steps (the largest go first)
        unique, index = np.unique(sizes, return_inverse=True)
        self._work = np.array([planned_steps(job, int(n)) for n in unique], dtype=np.float64)[index]
        # devices with a speed spend most of a task waiting: a worker takes them all at once
        self._slots = 1 if job.devices.speed is None else count
        # scale_up: one CPU each, which the autoscaler adds (``run_job`` asks it); else more workers
        # than CPUs share them rather than waiting for a free one
        self._cpus_per_worker = resources.num_cpus or (1.0 if job.devices.scale_up else min(1.0, cpus / num_workers))
        self._actor_class = ray.remote(DeviceWorker)
        self.attackers = (choose_attackers(count, job.attack.fraction, job.seed) if job.attack else frozenset())
        self._args, self._authority, self._initial = (job, data, num_classes), authority, initial
        self._peers = job.peers is not None
        self._devices = job.devices
        # sample-level DP: every device's spend, kept here, where no worker's failure can lose it
        self.spend = privacy.DeviceLedger(job, sizes.tolist()) if sample_level(job) else None
        self.records = DeviceRecords()
        if job.devices.scale_up:  # withdrawn by ``run_job`` when the run ends
            request_resources(bundles=[{"CPU": 1}] * num_workers)
        self.workers = ActorGroup(self._spawn, self._options, "device worker")
        # started before the first round, whose deadline should not pay for it (scale_up: the first
        # one; the rest join as their nodes do); a worker that cannot start (a user model that does
        # not import) fails the run here, with its error
        self.workers.wait_started(1 if job.devices.scale_up else num_workers, START_TIMEOUT_S,
                                  f"each needs {self._cpus_per_worker:g} CPU and {self._gpus_per_worker:g} GPU; "
                                  "does the cluster have them?")
        self.pending: dict[ray.ObjectRef, Task] = {}
        self._dropped: dict[ray.ObjectRef, Task] = {}
        self._queue: deque[tuple[int, str, tuple, dict, Any]] = deque()  # trainings waiting for a free worker
        self._fresh: list[ray.ObjectRef] = []  # the refs of the queued batch's started fits
        self._returned: dict[int, ray.ObjectRef] = {}  # device -> record its last returned task made

    def _spawn(self, w: int, placement: dict[str, Any]) -> Any:
        options = {"num_cpus": self._cpus_per_worker, "num_gpus": self._gpus_per_worker, "max_restarts": 0,
                   **placement}
        if self._peers:  # every value a peer worker returns goes to its node's object store, none to the driver
            options["runtime_env"] = {"env_vars": {"RAY_max_direct_call_object_size": "0"}}
        group = next(g for g, workers in enumerate(self.group_workers) if w in workers)
        devices = np.flatnonzero(self.group_of == group)
        shards = self._split.of(devices)
        args = (*self._args, shards, self.attackers.intersection(devices.tolist()))
        keeps = {"keeps_state": self.deployment, "reference": self._split.reference, "initial": self._initial}
        if self._authority is None:
            actor = self._actor_class.options(**options).remote(*args, **keeps)
        else:  # the key authority starts it, handing it its devices' tag seeds; args nested: data stays a ref
            (actor,) = ray.get(self._authority.spawn.remote(options, [args], keeps), timeout=START_TIMEOUT_S)
        return actor

    def regroup(self, group_of: np.ndarray, group_workers: list[list[int]]) -> None:
        """New groups (e.g. one per edge once edges are placed by their workers' nodes): device d
        trains on the workers ``group_workers[group_of[d]]``, which must hold its data already."""
        self.group_of, self.group_workers = np.asarray(group_of), group_workers

    def _workers_of(self, device: int, up: set[int]) -> list[int]:
        """The workers of ``device``'s group that are ``up``; all of them while none is (a task then
        waits in a starting worker)."""
        group = self.group_workers[self.group_of[device]]
        return [w for w in group if w in up] or group

    def fit(self, device: int, round: int, *args: Any, tag: Any = None, **kwargs: Any) -> ray.ObjectRef:
        """Have ``device`` train for ``round`` (``DeviceWorker.fit``) now, on the worker of its
        group that is up with the least expected work pending."""
        return self._start(device, (round, *args), kwargs, tag, self._least_loaded(device), "fit")

    def fit_all(self, devices: np.ndarray, round: int, *args: Any, tag: Any = None, **kwargs: Any
                ) -> list[ray.ObjectRef]:
        """Have ``devices`` train for ``round``, largest expected work first, each on the next
        worker of its group that is free. Returns the refs of the tasks started so far, a list
        that ``as_completed`` extends as the rest start; ``settle`` fails those never started."""
        return self.queue_all("fit", devices, lambda _: ((round, *args), kwargs), tag)

    def queue_all(self, method: str, devices: np.ndarray, call: Any, tag: Any = None) -> list[ray.ObjectRef]:
        """``fit_all`` for any ``method`` of the workers that ``_start`` knows, called
        for device d with the (args, kwargs) ``call(d)`` gives."""
        order = sorted((int(d) for d in devices), key=lambda d: -self._work[d])
        self._queue = deque((d, method, *call(d), tag) for d in order)
        self._fresh = []
        self._feed()
        return self._fresh

    def _feed(self) -> list[ray.ObjectRef]:
        """Start the queued fits whose group has a free worker, in queue order; their refs."""
        busy = Counter(task.worker for task in self.pending.values())
        started, waiting, up = [], deque(), self.workers.up()
        for d, method, args, kwargs, tag in self._queue:
            free = [w for w in self._workers_of(d, up) if busy[w] < self._slots]
            if not free:
                waiting.append((d, method, args, kwargs, tag))
                continue
            w = min(free, key=lambda w: busy[w])
            busy[w] += 1
            started.append(self._start(d, args, kwargs, tag, w, method))
        self._queue = waiting
        self._fresh += started
        return started

    def _least_loaded(self, device: int) -> int:
        load = Counter()
        for task in self.pending.values():
            load[task.worker] += self._work[task.device]
        return min(self._workers_of(device, self.workers.up()), key=lambda w: load[w])

    def _start(self, device: int, args: tuple, kwargs: dict, tag: Any, w: int, method: str) -> ray.ObjectRef:
        """Start ``method`` (``fit``: returns the update and the record; ``peer_round`` and
        ``peer_mix``, which does not train: the metrics, record and what it publishes) for
        ``device`` on worker ``w``."""
        if self.spend is not None and method != "peer_mix":  # sample-level DP: charged when sent the model
            kwargs = kwargs | {"spent": self.spend.charge(device, args[0])}
        if not self.deployment:
            kwargs = kwargs | {"state": self.records.ref(device)}
        call = getattr(self.workers.actors[w], method).options(num_returns=2 if method == "fit" else 3)
        ref, record, *published = call.remote(device, *args, **kwargs)
        self.pending[ref] = Task(device, tag, w, self.workers.generation[w], time.monotonic(), record, *published)
        return ref

    def submit(self, method: str, device: int, *args: Any, tag: Any = None, **kwargs: Any) -> ray.ObjectRef:
        """Call ``method(device, *args, **kwargs)`` on a worker of the device's group; the task
        stays in ``pending`` until ``wait``, ``drop`` or ``expire`` hands it back."""
        w = self._least_loaded(device)
        ref = getattr(self.workers.actors[w], method).remote(int(device), *args, **kwargs)
        self.pending[ref] = Task(int(device), tag, w, self.workers.generation[w], time.monotonic())
        return ref

    def evaluate_samples(self, shares: list[np.ndarray], params: ray.ObjectRef) -> list[ray.ObjectRef]:
        """Evaluate ``params`` on ``shares`` (index arrays into the data: the server's held-out
        set), spread over the workers that are up: pending tasks of device -1, tagged with the
        share's index (none if no worker is up)."""
        up = sorted(self.workers.up())
        refs = []
        for i, share in enumerate(shares if up else []):
            w = up[i % len(up)]
            refs.append(self.workers.actors[w].evaluate_samples.remote(share, params))
            self.pending[refs[-1]] = Task(-1, i, w, self.workers.generation[w], time.monotonic())
        return refs

    def take_records(self, accepted: list[int]) -> None:
        """After a round: the records of the ``accepted`` devices' returned tasks become theirs
        (deployment: the devices changed their own)."""
        for d in accepted:
            if self.deployment:
                self.records.changed.add(d)
            elif d in self._returned:
                self.records.commit(d, self._returned[d])
        self._returned.clear()

    def record_refs(self, devices: list[int]) -> dict[int, ray.ObjectRef]:
        """Refs to the records of those ``devices`` that have one (deployment: asked of the devices)."""
        if not self.deployment:
            return self.records.refs(devices)
        return {d: self.workers.actors[self.group_workers[self.group_of[d]][0]].state.remote(d) for d in devices}

    def restore_records(self, records: dict[int, DeviceState]) -> None:
        """Records from a checkpoint (deployment: handed to the devices)."""
        if not self.deployment:
            self.records.load(records)
            return
        ray.get([self.workers.actors[self.group_workers[self.group_of[d]][0]].restore.remote({d: r})
                 for d, r in records.items()], timeout=START_TIMEOUT_S)

    def wait(self, refs: list[ray.ObjectRef], timeout: float) -> list[Done]:
        """Wait at most ``timeout`` seconds for one of ``refs`` (pending tasks) to finish; return
        every one of them that has, with its value or failure."""
        refs = [ref for ref in refs if ref in self.pending]
        return [self._resolve(ref) for ref in finished(refs, timeout)] if refs else []

    def arrivals(self, timeout: float) -> list[tuple[ray.ObjectRef, Task]]:
        """Wait at most ``timeout`` seconds for a pending task to finish; hand back every one that
        has, no longer pending and not yet fetched (``resolve`` here, or an edge, fetches it)."""
        return [(ref, self.pending.pop(ref)) for ref in finished(list(self.pending), timeout)] if self.pending else []

    def resolve(self, ref: ray.ObjectRef, task: Task) -> Done:
        """The value or failure of a finished ``task`` that is no longer pending."""
        done = outcome(ref, task)
        self.returned(task, done.worker_lost)
        return done

    def _resolve(self, ref: ray.ObjectRef) -> Done:
        return self.resolve(ref, self.pending.pop(ref))

    def returned(self, task: Task, worker_lost: bool) -> None:
        """A task whose result was fetched (here, or by an edge): keep the record it made, for
        ``take_records``; replace its worker if it died."""
        if task.record is not None:
            self._returned[task.device] = task.record
        if worker_lost:
            self.workers.replace(task.worker, task.generation)

    def as_completed(self, refs: list[ray.ObjectRef], until: float) -> Iterator[Done]:
        """Yield the tasks of ``refs``, and of the queued fits as they start, as they finish,
        until all have or ``time.monotonic()`` reaches ``until``."""
        refs = list(refs)
        while (left := until - time.monotonic()) > 0:
            refs += self._feed()
            if not any(ref in self.pending for ref in refs):
                return
            yield from self.wait(refs, left)

    def expire(self, timeout: float, refs: list[ray.ObjectRef] | None = None) -> list[Done]:
        """Fail the pending tasks (of ``refs``, default all) submitted more than ``timeout``
        seconds ago, replacing their workers: a worker that does not answer is hung. So is one
        still busy with a task dropped ``timeout`` seconds after it was submitted."""
        now = time.monotonic()
        if self._dropped:
            finished, _ = ray.wait(list(self._dropped), num_returns=len(self._dropped), timeout=0)
            for ref in finished:
                del self._dropped[ref]
        old = [ref for ref in (self.pending if refs is None else refs)
               if ref in self.pending and now - self.pending[ref].submitted >= timeout]
        stuck = [ref for ref, task in self._dropped.items() if now - task.submitted >= timeout]
        tasks = [self.pending[ref] for ref in old] + [self._dropped.pop(ref) for ref in stuck]
        for w, generation in {(task.worker, task.generation) for task in tasks}:
            self.workers.replace(w, generation)
        return [Done(self.pending.pop(ref), failure=f"no answer within {timeout:g}s (devices.timeout_s)")
                for ref in old if ref in self.pending]

    def settle(self, tag: Any, fresh: list[ray.ObjectRef], carried: list[ray.ObjectRef], intake: Intake) -> int | None:
        """After a synchronous round's wait: fail (in ``intake``) the tasks older than
        ``devices.timeout_s``, whose workers are hung; with a deadline, drop the ``fresh`` tasks
        still running (``late: drop``) and the ``carried`` ones that missed again. Returns how many
        fresh tasks were late (None without a deadline)."""
        devices = self._devices
        for done in self.expire(devices.timeout_s):
            intake.fail(done.task.device, done.failure)
        for d, *_ in self._queue:  # every worker was busy until the deadline
            intake.fail(d, f"no worker was free within the round's {devices.round_wait_s:g}s")
        unstarted, self._queue = len(self._queue), deque()
        if devices.deadline_s is None:
            return None
        late = [ref for ref in fresh if ref in self.pending]
        # a late update gets one more round's deadline (devices.late: next_round), no more
        for task in self.drop(carried + (late if devices.late == "drop" else [])):
            missed = "the round deadline" if task.tag == tag else f"the deadlines of rounds {task.tag} and {tag}"
            intake.fail(task.device, f"missed {missed} ({devices.deadline_s:g}s, devices.deadline_s)")
        return len(late) + unstarted

    def drop(self, refs: list[ray.ObjectRef]) -> list[Task]:
        """Cancel pending tasks whose results are no longer wanted and return them. ``expire``
        still watches them: a worker that cannot stop one is hung."""
        tasks = []
        for ref in refs:
            if ref in self.pending:
                tasks.append(self.pending.pop(ref))
                self._dropped[ref] = tasks[-1]
                ray.cancel(ref)
        return tasks


def outcome(ref: ray.ObjectRef, task: Task) -> Done:
    """The finished ``task``'s value, or its failure: the device's own error, or its worker's death."""
    value, error, lost = result(ref)
    if error is None:
        return Done(task, value)
    return Done(task, failure=f"worker {task.worker} failed: {error}" if lost else error, worker_lost=lost)
