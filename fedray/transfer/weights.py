"""Starting weights: read from an MLflow model fedray logged or from a weights file, and laid onto
a freshly built model, parameter by parameter, with the mismatch named when they do not fit.

Nothing here unpickles: a logged model is read from its ``weights.safetensors`` and a torch file
with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import fnmatch
from pathlib import Path

import torch
from torch import nn

WEIGHTS = "weights.safetensors"  # in every model directory fedray logs, beside MLflow's own files


def matches(name: str, patterns: list[str]) -> bool:
    """Whether a parameter ``name`` matches a pattern: a glob (``features.*``) or a module prefix
    (``4`` matches ``4.weight``)."""
    return any(fnmatch.fnmatchcase(name, p) or name.startswith(f"{p}.") for p in patterns)


def save(model: nn.Module, path: Path) -> None:
    """Write ``model``'s state dict (parameters and buffers) to ``path`` as safetensors."""
    from safetensors.torch import save_file

    save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()}, str(path))


def load(source: str, tracking_uri: str | None = None) -> dict[str, torch.Tensor]:
    """The state dict ``source`` names: ``runs:/<run id>/<path>``, ``models:/<name>/<version>`` or
    ``models:/<name>@<alias>`` (a model fedray logged, read at ``tracking_uri``), a ``.safetensors``
    file, or a file of ``torch.save(state_dict)``. Raises ValueError naming ``source`` and why."""
    if source.startswith(("runs:/", "models:/")):
        path = _download(source, tracking_uri)
    else:
        path = Path(source)
        if not path.is_file():
            raise ValueError(f"{source}: no such file")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - a file that is not weights, reported with its reason
        raise ValueError(f"{source}: cannot read weights: {type(e).__name__}: {(str(e).splitlines() or [''])[0]}") \
            from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{source}: holds a {type(state).__name__}, not a state dict (parameter name -> tensor)")
    return state


def logged_by(uri: str, tracking_uri: str | None) -> tuple[str, str]:
    """For the MLflow model ``uri`` (``runs:/<run id>/<path>``, ``models:/<name>/<version>``,
    ``models:/<name>@<alias>`` or ``models:/<name>/latest``, looked up in the registry of
    ``tracking_uri``): (the run that logged it, the artifact URI it is stored at). Raises
    ValueError naming ``uri`` when the store or registry does not know it."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri, registry_uri=tracking_uri)
    rest = uri.split(":/", 1)[1].strip("/")
    try:
        if uri.startswith("runs:/"):
            run_id, _, path = rest.partition("/")
            return run_id, f"{client.get_run(run_id).info.artifact_uri}/{path}".rstrip("/")
        name, sep, alias = rest.partition("@")
        if sep:
            version = client.get_model_version_by_alias(name, alias)
        else:
            name, _, number = rest.rpartition("/")
            if number == "latest":
                found = client.search_model_versions(f"name='{name}'", order_by=["version_number DESC"], max_results=1)
                if not found:
                    raise ValueError(f"Registered Model with name={name} has no version")
                version = found[0]
            else:
                version = client.get_model_version(name, number)
        return version.run_id, client.get_model_version_download_uri(version.name, version.version)
    except Exception as e:  # noqa: BLE001 - MLflow's errors: no such run, model, version or store
        raise ValueError(f"{uri}: cannot find it at {tracking_uri or 'the tracking store'}: "
                         f"{(str(e).splitlines() or [type(e).__name__])[0]}") from None


def _download(uri: str, tracking_uri: str | None) -> Path:
    """The weights file of the MLflow model ``uri``, downloaded to a temporary directory."""
    import tempfile

    from mlflow.artifacts import download_artifacts

    _, location = logged_by(uri, tracking_uri)
    try:
        local = Path(download_artifacts(artifact_uri=location, dst_path=tempfile.mkdtemp(prefix="fedray-start-"),
                                        tracking_uri=tracking_uri))
    except Exception as e:  # noqa: BLE001 - MLflow's errors: a store that does not answer
        raise ValueError(f"{uri}: cannot download it from {location}: "
                         f"{(str(e).splitlines() or [type(e).__name__])[0]}") from None
    weights = local / WEIGHTS if local.is_dir() else local
    if not weights.is_file():
        raise ValueError(f"{uri} has no {WEIGHTS}, so fedray did not log it; save its state_dict to a "
                         ".safetensors file and start from that file")
    return weights


def apply(model: nn.Module, weights: dict[str, torch.Tensor], replace: list[str], source: str) -> None:
    """Load ``weights`` into ``model``, except the tensors matching ``replace``, which keep their
    fresh values. Raises ValueError naming the first parameter that is missing from ``weights`` or
    whose shape differs (with both shapes), or the entries of ``weights`` the model does not have."""
    state = model.state_dict()
    for pattern in replace:
        if not any(matches(name, [pattern]) for name in state):
            raise ValueError(f"model.replace: {pattern!r} matches no parameter of the model ({_names(state)})")
    kept = {name: tensor for name, tensor in state.items() if not matches(name, replace)}
    for name, tensor in kept.items():
        if name not in weights:
            raise ValueError(f"model.start {source}: has no parameter {name!r} (shape {tuple(tensor.shape)} in this "
                             f"model); it holds {_names(weights)}")
        if weights[name].shape != tensor.shape:
            raise ValueError(f"model.start {source}: parameter {name!r} has shape {tuple(weights[name].shape)} there "
                             f"and {tuple(tensor.shape)} in this model; start it fresh with model.replace "
                             f"(e.g. a new head: {name.rsplit('.', 1)[0]!r})")
    extra = sorted(set(weights) - set(state))
    if extra:
        raise ValueError(f"model.start {source}: holds parameters this model does not have: {extra[:5]}; is it "
                         "the same architecture?")
    model.load_state_dict(state | {name: weights[name].to(state[name].dtype) for name in kept})


def _names(tensors: dict) -> str:
    names = list(tensors)
    return ", ".join(names[:8]) + (f", ... ({len(names)} in all)" if len(names) > 8 else "")
