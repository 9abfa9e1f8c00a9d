"""Checkpoints and exact resume: the file format, atomic commits, a checkpoint refused for another
run, model or data, and runs killed with SIGKILL then resumed bit-identically, through the real
`fedray` CLI and in the shared Ray session."""

from __future__ import annotations

import json
import os
import re
import signal
from pathlib import Path

import numpy as np
import pytest
import yaml
from mlflow import MlflowClient

from conftest import history, small_job
from fedray.config import parse_job
from fedray.platform.checkpoint import CheckpointError, CheckpointStore, pack, unpack
from test_tracking import Cli

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
    store.save({"round": 1, "x": np.zeros(3)}, {"records": {"0": {"version": 1}}})
    real = CheckpointStore._write

    def crash_at_commit(self, name, data):
        if name == "run.npz":
            with self._fs.open_output_stream(f"{self._root}/run.npz.partial.tmp") as out:  # cut short
                out.write(data[:len(data) // 3])
            raise OSError("disk gone")
        real(self, name, data)

    monkeypatch.setattr(CheckpointStore, "_write", crash_at_commit)
    with pytest.raises(OSError):
        store.save({"round": 2, "x": np.ones(3)}, {"records": {"0": {"version": 2}, "1": {"version": 1}}})
    state, changes = CheckpointStore(str(tmp_path / "run")).load()
    assert state["round"] == 1 and changes == [{"records": {"0": {"version": 1}}}]  # round 2's ignored
    np.testing.assert_array_equal(state["x"], np.zeros(3))


def test_a_checkpoint_written_in_the_background_reports_its_failure(tmp_path, monkeypatch):
    store = CheckpointStore(str(tmp_path / "run"))
    store.save_later({"round": 1}, dict)
    store.wait()
    monkeypatch.setattr(CheckpointStore, "_write", lambda self, name, data: (_ for _ in ()).throw(OSError("disk full")))
    store.save_later({"round": 2}, dict)
    with pytest.raises(CheckpointError, match=r"cannot write the checkpoint to .*run: OSError: disk full"):
        store.wait()
    assert CheckpointStore(str(tmp_path / "run")).load()[0]["round"] == 1


def test_a_store_at_an_fsspec_uri():
    store = CheckpointStore("memory://fedray-test/run")
    store.save({"round": 4, "x": np.arange(3)}, {"records": {"2": {"version": 1}}})
    store.charge(5, {"trainings": [[2, 5]]})
    state, changes = CheckpointStore("memory://fedray-test/run").load()
    assert state["round"] == 4 and changes[0]["records"] == {"2": {"version": 1}}
    assert store.charges(after=4) == [(5, {"trainings": [[2, 5]]})] and store.charges(after=5) == []


def write_job(tmp_path, **overrides):
    raw = small_job(**({"rounds": 5} | overrides), checkpoint={"path": str(tmp_path / "checkpoints")})
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


@pytest.mark.usefixtures("ray_session")
def test_a_killed_fedray_run_resumes_bit_identical(tmp_path, tracking_uri, ray_address):
    """The `fedray run` process (joined to the tests' Ray, as a submitted job is) is killed with
    SIGKILL after round 3 of 5, and its driver and workers with it; `fedray resume <run id>`
    continues the same MLflow run, which ends FINISHED with the same final parameters and the same
    logged metrics as an uninterrupted run."""
    from fedray.platform.run import run_job

    raw, path = write_job(tmp_path, strategy={"name": "fedadam", "server_lr": 0.05})
    uninterrupted = run_job(parse_job(raw), yaml.safe_dump(raw), tracking_uri)["run_id"]
    killed = Cli("run", str(path), "--tracking-uri", tracking_uri, cwd=tmp_path, ray_address=ray_address)
    killed.wait_for(r"round 3/5")
    os.killpg(killed.process.pid, signal.SIGKILL)
    killed.finish()
    (run,) = set(os.listdir(tmp_path / "checkpoints")) - {uninterrupted}
    client = MlflowClient(tracking_uri)
    assert client.get_run(run).info.status == "RUNNING"
    resumed = Cli("resume", run, "--tracking-uri", tracking_uri, cwd=tmp_path, ray_address=ray_address)
    code, output = resumed.finish()
    assert code == 0, output
    assert re.search(rf"Resuming run {run} \('test'\) after round [2345] of 5", output)
    assert re.search(r"resumed at +round [2345] of 5: the model and server state, the sampler", output), output
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
@pytest.mark.parametrize("mode", ["simulation", "deployment"])
def test_a_killed_driver_resumes_bit_identical(tmp_path, tracking_uri, mode):
    """The driver process dies (SIGKILL) after round 2 of a SCAFFOLD run; resuming from its
    checkpoint gives the same final parameters as an uninterrupted run: the devices' control
    variates (in deployment mode read from and handed back to the devices) and the server's, the
    sampler and the round log all come back. The simulated run also compresses its updates (top-k,
    4 bits) and its broadcasts (8 bits): the devices' error-feedback residuals come back with
    their records, the view devices hold and what each has applied with the driver's state."""
    from fedray.platform.run import RunError, run_job

    compression = {"uplink": [{"kind": "topk", "fraction": 0.1}, {"kind": "quantize", "bits": 4}],
                   "downlink": [{"kind": "quantize", "bits": 8}]}
    raw, _ = write_job(tmp_path, strategy={"name": "scaffold"}, devices__per_round=3,
                       **({"compression": compression} if mode == "simulation" else {}))
    if mode == "deployment":  # an actor per device: 3 of them
        raw["devices"] = {k: v for k, v in raw["devices"].items() if k != "workers"} | {"mode": mode, "count": 3}
    job = parse_job(raw)
    whole = run_job(job, yaml.safe_dump(raw), tracking_uri)
    with pytest.raises(RunError, match="died"):
        run_job(job, yaml.safe_dump(raw), tracking_uri, on_round=kill_driver_after(2))
    run = next(r for r in os.listdir(tmp_path / "checkpoints") if r != whole["run_id"])
    location = CheckpointStore.of_run(str(tmp_path / "checkpoints"), run).location
    assert CheckpointStore(location).load()[0]["round"] in (1, 2)  # round 2's may have been cut short
    summary = run_job(job, yaml.safe_dump(raw), tracking_uri, resume=(run, location))
    assert summary["rounds"] == 5 and summary["test_loss"] == whole["test_loss"]
    np.testing.assert_array_equal(final_params(tmp_path, run), final_params(tmp_path, whole["run_id"]))
    client = MlflowClient(tracking_uri)
    assert client.get_run(run).info.status == "FINISHED"
    for key in COMPARED:
        assert last_per_step(client, run, key) == history(client, whole["run_id"], key), key
    state, changes = CheckpointStore(location).load()
    records = {d: r for change in changes for d, r in change["records"].items()}
    kept = ["control", "residual"] if mode == "simulation" else ["control"]
    assert len(records) == job.devices.count
    assert all(r[k].shape == state["server"]["params"].shape for r in records.values() for k in kept)


def killed_and_checkpointed(tmp_path, tracking_uri, raw, after: int, once_written: str | None = None
                            ) -> tuple[str, str]:
    """Run ``raw`` until its driver is killed (SIGKILL) after round ``after`` or, with
    ``once_written``, as soon as that file of its checkpoint folder appears; its run id and
    checkpoint location."""
    import threading
    import time

    from fedray.platform.run import RunError, run_job

    kill = kill_driver_after(after)

    def on_round(result):
        if once_written is None:
            return kill(result)

        def watch():
            (folder,) = (tmp_path / "checkpoints").iterdir()
            while not (folder / once_written).exists():
                time.sleep(0.005)
            kill(result)
        if result.round == after:
            threading.Thread(target=watch, daemon=True).start()

    with pytest.raises(RunError) as error:
        run_job(parse_job(raw), yaml.safe_dump(raw), tracking_uri, on_round=on_round)
    return error.value.run_id, CheckpointStore.of_run(str(tmp_path / "checkpoints"), error.value.run_id).location


@pytest.mark.usefixtures("ray_session")
def test_a_resumed_client_dp_run_counts_the_interrupted_round_and_stops_at_its_budget(tmp_path, tracking_uri):
    """Client-level DP: the noise and the sample are secret, so the rounds are not replayed; but
    the round a crash cut short had already released what its devices sent, so the ledger counts
    it (written ahead), and the budget stop fires when the ledger, not the round count, says."""
    from fedray.platform.privacy import Ledger
    from fedray.platform.run import run_job

    privacy = {"level": "client", "noise_multiplier": 2.5, "sampling_rate": 0.5, "budget": {"epsilon": 3.0}}
    raw, _ = write_job(tmp_path, rounds=40, privacy=privacy, devices__local={"steps": 4},
                       devices__speed={"kind": "slow_fraction", "fraction": 1.0, "slowdown": 1.0, "step_seconds": 0.05})
    job = parse_job(raw)
    affordable = Ledger.of(job).affordable(3.0)
    assert 5 < affordable < 40
    run, location = killed_and_checkpointed(tmp_path, tracking_uri, raw, after=3, once_written="ledger/000000004.json")
    checkpointed = CheckpointStore(location).load()[0]["round"]
    cut_short = len(CheckpointStore(location).charges(after=checkpointed))
    # round 4 had begun: its spend was written ahead (and round 3's, if its checkpoint was cut short)
    assert checkpointed in (2, 3) and cut_short == 4 - checkpointed
    summary = run_job(job, yaml.safe_dump(raw), tracking_uri, resume=(run, location))
    client = MlflowClient(tracking_uri)
    report = json.loads(Path(client.download_artifacts(run, "privacy_report.json", str(tmp_path))).read_text())
    assert summary["rounds"] == affordable - cut_short  # one round fewer: the lost one was paid for
    assert report["rounds"] == affordable and summary["epsilon"] <= 3.0 < Ledger.of(job).epsilon(affordable + 1)
    assert "privacy budget" in summary["stopped"]
    assert history(client, run, "epsilon")[-1] == pytest.approx(summary["epsilon"])


def resume_cli(target: str, tracking_uri: str):
    """`fedray resume TARGET`, in this process: a refused checkpoint stops it before Ray is asked
    for anything. Its result: ``exit_code``, ``stderr``."""
    from click.testing import CliRunner

    from fedray.cli import main

    return CliRunner().invoke(main, ["resume", target, "--tracking-uri", tracking_uri])


@pytest.mark.usefixtures("ray_session")
def test_a_checkpoint_of_another_run_or_data_or_a_corrupt_one_is_refused(tmp_path, tracking_uri, monkeypatch):
    from fedray.platform.run import run_job

    monkeypatch.chdir(tmp_path)

    x, y = np.random.default_rng(0).normal(size=(120, 8)).astype(np.float32), np.arange(120) % 3
    np.savez(tmp_path / "data.npz", x=x, y=y)
    raw, _ = write_job(tmp_path, rounds=2, data={"dataset": "npz", "path": str(tmp_path / "data.npz"),
                                                 "partition": {"kind": "iid"}})
    runs = [run_job(parse_job(raw), yaml.safe_dump(raw), tracking_uri)["run_id"] for _ in range(2)]
    a, b = (CheckpointStore.of_run(str(tmp_path / "checkpoints"), r).location for r in runs)
    files = {}

    def snapshot_files():
        return {p: p.read_bytes() for p in (tmp_path / "checkpoints").rglob("*") if p.is_file()}

    (tmp_path / "checkpoints" / runs[1] / "run.npz").write_bytes((tmp_path / "checkpoints" / runs[0] / "run.npz").read_bytes())
    files = snapshot_files()
    refused = resume_cli(b, tracking_uri)
    assert refused.exit_code == 1
    assert f"is of run {runs[0]}, not of run {runs[1]}" in refused.stderr and len(refused.stderr.splitlines()) == 1
    np.savez(tmp_path / "data.npz", x=x + 1, y=y)  # the data changed since
    refused = resume_cli(a, tracking_uri)
    assert "was trained on other data" in refused.stderr and refused.exit_code == 1
    (tmp_path / "checkpoints" / runs[0] / "run.npz").write_bytes(b"PK\x03\x04 cut short")
    files[tmp_path / "checkpoints" / runs[0] / "run.npz"] = b"PK\x03\x04 cut short"
    refused = resume_cli(a, tracking_uri)
    assert "not a fedray checkpoint file" in refused.stderr and refused.exit_code == 1
    assert snapshot_files() == files  # nothing was overwritten
    client = MlflowClient(tracking_uri)
    assert [client.get_run(r).info.status for r in runs] == ["FINISHED", "FINISHED"]
    assert "neither a checkpoint folder nor the id of a run" in resume_cli("0" * 32, tracking_uri).stderr


def test_devices_keep_their_state_when_the_workers_that_trained_them_die(local_driver):
    """SCAFFOLD: every device's control variate is its record, not its worker's memory. Both
    workers are killed after round 1; every record still counts each accepted training."""
    import ray

    driver = local_driver(small_job(rounds=3, strategy={"name": "scaffold"}, devices__per_round=6, devices__workers=2))
    accepted = {d: 0 for d in range(6)}
    for r in (1, 2, 3):
        if r == 2:
            for worker in list(driver.pool.workers.actors):
                ray.kill(worker, no_restart=True)
        result = driver.run_round(r)
        for d in set(range(6)) - set(result.failures):
            accepted[d] += 1
        if r == 2:
            assert 1 <= len(result.failures) <= 2  # a device on each dead worker
    records = {d: ray.get(ref) for d, ref in driver.pool.record_refs(list(range(6))).items()}
    assert {d: records[d].version for d in range(6)} == accepted and min(accepted.values()) == 2
    assert all(np.abs(records[d].control).sum() > 0 for d in range(6))
    driver.finish()


@pytest.mark.usefixtures("ray_session")
def test_a_resumed_encrypted_run_cannot_decrypt_again_what_was_decrypted_before(tmp_path, tracking_uri):
    """CKKS: no secret is written. A resumed run's key authority has new keys and tag seeds, and
    starts from the record (written before each decryption) of every contribution the run's
    authorities decrypted: an update sent before the crash cannot be decrypted again, alone or
    in another sum, so no difference of two sums over one round can be formed."""
    from fedray.platform.run import run_job
    from fedray.secure.authority import DecryptionRefused, KeyAuthority, _open
    from fedray.secure.plan import SumLoader

    raw, _ = write_job(tmp_path, rounds=4, secure={"preset": "balanced", "min_clients": 2})
    raw["checkpoint"]["every"] = 2
    run, location = killed_and_checkpointed(tmp_path, tracking_uri, raw, after=3)  # round 3 not checkpointed
    store = CheckpointStore(location)
    before = store.decrypted()
    assert {r for _, r in before} == {1, 2, 3} and len(before) == 12  # 4 devices in each of rounds 1 to 3
    assert not any("secret" in p.name or "key" in p.name for p in Path(location).rglob("*"))
    assert store.load()[0]["round"] == 2
    summary = run_job(parse_job(raw), yaml.safe_dump(raw), tracking_uri, resume=(run, location))
    # round 3, decrypted before the crash, runs again: its sum is refused, it fails, the model stays
    assert history(MlflowClient(tracking_uri), run, "decryption_refused") == [1.0]
    assert summary["rounds"] == 4 and summary["completed_rounds"] == 3
    assert {r for _, r in store.decrypted()} == {1, 2, 3, 4}
    # an authority of this run (as a resumed one starts) refuses what was decrypted before it, even
    # when the devices sent it again (a curious driver asking for round 1 once more)
    authority = KeyAuthority(secure_plan(parse_job(raw)), location)
    assert before <= authority._spent
    total = SumLoader(authority.plan, authority.public_context()).empty()
    again = sorted(c for c in before if c[1] == 1)[:2]  # two of round 1's contributions
    total.contributions = [(d, r, "") for d, r in again]
    with pytest.raises(DecryptionRefused, match=re.escape(f"contributions {again} (device, round) were decrypted")):
        _open(authority.plan, authority._keys, authority._seeds, authority._spent, total, again)


def secure_plan(job):
    import math

    from fedray.platform import strategies
    from fedray.platform.prepare import prepare
    from fedray.secure.plan import SecurePlan

    prepared = prepare(job)
    split, spec = prepared.split, prepared.layout.shared
    weigh = strategies.for_job(job).weigh
    return SecurePlan.of(job, spec.names, [math.prod(s) for s in spec.shapes], split.train_sizes.tolist(),
                         lambda samples: weigh(samples, 1)[0])


@pytest.mark.usefixtures("ray_session")
def test_a_resumed_asynchronous_run_continues_from_its_checkpointed_step(tmp_path, tracking_uri):
    """FedBuff: arrival order depends on timing, so a resumed run is not bit-identical. What holds:
    it continues from the checkpointed model and server step, with the dispatch count (which
    seeds each device's training) continuing, not restarting, and the staleness record kept; the
    tasks that were in flight are not carried over (their devices train again)."""
    from fedray.platform.run import run_job

    raw, _ = write_job(tmp_path, rounds=6, strategy={"name": "fedbuff", "buffer_size": 2, "concurrency": 3})
    run, location = killed_and_checkpointed(tmp_path, tracking_uri, raw, after=3)
    at_kill = CheckpointStore(location).load()[0]
    steps = at_kill["round"]
    assert steps in (2, 3) and at_kill["server"]["round"] == steps and at_kill["dispatched"] >= 2 * steps
    summary = run_job(parse_job(raw), yaml.safe_dump(raw), tracking_uri, resume=(run, location))
    final = CheckpointStore(location).load()[0]
    assert summary["rounds"] == 6 and final["server"]["round"] == 6
    assert final["dispatched"] >= at_kill["dispatched"] + 2 * (6 - steps)  # two arrivals a step
    client = MlflowClient(tracking_uri)
    assert client.get_run(run).info.status == "FINISHED" and len(last_per_step(client, run, "participants")) == 6
    folded = sum(n for _, n in final["staleness"])
    assert folded == 12 and sum(n for _, n in at_kill["staleness"]) == 2 * steps  # each folded update once
