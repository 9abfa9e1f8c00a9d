"""Heterogeneous devices: slowdown factors, partial work, and that a slow device really is slow
without holding up the other devices on its worker."""

import asyncio
import time

import numpy as np
import pytest
import ray

from fedray.agents.heterogeneity import local_steps, slowdowns, training_seconds
from fedray.agents.worker import DeviceWorker
from fedray.config import parse_job
from fedray.data import datasets, partition
from fedray.update import Update

from conftest import small_job


def test_slow_fraction_and_lognormal_factors():
    job = parse_job(small_job(devices__count=10, devices__speed={"kind": "slow_fraction", "fraction": 0.3, "slowdown": 5}))
    factors = slowdowns(job.devices.speed, 10, seed=0)
    assert sorted(factors.tolist()) == [1.0] * 7 + [5.0] * 3
    np.testing.assert_array_equal(factors, slowdowns(job.devices.speed, 10, seed=0))  # from the seed
    assert not np.array_equal(factors, slowdowns(job.devices.speed, 10, seed=1))
    lognormal = parse_job(small_job(devices__speed={"kind": "lognormal", "sigma": 0.5})).devices.speed
    factors = slowdowns(lognormal, 2000, seed=0)
    assert factors.min() == 1.0  # the fastest device runs at full speed
    log = np.log(factors)
    assert np.std(log) == pytest.approx(0.5, rel=0.05)  # log-normal with sigma 0.5
    np.testing.assert_array_equal(slowdowns(None, 4, 0), np.ones(4))


def test_partial_work_draws_uniform_steps():
    rng = np.random.default_rng(0)
    assert {local_steps(10, 0.0, rng) for _ in range(100)} == {10}
    steps = np.array([local_steps(10, 0.5, rng) for _ in range(20_000)])
    full = steps == 10
    # half the draws keep all 10 steps; the other half are uniform over 1..10 (so 1/10 of them are 10 too)
    assert full.mean() == pytest.approx(0.5 + 0.5 / 10, abs=0.015)
    assert set(steps.tolist()) == set(range(1, 11))
    assert np.bincount(steps[steps < 10])[1:] / (steps < 10).sum() == pytest.approx([1 / 9] * 9, abs=0.02)


def worker_inputs(**overrides):
    job = parse_job(small_job(**overrides))
    data = datasets.load(job.data, job.seed)
    split = partition.split(data.y, job.data, job.devices.count, job.seed)
    shards = split.of(np.arange(job.devices.count))
    return job, (data.x, data.y), data.num_classes, shards


def test_devices_with_partial_work_report_the_steps_they_took():
    job, data, classes, shards = worker_inputs(devices__partial_work=0.9, devices__local={"steps": 8})
    worker = DeviceWorker(job, data, classes, shards)
    params = np.zeros(64 * 10 + 10, np.float32)
    steps = [Update.from_bytes(asyncio.run(worker.fit(d, r, time.time(), params))[0]).local_steps for r in range(1, 6) for d in range(6)]
    assert all(1 <= s <= 8 for s in steps) and min(steps) < 8 and len(set(steps)) > 3
    # the same device and round always does the same work
    assert Update.from_bytes(asyncio.run(worker.fit(2, 3, time.time(), params))[0]).local_steps == steps[2 * 6 + 2]


@pytest.mark.usefixtures("ray_session")
def test_a_slow_device_is_slow_without_blocking_its_worker():
    # SlowLogReg sleeps 0.05 s per training step: 2 steps take ~0.1 s; a device 10x slower ~1 s
    job, data, classes, shards = worker_inputs(
        model={"class": "user_models:SlowLogReg", "kwargs": {"features": 64, "classes": 10, "sleep_s": 0.05}},
        devices__local={"steps": 2}, devices__speed={"kind": "slow_fraction", "fraction": 0.5, "slowdown": 10})
    factors = slowdowns(job.devices.speed, job.devices.count, job.seed)
    slow, fast = int(np.flatnonzero(factors == 10)[0]), int(np.flatnonzero(factors == 1)[0])
    worker = ray.remote(DeviceWorker).options(num_cpus=0).remote(job, data, classes, shards)
    params = np.zeros(650, np.float32)
    ray.get(worker.fit.remote(fast, 0, time.time(), params))  # warm up
    start = time.monotonic()
    slow_ref = worker.fit.remote(slow, 1, time.time(), params)  # submitted first, on the same worker
    fast_ref = worker.fit.remote(fast, 1, time.time(), params)
    ray.get(fast_ref)
    fast_done = time.monotonic() - start
    ray.get(slow_ref)
    slow_done = time.monotonic() - start
    assert fast_done < 0.6 < 0.9 < slow_done  # fast: ~0.2 s (after the slow one's own 0.1 s of compute)
    ray.kill(worker)


def test_training_seconds():
    fixed = parse_job(small_job(devices__speed={"kind": "slow_fraction", "step_seconds": 0.01})).devices.speed
    measured = parse_job(small_job(devices__speed={"kind": "slow_fraction"})).devices.speed
    assert training_seconds(measured, 5.0, 20, 0.3) == pytest.approx(1.5)  # 5x its own compute
    assert training_seconds(fixed, 5.0, 20, 0.3) == pytest.approx(1.0)  # 5 x 20 steps x 0.01 s
    assert training_seconds(fixed, 1.0, 20, 0.3) == 0.3  # never faster than it really was
