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
from torch.nn import functional as F

Sums = Callable[[torch.Tensor], dict[nn.Parameter, torch.Tensor]]  # clipping factors -> clipped sums
Norms = dict[nn.Parameter, torch.Tensor]  # each trainable parameter's per-sample squared gradient norms


def _scaled(backprops: torch.Tensor, coef: torch.Tensor) -> torch.Tensor:
    return backprops * coef.view(-1, *[1] * (backprops.dim() - 1))


def _linear(layer: nn.Linear, activations: torch.Tensor, backprops: torch.Tensor) -> tuple[Norms, Sums]:
    """Ghost norms of a Linear layer on inputs of any rank. One input row per sample: the weight
    gradient g a^T has squared norm |g|^2 |a|^2. More positions t per sample (a sequence, a grid
    ...): the weight gradient ``sum_t g_t a_t^T`` has squared norm ``<A A^T, G G^T>`` over the
    positions, or, with many positions, that of the gradient itself. The bias gradient is
    ``sum_t g_t``."""
    weight, bias = layer.weight.requires_grad, layer.bias is not None and layer.bias.requires_grad
    norms: Norms = {}
    if backprops.dim() == 2:
        g, a = backprops, activations
        g2 = (g * g).sum(1)
        norms = ({layer.weight: g2 * (a * a).sum(1)} if weight else {}) | ({layer.bias: g2} if bias else {})
    else:
        n = len(backprops)
        g = backprops.reshape(n, -1, backprops.shape[-1])  # (n, positions, out)
        a = activations.reshape(n, -1, activations.shape[-1])  # (n, positions, in)
        positions, out, inp = g.shape[1], g.shape[2], a.shape[2]
        if weight and positions * (out + inp) <= out * inp:
            norms[layer.weight] = (torch.bmm(g, g.transpose(1, 2)) * torch.bmm(a, a.transpose(1, 2))).sum((1, 2))
        elif weight:
            norms[layer.weight] = torch.bmm(g.transpose(1, 2), a).pow(2).sum((1, 2))
        if bias:
            norms[layer.bias] = g.sum(1).pow(2).sum(1)

    def sums(coef: torch.Tensor) -> dict[nn.Parameter, torch.Tensor]:
        scaled = _scaled(backprops, coef).reshape(-1, backprops.shape[-1])
        result = {layer.weight: scaled.t() @ activations.reshape(-1, activations.shape[-1])}
        return result | ({layer.bias: scaled.sum(0)} if layer.bias is not None else {})

    return norms, sums


def _embedding(layer: nn.Embedding, indices: torch.Tensor, backprops: torch.Tensor) -> tuple[Norms, Sums]:
    norms = {p: n ** 2 for p, n in _opacus().norm[nn.Embedding](layer, [indices], backprops).items()}

    def sums(coef: torch.Tensor) -> dict[nn.Parameter, torch.Tensor]:
        rows = _scaled(backprops, coef).reshape(-1, layer.embedding_dim)
        return {layer.weight: torch.zeros_like(layer.weight).index_add_(0, indices.reshape(-1), rows)}

    return norms, sums


def _conv2d(layer: nn.Conv2d, activations: torch.Tensor, backprops: torch.Tensor) -> dict[nn.Parameter, torch.Tensor]:
    """Per-sample gradients of an ungrouped, zero-padded Conv2d: (output gradient) x (unfolded input)^T
    per sample (one batched matrix product; the fast path for the zoo's conv nets)."""
    from opacus.utils.tensor_utils import unfold2d

    n = len(activations)
    columns = unfold2d(activations, kernel_size=layer.kernel_size, padding=layer.padding, stride=layer.stride,
                       dilation=layer.dilation)  # (n, in x kernel, positions)
    grads = backprops.reshape(n, layer.out_channels, -1)
    result = {layer.weight: torch.bmm(grads, columns.transpose(1, 2)).view(n, *layer.weight.shape)}
    return result | ({layer.bias: grads.sum(2)} if layer.bias is not None else {})


_CONV_WEIGHT = {nn.Conv1d: torch.nn.grad.conv1d_weight, nn.Conv2d: torch.nn.grad.conv2d_weight,
                nn.Conv3d: torch.nn.grad.conv3d_weight}


def _conv(layer: nn.Conv1d | nn.Conv2d | nn.Conv3d, activations: torch.Tensor, backprops: torch.Tensor,
          ) -> dict[nn.Parameter, torch.Tensor]:
    """Per-sample gradients of any Conv1d/2d/3d (groups, stride, dilation, ``padding='same'``, and
    every ``padding_mode``): the input is padded as the layer pads it, then the batch becomes
    groups of one weight-gradient convolution, one group per sample."""
    n = len(activations)
    mode = "constant" if layer.padding_mode == "zeros" else layer.padding_mode
    padded = F.pad(activations, layer._reversed_padding_repeated_twice, mode=mode)
    weight = _CONV_WEIGHT[type(layer)](
        padded.reshape(1, -1, *padded.shape[2:]), (n * layer.out_channels, *layer.weight.shape[1:]),
        backprops.reshape(1, -1, *backprops.shape[2:]), stride=layer.stride, padding=0, dilation=layer.dilation,
        groups=n * layer.groups)
    result = {layer.weight: weight.view(n, *layer.weight.shape)}
    return result | ({layer.bias: backprops.flatten(2).sum(2)} if layer.bias is not None else {})


def _materialized(per_sample: dict[nn.Parameter, torch.Tensor]) -> tuple[Norms, Sums]:
    norms = {p: g.flatten(1).pow(2).sum(1) for p, g in per_sample.items() if p.requires_grad}
    return norms, lambda coef: {p: torch.einsum("n,n...->...", coef, g) for p, g in per_sample.items()}


def _rule(layer: nn.Module, inputs: list[torch.Tensor], backprops: torch.Tensor) -> tuple[Norms, Sums]:
    """A layer's per-sample squared gradient norms, by trainable parameter, and its clipped sums."""
    kind = type(layer)
    if kind is nn.Linear:
        return _linear(layer, inputs[0], backprops)
    if kind is nn.Embedding:
        return _embedding(layer, inputs[0], backprops)
    if kind is nn.Conv2d and layer.groups == 1 and layer.padding_mode == "zeros" and isinstance(layer.padding, tuple):
        return _materialized(_conv2d(layer, inputs[0], backprops))
    if kind in _CONV_WEIGHT:
        return _materialized(_conv(layer, inputs[0], backprops))
    opacus = _opacus()
    return _materialized(opacus.grad.get(kind, opacus.functorch)(layer, inputs, backprops))


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

    Each trainable parameter is clipped by the layer that owns it: every rule must give the
    per-sample norm of every trainable parameter its layer owns, and ``.grad`` is set from the
    clipped sums of those parameters only. Raises ValueError naming the layer for what per-sample
    rules cannot see through: a layer called twice in one forward pass (shared weights), a layer
    output changed in place afterwards (``inplace=True``), a layer no rule gives every norm of.
    ``check`` finds, before training, parameters that get gradient outside their own layer."""

    def __init__(self, model: nn.Module, max_grad_norm: float) -> None:
        self.max_grad_norm = max_grad_norm
        self.layers = {m: name for name, m in model.named_modules()
                       if any(p.requires_grad for p in m.parameters(recurse=False))}
        self.own = {m: [p for p in m.parameters(recurse=False) if p.requires_grad] for m in self.layers}
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.calls: list[tuple[nn.Module, list[torch.Tensor], torch.Tensor, int]] = []
        self.normed: set[nn.Parameter] = set()  # the parameters the last backward computed norms of
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
        squared, all_sums, self.normed = torch.zeros(len(losses), dtype=losses.dtype, device=losses.device), [], set()
        for (layer, inputs, output, _), grad in zip(calls, backprops):
            own = self.own[layer]
            try:
                norms, sums = _rule(layer, inputs, torch.zeros_like(output) if grad is None else grad)
            except Exception as e:
                raise ValueError(f"DP-SGD: no per-sample gradient rule works for layer {self.layers[layer]!r} "
                                 f"({type(layer).__name__}): {e}") from e
            missing = [p for p in own if p not in norms]
            if missing:
                names = {id(p): n for n, p in layer.named_parameters(recurse=False)}
                raise ValueError(f"DP-SGD: layer {self.layers[layer]!r} ({type(layer).__name__}) gives no per-sample "
                                 f"norm for {', '.join(names[id(p)] for p in missing)}; its gradient would not be clipped")
            squared += sum(norms[p] for p in own)
            self.normed.update(own)
            all_sums.append((own, sums))
        coef = (self.max_grad_norm / (squared.sqrt() + 1e-6)).clamp(max=1.0)
        for own, sums in all_sums:  # only a layer's own parameters, each clipped by the norms above
            totals = sums(coef)
            for p in own:
                p.grad = totals[p]
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
        # drawn on the CPU, where the secret generator is, then moved to the parameter's device
        p.grad.add_(torch.normal(0.0, std, p.shape, generator=generator).to(p.device)).div_(expected_batch_size)


def check(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> None:
    """Refuse, before any training, a model whose per-sample clipping would miss a gradient: in
    train mode on the real batch ``(x, y)``, with a bound no sample reaches, the engine's sums must
    equal a plain backward pass's gradient for every trainable parameter. A parameter used outside
    its own layer (tied weights) gets gradient the rules do not see, and is named. Raises
    ValueError naming the parameter or the layer."""
    was_training = model.training
    model.train()
    try:
        with torch.random.fork_rng(devices=[]):
            seed = torch.seed()
            with PerSampleClipping(model, float("inf")) as clipping:
                clipping.backward(F.cross_entropy(model(x), y, reduction="none"))
            engine = [p.grad for p in clipping.params]
            torch.manual_seed(seed)  # the same dropout masks
            plain = torch.autograd.grad(F.cross_entropy(model(x), y, reduction="sum"), clipping.params,
                                        allow_unused=True)
        names = {id(p): n for n, p in model.named_parameters()}
        unclipped = [names[id(p)] for p, e, g in zip(clipping.params, engine, plain)
                     if g is not None and not torch.allclose(e, g, rtol=1e-3, atol=1e-5 * float(g.abs().max()))]
        if unclipped:
            raise ValueError(f"DP-SGD: parameters {', '.join(unclipped)} get gradient outside the layer that owns "
                             "them (tied or shared weights), so per-sample clipping cannot bound them; give each "
                             "layer its own parameters or freeze these")
    finally:
        model.train(was_training)
        for p in model.parameters():
            p.grad = None
