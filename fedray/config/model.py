"""The ``model`` section: a model of the zoo, or the user's own class; where its weights start
(a pretrained model: transfer) and which of its parameters train."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Field, model_validator

from fedray.config.base import NotBlank, Section

# the zoo's models and the keyword arguments each takes (fedray.models.zoo builds them; a test
# holds the two together)
ZOO_KWARGS: dict[str, tuple[str, ...]] = {"logreg": (), "mlp": ("hidden",), "cnn": ("norm",), "small_cnn": ("norm",)}

Patterns = list[Annotated[str, NotBlank]]


class ModelSpec(Section):
    name: Literal["logreg", "mlp", "cnn", "small_cnn"] | None = None
    class_: str | None = Field(None, alias="class", description="user model as 'package.module:Class'")
    kwargs: dict[str, Any] = {}
    start: Annotated[str, NotBlank] | None = Field(None, description=(
        "start from these weights instead of the seed's: runs:/<run id>/model, models:/<name>/<version> or "
        "models:/<name>@<alias> (an MLflow model fedray logged), or a .safetensors file or torch state dict"))
    replace: Patterns = Field([], description="parameters (name patterns, e.g. '4.*') that start fresh instead of "
                                              "from `start`: a new head, e.g. for a new number of classes")
    freeze: Patterns = Field([], description="parameters (name patterns) that do not train and are not federated")
    train: Patterns = Field([], description="only these parameters (name patterns) train; the rest are frozen")
    unfreeze: dict[Annotated[int, Field(gt=1)], Patterns] = Field({}, description=(
        "gradual unfreezing: from round R on, the frozen parameters matching these patterns train (and are "
        "federated) too, e.g. {4: ['8'], 8: ['1', '4']}; the server optimizer's state restarts then"))

    @model_validator(mode="after")
    def _check(self) -> ModelSpec:
        if (self.name is None) == (self.class_ is None):
            raise ValueError("give exactly one of model.name (logreg, mlp, cnn, small_cnn) or model.class")
        unknown = sorted(set(self.kwargs) - set(ZOO_KWARGS[self.name])) if self.name is not None else []
        if unknown:
            options = list(ZOO_KWARGS[self.name]) or "none"
            raise ValueError(f"model.kwargs for {self.name!r}: unexpected {', '.join(map(repr, unknown))}; "
                             f"it takes {options}")
        if self.replace and self.start is None:
            raise ValueError("model.replace starts parameters fresh instead of from model.start; give model.start")
        if self.freeze and self.train:
            raise ValueError("give model.freeze (what does not train) or model.train (what does), not both")
        if self.unfreeze and not (self.freeze or self.train):
            raise ValueError("model.unfreeze thaws frozen parameters: give model.freeze or model.train")
        return self

    @property
    def adapted(self) -> bool:
        """Whether the model starts from other weights or trains only some of its parameters."""
        return bool(self.start or self.freeze or self.train)



def check(job) -> None:
    """Gradual unfreezing against the rest of the job: the federated vector grows at its rounds,
    which what keeps vectors of the old size cannot follow. Raises ValueError naming the field."""
    if not job.model.unfreeze:
        return
    late = sorted(r for r in job.model.unfreeze if r > job.rounds)
    if late:
        raise ValueError(f"model.unfreeze: rounds {late} come after the job's last ({job.rounds})")
    refused = {"personalization": job.personalization is not None, "topology": job.topology is not None,
               "secure": job.secure is not None, "checkpoint": job.checkpoint is not None,
               f"strategy {job.strategy.name}": job.strategy.name in ("scaffold", "fedasync", "fedbuff")}
    for what, present in refused.items():
        if present:
            raise ValueError(f"model.unfreeze changes the size of the federated vector during the run; {what} keeps "
                             "vectors of the first size (edges' sums, encryption plans, control variates, "
                             "checkpoints, asynchronous model versions, personal layouts): not supported together")
