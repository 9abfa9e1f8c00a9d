"""Tracking trouble and stopping, through the real `fedray` CLI in its own process and a real MLflow
store: an SQLite file that another process locks, a local `mlflow server` stopped and restarted
mid-run, SIGTERM and Ctrl-C. One command starts its own embedded Ray, as `fedray run` on a laptop
does; the others join the tests' Ray, as a job submitted to a cluster does."""

from __future__ import annotations

import os
import queue
import re
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner
from mlflow import MlflowClient

from conftest import history, small_job
from fedray.cli import main

BIN = Path(sys.executable).parent  # the environment running the tests holds `fedray` and `mlflow`
ROUND_S = 0.1  # a full-speed device's simulated time per local step: about 0.6 s per round


def write_job(tmp_path: Path, rounds: int, **tracking) -> Path:
    raw = small_job(rounds=rounds, tracking={"experiment": "tests", "log_model": True, **tracking})
    raw["devices"]["speed"] = {"kind": "slow_fraction", "fraction": 1.0, "slowdown": 1.0, "step_seconds": ROUND_S}
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


class Cli:
    """A `fedray` command in its own process; its output (stdout and stderr) read as it comes. With
    ``ray_address`` it joins that Ray, else it starts its own; ``env``: more environment."""

    def __init__(self, *args: str, cwd: Path, ray_address: str | None = None, env: dict | None = None) -> None:
        env = {**os.environ, **({"RAY_ADDRESS": ray_address} if ray_address else {}), **(env or {})}
        self.process = subprocess.Popen([str(BIN / "fedray"), *args], cwd=cwd, stdout=subprocess.PIPE, env=env,
                                        stderr=subprocess.STDOUT, text=True, start_new_session=True)
        self.lines: list[str] = []
        self._queue: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.process.stdout:
            self._queue.put(line)
        self._queue.put(None)

    def wait_for(self, pattern: str, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while not any(re.search(pattern, line) for line in self.lines):
            try:
                line = self._queue.get(timeout=max(0.01, deadline - time.monotonic()))
            except queue.Empty:
                pytest.fail(f"no {pattern!r} within {timeout}s:\n{self.output}")
            assert line is not None, f"exited before {pattern!r}:\n{self.output}"
            self.lines.append(line)

    def finish(self, timeout: float = 300) -> tuple[int, str]:
        code = self.process.wait(timeout)
        while (line := self._queue.get(timeout=10)) is not None:
            self.lines.append(line)
        return code, self.output

    @property
    def output(self) -> str:
        return "".join(self.lines)


def run_id(output: str) -> str:
    return re.search(r"MLflow run\s+([0-9a-f]{32})", output)[1]


def assert_complete(client: MlflowClient, run: str, rounds: int, status: str = "FINISHED") -> None:
    info = client.get_run(run)
    assert info.info.status == status
    assert [m.step for m in sorted(client.get_metric_history(run, "test_accuracy"), key=lambda m: m.step)] == \
        list(range(1, rounds + 1))
    assert {"rounds.json", "accuracy_loss.png", "job.yaml", "model"} <= {a.path for a in client.list_artifacts(run)}


def lock(db: Path) -> sqlite3.Connection:
    """Hold an exclusive lock on ``db``, as another process writing to it for long would."""
    connection = sqlite3.connect(db, isolation_level=None)
    connection.execute("BEGIN EXCLUSIVE")
    return connection


def test_records_logged_together_are_sent_back_to_back(tmp_path, tracking_uri):
    """The sender takes the next record as soon as one is in: a burst of records (as a run's end
    logs) reaches MLflow in a fraction of a second, not half a second a record."""
    from fedray.platform.tracking import Tracker, start_run

    tracker = Tracker(start_run(tracking_uri, "tests", "burst", tmp_path / "runs"))
    time.sleep(1.2)  # the sender is idle, waiting for records
    started = time.monotonic()
    for i in range(8):
        tracker.set_tag(f"t{i}", str(i))
    assert tracker.finish("FINISHED", wait_s=30.0) == 0 and time.monotonic() - started < 1.5
    run = MlflowClient(tracking_uri).get_run(tracker.run_id)
    assert run.info.status == "FINISHED" and {f"t{i}" for i in range(8)} <= set(run.data.tags)
    # the sent journal goes; the runs directory stays, empty, for the log file `fedray run` opens there
    assert (tmp_path / "runs").is_dir() and not any((tmp_path / "runs").iterdir())


def test_a_locked_database_delays_records_and_loses_none(tmp_path):
    """Locked past MLflow's 20 s busy timeout, from round 3 to after training ends: the rounds go
    on, the records wait and are all logged once the lock goes. (The run starts its own Ray though
    Ray's temporary folder names a cluster that is gone, as a killed `ray start` leaves it.)"""
    db, ray_tmp = tmp_path / "mlflow.db", Path(tempfile.mkdtemp(prefix="ray", dir="/tmp"))  # short socket paths
    (ray_tmp / "ray").mkdir()
    (ray_tmp / "ray" / "ray_current_cluster").write_text(f"127.0.0.1:{_free_port()}")  # nothing listens
    cli = Cli("run", str(write_job(tmp_path, rounds=20)), "--tracking-uri", f"sqlite:///{db}", cwd=tmp_path,
              env={"RAY_TMPDIR": str(ray_tmp)})
    cli.wait_for(r"round\s+3/20")
    holder, locked = lock(db), time.monotonic()
    cli.wait_for(r"records wait for MLflow: no answer for", timeout=60)  # said 5 s into the lock
    cli.wait_for(r"round 20/20")  # training went on
    time.sleep(max(0.0, locked + 25 - time.monotonic()))  # MLflow gives up after 20 s: fedray retries
    holder.rollback()
    holder.close()
    code, output = cli.finish()
    shutil.rmtree(ray_tmp, ignore_errors=True)
    assert code == 0 and "20/20 rounds completed" in output and "Traceback" not in output
    assert_complete(MlflowClient(f"sqlite:///{db}"), run_id(output), 20)
    assert [p.name for p in (tmp_path / "fedray-runs").iterdir()] == ["fedray.log"]  # everything sent: no journal
    # the console is fedray's: Ray's and MLflow's INFO lines and warnings are in the log file
    assert "INFO" not in output and "WARNING" not in output, output
    assert "Started a local Ray instance" in (tmp_path / "fedray-runs" / "fedray.log").read_text()


def test_a_store_down_at_the_end_leaves_a_journal_that_replay_sends(tmp_path, ray_address):
    db = tmp_path / "mlflow.db"
    cli = Cli("run", str(write_job(tmp_path, rounds=4, wait_s=2)), "--tracking-uri", f"sqlite:///{db}", cwd=tmp_path,
              ray_address=ray_address)
    cli.wait_for(r"round\s+2/4")
    holder = lock(db)
    code, output = cli.finish()
    holder.rollback()
    holder.close()
    assert code == 0 and "4/4 rounds completed" in output and "Traceback" not in output
    journal = tmp_path / "fedray-runs" / run_id(output)
    assert f"records it could not take are kept in {journal}: send them with `fedray replay {journal}`" in output
    client = MlflowClient(f"sqlite:///{db}")
    assert client.get_run(run_id(output)).info.status == "RUNNING"
    replayed = CliRunner().invoke(main, ["replay", str(journal)])  # in this process: it needs no Ray
    assert replayed.exit_code == 0 and "everything sent" in replayed.output, replayed.output
    assert_complete(client, journal.name, 4)
    assert not journal.exists()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _server(tmp_path: Path, port: int) -> subprocess.Popen:
    server = subprocess.Popen([str(BIN / "mlflow"), "server", "--backend-store-uri", f"sqlite:///{tmp_path / 's.db'}",
                               "--host", "127.0.0.1", "--port", str(port), "--workers", "1"], cwd=tmp_path,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2):
                return server
        except OSError:
            time.sleep(0.3)
    os.killpg(server.pid, signal.SIGKILL)
    pytest.fail("mlflow server did not start")


def test_a_restarted_tracking_server_loses_nothing(tmp_path, ray_address):
    port = _free_port()
    server = _server(tmp_path, port)
    uri = f"http://127.0.0.1:{port}"
    cli = Cli("run", str(write_job(tmp_path, rounds=12)), "--tracking-uri", uri, cwd=tmp_path, ray_address=ray_address)
    try:
        cli.wait_for(r"round\s+3/12")
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(30)
        cli.wait_for(r"records wait for MLflow: connection refused", timeout=60)
        server = _server(tmp_path, port)
        code, output = cli.finish()
        assert code == 0 and "12/12 rounds completed" in output and "Traceback" not in output
        assert_complete(MlflowClient(uri), run_id(output), 12)
    finally:
        os.killpg(server.pid, signal.SIGTERM)


def test_sigterm_ends_the_run_killed_with_its_rounds(tmp_path, ray_address):
    db = tmp_path / "mlflow.db"
    cli = Cli("run", str(write_job(tmp_path, rounds=30)), "--tracking-uri", f"sqlite:///{db}", cwd=tmp_path,
              ray_address=ray_address)
    cli.wait_for(r"round\s+3/30")
    cli.process.send_signal(signal.SIGTERM)  # as `kill` and `timeout` send it
    code, output = cli.finish()
    assert code == 143, output
    done = int(re.search(r"Stopped by SIGTERM after (\d+) rounds: MLflow run [0-9a-f]{32} ended KILLED", output)[1])
    assert done >= 3 and "Traceback" not in output and "SIGTERM received" not in output  # no native dump
    run = re.search(r"MLflow run ([0-9a-f]{32})", output)[1]
    client = MlflowClient(f"sqlite:///{db}")
    assert client.get_run(run).info.status == "KILLED"
    # every round the caller got is in MLflow; so may be the round in flight, if the driver logged
    # it (to its journal, which the caller sends on) before it was stopped
    assert len(history(client, run, "test_accuracy")) in (done, done + 1)
    assert {"rounds.json", "accuracy_loss.png"} <= {a.path for a in client.list_artifacts(run)}
    assert "model" not in {a.path for a in client.list_artifacts(run)}


def test_ctrl_c_during_setup_leaves_no_run_running(tmp_path, ray_address):
    db = tmp_path / "mlflow.db"
    cli = Cli("run", str(write_job(tmp_path, rounds=30)), "--tracking-uri", f"sqlite:///{db}", cwd=tmp_path,
              ray_address=ray_address)
    log, deadline = tmp_path / "fedray-runs" / "fedray.log", time.monotonic() + 120
    while not (log.exists() and "Updating database tables" in log.read_text()):  # MLflow's line, in the log file
        assert time.monotonic() < deadline and cli.process.poll() is None, cli.output
        time.sleep(0.05)  # MLflow has made the database: the run is being created
    time.sleep(0.5)  # the driver is starting
    cli.process.send_signal(signal.SIGINT)
    code, output = cli.finish()
    assert code == 130 and "Traceback" not in output, output
    said = re.search(r"Stopped by SIGINT (?:before the run started|after 0 rounds: MLflow run ([0-9a-f]{32}) ended "
                     r"KILLED)", output)
    assert said, output
    client = MlflowClient(f"sqlite:///{db}")
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()]) if db.exists() else []
    assert [r.info.status for r in runs] == (["KILLED"] if said[1] else [])


def test_a_failed_run_says_one_line_and_where_the_full_log_is(tmp_path, ray_address):
    raw = small_job(model={"class": "user_models:NeedsLocalFile"})
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(raw))
    db = tmp_path / "mlflow.db"
    code, output = Cli("run", "job.yaml", "--tracking-uri", f"sqlite:///{db}", cwd=tmp_path,
                       ray_address=ray_address).finish()
    ours = [line for line in output.splitlines() if "Ray instance" not in line and "Token authentication" not in line
            and "mlflow.store.db" not in line]
    run = re.search(r"MLflow run ([0-9a-f]{32}) ended FAILED", output)[1]
    log = tmp_path / "fedray-runs" / run / "error.log"
    assert code == 1 and ours == [
        "Error: job 'test' failed: FileNotFoundError: weights.pt: no such file on this node",
        f"  MLflow run {run} ended FAILED at sqlite:///{db}, with the rounds done",
        f"  full log: {log}"], output
    assert "Traceback" in log.read_text() and "weights.pt" in log.read_text()
    info = MlflowClient(f"sqlite:///{db}").get_run(run)
    assert info.info.status == "FAILED" and "weights.pt" in info.data.tags["fedray.error"]
