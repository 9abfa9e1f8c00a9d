"""Adversarial devices, for measuring robustness: who attacks, and what they send. No Ray, no I/O."""

from __future__ import annotations

import numpy as np
import torch

from fedray.config import AttackSpec


def choose_attackers(num_devices: int, fraction: float, seed: int) -> frozenset[int]:
    """``round(fraction * num_devices)`` devices (at least one), chosen from the seed."""
    count = max(1, round(fraction * num_devices))
    return frozenset(np.random.default_rng([seed, 2]).choice(num_devices, count, replace=False).tolist())


def corrupt(delta: np.ndarray, attack: AttackSpec, rng: np.random.Generator) -> np.ndarray:
    """What an attacking device sends instead of its honest ``delta`` (label flipping attacks the
    data instead, see ``flip_labels``)."""
    if attack.kind == "sign_flip":
        return (-attack.scale * delta).astype(np.float32)
    if attack.kind == "scaling":
        return (attack.scale * delta).astype(np.float32)
    if attack.kind == "gaussian":
        return rng.normal(0.0, attack.std, delta.shape).astype(np.float32)
    return delta


def flip_labels(y: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Label flipping: class ``c`` becomes ``num_classes - 1 - c``."""
    return num_classes - 1 - y
