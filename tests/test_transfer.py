"""Transfer and personalization: starting weights, what trains, what stays on devices, the model
registry and the ONNX export."""

import json

import numpy as np
import pytest
import torch
import yaml
from click.testing import CliRunner
from mlflow import MlflowClient
from mlflow.artifacts import download_artifacts

from conftest import small_job
from fedray.agents.state import DeviceState
from fedray.agents.training import LocalTraining, train
from fedray.cli import main
from fedray.config import JobError, parse_job
from fedray.config.model import ModelSpec
from fedray.config.personalization import PersonalizationSpec
from fedray.data import datasets
from fedray.models.zoo import build_model
from fedray.platform.prepare import prepare
from fedray.platform.run import run_job
from fedray.transfer import export, weights
from fedray.transfer.layout import lay_out
from fedray.transfer.personal import Personal


def _state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


# -- starting weights ------------------------------------------------------------------------------

def test_start_weights_that_do_not_fit_are_named(tmp_path):
    mnist = build_model("small_cnn", None, {}, (1, 28, 28), 10, seed=1)
    digits = build_model("small_cnn", None, {}, (1, 8, 8), 10, seed=0)
    source = dict(mnist.state_dict())
    with pytest.raises(ValueError, match=r"model.start m.safetensors: parameter '8.weight' has shape \(10, 1568\) "
                                         r"there and \(10, 128\) in this model; start it fresh with model.replace"):
        weights.apply(digits, source, [], "m.safetensors")
    with pytest.raises(ValueError, match=r"has no parameter '1.bias' \(shape \(16,\) in this model\)"):
        weights.apply(digits, {k: v for k, v in source.items() if k != "1.bias"}, ["8"], "m")
    with pytest.raises(ValueError, match=r"holds parameters this model does not have: \['extra'\]"):
        weights.apply(digits, source | {"extra": torch.zeros(1)}, ["8"], "m")
    with pytest.raises(ValueError, match="model.replace: 'head' matches no parameter"):
        weights.apply(digits, source, ["head"], "m")
    fresh = _state(digits)
    weights.apply(digits, source, ["8"], "m")  # a new head: the rest from the source, the head as built
    for name, value in digits.state_dict().items():
        assert torch.equal(value, fresh[name] if name.startswith("8.") else source[name]), name


def test_weights_files_load_without_unpickling(tmp_path):
    model = build_model("mlp", None, {"hidden": [8]}, (4,), 3, seed=0)
    weights.save(model, tmp_path / "w.safetensors")
    torch.save(model.state_dict(), tmp_path / "w.pt")
    for name in ("w.safetensors", "w.pt"):
        loaded = weights.load(str(tmp_path / name))
        assert loaded.keys() == model.state_dict().keys()
        assert all(torch.equal(loaded[k], v) for k, v in model.state_dict().items())
    torch.save(model, tmp_path / "module.pt")  # a pickled module: loading it would run code
    with pytest.raises(ValueError, match="module.pt: cannot read weights"):
        weights.load(str(tmp_path / "module.pt"))
    with pytest.raises(ValueError, match="missing.pt: no such file"):
        weights.load(str(tmp_path / "missing.pt"))


# -- what trains, what is shared ------------------------------------------------------------------

def test_layout_splits_shared_frozen_and_personal():
    model = build_model("small_cnn", None, {"norm": "batch"}, (1, 8, 8), 10, seed=0)
    # layers: 1 conv, 2 BatchNorm, 5 conv, 6 BatchNorm, 10 the head
    with pytest.raises(ValueError, match="floating-point buffers.*running_mean.*personalization.method fedbn"):
        lay_out(model, ModelSpec(name="small_cnn"))
    fedbn = lay_out(model, ModelSpec(name="small_cnn", freeze=["1"]), PersonalizationSpec(method="fedbn"))
    assert fedbn.frozen == ("1.weight", "1.bias")
    assert not model.get_parameter("1.weight").requires_grad and model.get_parameter("5.weight").requires_grad
    assert fedbn.shared.names == ("5.weight", "5.bias", "10.weight", "10.bias")
    assert set(fedbn.personal.names) == {f"{layer}.{t}" for layer in (2, 6)
                                         for t in ("weight", "bias", "running_mean", "running_var")}
    plain = build_model("small_cnn", None, {}, (1, 8, 8), 10, seed=0)
    fedper = lay_out(plain, ModelSpec(name="small_cnn", train=["4", "8"]), PersonalizationSpec(method="fedper"))
    assert fedper.frozen == ("1.weight", "1.bias") and fedper.personal.names == ("8.weight", "8.bias")  # the head
    assert fedper.shared.names == ("4.weight", "4.bias") and fedper.shared.size == 16 * 32 * 9 + 32
    ditto = lay_out(plain, ModelSpec(name="small_cnn"), PersonalizationSpec(method="ditto"))
    assert ditto.personal == ditto.shared  # a whole personal copy of what is shared
    with pytest.raises(ValueError, match=r"model.freeze: 'conv1' matches no parameter of the model \(1.weight"):
        lay_out(plain, ModelSpec(name="small_cnn", freeze=["conv1"]))
    with pytest.raises(ValueError, match="nothing to federate"):
        lay_out(plain, ModelSpec(name="small_cnn", train=["8"]), PersonalizationSpec(method="fedper"))


def test_frozen_parameters_are_bit_identical_after_training():
    model = build_model("small_cnn", None, {}, (1, 8, 8), 10, seed=0)
    lay_out(model, ModelSpec(name="small_cnn", freeze=["1", "4"]))
    before = _state(model)
    data = datasets.load(parse_job(small_job()).data, 0)
    train(model, torch.from_numpy(data.x[:64]), torch.from_numpy(data.y[:64]),
          LocalTraining(epochs=2, batch_size=16, lr=0.5, momentum=0.9, weight_decay=0.01), torch.Generator())
    after = model.state_dict()
    for name in ("1.weight", "1.bias", "4.weight", "4.bias"):
        assert torch.equal(after[name], before[name]), name
    assert not torch.equal(after["8.weight"], before["8.weight"])


def test_fedrep_trains_the_head_then_only_the_body():
    model = build_model("mlp", None, {"hidden": [16]}, (1, 8, 8), 10, seed=0)
    spec = PersonalizationSpec(method="fedrep", head_epochs=2)
    layout = lay_out(model, ModelSpec(name="mlp"), spec)
    assert layout.personal.names == ("3.weight", "3.bias")
    personal = Personal(model, layout, spec, LocalTraining(epochs=1, batch_size=16, lr=0.2))
    data = datasets.load(parse_job(small_job()).data, 0)
    x, y = torch.from_numpy(data.x[:64]), torch.from_numpy(data.y[:64])
    start = _state(model)
    with personal.shared_training(x, y, torch.Generator().manual_seed(0)):
        head_trained = _state(model)
        assert [n for n, p in model.named_parameters() if p.requires_grad] == ["1.weight", "1.bias"]
        train(model, x, y, LocalTraining(epochs=1, batch_size=16, lr=0.2), torch.Generator())
    end = model.state_dict()
    assert torch.equal(head_trained["1.weight"], start["1.weight"]) and not torch.equal(head_trained["3.weight"],
                                                                                      start["3.weight"])
    assert torch.equal(end["3.weight"], head_trained["3.weight"]) and not torch.equal(end["1.weight"],
                                                                                    start["1.weight"])
    assert all(p.requires_grad for p in model.parameters())  # restored
    record = DeviceState().advanced(**personal.after(x, y, np.zeros(layout.shared.size, np.float32), DeviceState(),
                                                     torch.Generator()))
    assert DeviceState.from_dict(record.to_dict()).personal.tolist() == layout.personal.flatten(model).tolist()


def test_ditto_pulls_the_personal_model_towards_the_global_one():
    data = datasets.load(parse_job(small_job()).data, 0)
    x, y = torch.from_numpy(data.x[:128]), torch.from_numpy(data.y[:128])
    distances = []
    for lam in (0.01, 10.0):
        model = build_model("logreg", None, {}, (1, 8, 8), 10, seed=0)
        spec = PersonalizationSpec(method="ditto", lam=lam)
        layout = lay_out(model, ModelSpec(name="logreg"), spec)
        personal = Personal(model, layout, spec, LocalTraining(epochs=3, batch_size=16, lr=0.05))
        w = layout.shared.flatten(model)
        v = personal.after(x, y, w, DeviceState(), torch.Generator().manual_seed(0))["personal"]
        distances.append(np.linalg.norm(v - w))
    assert distances[1] < 0.5 * distances[0]


@pytest.mark.parametrize("change, message", [
    ({"personalization": {"method": "fedper"}, "privacy": {"level": "sample", "noise_multiplier": 1.0}},
     "personalization with privacy is not supported"),
    ({"personalization": {"method": "fedper"}, "strategy": {"name": "scaffold"}},
     "strategy scaffold corrects the gradients of the shared parameters"),
    ({"personalization": {"method": "none", "personal": ["8"]}}, "personal does not apply to method 'none'"),
    ({"personalization": {"method": "fedper", "lambda": 0.5}}, "lambda applies only to method 'ditto'"),
    ({"model": {"name": "logreg", "replace": ["1"]}}, "model.replace starts parameters fresh instead of from"),
    ({"model": {"name": "logreg", "freeze": ["1"], "train": ["1"]}}, "give model.freeze .* or model.train"),
    ({"tracking": {"register": "m", "log_model": False}}, "tracking.register and tracking.export need the final"),
    ({"tracking": {"export": "tflite"}}, "tracking.export"),
])
def test_impossible_combinations_are_refused(change, message):
    with pytest.raises(JobError, match=message):
        parse_job(small_job(**change))


def test_images_are_resized_to_the_models_input():
    job = parse_job(small_job(data={"dataset": "digits", "resize": [28, 28]}))
    data = datasets.load(job.data, 0)
    plain = datasets.load(parse_job(small_job()).data, 0)
    assert data.x.shape == (len(plain.x), 1, 28, 28) and data.x.dtype == np.float32
    assert abs(float(data.x.mean()) - float(plain.x.mean())) < 0.01  # bilinear: brightness kept
    with pytest.raises(JobError, match="data.resize: samples of shape"):
        prepare(parse_job(small_job(data={"dataset": "breast_cancer", "resize": [2, 2]})))


def test_onnx_export_reproduces_pytorch(tmp_path):
    model = build_model("small_cnn", None, {"norm": "batch"}, (1, 8, 8), 10, seed=0)
    data = datasets.load(parse_job(small_job()).data, 0)
    train(model, torch.from_numpy(data.x[:64]), torch.from_numpy(data.y[:64]), LocalTraining(), torch.Generator())
    check = export.to_onnx(model, data.x[:100], tmp_path / "m.onnx")  # running statistics are in it
    assert check["passed"] and check["max_abs_diff"] <= 1e-4 and check["samples"] == 100
    import onnxruntime

    session = onnxruntime.InferenceSession(str(tmp_path / "m.onnx"))
    assert session.run(None, {"input": data.x[:7]})[0].shape == (7, 10)  # any batch size


# -- end to end, through real MLflow ---------------------------------------------------------------

@pytest.mark.usefixtures("ray_session")
def test_pretrain_register_transfer_and_export(tmp_path, tracking_uri, monkeypatch):
    monkeypatch.chdir(tmp_path)
    client = MlflowClient(tracking_uri)
    raw = small_job(name="pretrain", data={"dataset": "mnist", "partition": {"kind": "iid"}},
                    model={"name": "small_cnn"}, tracking={"experiment": "tests", "register": "pre"})
    pre = run_job(parse_job(raw), yaml.safe_dump(raw), tracking_uri, runs_dir=tmp_path / "runs")
    version = client.get_model_version("pre", "1")
    assert version.run_id == pre["run_id"] and version.tags["test_accuracy"] == f"{pre['test_accuracy']:.6g}"
    assert "name: pretrain" in version.description  # the job
    tags = client.get_run(pre["run_id"]).data.tags
    assert tags["fedray.strategy"] == "fedavg" and tags["fedray.start"] == "seed"
    assert "test accuracy" in tags["mlflow.note.content"]
    registered = weights.load("models:/pre/1", tracking_uri)

    # a different dataset, resized to the pretrained input; a new head, the only thing that trains
    transfer = small_job(name="transfer", data={"dataset": "digits", "resize": [28, 28], "partition": {"kind": "iid"}},
                         model={"name": "small_cnn", "start": "models:/pre/1", "replace": ["8"], "train": ["8"]},
                         tracking={"experiment": "tests", "export": "onnx"})
    summary = run_job(parse_job(transfer), yaml.safe_dump(transfer), tracking_uri, runs_dir=tmp_path / "runs")
    final = weights.load(f"runs:/{summary['run_id']}/model", tracking_uri)
    for name in ("1.weight", "1.bias", "4.weight", "4.bias"):
        assert torch.equal(final[name], registered[name]), name  # frozen: bit-identical
    assert not torch.equal(final["8.weight"], registered["8.weight"])
    run = client.get_run(summary["run_id"])
    assert run.data.params["model.federated_size"] == str(10 * 1568 + 10)
    per_update = summary["bytes_up"] / (2 * 4)  # 2 rounds of 4 devices
    assert 15690 * 4 < per_update < 15690 * 4 + 1024  # only the head's float32 values, and a header
    check = json.loads(open(download_artifacts(f"runs:/{summary['run_id']}/onnx/check.json",
                                               tracking_uri=tracking_uri)).read())
    assert check["passed"] and check["max_abs_diff"] <= 1e-4 and check["samples"] > 100
    import onnxruntime

    onnx_file = download_artifacts(f"runs:/{summary['run_id']}/onnx/model.onnx", tracking_uri=tracking_uri)
    x = datasets.load(parse_job(transfer).data, 0).x[:5]  # the logged file alone runs (no external data)
    assert onnxruntime.InferenceSession(onnx_file).run(None, {"input": x})[0].shape == (5, 10)

    # runs:/ works as models:/ does; a model of another input size names the head's shapes; a
    # missing one says so
    by_run = prepare(parse_job({**transfer, "model": {**transfer["model"], "start": f"runs:/{pre['run_id']}/model"}}),
                     tracking_uri)
    assert torch.equal(by_run.model.state_dict()["4.weight"], registered["4.weight"])
    small = {**transfer, "data": {"dataset": "digits"}, "model": {"name": "small_cnn", "start": "models:/pre/1"}}
    with pytest.raises(JobError, match=r"model.start models:/pre/1: parameter '8.weight' has shape \(10, 1568\) "
                                       r"there and \(10, 128\) in this model"):
        prepare(parse_job(small), tracking_uri)
    with pytest.raises(JobError, match="model.start models:/nope/1: cannot find it"):
        prepare(parse_job({**small, "model": {"name": "small_cnn", "start": "models:/nope/1"}}), tracking_uri)

    result = CliRunner().invoke(main, ["export", "models:/pre/1", "--tracking-uri", tracking_uri, "--out", "pre.onnx"])
    assert result.exit_code == 0, result.output
    assert "max abs difference" in result.output and (tmp_path / "pre.onnx").exists()
    logged = [a.path for a in client.list_artifacts(pre["run_id"], "onnx")]
    assert logged == ["onnx/check.json", "onnx/pre.onnx"]


def test_personal_parameters_stay_on_devices_and_survive_a_worker(local_driver, monkeypatch):
    import ray

    from fedray.platform import intake

    sizes = []
    original = intake.Update.from_bytes
    monkeypatch.setattr(intake.Update, "from_bytes",
                        staticmethod(lambda blob: sizes.append((u := original(blob)).delta.size) or u))
    driver = local_driver(small_job(model={"name": "mlp", "kwargs": {"hidden": [16]}}, rounds=3,
                                    devices={"count": 4, "per_round": 4, "workers": 2},
                                    data={"dataset": "digits", "partition": {"kind": "dirichlet", "alpha": 0.1}},
                                    personalization={"method": "fedper", "finetune": {"epochs": 1}, "export": [1]}))
    layout = driver.layout
    assert layout.personal.names == ("3.weight", "3.bias") and "3.weight" not in layout.shared.names
    for r in (1, 2):
        result = driver.run_round(r)
        assert result.completed
    assert sizes and set(sizes) == {layout.shared.size}  # no update carries the head
    assert driver.state.params.size == layout.shared.size  # nor does the global model
    records = {d: ray.get(ref) for d, ref in driver.pool.records.refs(range(4)).items()}
    heads = [r.personal for r in records.values()]
    assert len(heads) == 4 and all(r.version == 2 for r in records.values())
    assert not np.allclose(heads[0], heads[1])  # each device its own
    before = driver.evaluation.personal(driver.state.params, 4, 2, fine_tune=False)[2]
    for actor in driver.pool.workers.actors:  # every worker dies: the records are not in them
        ray.kill(actor)
    driver.evaluation.personal(driver.state.params, 4, 2, fine_tune=False)  # fails, and replaces the workers
    after, failures = driver.evaluation.personal(driver.state.params, 4, 2, fine_tune=False)[2:0:-1]
    assert not failures and after == before
    assert before[0]["personal"] > before[0]["global"] + 0.2  # the head is what personalizes
    last = driver.run_round(3)
    assert last.completed and {"device_accuracy_personal", "device_accuracy_finetuned_std"} <= set(last.metrics)

    # on request, a device's personalized model is exported, on its worker, checked on its own inputs
    summary = driver.finish("FINISHED")
    local = download_artifacts(f"runs:/{summary['run_id']}/personal", tracking_uri=summary["tracking_uri"])
    check = json.loads(open(f"{local}/device_1.json").read())
    assert check["passed"] and check["samples"] > 0
    import onnxruntime

    x = driver.holdout_inputs[:20]
    personalized = onnxruntime.InferenceSession(f"{local}/device_1.onnx").run(None, {"input": x})[0]
    driver.spec.load(driver.model, driver.state.params)
    with torch.no_grad():
        global_logits = driver.model(torch.from_numpy(x)).numpy()
    assert np.abs(personalized - global_logits).max() > 0.1  # its own head, not the global model's


def test_gradual_unfreezing_grows_the_federated_vector(local_driver):
    spec = ModelSpec(name="mlp", kwargs={"hidden": [16]}, train=["3"], unfreeze={2: ["1.bias"], 3: ["1.weight"]})
    model = build_model("mlp", None, {"hidden": [16]}, (1, 8, 8), 10, seed=0)
    assert [lay_out(model, spec, round=r).frozen for r in (1, 2, 3)] == [("1.weight", "1.bias"), ("1.weight",), ()]
    with pytest.raises(ValueError, match=r"model.unfreeze.3: \['3'\] match no parameter still frozen"):
        lay_out(model, ModelSpec(name="mlp", train=["3"], unfreeze={3: ["3"]}))
    with pytest.raises(JobError, match="model.unfreeze changes the size of the federated vector.*checkpoint"):
        parse_job(small_job(model=spec.model_dump(by_alias=True), checkpoint={}, rounds=3))

    driver = local_driver(small_job(model={"name": "mlp", "kwargs": {"hidden": [16]}, "train": ["3"],
                                           "unfreeze": {2: ["1"]}}, rounds=2, strategy={"name": "fedavgm"}))
    initial = _state(driver.model)
    first = driver.run_round(1)
    assert first.completed and first.metrics["federated_size"] == 16 * 10 + 10
    driver.spec.load(driver.model, driver.state.params)
    assert torch.equal(driver.model.state_dict()["1.weight"], initial["1.weight"])  # frozen in round 1
    second = driver.run_round(2)
    assert second.completed and second.metrics["federated_size"] == 64 * 16 + 16 + 16 * 10 + 10
    assert second.metrics["test_accuracy"] > first.metrics["test_accuracy"] + 0.05
    driver.spec.load(driver.model, driver.state.params)
    assert not torch.equal(driver.model.state_dict()["1.weight"], initial["1.weight"])  # trained from round 2


def test_only_what_trains_is_encrypted_and_noised():
    from fedray.agents.training import SampleDP
    from fedray.secure.plan import SecurePlan

    plans = {}
    for train_only in ([], ["8"]):
        job = parse_job(small_job(model={"name": "small_cnn", "train": train_only},
                                  secure={"preset": "balanced", "min_clients": 3}))
        shared = prepare(job).layout.shared
        plans[len(train_only)] = SecurePlan.of(job, shared.names, [int(np.prod(s)) for s in shared.shapes], [100],
                                               lambda n: n).summary()
    assert plans[1]["encrypted_values"] == 10 * 128 + 10  # the head alone
    assert plans[0]["encrypted_values"] == plans[1]["encrypted_values"] + 16 * 9 + 16 + 32 * 16 * 9 + 32
    assert plans[1]["ciphertexts_per_update"] < plans[0]["ciphertexts_per_update"]

    model = build_model("small_cnn", None, {}, (1, 8, 8), 10, seed=0)  # DP-SGD's noise only where it trains
    lay_out(model, ModelSpec(name="small_cnn", train=["8"]))
    before = _state(model)
    data = datasets.load(parse_job(small_job()).data, 0)
    train(model, torch.from_numpy(data.x[:64]), torch.from_numpy(data.y[:64]), LocalTraining(batch_size=16),
          torch.Generator(), dp=SampleDP(max_grad_norm=1.0, noise_multiplier=1.0))
    assert all(torch.equal(model.state_dict()[n], before[n]) for n in ("1.weight", "1.bias", "4.weight", "4.bias"))
    assert not torch.equal(model.state_dict()["8.weight"], before["8.weight"])
