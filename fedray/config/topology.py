"""The ``topology`` section (device -> edge -> cloud aggregation) and the ``network`` section (the
links a simulated communication time is computed over)."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, model_validator

from fedray.config.base import PositiveFloat, PositiveInt, Section
from fedray.config.strategy import ASYNC_STRATEGIES, ROBUST_STRATEGIES


class ResourcePlacement(Section):
    """Edge ``e`` and its devices' workers run on nodes that advertise the custom resource
    ``name.format(edge=e)`` (``ray start --resources '{"edge_0": 1}'``)."""

    kind: Literal["resource"]
    name: str = "edge_{edge}"

    @model_validator(mode="after")
    def _check(self) -> ResourcePlacement:
        if "{edge}" not in self.name:
            raise ValueError(f"topology.placement.name {self.name!r} must contain '{{edge}}', the edge's index")
        return self


class LabelPlacement(Section):
    """Edge ``e`` and its devices' workers run on nodes whose label ``key`` is ``values[e]``
    (``ray start --labels region=eu``)."""

    kind: Literal["label"]
    key: str = "region"
    values: list[str]


Placement = Annotated[ResourcePlacement | LabelPlacement, Field(discriminator="kind")]


class TopologySpec(Section):
    """Devices report to ``edges`` edge aggregators, which report to the driver (the cloud).

    ``assign``: ``round_robin`` (device ``i`` to edge ``i mod edges``), ``attribute`` (one edge per
    distinct value of ``devices.attributes[attribute]``, in sorted order), or ``colocated`` (each
    device to the edge on the node its worker runs on). ``edge_rounds > 1`` is HierFAVG (Liu et al.
    2020): each edge averages its devices that many times, keeping an edge model, per cloud round.
    """

    edges: PositiveInt
    assign: Literal["round_robin", "attribute", "colocated"] = "round_robin"
    attribute: str | None = Field(None, description="assign 'attribute': the key in devices.attributes")
    placement: Placement | None = Field(None, description="where edges and their devices run; default anywhere")
    edge_rounds: PositiveInt = Field(1, description="edge aggregations per cloud round (HierFAVG when > 1)")

    @model_validator(mode="after")
    def _check(self) -> TopologySpec:
        if (self.assign == "attribute") != (self.attribute is not None):
            raise ValueError("topology.attribute is needed with, and applies only to, topology.assign 'attribute'")
        if self.assign == "colocated" and self.placement is not None:
            raise ValueError("topology.assign 'colocated' puts edges where the devices run; it takes no "
                             "topology.placement")
        if isinstance(self.placement, LabelPlacement) and len(self.placement.values) != self.edges:
            raise ValueError(f"topology.placement.values has {len(self.placement.values)} labels for "
                             f"{self.edges} edges; give one per edge")
        return self


class Link(Section):
    """A network link: a transfer of ``b`` bytes takes ``latency_ms / 1000 + 8 b / (bandwidth_mbps 10^6)`` s
    down, and the same at ``up_mbps`` up (towards the cloud)."""

    bandwidth_mbps: PositiveFloat
    up_mbps: PositiveFloat | None = Field(None, description="bandwidth towards the cloud; default bandwidth_mbps "
                                                            "(home and mobile uplinks are often slower)")
    latency_ms: Annotated[float, Field(ge=0)] = 0.0


class NetworkSpec(Section):
    """The links of the tree. Each device has its own device<->edge link and each edge its own
    edge<->cloud link. Without a topology, a device's traffic crosses both, one after the other."""

    device_edge: Link
    edge_cloud: Link


def check(job) -> None:
    """The topology section against the rest of the job; raises ValueError naming the field."""
    topology = job.topology
    name = job.strategy.name
    if name in ROBUST_STRATEGIES:
        raise ValueError(f"topology: strategy {name} is not linear and needs every raw update in one place; "
                         "edges can only fold sums (use a linear strategy, or no topology)")
    if topology.edges > job.devices.count:
        raise ValueError(f"topology.edges ({topology.edges}) exceeds devices.count ({job.devices.count})")
    if topology.edge_rounds > 1:
        if name in ASYNC_STRATEGIES:
            raise ValueError(f"topology.edge_rounds > 1 (HierFAVG) runs synchronous edge rounds; strategy {name} "
                             "folds each update as it arrives (use edge_rounds 1)")
        if name in ("fednova", "scaffold"):
            raise ValueError(f"topology.edge_rounds > 1 (HierFAVG) averages at the edges by samples; strategy "
                             f"{name} needs each device's update at the cloud")
        if job.devices.late == "next_round":
            raise ValueError("devices.late 'next_round' does not apply with topology.edge_rounds > 1: a late "
                             "update would miss its edge round")
    if topology.assign == "colocated" and job.devices.scale_up:
        raise ValueError("topology.assign 'colocated' places edges by the nodes all workers start on; "
                         "devices.scale_up starts training before every worker is up (use round_robin or attribute)")
    if topology.assign == "attribute":
        values = job.devices.attributes.get(topology.attribute)
        if values is None:
            raise ValueError(f"topology.attribute {topology.attribute!r} is not in devices.attributes "
                             f"(has: {sorted(job.devices.attributes) or 'none'})")
        if len(set(values)) != topology.edges:
            raise ValueError(f"devices.attributes.{topology.attribute} has {len(set(values))} distinct values "
                             f"but topology.edges is {topology.edges}; give one edge per value")
