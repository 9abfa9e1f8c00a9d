"""DeviceWorker: the actor that hosts devices and trains them on their own data.

A plain class; the platform applies ``ray.remote`` where it creates workers. In simulation mode one
worker hosts many virtual devices (device state stays in its memory between rounds); in deployment
mode it hosts exactly one device.
"""

from __future__ import annotations

import numpy as np
import torch

from fedray.agents.attacks import corrupt, flip_labels
from fedray.agents.training import LocalTraining, device_generator, evaluate, train
from fedray.config import JobSpec
from fedray.models.params import ParamSpec
from fedray.models.zoo import build_model
from fedray.update import Update


class DeviceWorker:
    """Hosts ``shards``: ``{device_id: (train_indices, test_indices)}`` into ``data = (x, y)``.
    Devices in ``attackers`` carry out the job's attack.

    The data is sliced once, here; ``fit`` and ``evaluate`` never reload it.
    """

    def __init__(self, job: JobSpec, data: tuple[np.ndarray, np.ndarray], num_classes: int,
                 shards: dict[int, tuple[np.ndarray, np.ndarray]], attackers: frozenset[int] = frozenset()) -> None:
        torch.set_num_threads(1)
        x, y = data
        self._train = {d: (torch.from_numpy(x[tr]), torch.from_numpy(y[tr])) for d, (tr, _) in shards.items()}
        self._attack, self._attackers = job.attack, attackers
        if job.attack is not None and job.attack.kind == "label_flip":
            for d in attackers:
                features, labels = self._train[d]
                self._train[d] = (features, flip_labels(labels, num_classes))
        self._test = {d: (torch.from_numpy(x[te]), torch.from_numpy(y[te])) for d, (_, te) in shards.items()}
        self._model = build_model(job.model.name, job.model.class_, job.model.kwargs, x.shape[1:],
                                  num_classes, job.seed)
        self._spec = ParamSpec.of(self._model)
        self._local = LocalTraining(**job.devices.local.model_dump(),
                                    prox_mu=job.strategy.mu if job.strategy.name == "fedprox" else 0.0)
        self._seed = job.seed
        self._controls: dict[int, np.ndarray] = {}  # SCAFFOLD: each device's control variate c_i

    def fit(self, device_ids: list[int], round: int, global_params: np.ndarray,
            server_control: np.ndarray | None = None) -> tuple[dict[int, bytes], dict[int, str]]:
        """Train each device from ``global_params`` (with SCAFFOLD, correcting its gradients by
        ``server_control - c_i``). Returns ``({device: Update payload}, {device: failure reason})``;
        one device's error does not stop the others."""
        start = np.array(global_params, dtype=np.float32)  # writable copy, once per call
        payloads: dict[int, bytes] = {}
        failures: dict[int, str] = {}
        for d in device_ids:
            try:
                x, y = self._train[d]
                self._spec.load(self._model, start)
                own = None if server_control is None else self._controls.get(d, np.zeros_like(start))
                correction = None if own is None else torch.from_numpy(server_control - own)
                steps, loss = train(self._model, x, y, self._local, device_generator(self._seed, round, d), correction)
                delta = self._spec.flatten(self._model) - start
                control = None
                if own is not None:  # SCAFFOLD option II: c_i+ = c_i - c + (x - y_i) / (K lr)
                    self._controls[d] = own - server_control - delta / np.float32(steps * self._local.lr)
                    control = self._controls[d] - own
                if d in self._attackers:
                    delta = corrupt(delta, self._attack, np.random.default_rng([self._seed, round, d, 3]))
                payloads[d] = Update(d, round, len(x), steps, loss, delta, control).to_bytes()
            except Exception as e:  # a failing device is recorded, not fatal to the worker
                failures[d] = f"{type(e).__name__}: {e}"
        return payloads, failures

    def evaluate(self, device_ids: list[int], global_params: np.ndarray) -> tuple[dict[int, tuple[int, float, int]], dict[int, str]]:
        """Evaluate ``global_params`` on each device's local test split. Returns
        ``({device: (samples, summed loss, correct)}, {device: failure reason})``."""
        self._spec.load(self._model, np.array(global_params, dtype=np.float32))
        results: dict[int, tuple[int, float, int]] = {}
        failures: dict[int, str] = {}
        for d in device_ids:
            try:
                x, y = self._test[d]
                if len(x):
                    loss, correct = evaluate(self._model, x, y)
                    results[d] = (len(x), loss, correct)
            except Exception as e:
                failures[d] = f"{type(e).__name__}: {e}"
        return results, failures
