"""GPU workers without a GPU: the test session's Ray has two logical GPUs, so workers are placed by
their GPU fractions as on a GPU cluster, and train on the CPU because CUDA sees no device. (A
cluster without GPUs refusing a GPU job: test_cluster.py.)"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import ray
import torch
import yaml

from conftest import small_job
from fedray.agents.training import LocalTraining, device_generator, train
from fedray.config import JobError, parse_job
from fedray.config.resources import ResourcesSpec, gpus_to_ask
from fedray.models.zoo import build_model


def test_workers_share_the_gpus_by_their_fraction_and_never_touch_cuda_without_one(local_driver):
    driver = local_driver(small_job(devices__workers=None, devices__resources={"num_gpus": 0.5}))
    workers = driver.pool.workers.actors
    places = ray.get([w.placement.remote() for w in workers])
    assert len(workers) == 4  # two GPUs, half a GPU each
    assert all(len(p["gpu_ids"]) == 1 for p in places)
    assert sorted(Counter(p["gpu_ids"][0] for p in places).values()) == [2, 2]  # two workers per GPU
    assert all(p["device"] == "cpu" and not p["cuda_initialized"] and p["gpu_memory"] == 0 for p in places)
    result = driver.run_round(1)
    assert result.completed and result.metrics["participants"] == 4
    assert not any(p["cuda_initialized"] for p in ray.get([w.placement.remote() for w in workers]))
    assert driver.pool.note is None


def test_a_job_that_asks_for_more_gpus_than_the_cluster_has_fails_naming_them():
    assert gpus_to_ask(ResourcesSpec(num_gpus=0.25), 2.0) == (0.25, None)
    assert gpus_to_ask(ResourcesSpec(), 0.0) == (0.0, None)
    assert gpus_to_ask(ResourcesSpec(num_gpus=1, gpu="auto"), 0.0)[1].endswith("workers train on CPUs")
    with pytest.raises(ValueError, match="num_gpus 3 per worker, but the cluster has 2 GPU"):
        gpus_to_ask(ResourcesSpec(num_gpus=3), 2.0)


@pytest.mark.usefixtures("ray_session")
def test_the_driver_evaluates_the_held_out_set_itself_when_it_holds_a_gpu(tracking_uri, local_driver):
    from fedray.platform.driver import Driver
    from fedray.platform.tracking import start_run

    raw = small_job(evaluation={"num_gpus": 1})
    job = parse_job(raw)
    run_dir = start_run(tracking_uri, "tests", job.name, Path(tracking_uri[len("sqlite:///"):]).parent)
    driver = ray.remote(Driver).options(num_cpus=0, num_gpus=1).remote(job, str(run_dir), yaml.safe_dump(raw))
    where = ray.get(driver.__ray_call__.remote(
        lambda self: (len(ray.get_gpu_ids()), self.evaluation.here, str(self.evaluation.device))))
    assert where == (1, True, "cpu")  # a logical GPU: CUDA sees none, so the CPU
    on_driver = ray.get(driver.run_round.remote(1)).metrics
    ray.get(driver.finish.remote())
    ray.kill(driver)  # and its workers with it
    plain = local_driver(small_job())  # evaluates on its workers
    on_workers = plain.run_round(1).metrics
    assert on_driver["test_accuracy"] == on_workers["test_accuracy"]
    assert on_driver["test_loss"] == pytest.approx(on_workers["test_loss"], rel=1e-6)
    plain.finish()


@pytest.mark.parametrize("extra, message", [
    ({"devices__resources": {"num_gpus": 1.5}}, "must be a whole number"),
    ({"devices__local": {"mixed_precision": True}, "privacy": {"level": "sample", "noise_multiplier": 1.0}},
     "bfloat16"),
])
def test_gpu_settings_that_cannot_work_are_refused(extra, message):
    with pytest.raises(JobError, match=message):
        parse_job(small_job(**extra))


def test_mixed_precision_trains_in_bfloat16_and_returns_float32_weights():
    """torch.autocast runs on the CPU too: the forward pass in bfloat16 still lowers the loss, and
    the weights (what a device sends) stay float32."""
    rng = np.random.default_rng(0)
    x = torch.from_numpy(rng.normal(size=(256, 20)).astype(np.float32))
    y = torch.from_numpy((x[:, 0] > 0).long().numpy())
    losses = {}
    for mixed in (False, True):
        model = build_model("mlp", None, {}, (20,), 2, seed=0)
        cfg = LocalTraining(epochs=5, batch_size=32, lr=0.1, mixed_precision=mixed)
        _, first = train(model, x, y, LocalTraining(epochs=1, batch_size=32, lr=0.0), device_generator(0, 1, 0))
        _, losses[mixed] = train(model, x, y, cfg, device_generator(0, 1, 0))
        assert all(p.dtype == torch.float32 for p in model.parameters())
        assert losses[mixed] < 0.8 * first
    assert losses[True] != losses[False]  # bfloat16 did run
    assert losses[True] == pytest.approx(losses[False], rel=0.1)
