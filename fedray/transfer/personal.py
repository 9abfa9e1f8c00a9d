"""A device's side of personalization: what it keeps of its own (``DeviceState.personal``), how it
trains it beside the shared parameters, and the fine-tuning pass. Plain PyTorch: no Ray, no I/O.

- fedper (Arivazhagan et al. 2019): the personal parameters (default the head) train with the
  shared ones; only the shared are sent.
- fedrep (Collins et al. 2021): first the personal parameters train ``head_epochs`` with the shared
  frozen, then the shared train with the personal frozen.
- fedbn (Li et al. 2021): the normalization layers (weights and running statistics) stay local.
- ditto (Li et al. 2021): the global model trains as in FedAvg; then the device's personal copy
  ``v`` trains on the same data with (lambda/2)||v - w||^2 pulling it towards the global ``w``.
"""

from __future__ import annotations

import contextlib
from dataclasses import replace

import numpy as np
import torch
from torch import nn

from fedray.agents.state import DeviceState
from fedray.agents.training import LocalTraining, train
from fedray.config.personalization import PersonalizationSpec
from fedray.transfer.layout import Layout


@contextlib.contextmanager
def trainable(model: nn.Module, names: tuple[str, ...]):
    """Only the parameters ``names`` train inside the block; ``requires_grad`` is restored after."""
    before = {n: p.requires_grad for n, p in model.named_parameters()}
    for n, p in model.named_parameters():
        p.requires_grad_(before[n] and n in names)
    try:
        yield
    finally:
        for n, p in model.named_parameters():
            p.requires_grad_(before[n])


class Personal:
    """Personalization for the devices of one worker: ``model`` laid out by ``layout``, trained as
    ``local`` says, by the job's ``spec`` (None: no personal state)."""

    def __init__(self, model: nn.Module, layout: Layout, spec: PersonalizationSpec | None, local: LocalTraining) -> None:
        self._model, self._layout, self._spec, self._local = model, layout, spec, local
        self.method = spec.method if spec else "none"
        self._split = self.method in ("fedper", "fedrep", "fedbn")  # part of the model is the device's own
        self._initial = layout.personal.flatten(model) if self._split else None

    def load(self, state: DeviceState | None) -> None:
        """Put the device's personal parameters (its record's, else the initial ones) in the model,
        whose shared parameters are loaded already. Ditto's personal model is not loaded here."""
        if self._split:
            kept = None if state is None else state.personal
            self._layout.personal.load(self._model, self._initial if kept is None else kept)

    @contextlib.contextmanager
    def shared_training(self, x: torch.Tensor, y: torch.Tensor, generator: torch.Generator):
        """The block that trains the shared parameters; fedrep trains the head first, and only the
        shared parameters inside the block."""
        if self.method != "fedrep":
            yield
            return
        with trainable(self._model, self._layout.personal.names):
            head = replace(self._local, epochs=self._spec.head_epochs, steps=None, prox_mu=0.0)
            train(self._model, x, y, head, generator)
        with trainable(self._model, self._layout.shared.names):
            yield

    def after(self, x: torch.Tensor, y: torch.Tensor, start: np.ndarray, state: DeviceState,
              generator: torch.Generator) -> dict[str, np.ndarray]:
        """After the shared training (``start``: the global model it began from): the record's new
        personal field. Ditto trains its personal model here (the model then holds it)."""
        if self._split:
            return {"personal": self._layout.personal.flatten(self._model)}
        if self.method != "ditto":
            return {}
        own = start if state.personal is None else state.personal  # a device's first v is the global model
        self._layout.shared.load(self._model, np.array(own, dtype=np.float32))
        pull = replace(self._local, prox_mu=self._spec.lam)
        train(self._model, x, y, pull, generator, anchor=torch.from_numpy(np.array(start, dtype=np.float32)))
        return {"personal": self._layout.shared.flatten(self._model)}

    def personalized(self, params: np.ndarray, state: DeviceState | None) -> None:
        """Load the device's personalized model: the global ``params`` with its personal part, or
        (ditto) its personal model, once it has one."""
        self._layout.shared.load(self._model, np.array(params, dtype=np.float32))
        self.load(state)
        if self.method == "ditto" and state is not None and state.personal is not None:
            self._layout.shared.load(self._model, np.array(state.personal, dtype=np.float32))

    def fine_tune(self, x: torch.Tensor, y: torch.Tensor, generator: torch.Generator) -> None:
        """Train the loaded model ``finetune.epochs`` on ``(x, y)``: every parameter that trains."""
        tune = self._spec.finetune
        train(self._model, x, y, replace(self._local, epochs=tune.epochs, steps=None, prox_mu=0.0,
                                         lr=tune.lr or self._local.lr), generator)
