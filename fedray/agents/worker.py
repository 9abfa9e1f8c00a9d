"""DeviceWorker: the actor that hosts devices and trains them on their own data.

A plain class; the platform applies ``ray.remote`` where it creates workers. In simulation mode a
worker can train any device of its group: each task brings the device's state record
(``DeviceState``) and the worker returns the new one beside the update; nothing about a device stays
in the worker. In deployment mode a worker is one real device, which keeps its own record.
"""

from __future__ import annotations

import asyncio
import math
import time
from dataclasses import replace

import numpy as np
import torch

from fedray.agents import peer, privacy
from fedray.agents.attacks import corrupt, flip_labels
from fedray.agents.outbox import Outbox
from fedray.agents.heterogeneity import round_steps, slowdowns, training_seconds
from fedray.agents.state import DeviceState
from fedray.agents.training import (LocalTraining, SampleDP, device_generator, effective_steps, evaluate,
                                   make_optimizer, train)
from fedray.config import JobSpec
from fedray.config.privacy import (client_level, count_noise, delta_noise_multiplier, min_participants, sample_level,
                                   share_std)
from fedray.data.devices import Generated, Shards
from fedray.platform import strategies
from fedray.secure.plan import SecurePlan
from fedray.transfer.layout import job_model, lay_out
from fedray.transfer.personal import Personal
from fedray.update import Update


class DeviceWorker:
    """Trains the devices of ``shards`` (``Shards``: index arrays into ``data = (x, y)``; or
    ``Generated``: drawn from each device's seed), sliced or drawn each time a device trains. Devices in
    ``attackers`` carry out the job's attack. ``keeps_state``: deployment mode, where the device's
    record stays here (``state``, ``restore``) instead of travelling with its tasks. With encrypted aggregation, ``sealing`` is
    the job's ``SecurePlan``, the public context and the devices' secret tag seeds: the key
    authority starts such a worker (``KeyAuthority.spawn``), and no seed ever leaves it otherwise.

    An asyncio actor: calls on one worker train one at a time (training never awaits), but the time
    a device takes beyond its compute (``devices.speed``) is an ``await``, so the worker trains other
    devices meanwhile, as separate real devices would. ``data`` also holds the server's held-out set,
    which workers evaluate in shares. ``initial``: the model's state dict at the start, when the job
    starts from other weights (``model.start``).
    """

    def __init__(self, job: JobSpec, data: tuple[np.ndarray, np.ndarray], num_classes: int,
                 shards: Shards | Generated, attackers: frozenset[int] = frozenset(),
                 sealing: tuple[SecurePlan, bytes, dict[int, int]] | None = None, keeps_state: bool = False,
                 reference: np.ndarray | None = None, initial: dict[str, np.ndarray] | None = None) -> None:
        torch.set_num_threads(1)
        x, y = data
        self._data, self._shards, self._num_classes = data, shards, num_classes
        self._attack, self._attackers = job.attack, attackers
        self._held: dict[int, DeviceState] | None = {} if keeps_state else None
        self._model, layout = job_model(job, x.shape[1:], num_classes, initial)
        self._device = training_device(job.devices.resources.num_gpus)
        self._model.to(self._device)
        self._spec = layout.shared  # the federated parameters
        self._strategy = strategies.for_job(job)  # what it asks of training
        self._local = LocalTraining(**job.devices.local.model_dump(), prox_mu=self._strategy.prox_mu)
        self._personal = Personal(self._model, layout, job.personalization, self._local)
        # a torch optimizer's first construction imports torch._dynamo (seconds): pay it at start-up,
        # which the pool waits for, rather than in the first round's deadline
        make_optimizer(self._model, self._local)
        self._speed = job.devices.speed
        self._slowdown = slowdowns(job.devices.speed, job.devices.count, job.seed)
        self._seed = job.seed
        dp = client_level(job)
        self._dp = dp
        if dp is not None:  # distributed: this device's noise shares are sized for m participants
            shares = min_participants(job) if dp.mode == "distributed" else None
            self._delta_z = delta_noise_multiplier(job)
            self._count_share = count_noise(job) / math.sqrt(shares) if shares and dp.adaptive_clip else 0.0
            self._shares = shares
        self._sample_dp = sample_level(job)
        self._job = job
        self._outbox = Outbox(job, self._strategy, self._spec.shapes, sealing)
        if job.peers is not None:  # the agents' models, and the public reference set they distill on
            self._agents = peer.Architectures(job.peers.models or [job.model], x.shape[1:], num_classes, job.seed,
                                              self._device)
            self._reference = None if reference is None else torch.from_numpy(x[reference])

    def _device_data(self, device: int) -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
        """``device``'s (train, test) tensors (an attacker's labels flipped)."""
        (x, y), (x_test, y_test) = self._shards.samples(device, self._data)
        labels = torch.from_numpy(y)
        if device in self._attackers and self._attack.kind == "label_flip":
            labels = flip_labels(labels, self._num_classes)
        return (torch.from_numpy(x), labels), (torch.from_numpy(x_test), torch.from_numpy(y_test))

    async def fit(self, device: int, round: int, sent_at: float, global_params: np.ndarray,
                  server_control: np.ndarray | None = None, state: DeviceState | None = None,
                  clip: float | None = None, spent: list | None = None) -> tuple[bytes, DeviceState | None]:
        """Train ``device`` from ``global_params`` and its ``state`` record (with SCAFFOLD,
        correcting its gradients by ``server_control - c_i``); return its serialized Update and its
        new record (None in deployment mode, where the device keeps it). ``round`` is the synchronous
        round, or the dispatch number of an asynchronous run: it seeds the device's randomness.
        ``sent_at`` (``time.time()``) is when the device was sent the model: a device with a speed
        answers no sooner than its training time after that, however long it waited here. ``clip``
        is the round's bound under adaptive clipping (default: ``privacy.clip``). Under sample-level
        DP ``spent`` is the device's DP-SGD history so far (its record, which the run keeps): the
        device refuses a round that would take it past the budget."""
        started = time.perf_counter()
        start = np.array(global_params, dtype=np.float32)  # writable copy
        (x, y), _ = self._device_data(device)
        state = self._record(device, state)
        self._use(start)
        self._spec.load(self._model, start)
        self._personal.load(state)
        own = None if server_control is None else (state.control if state.control is not None else np.zeros_like(start))
        correction = None if own is None else torch.from_numpy(server_control - own)
        generator = device_generator(self._seed, round, device)
        with self._personal.shared_training(x, y, generator):
            steps, loss, epsilons = self._train(device, round, self._model, x, y, generator, correction, spent)
        delta = self._spec.flatten(self._model) - start
        control, changes = None, self._personal.after(x, y, start, state, generator)
        if own is not None:  # SCAFFOLD: the device's new c_i, and its change
            scale = effective_steps(steps, self._local.momentum) * self._local.lr
            changes["control"] = self._strategy.control(own, server_control, delta, scale)
            control = changes["control"] - own
        state = state.advanced(**changes)
        if device in self._attackers:
            delta = corrupt(delta, self._attack, np.random.default_rng([self._seed, round, device, 3]))
        indicator = None
        if self._dp is not None:
            bound = clip or self._dp.clip
            if self._dp.adaptive_clip is not None:
                indicator = privacy.below_clip(delta, bound, self._count_share)
            share = share_std(self._delta_z, bound, self._shares) if self._shares else 0.0
            delta = privacy.privatize(delta, bound, share)
        if self._job.privacy is not None:
            loss = 0.0  # an un-noised statistic of the device's data: under DP it stays on the device
        sent, state = self._outbox.send(device, round, len(x), steps, delta, loss, indicator, state, clip,
                                        self._dp and (clip or self._dp.clip))
        payload = Update(device, round, len(x), steps, sent.loss, sent.delta, control, *epsilons,
                         below_clip=sent.below_clip, sealed=sent.sealed, residual_norm=sent.residual_norm).to_bytes()
        if self._device.type == "cuda":  # the next device's tensors get the memory back
            torch.cuda.empty_cache()
        if self._speed is not None:
            seconds = training_seconds(self._speed, self._slowdown[device], steps, time.perf_counter() - started)
            await asyncio.sleep(sent_at + seconds - time.time())
        return payload, self._keep(device, state)

    def _train(self, device: int, round: int, model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor,
               generator: torch.Generator, correction: torch.Tensor | None, spent: list | None
               ) -> tuple[int, float, tuple[float | None, float | None]]:
        """``device``'s local training of ``round`` (its planned or partial steps; DP-SGD under
        sample-level DP, charged to the history ``spent``): (steps, loss, (epsilon spent, epsilon
        after one more round)), the epsilons None without DP."""
        planned, steps = round_steps(self._job, len(x), round, device)
        local = self._local if steps == planned else replace(self._local, epochs=None, steps=steps)
        accountant = None if self._sample_dp is None else self._accountant(device, round, len(x), spent)
        dp_sgd = accountant and SampleDP(self._sample_dp.max_grad_norm, accountant.history[-1][0])
        steps, loss = train(model, x, y, local, generator, correction, dp_sgd)
        epsilons = (None, None) if accountant is None else (
            accountant.epsilon(), accountant.epsilon((*accountant.history[-1][:2], planned)))
        return steps, loss, epsilons

    async def peer_round(self, agent: int, round: int, inputs: list, weights: list[float], own_weight: float,
                         state: DeviceState | None = None, spent: list | None = None
                         ) -> tuple[dict[str, float], DeviceState, np.ndarray | None]:
        """One round of ``agent`` in peer-to-peer learning: take in ``inputs`` (refs to what
        neighbours published, each with its weight in ``weights``; ``own_weight`` for the agent's
        own), train on its own data, and return its metrics, its new record (its model in
        ``params``) and what it publishes: its parameters (gossip), its predictions on the
        reference set (distill) or nothing (local). ``spent``: as in ``fit``."""
        exchange, peers = self._job.peers.exchange, self._job.peers
        state = self._record(agent, state)
        model, spec, initial = self._agents.of(agent)
        params = state.params if state.params is not None else initial
        received = await self._fetch(inputs)
        metrics = {"received": float(sum(r.nbytes for r in received))}
        if exchange == "gossip" and received:
            params = peer.mix(params, own_weight, received, weights)
        spec.load(model, np.array(params, dtype=np.float32))
        generator = device_generator(self._seed, round, agent)
        if exchange == "distill" and received:
            own = peer.soft_labels(model, self._reference, peers.distill.temperature)
            target = peer.mix(own, own_weight, received, weights)
            metrics["distill_loss"] = peer.distill(model, self._reference, target, peers.distill.temperature,
                                                   peers.distill.epochs, self._local.batch_size,
                                                   peers.distill.lr or self._local.lr, generator)
        (x, y), _ = self._device_data(agent)
        steps, loss, (spent_now, spent_next) = self._train(agent, round, model, x, y, generator, None, spent)
        params = spec.flatten(model)
        published = {"gossip": params, "local": None}.get(exchange)
        if exchange == "distill":
            published = peer.soft_labels(model, self._reference, peers.distill.temperature)
        metrics.update(samples=len(x), steps=steps, loss=0.0 if self._job.privacy else loss,
                       published=0.0 if published is None else float(published.nbytes))
        if spent_now is not None:
            metrics.update(epsilon=spent_now, epsilon_next=spent_next)
        return metrics, self._keep(agent, state.advanced(params=params)), published

    async def peer_mix(self, agent: int, round: int, inputs: list, weights: list[float], own_weight: float,
                       state: DeviceState | None = None) -> tuple[dict[str, float], DeviceState, np.ndarray]:
        """One more gossip step of ``agent`` in a round (``peers.gossip_steps``): its model mixed
        with ``inputs`` as in ``peer_round``, without training; returned as ``peer_round`` does."""
        state = self._record(agent, state)
        params = state.params if state.params is not None else self._agents.of(agent)[2]
        received = await self._fetch(inputs)
        mixed = peer.mix(params, own_weight, received, weights)
        return ({"received": float(sum(r.nbytes for r in received)), "published": float(mixed.nbytes)},
                self._keep(agent, replace(state, params=mixed)), mixed)

    async def peer_evaluate(self, agent: int, inputs: list, weights: list[float], own_weight: float,
                            holdout: np.ndarray, state: DeviceState | None = None) -> list[tuple[int, float, int]]:
        """Evaluate ``agent``'s model (gossip: mixed with ``inputs`` as its next round will) on the
        samples ``holdout`` and on its local test split: ``[(samples, summed loss, correct)] x 2``."""
        model, spec, initial = self._agents.of(agent)
        state = self._record(agent, state)
        params = state.params if state.params is not None else initial
        if self._job.peers.exchange == "gossip" and inputs:
            params = peer.mix(params, own_weight, await self._fetch(inputs), weights)
        spec.load(model, np.array(params, dtype=np.float32))
        x, y = self._data
        _, (x_test, y_test) = self._device_data(agent)
        return [_scores(model, torch.from_numpy(x[holdout]), torch.from_numpy(y[holdout])),
                _scores(model, x_test, y_test)]

    def _record(self, agent: int, state: DeviceState | None) -> DeviceState:
        """The record a task works on: the one it brought, or (deployment) the one the agent keeps."""
        if self._held is not None:
            state = self._held.get(agent)
        return state or DeviceState()

    def _keep(self, agent: int, state: DeviceState) -> DeviceState | None:
        """The new record to return; in deployment kept here instead (None returned)."""
        if self._held is None:
            return state
        self._held[agent] = state
        return None

    async def _fetch(self, refs: list) -> list:
        """The values of ``refs``, awaited: meanwhile this worker runs other tasks (the one that
        computes a global average its agents wait for may be queued here)."""
        if not refs:
            return []
        return list(await asyncio.wait_for(asyncio.gather(*refs), self._job.devices.timeout_s))

    async def peer_consensus(self, host: int, agents: list[int], records: list, mixing: np.ndarray) -> tuple[float, float]:
        """The mean distance of the ``agents``' models (``records``' params, mixed by ``mixing``)
        from the mean model of their architecture, and that distance relative to the mean model's
        norm; computed where agent ``host`` trains."""
        stored = [r for r in records if r is not None]  # an agent that never trained has none
        fetched = iter(await self._fetch(stored))
        states = [None if r is None else next(fetched) for r in records]
        models = [s.params if s is not None and s.params is not None else self._agents.of(a)[2]
                  for a, s in zip(agents, states)]
        groups = len(self._job.peers.models) or 1
        distances, norms = [], []
        for g in range(groups):
            members = [k for k, a in enumerate(agents) if a % groups == g]
            if not members:
                continue
            x = np.stack([models[k] for k in members]).astype(np.float64)
            mixed = mixing[np.ix_(members, members)] @ x
            distances += np.linalg.norm(mixed - mixed.mean(axis=0), axis=1).tolist()
            norms += [np.linalg.norm(mixed.mean(axis=0))] * len(members)
        return float(np.mean(distances)), float(np.mean(np.array(distances) / np.array(norms)))

    async def peer_average(self, host: int, inputs: list, weights: list[float]) -> np.ndarray:
        """The weighted sum of what ``inputs`` refer to: a semi-decentralized run's global model,
        computed where agent ``host`` (the aggregator of the round) trains."""
        values = await self._fetch(inputs)
        return peer.mix(values[0], weights[0], values[1:], weights[1:])

    def _accountant(self, device: int, round: int, samples: int, spent: list | None) -> privacy.DeviceAccountant:
        """``device``'s accountant after this round's DP-SGD (its history is ``spent``, the record
        the run keeps); refuses a round that would take the device past the budget."""
        spec = self._sample_dp
        accountant = privacy.DeviceAccountant(spec.accountant, spec.delta, spent or [])
        mechanism = privacy.sample_mechanism(self._job, samples, round, device)
        if spec.budget is not None and (after := accountant.epsilon(mechanism)) > spec.budget.epsilon:
            raise RuntimeError(f"device {device} refuses to train: its epsilon would reach {after:.3f}, over "
                               f"privacy.budget.epsilon {spec.budget.epsilon:g}")
        accountant.spend(*mechanism)
        return accountant

    def node_id(self) -> str:
        """The Ray node this worker runs on (answering also says it has started)."""
        import ray

        return ray.get_runtime_context().get_node_id()

    def placement(self) -> dict:
        """Where this worker trains: its torch device, the GPUs Ray gave it, whether CUDA was ever
        initialized here, and the GPU memory its tensors hold (bytes; 0 on a CPU)."""
        import ray

        cuda = self._device.type == "cuda"
        return {"device": str(self._device), "gpu_ids": [str(g) for g in ray.get_gpu_ids()],
                "cuda_initialized": torch.cuda.is_initialized(),
                "gpu_memory": torch.cuda.memory_allocated(self._device) if cuda else 0}

    def state(self, device: int) -> DeviceState:
        """Deployment mode: the record ``device`` keeps (for a checkpoint)."""
        return self._held.get(device, DeviceState())

    def restore(self, records: dict[int, DeviceState]) -> None:
        """Deployment mode: records from a checkpoint, for the devices to keep."""
        self._held.update(records)

    async def evaluate(self, device: int, global_params: np.ndarray) -> tuple[int, float, int]:
        """Evaluate ``global_params`` on ``device``'s local test split: ``(samples, summed loss, correct)``."""
        _, (x, y) = self._device_data(device)
        return self._evaluate(global_params, x, y)

    async def evaluate_samples(self, indices: np.ndarray, global_params: np.ndarray) -> tuple[int, float, int]:
        """Evaluate ``global_params`` on the samples ``indices`` of the data (a share of the server's
        held-out set): ``(samples, summed loss, correct)``."""
        x, y = self._data
        return self._evaluate(global_params, torch.from_numpy(x[indices]), torch.from_numpy(y[indices]))

    def _use(self, params: np.ndarray) -> None:
        """Gradual unfreezing (``model.unfreeze``): lay the model out for the stage whose federated
        vector ``params`` is (each stage's is longer than the one before)."""
        if len(params) == self._spec.size:
            return
        for r in [1, *sorted(self._job.model.unfreeze)]:
            layout = lay_out(self._model, self._job.model, self._job.personalization, r)
            if layout.shared.size == len(params):
                self._spec = layout.shared
                self._personal = Personal(self._model, layout, self._job.personalization, self._local)
                return
        raise ValueError(f"a global model of {len(params)} values fits no stage of model.unfreeze")

    def _evaluate(self, global_params: np.ndarray, x: torch.Tensor, y: torch.Tensor) -> tuple[int, float, int]:
        self._use(global_params)
        self._personal.personalized(global_params, None)  # the global model: the initial personal parameters
        return _scores(self._model, x, y)

    async def evaluate_personal(self, device: int, round: int, global_params: np.ndarray,
                                state: DeviceState | None = None, fine_tune: bool = False) -> dict[str, tuple]:
        """Evaluate on ``device``'s local test split the global model, the device's personalized
        model (its personal parameters, or Ditto model, from its ``state``) and (``fine_tune``) the
        personalized model after ``personalization.finetune`` on its training split: ``{"global",
        "personal", "finetuned": (samples, summed loss, correct)}``."""
        (x, y), (x_test, y_test) = self._device_data(device)
        scores = {"global": self._evaluate(global_params, x_test, y_test)}
        self._personal.personalized(global_params, self._record(device, state))
        scores["personal"] = _scores(self._model, x_test, y_test)
        if fine_tune:
            self._personal.fine_tune(x, y, device_generator(self._seed, round, device))
            scores["finetuned"] = _scores(self._model, x_test, y_test)
        return scores

    async def export_personal(self, device: int, global_params: np.ndarray, state: DeviceState | None = None
                              ) -> tuple[bytes, dict]:
        """``device``'s personalized model (as ``evaluate_personal``) as ONNX bytes, and the check
        of ONNX Runtime against PyTorch on its own test inputs (``export.to_onnx``)."""
        import tempfile
        from pathlib import Path

        from fedray.transfer import export

        (x, _), (x_test, _) = self._device_data(device)
        self._personal.personalized(global_params, self._record(device, state))
        with tempfile.TemporaryDirectory() as directory:
            path = Path(directory) / "model.onnx"
            try:  # exported, and checked against ONNX Runtime, on the CPU
                check = export.to_onnx(self._model.cpu(), (x_test if len(x_test) else x).numpy(), path)
            finally:
                self._model.to(self._device)
            return path.read_bytes(), check


def training_device(asked: float) -> torch.device:
    """The GPU Ray gave this actor, if it ``asked`` for GPUs and CUDA sees one; else the CPU.
    Nothing asks CUDA anything unless Ray assigned this actor a GPU."""
    if asked:
        import ray

        if ray.get_gpu_ids() and torch.cuda.is_available():
            return torch.device("cuda")
    return torch.device("cpu")


def _scores(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[int, float, int]:
    """``(samples, summed loss, correct)`` of ``model`` on ``(x, y)``."""
    if not len(x):
        return 0, 0.0, 0
    loss, correct = evaluate(model, x, y)
    return len(x), loss, correct
