"""The ``personalization`` section: what each device keeps of its own, and the per-device
fine-tuning pass every personalized run reports against."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, model_validator

from fedray.config.base import NotBlank, PositiveFloat, PositiveInt, Section


class FineTuneSpec(Section):
    """After the last round each device trains the final model (with its personal parameters) for
    ``epochs`` on its own data and is evaluated on its test split: FedAvg + fine-tuning, the
    baseline personalization has to beat."""

    epochs: Annotated[int, Field(ge=0)] = 1
    lr: PositiveFloat | None = Field(None, description="default: devices.local.lr")


class PersonalizationSpec(Section):
    method: Literal["none", "fedper", "fedrep", "fedbn", "ditto"] = Field("none", description=(
        "none: one global model (fine-tuned per device at the end); fedper: personal parameters train with the "
        "shared ones; fedrep: personal parameters train first with the shared frozen, then the shared with the "
        "personal frozen; fedbn: normalization layers stay on each device; ditto: each device also trains a "
        "personal copy of the model, pulled towards the global one"))
    personal: list[Annotated[str, NotBlank]] = Field([], description=(
        "parameter name patterns kept on each device (fedper, fedrep: default the last layer; fedbn: added to "
        "the normalization layers)"))
    head_epochs: PositiveInt = Field(1, description="fedrep: epochs on the personal parameters before the shared")
    lam: PositiveFloat = Field(0.1, alias="lambda", description="ditto: weight of (lambda/2)||v - w||^2, the pull "
                                                               "of the personal model v towards the global w")
    finetune: FineTuneSpec = FineTuneSpec()
    export: list[Annotated[int, Field(ge=0)]] = Field([], description=(
        "devices whose personalized model is exported to ONNX at the end (on their own worker, checked on their "
        "own test inputs) and logged as personal/device_<id>.onnx"))

    @model_validator(mode="after")
    def _check(self) -> PersonalizationSpec:
        if self.personal and self.method in ("none", "ditto"):
            raise ValueError(f"personalization.personal does not apply to method {self.method!r} ("
                             + ("no parameter is personal" if self.method == "none" else
                                "a ditto device keeps a whole personal model") + ")")
        if "head_epochs" in self.model_fields_set and self.method != "fedrep":
            raise ValueError("personalization.head_epochs applies only to method 'fedrep'")
        if "lam" in self.model_fields_set and self.method != "ditto":
            raise ValueError("personalization.lambda applies only to method 'ditto'")
        return self


def check(job) -> None:
    """The personalization section against the rest of the job; raises ValueError naming the field."""
    if job.peers is not None:
        raise ValueError("personalization does not apply to peers: every agent already keeps its own model")
    if job.privacy is not None:
        raise ValueError("personalization with privacy is not supported: personal training and each device's "
                         "evaluation on its own split release statistics of its data that privacy does not account")
    method = job.personalization.method
    beyond = [d for d in job.personalization.export if d >= job.devices.count]
    if beyond:
        raise ValueError(f"personalization.export: devices {beyond} do not exist (devices.count is {job.devices.count})")
    if job.strategy.name == "scaffold" and method in ("fedper", "fedbn"):
        raise ValueError(f"strategy scaffold corrects the gradients of the shared parameters; personalization "
                         f"{method} trains personal ones with them (use fedrep, ditto or none)")
