"""Export a model for devices: ONNX, checked with ONNX Runtime against PyTorch."""

from __future__ import annotations

import contextlib
import io
import logging
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

TOLERANCE = 1e-4  # the largest absolute difference of an exported model's logits from PyTorch's


def to_onnx(model: nn.Module, inputs: np.ndarray, path: Path) -> dict:
    """Write ``model`` (in eval mode, any batch size) to ``path`` as ONNX and run it with ONNX
    Runtime on ``inputs`` (float32, ``(n, *input_shape)``): the check, as ``{"samples",
    "max_abs_diff", "tolerance", "passed", "onnxruntime"}``. The exporter's own chatter goes to the
    log, not the console."""
    import onnxruntime

    model.eval()
    example = torch.from_numpy(np.ascontiguousarray(inputs[:2], dtype=np.float32))
    with _quiet():
        torch.onnx.export(model, (example,), str(path), dynamo=True, external_data=False, input_names=["input"],
                          output_names=["logits"],
                          dynamic_shapes=({0: torch.export.Dim("batch")},), verbose=False)
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x = np.ascontiguousarray(inputs, dtype=np.float32)
    got = session.run(None, {session.get_inputs()[0].name: x})[0]
    with torch.no_grad():
        expected = model(torch.from_numpy(x)).numpy()
    if got.shape != expected.shape:
        raise ValueError(f"the ONNX model gives logits of shape {got.shape}, PyTorch {expected.shape}")
    diff = float(np.abs(got - expected).max())
    return {"samples": len(x), "max_abs_diff": diff, "tolerance": TOLERANCE, "passed": diff <= TOLERANCE,
            "onnxruntime": onnxruntime.__version__}


@contextlib.contextmanager
def _quiet():
    """torch.onnx's progress lines and warnings (e.g. torchvision operators it skips) kept off the
    console: they go to the ``fedray.export`` log at DEBUG."""
    log = logging.getLogger("fedray.export")
    loggers = [logging.getLogger(name) for name in ("torch.onnx", "torch.export", "torch._dynamo", "onnxscript")]
    levels = [lg.level for lg in loggers]
    out = io.StringIO()
    try:
        for lg in loggers:
            lg.setLevel(logging.ERROR)
        with warnings.catch_warnings(record=True) as caught, contextlib.redirect_stdout(out):
            warnings.simplefilter("always")
            yield
        for w in caught:
            log.debug("%s: %s", w.category.__name__, w.message)
        if out.getvalue():
            log.debug("%s", out.getvalue())
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def export_logged(target: str, tracking_uri: str, out: Path | None) -> tuple[Path, dict, str]:
    """Export the model fedray logged that ``target`` names (a run id, ``runs:/<run id>/model``,
    ``models:/<name>/<version>``, ``models:/<name>@<alias>`` or ``models:/<name>/latest``) to ONNX
    at ``out`` (default ``<run id>.onnx`` here), checked on the held-out inputs of its run's job,
    and log the file and the check to that run. Returns (path, check, run id). Raises ValueError
    saying what is missing."""
    from mlflow import MlflowClient
    from mlflow.artifacts import download_artifacts

    from fedray.config import JobError, parse_job
    from fedray.platform.prepare import prepare
    from fedray.transfer import weights

    model_uri = target if target.startswith(("runs:/", "models:/")) else f"runs:/{target}/model"
    client = MlflowClient(tracking_uri)
    run_id, _ = weights.logged_by(model_uri, tracking_uri)
    try:
        job_file = download_artifacts(artifact_uri=f"runs:/{run_id}/job.yaml", tracking_uri=tracking_uri)
        import yaml

        job = parse_job(yaml.safe_load(Path(job_file).read_text()))
    except JobError as e:
        raise ValueError(f"run {run_id}'s job.yaml is no longer a valid job: {e}") from None
    except Exception as e:  # noqa: BLE001 - MLflow's errors
        raise ValueError(f"run {run_id} has no job.yaml at {tracking_uri}, so fedray did not log it: "
                         f"{(str(e).splitlines() or [''])[0]}") from None
    prepared = prepare(job, tracking_uri)
    weights.apply(prepared.model, weights.load(model_uri, tracking_uri), [], model_uri)
    path = Path(out) if out is not None else Path(f"{run_id}.onnx")
    check = to_onnx(prepared.model, prepared.dataset.x[prepared.split.holdout[:256]], path) | {"model": model_uri}
    client.log_artifact(run_id, str(path), "onnx")
    import json
    import tempfile

    with tempfile.TemporaryDirectory() as directory:
        (Path(directory) / "check.json").write_text(json.dumps(check, indent=1))
        client.log_artifact(run_id, str(Path(directory) / "check.json"), "onnx")
    return path, check, run_id
