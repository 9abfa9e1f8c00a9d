"""DP-SGD's per-sample clipping in one backward pass: the sum over a batch of each sample's
gradient clipped to L2 norm C, without the second backward pass of ghost clipping. No Ray, no I/O.

Book-keeping (Bu et al. 2023, "Differentially private optimization on large model at small cost"):
forward hooks keep each trainable layer's input and output; one ``autograd.grad`` of the summed
per-sample losses with respect to the layers' outputs gives every layer's output gradients (the
backward pass computes no weight gradient). From a layer's input and output gradients come each
sample's gradient norm and, once every layer's norms give the clipping factors, the clipped sum:
- Linear and Embedding: ghost norms (a sample's Linear weight gradient g a^T has norm |g| |a|), so
  no per-sample gradient is materialized; the clipped sum is one matrix product, the weight
  gradient a plain backward pass computes anyway;
- Conv2d: per-sample gradients from the unfolded input (one batched matrix product);
- any other layer: Opacus's per-sample gradient rules (GroupNorm, LayerNorm, ...), or its
  functorch rule for layers it has none for.
``add_noise`` then makes the step private.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import cache
from types import SimpleNamespace

import torch
from torch import nn

Sums = Callable[[torch.Tensor], dict[nn.Parameter, torch.Tensor]]  # clipping factors -> clipped sums


def _scaled(backprops: torch.Tensor, coef: torch.Tensor) -> torch.Tensor:
    return backprops * coef.view(-1, *[1] * (backprops.dim() - 1))


def _linear(layer: nn.Linear, activations: torch.Tensor, backprops: torch.Tensor) -> tuple[torch.Tensor, Sums]:
    if backprops.dim() == 2:  # one input row per sample: |g a^T|^2 = |g|^2 |a|^2
        g2 = (backprops * backprops).sum(1)
        squared = g2 * (activations * activations).sum(1) if layer.weight.requires_grad else 0
        squared = squared + (g2 if layer.bias is not None and layer.bias.requires_grad else 0)
    else:  # sequences: Opacus's ghost norm over the positions
        squared = sum(n ** 2 for n in _opacus().norm[nn.Linear](layer, [activations], backprops).values())

    def sums(coef: torch.Tensor) -> dict[nn.Parameter, torch.Tensor]:
        scaled = _scaled(backprops, coef).reshape(-1, backprops.shape[-1])
        result = {layer.weight: scaled.t() @ activations.reshape(-1, activations.shape[-1])}
        return result | ({layer.bias: scaled.sum(0)} if layer.bias is not None else {})

    return squared, sums


def _embedding(layer: nn.Embedding, indices: torch.Tensor, backprops: torch.Tensor) -> tuple[torch.Tensor, Sums]:
    squared = sum(n ** 2 for n in _opacus().norm[nn.Embedding](layer, [indices], backprops).values())

    def sums(coef: torch.Tensor) -> dict[nn.Parameter, torch.Tensor]:
        rows = _scaled(backprops, coef).reshape(-1, layer.embedding_dim)
        return {layer.weight: torch.zeros_like(layer.weight).index_add_(0, indices.reshape(-1), rows)}

    return squared, sums


def _conv2d(layer: nn.Conv2d, activations: torch.Tensor, backprops: torch.Tensor) -> dict[nn.Parameter, torch.Tensor]:
    """Per-sample gradients of an ungrouped Conv2d: (output gradient) x (unfolded input)^T per sample."""
    from opacus.utils.tensor_utils import unfold2d

    n = len(activations)
    columns = unfold2d(activations, kernel_size=layer.kernel_size, padding=layer.padding, stride=layer.stride,
                       dilation=layer.dilation)  # (n, in x kernel, positions)
    grads = backprops.reshape(n, layer.out_channels, -1)
    result = {layer.weight: torch.bmm(grads, columns.transpose(1, 2)).view(n, *layer.weight.shape)}
    return result | ({layer.bias: grads.sum(2)} if layer.bias is not None else {})


def _materialized(per_sample: dict[nn.Parameter, torch.Tensor]) -> tuple[torch.Tensor, Sums]:
    squared = sum(g.flatten(1).pow(2).sum(1) for p, g in per_sample.items() if p.requires_grad)
    return squared, lambda coef: {p: torch.einsum("n,n...->...", coef, g) for p, g in per_sample.items()}


def _rule(layer: nn.Module, inputs: list[torch.Tensor], backprops: torch.Tensor) -> tuple[torch.Tensor, Sums]:
    """A layer's per-sample squared gradient norms (all its trainable parameters) and its clipped sums."""
    if type(layer) is nn.Linear:
        return _linear(layer, inputs[0], backprops)
    if type(layer) is nn.Embedding:
        return _embedding(layer, inputs[0], backprops)
    if type(layer) is nn.Conv2d and layer.groups == 1 and isinstance(layer.padding, tuple):
        return _materialized(_conv2d(layer, inputs[0], backprops))
    opacus = _opacus()
    return _materialized(opacus.grad.get(type(layer), opacus.functorch)(layer, inputs, backprops))


@cache
def _opacus() -> SimpleNamespace:
    """Opacus's per-layer rules: ``grad`` (per-sample gradients) and ``norm`` (ghost norms) by layer
    type, and ``functorch`` for any other layer. Imported on first use."""
    from opacus.grad_sample import GradSampleModule
    from opacus.grad_sample.functorch import ft_compute_per_sample_gradient
    from opacus.grad_sample.grad_sample_module_fast_gradient_clipping import GradSampleModuleFastGradientClipping

    return SimpleNamespace(grad=GradSampleModule.GRAD_SAMPLERS, norm=GradSampleModuleFastGradientClipping.NORM_SAMPLERS,
                           functorch=ft_compute_per_sample_gradient)


class PerSampleClipping:
    """Hooks on ``model``'s trainable layers; ``backward(losses)`` sets every trainable parameter's
    ``.grad`` to the sum over the batch of each sample's gradient of ``losses[i]``, clipped to
    ``max_grad_norm`` (all of the sample's parameters together). A context manager: the hooks are
    removed on exit.

    Raises ValueError for what per-sample rules cannot see through: a layer called twice in one
    forward pass (shared weights) or a layer output changed in place afterwards (``inplace=True``)."""

    def __init__(self, model: nn.Module, max_grad_norm: float) -> None:
        self.max_grad_norm = max_grad_norm
        self.layers = {m: name for name, m in model.named_modules()
                       if any(p.requires_grad for p in m.parameters(recurse=False))}
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.calls: list[tuple[nn.Module, list[torch.Tensor], torch.Tensor, int]] = []
        self.handles = [m.register_forward_hook(self._capture) for m in self.layers]

    def _capture(self, layer: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        if torch.is_grad_enabled() and layer.training:  # channels-last inputs made contiguous for unfolding
            self.calls.append((layer, [t.detach().contiguous() for t in inputs], output, output._version))

    def backward(self, losses: torch.Tensor) -> None:
        calls, self.calls = self.calls, []
        for p in self.params:
            p.grad = None
        if not len(losses):  # an empty batch: no sample, nothing to clip
            calls = []
        for layer, _, output, version in calls:
            if output._version != version:
                raise ValueError(f"DP-SGD: the output of layer {self.layers[layer]!r} is changed in place after it "
                                 "(e.g. ReLU(inplace=True)); per-sample clipping needs it unchanged: use inplace=False")
        if len({layer for layer, *_ in calls}) < len(calls):
            raise ValueError("DP-SGD: a layer is called more than once in one forward pass (shared weights); "
                             "per-sample clipping supports each trainable layer once")
        backprops = torch.autograd.grad(losses.sum(), [output for *_, output, _ in calls], allow_unused=True) \
            if calls else []
        squared, all_sums = torch.zeros(len(losses)), []
        for (layer, inputs, output, _), grad in zip(calls, backprops):
            layer_squared, sums = _rule(layer, inputs, torch.zeros_like(output) if grad is None else grad)
            squared += layer_squared
            all_sums.append(sums)
        coef = (self.max_grad_norm / (squared.sqrt() + 1e-6)).clamp(max=1.0)
        for sums in all_sums:
            for p, total in sums(coef).items():
                if p.requires_grad:
                    p.grad = total
        for p in self.params:  # layers the forward pass did not use, or an empty batch
            if p.grad is None:
                p.grad = torch.zeros_like(p)

    def __enter__(self) -> PerSampleClipping:
        return self

    def __exit__(self, *exc) -> None:
        for handle in self.handles:
            handle.remove()


def add_noise(params: list[nn.Parameter], std: float, expected_batch_size: int, generator: torch.Generator) -> None:
    """The private step from the clipped sums in ``p.grad``: add Gaussian noise of ``std``
    (``noise_multiplier x max_grad_norm``) to each coordinate and divide by the expected batch size
    (the Poisson batch's own size would reveal it)."""
    for p in params:
        p.grad.add_(torch.normal(0.0, std, p.shape, generator=generator)).div_(expected_batch_size)
