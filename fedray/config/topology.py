"""The ``topology`` section (device -> edge -> cloud aggregation) and the ``network`` section (the
links a simulated communication time is computed over)."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, model_validator

from fedray.config.base import PositiveFloat, PositiveInt, Section


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
    """A network link: a transfer of ``b`` bytes takes ``latency_ms / 1000 + 8 b / (bandwidth_mbps 10^6)`` s."""

    bandwidth_mbps: PositiveFloat
    latency_ms: Annotated[float, Field(ge=0)] = 0.0


class NetworkSpec(Section):
    """The links of the tree. Each device has its own device<->edge link and each edge its own
    edge<->cloud link. Without a topology, a device's traffic crosses both, one after the other."""

    device_edge: Link
    edge_cloud: Link
