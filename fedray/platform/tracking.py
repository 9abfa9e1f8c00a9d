"""MLflow tracking for one run. Only the driver uses it; MLflow is imported lazily."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np


def resolve_uri(uri: str | None) -> str:
    """The tracking URI to use: ``uri``, else ``MLFLOW_TRACKING_URI``, else MLflow's default
    (``sqlite:///mlflow.db`` in the working directory). Local sqlite paths are made absolute so
    that processes with another working directory (Ray actors) write to the same file."""
    import mlflow

    if uri is None:
        uri = mlflow.get_tracking_uri()
    path = _sqlite_path(uri)
    return f"sqlite:///{path.resolve()}" if path is not None else uri


def is_relative_local(uri: str | None) -> bool:
    """Whether ``uri`` names a relative local path, i.e. one inside the working directory."""
    if uri is None:
        return True
    path = _sqlite_path(uri)
    if path is not None:
        return not path.is_absolute()
    return "://" not in uri and not os.path.isabs(uri)


def _sqlite_path(uri: str) -> Path | None:
    return Path(uri.removeprefix("sqlite:///")) if uri.startswith("sqlite:///") else None


class MlflowTracker:
    """One MLflow run: params, per-round metrics (logged asynchronously), artifacts, the model."""

    def __init__(self, uri: str, experiment: str, run_name: str) -> None:
        import mlflow

        self._mlflow = mlflow
        self.uri = uri
        mlflow.set_tracking_uri(uri)
        self.run_id = mlflow.start_run(experiment_id=_experiment_id(experiment, uri), run_name=run_name).info.run_id
        self.ended = False

    def log_params(self, params: dict[str, str]) -> None:
        self._mlflow.log_params(params)

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        self._mlflow.log_metrics(metrics, step=step, synchronous=False)

    def set_tag(self, key: str, value: str) -> None:
        self._mlflow.set_tag(key, value)

    def log_text(self, text: str, path: str) -> None:
        self._mlflow.log_text(text, path)

    def log_figure(self, figure: Any, path: str) -> None:
        self._mlflow.log_figure(figure, path)

    def log_model(self, model: Any, example: np.ndarray) -> None:
        import mlflow.pytorch
        import torch
        from mlflow.models import infer_signature

        with torch.no_grad():
            output = model(torch.from_numpy(example)).numpy()
        mlflow.pytorch.log_model(model, name="model", input_example=example,
                                 signature=infer_signature(example, output),
                                 pip_requirements=[f"torch=={torch.__version__.split('+')[0]}"])

    def finish(self, status: str = "FINISHED") -> None:
        """Flush pending metrics and end the run with ``status`` (FINISHED, FAILED or KILLED).
        Later calls do nothing."""
        if self.ended:
            return
        self.ended = True
        try:
            self._mlflow.flush_async_logging()
        finally:
            self._mlflow.end_run(status)


def _experiment_id(name: str, uri: str) -> str:
    """The id of experiment ``name``, created if missing. A local sqlite store keeps artifacts
    beside the database, not in the working directory."""
    import mlflow
    from mlflow.exceptions import MlflowException

    exp = mlflow.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    db = _sqlite_path(uri)
    try:
        return mlflow.create_experiment(name, artifact_location=(db.parent / "mlartifacts").as_uri() if db else None)
    except MlflowException:  # another run created it meanwhile
        exp = mlflow.get_experiment_by_name(name)
        if exp is None:
            raise
        return exp.experiment_id


def terminate(uri: str, run_id: str, status: str) -> None:
    """End run ``run_id`` with ``status`` if it is still running: for when its driver is gone."""
    from mlflow import MlflowClient

    client = MlflowClient(uri)
    if client.get_run(run_id).info.status == "RUNNING":
        client.set_terminated(run_id, status)
