"""The data section: the dataset, its synthetic generator, and how it is partitioned over devices."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, model_validator

from fedray.config.base import AsTuple, Fraction, PositiveFloat, PositiveInt, Section


class IIDPartition(Section):
    kind: Literal["iid"]


class DirichletPartition(Section):
    """Label skew: class proportions per device drawn from Dir(alpha); smaller is more skewed."""

    kind: Literal["dirichlet"]
    alpha: PositiveFloat = 0.5


class ShardsPartition(Section):
    """Pathological non-IID: each device holds ``labels_per_device`` label-sorted shards."""

    kind: Literal["shards"]
    labels_per_device: PositiveInt = 2


class QuantitySkewPartition(Section):
    """IID labels, device sizes proportional to a Dir(beta) draw; smaller is more unequal."""

    kind: Literal["quantity_skew"]
    beta: PositiveFloat = 0.5


Partition = Annotated[IIDPartition | DirichletPartition | ShardsPartition | QuantitySkewPartition,
                      Field(discriminator="kind")]


class SyntheticData(Section):
    """Seeded Gaussian class clusters: ``samples`` points of ``shape`` in ``classes`` classes."""

    samples: PositiveInt = 10_000
    shape: Annotated[tuple[PositiveInt, ...], AsTuple] = (32,)
    classes: Annotated[int, Field(ge=2)] = 10
    noise: PositiveFloat = 1.0
    per_device: Annotated[int, Field(ge=2)] | None = Field(
        None, description="each device draws this many samples from its own seed whenever it trains (virtual "
                          "devices: data exists only for those training); `samples` then feed only the holdout")


class DataSpec(Section):
    dataset: Literal["digits", "breast_cancer", "mnist", "synthetic", "npz", "csv"]
    path: str | None = Field(None, description="mnist: optional IDX directory; npz/csv: the file")
    label_column: str = "label"
    synthetic: SyntheticData = SyntheticData()
    partition: Partition = IIDPartition(kind="iid")
    test_fraction: Fraction = 0.2
    holdout: Fraction = 0.2
    resize: Annotated[tuple[PositiveInt, PositiveInt], AsTuple] | None = Field(
        None, description="images resized to (height, width), bilinear: e.g. digits' 8x8 to a 28x28 model's input")

    @model_validator(mode="after")
    def _check(self) -> DataSpec:
        if self.dataset in ("npz", "csv") and self.path is None:
            raise ValueError(f"data.path is required for dataset {self.dataset!r}")
        if self.dataset in ("digits", "breast_cancer", "synthetic") and self.path is not None:
            raise ValueError(f"data.path does not apply to dataset {self.dataset!r}")
        if "synthetic" in self.model_fields_set and self.dataset != "synthetic":
            raise ValueError("data.synthetic applies only to dataset 'synthetic'")
        if self.synthetic.per_device is not None and self.partition.kind not in ("iid", "dirichlet"):
            raise ValueError(f"data.partition {self.partition.kind!r} splits a shared dataset; devices that draw "
                             "their own samples (data.synthetic.per_device) take 'iid' or 'dirichlet' (label skew)")
        if "label_column" in self.model_fields_set and self.dataset != "csv":
            raise ValueError("data.label_column applies only to dataset 'csv'")
        return self
