"""The ``peers`` section: agents that learn from each other directly instead of through a server.

Every agent trains every round on its own data and then takes in its neighbours' knowledge:
their parameters (``gossip``), or their predictions on a shared public reference set (``distill``);
``local`` exchanges nothing (the baseline the others are measured against).
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, model_validator

from fedray.config.base import PositiveFloat, PositiveInt, Section
from fedray.config.model import ModelSpec


class Ring(Section):
    """Each agent linked to the next and the previous."""

    kind: Literal["ring"]


class Lattice(Section):
    """Agents on a ``rows`` x (count / rows) grid, linked to the agents beside, above and below;
    a ``torus`` wraps around. Default ``rows``: the largest divisor of the count up to its square root."""

    kind: Literal["torus", "grid"]
    rows: PositiveInt | None = None


class Regular(Section):
    """A random connected graph where every agent has ``degree`` neighbours (drawn from the seed)."""

    kind: Literal["regular"]
    degree: PositiveInt = 4


class ErdosRenyi(Section):
    """Each pair linked with chance ``probability`` (drawn from the seed, again until connected)."""

    kind: Literal["erdos_renyi"]
    probability: Annotated[float, Field(gt=0, le=1)] = 0.3


class SmallWorld(Section):
    """Watts–Strogatz: a ring where each agent is linked to ``neighbours`` agents on each side, each
    link rewired to a random agent with chance ``rewire``."""

    kind: Literal["small_world"]
    neighbours: PositiveInt = 2
    rewire: Annotated[float, Field(ge=0, le=1)] = 0.1


class Full(Section):
    """Every agent linked to every other."""

    kind: Literal["full"]


class EdgeList(Section):
    """The user's own links, as pairs of agent ids; the graph must be connected."""

    kind: Literal["edges"]
    edges: list[Annotated[list[Annotated[int, Field(ge=0)]], Field(min_length=2, max_length=2)]] = Field(min_length=1)


class Matching(Section):
    """Time-varying: a fresh random pairing of the agents every round (one sits out when the count is
    odd); each pair averages."""

    kind: Literal["matching"]


GraphSpec = Annotated[Ring | Lattice | Regular | ErdosRenyi | SmallWorld | Full | EdgeList | Matching,
                      Field(discriminator="kind")]


class DistillSpec(Section):
    """Knowledge distillation on a public reference set: ``reference`` samples set aside from the
    server's held-out set, whose labels nobody uses. After its local training an agent publishes
    its softened predictions (temperature ``temperature``) on them; next round it first trains
    ``epochs`` passes over the set towards the weighted mean of its own and its neighbours'
    predictions (KL divergence), with ``lr`` (default: the local learning rate)."""

    reference: PositiveInt = 500
    temperature: PositiveFloat = 1.0
    epochs: PositiveInt = 1
    lr: PositiveFloat | None = None


class PeersSpec(Section):
    exchange: Literal["gossip", "distill", "local"] = "gossip"
    graph: GraphSpec = Ring(kind="ring")
    gossip_steps: PositiveInt = Field(1, description="gossip: times agents mix with their neighbours per round "
                                                      "(each step sends every agent's model to its neighbours again)")
    aggregate_every: PositiveInt | None = Field(None, description="gossip: average all agents' models every this "
                                                                  "many rounds (semi-decentralized)")
    distill: DistillSpec = DistillSpec()
    models: list[ModelSpec] = Field([], description="distill: the agents' models, agent i running models[i % len]; default "
                                         "the job's model for all")

    @model_validator(mode="after")
    def _check(self) -> PeersSpec:
        if self.aggregate_every is not None and self.exchange != "gossip":
            raise ValueError("peers.aggregate_every averages models: it needs peers.exchange 'gossip'")
        if self.gossip_steps > 1 and self.exchange != "gossip":
            raise ValueError("peers.gossip_steps applies to peers.exchange 'gossip'")
        if self.models and self.exchange == "gossip":
            raise ValueError("peers.models gives agents different models, whose parameters cannot be averaged: "
                             "gossip needs one model (the job's); use peers.exchange 'distill'")
        if "distill" in self.model_fields_set and self.exchange == "gossip":  # local: distillation's baseline
            raise ValueError("peers.distill applies to peers.exchange 'distill'")
        return self


def check(job) -> None:
    """What peer-to-peer learning composes with; raises ValueError naming what does not."""
    peers, devices, n = job.peers, job.devices, job.devices.count
    if n < 2:
        raise ValueError("peers needs at least 2 agents (devices.count)")
    if devices.per_round != n:
        raise ValueError(f"peers: every agent trains every round; devices.per_round ({devices.per_round}) must be "
                         f"devices.count ({n}) or left out")
    refused = {"strategy": "agents combine their own models; there is no server strategy",
               "topology": "peers exchange directly, not through edge aggregators",
               "network": "simulated network delays apply to device-edge-cloud trees",
               "attack": "attacks are simulated on federated updates only",
               "secure": "CKKS hides updates from an aggregator; gossip and distillation have none, and a neighbour "
                         "must read what it mixes in",
               "checkpoint": "peer runs are not checkpointed yet"}
    for section, why in refused.items():
        if section in job.model_fields_set:
            raise ValueError(f"{section} does not apply to peers: {why}")
    if devices.late != "drop":
        raise ValueError("peers: a late agent is skipped in its round (devices.late 'drop')")
    if any(model.adapted for model in [job.model, *peers.models]):
        raise ValueError("peers: agents start from the seed's weights and train all of them (model.start, freeze "
                         "and train apply to federated runs)")
    if job.privacy is not None and job.privacy.level != "sample":
        raise ValueError("peers compose with sample-level DP (each agent's DP-SGD, accounted per agent); "
                         "client-level DP noises a server's aggregate, which peers do not have")
    graph = peers.graph
    if graph.kind in ("torus", "grid") and graph.rows is not None and n % graph.rows:
        raise ValueError(f"peers.graph.rows ({graph.rows}) must divide the {n} agents")
    if graph.kind == "regular" and (graph.degree >= n or graph.degree * n % 2):
        raise ValueError(f"peers.graph: a {graph.degree}-regular graph over {n} agents needs degree < {n} and "
                         "degree x agents even")
    if graph.kind == "small_world" and 2 * graph.neighbours >= n:
        raise ValueError(f"peers.graph.neighbours ({graph.neighbours}) on each side needs more than "
                         f"{2 * graph.neighbours} agents")
    if graph.kind == "edges":
        for i, j in graph.edges:
            if i >= n or j >= n or i == j:
                raise ValueError(f"peers.graph.edges: ({i}, {j}) is not a link between two of agents 0..{n - 1}")
        reached, frontier = {0}, [0]
        links = [set() for _ in range(n)]
        for i, j in graph.edges:
            links[i].add(j)
            links[j].add(i)
        while frontier:
            frontier = [j for i in frontier for j in links[i] if j not in reached]
            reached.update(frontier)
        if len(reached) < n:
            cut = sorted(set(range(n)) - reached)
            raise ValueError(f"peers.graph.edges: agents {cut[:10]} cannot reach agent 0; gossip needs a connected graph")
