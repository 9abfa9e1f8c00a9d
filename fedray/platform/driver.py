"""Driver: owns one run. Samples devices, broadcasts the global model, aggregates, evaluates and is
the only process that talks to MLflow. A plain class; ``fedray.run`` makes it an actor."""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field

import numpy as np
import ray
import torch

from fedray.agents.training import evaluate
from fedray.config import JobSpec
from fedray.data import datasets, partition
from fedray.models.params import ParamSpec
from fedray.models.zoo import build_model
from fedray.platform import strategies
from fedray.platform.aggregation import Partial, quorum
from fedray.platform.pool import WorkerPool
from fedray.platform.tracking import MlflowTracker
from fedray.update import Update, rejection_reason


@dataclass
class RoundResult:
    """What happened in one round; ``metrics`` are the values logged to MLflow at step ``round``."""

    round: int
    completed: bool
    metrics: dict[str, float]
    failures: dict[int, str] = field(default_factory=dict)
    evaluation_failures: dict[int, str] = field(default_factory=dict)


class Driver:
    def __init__(self, job: JobSpec, tracking_uri: str, job_yaml: str) -> None:
        torch.set_num_threads(1)
        self.job = job
        dataset = datasets.load(job.data, job.seed)
        split = partition.split(dataset.y, job.data, job.devices.count, job.seed)
        self._test_x = torch.from_numpy(dataset.x[split.holdout])
        self._test_y = torch.from_numpy(dataset.y[split.holdout])
        self._example = dataset.x[:2].copy()  # input example for the logged model's signature
        self._train_sizes = [len(t) for t in split.train]
        self.model = build_model(job.model.name, job.model.class_, job.model.kwargs, dataset.input_shape,
                                 dataset.num_classes, job.seed)
        self.spec = ParamSpec.of(self.model)
        self.strategy = strategies.build(job.strategy, job.devices.local.momentum, job.devices.count)
        self.state = self.strategy.init(self.spec.flatten(self.model))
        self.tracker = MlflowTracker(tracking_uri, job.tracking.experiment, job.name)
        try:
            self.tracker.log_params(job.flat())
            self.tracker.log_text(job_yaml, "job.yaml")
            self.pool = WorkerPool(job, ray.put((dataset.x, dataset.y)), dataset.num_classes, split)
        except BaseException:
            self.tracker.finish("FAILED")
            raise
        self._sampler = np.random.default_rng([job.seed, 1])
        self.history: list[RoundResult] = []

    def run_round(self, r: int) -> RoundResult:
        """Run round ``r`` (1-based): train K sampled devices and, if at least ``min_completion`` of
        them sent a valid update, apply the strategy; otherwise the model is left unchanged."""
        start = time.perf_counter()
        devices = self.job.devices
        sampled = np.sort(self._sampler.choice(devices.count, devices.per_round, replace=False))
        broadcast = [self.state.params] + ([self.state.buffers[0]] if self.strategy.control_variates else [])
        refs = [ray.put(v) for v in broadcast]
        results, failures = self.pool.call("fit", sampled, r, *refs, timeout=devices.timeout_s)
        partial = Partial.zeros(self.spec.size)
        raw: list[np.ndarray] = []  # the deltas themselves, for robust (non-linear) rules
        bytes_up, loss_sum, samples = 0, 0.0, 0
        for payloads, device_failures in results:
            failures.update(device_failures)
            for d, payload in payloads.items():
                bytes_up += len(payload)
                try:
                    update = Update.from_bytes(payload)
                except ValueError as e:
                    failures[d] = str(e)
                    continue
                reason = rejection_reason(update, expected_device=d, expected_round=r, expected_size=self.spec.size,
                                          expected_samples=self._train_sizes[d],
                                          expect_control=self.strategy.control_variates)
                if reason is not None:
                    failures[d] = f"rejected: {reason}"
                    continue
                if self.strategy.reduce is None:
                    self.strategy.fold(partial, update)
                else:
                    raw.append(update.delta)
                loss_sum += update.train_loss * update.num_samples
                samples += update.num_samples
        accepted = partial.count + len(raw)
        completed = accepted >= quorum(devices.min_completion, len(sampled))
        metrics = {"participants": accepted, "bytes_up": bytes_up,
                   "bytes_down": len(sampled) * sum(v.nbytes for v in broadcast), "round_failed": float(not completed)}
        if self.pool.attackers:
            metrics["attackers"] = len(self.pool.attackers.intersection(sampled.tolist()))
        if accepted:
            metrics["train_loss"] = loss_sum / samples
        if completed:
            if raw:
                partial, diagnostics = self.strategy.reduce(np.stack(raw))
                metrics.update(diagnostics)
            self.state, diagnostics = self.strategy.apply(self.state, partial)
            metrics.update(diagnostics)
        metrics["failures"] = len(failures)
        evaluation_failures: dict[int, str] = {}
        if r % self.job.evaluation.every == 0 or r == self.job.rounds:
            metrics.update(self.evaluate())
            if self.job.evaluation.federated:
                federated, evaluation_failures = self._federated_evaluate(sampled)
                metrics.update(federated, evaluation_failures=len(evaluation_failures))
        metrics["round_seconds"] = time.perf_counter() - start
        self.tracker.log_metrics(metrics, step=r)
        result = RoundResult(r, completed, metrics, dict(sorted(failures.items())),
                             dict(sorted(evaluation_failures.items())))
        self.history.append(result)
        return result

    def evaluate(self) -> dict[str, float]:
        """Accuracy and mean loss of the global model on the server's held-out test set."""
        if not len(self._test_y):
            return {}
        self.spec.load(self.model, self.state.params)
        loss, correct = evaluate(self.model, self._test_x, self._test_y)
        return {"test_accuracy": correct / len(self._test_y), "test_loss": loss / len(self._test_y)}

    def _federated_evaluate(self, sampled: np.ndarray) -> tuple[dict[str, float], dict[int, str]]:
        """Sample-weighted accuracy and loss of the global model on the sampled devices' test
        splits, and ``{device: reason}`` for the devices that could not evaluate."""
        params_ref = ray.put(self.state.params)
        results, failures = self.pool.call("evaluate", sampled, params_ref, timeout=self.job.devices.timeout_s)
        per_device = []
        for device_results, device_failures in results:
            failures.update(device_failures)
            per_device.extend(device_results.values())
        samples = sum(n for n, _, _ in per_device)
        if not samples:
            return {}, failures
        return {"federated_test_accuracy": sum(c for _, _, c in per_device) / samples,
                "federated_test_loss": sum(loss for _, loss, _ in per_device) / samples}, failures

    def run_id(self) -> str:
        """The MLflow run id (answered once setup is done)."""
        return self.tracker.run_id

    def finish(self, status: str = "FINISHED") -> dict:
        """Log the round log, the plot and (if FINISHED) the final model, end the MLflow run with
        ``status`` (FAILED if logging fails), and return a summary. Once the run has ended, only
        returns the summary."""
        if not self.tracker.ended:
            end_status = status
            try:
                if self.pool.attackers:
                    self.tracker.log_text(json.dumps(sorted(self.pool.attackers)), "attackers.json")
                if self.history:
                    self.tracker.log_text(json.dumps([asdict(h) for h in self.history], indent=1), "rounds.json")
                    self.tracker.log_figure(_plot(self.history), "accuracy_loss.png")
                if self.job.tracking.log_model and status == "FINISHED":
                    self.spec.load(self.model, self.state.params)
                    self.tracker.log_model(self.model, self._example)
            except BaseException:
                end_status = "FAILED"
                raise
            finally:
                self.tracker.finish(end_status)
        last = self.history[-1].metrics if self.history else {}
        return {
            "run_id": self.tracker.run_id,
            "tracking_uri": self.tracker.uri,
            "rounds": len(self.history),
            "completed_rounds": sum(h.completed for h in self.history),
            "test_accuracy": last.get("test_accuracy"),
            "test_loss": last.get("test_loss"),
            "bytes_up": sum(h.metrics["bytes_up"] for h in self.history),
            "bytes_down": sum(h.metrics["bytes_down"] for h in self.history),
            "failures": sum(h.metrics["failures"] for h in self.history),
        }


def _plot(history: list[RoundResult]):
    from matplotlib.figure import Figure  # no pyplot: no global figure state, no GUI backend

    evaluated = [h for h in history if "test_accuracy" in h.metrics]
    rounds = [h.round for h in evaluated]
    fig = Figure(figsize=(9, 3.5))
    acc, loss = fig.subplots(1, 2)
    acc.plot(rounds, [h.metrics["test_accuracy"] for h in evaluated], marker=".")
    acc.set(xlabel="round", ylabel="test accuracy", title="Global model accuracy")
    loss.plot(rounds, [h.metrics["test_loss"] for h in evaluated], marker=".", label="test")
    trained = [h for h in history if "train_loss" in h.metrics]
    loss.plot([h.round for h in trained], [h.metrics["train_loss"] for h in trained], label="train (devices)")
    loss.set(xlabel="round", ylabel="cross-entropy", title="Loss")
    loss.legend()
    fig.tight_layout()
    return fig
