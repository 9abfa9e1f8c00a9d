"""The MLflow tracking store: which one a run uses, whether it answers (checked before anything
else starts, creating nothing), and its experiments. MLflow is imported lazily."""

from __future__ import annotations

import os
import re
import sqlite3
import threading
from pathlib import Path

CHECK_TIMEOUT_S = 5  # a first check's wait for an answer: a store that needs longer is reported


class TrackingError(RuntimeError):
    """The tracking store cannot be used; the message names the URI and the cause."""


def resolve_uri(uri: str | None) -> str:
    """The tracking URI to use: ``uri``, else ``MLFLOW_TRACKING_URI``, else MLflow's default
    (``sqlite:///mlflow.db`` in the working directory). Local sqlite paths are made absolute so
    that processes with another working directory (Ray actors) write to the same file."""
    import mlflow

    if uri is None:
        uri = mlflow.get_tracking_uri()
    path = sqlite_path(uri)
    return f"sqlite:///{path.resolve()}" if path is not None else uri


def is_relative_local(uri: str | None) -> bool:
    """Whether ``uri`` names a relative local path, i.e. one inside the working directory."""
    if uri is None:
        return True
    path = sqlite_path(uri)
    if path is not None:
        return not path.is_absolute()
    return "://" not in uri and not os.path.isabs(uri)


def sqlite_path(uri: str) -> Path | None:
    return Path(uri.removeprefix("sqlite:///")) if uri.startswith("sqlite:///") else None


def check(uri: str, experiment: str) -> None:
    """Raise TrackingError if the store at ``uri`` cannot take a run in ``experiment``: a local
    database that is corrupt, read-only or in a missing directory; a server that refuses the
    connection or does not answer within ``CHECK_TIMEOUT_S``. Reads only: creates nothing."""
    db = sqlite_path(uri)
    if db is not None:
        _check_sqlite(uri, db)
    elif uri.startswith(("http://", "https://")):
        _answers_within(uri, experiment)
    elif "://" not in uri or uri.startswith("file:"):
        _writable_directory(uri, Path(uri.removeprefix("file://")), "the tracking directory")
    else:  # a database server or a hosted store
        _answers_within(uri, experiment)


def _check_sqlite(uri: str, db: Path) -> None:
    if db.is_dir():
        raise TrackingError(f"tracking store {uri}: {db} is a directory, not a database file")
    _writable_directory(uri, db.parent, "the database's directory")  # SQLite writes its journal beside it
    if not db.exists():
        return  # MLflow creates it
    if not os.access(db, os.R_OK | os.W_OK):
        raise TrackingError(f"tracking store {uri}: the database file is read-only for this user")
    try:
        with sqlite3.connect(f"{db.as_uri()}?mode=ro", uri=True, timeout=CHECK_TIMEOUT_S) as connection:
            tables = {name for (name,) in connection.execute("SELECT name FROM sqlite_master WHERE type='table'")}
            if tables and "experiments" not in tables:
                raise TrackingError(f"tracking store {uri}: the file is an SQLite database, but not MLflow's "
                                    f"(tables: {sorted(tables)[:5]})")
    except sqlite3.DatabaseError as e:
        raise TrackingError(f"tracking store {uri}: cannot read the database: {e}") from None


def _writable_directory(uri: str, directory: Path, what: str) -> None:
    if not directory.is_dir():
        raise TrackingError(f"tracking store {uri}: {what} {directory} does not exist")
    if not os.access(directory, os.W_OK | os.X_OK):
        raise TrackingError(f"tracking store {uri}: {what} {directory} is not writable")


def _answers_within(uri: str, experiment: str) -> None:
    """Ask the store for ``experiment`` once, without MLflow's retries, in a thread given
    ``CHECK_TIMEOUT_S`` (MLflow's HTTP timeout is set to it too)."""
    from mlflow import MlflowClient
    from mlflow.environment_variables import MLFLOW_HTTP_REQUEST_MAX_RETRIES, MLFLOW_HTTP_REQUEST_TIMEOUT

    failure: list[BaseException] = []

    def ask() -> None:
        try:
            MlflowClient(uri).get_experiment_by_name(experiment)
        except Exception as e:  # noqa: BLE001 - reported with its cause
            failure.append(e)

    saved = {var.name: os.environ.get(var.name) for var in (MLFLOW_HTTP_REQUEST_MAX_RETRIES, MLFLOW_HTTP_REQUEST_TIMEOUT)}
    os.environ.update({MLFLOW_HTTP_REQUEST_MAX_RETRIES.name: "0", MLFLOW_HTTP_REQUEST_TIMEOUT.name: str(CHECK_TIMEOUT_S)})
    try:
        asking = threading.Thread(target=ask, daemon=True)
        asking.start()
        asking.join(CHECK_TIMEOUT_S + 2)
    finally:
        for name, value in saved.items():
            os.environ.pop(name) if value is None else os.environ.__setitem__(name, value)
    if asking.is_alive() or (failure and "timed out" in cause(failure[0])):
        raise TrackingError(f"tracking store {uri} did not answer within {CHECK_TIMEOUT_S}s")
    if failure:
        raise TrackingError(f"tracking store {uri}: {cause(failure[0])}")


_KNOWN_CAUSES = ("Connection refused", "Read timed out", "timed out", "Name or service not known",
                 "No route to host", "certificate verify failed", "database is locked", "readonly database",
                 "unable to open database file", "file is not a database", "disk I/O error")


def cause(error: BaseException) -> str:
    """The root cause of a tracking error in one line: a known network or database condition if
    the message names one, else its first line (never SQLAlchemy's 'Background on this error')."""
    text = str(error)
    for known in _KNOWN_CAUSES:
        if known.lower() in text.lower():
            status = re.search(r"\b(?:HTTP|status code:?)\s*(\d{3})\b", text)
            return known.lower() + (f" (HTTP {status.group(1)})" if status else "")
    line = next((s.strip() for s in text.splitlines() if s.strip() and "Background on this error" not in s), "")
    line = line or type(error).__name__
    return line if len(line) <= 300 else line[:297] + "..."


def experiment_id(client, name: str, uri: str) -> str:
    """The id of experiment ``name``, created if missing. A local sqlite store keeps artifacts
    beside the database, not in the working directory."""
    from mlflow.exceptions import MlflowException

    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    db = sqlite_path(uri)
    try:
        return client.create_experiment(name, artifact_location=(db.parent / "mlartifacts").as_uri() if db else None)
    except MlflowException:  # another run created it meanwhile
        exp = client.get_experiment_by_name(name)
        if exp is None:
            raise
        return exp.experiment_id
