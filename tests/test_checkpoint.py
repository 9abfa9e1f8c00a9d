"""Checkpoints and exact resume: the file format, atomic commits, a checkpoint refused for another
run, model or data, and runs killed with SIGKILL then resumed bit-identically, through the real
`fedray` CLI and in the shared Ray session."""

from __future__ import annotations

import os
import re
import signal
import subprocess

import numpy as np
import pytest
import yaml
from mlflow import MlflowClient

from conftest import history, small_job
from fedray.config import parse_job
from fedray.platform.checkpoint import CheckpointError, CheckpointStore, pack, unpack
from test_tracking import BIN, Cli, run_id

COMPARED = ("test_loss", "test_accuracy", "train_loss", "participants", "update_norm")


def test_pack_round_trips_arrays_and_refuses_what_is_not_a_checkpoint(tmp_path):
    tree = {"round": 3, "server": {"params": np.arange(5, dtype=np.float32), "buffers": [np.ones((2, 2))]},
            "sampler": {"state": 2**100 + 7}, "stopped": None, "history": [{"failures": {"4": "x"}}]}
    back = unpack(pack(tree))
    assert back["sampler"]["state"] == 2**100 + 7 and back["history"] == tree["history"] and back["stopped"] is None
    np.testing.assert_array_equal(back["server"]["params"], tree["server"]["params"])
    assert back["server"]["params"].dtype == np.float32 and back["server"]["buffers"][0].shape == (2, 2)
    data = pack(tree)
    for bad in (data[:len(data) // 2], b"not a zip", data[:100] + bytes(50) + data[150:]):
        with pytest.raises(CheckpointError, match="not a fedray checkpoint file"):
            unpack(bad)


def test_a_crash_while_checkpointing_leaves_the_previous_checkpoint(tmp_path, monkeypatch):
    store = CheckpointStore(str(tmp_path / "run"))
    store.save({"round": 1, "x": np.zeros(3)}, {"records": {"0": {"version": 1}}, "spend": {}})
    real = CheckpointStore._write

    def crash_at_commit(self, name, data):
        if name == "run.npz":
            with self._fs.open_output_stream(f"{self._root}/run.npz.partial.tmp") as out:  # cut short
                out.write(data[:len(data) // 3])
            raise OSError("disk gone")
        real(self, name, data)

    monkeypatch.setattr(CheckpointStore, "_write", crash_at_commit)
    with pytest.raises(OSError):
        store.save({"round": 2, "x": np.ones(3)}, {"records": {"0": {"version": 2}, "1": {"version": 1}}, "spend": {}})
    state, changes = CheckpointStore(str(tmp_path / "run")).load()
    assert state["round"] == 1 and changes == [{"records": {"0": {"version": 1}}, "spend": {}}]  # round 2's ignored
    np.testing.assert_array_equal(state["x"], np.zeros(3))


def test_a_store_at_an_fsspec_uri():
    store = CheckpointStore("memory://fedray-test/run")
    store.save({"round": 4, "x": np.arange(3)}, {"records": {"2": {"version": 1}}, "spend": {}})
    store.charge(5, {"trainings": [[2, 5]]})
    state, changes = CheckpointStore("memory://fedray-test/run").load()
    assert state["round"] == 4 and changes[0]["records"] == {"2": {"version": 1}}
    assert store.charges(after=4) == [(5, {"trainings": [[2, 5]]})] and store.charges(after=5) == []


def write_job(tmp_path, **overrides):
    raw = small_job(rounds=5, checkpoint={"path": str(tmp_path / "checkpoints")}, **overrides)
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(raw))
    return raw, path


def final_params(tmp_path, run: str) -> np.ndarray:
    return CheckpointStore.of_run(str(tmp_path / "checkpoints"), run).load()[0]["server"]["params"]


def last_per_step(client, run: str, key: str) -> list[float]:
    """A metric's value at each step, the last logged where a resumed run logged a step twice."""
    latest = {}
    for m in sorted(client.get_metric_history(run, key), key=lambda m: m.timestamp):
        latest[m.step] = m.value
    return [latest[step] for step in sorted(latest)]


def test_a_killed_fedray_run_resumes_bit_identical(tmp_path, tracking_uri):
    """The `fedray run` process and its Ray are killed with SIGKILL after round 2 of 5; `fedray
    resume <run id>` continues the same MLflow run, which ends FINISHED with the same final
    parameters and the same logged metrics as an uninterrupted run."""
    raw, path = write_job(tmp_path, strategy={"name": "fedadam", "server_lr": 0.05})
    env = os.environ | {"MLFLOW_TRACKING_URI": tracking_uri}
    whole = subprocess.run([str(BIN / "fedray"), "run", str(path)], cwd=tmp_path, env=env, capture_output=True,
                           text=True, timeout=300)
    assert whole.returncode == 0, whole.stderr
    uninterrupted = run_id(whole.stdout)
    killed = Cli("run", str(path), "--tracking-uri", tracking_uri, cwd=tmp_path)
    killed.wait_for(r"round 3/5")
    os.killpg(killed.process.pid, signal.SIGKILL)
    killed.finish()
    (run,) = set(os.listdir(tmp_path / "checkpoints")) - {uninterrupted}
    client = MlflowClient(tracking_uri)
    assert client.get_run(run).info.status == "RUNNING"
    resumed = Cli("resume", run, "--tracking-uri", tracking_uri, cwd=tmp_path)
    code, output = resumed.finish()
    assert code == 0, output
    assert re.search(rf"Resuming run {run} \('test'\) after round [345] of 5", output)
    assert client.get_run(run).info.status == "FINISHED"
    np.testing.assert_array_equal(final_params(tmp_path, run), final_params(tmp_path, uninterrupted))
    for key in COMPARED:
        assert last_per_step(client, run, key) == history(client, uninterrupted, key), key
    assert not (tmp_path / "fedray-runs" / run).exists()  # the journal was sent and removed


def kill_driver_after(round_: int):
    """An ``on_round`` that kills the Driver actor's process with SIGKILL after round ``round_``
    (the local Ray this process started runs its actors as its descendants)."""
    import psutil

    def on_round(result):
        if result.round == round_:
            for process in psutil.Process().children(recursive=True):
                if process.cmdline()[:1] and process.cmdline()[0].startswith("ray::Driver"):
                    process.send_signal(signal.SIGKILL)
    return on_round


@pytest.mark.usefixtures("ray_session")
@pytest.mark.parametrize("strategy", [{"name": "fedavg"}, {"name": "scaffold"}])
def test_a_killed_driver_resumes_bit_identical(tmp_path, tracking_uri, strategy):
    """The driver process dies (SIGKILL) after round 2; resuming from its checkpoint gives the same
    final parameters as an uninterrupted run: SCAFFOLD's device control variates and server
    control, the sampler and the round log all come back."""
    from fedray.platform.run import RunError, run_job

    raw, _ = write_job(tmp_path, strategy=strategy, devices__per_round=3)
    job = parse_job(raw)
    whole = run_job(job, yaml.safe_dump(raw), tracking_uri)
    with pytest.raises(RunError, match="died"):
        run_job(job, yaml.safe_dump(raw), tracking_uri, on_round=kill_driver_after(2))
    run = next(r for r in os.listdir(tmp_path / "checkpoints") if r != whole["run_id"])
    location = CheckpointStore.of_run(str(tmp_path / "checkpoints"), run).location
    assert CheckpointStore(location).load()[0]["round"] == 2
    summary = run_job(job, yaml.safe_dump(raw), tracking_uri, resume=(run, location))
    assert summary["rounds"] == 5 and summary["test_loss"] == whole["test_loss"]
    np.testing.assert_array_equal(final_params(tmp_path, run), final_params(tmp_path, whole["run_id"]))
    client = MlflowClient(tracking_uri)
    assert client.get_run(run).info.status == "FINISHED"
    for key in COMPARED:
        assert last_per_step(client, run, key) == history(client, whole["run_id"], key), key
    if strategy["name"] == "scaffold":
        state, changes = CheckpointStore(location).load()
        records = {d: r for change in changes for d, r in change["records"].items()}
        assert len(records) == 6 and all(r["control"].shape == state["server"]["params"].shape for r in records.values())
