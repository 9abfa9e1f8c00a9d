"""Heterogeneous devices: how much slower each trains, and how much of its planned work it does.
Pure NumPy, drawn from the job's seed."""

from __future__ import annotations

import numpy as np

from fedray.config import SpeedSpec


def slowdowns(speed: SpeedSpec | None, num_devices: int, seed: int) -> np.ndarray:
    """Each device's slowdown factor (>= 1): how many times longer it takes than the machine that
    simulates it."""
    factors = np.ones(num_devices)
    if speed is None:
        return factors
    rng = np.random.default_rng([seed, 5])
    if speed.kind == "slow_fraction":
        slow = rng.choice(num_devices, max(1, round(speed.fraction * num_devices)), replace=False)
        factors[slow] = speed.slowdown
        return factors
    z = rng.standard_normal(num_devices)
    return np.exp(speed.sigma * (z - z.min()))


def training_seconds(speed: SpeedSpec, slowdown: float, steps: int, compute_seconds: float) -> float:
    """How long a device takes for ``steps`` local steps that took ``compute_seconds`` here:
    ``slowdown`` x (``speed.step_seconds`` x ``steps``, or ``compute_seconds``), never less than
    ``compute_seconds``."""
    base = compute_seconds if speed.step_seconds is None else speed.step_seconds * steps
    return max(compute_seconds, slowdown * base)


def local_steps(planned: int, partial_work: float, rng: np.random.Generator) -> int:
    """The steps a device takes this round: ``planned``, or with probability ``partial_work`` a
    uniform draw from 1..planned (FedProx's systems heterogeneity)."""
    if partial_work and rng.random() < partial_work:
        return int(rng.integers(1, planned + 1))
    return planned


def planned_steps(job, samples: int) -> int:
    """The local steps a device of ``samples`` training samples plans per training: ``local.steps``,
    or ``local.epochs`` passes of ``ceil(samples / batch_size)`` batches."""
    local = job.devices.local
    return local.steps or local.epochs * -(-samples // local.batch_size)


def round_steps(job, samples: int, round: int, device: int) -> tuple[int, int]:
    """``(planned, taken)``: the steps ``device`` plans and takes training for ``round``, drawn from
    the job's seed (so the run can know them before the device trains)."""
    planned = planned_steps(job, samples)
    return planned, local_steps(planned, job.devices.partial_work, np.random.default_rng([job.seed, round, device, 4]))
