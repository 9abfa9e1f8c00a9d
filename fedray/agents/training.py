"""Local training on one device's data: plain PyTorch, no Ray, no I/O."""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from fedray.agents.dpsgd import PerSampleClipping, add_noise


@dataclass(frozen=True)
class LocalTraining:
    """How a device trains each round.

    Exactly one of ``epochs`` (passes over the local data) or ``steps`` (mini-batch updates, cycling
    through the data) is set. ``momentum`` and ``weight_decay`` apply to SGD; ``weight_decay`` to Adam.
    ``prox_mu > 0`` adds FedProx's proximal term (mu/2)||w - w_start||^2 to the loss (Ditto's
    personal model: (lambda/2)||v - w||^2, with the global ``w`` given to ``train`` as ``anchor``).
    """

    epochs: int | None = 1
    steps: int | None = None
    batch_size: int = 32
    optimizer: str = "sgd"
    lr: float = 0.05
    momentum: float = 0.0
    weight_decay: float = 0.0
    prox_mu: float = 0.0
    mixed_precision: bool = False  # the forward pass in bfloat16 (torch.autocast)


@dataclass(frozen=True)
class SampleDP:
    """DP-SGD for one call of ``train`` (Abadi et al. 2016, with Opacus): every step draws a Poisson
    batch (each sample with chance ``batch_size / n``), clips each sample's gradient to
    ``max_grad_norm``, adds Gaussian noise of ``noise_multiplier x max_grad_norm`` to their sum and
    divides by ``batch_size``. Batches and noise come from OS entropy: they must stay secret."""

    max_grad_norm: float
    noise_multiplier: float


def device_generator(seed: int, round: int, device_id: int) -> torch.Generator:
    """The torch RNG of one device in one round: independent of which worker hosts the device."""
    state = np.random.SeedSequence([seed, round, device_id]).generate_state(1, dtype=np.uint64)[0]
    return torch.Generator().manual_seed(int(state))


def effective_steps(local_steps: int, momentum: float) -> float:
    """How many plain SGD steps ``local_steps`` of SGD with heavy-ball ``momentum`` rho amount to
    (FedNova's ``a_i``): ``(tau - rho (1 - rho^tau) / (1 - rho)) / (1 - rho)``; ``tau`` without momentum."""
    if momentum == 0:
        return float(local_steps)
    rho = momentum
    return (local_steps - rho * (1 - rho ** local_steps) / (1 - rho)) / (1 - rho)


def make_optimizer(model: nn.Module, cfg: LocalTraining) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    raise ValueError(f"unknown optimizer {cfg.optimizer!r}; valid: sgd, adam")


def train(model: nn.Module, x: torch.Tensor, y: torch.Tensor, cfg: LocalTraining,
          generator: torch.Generator, correction: torch.Tensor | None = None,
          dp: SampleDP | None = None, anchor: torch.Tensor | None = None) -> tuple[int, float]:
    """Train ``model`` in place on ``(x, y)`` with mini-batch updates.

    A fresh optimizer is made per call (optimizer state does not carry over rounds). Batches are
    drawn from a new permutation each epoch; the last batch of an epoch may be smaller. Randomness
    inside the model (dropout) comes from ``generator``'s seed too, so a call is deterministic.
    ``correction`` (flat, in the order of the trainable parameters) is added to every gradient:
    SCAFFOLD's ``c - c_i``. With ``dp`` the steps are DP-SGD steps (``SampleDP``); the proximal
    term and the correction, which do not touch the data, are added after the noise. ``anchor``
    (flat, like ``correction``) is where the proximal term pulls (default: the starting weights).
    Returns ``(steps taken, mean training loss over those steps)``; the loss excludes the proximal term.
    The model may be on a GPU: batches, ``correction`` and ``anchor`` follow it there, the data and
    the generators stay on the CPU.
    """
    with torch.random.fork_rng(devices=[]):
        # the CPU generator alone: torch.manual_seed also queues seeds for CUDA, XPU and MTIA,
        # formatting a stack trace for each (about 1 ms a call, as much as a small device's step)
        torch.default_generator.manual_seed(generator.initial_seed() ^ 0x5EED)
        if dp is None:
            return _train(model, x, y, cfg, generator, correction, anchor)
        secret = torch.Generator().manual_seed(int.from_bytes(os.urandom(8), "little"))
        with PerSampleClipping(model, dp.max_grad_norm) as clipping:
            return _train(model, x, y, cfg, secret, correction, anchor, dp, clipping)


def _train(model: nn.Module, x: torch.Tensor, y: torch.Tensor, cfg: LocalTraining,
           generator: torch.Generator, correction: torch.Tensor | None, anchor: torch.Tensor | None,
           dp: SampleDP | None = None, clipping: PerSampleClipping | None = None) -> tuple[int, float]:
    n = len(x)
    if n == 0:
        raise ValueError("no local training samples")
    optimizer = make_optimizer(model, cfg)
    params = [p for p in model.parameters() if p.requires_grad]
    device = params[0].device

    def per_param(flat: torch.Tensor) -> list[torch.Tensor]:
        if flat.numel() != sum(p.numel() for p in params):
            raise ValueError(f"a flat vector of {flat.numel()} values for {sum(p.numel() for p in params)} trainable")
        flat = flat.to(device)
        return [c.view_as(p) for c, p in zip(torch.split(flat, [p.numel() for p in params]), params)]

    anchors = [] if not cfg.prox_mu else per_param(anchor) if anchor is not None else [
        p.detach().clone() for p in params]
    corrections = [] if correction is None else per_param(correction)
    batches_per_epoch = -(-n // cfg.batch_size)
    total_steps = cfg.steps if cfg.steps is not None else cfg.epochs * batches_per_epoch
    model.train()
    loss_sum = torch.zeros((), device=device)
    step = 0
    while step < total_steps:
        for idx in _batches(n, cfg.batch_size, generator, poisson=dp is not None):
            optimizer.zero_grad(set_to_none=True)
            xb, yb = x[idx].to(device, non_blocking=True), y[idx].to(device, non_blocking=True)
            if dp is None:
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.mixed_precision):
                    logits = model(xb)
                loss = F.cross_entropy(logits.float(), yb)
                loss.backward()
            else:  # DP-SGD; an empty Poisson batch makes a step of noise alone
                losses = (F.cross_entropy(model(xb), yb, reduction="none") if len(idx)
                          else torch.zeros(0, device=device))
                clipping.backward(losses)  # p.grad: the sum of the samples' clipped gradients
                add_noise(params, dp.noise_multiplier * dp.max_grad_norm, cfg.batch_size, generator)
                loss = losses.detach().sum() / max(1, len(idx))
            for p, anchor in zip(params, anchors):  # gradient of (mu/2)||w - w_start||^2
                p.grad.add_(p.detach() - anchor, alpha=cfg.prox_mu)
            for p, c in zip(params, corrections):
                p.grad.add_(c)
            optimizer.step()
            loss_sum += loss.detach()
            step += 1
            if step == total_steps:
                break
    return total_steps, float(loss_sum) / total_steps


def _batches(n: int, batch_size: int, generator: torch.Generator, poisson: bool):
    """One epoch of batch indices: a permutation cut into batches, or (DP-SGD) ceil(n / batch_size)
    Poisson batches, each sample in each with chance batch_size / n."""
    if not poisson:
        order = torch.randperm(n, generator=generator)
        yield from (order[start:start + batch_size] for start in range(0, n, batch_size))
        return
    rate = min(1.0, batch_size / n)
    for _ in range(-(-n // batch_size)):
        yield torch.nonzero(torch.rand(n, generator=generator) < rate).flatten()


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 128) -> tuple[float, int]:
    """Return ``(summed cross-entropy loss, number correct)`` of ``model`` on ``(x, y)``."""
    model.eval()
    device = next(model.parameters()).device
    loss_sum, correct = 0.0, 0
    for start in range(0, len(x), batch_size):
        logits = model(x[start:start + batch_size].to(device))
        target = y[start:start + batch_size].to(device)
        loss_sum += float(F.cross_entropy(logits, target, reduction="sum"))
        correct += int((logits.argmax(1) == target).sum())
    return loss_sum, correct
