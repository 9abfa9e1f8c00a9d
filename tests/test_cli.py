"""The `fedray` command line, run in-process on the session's Ray."""

import os

import numpy as np
import pytest
import yaml
from click.testing import CliRunner
from mlflow import MlflowClient

from fedray.cli import main

from conftest import small_job

pytestmark = pytest.mark.usefixtures("ray_session")


def write_job(tmp_path, **overrides):
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(small_job(**overrides)))
    return str(path)


def test_run_prints_progress_and_summary(tmp_path, tracking_uri):
    result = CliRunner().invoke(main, ["run", write_job(tmp_path), "--tracking-uri", tracking_uri,
                                       "--set", "rounds=3"])
    assert result.exit_code == 0, result.output
    assert "round 3/3" in result.output and "3/3 rounds completed" in result.output
    assert f"mlflow ui --backend-store-uri {tracking_uri}" in result.output
    run_id = result.output.split("MLflow run")[1].split()[0]
    run = MlflowClient(tracking_uri).get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.params["rounds"] == "3"


def test_run_refuses_bad_data_before_creating_anything(tmp_path):
    job = write_job(tmp_path, data={"dataset": "npz", "path": str(tmp_path / "missing.npz")})
    result = CliRunner().invoke(main, ["run", job, "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}"])
    assert result.exit_code == 1
    assert f"data.path: {tmp_path / 'missing.npz'} does not exist" in result.output
    assert "Traceback" not in result.output and not (tmp_path / "mlflow.db").exists()


def test_validate_checks_the_user_model_imports(tmp_path):
    job = write_job(tmp_path, model={"class": "no_such_module:Net"})
    result = CliRunner().invoke(main, ["validate", job])
    assert result.exit_code == 1 and "model.class: cannot import module 'no_such_module'" in result.output
    ok = CliRunner().invoke(main, ["validate", write_job(tmp_path, model={
        "class": "user_models:SlowLogReg", "kwargs": {"features": 64, "classes": 10, "sleep_s": 0}})])
    assert ok.exit_code == 0, ok.output


def test_validate_imports_user_models_from_the_working_directory(tmp_path, monkeypatch):
    (tmp_path / "mynets.py").write_text("import torch\nclass Net(torch.nn.Linear):\n"
                                        "    def forward(self, x):\n        return super().forward(x.flatten(1))\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("sys.path", [p for p in __import__("sys").path if p not in ("", str(tmp_path))])
    job = write_job(tmp_path, model={"class": "mynets:Net", "kwargs": {"in_features": 64, "out_features": 10}})
    result = CliRunner().invoke(main, ["validate", job])
    assert result.exit_code == 0, result.output


def test_run_rejects_a_bad_job_before_starting_anything(tmp_path):
    result = CliRunner().invoke(main, ["run", write_job(tmp_path, devices__per_round=50)])
    assert result.exit_code == 1 and "devices.per_round (50) exceeds devices.count (6)" in result.output


def test_privacy_plan_prints_the_spend_and_the_rounds_a_budget_affords(tmp_path):
    from fedray.platform.privacy import Ledger

    job = write_job(tmp_path, rounds=30, privacy={"level": "client", "noise_multiplier": 1.5, "budget": {"epsilon": 5}})
    result = CliRunner().invoke(main, ["privacy", "plan", job])
    assert result.exit_code == 0, result.output
    rdp, prv = Ledger(1.5, 4 / 6, 1e-5, "rdp"), Ledger(1.5, 4 / 6, 1e-5, "prv")
    assert f"rdp: epsilon {rdp.epsilon(30):.3f} after 30 rounds" in result.output
    assert f"prv: epsilon {prv.epsilon(30):.3f} after 30 rounds" in result.output
    affordable = rdp.affordable(5)
    assert 0 < affordable < 30 and f"{affordable} rounds affordable (rdp); the run stops before round {affordable + 1}" \
        in result.output
    more = CliRunner().invoke(main, ["privacy", "plan", job, "--rounds", "3"])
    assert f"rdp: epsilon {rdp.epsilon(3):.3f} after 3 rounds" in more.output
    missing = CliRunner().invoke(main, ["privacy", "plan", write_job(tmp_path)])
    assert missing.exit_code != 0 and "no privacy section" in missing.output


def test_a_run_that_trains_nothing_fails_and_logs_no_model(tmp_path, tracking_uri):
    job = write_job(tmp_path, model={"class": "user_models:SlowLogReg",
                                     "kwargs": {"features": 64, "classes": 10, "sleep_s": 0.5}},
                    devices__timeout_s=1.0, devices__local={"steps": 6}, devices__workers=2,
                    tracking={"experiment": "t", "log_model": True})
    result = CliRunner().invoke(main, ["run", job, "--tracking-uri", tracking_uri, "--runs-dir", str(tmp_path / "r")])
    assert result.exit_code == 1 and "Traceback" not in result.output
    # per round: one device per worker started and hung it; two waited for a free worker
    assert ("no round completed: 2 rounds failed; device failures: 4x no answer within 1s (devices.timeout_s); "
            "4x no worker was free within the round's 1s") in result.output
    client = MlflowClient(tracking_uri)
    run = client.get_run(result.output.split("MLflow run ")[1].split()[0])
    assert run.info.status == "FAILED" and run.data.tags["fedray.error"].startswith("no round completed")
    assert {a.path for a in client.list_artifacts(run.info.run_id)} == {"job.yaml", "rounds.json", "accuracy_loss.png",
                                                                        "participation.json"}


def _listening_socket():
    """A TCP port that accepts connections and never answers."""
    import socket

    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    return server


def _immutable(path) -> bool:
    """Make ``path`` read-only even for root (chattr +i), if this file system can."""
    import subprocess

    return subprocess.run(["chattr", "+i", str(path)], capture_output=True).returncode == 0


@pytest.mark.parametrize("store", ["refused", "silent", "corrupt", "no_directory", "read_only"])
def test_a_bad_tracking_store_fails_fast_and_creates_nothing(tmp_path, store):
    import socket
    import subprocess
    import time

    db = tmp_path / "mlflow.db"
    silent = None
    if store == "refused":
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            uri = f"http://127.0.0.1:{s.getsockname()[1]}"
        expected = f"tracking store {uri}: connection refused"
    elif store == "silent":
        silent = _listening_socket()
        uri = f"http://127.0.0.1:{silent.getsockname()[1]}"
        expected = f"tracking store {uri} did not answer within 5s"
    elif store == "corrupt":
        db.write_bytes(b"not a database" * 100)
        uri, expected = f"sqlite:///{db}", f"tracking store sqlite:///{db}: cannot read the database: file is not a database"
    elif store == "no_directory":
        uri = f"sqlite:///{tmp_path / 'gone' / 'mlflow.db'}"
        expected = f"tracking store {uri}: the database's directory {tmp_path / 'gone'} does not exist"
    else:
        db.write_bytes(b"")
        db.chmod(0o444)
        if not _immutable(db) and os.geteuid() == 0:
            pytest.skip("no way to make a file read-only for root here")
        uri, expected = f"sqlite:///{db}", f"tracking store sqlite:///{db}: the database file is read-only for this user"
    job = write_job(tmp_path)
    try:
        for command in ("validate", "run"):
            started = time.monotonic()
            runs = ["--runs-dir", str(tmp_path / "r")] if command == "run" else []
            result = CliRunner().invoke(main, [command, job, "--tracking-uri", uri, *runs])
            took = time.monotonic() - started
            assert result.exit_code == 1 and result.output.strip() == f"Error: {expected}", result.output
            assert took < 8, took  # the silent server gets 5 s
    finally:
        if silent is not None:
            silent.close()
        if store == "read_only":
            subprocess.run(["chattr", "-i", str(db)], capture_output=True)
    assert not (tmp_path / "r").exists() and (store in ("corrupt", "read_only") or not db.exists())


def _npz(path, **arrays):
    np.savez(path, **arrays)
    return str(path)


DIGITS_X = np.random.default_rng(0).random((60, 8), dtype=np.float32)
DIGITS_Y = np.arange(60) % 3


def _bad_inputs(tmp):
    """(job overrides, the message expected) for each bad input ``validate`` must catch."""
    nan_x = DIGITS_X.copy()
    nan_x[7, 2] = np.nan
    quoted = tmp / "quoted.csv"
    quoted.write_text('"f1","label"\n' + "\n".join(f"{i / 10},{i % 2}" for i in range(40)) + "\n")
    (tmp / "garbage.npz").write_bytes(b"garbage")
    npz = lambda **arrays: {"data": {"dataset": "npz", "path": _npz(tmp / f"{len(list(tmp.iterdir()))}.npz", **arrays)}}
    csv = lambda path, column="label": {"data": {"dataset": "csv", "path": str(path), "label_column": column}}
    user = lambda cls, **kwargs: {"model": {"class": cls, "kwargs": kwargs}}
    return [
        ({"data": {"dataset": "npz", "path": str(tmp / "none.npz")}}, f"data.path: {tmp / 'none.npz'} does not exist"),
        ({"data": {"dataset": "npz", "path": str(tmp)}}, f"data.path: {tmp} is a directory; it must be a .npz file"),
        ({"data": {"dataset": "npz", "path": str(tmp / "garbage.npz")}}, f"data.path: cannot read {tmp / 'garbage.npz'} as .npz"),
        (npz(x=DIGITS_X), "it lacks arrays ['y']; it must hold 'x' and 'y'"),
        (npz(x=DIGITS_X, y=DIGITS_Y[:50]), "labels must be one per sample, got shape (50,) for 60 samples"),
        (npz(x=nan_x, y=DIGITS_Y), "features of 1 samples are NaN, infinite or beyond float32 (first: sample 7)"),
        (npz(x=DIGITS_X, y=DIGITS_Y + 0.5), "labels must be integers, got 0.5 at sample 0"),
        (npz(x=DIGITS_X, y=DIGITS_Y - 1), "labels must be class indices 0, 1, ..., got -1 at sample 0"),
        (npz(x=DIGITS_X, y=DIGITS_Y * 10_000), "labels must be class indices 0 to C-1, got largest label 20000"),
        (npz(x=DIGITS_X.astype(str), y=DIGITS_Y), "features must be a numeric array"),
        (csv(quoted, "target"), f"data.label_column 'target' is not a column of {quoted} (columns: ['f1', 'label'])"),
        ({**npz(x=DIGITS_X, y=DIGITS_Y), "devices": {"count": 40, "per_round": 4}},
         "data.partition (iid, holdout 0.2, 40 devices): 48 samples are too few for 40 devices"),
        (user("torch.nn:Linear", in_features=64), "model.kwargs: cannot build torch.nn:Linear with {'in_features': 64}"),
        (user("collections:OrderedDict"), "model.class: collections:OrderedDict built a OrderedDict, not a torch.nn.Module"),
        (user("torch.nn:Flatten"), "model torch.nn:Flatten: it has no trainable parameters"),
        (user("user_models:SlowLogReg", features=64, classes=7, sleep_s=0),
         "model user_models:SlowLogReg: it maps a batch of input shape (2, 1, 8, 8) to (2, 7); it must give (2, 10)"),
        (user("user_models:SlowLogReg", features=63, classes=10, sleep_s=0),
         "model user_models:SlowLogReg: layer 'linear' (Linear) failed on a batch of input shape (2, 1, 8, 8): "
         "RuntimeError: mat1 and mat2 shapes cannot be multiplied (2x64 and 63x10)"),
        ({"seed": 2**64}, "seed: Input should be less than 18446744073709551616"),
        ({"tracking": {"experiment": " "}}, "tracking.experiment: must not be empty or blank"),
        ({"rounds": True}, "rounds: Input should be a valid integer, got True"),
    ]


def test_validate_catches_what_run_would_hit_and_creates_nothing(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    data = tmp_path / "data"
    data.mkdir()
    for overrides, expected in _bad_inputs(data):
        job = tmp_path / "job.yaml"
        job.write_text(yaml.safe_dump({**small_job(), **overrides}))
        result = CliRunner().invoke(main, ["validate", str(job)])
        assert result.exit_code == 1 and expected in result.output, (overrides, result.output)
        assert "Traceback" not in result.output and len(result.output.strip().splitlines()) <= 2, result.output
    quoted = {**small_job(), "data": {"dataset": "csv", "path": str(data / "quoted.csv")}, "devices": {"count": 4,
              "per_round": 2}, "model": {"name": "logreg"}}
    job.write_text(yaml.safe_dump(quoted))
    ok = CliRunner().invoke(main, ["validate", str(job)])  # a quoted header names the label column 'label'
    assert ok.exit_code == 0, ok.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "job.yaml"]  # no mlflow.db, no run


def test_the_job_file_is_read_strictly(tmp_path):
    duplicate, latin = tmp_path / "duplicate.yaml", tmp_path / "latin.yaml"
    duplicate.write_text(yaml.safe_dump(small_job()) + "rounds: 3\n")
    line = len(duplicate.read_text().splitlines())
    latin.write_bytes("name: caf\xe9\n".encode("latin-1"))
    cases = [(["validate", str(duplicate)], f"Error: {duplicate} is not valid YAML: duplicate key 'rounds' at line {line}, column 1"),
             (["validate", str(latin)], f"Error: {latin} is not UTF-8 text: byte 0xe9 at offset 9"),
             (["validate", write_job(tmp_path), "--set", "rounds=[3"],
              "override 'rounds=[3': the value is not YAML (expected ',' or ']', but got '<stream end>'")]
    for args, expected in cases:
        result = CliRunner().invoke(main, args)
        assert result.exit_code == 1 and expected in result.output and len(result.output.splitlines()) == 1, result.output


def test_privacy_plan_refuses_absurd_inputs_and_stays_small(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    job = write_job(tmp_path, privacy={"level": "client", "noise_multiplier": 1.0})
    for args, expected in [(["--rounds", "10000000"], "10000000 is not in the range 1<=x<=1000000"),
                           (["--set", "privacy.noise_multiplier=0.01"], "privacy.noise_multiplier: Input should be "
                                                                        "greater than or equal to 0.3"),
                           (["--set", "privacy.delta=1e-300"], "privacy.delta: Input should be greater than or equal")]:
        result = CliRunner().invoke(main, ["privacy", "plan", job, *args])
        assert result.exit_code != 0 and expected in result.output, result.output
    fedray = Path(sys.executable).parent / "fedray"
    peak = {}
    for rounds in ("100", "1000000"):  # a million rounds: rdp only, in the memory of a hundred
        process = subprocess.Popen([str(fedray), "privacy", "plan", job, "--rounds", rounds], stdout=subprocess.PIPE,
                                   text=True)
        out = process.stdout.read()
        _, status, usage = os.wait4(process.pid, 0)
        assert status == 0 and "rdp: epsilon" in out, out
        peak[rounds] = usage.ru_maxrss
    assert "prv: not computed for more than 1000 compositions" in out
    assert peak["1000000"] < 1.2 * peak["100"], peak
