"""Asynchronous strategies and round deadlines on a real local Ray, with slow devices that really
are slow (SlowLogReg sleeps in every training step; devices.speed multiplies that)."""

import json

import pytest
from mlflow import MlflowClient

from fedray.agents.heterogeneity import slowdowns
from fedray.config import parse_job

from conftest import history, small_job

pytestmark = pytest.mark.usefixtures("ray_session")

# 2 steps of 0.1 s: a device trains in ~0.2 s; the 2 slow devices of 6 answer 15 x 2 x 0.1 = 3 s
# after they were sent the model (a fixed time: a worker's slow first call does not stretch it)
SLOW_DEVICES = {
    "model": {"class": "user_models:SlowLogReg", "kwargs": {"features": 64, "classes": 10, "sleep_s": 0.1}},
    "devices__local": {"steps": 2, "lr": 0.5},
    "devices__speed": {"kind": "slow_fraction", "fraction": 0.34, "slowdown": 15, "step_seconds": 0.1},
    "devices__workers": 2,
}


def run(local_run, tracking_uri, **overrides):
    """A client of the run's store and the run's id; its rounds run on a driver in this process."""
    return MlflowClient(tracking_uri), local_run(**overrides)["run_id"]


def test_fedbuff_steps_without_waiting_for_slow_devices(tracking_uri, tmp_path, local_run):
    client, run_id = run(local_run, tracking_uri, rounds=8, **SLOW_DEVICES,
                         strategy={"name": "fedbuff", "concurrency": 4, "buffer_size": 2})
    assert history(client, run_id, "participants") == [2] * 8  # rounds count server steps
    # 16 updates of ~0.2 s on 2 workers: the steps after the first never wait 3 s for a slow device
    assert sum(history(client, run_id, "round_seconds")[1:]) < 3.0
    staleness = history(client, run_id, "staleness_max")
    assert len(staleness) == 8 and max(staleness) >= 1
    counts = json.load(open(client.download_artifacts(run_id, "staleness.json", str(tmp_path))))
    assert sum(counts.values()) == 16  # every folded update, by staleness
    accuracy = history(client, run_id, "test_accuracy")
    assert accuracy[-1] > max(accuracy[0], 0.5)


def test_fedasync_drops_updates_staler_than_the_bound(tracking_uri, local_run):
    # devices slower than the driver's step (~0.2 s each) so that several steps pass while one trains
    client, run_id = run(local_run, tracking_uri, rounds=16, model=SLOW_DEVICES["model"], devices__local={"steps": 2, "lr": 0.5},
                         devices__workers=2, strategy={"name": "fedasync", "concurrency": 4, "max_staleness": 1,
                                   "staleness": {"kind": "hinge", "a": 10, "b": 0}})
    assert history(client, run_id, "participants") == [1] * 16  # one update mixed in per step
    assert max(history(client, run_id, "staleness_max")) <= 1
    # 4 devices in flight, one step per arrival: most arrivals are 2-3 steps stale
    assert sum(history(client, run_id, "stale_dropped")) > 0
    accuracy = history(client, run_id, "test_accuracy")
    assert accuracy[-1] > accuracy[0] + 0.1


def test_late_updates_are_dropped_at_the_deadline(local_driver):
    driver = local_driver(small_job(devices__count=6, devices__per_round=6, devices__deadline_s=2.5, **SLOW_DEVICES))
    speed = parse_job(small_job(**SLOW_DEVICES)).devices.speed
    slow = {d for d, factor in enumerate(slowdowns(speed, 6, seed=0)) if factor > 1}
    result = driver.run_round(1)
    assert result.completed and result.metrics["participants"] == 4 and result.metrics["late"] == 2
    assert set(result.failures) == slow and len(slow) == 2
    assert all("missed the round deadline (2.5s" in reason for reason in result.failures.values())
    assert 2.5 <= result.metrics["round_seconds"] < 3.5
    driver.finish()


def test_late_updates_join_the_next_round_with_their_staleness(local_driver):
    driver = local_driver(small_job(rounds=2, devices__count=6, devices__per_round=6, devices__deadline_s=2.5,
                                    devices__late="next_round", **SLOW_DEVICES))
    first = driver.run_round(1)
    assert first.metrics["participants"] == 4 and first.metrics["late"] == 2 and not first.failures
    second = driver.run_round(2)
    # the 2 slow devices still train for round 1, so round 2 samples the other 4; their round-1
    # updates (3 s after round 1 started) arrive before round 2's deadline
    assert second.metrics["participants"] == 6 and second.metrics["late_accepted"] == 2
    assert second.metrics["staleness_max"] == 1 and not second.failures
    driver.finish()
