"""Driver: owns one run. Samples devices, broadcasts the global model, aggregates, evaluates and is
the only process that talks to MLflow. A plain class; ``fedray.run`` makes it an actor."""

from __future__ import annotations

import json
import time
from collections import Counter, deque
from dataclasses import dataclass, field, replace

import numpy as np
import ray
import torch

from fedray.compression.codecs import Chain
from fedray.config import JobSpec
from fedray.config.privacy import client_level, min_participants, sampling_rate
from fedray.platform import edge, outputs, privacy, snapshot, strategies
from fedray.platform.checkpoint import CheckpointStore
from fedray.platform.downlink import Downlink
from fedray.platform.evaluation import Evaluation
from fedray.platform.flat import Flat
from fedray.config.base import quorum
from fedray.platform.aggregation import Partial
from fedray.platform.intake import Intake
from fedray.platform.pool import Task
from fedray.platform.peers import Peers
from fedray.platform.prepare import prepare
from fedray.platform.sealing import Sealing
from fedray.platform.strategies import AsyncStrategy
from fedray.platform.tracking import Tracker
from fedray.transfer.layout import lay_out


@dataclass
class RoundResult:
    """What happened in one round (for async strategies: one server step); ``metrics`` are the
    values logged to MLflow at step ``round``."""

    round: int
    completed: bool
    metrics: dict[str, float]
    failures: dict[int, str] = field(default_factory=dict)
    evaluation_failures: dict[int, str] = field(default_factory=dict)
    flagged: list[int] = field(default_factory=list)  # devices a robust rule flagged as suspect
    edge_failures: dict[int, str] = field(default_factory=dict)
    tracking: str = ""  # records not yet in MLflow, and why
    updates: list[int] = field(default_factory=list)  # devices whose updates were accepted (not under client DP)


class Driver:
    def __init__(self, job: JobSpec, run_dir: str, job_yaml: str, resume: str | None = None) -> None:
        """Set up the run whose MLflow run and journal ``run_dir`` holds (``tracking.start_run``);
        with ``resume`` (a checkpoint location), continue it from that checkpoint."""
        torch.set_num_threads(1)
        self.job, self.job_yaml = job, job_yaml
        self.tracker = Tracker(run_dir)
        try:
            dataset, split, self.model, self.layout, initial = prepare(job, self.tracker.uri)
            self.data_digest = snapshot.data_digest(dataset.x, dataset.y) if job.checkpoint else None
            self.example = dataset.x[:2].copy()  # input example for the logged model's signature
            self.holdout_inputs = dataset.x[split.holdout[:256]]  # inputs an exported model is checked on
            self._train_sizes = split.train_sizes.tolist()
            self.spec = self.layout.shared  # the federated parameters
            self.strategy = strategies.for_job(job)
            self.state = self.strategy.init(self.spec.flatten(self.model))
            self.downlink = Downlink(Chain.of(job, self.spec.shapes, job.compression.downlink), self.state.params,
                                     job.devices.count, job.seed) if job.compression and job.compression.downlink else None
            self.checkpoints = (CheckpointStore(resume) if resume else
                                job.checkpoint and CheckpointStore.of_run(job.checkpoint.path, self.tracker.run_id))
            if not resume:
                self.tracker.log_params(job.flat() | outputs.layout_params(self.layout))
                self.tracker.log_text(job_yaml, "job.yaml")
            self.sealing = (Sealing(job, self.spec, self._train_sizes, self.strategy.weigh, self.tracker,
                                    self.checkpoints and self.checkpoints.location) if job.secure else None)
            size = self.spec.size if self.sealing is None else len(self.sealing.plan.plain)  # summed in plaintext
            codec = Chain.uplink(job, self.spec.shapes)
            self._check = {"size": size, "train_sizes": self._train_sizes, "expect_sealed": self.sealing is not None,
                           "expect_control": self.strategy.control_variates, "codec": codec}
            self.pool, self.edges = edge.start_tiers(job, ray.put((dataset.x, dataset.y)), dataset.num_classes,
                                                     split, size, self.sealing and self.sealing.tiers,
                                                     initial and ray.put(initial), codec)
            if self.pool.note:  # a GPU job that trains on CPUs says so
                self.tracker.set_tag("fedray.resources", self.pool.note)
            # where updates are folded: at the edges, or here
            self.tier = self.edges or Flat(job, self.strategy, self.pool, self._check, self.sealing and self.sealing.sums)
            self.evaluation = Evaluation(self.pool, (dataset.x, dataset.y), split.holdout, self.spec, self.model,
                                         job.devices.timeout_s, job.evaluation.num_gpus)
            self.peers = job.peers and Peers(job, self.pool, split.holdout)
            if self.peers and not resume:
                self.tracker.log_params({"peers.spectral_gap": f"{self.peers.spectral_gap:.6g}"})
                self.tracker.log_text(json.dumps(self.peers.describe()), "peers_graph.json")
        except BaseException:
            self.tracker.close(job.tracking.wait_s)  # the caller ends the run, from the journal
            raise
        # who takes part must stay secret under client-level DP: drawn from OS entropy, not the logged seed
        self.sampler = np.random.default_rng() if client_level(job) else np.random.default_rng([job.seed, 1])
        self.history: list[RoundResult] = []
        self.ledger = privacy.Ledger.of(job) if client_level(job) else None  # client-level DP's spend
        self._losses = job.privacy is None  # under DP devices keep their loss (an un-noised statistic)
        self.clip = job.privacy.clip if self.ledger else None  # client level: the clip bound devices use now
        self.stopped: str | None = None  # why the run stopped before its last round
        self.staleness = Counter()  # staleness of every accepted late or asynchronous update
        # asynchronous runs: finished tasks not yet folded, the model versions devices train from
        # (in the object store), which version each edge holds, dispatches so far
        self._arrived: deque[tuple[ray.ObjectRef, Task]] = deque()
        self._versions: dict[int, ray.ObjectRef] = {}
        self._edge_version: dict[int, int] = {}
        self.dispatched = 0
        self.checkpointed = 0  # rounds of the log in a checkpoint
        self.personal_scores: dict[int, dict[str, float]] = {}  # each device's accuracies, at the last evaluation
        self.restored = snapshot.resume(self) if resume else None  # what was restored, in words

    @property
    def device_epsilon(self) -> dict[int, tuple[float, float]]:
        """Sample level: each device that has trained, (epsilon spent, after one more round)."""
        return {} if self.pool.spend is None else self.pool.spend.view()

    def _empty(self) -> Partial:
        """An empty aggregate of this run: with encrypted aggregation, its plaintext coordinates and
        an empty encrypted sum."""
        return Partial.zeros(self._check["size"], self.sealing and self.sealing.sums)

    def placement(self) -> dict[str, list]:
        """Where things run: the node of every edge and worker (None if not up), the workers of
        each group, every device's group and edge."""
        return {"edges": self.edges.group.nodes() if self.edges else [], "workers": self.pool.workers.nodes(),
                "group_workers": self.pool.group_workers, "group_of": self.pool.group_of.tolist(),
                "edge_of": self.edges.edge_of if self.edges else []}

    def run_round(self, r: int) -> RoundResult:
        """Run round ``r`` (1-based) and log its metrics. Synchronous: train K sampled devices and,
        if at least ``min_completion`` of them sent a valid update, apply the strategy; otherwise
        the model is left unchanged. Asynchronous: collect arrivals until the server steps. Peers:
        every agent trains and takes in its neighbours' knowledge (``Peers``)."""
        start = time.perf_counter()
        intake = Intake()
        evaluates = r % self.job.evaluation.every == 0 or r == self.job.rounds
        evaluation_failures: dict[int, str] = {}
        if self.peers is not None:
            completed, metrics = self.peers.run_round(r, evaluates, intake)
        else:
            completed, metrics, evaluation_failures = self._federated_round(r, intake, evaluates)
        if self.job.devices.scale_up:  # workers join as the autoscaler adds their nodes
            metrics["workers"] = len(self.pool.workers.up())
        if self.pool.spend is not None:  # sample level: what devices were charged, or told more
            self.pool.spend.told(intake.device_epsilon)
        if self.device_epsilon:
            spent = [e for e, _ in self.device_epsilon.values()]
            metrics.update(device_epsilon_max=max(spent), device_epsilon_mean=float(np.mean(spent)))
        metrics["round_seconds"] = time.perf_counter() - start
        self.tracker.log_metrics(metrics, step=r)
        failures = {} if self.ledger is not None else dict(sorted(intake.failures.items()))  # client DP: counts
        waiting = f"{self.tracker.backlog} records wait for MLflow: {self.tracker.trouble}" if self.tracker.trouble else ""
        result = RoundResult(r, completed, metrics, failures, dict(sorted(evaluation_failures.items())), intake.flagged,
                             dict(sorted(intake.edge_failures.items())), waiting,
                             [] if self.ledger is not None else sorted(intake.accepted))
        self.history.append(result)
        if self.checkpoints and (r % self.job.checkpoint.every == 0 or r == self.job.rounds):
            self.checkpoints.save_later(*snapshot.take(self))  # written while the next round trains
        return result

    def _federated_round(self, r: int, intake: Intake, evaluates: bool
                         ) -> tuple[bool, dict[str, float], dict[int, str]]:
        """A round (or asynchronous server step) of federated learning, then (``evaluates``) the
        evaluation of the global model; returns (completed, metrics, evaluation failures)."""
        if isinstance(self.strategy, AsyncStrategy):
            completed, metrics, sampled = self._async_step(intake)
        else:
            completed, metrics, sampled = self._sync_round(r, intake)
        if intake.samples and self._losses and self.sealing is None:  # else: in the encrypted sum, or none
            metrics["train_loss"] = intake.loss_sum / intake.samples
        if intake.staleness:
            metrics.update(staleness_mean=float(np.mean(intake.staleness)), staleness_max=max(intake.staleness))
            self.staleness.update(intake.staleness)
        metrics.update(bytes_up=intake.bytes_up, failures=intake.failed_tasks, round_failed=float(not completed))
        # the share of the round's sampled devices (asynchronous: of the step's finished tasks) that sent a valid update
        accepted, asked = (len(intake.accepted), len(intake.accepted) + intake.failed_tasks) if isinstance(
            self.strategy, AsyncStrategy) else (len(set(intake.accepted) & set(sampled.tolist())), len(sampled))
        if asked:
            metrics["update_rate"] = accepted / asked
        if self.job.compression is not None and intake.uploads:  # float32 bytes of the vectors per byte received
            metrics["compression_ratio"] = 4 * self.spec.size * len(intake.uploads) / intake.bytes_up
        if intake.residual_norms:
            metrics["residual_norm_mean"] = float(np.mean(intake.residual_norms))
        if self.job.model.unfreeze:
            metrics["federated_size"] = self.spec.size
        if self.edges is not None:
            metrics["edge_failures"] = len(intake.edge_failures)
        if self.ledger is not None:  # every round sampled devices and may release a model: it is accounted
            self.ledger.step()
            metrics["epsilon"] = self.ledger.epsilon()
        self.pool.take_records(intake.accepted)
        evaluation_failures: dict[int, str] = {}
        if evaluates:
            federated = sampled if self.job.evaluation.federated else np.array([], dtype=np.int64)
            evaluation, evaluation_failures = self.evaluation(self.state.params, federated)
            metrics.update(evaluation)
            if self.job.personalization is not None:  # every device: the global, personalized and fine-tuned models
                evaluation, failures, self.personal_scores = self.evaluation.personal(
                    self.state.params, self.job.devices.count, r, fine_tune=r == self.job.rounds)
                metrics.update(evaluation)
                evaluation_failures.update(failures)
            if self.job.evaluation.federated or self.job.personalization is not None:
                metrics["evaluation_failures"] = len(evaluation_failures)
        return completed, metrics, evaluation_failures

    def _sync_round(self, r: int, intake: Intake) -> tuple[bool, dict[str, float], np.ndarray]:
        devices = self.job.devices
        if r in self.job.model.unfreeze:
            self._unfreeze(r)
        # devices still training for an earlier round (late updates carried over) sit this one out
        busy = [t.device for t in self.pool.pending.values()]
        if self.ledger is not None:  # the accountant assumes Poisson sampling (and nothing is carried over)
            sampled = privacy.poisson_sample(self.sampler, devices.count, sampling_rate(self.job))
        else:
            idle = np.setdiff1d(np.arange(devices.count), busy) if busy else devices.count
            k = min(devices.per_round, devices.count - len(set(busy)))
            sampled = np.sort(self.sampler.choice(idle, k, replace=False))
        per_round = 1 if self.edges is None else self.job.topology.edge_rounds  # trainings (edge rounds)
        snapshot.charge_ahead(self, r, [(int(d), (r - 1) * per_round + k + 1) for d in sampled for k in range(per_round)])
        broadcast = [self.state.params] + ([self.state.buffers[0]] if self.strategy.control_variates else [])
        down = sum(v.nbytes for v in broadcast)  # what a device downloads (compressed downlink: on average)
        if self.downlink is not None:  # devices train from the view the compressed messages build
            broadcast[0], downloads = self.downlink.send(self.state.params, sampled)
            down += sum(downloads) / max(1, len(sampled)) - broadcast[0].nbytes
        refs = [ray.put(v) for v in broadcast]
        adaptive = self.ledger is not None and self.job.privacy.adaptive_clip is not None
        options = {"clip": self.clip} if adaptive else {}  # fit's keyword arguments
        partial, raw, metrics = self.tier.run_round(r, sampled, refs, options, down, intake)
        accepted = partial.count + len(raw)
        if self.ledger is None:
            completed = accepted >= quorum(devices.min_completion, len(sampled))
        else:  # distributed noise needs its minimum of shares
            completed = accepted >= min_participants(self.job)
        if self.sealing is not None:  # the authority decrypts sums of min_clients devices or more
            completed = completed and accepted >= self.sealing.plan.min_clients
        metrics["participants"] = accepted
        if intake.staleness:
            metrics["late_accepted"] = len(intake.staleness)
        if self.pool.attackers:
            metrics["attackers"] = len(self.pool.attackers.intersection(sampled.tolist()))
        if completed and self.sealing is not None:  # the authority may refuse: the model stays
            partial, secure_metrics = self.sealing.unseal(partial, intake, r, self.clip, self._losses)
            metrics.update(secure_metrics)
            completed = partial is not None
        if completed:
            if raw:
                rng = np.random.default_rng([self.job.seed, r, 6])  # bucketing's shuffle
                partial, diagnostics, flagged = self.strategy.reduce(np.stack([u.delta for u in raw]), rng)
                metrics.update(diagnostics)
                intake.flagged = sorted(raw[i].device_id for i in flagged)
            if self.ledger is not None:
                partial, fraction = privacy.release(partial, self.job, self.clip)
                if adaptive:
                    metrics.update(clip=self.clip, below_clip_fraction=fraction)
                    self.clip = privacy.next_clip(self.job, self.clip, fraction)
            self.state, diagnostics = self.strategy.apply(self.state, partial)
            metrics.update(diagnostics)
        return completed, metrics, sampled

    def _unfreeze(self, r: int) -> None:
        """Gradual unfreezing: from round ``r`` the parameters ``model.unfreeze`` thaws train and
        are federated. The global model grows by their (still initial) values; the server
        optimizer's state restarts with it."""
        self.spec.load(self.model, self.state.params)
        self.layout = lay_out(self.model, self.job.model, self.job.personalization, r)
        self.spec = self.evaluation.spec = self.layout.shared
        self.state = replace(self.strategy.init(self.spec.flatten(self.model)), round=self.state.round)
        self._check["size"] = self.spec.size

    def _async_step(self, intake: Intake) -> tuple[bool, dict[str, float], np.ndarray]:
        """Fold arrivals, keeping ``concurrency`` devices training, until the buffer is full; then
        step the server. Gives up (the model unchanged) once more device runs failed in this step
        than there are devices, or when no device can train (every edge is down). Returns the
        devices whose updates were folded, too. With edges, each arrival is folded by its device's
        edge; the driver sees only the edges' Partials."""
        strategy, devices, edges = self.strategy, self.job.devices, self.edges
        partial, metrics = self._empty(), Counter()  # Counter: update() adds up the edges' counts
        started: list[int] = []
        while partial.count < strategy.buffer_size and intake.failed_tasks <= devices.count:
            down = {} if edges is None else edges.group.down()  # checked often: a recreated edge is soon up again
            if down:
                intake.edge_failures = down | intake.edge_failures  # an edge's first reason in the step
                self.pool.workers.replace_lost()
            while len(self.pool.pending) < strategy.concurrency and (device := self._dispatch(down, intake)) is not None:
                started.append(device)
            if not self._arrived:
                if not self.pool.pending:
                    break
                oldest = min(t.submitted for t in self.pool.pending.values())
                self._arrived.extend(self.pool.arrivals(oldest + devices.timeout_s - time.monotonic()))
                for done in self.pool.expire(devices.timeout_s):
                    intake.fail(done.task.device, done.failure)
                continue
            batch = [self._arrived.popleft() for _ in range(min(len(self._arrived), strategy.buffer_size - partial.count))]
            current = self.state.round
            models = ({v: self._versions[v] for v in {task.tag[1] for _, task in batch}} | {current: self._model()}
                      if strategy.mixing else {})  # what stale deltas are rebased on
            folded, tier = self.tier.fold_arrivals([(ref, task, current - task.tag[1]) for ref, task in batch],
                                                   models, current, down, intake)
            partial.merge(folded)
            metrics.update(tier)
        model_bytes = self.state.params.nbytes
        metrics.update(participants=partial.count, bytes_down=len(started) * model_bytes, dispatched=len(started),
                       stale_dropped=intake.stale_dropped, in_flight=len(self.pool.pending))
        if edges is not None:
            fetched = {edges.edge_of[d] for d in started} - {e for e, v in self._edge_version.items() if v == self.state.round}
            self._edge_version.update(dict.fromkeys(fetched, self.state.round))
            metrics["bytes_edge_cloud"] += len(fetched) * model_bytes
            metrics["bytes_device_edge"] = intake.bytes_up + len(started) * model_bytes
        completed = partial.count == strategy.buffer_size
        if completed and self.sealing is not None:
            partial, secure_metrics = self.sealing.unseal(partial, intake, self.state.round, None, self._losses)
            metrics.update(secure_metrics)
            completed = partial is not None
        if completed:
            self.state, diagnostics = strategy.apply(self.state, partial)
            metrics.update(diagnostics)
        waiting = list(self.pool.pending.values()) + [task for _, task in self._arrived]
        live = {task.tag[1] for task in waiting}
        self._versions = {v: ref for v, ref in self._versions.items() if v in live}
        return completed, dict(metrics), np.unique(intake.folded)

    def _dispatch(self, down_edges: dict[int, str], intake: Intake) -> int | None:
        """Start one idle device, drawn uniformly from those whose edge is up, training from the
        current model; return it, or None if every device is busy, behind a down edge or (sample-level
        DP) at its budget. With encrypted aggregation a device already in this step's buffer waits
        for the next step: the authority decrypts sums of different devices."""
        count = self.job.devices.count
        unavailable = {t.device for t in self.pool.pending.values()}
        if self.sealing is not None:
            unavailable.update(intake.folded, (task.device for _, task in self._arrived))
        if self.pool.spend is not None:  # sample-level DP: a device at its budget never trains again
            unavailable.update(self.pool.spend.exhausted())
        if down_edges:
            unavailable.update(d for d in range(count) if self.edges.edge_of[d] in down_edges)
        if len(unavailable) == count:
            return None
        device = int(self.sampler.integers(count))
        while device in unavailable:
            device = int(self.sampler.integers(count))
        self.dispatched += 1
        snapshot.charge_ahead(self, self.dispatched, [(device, self.dispatched)])
        self.pool.fit(device, self.dispatched, time.time(), self._model(), tag=(self.dispatched, self.state.round))
        return device

    def _model(self) -> ray.ObjectRef:
        """The current model in the object store, put once per version."""
        if self.state.round not in self._versions:
            self._versions[self.state.round] = ray.put(self.state.params)
        return self._versions[self.state.round]

    def stop_reason(self, r: int) -> str | None:
        """Why round ``r`` must not run (``privacy.budget_stop``), or None; once stopped, stays so."""
        self.stopped = self.stopped or privacy.budget_stop(self.job, self.ledger, self.device_epsilon, r)
        return self.stopped

    def evaluate(self) -> dict[str, float]:
        """Accuracy and mean loss of the global model on the server's held-out test set."""
        return self.evaluation(self.state.params, np.array([], dtype=np.int64))[0]

    def round_log(self) -> list[RoundResult]:
        """The rounds run so far (a resumed run's, restored)."""
        return self.history

    def run_id(self) -> str:
        """The MLflow run id (answered once setup is done)."""
        return self.tracker.run_id

    def finish(self, status: str = "FINISHED", error: str | None = None) -> dict:
        """Log the round log, the plots and (if FINISHED) the final model, end the MLflow run with
        ``status`` (FAILED if logging fails; tag ``fedray.error`` says why), wait up to
        ``tracking.wait_s`` for the store to take it all and return a summary. Once the run has
        ended, only returns the summary."""
        if not self.tracker.ended:
            if error is not None:
                self.tracker.set_tag("fedray.error", error)
            self.pool.drop(list(self.pool.pending))  # asynchronous runs leave devices training
            end_status = status
            try:
                if self.checkpoints:
                    self.checkpoints.wait()  # the last checkpoint is whole before the run ends
                outputs.log_end(self, status)
            except BaseException:
                end_status = "FAILED"
                raise
            finally:
                self.tracker.finish(end_status, self.job.tracking.wait_s)
        return outputs.summary(self)

    def privacy_report(self) -> dict:
        """What the run's privacy rests on and what it spent, by each accountant."""
        if self.ledger is None:
            return privacy.sample_report(self.job, self._train_sizes, self.device_epsilon) | {
                "rounds": len(self.history), "stopped": self.stopped}
        return privacy.client_report(self.job, self.ledger, self.clip) | {"stopped": self.stopped}

