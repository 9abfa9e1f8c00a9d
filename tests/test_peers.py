"""Peer-to-peer learning: the graphs and their gossip matrices by hand, what a peer job may combine,
and real runs where agents exchange through Ray and never through the driver."""


import asyncio
import json
from pathlib import Path

import numpy as np
import pytest
import ray
import yaml
from mlflow import MlflowClient
from ray.experimental import get_object_locations

from fedray.agents import graphs
from fedray.config import JobError, parse_job
from fedray.platform.peers import build_graph

from conftest import small_job

KINDS = [{"kind": "ring"}, {"kind": "torus"}, {"kind": "grid", "rows": 3}, {"kind": "regular", "degree": 3},
         {"kind": "erdos_renyi", "probability": 0.3}, {"kind": "small_world", "neighbours": 2, "rewire": 0.3},
         {"kind": "full"}, {"kind": "edges", "edges": [[i, i + 1] for i in range(11)]}]


def peer_job(**overrides) -> dict:
    """``small_job`` as a peer job: 6 agents on digits, gossip on a ring."""
    return small_job(**{"devices__per_round": 6, "peers": {"exchange": "gossip"}, **overrides})


def test_every_graph_gives_a_symmetric_doubly_stochastic_gossip_matrix():
    for graph in KINDS:
        job = parse_job(peer_job(devices__count=12, devices__per_round=12, peers={"graph": graph}))
        a = build_graph(job)
        assert (a == a.T).all() and not a.diagonal().any() and graphs.connected(a), graph
        w = graphs.metropolis_hastings(a)
        assert np.allclose(w, w.T) and np.allclose(w.sum(axis=1), 1) and (w >= 0).all(), graph
        assert ((w > 0) == (a | np.eye(12, dtype=bool))).all(), graph  # weight exactly on the links
        assert 0 < graphs.spectral_gap(w) <= 1, graph
    degrees = {kind: build_graph(parse_job(peer_job(devices__count=12, devices__per_round=12,
                                                    peers={"graph": g}))).sum(axis=1)
               for kind, g in (("ring", KINDS[0]), ("torus", KINDS[1]), ("regular", KINDS[3]), ("full", KINDS[6]))}
    assert set(degrees["ring"]) == {2} and set(degrees["torus"]) == {4} and set(degrees["regular"]) == {3}
    assert set(degrees["full"]) == {11}
    # an exchange without some agents: still symmetric and doubly stochastic, the absent keep their own
    w = graphs.metropolis_hastings(graphs.ring(8))
    absent = np.zeros(8, dtype=bool)
    absent[[2, 5]] = True
    kept = graphs.without(w, absent)
    assert np.allclose(kept, kept.T) and np.allclose(kept.sum(axis=1), 1) and (kept >= 0).all()
    assert kept[2, 2] == kept[5, 5] == 1 and kept[1, 2] == kept[3, 2] == 0
    assert kept[1, 1] == pytest.approx(w[1, 1] + w[1, 2])


def test_gossip_reaches_the_exact_average_at_the_rate_the_spectral_gap_predicts():
    rng = np.random.default_rng(0)
    for a in (graphs.ring(16), graphs.grid(4, 4, wrap=True), graphs.random_regular(16, 3, rng)):
        w = graphs.metropolis_hastings(a)
        rate = 1 - graphs.spectral_gap(w)
        x = rng.normal(size=(16, 5))
        mean, errors = x.mean(axis=0), []
        for _ in range(400):
            x = w @ x
            errors.append(np.linalg.norm(x - mean))
        errors = np.array(errors)
        assert np.allclose(x.mean(axis=0), mean)  # mixing keeps the average
        assert errors[-1] < 1e-6 * errors[0] or errors[-1] < 1e-12
        # never slower than the rate, and (from a random start) exactly that fast in the long run
        assert (errors[1:] <= rate * errors[:-1] * (1 + 1e-9) + 1e-15).all()
        t = int(np.log(1e-5) / np.log(rate))  # far enough for the slowest mode to lead, not at rounding's floor
        late = errors[t:t + 5] / errors[t - 1:t + 4]
        assert np.allclose(late, rate, rtol=1e-3), (late, rate)


@pytest.mark.parametrize("n", [8, 9])
def test_random_matchings_mix_at_the_gap_of_their_expected_matrix(n):
    rng = np.random.default_rng(1)
    mean_w = np.mean([graphs.metropolis_hastings(graphs.random_matching(n, rng)) for _ in range(20000)], axis=0)
    assert graphs.spectral_gap(mean_w) == pytest.approx(graphs.matching_gap(n), abs=0.01)
    one = graphs.metropolis_hastings(graphs.random_matching(n, rng))  # each pair averages
    assert np.allclose(one[one > 0], 0.5) or n % 2
    # the squared error shrinks by (1 - gap) per round in expectation
    rounds, trials, ratio = 6, 4000, []
    for _ in range(trials):
        x = rng.normal(size=n)
        start = np.sum((x - x.mean()) ** 2)
        for _ in range(rounds):
            x = graphs.metropolis_hastings(graphs.random_matching(n, rng)) @ x
        ratio.append(np.sum((x - x.mean()) ** 2) / start)
    assert np.mean(ratio) == pytest.approx((1 - graphs.matching_gap(n)) ** rounds, rel=0.1)


@pytest.mark.parametrize("change, message", [
    ({"strategy": {"name": "fedprox"}}, "strategy does not apply to peers"),
    ({"secure": {"min_clients": 2}}, "secure does not apply to peers: CKKS"),
    ({"privacy": {"level": "client", "noise_multiplier": 1.0}}, "compose with sample-level DP"),
    ({"devices__per_round": 4}, "every agent trains every round"),
    ({"topology": {"edges": 2}}, "topology does not apply to peers"),
    ({"peers": {"exchange": "gossip", "models": [{"name": "mlp"}]}}, "cannot be averaged"),
    ({"peers": {"exchange": "distill", "aggregate_every": 2}}, "aggregate_every averages models"),
    ({"peers": {"graph": {"kind": "regular", "degree": 3}}, "devices__count": 5, "devices__per_round": 5},
     "3-regular graph over 5 agents"),
    ({"peers": {"graph": {"kind": "edges", "edges": [[0, 1], [2, 3], [3, 4], [4, 5]]}}}, r"agents \[2, 3, 4, 5\] cannot reach"),
    ({"peers": {"graph": {"kind": "edges", "edges": [[0, 6]]}}}, r"\(0, 6\) is not a link"),
    ({"peers": {"graph": {"kind": "ring", "degree": 2}}}, "peers.graph.degree: unknown field"),
    ({"checkpoint": {"every": 1}}, "not checkpointed yet"),
])
def test_what_peers_do_not_compose_with_is_refused_with_the_reason(change, message):
    with pytest.raises(JobError, match=message):
        parse_job(peer_job(**change))


def _fetched_arrays(value) -> list[int]:
    """The sizes of the arrays in a fetched value."""
    if isinstance(value, np.ndarray):
        return [value.size]
    if isinstance(value, (list, tuple)):
        return [n for v in value for n in _fetched_arrays(v)]
    if isinstance(value, dict):
        return [n for v in value.values() for n in _fetched_arrays(v)]
    return _fetched_arrays(vars(value)) if hasattr(value, "__dataclass_fields__") else []


def test_agents_exchange_through_ray_and_the_driver_never_receives_a_parameter_vector(local_driver, monkeypatch):
    """The driver runs in this process, so every value it fetches passes ``ray.get`` here: none
    holds a parameter vector, and what the agents keep and publish lives in the object store of
    their node, not inline in the driver's memory. Rounds 2 and 4 average globally (through an
    agent), so that path is covered too."""
    fetched, real_get = [], ray.get
    monkeypatch.setattr(ray, "get", lambda refs, **kw: fetched.append(value := real_get(refs, **kw)) or value)
    driver = local_driver(peer_job(rounds=4, peers={"exchange": "gossip", "aggregate_every": 2}))
    size = driver.spec.size  # 650 parameters: the logreg of digits
    results = [driver.run_round(r) for r in range(1, 5)]
    held = [driver.pool.records.ref(a) for a in range(6)] + list(driver.peers._published.values())
    driver.finish()
    run = MlflowClient(driver.tracker.uri).get_run(driver.tracker.run_id)  # the graph is logged
    assert float(run.data.params["peers.spectral_gap"]) == pytest.approx(1 / 3)  # a ring of 6: 1 - |2/3|
    graph = json.loads(Path(MlflowClient(driver.tracker.uri).download_artifacts(run.info.run_id, "peers_graph.json")).read_text())
    assert graph["kind"] == "ring" and len(graph["links"]) == 6
    assert all(r.completed and r.metrics["participants"] == 6 for r in results)
    assert all(r.metrics["bytes_sent"] > 0 and r.metrics["bytes_received"] > 0 for r in results[1:])
    assert len(fetched) >= 4 * 6  # at least every agent's metrics, every round
    assert max((n for value in fetched for n in _fetched_arrays(value)), default=0) < size
    locations = get_object_locations(held)
    assert all(locations[ref]["node_ids"] and locations[ref]["object_size"] > 4 * size for ref in held)
    # what the agents hold is theirs and trained: after the global average of round 4, and 4 trainings each
    states = real_get([driver.pool.records.ref(a) for a in range(6)])
    assert [s.version for s in states] == [4] * 6
    assert results[1].metrics["consensus_distance"] == pytest.approx(0, abs=1e-5)  # all hold the average
    assert results[0].metrics["consensus_distance"] > 1e-3
    assert results[-1].metrics.get("test_accuracy", 0) > 0.5 and results[-1].metrics["evaluation_failures"] == 0, results[-1]




def test_a_dead_agent_is_skipped_its_neighbours_renormalize_and_its_model_is_kept(local_driver):
    driver = local_driver(peer_job(rounds=3, devices__workers=2))
    records = driver.pool.records
    first = driver.run_round(1)
    after_one = ray.get([records.ref(a) for a in range(6)])
    ray.kill(driver.pool.workers.actors[0])  # the agents it trains next round die with it
    second = driver.run_round(2)
    dead = sorted(second.failures)
    mixing = driver.peers._exchange.mixing  # what round 3 takes in
    third = driver.run_round(3)
    after_three = ray.get([records.ref(a) for a in range(6)])
    driver.finish()
    assert first.metrics["failures"] == 0 and dead and all("worker 0 failed" in second.failures[a] for a in dead)
    assert second.metrics["participants"] == 6 - len(dead) and second.metrics["failures"] == len(dead)
    ring = graphs.ring(6)
    cut = {(min(a, b), max(a, b)) for a in dead for b in np.flatnonzero(ring[a])}
    assert second.metrics["dropped_links"] == len(cut)
    # the dead sit the exchange out, their neighbours keep the links' weight: still doubly stochastic
    assert np.allclose(mixing.sum(axis=0), 1) and np.allclose(mixing.sum(axis=1), 1)
    for a in dead:
        assert mixing[a, a] == 1
        for b in np.flatnonzero(ring[a]):
            assert mixing[b, a] == 0 and (b in dead or mixing[b, b] > 1 / 3)
    # nothing of a dead agent is lost: round 3 trains it on from the model it had after round 1
    assert third.metrics["participants"] == 6 and third.metrics["failures"] == 0
    for a in range(6):
        assert after_three[a].version == (2 if a in dead else 3)
        assert after_one[a].version == 1 and not np.array_equal(after_three[a].params, after_one[a].params)


def test_each_gossip_step_mixes_the_agents_models_once_more(local_driver):
    """``peers.gossip_steps: 3``: after training, each agent mixes its model with its neighbours'
    twice more within the round (the third mix opens the next round): its record holds W^2 X, X
    the models as trained, which a DeviceWorker here computes. Each extra step sends every model
    to both ring neighbours. (Accuracy against FedAvg: benchmarks/accept.py gossip.)"""
    from fedray.agents.worker import DeviceWorker
    from fedray.data import datasets, partition

    raw = peer_job(rounds=1, peers={"exchange": "gossip", "gossip_steps": 3})
    driver = local_driver(raw)
    result = driver.run_round(1)
    mixed = np.stack([s.params for s in ray.get([driver.pool.records.ref(a) for a in range(6)])])
    driver.finish()
    job = parse_job(raw)
    data = datasets.load(job.data, job.seed)
    worker = DeviceWorker(job, (data.x, data.y), data.num_classes,
                          partition.split(data.y, job.data, 6, job.seed).of(np.arange(6)))
    trained = np.stack([asyncio.run(worker.peer_round(a, 1, [], [], 1.0))[2] for a in range(6)]).astype(np.float64)
    w = graphs.metropolis_hastings(graphs.ring(6))
    np.testing.assert_allclose(mixed, w @ w @ trained, rtol=1e-5, atol=1e-6)
    assert not np.allclose(mixed, trained, atol=1e-3)
    assert result.metrics["bytes_sent"] == 2 * 6 * 2 * trained[0].size * 4  # round 1 takes nothing in


def test_distilling_agents_send_only_their_predictions(ray_session, tracking_uri):
    """jobs/mnist_distill.yaml (logistic regression, MLP and CNN agents), 2 rounds: what travels
    is each agent's predictions on the 500 reference images, to its 5 neighbours (500 x 10 float32
    each, whatever the model), and the agents distil from them. (The accuracy gained over training
    alone: benchmarks/accept.py distill.)"""
    from fedray.config import load_job
    from fedray.platform.run import run_job

    job = load_job(Path(__file__).parent.parent / "jobs" / "mnist_distill.yaml", ["rounds=2", "evaluation.every=2"])
    log = []
    summary = run_job(job, job.model_dump_json(), tracking_uri, on_round=log.append)
    scores = json.loads(Path(MlflowClient(tracking_uri).download_artifacts(summary["run_id"], "agents.json")).read_text())
    assert [scores[str(a)]["model"] for a in range(6)] == ["logreg", "mlp", "small_cnn"] * 2
    assert log[0].metrics["bytes_received"] == 0 and log[1].metrics["bytes_received"] == 6 * 5 * 500 * 10 * 4
    assert log[1].metrics["distill_loss"] > 0 and all(0 < s["test_accuracy"] <= 1 for s in scores.values())


def test_gossip_with_dp_sgd_accounts_each_agents_epsilon(ray_session, tracking_uri):
    """Sample-level DP composes with gossip: each agent's DP-SGD is charged and logged round by
    round, equal to the composition of its steps computed here; what it publishes is its DP-SGD
    model (post-processing)."""
    from fedray.agents.privacy import epsilon
    from fedray.platform.run import run_job

    from test_privacy import SAMPLE_DP, assert_device_epsilons, device_plans

    raw = peer_job(rounds=3, privacy={"level": "sample", "noise_multiplier": 1.1},
                   **{k: v for k, v in SAMPLE_DP.items() if k != "devices__per_round"})
    job, plans = device_plans(raw)
    summary = run_job(job, yaml.safe_dump(raw), tracking_uri)
    client = MlflowClient(tracking_uri)
    assert_device_epsilons(client, summary["run_id"], plans, 3)
    assert "train_loss" not in client.get_run(summary["run_id"]).data.metrics  # a statistic of private data
    assert summary["device_epsilon_max"] == pytest.approx(max(epsilon("rdp", [(z, q, s * 3)], 1e-5) for z, q, s in plans))


def test_agents_as_their_own_actors_keep_their_models(local_driver):
    """Deployment mode: each agent is an actor that keeps its own record; gossip passes what they
    publish from actor to actor, and the run reads their records through the same interface."""
    driver = local_driver(peer_job(rounds=2, devices__count=4, devices__mode="deployment", devices__workers=None,
                                   devices__per_round=4))
    results = [driver.run_round(r) for r in (1, 2)]
    kept = ray.get(list(driver.pool.record_refs(list(range(4))).values()))
    records = [driver.pool.records.ref(a) for a in range(4)]
    driver.finish()
    assert all(r.metrics["participants"] == 4 and r.metrics["bytes_received"] > 0 for r in results[1:])
    assert [k.version for k in kept] == [2] * 4 and records == [None] * 4  # the agents hold them, not the run
    assert results[-1].metrics["consensus_distance"] > 0 and results[-1].metrics["test_accuracy"] > 0.3
