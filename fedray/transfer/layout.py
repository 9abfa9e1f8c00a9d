"""Which tensors of a model are federated, frozen or kept on each device.

The federated vector is the trainable parameters that are not personal (``Layout.shared``);
frozen parameters do not train and personal ones never leave their device, so neither is in it:
bytes, encryption, clipping and noise scale with what is shared. Plain PyTorch: no Ray, no I/O.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from fedray.config.model import ModelSpec
from fedray.config.personalization import PersonalizationSpec
from fedray.models.params import ParamSpec
from fedray.transfer.weights import matches

NORM_LAYERS = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)  # BatchNorm and InstanceNorm: _NormBase


@dataclass(frozen=True)
class Layout:
    """``shared``: the federated vector. ``personal``: what each device keeps of its own (personal
    parameters and, FedBN, normalization statistics; Ditto: a personal copy of ``shared``).
    ``frozen``: parameters that do not train."""

    shared: ParamSpec
    personal: ParamSpec
    frozen: tuple[str, ...]
    method: str = "none"


def head(model: nn.Module) -> list[str]:
    """The parameters of the model's last layer that has any: its default personal head."""
    last = [name for name, m in model.named_modules() if any(True for _ in m.parameters(recurse=False))][-1]
    return [f"{last}.{n}" if last else n for n, _ in model.get_submodule(last).named_parameters(recurse=False)]


def lay_out(model: nn.Module, spec: ModelSpec, personalization: PersonalizationSpec | None = None,
            round: int = 1) -> Layout:
    """Freeze ``model``'s parameters as ``spec.freeze`` / ``spec.train`` say, less those
    ``spec.unfreeze`` has thawed by ``round`` (``requires_grad``), and split the rest into shared
    and personal. Raises ValueError naming a pattern that matches no parameter (or, unfreeze, no
    frozen one), a parameter both frozen and personal, floating-point buffers that would be neither
    federated nor kept (BatchNorm statistics outside FedBN), or a model with nothing to federate."""
    names = [n for n, _ in model.named_parameters()]
    thawing = [(f"model.unfreeze.{r}", patterns) for r, patterns in sorted(spec.unfreeze.items())]
    for field, patterns in (("model.freeze", spec.freeze), ("model.train", spec.train),
                            ("personalization.personal", personalization.personal if personalization else []),
                            *thawing):
        for pattern in patterns:
            if not any(matches(n, [pattern]) for n in names):
                shown = ", ".join(names[:12]) + (", ..." if len(names) > 12 else "")
                raise ValueError(f"{field}: {pattern!r} matches no parameter of the model ({shown})")
    frozen = [n for n in names if matches(n, spec.freeze)] if spec.freeze else (
        [n for n in names if not matches(n, spec.train)] if spec.train else [])
    remaining = frozen
    for r, patterns in sorted(spec.unfreeze.items()):
        still = [n for n in remaining if not matches(n, patterns)]
        if len(still) == len(remaining):
            raise ValueError(f"model.unfreeze.{r}: {patterns} match no parameter still frozen then")
        remaining, frozen = still, still if r <= round else frozen
    for name, p in model.named_parameters():
        p.requires_grad_(name not in frozen)
    method = personalization.method if personalization else "none"
    personal: list[str] = []
    if method in ("fedper", "fedrep"):
        personal = [n for n in names if matches(n, personalization.personal or head(model))]
    elif method == "fedbn":
        norms = [name for name, m in model.named_modules() if isinstance(m, NORM_LAYERS)]
        if not norms and not personalization.personal:
            raise ValueError("personalization fedbn keeps normalization layers on each device, and the model has "
                             "none (e.g. model.kwargs.norm: batch)")
        state = dict(model.named_parameters()) | dict(model.named_buffers())
        personal = [n for n, t in state.items() if t.is_floating_point() and (
            matches(n, norms) or matches(n, personalization.personal))]
    both = sorted(set(personal) & set(frozen))
    if both:
        raise ValueError(f"parameters {both[:3]} are both frozen and personal; a personal parameter trains")
    loose = [n for n, b in model.named_buffers() if b.is_floating_point() and n not in personal]
    if loose:
        raise ValueError(f"the model has floating-point buffers {loose[:3]} (e.g. BatchNorm running statistics), which "
                         "are not federated: keep them on each device (personalization.method fedbn) or use "
                         "GroupNorm or LayerNorm (the zoo's CNNs: model.kwargs.norm group)")
    shared = [n for n in names if n not in frozen and n not in personal]
    if names and not shared:  # (a model with no parameters at all: check_output says so)
        raise ValueError("no parameter is both trainable and shared, so there is nothing to federate "
                         "(see model.freeze, model.train and personalization.personal)")
    return Layout(ParamSpec.of(model, shared), ParamSpec.of(model, shared if method == "ditto" else personal),
                  tuple(frozen), method)


def job_model(job, input_shape: tuple[int, ...], num_classes: int, initial: dict | None = None
              ) -> tuple[nn.Module, Layout]:
    """The job's model, laid out (``lay_out``), from the seed's weights or from ``initial`` (a
    full state dict: where the run started, when ``model.start`` is set)."""
    import torch

    from fedray.models.zoo import build_model

    spec = job.model
    model = build_model(spec.name, spec.class_, spec.kwargs, input_shape, num_classes, job.seed)
    layout = lay_out(model, spec, job.personalization)
    if initial is not None:
        model.load_state_dict({k: torch.as_tensor(v) for k, v in initial.items()})
    return model, layout
