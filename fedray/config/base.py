"""What every job section shares: forbidden extras, frozen values, strict types, no NaN or infinity."""

from __future__ import annotations

import math
from typing import Annotated

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field

PositiveInt = Annotated[int, Field(gt=0)]
PositiveFloat = Annotated[float, Field(gt=0)]
Fraction = Annotated[float, Field(ge=0, lt=1)]


def _not_blank(text: str) -> str:
    if not text.strip():
        raise ValueError("must not be empty or blank")
    return text


NotBlank = AfterValidator(_not_blank)
# sections are strict (true is not 1, 1 is not true), and strict tuples refuse lists: YAML has only lists
AsTuple = BeforeValidator(lambda value: tuple(value) if isinstance(value, list) else value)


class JobError(ValueError):
    """A job file or override is invalid; the message names each offending field."""


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True, allow_inf_nan=False, strict=True)


def quorum(min_completion: float, sampled: int) -> int:
    """Accepted updates a round needs: ``ceil(min_completion * sampled)``, rounded first because
    0.28 * 25 is 7.000000000000001 in floating point."""
    return math.ceil(round(min_completion * sampled, 9))
