"""What a run needs before its first round, checked: its data, split over the devices, and its
model, tried on a real batch. ``fedray validate``, ``fedray run`` (before Ray starts) and the
Driver all call ``prepare``, so a job that validates does not fail on these at its start."""

from __future__ import annotations

from typing import NamedTuple

import torch

from fedray.config import JobError, JobSpec
from fedray.config.model import ModelSpec
from fedray.config.privacy import sample_level
from fedray.data import datasets, partition
from fedray.data.datasets import Dataset
from fedray.data.partition import Split
from fedray.models.zoo import build_model, check_output


class Prepared(NamedTuple):
    dataset: Dataset
    split: Split
    model: torch.nn.Module


def prepare(job: JobSpec) -> Prepared:
    """Load the job's data and split it, build its model (and the peers' models) and try each on
    the data's first samples (under sample-level DP, also that DP-SGD clips every gradient). Raises JobError naming the
    file, field or layer at fault."""
    try:
        dataset = datasets.load(job.data, job.seed)
    except ValueError as e:
        raise JobError(str(e)) from None  # it names the field and the file
    try:
        split = partition.split(dataset.y, job.data, job.devices.count, job.seed)
    except ValueError as e:
        raise JobError(f"data.partition ({job.data.partition.kind}, holdout {job.data.holdout:g}, "
                       f"{job.devices.count} devices): {e}") from None
    if job.peers is not None and job.peers.exchange == "distill":
        try:
            split = split.with_reference(job.peers.distill.reference, job.seed)
        except ValueError as e:
            raise JobError(f"peers.distill.reference: {e}") from None
    models = [_build(spec, dataset, job.seed) for spec in [job.model, *(job.peers.models if job.peers else [])]]
    if sample_level(job) is not None:
        from fedray.platform.privacy import check_model

        for model in models:
            try:
                check_model(model, dataset.x[:4], dataset.y[:4])
            except ValueError as e:
                raise JobError(str(e)) from None
    return Prepared(dataset, split, models[0])


def _build(spec: ModelSpec, dataset: Dataset, seed: int) -> torch.nn.Module:
    """The model ``spec`` describes, tried on the data's first samples."""
    name = spec.class_ or spec.name
    try:
        model = build_model(spec.name, spec.class_, spec.kwargs, dataset.input_shape, dataset.num_classes, seed)
    except TypeError as e:  # the constructor's arguments
        raise JobError(f"model.kwargs: cannot build {name} with {spec.kwargs}: {e}") from None
    except ValueError as e:
        raise JobError(f"model.class: {e}" if spec.class_ else f"model {name}: {e}") from None
    try:
        check_output(model, torch.from_numpy(dataset.x[:2]), dataset.num_classes)
    except ValueError as e:
        raise JobError(f"model {name}: {e}") from None
    return model
