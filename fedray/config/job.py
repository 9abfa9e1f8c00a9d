"""JobSpec: the validated description of one federated job, loaded from a YAML file.

Every section forbids unknown fields, so a typo fails with a message naming the field instead of
silently falling back to a default. All checks run before Ray starts.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import Field, ValidationError, model_validator

from fedray.config.base import Fraction, JobError, NotBlank, PositiveFloat, PositiveInt, Section, quorum
from fedray.config import compression, model, peers, personalization, privacy, resources, secure, topology
from fedray.config.compression import CompressionSpec
from fedray.config.data import DataSpec
from fedray.config.model import ModelSpec
from fedray.config.peers import PeersSpec
from fedray.config.personalization import PersonalizationSpec
from fedray.config.privacy import PrivacySpec
from fedray.config.resources import ResourcesSpec
from fedray.config.secure import SecureSpec
from fedray.config.strategy import ASYNC_STRATEGIES, FedAvg, StrategySpec
from fedray.config.topology import NetworkSpec, TopologySpec


MAX_ROUNDS = 1_000_000


class LocalSpec(Section):
    """Local training per device and round: ``epochs`` passes, or exactly ``steps`` mini-batches."""

    epochs: PositiveInt | None = 1
    steps: PositiveInt | None = None
    batch_size: PositiveInt = 32
    optimizer: Literal["sgd", "adam"] = "sgd"
    lr: PositiveFloat = 0.05
    momentum: Annotated[float, Field(ge=0, lt=1)] = 0.0
    weight_decay: Annotated[float, Field(ge=0)] = 0.0
    mixed_precision: bool = Field(False, description="local training's forward pass in bfloat16 (torch.autocast), "
                                                     "for GPUs that have it; updates stay float32")

    @model_validator(mode="after")
    def _check(self) -> LocalSpec:
        if self.steps is not None:
            if "epochs" in self.model_fields_set and self.epochs is not None:
                raise ValueError("give devices.local.epochs or devices.local.steps, not both")
            object.__setattr__(self, "epochs", None)
        elif self.epochs is None:
            raise ValueError("give devices.local.epochs or devices.local.steps")
        if self.momentum and self.optimizer != "sgd":
            raise ValueError("devices.local.momentum applies only to optimizer 'sgd'")
        return self


class _Speed(Section):
    step_seconds: PositiveFloat | None = Field(None, description="a full-speed device's time per local step; "
                                                                 "default: the simulating machine's own time")


class SlowFraction(_Speed):
    """A ``fraction`` of the devices (chosen from the seed) train ``slowdown`` times slower."""

    kind: Literal["slow_fraction"]
    fraction: Annotated[float, Field(gt=0, le=1)] = 0.3
    slowdown: Annotated[float, Field(ge=1)] = 5.0


class LogNormalSpeed(_Speed):
    """Each device's slowdown is ``exp(sigma * (z - min z))`` for standard normal ``z`` drawn from
    the seed: log-normal spread, the fastest device at full speed."""

    kind: Literal["lognormal"]
    sigma: PositiveFloat = 0.5


SpeedSpec = Annotated[SlowFraction | LogNormalSpeed, Field(discriminator="kind")]


class DevicesSpec(Section):
    count: PositiveInt = 10
    per_round: PositiveInt = 10
    mode: Literal["simulation", "deployment"] = "simulation"
    workers: PositiveInt | None = Field(None, description="simulation: actors hosting devices; default one per CPU")
    scale_up: bool = Field(False, description="ask the cluster's autoscaler for `workers` one-CPU workers and train "
                                              "on those already up while the rest join")
    local: LocalSpec = LocalSpec()
    resources: ResourcesSpec = ResourcesSpec()
    speed: SpeedSpec | None = Field(None, description="how long devices take: a device answers no sooner "
                                                      "than slowdown x (step_seconds x steps, or its compute time)")
    partial_work: Fraction = Field(0.0, description="chance that a device, in a round, takes only a uniformly "
                                                    "random number of its planned local steps (at least one)")
    min_completion: Annotated[float, Field(gt=0, le=1)] = 0.5
    deadline_s: PositiveFloat | None = Field(None, description="synchronous rounds: updates not in by then are late")
    late: Literal["drop", "next_round"] = Field("drop", description="late updates are dropped, or accepted "
                                                                     "into the round they arrive in")
    timeout_s: Annotated[float, Field(gt=0, le=86_400)] = 300.0
    attributes: dict[str, list[str | int]] = Field({}, description="named per-device values (one per device), "
                                                                    "e.g. a region for topology.assign 'attribute'")

    @model_validator(mode="after")
    def _check(self) -> DevicesSpec:
        for name, values in self.attributes.items():
            if len(values) != self.count:
                raise ValueError(f"devices.attributes.{name} has {len(values)} values for {self.count} devices")
        if self.per_round > self.count:
            raise ValueError(f"devices.per_round ({self.per_round}) exceeds devices.count ({self.count})")
        if self.mode == "deployment" and self.workers is not None:
            raise ValueError("devices.workers applies only to mode 'simulation' (deployment runs one actor per device)")
        if self.scale_up and self.workers is None:
            raise ValueError("devices.scale_up asks the autoscaler for devices.workers one-CPU workers: set "
                             "devices.workers (simulation mode)")
        if self.deadline_s is not None and self.deadline_s >= self.timeout_s:
            raise ValueError(f"devices.deadline_s ({self.deadline_s:g}) must be below devices.timeout_s "
                             f"({self.timeout_s:g}), after which a device counts as hung")
        if self.late == "next_round" and self.deadline_s is None:
            raise ValueError("devices.late 'next_round' needs devices.deadline_s (without a deadline nothing is late)")
        return self

    @property
    def round_wait_s(self) -> float:
        """How long a synchronous round waits for its devices: the deadline, else the timeout."""
        return self.deadline_s or self.timeout_s


class AttackSpec(Section):
    """Adversarial devices, to measure robustness: a ``fraction`` of devices (chosen from the seed)
    send ``-scale * delta`` (sign_flip), ``scale * delta`` (scaling), Gaussian noise of ``std``
    (gaussian), or train on flipped labels ``classes - 1 - y`` (label_flip)."""

    fraction: Annotated[float, Field(gt=0, lt=1)]
    kind: Literal["sign_flip", "scaling", "gaussian", "label_flip"] = "sign_flip"
    scale: PositiveFloat = 1.0
    std: PositiveFloat = 1.0


class EvaluationSpec(Section):
    every: PositiveInt = Field(1, description="evaluate the global model every this many rounds (and the last)")
    federated: bool = Field(False, description="also evaluate on the sampled devices' local test splits")
    num_gpus: Annotated[float, Field(ge=0, le=1)] = Field(0.0, description=(
        "a GPU (or a share of one) for the driver, which then evaluates the held-out set itself, on it, instead "
        "of on the device workers; the node the run starts on must have one"))


class TrackingSpec(Section):
    experiment: Annotated[str, Field(max_length=500), NotBlank] = "fedray"  # MLflow's limit
    log_model: bool = True
    register_: Annotated[str, Field(max_length=250), NotBlank] | None = Field(
        None, alias="register", description="register the final model under this name in the MLflow model registry")
    export: Literal["onnx"] | None = Field(None, description="also export the final model for devices (checked "
                                                             "with ONNX Runtime) and log it to the run")
    wait_s: PositiveFloat = Field(60.0, description="how long the end of a run waits for a tracking store in trouble; "
                                                    "what it has not taken by then stays in the run's journal")


class CheckpointSpec(Section):
    path: Annotated[str, NotBlank] = Field("fedray-checkpoints", description=(
        "where checkpoints go, in a folder per run: a local directory (relative to the working directory) or "
        "a URI pyarrow.fs or fsspec understands (s3://bucket/runs)"))
    every: Annotated[int, Field(gt=0)] = Field(1, description="checkpoint after every this many rounds (and the last)")


class JobSpec(Section):
    name: Annotated[str, Field(max_length=250), NotBlank]  # the MLflow run's name
    seed: Annotated[int, Field(ge=0, lt=2**64)] = 0  # torch's generators take 64 bits
    rounds: Annotated[int, Field(gt=0, le=MAX_ROUNDS)]
    data: DataSpec
    model: ModelSpec
    devices: DevicesSpec = DevicesSpec()
    strategy: StrategySpec = FedAvg()
    evaluation: EvaluationSpec = EvaluationSpec()
    tracking: TrackingSpec = TrackingSpec()
    checkpoint: CheckpointSpec | None = None
    attack: AttackSpec | None = None
    topology: TopologySpec | None = None
    network: NetworkSpec | None = None
    privacy: PrivacySpec | None = None
    secure: SecureSpec | None = None
    peers: PeersSpec | None = None
    personalization: PersonalizationSpec | None = None
    compression: CompressionSpec | None = None

    @model_validator(mode="before")
    @classmethod
    def _default_tags(cls, data: Any) -> Any:
        """``strategy.name`` defaults to fedavg, ``secure.scheme`` to ckks and, with ``peers``,
        ``devices.per_round`` to ``devices.count``."""
        for section, tag, default in (("strategy", "name", "fedavg"), ("secure", "scheme", "ckks")):
            if isinstance(data, dict) and isinstance(data.get(section), dict) and tag not in data[section]:
                data = {**data, section: {tag: default, **data[section]}}
        devices = data.get("devices", {}) if isinstance(data, dict) else None
        if isinstance(data, dict) and data.get("peers") is not None and isinstance(devices, dict) \
                and "per_round" not in devices and isinstance(devices.get("count", 10), int):
            data = {**data, "devices": {**devices, "per_round": devices.get("count", 10)}}  # every agent, every round
        return data

    @model_validator(mode="after")
    def _check(self) -> JobSpec:
        known_flat = self.data.dataset in ("breast_cancer", "csv") or (
            self.data.dataset == "synthetic" and len(self.data.synthetic.shape) != 3)
        if self.strategy.name in ("krum", "multi_krum"):
            # every completed round must have enough updates for Krum
            n, f = quorum(self.devices.min_completion, self.devices.per_round), self.strategy.byzantine
            n = -(-n // self.strategy.bucket_size)
            if n <= 2 * f + 2:
                raise ValueError(f"strategy {self.strategy.name} with byzantine={f} needs more than 2f + 2 = "
                                 f"{2 * f + 2} updates (or buckets) per round, but a round may complete with {n} "
                                 "(devices.per_round x devices.min_completion / strategy.bucket_size)")
            if self.strategy.selected is not None and self.strategy.selected > n - f:
                raise ValueError(f"strategy.selected ({self.strategy.selected}) exceeds n - f = {n - f} "
                                 "for the smallest round that completes")
        if self.strategy.name in ASYNC_STRATEGIES:
            if self.devices.deadline_s is not None:
                raise ValueError(f"devices.deadline_s applies to synchronous rounds; strategy {self.strategy.name} "
                                 "never waits for a round (use strategy.max_staleness to drop old updates)")
            if (self.strategy.concurrency or 0) > self.devices.count:
                raise ValueError(f"strategy.concurrency ({self.strategy.concurrency}) exceeds devices.count "
                                 f"({self.devices.count})")
        if self.strategy.name == "scaffold" and self.devices.local.optimizer != "sgd":
            raise ValueError("strategy scaffold corrects SGD steps; it needs devices.local.optimizer 'sgd'")
        if self.strategy.name == "fednova" and self.devices.local.optimizer != "sgd":
            raise ValueError("strategy fednova normalizes SGD steps; it needs devices.local.optimizer 'sgd'")
        if self.peers is not None:
            peers.check(self)
        if self.personalization is not None:
            personalization.check(self)
        model.check(self)
        resources.check(self)
        if (self.tracking.register_ or self.tracking.export) and not self.tracking.log_model:
            raise ValueError("tracking.register and tracking.export need the final model: tracking.log_model true")
        if self.peers is not None and (self.tracking.register_ or self.tracking.export):
            raise ValueError("tracking.register and tracking.export apply to a global model; peers keep their own")
        if self.topology is not None:
            topology.check(self)
        if self.privacy is not None:
            privacy.check(self)
        if self.secure is not None:
            secure.check(self)
        if self.compression is not None:
            compression.check(self)
        for spec in [self.model, *(self.peers.models if self.peers else [])]:
            if spec.name in ("cnn", "small_cnn") and known_flat:
                raise ValueError(f"model.name {spec.name!r} needs image input (channels, height, width); "
                                 f"dataset {self.data.dataset!r} is not shaped so")
        return self

    def flat(self) -> dict[str, str]:
        """The spec as dotted keys and string values, for MLflow params."""
        out: dict[str, str] = {}

        def walk(prefix: str, value: Any) -> None:
            if isinstance(value, dict) and value:
                for k, v in value.items():
                    walk(f"{prefix}.{k}" if prefix else k, v)
            else:
                out[prefix] = str(value)

        walk("", self.model_dump(by_alias=True))
        return out


class _StrictLoader(yaml.SafeLoader):
    """YAML's safe loader, refusing a key given twice in one mapping (YAML keeps the last silently)
    and reading ``1e-5`` as a number, as YAML 1.2 does (PyYAML's 1.1 rules need ``1.0e-5``)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: set = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key!r}", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep)


_StrictLoader.add_implicit_resolver("tag:yaml.org,2002:float", re.compile(r"^[-+]?([0-9]+(\.[0-9]*)?|\.[0-9]+)[eE][-+]?[0-9]+$"),
                                    list("-+.0123456789"))


def _first_line(error: yaml.YAMLError) -> str:
    """A YAML error in one line: what is wrong and where."""
    mark = getattr(error, "problem_mark", None)
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    return f"{getattr(error, 'problem', None) or error}{where}"


def parse_job(raw: Any, overrides: list[str] = ()) -> JobSpec:
    """Validate a job mapping after applying ``key.path=value`` overrides (values parsed as YAML)."""
    if not isinstance(raw, dict):
        raise JobError(f"a job file must be a YAML mapping, got {type(raw).__name__}")
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise JobError(f"override {item!r} is not of the form section.field=value")
        node = raw
        *parents, leaf = key.split(".")
        for i, part in enumerate(parents):
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise JobError(f"override {item!r}: {'.'.join(parents[:i + 1])} is not a section")
        try:
            node[leaf] = yaml.load(value, _StrictLoader)
        except yaml.YAMLError as e:
            raise JobError(f"override {item!r}: the value is not YAML ({_first_line(e)})") from None
    try:
        return JobSpec.model_validate(raw)
    except ValidationError as e:
        raise JobError(format_errors(e)) from None


def load_job(path: str | Path, overrides: list[str] = ()) -> JobSpec:
    """Read and validate a job YAML file. Raises JobError naming the file and each bad field."""
    path = Path(path)
    try:
        raw = yaml.load(path.read_bytes().decode("utf-8"), _StrictLoader)
    except OSError as e:
        raise JobError(f"cannot read job file {path}: {e.strerror}") from None
    except UnicodeDecodeError as e:
        raise JobError(f"{path} is not UTF-8 text: byte {e.object[e.start]:#04x} at offset {e.start}") from None
    except yaml.YAMLError as e:
        raise JobError(f"{path} is not valid YAML: {_first_line(e)}") from None
    try:
        return parse_job(raw, overrides)
    except JobError as e:
        raise JobError(f"{path}: {e}") from None


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else f"{text[:37]}..."


_BOUNDS = {"greater_than": "gt", "greater_than_equal": "ge", "less_than": "lt", "less_than_equal": "le"}
_TAGGED = frozenset({"strategy", "partition", "speed", "placement", "privacy", "secure", "graph"})


def format_errors(error: ValidationError) -> str:
    lines = []
    for err in error.errors():
        # pydantic puts the union member's tag after a tagged section (strategy.fedavg.server_lr);
        # users wrote strategy.server_lr
        parts = [p for i, p in enumerate(err["loc"]) if i == 0 or err["loc"][i - 1] not in _TAGGED]
        loc = ".".join(str(p) for p in parts) or "job"
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] in _BOUNDS and isinstance(limit := err["ctx"][_BOUNDS[err["type"]]], float):
            msg = f"{msg.rsplit(' ', 1)[0]} {limit:g}"  # 1e-12, not 0.000000000001
        if err["type"].endswith("_type"):
            msg += f", got {_short(err['input'])}"
        if err["type"] == "extra_forbidden":
            msg = "unknown field"
        lines.append(f"{loc}: {msg}")
    return f"invalid job: {lines[0]}" if len(lines) == 1 else "invalid job:\n  " + "\n  ".join(lines)
