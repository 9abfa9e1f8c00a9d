"""cluster.yaml is a valid `ray up` config, checked the way `ray up` checks it, and says what we mean:
the repo is installed on every node, MLflow and the dashboard listen on loopback only, jobs log to
the head's MLflow server, token authentication stays on."""

from __future__ import annotations

import copy
import re
import tomllib
from importlib.metadata import version
from pathlib import Path

import jsonschema
import pytest
import ray
import yaml
from packaging.specifiers import SpecifierSet
from packaging.version import Version
from ray.autoscaler._private.util import prepare_config, validate_config

REPO = Path(__file__).resolve().parents[1]
CLUSTER_YAML = REPO / "cluster.yaml"


@pytest.fixture
def config() -> dict:
    return yaml.safe_load(CLUSTER_YAML.read_text())


def check(config: dict) -> dict:
    """What `ray up` does before it talks to the cloud: merge the provider's defaults, then validate
    against Ray's own schema (ray/autoscaler/ray-schema.json) and its cross-field rules."""
    prepared = prepare_config(copy.deepcopy(config))
    validate_config(prepared)
    return prepared


def commands(config: dict, key: str) -> str:
    return "\n".join(config.get(key, []))


def test_cluster_yaml_passes_rays_validation(config):
    prepared = check(config)
    assert prepared["provider"]["type"] == "aws"
    assert prepared["head_node_type"] in prepared["available_node_types"]


@pytest.mark.parametrize("breakage", [
    pytest.param(lambda c: c.update(max_worker_nodes=4), id="unknown-top-level-key"),
    pytest.param(lambda c: c.update(max_workers="8"), id="max_workers-not-an-integer"),
    pytest.param(lambda c: c["docker"].update(imag="rayproject/ray"), id="unknown-docker-key"),
    pytest.param(lambda c: c["available_node_types"]["cpu_worker"].pop("node_config"), id="node-type-without-node_config"),
])
def test_validation_rejects_a_broken_copy(config, breakage):
    broken = copy.deepcopy(config)
    breakage(broken)
    with pytest.raises(jsonschema.ValidationError):
        check(broken)


def test_head_type_must_exist(config):
    broken = copy.deepcopy(config)
    broken["head_node_type"] = "no-such-type"
    with pytest.raises(ValueError, match="head_node_type"):
        check(broken)


def test_workers_autoscale_from_zero(config):
    workers = {name: t for name, t in config["available_node_types"].items() if name != config["head_node_type"]}
    assert workers
    for t in workers.values():
        assert t["min_workers"] == 0
        assert 1 <= t["max_workers"] <= config["max_workers"]


def test_setup_installs_cpu_torch_then_the_synced_repo(config):
    assert config["file_mounts"]["~/fedray"] == "."
    setup = config["setup_commands"]
    torch_at = next(i for i, c in enumerate(setup) if re.search(r"pip install .*torch==", c))
    fedray_at = next(i for i, c in enumerate(setup) if re.search(r"pip install .*-e ~/fedray\b", c))
    assert torch_at < fedray_at
    assert "download.pytorch.org/whl/cpu" in setup[torch_at]
    # the pinned torch satisfies the package's own requirement
    pin = Version(re.search(r"torch==([\w.]+)", setup[torch_at]).group(1))
    requires = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    torch_spec = next(r for r in requires if re.match(r"torch\b", r))
    assert pin in SpecifierSet(torch_spec.removeprefix("torch")), (pin, torch_spec)
    assert pin.release[:2] == Version(version("torch")).release[:2]
    # the virtualenvs, local MLflow stores and git history are not synced to the nodes
    for pattern in (".venv", ".venv-*", "*.db", "**/.git"):
        assert pattern in config["rsync_exclude"]


def test_cluster_runs_this_ray_and_python(config):
    # `ray up` and `ray job submit` need the cluster on the same Ray version as this machine
    image = config["docker"]["image"]
    m = re.fullmatch(r"rayproject/ray:(?P<ray>[\d.]+)-py(?P<py>\d)(?P<minor>\d+)-cpu", image)
    assert m, image
    assert m["ray"] == ray.__version__
    requires_python = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["requires-python"]
    assert Version(f"{m['py']}.{m['minor']}") in SpecifierSet(requires_python)


def test_mlflow_server_on_head_bound_to_loopback(config):
    start = commands(config, "head_start_ray_commands")
    server = re.search(r"mlflow server (.*?)>", start, re.S)
    assert server, start
    args = server.group(1).split()
    assert args[args.index("--host") + 1] == "127.0.0.1"
    assert args[args.index("--port") + 1] == "5000"
    assert args[args.index("--backend-store-uri") + 1].startswith("sqlite:////")  # absolute
    assert "--artifacts-destination" in args
    # started before Ray, and jobs' drivers (on the head) inherit where to log
    ray_start = next(c for c in config["head_start_ray_commands"] if "ray start --head" in c)
    assert start.index("mlflow server") < start.index("ray start --head")
    assert "MLFLOW_TRACKING_URI=http://127.0.0.1:5000" in ray_start
    assert "--dashboard-host=127.0.0.1" in ray_start
    assert "--autoscaling-config=~/ray_bootstrap_config.yaml" in ray_start
    assert "0.0.0.0" not in CLUSTER_YAML.read_text()


def test_token_auth_on_every_node(config):
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        ray_start = next(c for c in config[key] if "ray start" in c)
        assert "RAY_AUTH_MODE=token" in ray_start, key
    # the one token is synced from the launching machine, never written into this file
    assert config["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"
    text = CLUSTER_YAML.read_text()
    assert "RAY_AUTH_TOKEN=" not in text
    assert not re.search(r"AKIA[0-9A-Z]{16}|aws_secret_access_key|BEGIN .*PRIVATE KEY", text, re.I)


def test_gpu_workers_get_the_gpu_image_and_the_cuda_build_of_torch(config):
    gpu = check(config)["available_node_types"]["gpu_worker"]
    assert gpu["docker"]["worker_image"].endswith("-gpu") and gpu["min_workers"] == 0
    # the setup every node runs installs the CPU build; these nodes swap it for PyPI's CUDA one
    assert "download.pytorch.org/whl/cpu" in commands(config, "setup_commands")
    assert re.search(r"pip uninstall -y torch && pip install .*torch==[0-9.]+\"", commands(gpu, "worker_setup_commands"))
