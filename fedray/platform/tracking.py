"""The records of one MLflow run, never lost to tracking trouble.

Every record (params, a round's metrics, tags, artifacts, the model, the run's end) is first
appended to the run's journal, a local directory, and then sent to MLflow in order by a background
thread that retries while the store is locked, slow or down. A process that dies leaves the
unsent records in the journal; ``Tracker`` reopened on it (or ``fedray replay``) sends them.
When everything is sent the journal is removed. MLflow is imported lazily.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from fedray.platform.store import TrackingError, cause, experiment_id

_BATCH_METRICS = 1000  # MLflow's most metrics per log_batch
_BATCH_PARAMS = 100
_REFUSED = frozenset({"INVALID_PARAMETER_VALUE", "RESOURCE_ALREADY_EXISTS"})  # the record is bad: retrying won't help


def start_run(uri: str, experiment: str, run_name: str, runs_dir: Path, tags: dict[str, str] | None = None) -> Path:
    """Create a RUNNING MLflow run with ``tags`` (the store must answer now, else TrackingError) and
    its journal directory ``runs_dir/<run id>``; return the directory."""
    from mlflow import MlflowClient

    client = MlflowClient(uri)
    try:
        run_id = client.create_run(experiment_id(client, experiment, uri), run_name=run_name, tags=tags).info.run_id
    except Exception as e:  # noqa: BLE001 - the store failed since it was checked
        raise TrackingError(f"tracking store {uri}: cannot create the run: {cause(e)}") from None
    directory = runs_dir / run_id
    (directory / "files").mkdir(parents=True)
    (directory / "run.json").write_text(json.dumps({"tracking_uri": uri, "run_id": run_id}))
    return directory


def reopen_run(uri: str, run_id: str, runs_dir: Path) -> Path:
    """Continue MLflow run ``run_id``: back to RUNNING if it ended FAILED or KILLED (a FINISHED run
    is not continued: TrackingError), with its journal directory ``runs_dir/<run id>``, which keeps
    the records it holds; return the directory."""
    from mlflow import MlflowClient

    directory = runs_dir / run_id
    if any(r["op"] == "end" for r in _read_journal(directory / "journal.jsonl")):  # ended, not all sent yet
        _, unsent = replay(directory)
        if unsent:
            raise TrackingError(f"tracking store {uri} does not take run {run_id}'s last records; "
                                f"send them with `fedray replay {directory}` first")
    client = MlflowClient(uri)
    try:
        status = client.get_run(run_id).info.status
        if status == "FINISHED":
            raise TrackingError(f"MLflow run {run_id} at {uri} has FINISHED; a finished run is not resumed")
        if status != "RUNNING":
            client.update_run(run_id, status="RUNNING")
    except TrackingError:
        raise
    except Exception as e:  # noqa: BLE001 - the store's own errors
        raise TrackingError(f"tracking store {uri}: cannot reopen run {run_id}: {cause(e)}") from None
    (directory / "files").mkdir(parents=True, exist_ok=True)
    if not (directory / "run.json").exists():
        (directory / "run.json").write_text(json.dumps({"tracking_uri": uri, "run_id": run_id}))
    return directory


class Tracker:
    """Appends records to the journal in ``directory`` and sends them from a background thread.
    Only one Tracker may hold a journal at a time."""

    def __init__(self, directory: str | Path) -> None:
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # the sending thread retries, without blocking
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")
        self.directory = Path(directory)
        meta = json.loads((self.directory / "run.json").read_text())
        self.uri, self.run_id = meta["tracking_uri"], meta["run_id"]
        self._journal = self.directory / "journal.jsonl"
        self._records = _read_journal(self._journal)
        self._sent = min(int(_read(self.directory / "sent") or 0), len(self._records))
        self.refused: list[str] = []  # records the store rejected as invalid (kept in the journal)
        self._trouble: str | None = None  # the store's last error while records wait
        self._attempt: float | None = None  # when the send in progress began
        self._wake, self._lock = threading.Event(), threading.Lock()
        self._stop = False
        self.ended = any(r["op"] == "end" for r in self._records)
        self._thread = threading.Thread(target=self._send_loop, name="fedray-tracking", daemon=True)
        self._thread.start()

    @property
    def backlog(self) -> int:
        """Records not yet in MLflow."""
        return len(self._records) - self._sent

    @property
    def trouble(self) -> str | None:
        """Why records wait, if the store failed or has been answering a send for 5 s."""
        started = self._attempt
        if self._trouble is None and started is not None and time.monotonic() - started > 5:
            return f"no answer for {time.monotonic() - started:.0f}s"
        return self._trouble

    def log_params(self, params: dict[str, str]) -> None:
        self._append({"op": "params", "params": params})

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        self._append({"op": "metrics", "metrics": {k: float(v) for k, v in metrics.items()}, "step": step,
                      "timestamp": int(time.time() * 1000)})

    def set_tag(self, key: str, value: str) -> None:
        self._append({"op": "tag", "key": key, "value": value})

    def log_text(self, text: str, path: str) -> None:
        self._file(path, text.encode())

    def log_bytes(self, data: bytes, path: str) -> None:
        self._file(path, data)

    def log_figure(self, figure: Any, path: str) -> None:
        buffer = io.BytesIO()
        figure.savefig(buffer, format=Path(path).suffix[1:])
        self._file(path, buffer.getvalue())

    def log_model(self, model: Any, example: np.ndarray) -> None:
        """Save ``model`` as an MLflow PyTorch model (signature from ``example``), with its state
        dict in ``weights.safetensors`` (what a job can start from, read without unpickling), in
        the journal and log it as the run's ``model`` artifact: ``runs:/<run id>/model`` loads it."""
        import mlflow.pytorch
        import torch
        from mlflow.models import infer_signature

        from fedray.transfer import weights

        with torch.no_grad():
            output = model(torch.from_numpy(example)).numpy()
        local = self.directory / "files" / str(len(self._records)) / "model"
        mlflow.pytorch.save_model(model, local, input_example=example, signature=infer_signature(example, output),
                                  pip_requirements=[f"torch=={torch.__version__.split('+')[0]}"])
        weights.save(model, local / weights.WEIGHTS)
        self._append({"op": "artifacts", "local": f"{local.parent.name}/model", "path": "model"})

    def register(self, name: str, description: str, tags: dict[str, str]) -> None:
        """Register the run's ``model`` artifact (``log_model`` first) as a new version of ``name``
        in the MLflow model registry, with ``description`` and ``tags``; ``models:/<name>/<version>``
        then loads it."""
        self._append({"op": "register", "name": name, "description": description, "tags": tags})

    def finish(self, status: str = "FINISHED", wait_s: float = 60.0) -> int:
        """End the run with ``status`` (FINISHED, FAILED or KILLED), then ``close``. A second
        call only closes."""
        if not self.ended:
            self.ended = True
            self._append({"op": "end", "status": status, "timestamp": int(time.time() * 1000)})
        return self.close(wait_s)

    def close(self, wait_s: float) -> int:
        """Wait up to ``wait_s`` for the store to take every record, then stop sending. Returns how
        many records are still unsent (kept in the journal for whoever opens it next, or
        ``replay``). The journal of an ended run is removed once all of it is sent (an error log
        beside it stays)."""
        deadline = time.monotonic() + wait_s
        while self.backlog and time.monotonic() < deadline:
            time.sleep(0.05)
        with self._lock:
            self._stop = True
        self._wake.set()
        self._thread.join(max(0.0, deadline - time.monotonic()))
        if self.ended and not self.backlog and not self.refused:
            shutil.rmtree(self.directory / "files", ignore_errors=True)
            for name in ("journal.jsonl", "sent", "run.json"):
                (self.directory / name).unlink(missing_ok=True)
            with contextlib.suppress(OSError):  # unless something else is kept there
                self.directory.rmdir()  # not the runs directory: the log file may be about to open there
        return self.backlog

    def _file(self, path: str, data: bytes) -> None:
        local = self.directory / "files" / str(len(self._records)) / Path(path).name  # logged under its name
        local.parent.mkdir()
        local.write_bytes(data)
        self._append({"op": "artifact", "local": f"{local.parent.name}/{local.name}",
                      "path": str(Path(path).parent).strip(".")})

    def _append(self, record: dict) -> None:
        with self._lock:
            if self._stop:
                raise RuntimeError(f"the tracker of run {self.run_id} is closed")
            with open(self._journal, "a") as f:
                f.write(json.dumps(record) + "\n")
            self._records.append(record)
        self._wake.set()

    def _send_loop(self) -> None:
        """Send records in order, the next as soon as one is taken; on a store error wait (0.5 s,
        doubling to 8 s, or until a new record comes) and try again. MLflow is imported here (a
        second or two), not in the way of the caller, which only appends to the journal."""
        from mlflow import MlflowClient

        self._client = MlflowClient(self.uri)
        pause = 0.5
        while not self._stop:
            self._wake.clear()  # before looking at the backlog: a record appended after it wakes the wait
            if not self.backlog:
                self._wake.wait(1.0)
                continue
            self._attempt = time.monotonic()
            try:
                self._send_next()
                pause, self._trouble = 0.5, None
            except Exception as e:  # noqa: BLE001 - the store's trouble; the records wait in the journal
                if getattr(e, "error_code", None) in _REFUSED:
                    self.refused.append(f"{self._records[self._sent]['op']}: {cause(e)}")
                    self._advance(1)
                    continue
                self._trouble = cause(e)
                self._wake.wait(pause)
                pause = min(2 * pause, 8.0)
            finally:
                self._attempt = None

    def _send_next(self) -> None:
        """Send the next record, or the next run of metrics records in one batch."""
        from mlflow.entities import Metric, Param, RunTag

        first = self._records[self._sent]
        run, client, op = self.run_id, self._client, first["op"]
        if op == "metrics":
            batch, count = [], 0
            for record in self._records[self._sent:len(self._records)]:
                if record["op"] != "metrics" or count and len(batch) + len(record["metrics"]) > _BATCH_METRICS:
                    break
                batch += [Metric(k, v, record["timestamp"], record["step"]) for k, v in record["metrics"].items()]
                count += 1
            client.log_batch(run, metrics=batch)
            self._advance(count)
            return
        if op == "params":
            items = [Param(k, v) for k, v in first["params"].items()]
            for i in range(0, len(items), _BATCH_PARAMS):
                client.log_batch(run, params=items[i:i + _BATCH_PARAMS])
        elif op == "tag":
            client.log_batch(run, tags=[RunTag(first["key"], first["value"])])
        elif op == "artifact":
            client.log_artifact(run, str(self.directory / "files" / first["local"]), first["path"] or None)
        elif op == "artifacts":
            client.log_artifacts(run, str(self.directory / "files" / first["local"]), first["path"])
        elif op == "register":
            try:
                client.create_registered_model(first["name"])
            except Exception as e:  # noqa: BLE001 - a name registered before takes the new version
                if getattr(e, "error_code", None) != "RESOURCE_ALREADY_EXISTS":
                    raise
            client.create_model_version(first["name"], f"{client.get_run(run).info.artifact_uri}/model", run_id=run,
                                        tags=first["tags"], description=first["description"])
        elif op == "end":
            client.set_terminated(run, first["status"], first["timestamp"])
        self._advance(1)

    def _advance(self, count: int) -> None:
        self._sent += count
        marker = self.directory / "sent"
        temporary = marker.with_suffix(".tmp")
        temporary.write_text(str(self._sent))
        os.replace(temporary, marker)  # atomic: a record is at worst sent twice, and sending is idempotent


def replay(directory: str | Path, wait_s: float = 60.0) -> tuple[str, int]:
    """Send what a run's journal still holds; return (run id, records still unsent). A run whose
    process died before ending it is ended FAILED."""
    tracker = Tracker(directory)
    return tracker.run_id, tracker.finish("FAILED", wait_s)


def _read_journal(path: Path) -> list[dict]:
    """The journal's records; a last line cut short by a dying process is dropped from the file."""
    if not path.exists():
        return []
    data = path.read_bytes()
    complete = data[:data.rfind(b"\n") + 1]
    if len(complete) != len(data):
        path.write_bytes(complete)
    return [json.loads(line) for line in complete.decode().splitlines()]


def _read(path: Path) -> str | None:
    return path.read_text() if path.exists() else None
