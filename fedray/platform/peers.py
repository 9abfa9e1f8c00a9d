"""Peers: the round engine of a peer-to-peer run (``peers``), where agents learn from each other
instead of from a server.

Each round every agent trains on its own data, on a worker, from its record (its own model) and
what its neighbours published at the end of the last round, mixed by the gossip matrix of the
graph (Metropolis-Hastings weights); it publishes its new parameters (gossip) or predictions on the
public reference set (distill). What agents publish and keep stays in the object store of the node
that trained them: the driver passes references from one agent's task to its neighbours' and never
holds a parameter vector (the workers return nothing inline, see ``WorkerPool``). An agent that
fails or misses the deadline sits the exchange out: its links are dropped, the agents on their
other end keep the links' weight for themselves, and its record stays as it was.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import ray

from fedray.agents import graphs
from fedray.config import JobSpec
from fedray.platform.intake import Intake
from fedray.platform.pool import WorkerPool


@dataclass
class Exchange:
    """What each agent takes in at the start of the next round: ``mixing[i, j]`` is the weight of
    agent j's published value in agent i's mix (its own: ``mixing[i, i]``); ``average`` replaces
    the neighbours' values by the global average (semi-decentralized)."""

    mixing: np.ndarray
    average: ray.ObjectRef | None = None

    def inputs(self, agent: int, published: dict[int, ray.ObjectRef]) -> tuple[list, list[float], float]:
        """(refs, their weights, own weight) for ``agent``'s ``peer_round`` or ``peer_evaluate``."""
        if self.average is not None and self.mixing[agent, agent] < 1:
            return [self.average], [1.0], 0.0
        row = self.mixing[agent]
        others = [j for j in np.flatnonzero(row) if j != agent]
        return [published[j] for j in others], [float(row[j]) for j in others], float(row[agent])


def build_graph(job: JobSpec) -> np.ndarray | None:
    """The job's communication graph (adjacency), drawn from its seed; None for matchings, which
    change every round."""
    spec, n, rng = job.peers.graph, job.devices.count, np.random.default_rng([job.seed, 9])
    if spec.kind in ("torus", "grid"):
        rows = spec.rows or max(r for r in range(1, int(n ** 0.5) + 1) if n % r == 0)
        return graphs.grid(rows, n // rows, wrap=spec.kind == "torus")
    return {"ring": lambda: graphs.ring(n), "full": lambda: graphs.full(n),
            "regular": lambda: graphs.random_regular(n, spec.degree, rng),
            "erdos_renyi": lambda: graphs.erdos_renyi(n, spec.probability, rng),
            "small_world": lambda: graphs.small_world(n, spec.neighbours, spec.rewire, rng),
            "edges": lambda: graphs.from_edges(n, spec.edges), "matching": lambda: None}[spec.kind]()


class Peers:
    """Runs the rounds of ``job``'s agents on ``pool``'s workers; evaluates them on the held-out
    samples ``holdout`` and their local test splits."""

    def __init__(self, job: JobSpec, pool: WorkerPool, holdout: np.ndarray) -> None:
        self._job, self._pool, self._n = job, pool, job.devices.count
        self.graph = build_graph(job)
        self._rng = np.random.default_rng([job.seed, 10])  # matchings
        self.spectral_gap = (graphs.matching_gap(self._n) if self.graph is None else
                             graphs.spectral_gap(graphs.metropolis_hastings(self.graph)))
        self._holdout = ray.put(holdout)
        self._published: dict[int, ray.ObjectRef] = {}
        self._sizes = np.zeros(self._n)  # bytes of each agent's last published value
        self._exchange = Exchange(np.eye(self._n))  # before the first round: nothing to take in
        self.scores: dict[int, dict] = {}  # each agent's model and accuracies at the last evaluation

    def describe(self) -> dict:
        """The graph, for MLflow: its kind, links and spectral gap (of the expected matrix, for matchings)."""
        links = [] if self.graph is None else [[int(i), int(j)] for i, j in zip(*np.nonzero(np.triu(self.graph)))]
        return {"kind": self._job.peers.graph.kind, "agents": self._n, "links": links,
                "spectral_gap": self.spectral_gap}

    def run_round(self, r: int, evaluate: bool, intake: Intake) -> tuple[bool, dict[str, float]]:
        """Round ``r``: every agent that can (under sample-level DP: within its budget) trains,
        taking in the last exchange; then the next exchange is set up among those that published,
        and (``evaluate``) the agents are evaluated on what they will hold after it. Failures and
        the agents' epsilons go to ``intake``. Returns (completed, metrics)."""
        job, pool = self._job, self._pool
        exhausted = pool.spend.exhausted() if pool.spend is not None else set()
        agents = np.array([a for a in range(self._n) if a not in exhausted], dtype=np.int64)
        sent, received = np.zeros(self._n), np.zeros(self._n)
        results = self._wave(r, "peer_round", agents, intake, sent, received)
        intake.device_epsilon = {a: (m["epsilon"], m["epsilon_next"]) for a, m in results.items() if "epsilon" in m}
        metrics = self._train_metrics(results)
        present = np.zeros(self._n, dtype=bool)
        present[list(results)] = True
        self._exchange, dropped = self._next_exchange(r, present)
        steps = job.peers.gossip_steps if self._exchange.average is None else 1
        for _ in range(steps - 1):  # more gossip steps: the agents mix again, without training
            mixed = self._wave(r, "peer_mix", np.flatnonzero(present), intake, sent, received)
            failed = present.copy()
            failed[list(mixed)] = False
            present &= ~failed
            self._exchange, cut = self._next_exchange(r, present, failed)
            dropped += cut
        metrics.update(participants=len(results), failures=intake.failed_tasks, dropped_links=dropped,
                       bytes_sent=float(sent.sum()), bytes_sent_mean=float(sent.mean()), bytes_sent_max=float(sent.max()),
                       bytes_received=float(received.sum()), bytes_received_mean=float(received.mean()),
                       bytes_received_max=float(received.max()))
        if evaluate:
            metrics.update(self._evaluate())
        return bool(results), metrics

    def _wave(self, r: int, method: str, agents: np.ndarray, intake: Intake, sent: np.ndarray,
              received: np.ndarray) -> dict[int, dict[str, float]]:
        """Have ``agents`` run ``method`` (``peer_round``: train; ``peer_mix``: one more gossip
        step) taking in the current exchange; keep the records and published values of those that
        finish in time and return their metrics. Adds to ``sent`` and ``received`` the bytes each
        agent sent (its published value, once to each agent that took it in, or to the aggregator)
        and received."""
        pool, exchange = self._pool, self._exchange
        calls = {int(a): exchange.inputs(int(a), self._published) for a in agents}
        refs = pool.queue_all(method, agents, lambda a: ((r, *calls[a]), {}), tag=r)
        results = {}
        for done in pool.as_completed(refs, time.monotonic() + self._job.devices.round_wait_s):
            if done.failure is None:
                results[done.task.device] = done.value
                self._published[done.task.device] = done.task.published
            else:
                intake.fail(done.task.device, done.failure)
        pool.settle(r, refs, [], intake)
        pool.take_records(sorted(results))
        for a in calls:
            if exchange.average is None:
                for j in np.flatnonzero(exchange.mixing[a]):
                    sent[j] += self._sizes[j] if j != a else 0
        if exchange.average is not None:  # each agent in the average sent its value to the aggregator
            sent += np.where(exchange.mixing.diagonal() < 1, self._sizes, 0)
        for a, m in results.items():
            received[a] += m["received"]
            self._sizes[a] = m["published"]
        return results

    def _train_metrics(self, results: dict[int, dict[str, float]]) -> dict[str, float]:
        """The round's training loss (not under DP) and distillation loss."""
        metrics = {}
        samples = sum(m["samples"] for m in results.values())
        if samples and self._job.privacy is None:
            metrics["train_loss"] = sum(m["loss"] * m["samples"] for m in results.values()) / samples
        distill = [m["distill_loss"] for m in results.values() if "distill_loss" in m]
        if distill:
            metrics["distill_loss"] = float(np.mean(distill))
        return metrics

    def _next_exchange(self, r: int, present: np.ndarray, counted: np.ndarray | None = None) -> tuple[Exchange, int]:
        """The exchange after round ``r`` among the ``present`` agents, and how many of the graph's
        links it drops because an end is absent (an end among ``counted``, default all absent)."""
        graph = self.graph if self.graph is not None else graphs.random_matching(self._n, self._rng)
        every = self._job.peers.aggregate_every
        if every is not None and r % every == 0 and present.any():  # semi-decentralized: a global average
            k = int(present.sum())
            mixing = np.where(np.outer(present, present), 1.0 / k, 0.0)
            mixing[np.diag_indices(self._n)] = np.where(present, 1.0 / k, 1.0)
            members = np.flatnonzero(present).tolist()
            average = self._pool.submit("peer_average", members[0], [self._published[a] for a in members],
                                        [1.0 / k] * k)
            self._pool.pending.pop(average)  # resolved by the agents that take it in
            return Exchange(mixing, average), 0
        mixing = graphs.without(graphs.metropolis_hastings(graph) if self._job.peers.exchange != "local"
                                else np.eye(self._n), ~present)
        counted = ~present if counted is None else counted
        cut = np.triu(graph & (counted[:, None] | counted[None, :])).sum() if self._job.peers.exchange != "local" else 0
        return Exchange(mixing), int(cut)

    def _evaluate(self) -> dict[str, float]:
        """Each agent's model after the exchange, on the held-out set and on its local test split:
        mean, min and max accuracy over the agents; and their consensus distance, also relative to
        the norm of their mean model."""
        pool, records = self._pool, self._pool.records
        refs = [pool.submit("peer_evaluate", a, *self._exchange.inputs(a, self._published), self._holdout,
                            state=records.ref(a)) for a in range(self._n)]
        kept = pool.record_refs(list(range(self._n)))  # deployment: asked of the agents
        mixing = self._exchange.mixing if self._job.peers.exchange == "gossip" else np.eye(self._n)  # others keep theirs
        consensus = pool.submit("peer_consensus", 0, list(range(self._n)), [kept.get(a) for a in range(self._n)],
                                mixing, tag="consensus")
        scores, distance, failed = {}, None, 0
        for done in pool.as_completed(refs + [consensus], time.monotonic() + self._job.devices.timeout_s):
            if done.failure is not None:
                failed += 1
                continue
            if done.task.tag == "consensus":
                distance = done.value
            else:
                scores[done.task.device] = done.value
        failed += len(pool.expire(self._job.devices.timeout_s, refs + [consensus]))
        names = [spec.class_ or spec.name for spec in self._job.peers.models or [self._job.model]]
        self.scores = {a: {"model": names[a % len(names)]} | {
            f"{name}_accuracy": s[k][2] / s[k][0] for name, k in (("test", 0), ("local_test", 1)) if s[k][0]}
            for a, s in sorted(scores.items())}
        metrics = {"evaluation_failures": failed}
        if distance is not None:
            metrics.update(consensus_distance=distance[0], consensus_relative=distance[1])
        for name, k in (("test", 0), ("local_test", 1)):
            counts = [s[k] for s in scores.values() if s[k][0]]
            if counts:
                accuracy = [correct / n for n, _, correct in counts]
                metrics.update({f"{name}_accuracy": float(np.mean(accuracy)), f"{name}_accuracy_min": min(accuracy),
                                f"{name}_accuracy_max": max(accuracy),
                                f"{name}_loss": float(np.mean([loss / n for n, loss, _ in counts]))})
        return metrics
