"""The MNIST FedAvg workload the benchmarks share, and a serial no-framework floor for it."""

from __future__ import annotations

import time

import numpy as np
import torch

from fedray.agents.training import LocalTraining, device_generator, evaluate, train
from fedray.config import JobSpec, parse_job
from fedray.data import datasets, partition
from fedray.models.params import ParamSpec
from fedray.models.zoo import build_model


def mnist_job(devices: int, per_round: int, epochs: int, rounds: int, seed: int = 0) -> JobSpec:
    """MNIST subset shuffled and split 4,000 train / 1,000 test, Dirichlet(0.5) over ``devices``,
    the small CNN, SGD lr 0.05, batch 32, ``per_round`` devices per round, test-set evaluation
    every round, no local test splits."""
    return parse_job({
        "name": f"bench-mnist-{devices}x{epochs}", "seed": seed, "rounds": rounds,
        "data": {"dataset": "mnist", "partition": {"kind": "dirichlet", "alpha": 0.5},
                 "holdout": 0.2, "test_fraction": 0.0},
        "model": {"name": "small_cnn"},
        "devices": {"count": devices, "per_round": per_round,
                    "local": {"epochs": epochs, "batch_size": 32, "optimizer": "sgd", "lr": 0.05}},
        "evaluation": {"every": 1},
        "tracking": {"experiment": "benchmarks", "log_model": False},
    })


def write_workload(job: JobSpec, path: str) -> None:
    """The exact data split of ``job`` as an .npz for another framework (see flower_side.py)."""
    data = datasets.load(job.data, job.seed)
    split = partition.split(data.y, job.data, job.devices.count, job.seed)
    offsets = np.cumsum([0] + [len(t) for t in split.train])
    np.savez(path, x_train=data.x, y_train=data.y, x_test=data.x[split.holdout], y_test=data.y[split.holdout],
             device_offsets=offsets, device_index=np.concatenate(split.train))


def serial_floor(job: JobSpec) -> tuple[list[float], float]:
    """Run ``job``'s rounds in this process with no framework: the same sampling, training loop,
    per-device RNG, weighted averaging and test evaluation, one device after another.
    Returns (seconds per round, final test accuracy)."""
    torch.set_num_threads(1)
    data = datasets.load(job.data, job.seed)
    split = partition.split(data.y, job.data, job.devices.count, job.seed)
    x, y = torch.from_numpy(data.x), torch.from_numpy(data.y)
    test_x, test_y = x[split.holdout], y[split.holdout]
    shards = [(x[t], y[t]) for t in split.train]
    model = build_model("small_cnn", None, {}, data.input_shape, data.num_classes, job.seed)
    spec = ParamSpec.of(model)
    params = spec.flatten(model)
    local = LocalTraining(**job.devices.local.model_dump())
    sampler = np.random.default_rng([job.seed, 1])
    seconds, accuracy = [], 0.0
    for r in range(1, job.rounds + 1):
        start = time.perf_counter()
        sampled = np.sort(sampler.choice(job.devices.count, job.devices.per_round, replace=False))
        total, weight = np.zeros_like(params), 0
        for d in sampled:
            spec.load(model, params)
            train(model, *shards[d], local, device_generator(job.seed, r, int(d)))
            total += len(shards[d][0]) * (spec.flatten(model) - params)
            weight += len(shards[d][0])
        params = params + total / weight
        spec.load(model, params)
        accuracy = evaluate(model, test_x, test_y)[1] / len(test_y)
        seconds.append(time.perf_counter() - start)
    return seconds, accuracy
