"""ParamSpec: maps a model's federated parameters to and from one flat float32 vector."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn


@dataclass(frozen=True)
class ParamSpec:
    """Names and shapes of some of a module's tensors (parameters or buffers), laid end to end in
    one flat float32 vector.

    ``ParamSpec.of(module)`` is the federated vector: the trainable parameters (``requires_grad``)
    in ``module.named_parameters()`` order; frozen parameters and buffers stay where they are.
    """

    names: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]

    @classmethod
    def of(cls, module: nn.Module, names: list[str] | None = None) -> ParamSpec:
        """The spec of ``names`` (parameters or buffers of ``module``, in that order); default its
        trainable parameters."""
        tensors = dict(module.named_parameters()) | dict(module.named_buffers())
        if names is None:
            names = [n for n, p in module.named_parameters() if p.requires_grad]
        return cls(tuple(names), tuple(tuple(tensors[n].shape) for n in names))

    @property
    def size(self) -> int:
        """Number of float32 entries in the flat vector."""
        return sum(math.prod(s) for s in self.shapes)

    def _params(self, module: nn.Module) -> list[torch.Tensor]:
        params = dict(module.named_parameters()) | dict(module.named_buffers())
        try:
            tensors = [params[n] for n in self.names]
        except KeyError as e:
            raise ValueError(f"module has no parameter {e.args[0]!r} of this ParamSpec") from e
        for name, shape, t in zip(self.names, self.shapes, tensors):
            if tuple(t.shape) != shape:
                raise ValueError(f"parameter {name!r} has shape {tuple(t.shape)}, spec says {shape}")
        return tensors

    def flatten(self, module: nn.Module) -> np.ndarray:
        """Copy the federated parameters of ``module`` into a new float32 vector of length ``size``."""
        with torch.no_grad():
            flat = torch.cat([t.detach().reshape(-1) for t in self._params(module)])
        return flat.to(torch.float32).cpu().numpy()

    def load(self, module: nn.Module, vector: np.ndarray) -> None:
        """Write ``vector`` (float32, length ``size``) into the federated parameters of ``module``."""
        if vector.shape != (self.size,):
            raise ValueError(f"vector has shape {vector.shape}, expected ({self.size},)")
        vector = np.asarray(vector, dtype=np.float32)
        if not vector.flags.writeable:  # e.g. a zero-copy array from Ray's object store
            vector = vector.copy()
        source = torch.from_numpy(vector)
        offset = 0
        with torch.no_grad():
            for t in self._params(module):
                t.copy_(source[offset:offset + t.numel()].view_as(t))
                offset += t.numel()
