"""``devices.resources``: what each device worker asks Ray for, GPUs included."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, model_validator

from fedray.config.base import PositiveFloat, Section


class ResourcesSpec(Section):
    """CPUs and GPUs per device worker. A GPU fraction shares one GPU (0.25: four workers per GPU);
    with GPUs and no ``devices.workers``, the pool starts as many workers as the cluster's GPUs hold."""

    num_cpus: PositiveFloat | None = Field(None, description="CPUs per worker (default: the cluster's CPUs shared "
                                                             "among the workers, at most 1 each)")
    num_gpus: Annotated[float, Field(ge=0)] = Field(0.0, description="GPUs per worker: a fraction up to 1 "
                                                                     "(workers share a GPU), or a whole number")
    gpu: Literal["required", "auto"] = Field("required", description="when the cluster has no GPUs at start: fail "
                                                                     "(required) or train on CPUs and say so (auto)")

    @model_validator(mode="after")
    def _check(self) -> ResourcesSpec:
        if self.num_gpus > 1 and not float(self.num_gpus).is_integer():
            raise ValueError(f"devices.resources.num_gpus {self.num_gpus:g}: more than one GPU per worker must be a "
                             "whole number (Ray shares only fractions of one GPU)")
        return self


def check(job) -> None:
    """Local training's precision against the rest of the job; raises ValueError naming the field."""
    if job.devices.local.mixed_precision and job.privacy is not None and job.privacy.level == "sample":
        raise ValueError("devices.local.mixed_precision with sample-level DP: per-sample gradients would be clipped "
                         "in bfloat16, coarser than the clip bound's guarantee assumes")


def gpus_to_ask(spec: ResourcesSpec, cluster_gpus: float) -> tuple[float, str | None]:
    """The GPUs each worker asks for on a cluster with ``cluster_gpus`` GPUs, and what to tell the
    user when a GPU job falls back to CPUs; raises ValueError when the job requires GPUs the
    cluster lacks, or asks one worker for more GPUs than the cluster has."""
    if not spec.num_gpus:
        return 0.0, None
    if cluster_gpus <= 0:
        if spec.gpu == "auto":
            return 0.0, (f"devices.resources.num_gpus {spec.num_gpus:g} with gpu: auto, but the cluster has no "
                         "GPUs: workers train on CPUs")
        raise ValueError(f"devices.resources.num_gpus is {spec.num_gpus:g} but the cluster has no GPUs "
                         "(ray.cluster_resources() lists none): add GPU nodes, or set devices.resources.gpu: "
                         "auto to train on CPUs")
    if spec.num_gpus > cluster_gpus:
        raise ValueError(f"devices.resources.num_gpus {spec.num_gpus:g} per worker, but the cluster has "
                         f"{cluster_gpus:g} GPU(s)")
    return spec.num_gpus, None
