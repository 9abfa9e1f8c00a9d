"""The device -> edge -> cloud tree on one node: the pure pieces (wire format, assignment, the
network model) by hand, and real runs with edge actors against flat FedAvg."""

import json
import os
import signal
import threading
import time

import numpy as np
import pytest
import yaml
from mlflow import MlflowClient

from fedray.config import Link, NetworkSpec, TopologySpec, parse_job
from fedray.platform import topology
from fedray.platform.aggregation import Partial
from fedray.platform.run import run_job

from conftest import history, small_job

LATENCY_ONLY = {"device_edge": {"bandwidth_mbps": 1e9, "latency_ms": 10},
                "edge_cloud": {"bandwidth_mbps": 1e9, "latency_ms": 200}}


def test_partial_wire_format_round_trips_and_is_checked():
    p = Partial.zeros(3)
    p.add(np.array([1, 2, 3], dtype=np.float32), 2.0, control=np.ones(3, dtype=np.float32))
    q = Partial.from_bytes(p.to_bytes(), 3)
    np.testing.assert_array_equal(q.weighted_sum, [2, 4, 6])
    np.testing.assert_array_equal(q.control_sum, [1, 1, 1])
    assert (q.weight, q.steps_weight, q.count) == (2.0, 2.0, 1)
    assert Partial.from_bytes(Partial.zeros(3).to_bytes(), 3).control_sum is None
    with pytest.raises(ValueError, match="expected vectors of 4"):
        Partial.from_bytes(p.to_bytes(), 4)
    with pytest.raises(ValueError, match="shorter than its header"):
        Partial.from_bytes(b"abc", 3)
    p.weighted_sum[1] = np.nan
    with pytest.raises(ValueError, match="non-finite"):
        Partial.from_bytes(p.to_bytes(), 3)


def test_assignment_round_robin_attribute_and_colocated():
    job = parse_job(small_job(topology={"edges": 2}))
    np.testing.assert_array_equal(topology.assign(job), [0, 1, 0, 1, 0, 1])
    job = parse_job(small_job(topology={"edges": 3, "assign": "attribute", "attribute": "city"},
                              devices__attributes={"city": ["rome", "oslo", "rome", "lima", "oslo", "lima"]}))
    np.testing.assert_array_equal(topology.assign(job), [2, 1, 2, 0, 1, 0])  # lima, oslo, rome
    # workers 0 and 2 on node a, worker 1 on node b; devices on workers [0, 1, 2, 1]
    edge_of, nodes = topology.colocated(["a", "b", "a"], np.array([0, 1, 2, 1]), 2)
    np.testing.assert_array_equal(edge_of, [0, 1, 0, 1])
    assert nodes == ["a", "b"]
    with pytest.raises(RuntimeError, match="needs device workers on at least 3 nodes, but they run on 2"):
        topology.colocated(["a", "b", "a"], np.array([0, 1, 2]), 3)


def test_placement_options_and_missing_nodes():
    tree = TopologySpec(edges=2, placement={"kind": "resource", "name": "zone_{edge}"})
    assert topology.placement_options(tree, 1) == {"resources": {"zone_1": 0.001}}
    nodes = [{"Alive": True, "Resources": {"CPU": 1, "zone_0": 1}, "Labels": {}},
             {"Alive": False, "Resources": {"zone_1": 1}, "Labels": {}}]
    assert topology.missing_placement(tree, nodes) == ["resource 'zone_1'"]  # only on a dead node
    tree = TopologySpec(edges=2, placement={"kind": "label", "key": "region", "values": ["eu", "us"]})
    assert topology.placement_options(tree, 0) == {"label_selector": {"region": "eu"}}
    nodes[0]["Labels"] = {"region": "us"}
    assert topology.missing_placement(tree, nodes) == ["label region=eu"]
    assert topology.placement_options(TopologySpec(edges=2), 0) == {}


def test_network_model_hand_computed():
    link = Link(bandwidth_mbps=8, latency_ms=100)  # 1 MB/s
    assert topology.transfer_seconds(link, 500_000) == pytest.approx(0.6)
    net = NetworkSpec(device_edge={"bandwidth_mbps": 8, "latency_ms": 10}, edge_cloud={"bandwidth_mbps": 0.8})
    # flat: each device's bytes cross both links; the slowest device sets the round
    # device 2: down 0.01 + 1 + 10, up 0.01 + 0.5 + 5 (seconds)
    assert topology.flat_seconds(net, 1_000_000, [100_000, 500_000]) == pytest.approx(16.52)
    # edge: model down the cloud link (10 s); two edge rounds of the model down (1.01) and the slowest
    # upload back (0.51, then 0.11); its 1 MB partial up (10 s)
    assert topology.edge_seconds(net, 1_000_000, [[100_000, 500_000], [100_000]], 1_000_000) == \
        pytest.approx(10 + 1.52 + 1.12 + 10)


def processes(title: str) -> list[int]:
    """The pids of this machine's processes whose command line starts with ``title`` (Ray names an
    actor's process ``ray::Class``)."""
    pids = []
    for entry in os.listdir("/proc"):
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                if f.read().startswith(title.encode()):
                    pids.append(int(entry))
        except (OSError, ValueError):
            continue
    return pids


def run(tracking_uri, on_round=None, **overrides):
    raw = small_job(**overrides)
    return run_job(parse_job(raw), yaml.safe_dump(raw), tracking_uri, on_round)


@pytest.mark.usefixtures("ray_session")
@pytest.mark.parametrize("strategy", [{"name": "fedavg"}, {"name": "scaffold"}])
def test_edges_equal_flat_aggregation(tracking_uri, strategy):
    client = MlflowClient(tracking_uri)
    flat = run(tracking_uri, rounds=3, strategy=strategy, network=LATENCY_ONLY)
    tree = run(tracking_uri, rounds=3, strategy=strategy, network=LATENCY_ONLY, topology={"edges": 2})
    np.testing.assert_allclose(history(client, tree["run_id"], "test_loss"),
                               history(client, flat["run_id"], "test_loss"), rtol=1e-5)
    assert tree["bytes_down"] == flat["bytes_down"]
    # the same updates; their JSON headers' train_loss may print a digit longer or shorter (float
    # sums in another order)
    assert abs(tree["bytes_up"] - flat["bytes_up"]) <= 3 * 4 * 2
    params = 64 * 10 + 10
    control = 2 if strategy["name"] == "scaffold" else 1  # SCAFFOLD sends c down and control changes up
    down = control * 4 * params
    # each edge gets the model once and sends one Partial (a 33-byte header and its sums) up
    assert history(client, tree["run_id"], "bytes_edge_cloud") == [2 * down + 2 * (33 + control * 4 * params)] * 3
    device_edge = history(client, tree["run_id"], "bytes_device_edge")
    assert device_edge == [b + 4 * down for b in history(client, tree["run_id"], "bytes_up")]
    for r in range(3):
        assert sum(history(client, tree["run_id"], f"participants_edge_{e}")[r] for e in (0, 1)) == 4
    # latency only: flat pays both tiers twice, the tree one cloud round trip and one device round trip
    assert history(client, flat["run_id"], "sim_comm_seconds") == pytest.approx([0.42] * 3, abs=1e-6)
    assert history(client, tree["run_id"], "sim_comm_seconds") == pytest.approx([0.42] * 3, abs=1e-6)


@pytest.mark.usefixtures("ray_session")
def test_hierfavg_with_one_edge_is_fedavg_over_its_edge_rounds(tracking_uri):
    """One edge holding every device, two edge rounds per cloud round: each cloud round is two
    FedAvg rounds (devices train for edge rounds 2r-1 and 2r, seeded as flat rounds are)."""
    client = MlflowClient(tracking_uri)
    every = {"devices__per_round": 6, "network": LATENCY_ONLY}
    flat = run(tracking_uri, rounds=4, **every)
    tree = run(tracking_uri, rounds=2, topology={"edges": 1, "edge_rounds": 2}, **every)
    np.testing.assert_allclose(history(client, tree["run_id"], "test_loss"),
                               history(client, flat["run_id"], "test_loss")[1::2], rtol=1e-5)
    params = 4 * (64 * 10 + 10)
    assert history(client, tree["run_id"], "bytes_edge_cloud") == [params + 33 + params] * 2
    assert history(client, tree["run_id"], "bytes_down") == [2 * 6 * params] * 2
    # one cloud round trip (0.4 s), two device round trips (0.02 s each)
    assert history(client, tree["run_id"], "sim_comm_seconds") == pytest.approx([0.44] * 2, abs=1e-6)


@pytest.mark.usefixtures("ray_session")
def test_an_edge_killed_mid_round_is_recorded_and_recreated(tracking_uri, tmp_path):
    def kill_an_edge(result):
        if result.round == 1:
            def kill():
                time.sleep(0.5)  # into round 2, while devices train for about 1.5 s
                os.kill(max(processes("ray::EdgeAggregator")), signal.SIGKILL)

            threading.Thread(target=kill).start()

    summary = run(tracking_uri, kill_an_edge, rounds=4, topology={"edges": 2}, devices__min_completion=0.25,
                  devices__speed={"kind": "slow_fraction", "fraction": 1.0, "slowdown": 1.0, "step_seconds": 0.25})
    client = MlflowClient(tracking_uri)
    failures = history(client, summary["run_id"], "edge_failures")
    assert failures[0] == 0 and failures[1] == 1 and failures[3] == 0
    assert history(client, summary["run_id"], "round_failed") == [0, 0, 0, 0]
    rounds = json.load(open(client.download_artifacts(summary["run_id"], "rounds.json", str(tmp_path))))
    (edge, reason), = rounds[1]["edge_failures"].items()
    assert "failed" in reason and "ActorDiedError" in reason
    assert all(rounds[1]["failures"][str(d)] == reason for d in range(int(edge), 6, 2) if str(d) in rounds[1]["failures"])
    # later rounds use the recreated edge
    assert history(client, summary["run_id"], f"participants_edge_{edge}")[-1] > 0
