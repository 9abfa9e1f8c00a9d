"""Evaluation of the global model, spread over the device workers: on the server's held-out set,
in shares of a fixed size, and (federated evaluation) on devices' own test splits."""

from __future__ import annotations

import copy
import time

import numpy as np
import ray
import torch

from fedray.agents.training import evaluate
from fedray.agents.worker import training_device
from fedray.models.params import ParamSpec
from fedray.platform.pool import WorkerPool

SHARE = 256  # held-out samples per evaluation task (a multiple of evaluate's batch of 128)


class Evaluation:
    """Evaluates models on the held-out samples ``holdout`` of ``data = (x, y)`` and on devices'
    test splits, with ``pool``'s workers; ``model`` (with its ``spec``) evaluates here a share
    whose worker failed (``spec`` changes with gradual unfreezing). With ``gpus`` (the driver's
    ``evaluation.num_gpus``) the held-out set is evaluated here, on the GPU Ray gave the driver,
    with a copy of ``model``. Tasks that do not answer within ``timeout_s`` fail."""

    def __init__(self, pool: WorkerPool, data: tuple[np.ndarray, np.ndarray], holdout: np.ndarray, spec: ParamSpec,
                 model: torch.nn.Module, timeout_s: float, gpus: float = 0.0) -> None:
        self._pool, self._data, self.spec, self._timeout_s = pool, data, spec, timeout_s
        self.here = bool(gpus)  # the held-out set is evaluated by the driver
        self.device = training_device(gpus)
        self._model = copy.deepcopy(model).to(self.device) if self.here else model
        # shares of a fixed size: the sums, and so the metrics, do not depend on the number of workers
        self._shares = [holdout[i:i + SHARE] for i in range(0, len(holdout), SHARE)]
        self._holdout_size = len(holdout)

    def __call__(self, params: np.ndarray, devices: np.ndarray) -> tuple[dict[str, float], dict[int, str]]:
        """The accuracy and mean loss of ``params`` on the held-out set and, sample-weighted, on
        the test splits of ``devices``; ``{device: reason}`` for the devices that could not evaluate."""
        ref = ray.put(params)
        shares = [] if self.here else self._pool.evaluate_samples(self._shares, ref)
        refs = [self._pool.submit("evaluate", d, ref) for d in devices]
        held, per_device, failures = {}, [], {}
        for done in self._pool.as_completed(shares + refs, time.monotonic() + self._timeout_s):
            if done.task.device < 0:
                held[done.task.tag] = done.value
            elif done.failure is None:
                per_device.append(done.value)
            else:
                failures[done.task.device] = done.failure
        expired = self._pool.expire(self._timeout_s, shares + refs)
        failures.update({done.task.device: done.failure for done in expired if done.task.device >= 0})
        metrics = {}
        if self._shares:
            totals = [held.get(i) or self._here(params, share) for i, share in enumerate(self._shares)]
            n = self._holdout_size
            metrics = {"test_accuracy": sum(c for _, _, c in totals) / n,
                       "test_loss": sum(loss for _, loss, _ in totals) / n}
        samples = sum(n for n, _, _ in per_device)
        if samples:
            metrics.update(federated_test_accuracy=sum(c for _, _, c in per_device) / samples,
                           federated_test_loss=sum(loss for _, loss, _ in per_device) / samples)
        return metrics, failures

    def personal(self, params: np.ndarray, count: int, r: int, fine_tune: bool
                 ) -> tuple[dict[str, float], dict[int, str], dict[int, dict[str, float]]]:
        """Personalization: each of the ``count`` devices evaluates the global ``params``, its
        personalized model and (``fine_tune``) that model fine-tuned on its training split, on its
        local test split (``DeviceWorker.evaluate_personal``). Returns the mean, standard deviation
        and minimum over devices of each accuracy (``device_accuracy_global``, ``..._std``,
        ``..._min``; ``personal``; ``finetuned``), ``{device: reason}`` for those that failed, and
        each device's accuracies."""
        ref = ray.put(params)
        refs = [self._pool.submit("evaluate_personal", d, r, ref, state=self._pool.records.ref(d), fine_tune=fine_tune)
                for d in range(count)]
        scores, failures = {}, {}
        for done in self._pool.as_completed(refs, time.monotonic() + self._timeout_s):
            if done.failure is None:
                scores[done.task.device] = {kind: c / n for kind, (n, _, c) in done.value.items() if n}
            else:
                failures[done.task.device] = done.failure
        failures.update({done.task.device: done.failure for done in self._pool.expire(self._timeout_s, refs)})
        metrics = {}
        for kind in ("global", "personal", "finetuned"):
            accuracies = [s[kind] for s in scores.values() if kind in s]
            if accuracies:
                metrics.update({f"device_accuracy_{kind}": float(np.mean(accuracies)),
                                f"device_accuracy_{kind}_std": float(np.std(accuracies)),
                                f"device_accuracy_{kind}_min": float(np.min(accuracies))})
        return metrics, failures, dict(sorted(scores.items()))

    def _here(self, params: np.ndarray, indices: np.ndarray) -> tuple[int, float, int]:
        x, y = self._data
        self.spec.load(self._model, params)
        loss, correct = evaluate(self._model, torch.from_numpy(x[indices]), torch.from_numpy(y[indices]))
        return len(indices), loss, correct
