"""End-to-end runs on a real local Ray, checked through the real MLflow client."""

import json

import mlflow
import numpy as np
import pytest
import ray
import torch
import yaml
from mlflow import MlflowClient

from fedray.config import parse_job
from fedray.data import datasets, partition
from fedray.platform.run import RunError, run_job

from conftest import history, small_job

pytestmark = pytest.mark.usefixtures("ray_session")


def run(tracking_uri, **overrides):
    raw = small_job(**overrides)
    return run_job(parse_job(raw), yaml.safe_dump(raw), tracking_uri), raw


def test_run_is_tracked_in_mlflow(tracking_uri, tmp_path):
    summary, raw = run(tracking_uri, rounds=4, evaluation={"every": 2, "federated": True},
                       tracking={"experiment": "tests", "log_model": True})
    client = MlflowClient(tracking_uri)
    r = client.get_run(summary["run_id"])
    assert r.info.status == "FINISHED"
    assert client.get_experiment(r.info.experiment_id).name == "tests"
    assert r.data.params["devices.per_round"] == "4" and r.data.params["model.name"] == "logreg"
    assert len(history(client, r.info.run_id, "participants")) == 4
    assert history(client, r.info.run_id, "participants") == [4, 4, 4, 4]
    assert len(history(client, r.info.run_id, "test_accuracy")) == 2  # rounds 2 and 4
    assert len(history(client, r.info.run_id, "federated_test_accuracy")) == 2
    acc = history(client, r.info.run_id, "test_accuracy")
    assert acc[-1] > max(acc[0], 0.5) and summary["test_accuracy"] == acc[-1]
    # bytes: 650 float32 parameters (64*10 + 10) per device, up with the 38-byte header, down exactly
    params = 64 * 10 + 10
    assert history(client, r.info.run_id, "bytes_down") == [4 * 4 * params] * 4
    assert history(client, r.info.run_id, "bytes_up") == [4 * (38 + 4 * params)] * 4
    for key in ("train_loss", "round_seconds", "failures", "test_loss"):
        assert history(client, r.info.run_id, key)
    artifacts = {a.path for a in client.list_artifacts(r.info.run_id)}
    assert {"job.yaml", "rounds.json", "accuracy_loss.png"} <= artifacts
    assert yaml.safe_load(open(client.download_artifacts(r.info.run_id, "job.yaml", str(tmp_path)))) == raw
    # the logged model is the final global model: it reproduces the logged accuracy on the holdout
    mlflow.set_tracking_uri(tracking_uri)
    model = mlflow.pytorch.load_model(f"runs:/{r.info.run_id}/model")
    job = parse_job(raw)
    data = datasets.load(job.data, job.seed)
    holdout = partition.split(data.y, job.data, job.devices.count, job.seed).holdout
    with torch.no_grad():
        pred = model(torch.from_numpy(data.x[holdout])).argmax(1).numpy()
    assert np.mean(pred == data.y[holdout]) == pytest.approx(acc[-1])


def test_result_does_not_depend_on_worker_count(tracking_uri, reference):
    two, _ = run(tracking_uri, rounds=3, devices__workers=2)
    _, one = reference(rounds=3)  # devices.workers 1
    assert one["test_accuracy"] == two["test_accuracy"] and one["test_loss"] == two["test_loss"]


def test_virtual_devices_draw_their_samples_where_they_train(tracking_uri, local_run):
    """100,000 devices whose data exists only while they train: each of a round's 10 devices
    draws its 20 samples from its seed on a worker, and the model learns the clusters."""
    summary = local_run(rounds=4, data={"dataset": "synthetic", "synthetic": {
        "samples": 2000, "shape": [16], "classes": 4, "per_device": 25}, "partition": {"kind": "iid"}},
        devices={"count": 100_000, "per_round": 10, "workers": 2, "local": {"epochs": 2, "lr": 0.1}})
    client = MlflowClient(tracking_uri)
    assert history(client, summary["run_id"], "participants") == [10] * 4
    accuracy = history(client, summary["run_id"], "test_accuracy")  # on 400 held-out samples
    assert accuracy[-1] > 0.8 and accuracy[-1] > accuracy[0]


def test_dead_worker_is_a_failure_and_is_replaced(tracking_uri, local_driver):
    driver = local_driver(small_job(rounds=3, devices__count=4, devices__per_round=4, devices__workers=2))
    first = driver.run_round(1)
    assert first.completed and not first.failures
    ray.kill(driver.pool.workers.actors[0], no_restart=True)
    second = driver.run_round(2)
    # the device sent to the dead worker fails; the others train on the live worker and the new one
    assert len(second.failures) == 1 and all("worker 0 failed" in r for r in second.failures.values())
    assert second.metrics["participants"] == 3 and second.completed
    third = driver.run_round(3)
    assert third.completed and not third.failures and third.metrics["participants"] == 4
    summary = driver.finish()
    assert summary["failures"] == 1
    client = MlflowClient(tracking_uri)
    assert history(client, summary["run_id"], "failures") == [0, 1, 0]


def poisoned_digits(path, poisoned_classes):
    """Digits classes 0-5, features of the given classes set to +-1e30: training on them overflows."""
    d = datasets.load(parse_job(small_job()).data, 0)
    keep = d.y < 6
    x, y = d.x[keep].reshape(-1, 64), d.y[keep]
    bad = np.isin(y, poisoned_classes)
    x[bad] = 1e30 * np.random.default_rng(0).choice([-1.0, 1.0], size=(bad.sum(), 64))
    np.savez(path, x=x, y=y)
    # one class per device, all six devices every round
    return {"data": {"dataset": "npz", "path": str(path), "partition": {"kind": "shards", "labels_per_device": 1},
                     "holdout": 0.2, "test_fraction": 0.0},
            "devices__count": 6, "devices__per_round": 6}


def test_non_finite_updates_are_rejected_and_model_kept(local_driver, tmp_path):
    driver = local_driver(small_job(**poisoned_digits(tmp_path / "all.npz", [0, 1, 2, 3, 4, 5])))
    before = driver.evaluate()
    result = driver.run_round(1)
    assert not result.completed and result.metrics["participants"] == 0
    assert len(result.failures) == 6 and all("non-finite" in r for r in result.failures.values())
    assert driver.evaluate() == before
    assert driver.finish("FAILED")["completed_rounds"] == 0


def test_one_bad_device_does_not_stop_the_round(local_driver, tmp_path):
    driver = local_driver(small_job(**poisoned_digits(tmp_path / "one.npz", [5])))
    result = driver.run_round(1)
    assert result.completed and result.metrics["participants"] == 5
    (bad,) = result.failures
    assert "non-finite" in result.failures[bad]
    driver.finish()


def test_hung_devices_time_out_and_round_fails(local_driver):
    driver = local_driver(small_job(model={"class": "user_models:SlowLogReg",
                                           "kwargs": {"features": 64, "classes": 10, "sleep_s": 0.5}},
                                    devices__timeout_s=1.0, devices__local={"steps": 6}, devices__workers=2))
    before = driver.evaluate()
    result = driver.run_round(1)
    assert not result.completed and len(result.failures) == 4
    # one device per worker started, and hung it; the other two waited for a free worker
    reasons = sorted(result.failures.values())
    assert reasons == ["no answer within 1s (devices.timeout_s)"] * 2 + ["no worker was free within the round's 1s"] * 2
    assert driver.evaluate() == before
    driver.finish("FAILED")


def test_finish_twice_ends_the_run_once(tracking_uri, local_driver):
    driver = local_driver(small_job(rounds=1))
    driver.run_round(1)
    first = driver.finish("FINISHED")
    assert driver.finish("FAILED") == first
    client = MlflowClient(tracking_uri)
    assert client.get_run(first["run_id"]).info.status == "FINISHED"
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert [r.info.run_id for r in runs] == [first["run_id"]]  # no stray run in another experiment


def test_failed_setup_ends_the_run_failed_with_the_cause(tracking_uri, tmp_path):
    missing = tmp_path / "gone.npz"
    np.savez(missing, x=np.ones((40, 3)), y=np.arange(40) % 2)
    raw = small_job(rounds=3, data={"dataset": "npz", "path": str(missing)})
    with pytest.raises(RunError, match=f"failed: data.path: {missing} does not exist$") as error:
        # the data file disappears after the run started: the driver's setup fails
        missing.unlink()
        run_job(parse_job(raw), yaml.safe_dump(raw), tracking_uri, runs_dir=tmp_path / "runs")
    run = MlflowClient(tracking_uri).get_run(error.value.run_id)
    assert run.info.status == "FAILED" and run.data.tags["fedray.error"] == f"data.path: {missing} does not exist"
    assert error.value.unlogged == 0 and not any((tmp_path / "runs").iterdir())  # all sent: the journal is gone


def test_deployment_mode_runs_one_actor_per_device(local_driver):
    driver = local_driver(small_job(data={"dataset": "breast_cancer", "partition": {"kind": "quantity_skew", "beta": 2.0}},
                                    devices={"count": 3, "per_round": 3, "mode": "deployment",
                                             "local": {"epochs": 1, "optimizer": "adam", "lr": 0.01}}))
    assert len(driver.pool.workers.actors) == 3 and driver.pool.group_workers == [[0], [1], [2]]
    result = driver.run_round(1)
    assert result.completed and result.metrics["participants"] == 3
    driver.finish()


@pytest.mark.parametrize("name", ["fedavgm", "fedprox", "fednova", "scaffold", "fedadam", "fedyogi", "fedadagrad"])
def test_strategies_train_end_to_end(reference, name):
    client, summary = reference(rounds=3, strategy={"name": name})  # test_secure encrypts some of these
    run = client.get_run(summary["run_id"])
    assert run.data.params["strategy.name"] == name and summary["completed_rounds"] == 3
    assert summary["test_accuracy"] > 0.3  # chance is 0.1
    if name == "scaffold":  # the server control variate moved
        assert all(v > 0 for v in history(client, summary["run_id"], "control_norm"))


@pytest.mark.parametrize("strategy", [{"name": "trimmed_mean", "beta": 0.2}, {"name": "multi_krum", "byzantine": 2}])
def test_robust_rules_name_the_attackers_every_round(tracking_uri, local_run, strategy):
    """IID digits, 10 devices all sampled, 2 of them send -10 x their delta every round: the run
    records who attacks, and the rule flags exactly them, by device, every round. (Accuracy under
    attack against clean FedAvg, for every rule: benchmarks/accept.py robust.)"""
    run_id = local_run(rounds=2, devices={"count": 10, "per_round": 10, "workers": 2, "min_completion": 1.0,
                                          "local": {"epochs": 2, "batch_size": 32, "lr": 0.5}},
                       strategy=strategy, attack={"fraction": 0.2, "kind": "sign_flip", "scale": 10.0})["run_id"]
    client = MlflowClient(tracking_uri)
    attackers = json.loads(open(client.download_artifacts(run_id, "attackers.json")).read())
    assert len(attackers) == 2 and history(client, run_id, "attackers") == [2] * 2
    rounds = json.loads(open(client.download_artifacts(run_id, "rounds.json")).read())
    assert [r["flagged"] for r in rounds] == [sorted(attackers)] * 2
    assert history(client, run_id, "flagged") == [2] * 2
