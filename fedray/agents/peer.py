"""An agent's side of peer-to-peer learning (``peers``): what it takes in from its neighbours, and
what it publishes for them. Plain PyTorch and NumPy: no Ray, no I/O.

Gossip publishes the agent's parameters and mixes in its neighbours'; distillation publishes its
softened predictions on the public reference set and trains towards the mix of its neighbours'.
"""

from __future__ import annotations

import numpy as np
import torch
from torch.nn import functional as F

from fedray.models.params import ParamSpec
from fedray.models.zoo import build_model


class Architectures:
    """The agents' models: agent ``a`` runs ``specs[a % len(specs)]`` (``ModelSpec``s), each built
    once per worker on its ``device``, with its initial parameters (from the job's seed: the same on
    every worker)."""

    def __init__(self, specs: list, input_shape: tuple[int, ...], num_classes: int, seed: int,
                 device: torch.device = torch.device("cpu")) -> None:
        self._nets = []
        for spec in specs:
            model = build_model(spec.name, spec.class_, spec.kwargs, input_shape, num_classes, seed).to(device)
            param_spec = ParamSpec.of(model)
            self._nets.append((model, param_spec, param_spec.flatten(model)))

    def of(self, agent: int) -> tuple[torch.nn.Module, ParamSpec, np.ndarray]:
        """Agent ``agent``'s model, its ParamSpec and its initial parameters."""
        return self._nets[agent % len(self._nets)]


def mix(own: np.ndarray, own_weight: float, others: list[np.ndarray], weights: list[float]) -> np.ndarray:
    """``own_weight * own + sum(weights[k] * others[k])``, summed in that order in float64 (so the
    same inputs give the same bits wherever it runs), as float32."""
    total = own_weight * own.astype(np.float64)
    for weight, other in zip(weights, others):
        if other.shape != own.shape:
            raise ValueError(f"a neighbour published shape {other.shape}, this agent's is {own.shape}")
        total += weight * other
    return total.astype(np.float32)


@torch.no_grad()
def soft_labels(model: torch.nn.Module, x: torch.Tensor, temperature: float, batch_size: int = 256) -> np.ndarray:
    """The model's class probabilities on ``x`` at ``temperature``: what a distilling agent publishes."""
    model.eval()
    device = next(model.parameters()).device
    out = [F.softmax(model(x[i:i + batch_size].to(device)) / temperature, dim=1) for i in range(0, len(x), batch_size)]
    return torch.cat(out).cpu().numpy().astype(np.float32)


def distill(model: torch.nn.Module, x: torch.Tensor, targets: np.ndarray, temperature: float, epochs: int,
            batch_size: int, lr: float, generator: torch.Generator) -> float:
    """Train ``model`` for ``epochs`` passes over ``x`` towards the class probabilities ``targets``
    (KL divergence at ``temperature``, scaled by its square as in Hinton et al. 2015), with plain
    SGD; returns the mean loss."""
    device = next(model.parameters()).device
    target = torch.from_numpy(targets).to(device)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    losses = []
    for _ in range(epochs):
        for batch in torch.randperm(len(x), generator=generator).split(batch_size):
            optimizer.zero_grad(set_to_none=True)
            log_p = F.log_softmax(model(x[batch].to(device)) / temperature, dim=1)
            loss = F.kl_div(log_p, target[batch], reduction="batchmean") * temperature ** 2
            loss.backward()
            optimizer.step()
            losses.append(float(loss))
    return float(np.mean(losses))
