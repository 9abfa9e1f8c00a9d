"""The device -> edge -> cloud tree on one node: the pure pieces (wire format, assignment, the
network model) by hand, and real runs with edge actors against flat FedAvg."""

import json
import os
import signal
import threading
import time

import numpy as np
import pytest
from mlflow import MlflowClient

from fedray.config import Link, NetworkSpec, TopologySpec, parse_job
from fedray.platform import topology
from fedray.platform.aggregation import Partial

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
    p.below_clip = 2.5  # adaptive clipping's indicator sum rides along
    assert Partial.from_bytes(p.to_bytes(), 3).below_clip == 2.5
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
    # workers 0 and 2 on node a, worker 1 on node b
    edge_of_worker, nodes = topology.colocated(["a", "b", "a"], 2)
    np.testing.assert_array_equal(edge_of_worker, [0, 1, 0])
    assert nodes == ["a", "b"]
    with pytest.raises(RuntimeError, match="needs device workers on at least 3 nodes, but they run on 2"):
        topology.colocated(["a", "b", "a"], 3)


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


@pytest.mark.usefixtures("ray_session")
@pytest.mark.parametrize("strategy", [{"name": "fedavg"}, {"name": "scaffold"}])
def test_edges_equal_flat_aggregation(tracking_uri, strategy, local_run):
    client = MlflowClient(tracking_uri)
    flat = local_run(rounds=3, strategy=strategy, network=LATENCY_ONLY)
    tree = local_run(rounds=3, strategy=strategy, network=LATENCY_ONLY, topology={"edges": 2})
    np.testing.assert_allclose(history(client, tree["run_id"], "test_loss"),
                               history(client, flat["run_id"], "test_loss"), rtol=1e-5)
    assert tree["bytes_down"] == flat["bytes_down"]
    # the same updates; their JSON headers' train_loss may print a digit longer or shorter (float
    # sums in another order)
    assert abs(tree["bytes_up"] - flat["bytes_up"]) <= 3 * 4 * 2
    params = 64 * 10 + 10
    control = 2 if strategy["name"] == "scaffold" else 1  # SCAFFOLD sends c down and control changes up
    down = control * 4 * params
    # each edge gets the model once and sends one Partial (a 57-byte header and its sums) up
    assert history(client, tree["run_id"], "bytes_edge_cloud") == [2 * down + 2 * (57 + control * 4 * params)] * 3
    device_edge = history(client, tree["run_id"], "bytes_device_edge")
    assert device_edge == [b + 4 * down for b in history(client, tree["run_id"], "bytes_up")]
    for r in range(3):
        assert sum(history(client, tree["run_id"], f"participants_edge_{e}")[r] for e in (0, 1)) == 4
    # latency only: flat pays both tiers twice, the tree one cloud round trip and one device round trip
    assert history(client, flat["run_id"], "sim_comm_seconds") == pytest.approx([0.42] * 3, abs=1e-6)
    assert history(client, tree["run_id"], "sim_comm_seconds") == pytest.approx([0.42] * 3, abs=1e-6)


@pytest.mark.usefixtures("ray_session")
def test_hierfavg_with_one_edge_is_fedavg_over_its_edge_rounds(tracking_uri, local_run):
    """One edge holding every device, two edge rounds per cloud round: each cloud round is two
    FedAvg rounds (devices train for edge rounds 2r-1 and 2r, seeded as flat rounds are)."""
    client = MlflowClient(tracking_uri)
    every = {"devices__per_round": 6, "network": LATENCY_ONLY}
    flat = local_run(rounds=4, **every)
    tree = local_run(rounds=2, topology={"edges": 1, "edge_rounds": 2}, **every)
    np.testing.assert_allclose(history(client, tree["run_id"], "test_loss"),
                               history(client, flat["run_id"], "test_loss")[1::2], rtol=1e-5)
    params = 4 * (64 * 10 + 10)
    assert history(client, tree["run_id"], "bytes_edge_cloud") == [params + 57 + params] * 2
    assert history(client, tree["run_id"], "bytes_down") == [2 * 6 * params] * 2
    # one cloud round trip (0.4 s), two device round trips (0.02 s each)
    assert history(client, tree["run_id"], "sim_comm_seconds") == pytest.approx([0.44] * 2, abs=1e-6)


@pytest.mark.usefixtures("ray_session")
def test_an_edge_killed_mid_round_is_recorded_and_recreated(tracking_uri, tmp_path, local_run):
    def kill_an_edge(result):
        if result.round == 1:
            def kill():
                time.sleep(0.5)  # into round 2, while devices train for about 1.5 s
                os.kill(max(processes("ray::EdgeAggregator")), signal.SIGKILL)

            threading.Thread(target=kill).start()

    summary = local_run(kill_an_edge, rounds=6, topology={"edges": 2}, devices__min_completion=0.25,
                  devices__speed={"kind": "slow_fraction", "fraction": 1.0, "slowdown": 1.0, "step_seconds": 0.25})
    client = MlflowClient(tracking_uri)
    failures = history(client, summary["run_id"], "edge_failures")
    # the recreated edge's process imports torch: on a loaded 2-core machine it is up a few rounds later
    assert failures[0] == 0 and failures[1] == 1 and failures[-1] == 0
    assert history(client, summary["run_id"], "round_failed") == [0] * 6
    rounds = json.load(open(client.download_artifacts(summary["run_id"], "rounds.json", str(tmp_path))))
    (edge, reason), = rounds[1]["edge_failures"].items()
    assert "failed" in reason and "ActorDiedError" in reason
    assert all(rounds[1]["failures"][str(d)] == reason for d in range(int(edge), 6, 2) if str(d) in rounds[1]["failures"])
    # later rounds use the recreated edge
    assert history(client, summary["run_id"], f"participants_edge_{edge}")[-1] > 0


@pytest.mark.usefixtures("ray_session")
@pytest.mark.parametrize("name", ["fedasync", "fedbuff"])
def test_an_edge_folds_asynchronous_arrivals_as_the_driver_does(name):
    """The same finished tasks, folded by an edge (from refs, rebasing on model refs) and by the
    driver's flat path, give the same Partial; a failed task and a too-stale one are not folded."""
    import ray

    from fedray.platform import strategies
    from fedray.platform.edge import EdgeAggregator
    from fedray.platform.intake import Intake
    from fedray.platform.pool import Done, Task
    from fedray.update import Update

    job = parse_job(small_job(strategy={"name": name, "concurrency": 4, "max_staleness": 2}, topology={"edges": 1}))
    rng = np.random.default_rng(0)
    versions = {v: rng.normal(size=5).astype(np.float32) for v in range(4)}  # the model at each server step
    current, train_sizes = 3, [10, 20, 30, 40]
    arrivals = []  # (device, started from version, payload or failure)
    for d, v in [(0, 3), (1, 1), (2, 2), (3, 0)]:  # device 3 is 3 steps stale: dropped
        update = Update(d, d + 1, train_sizes[d], 2, 0.5, rng.normal(size=5).astype(np.float32))
        arrivals.append((d, v, update.to_bytes()))
    arrivals.append((2, 3, ValueError("device 2 ran out of memory")))

    def task(d, v, i):
        return Task(d, (d + 1 if i < 4 else 99, v), 0, 0, 0.0)

    check = {"size": 5, "train_sizes": train_sizes, "expect_control": False}
    strategy = strategies.for_job(job)
    flat, flat_intake = Partial.zeros(5), Intake()
    for i, (d, v, value) in enumerate(arrivals):
        done = Done(task(d, v, i), failure=str(value)) if isinstance(value, Exception) else Done(task(d, v, i), value)
        flat_intake.fold_arrival(done, current - v, strategy, flat, lambda: versions[v] - versions[current], **check)

    @ray.remote
    def result(value):
        if isinstance(value, Exception):
            raise value
        return value

    models = {v: ray.put(p) for v, p in versions.items()}
    edge = EdgeAggregator(job, 0, 5, train_sizes)
    report = edge.fold_arrivals([(task(d, v, i), [result.remote(value)], current - v)
                                 for i, (d, v, value) in enumerate(arrivals)], models, current)
    folded = Partial.from_bytes(report.partial, 5)
    assert folded.count == flat.count == 3 and report.intake.stale_dropped == flat_intake.stale_dropped == 1
    np.testing.assert_allclose(folded.weighted_sum, flat.weighted_sum, rtol=1e-6)
    assert folded.weight == pytest.approx(flat.weight)
    assert report.intake.folded == flat_intake.folded == [0, 1, 2]
    assert report.intake.staleness == flat_intake.staleness == [0, 2, 1]
    assert "ValueError: device 2 ran out of memory" in report.intake.failures[2]
    if name == "fedasync":  # a stale delta was rebased on the current model: the sums differ from plain ones
        plain = sum(strategy.weight(s) * Update.from_bytes(arrivals[d][2]).delta for d, s in [(0, 0), (1, 2), (2, 1)])
        assert not np.allclose(folded.weighted_sum, plain)


@pytest.mark.usefixtures("ray_session")
def test_fedbuff_through_edges_survives_an_edge_killed_mid_run(tracking_uri, tmp_path, local_run):
    def kill_an_edge(result):
        if result.round == 2:
            os.kill(max(processes("ray::EdgeAggregator")), signal.SIGKILL)
        if result.edge_failures:  # steps take ~0.2 s: give the recreated edge time to start
            until = time.monotonic() + 30
            while len(processes("ray::EdgeAggregator")) < 2 and time.monotonic() < until:
                time.sleep(0.1)

    summary = local_run(kill_an_edge, rounds=12, topology={"edges": 2},
                  model={"class": "user_models:SlowLogReg", "kwargs": {"features": 64, "classes": 10, "sleep_s": 0.05}},
                  devices__local={"steps": 2, "lr": 0.5},
                  strategy={"name": "fedbuff", "concurrency": 4, "buffer_size": 2})
    client = MlflowClient(tracking_uri)
    run_id = summary["run_id"]
    assert history(client, run_id, "participants") == [2] * 12 and history(client, run_id, "round_failed") == [0] * 12
    per_edge = [history(client, run_id, f"participants_edge_{e}") for e in (0, 1)]
    steps = {e: [s.step for s in client.get_metric_history(run_id, f"participants_edge_{e}")] for e in (0, 1)}
    for r in range(1, 13):  # every folded update came up in its edge's Partial
        assert sum(h[steps[e].index(r)] for e, h in enumerate(per_edge) if r in steps[e]) == 2
    assert history(client, run_id, "bytes_device_edge") == [
        up + down for up, down in zip(history(client, run_id, "bytes_up"), history(client, run_id, "bytes_down"))]
    rounds = json.load(open(client.download_artifacts(run_id, "rounds.json", str(tmp_path))))
    failed = [(r["round"], r["edge_failures"]) for r in rounds if r["edge_failures"]]
    assert failed and failed[0][0] >= 3 and "ActorDiedError" in next(iter(failed[0][1].values()))
    edge = int(next(iter(failed[0][1])))
    assert any(r > failed[0][0] for r in steps[edge])  # the recreated edge folds again
    accuracy = history(client, run_id, "test_accuracy")
    assert accuracy[-1] > max(accuracy[0], 0.5)
