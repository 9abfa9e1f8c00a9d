"""End to end: a real Ray head started with `ray start --head` (token authentication on, loopback
only), the quickstart job sent with the real `ray job submit` CLI, and its MLflow run read back.

The head is this test's own: its token lives in a temporary folder (RAY_AUTH_TOKEN_PATH; the user's
~/.ray/auth_token is neither read nor written), all its ports are picked free on 127.0.0.1, and it
is stopped by process group rather than with `ray stop`, which would kill every Ray process on the
machine, other tests' included.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent  # the environment running the tests holds `ray` and `fedray`
# what `ray job submit --working-dir` must not upload (Ray also honours .gitignore)
EXCLUDES = [".venv", ".venv-*", ".git", "mlruns", "mlartifacts", "*.db"]
HEAD_START_TIMEOUT = 90
JOB_TIMEOUT = 240


@dataclass
class Head:
    url: str            # the dashboard's job server, what `ray job submit --address` takes
    env: dict           # environment holding the token, for the head and every CLI call
    token: str
    tmp: Path
    log: Path

    def log_tail(self, n: int = 60) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])


def _free_ports(n: int) -> list[int]:
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _tool(name: str) -> str:
    path = BIN / name
    assert path.exists(), f"{name} not found next to {sys.executable}; install fedray with ray[default]"
    return str(path)


def _get(url: str, token: str | None = None) -> tuple[int, bytes]:
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
    try:
        with urllib.request.urlopen(req, timeout=5) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def _group(pgid: int) -> list[int]:
    """Live (non-zombie) processes in process group ``pgid``."""
    pids = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            fields = (d / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            pids.append(int(d.name))
    return pids


def _marked(marker: bytes) -> list[int]:
    """Processes whose environment holds ``marker``: anything the head started that left its group."""
    pids = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit() or int(d.name) == os.getpid():
            continue
        try:
            if marker in (d / "environ").read_bytes().split(b"\0"):
                pids.append(int(d.name))
        except OSError:
            continue
    return pids


def _stop(proc: subprocess.Popen, marker: bytes) -> None:
    """Stop this head only. `ray start --block` drains and stops what it started on SIGTERM; what
    is left of its process group (it is the group's leader) is killed, and so is any process that
    still carries the head's marker. The leader is reaped last so its pid, the group id, cannot be
    reused meanwhile."""
    pgid = proc.pid
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + 30
    while _group(pgid) and time.monotonic() < deadline:
        time.sleep(0.2)
    if _group(pgid):
        os.killpg(pgid, signal.SIGKILL)
    proc.wait(timeout=30)
    for pid in _marked(marker):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


@pytest.fixture(scope="module")
def head():
    # short: Ray's unix socket paths under the session folder must stay below ~107 characters
    tmp = Path(tempfile.mkdtemp(prefix="fr-", dir="/tmp" if os.path.isdir("/tmp") else None))
    marker = f"FEDRAY_TEST_HEAD={uuid.uuid4().hex}"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "MLFLOW_"))}
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"  # the job's entrypoint finds `fedray` here

    # A token of our own: `ray get-auth-token --generate` writes $HOME/.ray/auth_token, so point
    # HOME at the temporary folder for that one call, then hand the file to Ray by path.
    gen = subprocess.run([_tool("ray"), "get-auth-token", "--generate"], env={**env, "HOME": str(tmp)},
                         capture_output=True, text=True, timeout=60)
    token_file = tmp / ".ray" / "auth_token"
    assert gen.returncode == 0 and token_file.exists(), gen.stderr
    token = token_file.read_text().strip()
    assert token and gen.stdout.strip() == token

    env.update({
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN_PATH": str(token_file),
        # On Linux Ray replaces 127.0.0.1 by the machine's routable address; with this it keeps
        # the loopback address (a single-node cluster only, which this is).
        "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
        "RAY_USAGE_STATS_ENABLED": "0",
    })
    name, value = marker.split("=", 1)
    env[name] = value

    gcs, dashboard, client, node_manager, object_manager, agent, agent_grpc, runtime_env, metrics = _free_ports(9)
    log = tmp / "head.log"
    cmd = [_tool("ray"), "start", "--head", "--block",
           "--node-ip-address", "127.0.0.1", "--port", str(gcs), "--num-cpus", "2",
           "--include-dashboard", "true", "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dashboard),
           "--ray-client-server-port", str(client), "--node-manager-port", str(node_manager),
           "--object-manager-port", str(object_manager), "--dashboard-agent-listen-port", str(agent),
           "--dashboard-agent-grpc-port", str(agent_grpc), "--runtime-env-agent-port", str(runtime_env),
           "--metrics-export-port", str(metrics), "--min-worker-port", "0", "--max-worker-port", "0",
           "--temp-dir", str(tmp / "ray"), "--disable-usage-stats"]
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, env=env, cwd=tmp, stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
    h = Head(url=f"http://127.0.0.1:{dashboard}", env=env, token=token, tmp=tmp, log=log)
    try:
        # ready when the job server answers an authenticated request
        deadline = time.monotonic() + HEAD_START_TIMEOUT
        while True:
            assert proc.poll() is None, f"ray start exited with {proc.returncode}:\n{h.log_tail()}"
            try:
                status, _ = _get(f"{h.url}/api/jobs/", token)
                if status == 200:
                    break
            except OSError:
                pass
            assert time.monotonic() < deadline, f"no job server after {HEAD_START_TIMEOUT}s:\n{h.log_tail()}"
            time.sleep(0.5)
        yield h
    finally:
        _stop(proc, marker.encode())
        shutil.rmtree(tmp, ignore_errors=True)


def test_head_requires_the_token(head):
    assert _get(f"{head.url}/api/jobs/")[0] == 401
    assert _get(f"{head.url}/api/jobs/", "not-the-token")[0] == 403


def test_ray_job_submit_runs_quickstart_and_logs_to_mlflow(head):
    import mlflow

    db = head.tmp / "mlflow.db"
    uri = f"sqlite:///{db}"  # absolute: the job runs in a temporary copy of the working dir
    submission_id = f"fedray-test-{uuid.uuid4().hex[:8]}"
    cmd = [_tool("ray"), "job", "submit", "--address", head.url, "--submission-id", submission_id,
           "--working-dir", str(REPO), "--runtime-env-json", json.dumps({"excludes": EXCLUDES}),
           "--", "fedray", "run", "jobs/quickstart.yaml", "--tracking-uri", uri,
           "--set", "rounds=2", "--set", "tracking.log_model=false"]
    started = time.monotonic()
    # without --no-wait the CLI streams the job's logs and returns when it ends
    sub = subprocess.run(cmd, env=head.env, cwd=REPO, capture_output=True, text=True, timeout=JOB_TIMEOUT)
    output = f"{sub.stdout}\n{sub.stderr}"
    status, body = _get(f"{head.url}/api/jobs/{submission_id}", head.token)
    assert status == 200, body
    job = json.loads(body)
    assert sub.returncode == 0 and job["status"] == "SUCCEEDED", (
        f"job {job['status']}: {job.get('message')}\n{output[-6000:]}\n--- head log ---\n{head.log_tail()}")
    assert "2/2 rounds completed" in output
    print(f"ray job submit took {time.monotonic() - started:.1f}s")

    client = mlflow.MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name("quickstart")
    assert experiment is not None
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == 1
    run = runs[0]
    assert run.info.status == "FINISHED"
    history = client.get_metric_history(run.info.run_id, "test_accuracy")
    assert sorted(m.step for m in history) == [1, 2]
    assert all(0.0 <= m.value <= 1.0 for m in history)
    assert run.data.metrics["bytes_up"] > 0
