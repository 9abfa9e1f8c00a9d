"""A cluster of real nodes without GPUs: a ``ray.cluster_utils.Cluster`` on this machine, a head and
two worker nodes each offering its own ``edge_<i>`` resource. Edges run on their nodes; a lost node
is recorded and replaced; `fedray run` joining the cluster refuses a GPU job, or trains it on CPUs."""

import json
import os
import threading
import time

import numpy as np
import pytest
import ray
import yaml
from mlflow import MlflowClient
from ray._private import ray_constants
from ray.cluster_utils import Cluster

from fedray.config import parse_job
from fedray.platform.driver import Driver
from fedray.platform.run import run_job
from fedray.platform.tracking import start_run

from conftest import history, small_job, start_ray


@pytest.fixture(scope="module")
def cluster():
    """Leaves the session's local Ray for a three-node cluster, and comes back after."""
    was_connected = ray.is_initialized()
    ray.shutdown()
    # connect() put this process in Ray's single-machine mode; a cluster needs it off
    os.environ[ray_constants.ENABLE_RAY_CLUSTERS_ENV_VAR] = "1"
    ray_constants.ENABLE_RAY_CLUSTER = True
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    nodes = [cluster.add_node(num_cpus=1, resources={f"edge_{e}": 1}) for e in range(2)]
    ray.init(address=cluster.address)
    yield cluster, [n.node_id for n in nodes]
    ray.shutdown()
    cluster.shutdown()
    if was_connected:
        start_ray()


def job(**overrides):
    return small_job(devices__per_round=6, **overrides)


def test_edges_and_their_devices_run_on_their_nodes_and_equal_flat(cluster, tracking_uri, tmp_path):
    _, edge_nodes = cluster
    here = ray.get_runtime_context().get_node_id()
    raw = job(rounds=3, topology={"edges": 2, "placement": {"kind": "resource"}})
    run_dir = start_run(tracking_uri, "tests", "edges", tmp_path / "runs")
    driver = ray.remote(Driver).options(num_cpus=0, resources={"node:__internal_head__": 0.001}).remote(
        parse_job(raw), str(run_dir), yaml.safe_dump(raw))
    placement = ray.get(driver.placement.remote())
    assert placement["edges"] == edge_nodes
    for device, edge in enumerate(placement["edge_of"]):
        assert edge == device % 2  # round robin
        workers = placement["group_workers"][placement["group_of"][device]]
        assert {placement["workers"][w] for w in workers} == {edge_nodes[edge]}
    tree = [ray.get(driver.run_round.remote(r)).metrics for r in (1, 2, 3)]
    ray.get(driver.finish.remote())
    ray.kill(driver)  # and its workers, which hold the worker nodes' CPUs
    flat_raw = job(rounds=3)
    flat = run_job(parse_job(flat_raw), yaml.safe_dump(flat_raw), tracking_uri)
    client = MlflowClient(tracking_uri)
    np.testing.assert_allclose([m["test_loss"] for m in tree], history(client, flat["run_id"], "test_loss"), rtol=1e-5)
    assert all(m["participants_edge_0"] == m["participants_edge_1"] == 3 for m in tree)
    assert here not in edge_nodes


def test_a_node_lost_mid_run_is_recorded_and_its_edge_comes_back_on_a_new_node(cluster, tracking_uri, tmp_path):
    c, edge_nodes = cluster
    lost = next(n for n in c.worker_nodes if n.node_id == edge_nodes[1])

    def on_round(result):
        if result.round == 2:  # remove edge 1's node while round 3 trains (devices take about 2 s)
            threading.Thread(target=lambda: (time.sleep(0.5), c.remove_node(lost))).start()
        if result.round == 4:
            c.add_node(num_cpus=1, resources={"edge_1": 1})

    raw = job(rounds=9, topology={"edges": 2, "placement": {"kind": "resource"}}, devices__min_completion=0.5,
              devices__speed={"kind": "slow_fraction", "fraction": 1.0, "slowdown": 1.0, "step_seconds": 0.25})
    summary = run_job(parse_job(raw), yaml.safe_dump(raw), tracking_uri, on_round)
    client = MlflowClient(tracking_uri)
    run_id = summary["run_id"]
    assert client.get_run(run_id).info.status == "FINISHED" and summary["rounds"] == 9
    failures = history(client, run_id, "edge_failures")
    assert failures[:2] == [0, 0] and failures[2] == 1 and failures[-1] == 0
    assert history(client, run_id, "round_failed") == [0] * 9  # edge 0's three devices make the quorum
    rounds = json.load(open(client.download_artifacts(run_id, "rounds.json", str(tmp_path))))
    assert "edge 1 failed" in rounds[2]["edge_failures"]["1"]
    assert {int(d) for d in rounds[2]["failures"]} == {1, 3, 5}
    assert "edge 1 is not up" in rounds[3]["edge_failures"]["1"]  # no node for it until round 5
    edge_1 = history(client, run_id, "participants_edge_1")
    assert edge_1[:2] == [3, 3] and edge_1[-1] == 3  # the recreated edge on the new node


def test_a_gpu_job_on_a_cluster_without_gpus_fails_at_start_or_falls_back_under_auto(cluster, tmp_path):
    """`fedray run` on the cluster (this process is connected to it, as a submitted job is)."""
    from click.testing import CliRunner

    from fedray.cli import main

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"

    def run(resources: dict, **overrides):
        job = tmp_path / "job.yaml"
        job.write_text(yaml.safe_dump(small_job(rounds=1, devices__resources=resources, **overrides)))
        return CliRunner().invoke(main, ["run", str(job), "--tracking-uri", uri, "--runs-dir", str(tmp_path / "runs")])

    refused = run({"num_gpus": 0.5})
    assert refused.exit_code != 0
    assert "devices.resources.num_gpus is 0.5 but the cluster has no GPUs" in refused.stderr
    assert "devices.resources.gpu: auto" in refused.stderr
    fallback = run({"num_gpus": 0.5, "gpu": "auto"})
    assert fallback.exit_code == 0, fallback.output
    assert "resources       devices.resources.num_gpus 0.5 with gpu: auto, but the cluster has no GPUs" in fallback.stdout
    driver_gpu = run({}, evaluation__num_gpus=1)  # refused before any MLflow run is made
    assert driver_gpu.exit_code != 0
    assert "evaluation.num_gpus is 1 but this node, where the driver runs, has 0 GPUs" in driver_gpu.stderr
