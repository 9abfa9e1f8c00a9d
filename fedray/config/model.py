"""The ``model`` section: a model of the zoo, or the user's own class."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator

from fedray.config.base import Section

# the zoo's models and the keyword arguments each takes (fedray.models.zoo builds them; a test
# holds the two together)
ZOO_KWARGS: dict[str, tuple[str, ...]] = {"logreg": (), "mlp": ("hidden",), "cnn": (), "small_cnn": ()}


class ModelSpec(Section):
    name: Literal["logreg", "mlp", "cnn", "small_cnn"] | None = None
    class_: str | None = Field(None, alias="class", description="user model as 'package.module:Class'")
    kwargs: dict[str, Any] = {}

    @model_validator(mode="after")
    def _check(self) -> ModelSpec:
        if (self.name is None) == (self.class_ is None):
            raise ValueError("give exactly one of model.name (logreg, mlp, cnn, small_cnn) or model.class")
        unknown = sorted(set(self.kwargs) - set(ZOO_KWARGS[self.name])) if self.name is not None else []
        if unknown:
            options = list(ZOO_KWARGS[self.name]) or "none"
            raise ValueError(f"model.kwargs for {self.name!r}: unexpected {', '.join(map(repr, unknown))}; "
                             f"it takes {options}")
        return self
