"""The device -> edge -> cloud tree as plain data: which edge each device reports to, where edges
and their devices run, and how long the tree's links take to carry a round's bytes. No Ray calls."""

from __future__ import annotations

from typing import Any

import numpy as np

from fedray.config import JobSpec, Link, NetworkSpec, TopologySpec
from fedray.config.topology import LabelPlacement, ResourcePlacement


def assign(job: JobSpec) -> np.ndarray:
    """The edge of every device under ``round_robin`` or ``attribute`` assignment."""
    topology, count = job.topology, job.devices.count
    if topology.assign == "round_robin":
        return np.arange(count) % topology.edges
    if topology.assign == "attribute":
        values = job.devices.attributes[topology.attribute]
        index = {v: e for e, v in enumerate(sorted(set(values), key=str))}
        return np.array([index[v] for v in values])
    raise ValueError(f"assignment {topology.assign!r} depends on where workers run; use colocated()")


def colocated(node_of_worker: list[str], edges: int) -> tuple[np.ndarray, list[str]]:
    """``colocated`` assignment: the nodes hosting workers, in order of first worker, go to edges
    round robin. Returns the edge of every worker and the node each edge runs on (its first).
    (Devices go to edges round robin and train on their edge's workers.)"""
    nodes = list(dict.fromkeys(node_of_worker))
    if len(nodes) < edges:
        raise RuntimeError(f"topology.assign 'colocated' with {edges} edges needs device workers on at least "
                           f"{edges} nodes, but they run on {len(nodes)}; lower topology.edges or add nodes")
    edge_of_node = {node: i % edges for i, node in enumerate(nodes)}
    return np.array([edge_of_node[n] for n in node_of_worker]), nodes[:edges]


def placement_options(topology: TopologySpec, edge: int) -> dict[str, Any]:
    """Ray actor options that put edge ``edge`` (and its devices' workers) on its nodes."""
    placement = topology.placement
    if isinstance(placement, ResourcePlacement):
        return {"resources": {placement.name.format(edge=edge): 0.001}}
    if isinstance(placement, LabelPlacement):
        return {"label_selector": {placement.key: placement.values[edge]}}
    return {}


def missing_placement(topology: TopologySpec, nodes: list[dict]) -> list[str]:
    """The resources or labels of ``topology.placement`` that no alive node in ``nodes``
    (``ray.nodes()``) offers, as readable strings."""
    placement, alive = topology.placement, [n for n in nodes if n["Alive"]]
    if isinstance(placement, ResourcePlacement):
        wanted = [placement.name.format(edge=e) for e in range(topology.edges)]
        return [f"resource {r!r}" for r in wanted if not any(r in n["Resources"] for n in alive)]
    if isinstance(placement, LabelPlacement):
        return [f"label {placement.key}={v}" for v in placement.values
                if not any(n.get("Labels", {}).get(placement.key) == v for n in alive)]
    return []


def transfer_seconds(link: Link, nbytes: int, up: bool = False) -> float:
    """Seconds to send ``nbytes`` over ``link``, down or (``up``) towards the cloud."""
    return link.latency_ms / 1e3 + 8 * nbytes / ((up and link.up_mbps or link.bandwidth_mbps) * 1e6)


def flat_seconds(network: NetworkSpec, down: int, uploads: list[int]) -> float:
    """A flat round's communication time: every device downloads ``down`` bytes and uploads its
    bytes over its own path through both tiers; the round waits for the slowest device."""

    def path(nbytes: int, up: bool) -> float:
        return transfer_seconds(network.device_edge, nbytes, up) + transfer_seconds(network.edge_cloud, nbytes, up)

    return max((path(down, False) + path(sent, True) for sent in uploads), default=0.0)


def edge_seconds(network: NetworkSpec, down: int, rounds: list[list[int]], up: int) -> float:
    """One edge's communication time in a cloud round: the model down its cloud link, then per edge
    round the model down to its devices and their ``rounds[k]`` uploads back (waiting for the
    slowest), then its ``up`` bytes to the cloud."""
    device_edge = network.device_edge
    device_time = sum(max((transfer_seconds(device_edge, down) + transfer_seconds(device_edge, u, True)
                           for u in uploads), default=0.0) for uploads in rounds)
    return transfer_seconds(network.edge_cloud, down) + device_time + transfer_seconds(network.edge_cloud, up, True)
