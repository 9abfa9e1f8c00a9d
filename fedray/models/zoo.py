"""The built-in models and loading of user models.

Every model maps a float32 batch of shape ``(B, *input_shape)`` to logits ``(B, num_classes)``.
Image models take ``input_shape == (channels, height, width)``; the others flatten any shape.
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Callable, Sequence

import torch
from torch import nn


def logistic_regression(input_shape: Sequence[int], num_classes: int) -> nn.Module:
    """Multinomial logistic regression: one linear layer on the flattened input."""
    return nn.Sequential(nn.Flatten(), nn.Linear(math.prod(input_shape), num_classes))


def mlp(input_shape: Sequence[int], num_classes: int, hidden: Sequence[int] = (200, 200)) -> nn.Module:
    """Fully connected ReLU network (the FedAvg paper's "2NN" with the default widths)."""
    layers: list[nn.Module] = [nn.Flatten()]
    width = math.prod(input_shape)
    for h in hidden:
        layers += [nn.Linear(width, h), nn.ReLU()]
        width = h
    layers.append(nn.Linear(width, num_classes))
    return nn.Sequential(*layers)


class ChannelsLast(nn.Module):
    """Puts the batch in channels-last memory order: CPU convolution and pooling run several times
    faster on it than on the default NCHW order. The values are unchanged."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.contiguous(memory_format=torch.channels_last)


def _norm(kind: str | None, channels: int) -> list[nn.Module]:
    """The normalization layer after a convolution: none, BatchNorm or GroupNorm (groups of 4 channels)."""
    if kind is None:
        return []
    if kind == "batch":
        return [nn.BatchNorm2d(channels)]
    if kind == "group":
        return [nn.GroupNorm(max(1, channels // 4), channels)]
    raise ValueError(f"norm must be 'batch' or 'group', got {kind!r}")


def _conv_net(input_shape: Sequence[int], num_classes: int, channels: Sequence[int], kernel: int,
              hidden: int | None, norm: str | None) -> nn.Module:
    if len(input_shape) != 3:
        raise ValueError(f"a CNN needs image input (channels, height, width), got shape {tuple(input_shape)}")
    layers: list[nn.Module] = [ChannelsLast()]
    c_in, (height, width) = input_shape[0], input_shape[1:]
    for c_out in channels:
        # pooling before ReLU computes the same function as after it, on a quarter of the elements
        layers += [nn.Conv2d(c_in, c_out, kernel, padding=kernel // 2), *_norm(norm, c_out), nn.MaxPool2d(2),
                   nn.ReLU()]
        c_in, height, width = c_out, height // 2, width // 2
    if height == 0 or width == 0:
        raise ValueError(f"input {tuple(input_shape)} is too small for {len(channels)} 2x2 poolings")
    layers.append(nn.Flatten())
    features = c_in * height * width
    if hidden:
        layers += [nn.Linear(features, hidden), nn.ReLU()]
        features = hidden
    layers.append(nn.Linear(features, num_classes))
    return nn.Sequential(*layers).to(memory_format=torch.channels_last)


def cnn(input_shape: Sequence[int], num_classes: int, norm: str | None = None) -> nn.Module:
    """The CNN of the FedAvg paper: two 5x5 conv layers (32, 64), each with ReLU and 2x2 max-pooling,
    a fully connected layer of 512 with ReLU, and the output layer. ``norm`` ('batch' or 'group')
    adds a normalization layer after each convolution."""
    return _conv_net(input_shape, num_classes, channels=(32, 64), kernel=5, hidden=512, norm=norm)


def small_cnn(input_shape: Sequence[int], num_classes: int, norm: str | None = None) -> nn.Module:
    """A small, fast CNN: two 3x3 conv layers (16, 32), each with ReLU and 2x2 max-pooling, then
    the output layer. ``norm`` as for ``cnn``."""
    return _conv_net(input_shape, num_classes, channels=(16, 32), kernel=3, hidden=None, norm=norm)


ZOO: dict[str, Callable[..., nn.Module]] = {
    "logreg": logistic_regression,
    "mlp": mlp,
    "cnn": cnn,
    "small_cnn": small_cnn,
}


def import_object(path: str) -> object:
    """Import ``package.module:Name``. Raises ValueError naming the path when it cannot."""
    module_name, sep, attr = path.partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"expected 'package.module:ClassName', got {path!r}")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ValueError(f"cannot import module {module_name!r} for {path!r}: {e}") from e
    try:
        return getattr(module, attr)
    except AttributeError as e:
        raise ValueError(f"module {module_name!r} has no attribute {attr!r}") from e


def build_model(name: str | None, class_path: str | None, kwargs: dict, input_shape: Sequence[int],
                num_classes: int, seed: int) -> nn.Module:
    """Build a zoo model by ``name`` or a user ``nn.Module`` by ``class_path`` with ``kwargs``.

    The initial weights depend only on ``seed``, so every process builds the same model.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if class_path is None:
            return ZOO[name](input_shape, num_classes, **kwargs)
        model = import_object(class_path)(**kwargs)
    if not isinstance(model, nn.Module):
        raise ValueError(f"{class_path} built a {type(model).__name__}, not a torch.nn.Module")
    return model


def check_output(model: nn.Module, x: torch.Tensor, num_classes: int) -> None:
    """Refuse a model with no trainable parameters, or one that does not map the real batch ``x``
    to ``(len(x), num_classes)`` logits. Raises ValueError naming the layer whose forward failed."""
    if not any(p.requires_grad for p in model.parameters()):
        raise ValueError("it has no trainable parameters")
    entered: list[nn.Module] = []  # the layers whose forward has begun and not ended: the last one failed
    names = {module: name for name, module in model.named_modules()}

    def done(*_) -> None:
        entered.pop()

    handles = [m.register_forward_pre_hook(lambda m, _: entered.append(m)) for m in names] + [
        m.register_forward_hook(done) for m in names]
    try:
        with torch.no_grad():
            out = model(x)
    except Exception as e:  # noqa: BLE001 - the user's forward, reported with the layer
        layer = entered[-1] if entered else model
        where = f"layer {names[layer]!r} ({type(layer).__name__})" if names.get(layer) else type(model).__name__
        raise ValueError(f"{where} failed on a batch of input shape {tuple(x.shape)}: {type(e).__name__}: "
                         f"{(str(e).splitlines() or [''])[0]}") from None
    finally:
        for handle in handles:
            handle.remove()
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != (len(x), num_classes):
        got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ValueError(f"it maps a batch of input shape {tuple(x.shape)} to {got}; it must give "
                         f"({len(x)}, {num_classes}) logits, one per class of the data")
