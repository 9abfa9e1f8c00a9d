"""``fedray init``: the choice of techniques as a decision tree, asked interactively (or given as
flags, for scripts), written as a commented job file that ``fedray run`` accepts.

The tree: sensitive data is protected by encryption when it is financial or medical (the
aggregators see only ciphertexts) and by client-level differential privacy otherwise (the model
reveals little about any one device); devices whose data differ in size or kind are averaged by
FedNova rather than FedAvg; limited bandwidth calls for compressed updates and asynchronous
aggregation; a new domain starts from a pretrained model and trains its head. Where two choices
do not combine, the file says which one gave way, and why.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import click
import yaml

SENSITIVE = ("none", "finance", "medical", "general")
DATASETS = ("mnist", "digits", "breast_cancer")


@dataclass
class Choices:
    name: str
    dataset: str
    sensitive: str  # one of SENSITIVE
    balanced: bool
    limited_bandwidth: bool
    new_domain: bool
    start: str = "models:/mnist-cnn/latest"
    devices: int = 100
    per_round: int = 10
    rounds: int = 50


@dataclass
class Draft:
    """The job as sections (each a mapping) with the comment that explains it."""

    sections: dict[str, object] = field(default_factory=dict)
    notes: dict[str, list[str]] = field(default_factory=dict)

    def set(self, key: str, value: object, *why: str) -> None:
        self.sections[key] = value
        self.notes.setdefault(key, []).extend(why)

    def text(self, choices: Choices) -> str:
        answers = (f"sensitive data: {choices.sensitive}; balanced across devices: {_yes(choices.balanced)}; "
                   f"bandwidth limited: {_yes(choices.limited_bandwidth)}; new domain: {_yes(choices.new_domain)}")
        lines = [f"# {choices.name}: written by `fedray init` ({answers}).",
                 "# Run it with:  fedray run <this file>    Every field is described in jobs/README.md.", ""]
        for key, value in self.sections.items():
            if self.notes.get(key) or isinstance(value, dict):
                lines.append("")
            lines += [f"# {note}" for note in self.notes.get(key, [])]
            dumped = yaml.safe_dump(value, sort_keys=False, default_flow_style=None, width=110).rstrip("\n")
            dumped = dumped.removesuffix("\n...")  # a scalar's end-of-document marker
            lines += [f"{key}:", *("  " + line for line in dumped.splitlines())] if "\n" in dumped else [f"{key}: {dumped}"]
        return "\n".join(lines) + "\n"


def _yes(flag: bool) -> str:
    return "yes" if flag else "no"


def draft(c: Choices) -> Draft:
    """The job the answers ``c`` lead to."""
    d = Draft()
    images = c.dataset != "breast_cancer"
    d.set("name", c.name)
    d.set("seed", 0)
    d.set("rounds", c.rounds)
    data: dict = {"dataset": c.dataset}
    if c.new_domain and c.dataset == "digits":
        data["resize"] = [28, 28]
    data["partition"] = {"kind": "iid"} if c.balanced else {"kind": "dirichlet", "alpha": 0.5}
    d.set("data", data, "Simulated devices: " + ("each holds a similar share of every class." if c.balanced else
          "label shares per device drawn from Dirichlet(0.5), as unbalanced real devices are."))
    model: dict = {"name": ("cnn" if c.new_domain else "small_cnn") if images else "mlp"}
    why = []
    if c.new_domain:
        head = _head(model["name"], c.dataset)
        model |= {"start": c.start, "replace": [head], "train": [head]}
        why = [f"New domain: start from the pretrained {c.start} (jobs/mnist_pretrain.yaml registers mnist-cnn),",
               f"with a new head ('{head}') that alone trains: devices send only the head's values."]
    d.set("model", model, *why)
    d.set("devices", {"count": c.devices, "per_round": c.per_round,
                      "local": {"epochs": 1, "batch_size": 32, "optimizer": "sgd", "lr": 0.05}})
    encrypt, dp = c.sensitive in ("finance", "medical"), c.sensitive == "general"
    asynchronous = c.limited_bandwidth and not dp
    if asynchronous:
        strategy = {"name": "fedbuff", "buffer_size": 5, "concurrency": c.per_round}
        d.set("strategy", strategy, "Limited bandwidth: FedBuff folds updates as they arrive, so slow links never "
              "hold a round up", "(strategy.buffer_size updates per server step).")
        if not c.balanced:
            d.notes["strategy"].append("FedNova would suit unbalanced devices, but it normalizes synchronous rounds.")
        if encrypt:
            strategy["staleness"] = {"kind": "constant"}
            d.notes["strategy"].append("Stale updates weigh as much as fresh ones: aggregators cannot weigh ciphertexts.")
    elif not c.balanced and dp:
        d.set("strategy", {"name": "fedprox", "mu": 0.01}, "Unbalanced devices: FedProx keeps each device near the "
              "global model. (FedNova would normalize", "their local steps, but client-level DP does not cover "
              "per-device step counts.)")
    elif not c.balanced:
        d.set("strategy", {"name": "fednova"}, "Unbalanced devices: FedNova normalizes each device's update by its "
              "local steps,", "so devices with more data do not pull the model their way (FedAvg would).")
    else:
        d.set("strategy", {"name": "fedavg"}, "Balanced devices: plain federated averaging (FedAvg).")
    if c.limited_bandwidth:
        chain = [{"kind": "quantize", "bits": 4}, {"kind": "entropy"}]
        if encrypt:
            d.set("compression", {"uplink": [{"kind": "quantize", "bits": 4}]},
                  "Limited bandwidth: inside the encryption each value gets 4 bits, so a slot holds twice as many",
                  "values: half the ciphertext bytes, within a point of accuracy when secure.range fits the updates",
                  "(benchmarks/compression.py --secure; clipped_fraction says when to raise it).")
        else:
            d.set("compression", {"uplink": chain, "error_feedback": True},
                  "Limited bandwidth: each update is quantized to 4 bits and entropy-coded, about 17x smaller at",
                  "no measured loss of accuracy (benchmarks/compression.py).")
        if dp:
            d.notes["compression"].append("Synchronous rounds: client-level DP accounts sampled rounds, not "
                                          "asynchronous arrivals.")
    if encrypt:
        d.set("secure", {"scheme": "ckks", "preset": "balanced", "min_clients": 3} | (
              {"range": 0.1} if c.limited_bandwidth else {}),
              f"{c.sensitive.capitalize()} data: updates are encrypted with CKKS on the device; aggregators add",
              "ciphertexts and the key authority decrypts only sums of at least min_clients devices.",
              *(["range 0.1: 4-bit values need a range near the updates' size (raise it if clipped_fraction > 0)."]
                if c.limited_bandwidth else []))
    if dp:
        d.set("privacy", {"level": "client", "mode": "central", "clip": 1.0, "noise_multiplier": 1.0, "delta": 1e-5,
                          "budget": {"epsilon": 10.0}},
              "Sensitive data: client-level differential privacy. Each update is clipped to norm 1 and the sum",
              "noised, so the model reveals little about any one device; the run stops at epsilon 10.",
              "Check the spend before running: fedray privacy plan <this file>.")
    d.set("evaluation", {"every": 1})
    d.set("tracking", {"experiment": c.name})
    return d


def _head(name: str, dataset: str) -> str:
    """The module prefix of the zoo model's last layer (its new head), for MNIST-shaped images."""
    from fedray.models.zoo import build_model
    from fedray.transfer.layout import head

    return head(build_model(name, None, {}, (1, 28, 28), 10, 0))[0].rsplit(".", 1)[0]


@click.command()
@click.option("--out", type=click.Path(dir_okay=False, writable=True), default="job.yaml", show_default=True,
              help="the job file to write")
@click.option("--name", default="my-job", show_default=True, help="the job's (and MLflow run's) name")
@click.option("--dataset", type=click.Choice(DATASETS), default="mnist", show_default=True,
              help="the data the simulated devices split")
@click.option("--sensitive", type=click.Choice(SENSITIVE), prompt="Is the data sensitive? none, or what kind: "
              "finance or medical (encryption), general (differential privacy)", help="kind of sensitive data")
@click.option("--balanced/--unbalanced", default=None, prompt="Is the data balanced across devices (similar amounts "
              "and classes)?", help="balanced: FedAvg; unbalanced: FedNova")
@click.option("--limited-bandwidth/--ample-bandwidth", default=None, prompt="Is bandwidth limited?",
              help="limited: compressed updates and asynchronous aggregation")
@click.option("--new-domain/--same-domain", default=None, prompt="Does a pretrained model need to move to a new "
              "domain?", help="new domain: transfer from a pretrained model")
@click.option("--start", default="models:/mnist-cnn/latest", show_default=True, help="new domain: the pretrained model")
@click.option("--force", is_flag=True, help="overwrite --out if it exists")
def init(out: str, name: str, dataset: str, sensitive: str, balanced: bool, limited_bandwidth: bool,
         new_domain: bool, start: str, force: bool) -> None:
    """Write a job file from a few questions about the data and the devices."""
    from fedray.config import JobError, parse_job

    path = Path(out)
    if path.exists() and not force:
        raise click.ClickException(f"{path} exists; give another --out, or --force to overwrite it")
    choices = Choices(name, dataset, sensitive, balanced, limited_bandwidth, new_domain, start)
    text = draft(choices).text(choices)
    try:
        parse_job(yaml.safe_load(text))
    except JobError as e:  # a combination the tree does not handle: a bug here, not the user's
        raise click.ClickException(f"the job these answers lead to is invalid, please report it: {e}") from None
    path.write_text(text)
    click.echo(f"wrote {path}; run it with: fedray run {path}")
