"""The `fedray` command line, run in-process on the session's Ray."""

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


def test_run_refuses_bad_data_before_creating_anything(tmp_path, tracking_uri):
    job = write_job(tmp_path, data={"dataset": "npz", "path": str(tmp_path / "missing.npz")})
    result = CliRunner().invoke(main, ["run", job, "--tracking-uri", tracking_uri])
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
