from pathlib import Path

import pytest
from click.testing import CliRunner

from fedray.cli import main
from fedray.config import JobError, load_job, parse_job

from conftest import small_job


def errors(raw, overrides=()):
    with pytest.raises(JobError) as info:
        parse_job(raw, list(overrides))
    return str(info.value)


def test_valid_job_gets_defaults():
    job = parse_job(small_job())
    assert job.strategy.name == "fedavg" and job.strategy.server_lr == 1.0
    assert job.devices.min_completion == 0.5
    assert job.data.partition.kind == "iid"


def test_unknown_field_is_named():
    msg = errors(small_job(devices__local__learning_rate=0.1))
    assert "devices.local.learning_rate: unknown field" in msg


def test_misspelt_top_level_section_is_named():
    raw = small_job()
    raw["strategie"] = {"name": "fedavg"}
    assert "strategie: unknown field" in errors(raw)


def test_wrong_type_and_range_are_named():
    msg = errors(small_job(rounds="many", devices__local__lr=-1))
    assert "rounds:" in msg and "devices.local.lr:" in msg and "greater than 0" in msg


def test_partition_fields_are_checked_per_kind():
    msg = errors(small_job(data__partition={"kind": "iid", "alpha": 0.3}))
    assert "data.partition.alpha: unknown field" in msg
    msg = errors(small_job(data__partition={"kind": "zipf"}))
    assert "data.partition" in msg and "'iid', 'dirichlet', 'shards', 'quantity_skew'" in msg


@pytest.mark.parametrize("overrides, needle", [
    ({"devices__per_round": 9}, "devices.per_round (9) exceeds devices.count (6)"),
    ({"model": {"name": "cnn", "class": "x:Y"}}, "exactly one of model.name"),
    ({"model": {"name": "cnn"}, "data": {"dataset": "breast_cancer"}}, "needs image input"),
    ({"data": {"dataset": "npz"}}, "data.path is required"),
    ({"devices__local": {"epochs": 2, "steps": 10}}, "not both"),
    ({"devices__local": {"optimizer": "adam", "momentum": 0.9}}, "momentum applies only"),
    ({"devices__mode": "deployment"}, "devices.workers applies only"),
    ({"devices__workers": None, "devices__scale_up": True}, "devices.scale_up asks the autoscaler"),
    ({"data": {"dataset": "synthetic", "synthetic": {"per_device": 10},
               "partition": {"kind": "shards", "labels_per_device": 2}}}, "take 'iid' or 'dirichlet'"),
    ({"model": {"name": "cnn"}, "data": {"dataset": "csv", "path": "x.csv"}}, "needs image input"),
    ({"model": {"name": "mlp", "kwargs": {"width": 3}}}, "model.kwargs for 'mlp'"),
    ({"model": {"name": "logreg", "kwargs": {"hidden": [3]}}}, "it takes none"),
    ({"strategy": {"name": "fednova"}, "devices__local": {"optimizer": "adam"}}, "fednova normalizes SGD"),
    ({"strategy": {"name": "fedadam", "beta2": 1.0}}, "strategy.beta2: Input should be less than 1"),
    ({"strategy": {"name": "fedprox", "mu": 0}}, "strategy.mu: Input should be greater than 0"),
    ({"strategy": {"name": "fedavg", "mu": 0.1}}, "strategy.mu: unknown field"),
    ({"strategy": {"name": "fedsgd"}}, "does not match any of the expected tags"),
    ({"strategy": {"name": "krum", "byzantine": 1}, "devices__per_round": 6}, "needs more than 2f + 2 = 4 updates"),
    ({"strategy": {"name": "multi_krum", "byzantine": 0, "selected": 5}, "devices__min_completion": 1.0},
     "strategy.selected (5) exceeds n - f = 4"),
    ({"strategy": {"name": "trimmed_mean", "beta": 0.5}}, "strategy.beta: Input should be less than 0.5"),
    ({"strategy": {"name": "multi_krum", "byzantine": 2, "bucket_size": 2}, "devices__count": 10,
      "devices__per_round": 10, "devices__min_completion": 1.0}, "but a round may complete with 5"),
    ({"strategy": {"name": "fedavg", "bucket_size": 2}}, "strategy.bucket_size: unknown field"),
    ({"attack": {"fraction": 0.2, "kind": "poison"}}, "attack.kind"),
    ({"strategy": {"name": "fedasync", "server_lr": 0.5}}, "strategy.server_lr: unknown field"),
    ({"strategy": {"name": "fedbuff", "concurrency": 7}}, "strategy.concurrency (7) exceeds devices.count (6)"),
    ({"strategy": {"name": "fedbuff", "staleness": {"kind": "polynomial", "b": 2}}},
     "staleness b does not apply to kind 'polynomial'"),
    ({"strategy": {"name": "fedasync"}, "devices__deadline_s": 5}, "devices.deadline_s applies to synchronous rounds"),
    ({"devices__deadline_s": 300}, "devices.deadline_s (300) must be below devices.timeout_s (300)"),
    ({"devices__late": "next_round"}, "needs devices.deadline_s"),
    ({"devices__speed": {"kind": "slow_fraction", "slowdown": 0.5}}, "devices.speed.slowdown: Input should be greater"),
    ({"devices__speed": {"kind": "lognormal", "fraction": 0.5}}, "devices.speed.fraction: unknown field"),
    ({"devices__partial_work": 1.0}, "devices.partial_work: Input should be less than 1"),
    ({"attack": {"kind": "sign_flip"}}, "attack.fraction: Field required"),
    ({"topology": {"edges": 2, "edge_rounds": 2}, "strategy": {"name": "fedbuff"}}, "strategy fedbuff folds each"),
    ({"topology": {"edges": 2}, "strategy": {"name": "median"}}, "strategy median is not linear"),
    ({"topology": {"edges": 7}}, "topology.edges (7) exceeds devices.count (6)"),
    ({"topology": {"edges": 2, "edge_rounds": 2}, "strategy": {"name": "scaffold"}}, "strategy scaffold needs each"),
    ({"topology": {"edges": 2, "edge_rounds": 2}, "devices__deadline_s": 5, "devices__late": "next_round"},
     "devices.late 'next_round' does not apply"),
    ({"topology": {"edges": 2, "assign": "attribute"}}, "topology.attribute is needed"),
    ({"topology": {"edges": 2, "attribute": "region"}}, "applies only to, topology.assign 'attribute'"),
    ({"topology": {"edges": 2, "assign": "attribute", "attribute": "region"}},
     "topology.attribute 'region' is not in devices.attributes (has: none)"),
    ({"topology": {"edges": 3, "assign": "attribute", "attribute": "region"},
      "devices__attributes": {"region": ["a", "b"] * 3}}, "has 2 distinct values but topology.edges is 3"),
    ({"devices__attributes": {"region": ["a", "b"]}}, "devices.attributes.region has 2 values for 6 devices"),
    ({"topology": {"edges": 2, "assign": "colocated", "placement": {"kind": "resource"}}}, "takes no topology.placement"),
    ({"topology": {"edges": 2, "assign": "colocated"}, "devices__workers": 2, "devices__scale_up": True},
     "devices.scale_up starts training before every worker is up"),
    ({"topology": {"edges": 2, "placement": {"kind": "label", "values": ["eu"]}}}, "1 labels for 2 edges"),
    ({"topology": {"edges": 2, "placement": {"kind": "resource", "name": "edge"}}}, "must contain '{edge}'"),
    ({"topology": {"edges": 2, "placement": {"kind": "zone"}}}, "topology.placement: Input tag 'zone'"),
    ({"network": {"device_edge": {"bandwidth_mbps": 0}, "edge_cloud": {"bandwidth_mbps": 1}}},
     "network.device_edge.bandwidth_mbps: Input should be greater than 0"),
    ({"privacy": {"level": "client"}, "strategy": {"name": "median"}}, "strategy median is not a sum"),
    ({"privacy": {"level": "client"}, "strategy": {"name": "fedbuff"}}, "strategy fedbuff has no rounds"),
    ({"privacy": {"level": "client"}, "strategy": {"name": "scaffold"}}, "strategy scaffold uses per-device control"),
    ({"privacy": {"level": "client"}, "strategy": {"name": "fednova"}}, "strategy fednova uses per-device step"),
    ({"privacy": {"level": "client"}, "strategy": {"name": "fedavg", "norm_bound": 2}}, "already clips"),
    ({"privacy": {"level": "client"}, "devices__deadline_s": 5, "devices__late": "next_round"},
     "outside their round's sample"),
    ({"privacy": {"level": "client"}, "topology": {"edges": 2, "edge_rounds": 2}}, "the accountant counts one"),
    ({"privacy": {"level": "client", "min_participants": 2}}, "applies to mode 'distributed'"),
    ({"privacy": {"level": "client", "mode": "distributed", "min_participants": 7}, "secure": {"scheme": "ckks"}},
     "privacy.min_participants (7) exceeds devices.count (6)"),
    ({"privacy": {"level": "client", "mode": "distributed"}}, "add a secure section"),
    ({"privacy": {"level": "client"}, "evaluation": {"federated": True}}, "evaluation.federated: each device's"),
    ({"privacy": {"level": "sample", "noise_multiplier": 1}, "evaluation": {"federated": True}},
     "outside what privacy.level sample accounts"),
    ({"privacy": {"level": "sample", "target_epsilon": 3}, "strategy": {"name": "fedbuff"}},
     "may train any number of times"),
    ({"privacy": {"level": "client", "delta": 0}}, "privacy.delta: Input should be greater than or equal to 1e-12"),
    ({"privacy": {"level": "client", "accountant": "gdp"}}, "privacy.accountant: Input should be 'rdp' or 'prv'"),
    ({"privacy": {"level": "client", "budget": {"epsilon": -1}}}, "privacy.budget.epsilon: Input should be greater"),
    ({"privacy": {"level": "client", "clip_norm": 1}}, "privacy.clip_norm: unknown field"),
    ({"privacy": {"level": "sample"}}, "exactly one of noise_multiplier and target_epsilon"),
    ({"privacy": {"level": "sample", "noise_multiplier": 1, "target_epsilon": 3}}, "exactly one of"),
    ({"privacy": {"level": "sample", "noise_multiplier": 1, "clip": 1}}, "privacy.clip: unknown field"),
    ({"privacy": {"level": "local"}}, "privacy: Input tag 'local'"),
])
def test_impossible_combinations(overrides, needle):
    assert needle in errors(small_job(**overrides))


@pytest.mark.parametrize("override, field", [
    ("devices.timeout_s=.inf", "devices.timeout_s"),
    ("strategy.server_lr=.nan", "strategy.server_lr"),
    ("seed=-1", "seed"),
])
def test_non_finite_and_negative_values_are_named(override, field):
    assert f"{field}:" in errors(small_job(), [override])


def test_overrides_apply_and_parse_values():
    job = parse_job(small_job(), ["strategy.server_lr=0.5", "rounds=7", "devices.local.epochs=null", "devices.local.steps=3"])
    assert job.strategy.server_lr == 0.5 and job.rounds == 7
    assert job.devices.local.steps == 3 and job.devices.local.epochs is None


def test_bad_override_is_named():
    assert "not of the form" in errors(small_job(), ["rounds"])
    assert "rounds: unknown field" not in errors(small_job(), ["rounds.x=1"])  # rounds is not a section
    assert "rounds is not a section" in errors(small_job(), ["rounds.x=1"])


def test_flat_params_use_dotted_names():
    flat = parse_job(small_job()).flat()
    assert flat["devices.local.lr"] == "0.1" and flat["model.name"] == "logreg"


def test_load_job_names_the_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("name: x\nrounds: [\n")
    with pytest.raises(JobError, match="bad.yaml is not valid YAML"):
        load_job(path)
    path.write_text("- a\n- b\n")
    with pytest.raises(JobError, match="must be a YAML mapping"):
        load_job(path)
    with pytest.raises(JobError, match="cannot read job file"):
        load_job(tmp_path / "missing.yaml")


def test_shipped_jobs_are_valid():
    from pathlib import Path

    jobs = sorted(Path(__file__).parent.parent.joinpath("jobs").glob("*.yaml"))
    assert len(jobs) >= 3
    for path in jobs:
        load_job(path)


def test_cli_validate(tmp_path):
    runner = CliRunner()
    ok = runner.invoke(main, ["validate", "jobs/quickstart.yaml", "--set", "rounds=3"])
    assert ok.exit_code == 0 and "3 rounds" in ok.output
    bad = runner.invoke(main, ["validate", "jobs/quickstart.yaml", "--set", "devices.per_round=0"])
    assert bad.exit_code != 0 and "devices.per_round" in bad.output


def test_every_package_directory_is_a_regular_package():
    # setuptools' find_packages only ships directories with an __init__.py
    from pathlib import Path

    root = Path(__file__).parent.parent / "fedray"
    for directory in [root, *(p for p in root.rglob("*") if p.is_dir() and p.name != "__pycache__")]:
        assert (directory / "__init__.py").exists(), f"{directory} lacks __init__.py"


NAMES = ["fedavg", "fedavgm", "fedprox", "fednova", "scaffold", "fedadam", "fedyogi", "fedadagrad", "fedasync", "fedbuff",
         "median", "trimmed_mean", "krum", "multi_krum"]


@pytest.mark.parametrize("name", NAMES)
def test_every_strategy_name_works_with_its_defaults(name):
    # Krum needs more than 2f + 2 updates in any round that completes: 10 x 0.5 > 4
    raw = small_job(devices__count=10, devices__per_round=10, evaluation={"federated": True})
    job = parse_job(raw, [f"strategy.name={name}"])
    assert job.strategy.name == name
    shipped = Path(__file__).parent.parent / "jobs" / "mnist_noniid.yaml"
    assert load_job(shipped, [f"strategy.name={name}"]).strategy.name == name


def test_two_edges_apply_to_every_shipped_job():
    for path in sorted((Path(__file__).parent.parent / "jobs").glob("*.yaml")):
        if "peers" in load_job(path).model_fields_set:  # agents exchange directly: refused, with the reason
            with pytest.raises(JobError, match="topology does not apply to peers"):
                load_job(path, ["topology.edges=2"])
            continue
        job = load_job(path, ["topology.edges=2"])
        assert job.topology.edges == 2 and job.topology.assign == "round_robin"


def test_config_is_a_leaf_and_the_math_imports_without_ray_or_mlflow():
    """Validating a job imports nothing beyond fedray.config (no torch, Ray, MLflow or crypto); the
    math modules import without Ray or MLflow."""
    import subprocess
    import sys

    job = small_job(strategy={"name": "fedbuff", "staleness": {"kind": "constant"}}, secure={"min_clients": 2},
                    privacy={"level": "sample", "noise_multiplier": 1.0})
    check = f"""
import sys
from fedray.config import parse_job
parse_job({job!r})
parse_job({small_job(strategy={"name": "krum", "byzantine": 1}, devices__count=8, devices__per_round=8, devices__min_completion=1.0)!r})
parse_job({small_job(devices__per_round=6, peers={"exchange": "distill", "graph": {"kind": "small_world"}, "models": [{"name": "mlp"}]})!r})
parse_job({small_job(model={"name": "mlp", "start": "models:/m/1", "replace": ["3"], "train": ["3"], "unfreeze": {2: ["1"]}}, data={"dataset": "digits", "resize": [4, 4]}, personalization=None, tracking={"register": "m", "export": "onnx"})!r})
parse_job({small_job(personalization={"method": "fedrep", "export": [1]})!r})
outside = sorted(m for m in sys.modules if m.startswith(("fedray.", "torch", "ray", "mlflow", "tenseal", "opacus"))
                 and not m.startswith("fedray.config"))
assert not outside, outside
import fedray.platform.strategies, fedray.platform.aggregation, fedray.platform.privacy, fedray.platform.robust
import fedray.agents.privacy, fedray.agents.state, fedray.agents.graphs, fedray.agents.peer, fedray.secure.packing, fedray.data.partition, fedray.data.devices, fedray.update
import fedray.transfer.layout, fedray.transfer.personal, fedray.transfer.weights
assert not [m for m in ("ray", "mlflow") if m in sys.modules]
"""
    result = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
