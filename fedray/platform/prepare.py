"""What a run needs before its first round, checked: its data, split over the devices, and its
model, tried on a real batch. ``fedray validate``, ``fedray run`` (before Ray starts) and the
Driver all call ``prepare``, so a job that validates does not fail on these at its start."""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch

from fedray.config import JobError, JobSpec
from fedray.config.model import ModelSpec
from fedray.config.privacy import sample_level
from fedray.data import datasets, partition
from fedray.data.datasets import Dataset
from fedray.data.partition import Split
from fedray.models.zoo import build_model, check_output
from fedray.transfer import weights
from fedray.transfer.layout import Layout, job_model


class Prepared(NamedTuple):
    dataset: Dataset
    split: Split
    model: torch.nn.Module
    layout: Layout
    initial: dict[str, np.ndarray] | None  # the model's state at the start, with model.start (for the workers)


def prepare(job: JobSpec, tracking_uri: str | None = None) -> Prepared:
    """Load the job's data and split it, build its model (from ``model.start``'s weights, read at
    ``tracking_uri``; and the peers' models) and try each on the data's first samples (under
    sample-level DP, also that DP-SGD clips every gradient). Raises JobError naming the file,
    field, parameter or layer at fault."""
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
    model, layout, initial = _job_model(job, dataset, tracking_uri)
    models = [model] + [_build(spec, dataset, job.seed) for spec in (job.peers.models if job.peers else [])]
    if sample_level(job) is not None:
        from fedray.platform.privacy import check_model

        for model in models:
            try:
                check_model(model, dataset.x[:4], dataset.y[:4])
            except ValueError as e:
                raise JobError(str(e)) from None
    return Prepared(dataset, split, model, layout, initial)


def _job_model(job: JobSpec, dataset: Dataset, tracking_uri: str | None
               ) -> tuple[torch.nn.Module, Layout, dict[str, np.ndarray] | None]:
    """The job's model, laid out, from its starting weights (then also returned as a state dict),
    tried on the data's first samples."""
    def build() -> tuple[torch.nn.Module, Layout]:
        model, layout = job_model(job, dataset.input_shape, dataset.num_classes)
        if job.model.start is not None:
            try:
                weights.apply(model, weights.load(job.model.start, tracking_uri), job.model.replace, job.model.start)
            except ValueError as e:
                raise ValueError(str(e) if str(e).startswith("model.") else f"model.start {e}") from None
        return model, layout

    model, layout = _checked(job.model, dataset, build)
    initial = None if job.model.start is None else {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}
    return model, layout, initial


def _build(spec: ModelSpec, dataset: Dataset, seed: int) -> torch.nn.Module:
    """The model ``spec`` describes, tried on the data's first samples."""
    return _checked(spec, dataset, lambda: build_model(spec.name, spec.class_, spec.kwargs, dataset.input_shape,
                                                       dataset.num_classes, seed))


def _checked(spec: ModelSpec, dataset: Dataset, build):
    """What ``build()`` returns (a model, or a tuple starting with one), its errors as JobErrors
    naming the field, once the model maps the data's first samples to logits."""
    name = spec.class_ or spec.name
    try:
        built = build()
    except TypeError as e:  # the constructor's arguments
        raise JobError(f"model.kwargs: cannot build {name} with {spec.kwargs}: {e}") from None
    except ValueError as e:
        if str(e).startswith(("model.", "personalization.")):
            raise JobError(str(e)) from None
        raise JobError(f"model.class: {e}" if spec.class_ else f"model {name}: {e}") from None
    try:
        check_output(built[0] if isinstance(built, tuple) else built, torch.from_numpy(dataset.x[:2]),
                     dataset.num_classes)
    except ValueError as e:
        raise JobError(f"model {name}: {e}") from None
    return built
