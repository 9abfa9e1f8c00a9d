"""End to end: a real Ray head started with `ray start --head` (token authentication on, loopback
only, an autoscaler with Ray's fake multi-node provider), the quickstart job sent with the real
`ray job submit` CLI and its MLflow run read back, and a `devices.scale_up` job asking the
autoscaler for workers. One head serves the module.

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
    gcs: str            # the head's GCS address, what `ray.init` takes

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
    deadline = time.monotonic() + 10  # the fake provider's nodes outlive it: killed below
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


def _start_head(num_cpus: int = 2, node_types: dict | None = None):
    """A head of this test's own (a generator: yields a ``Head``, stops it when resumed). With
    ``node_types``, its autoscaler launches such nodes on this machine (Ray's fake multi-node
    provider); the head's own type has ``num_cpus`` CPUs."""
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
        # the loopback address (a single-machine cluster, which this is).
        "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
        "RAY_USAGE_STATS_ENABLED": "0",
    })
    name, value = marker.split("=", 1)
    env[name] = value

    gcs, dashboard, client, node_manager, object_manager, agent, agent_grpc, runtime_env, metrics = _free_ports(9)
    log = tmp / "head.log"
    cmd = [_tool("ray"), "start", "--head", "--block",
           "--node-ip-address", "127.0.0.1", "--port", str(gcs), "--num-cpus", str(num_cpus),
           "--include-dashboard", "true", "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dashboard),
           "--ray-client-server-port", str(client), "--node-manager-port", str(node_manager),
           "--object-manager-port", str(object_manager), "--dashboard-agent-listen-port", str(agent),
           "--dashboard-agent-grpc-port", str(agent_grpc), "--runtime-env-agent-port", str(runtime_env),
           "--metrics-export-port", str(metrics), "--min-worker-port", "0", "--max-worker-port", "0",
           "--temp-dir", str(tmp / "ray"), "--disable-usage-stats"]
    if node_types is not None:
        config = tmp / "autoscaling.json"
        config.write_text(json.dumps(_fake_cluster(f"127.0.0.1:{gcs}", num_cpus, node_types)))
        cmd.append(f"--autoscaling-config={config}")
        env.update({"RAY_FAKE_CLUSTER": "1", "AUTOSCALER_UPDATE_INTERVAL_S": "1"})
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, env=env, cwd=tmp, stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
    h = Head(url=f"http://127.0.0.1:{dashboard}", env=env, token=token, tmp=tmp, log=log, gcs=f"127.0.0.1:{gcs}")
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


def _fake_cluster(gcs: str, head_cpus: int, node_types: dict) -> dict:
    """A cluster-launcher config for Ray's fake multi-node provider: nodes are processes here."""
    return {
        "cluster_name": "fedray-test", "max_workers": sum(t["max_workers"] for t in node_types.values()),
        "provider": {"type": "fake_multinode", "gcs_address": gcs, "use_node_id_as_ip": True,
                     "disable_node_updaters": True, "disable_launch_config_check": True},
        "available_node_types": {"ray.head.default": {"resources": {"CPU": head_cpus}, "node_config": {},
                                                      "max_workers": 0}, **node_types},
        "head_node_type": "ray.head.default", "upscaling_speed": 1.0, "idle_timeout_minutes": 5,
        "auth": {"ssh_user": "ubuntu"}, "docker": {}, "file_mounts": {}, "cluster_synced_files": [],
        "file_mounts_sync_continuously": False, "rsync_exclude": [], "rsync_filter": [],
        **{key: [] for key in ("initialization_commands", "setup_commands", "head_setup_commands",
                               "worker_setup_commands", "head_start_ray_commands", "worker_start_ray_commands")},
    }


@pytest.fixture(scope="module")
def head():
    # two CPUs on the head; the autoscaler may add one more node of one CPU
    yield from _start_head(num_cpus=2, node_types={
        "cpu1": {"resources": {"CPU": 1}, "node_config": {}, "min_workers": 0, "max_workers": 1}})


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


# Run in a process of its own, a driver of the autoscaling head: ``run_job`` with a callback that,
# after a round trained on fewer than three workers, holds the run until the autoscaler's node and the
# worker on it are up, and reads the autoscaler's view of explicit requests (``ray status``).
SCALE_UP_SCRIPT = """
import json, subprocess, sys, time
from pathlib import Path
import ray
from fedray.config import parse_job
from fedray.platform.run import run_job

def requested():
    out = subprocess.run(["ray", "status", "--address", sys.argv[1]], capture_output=True, text=True).stdout
    return out.split("From request_resources:")[1].split("Pending Demands")[0].strip()

seen = {"nodes": len(ray.nodes()) if ray.is_initialized() else None}

def on_round(result):
    seen.setdefault("request", requested())
    deadline = time.monotonic() + 120
    while result.metrics["workers"] < 3 and time.monotonic() < deadline:
        alive = [n for n in ray.nodes() if n["Alive"]]
        if len(alive) == 2 and ray.available_resources().get("CPU", 0) == 0:
            time.sleep(3)  # the worker holds the new node's CPU; give it time to start
            return
        time.sleep(0.5)

job = parse_job(json.loads(sys.argv[2]))
summary = run_job(job, "", sys.argv[3], on_round=on_round, runs_dir=Path(sys.argv[4]))
print("RESULT", json.dumps({"summary": summary, "request": seen["request"], "after": requested(),
                            "nodes": len([n for n in ray.nodes() if n["Alive"]])}))
"""


def test_scale_up_asks_the_autoscaler_and_trains_on_nodes_as_they_join(head):
    """A job that wants 4 one-CPU workers on a two-CPU head: it asks the autoscaler for them, starts
    on the head's two workers, trains on the node the autoscaler adds once it is up, finishes
    although the fourth worker never gets a CPU, and withdraws its request at the end."""
    job = {"name": "scale-up", "seed": 0, "rounds": 6,
           "data": {"dataset": "synthetic", "synthetic": {"samples": 600, "shape": [8], "classes": 3}},
           "model": {"name": "logreg"},
           "devices": {"count": 6, "per_round": 6, "workers": 4, "scale_up": True, "timeout_s": 120},
           "tracking": {"experiment": "scale-up", "log_model": False}}
    uri = f"sqlite:///{head.tmp / 'mlflow.db'}"
    run = subprocess.run([sys.executable, "-c", SCALE_UP_SCRIPT, head.gcs, json.dumps(job), uri,
                          str(head.tmp / "runs")], env={**head.env, "RAY_ADDRESS": head.gcs}, cwd=head.tmp,
                         capture_output=True, text=True, timeout=JOB_TIMEOUT)
    lines = [line for line in run.stdout.splitlines() if line.startswith("RESULT ")]
    assert run.returncode == 0 and lines, f"{run.stdout[-3000:]}\n{run.stderr[-6000:]}\n{head.log_tail()}"
    result = json.loads(lines[-1][len("RESULT "):])
    summary = result["summary"]
    assert summary["completed_rounds"] == 6
    # while the run went on, the autoscaler held the request for the four workers...
    assert result["request"].startswith("{'CPU': 1}: 4 "), result["request"]
    # ... added the one node it may, and the run trained on it: three workers, all six devices
    assert result["nodes"] == 2
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=uri)
    workers = [m.value for m in sorted(client.get_metric_history(summary["run_id"], "workers"), key=lambda m: m.step)]
    participants = client.get_metric_history(summary["run_id"], "participants")
    assert len(workers) == 6 and workers[-1] == 3 and min(workers) >= 1, workers
    assert all(m.value == 6 for m in participants)
    assert result["after"] == "(none)"  # the request ended with the run
