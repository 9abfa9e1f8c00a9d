import numpy as np
import pytest

from fedray.config import DataSpec
from fedray.data import partition


def labels(n=1000, classes=10, seed=0):
    return np.random.default_rng(seed).integers(0, classes, n)


def assert_disjoint_cover(parts, n):
    allidx = np.concatenate(parts)
    assert len(allidx) == n and len(np.unique(allidx)) == n


def test_iid_sizes_and_cover():
    parts = partition.iid(103, 10, np.random.default_rng(0))
    assert_disjoint_cover(parts, 103)
    assert {len(p) for p in parts} == {10, 11}


def test_dirichlet_small_alpha_skews_labels():
    y = labels()
    skewed = partition.dirichlet(y, 10, 0.1, np.random.default_rng(0))
    even = partition.dirichlet(y, 10, 100.0, np.random.default_rng(0))
    assert_disjoint_cover(skewed, len(y))

    def mean_classes(parts):  # classes holding >= 5% of a device's samples
        return np.mean([(np.bincount(y[p], minlength=10) / len(p) >= 0.05).sum() for p in parts])

    assert mean_classes(skewed) < 4 < 9 < mean_classes(even)
    assert min(len(p) for p in skewed) >= partition.MIN_SAMPLES


def test_dirichlet_impossible_raises():
    with pytest.raises(ValueError, match="alpha=0.001"):
        partition.dirichlet(labels(n=40), 19, 0.001, np.random.default_rng(0))


def test_shards_give_k_labels():
    y = np.repeat(np.arange(10), 100)
    parts = partition.shards(y, 20, 2, np.random.default_rng(0))
    assert_disjoint_cover(parts, len(y))
    assert all(len(np.unique(y[p])) <= 2 for p in parts)
    assert all(len(p) == 50 for p in parts)


def test_quantity_skew_sizes_vary_labels_do_not():
    y = labels(n=5000)
    parts = partition.quantity_skew(len(y), 20, 0.3, np.random.default_rng(0))
    assert_disjoint_cover(parts, len(y))
    sizes = np.array([len(p) for p in parts])
    assert sizes.min() >= partition.MIN_SAMPLES and sizes.max() > 5 * np.median(sizes)


def test_too_few_samples_raise():
    with pytest.raises(ValueError, match="too few for 10 devices"):
        partition.iid(15, 10, np.random.default_rng(0))


def test_train_test_split_keeps_both_sides():
    train, test = partition.train_test_split(np.arange(3), 0.01, np.random.default_rng(0))
    assert len(test) == 1 and len(train) == 2
    train, test = partition.train_test_split(np.arange(2), 0.9, np.random.default_rng(0))
    assert len(test) == 1 and len(train) == 1
    train, test = partition.train_test_split(np.arange(5), 0.0, np.random.default_rng(0))
    assert len(test) == 0 and len(train) == 5


@pytest.mark.parametrize("kind", [{"kind": "iid"}, {"kind": "dirichlet", "alpha": 0.5},
                                  {"kind": "shards", "labels_per_device": 2}, {"kind": "quantity_skew", "beta": 1.0}])
def test_split_is_deterministic_and_disjoint(kind):
    y = labels()
    spec = DataSpec(dataset="digits", partition=kind, holdout=0.2, test_fraction=0.25)
    a = partition.split(y, spec, 8, seed=3)
    b = partition.split(y, spec, 8, seed=3)
    c = partition.split(y, spec, 8, seed=4)
    for x, z in zip(a.train + a.test + [a.holdout], b.train + b.test + [b.holdout]):
        np.testing.assert_array_equal(x, z)
    assert any(not np.array_equal(x, z) for x, z in zip(a.train, c.train))
    assert_disjoint_cover(a.train + a.test + [a.holdout], len(y))
    assert len(a.holdout) == 200


def generated_split(count=50, **synthetic):
    spec = DataSpec(dataset="synthetic", synthetic={"samples": 200, "shape": [4], "classes": 5, "per_device": 10,
                                                      **synthetic}, test_fraction=0.2)
    return partition.split(np.zeros(200, np.int64), spec, count, seed=3)


def test_generated_devices_draw_their_own_samples_from_their_seed():
    from fedray.data.datasets import synthetic

    split = generated_split()
    assert split.train == [] and split.train_sizes.tolist() == [8] * 50
    (x, y), (xt, yt) = split.generated.samples(7)
    assert x.shape == (8, 4) and xt.shape == (2, 4) and x.dtype == np.float32 and y.dtype == np.int64
    again = split.of(np.array([7, 9])).samples(7)  # a worker's copy, any time: the same samples
    assert np.array_equal(again[0][0], x) and np.array_equal(again[1][1], yt)
    assert not np.array_equal(split.generated.samples(8)[0][0], x)
    # the same clusters as the shared synthetic dataset of that seed: a sample sits by its class centre
    centres = split.generated.centers
    shared = synthetic(200, (4,), 5, 1.0, seed=3)
    assert np.allclose(centres, [shared.x[shared.y == c].mean(0) for c in range(5)], atol=0.5)
    many = [split.generated.samples(d)[0] for d in range(50)]
    xs, ys = np.concatenate([m[0] for m in many]), np.concatenate([m[1] for m in many])
    assert np.abs((xs - centres[ys]).std() - 1.0) < 0.1  # noise 1.0 around the device's class centres


def test_generated_devices_under_label_skew_hold_few_classes():
    def classes_held(split):
        return np.mean([len(np.unique(split.generated.samples(d)[0][1])) for d in range(50)])

    skewed = partition.split(np.zeros(200, np.int64), DataSpec(
        dataset="synthetic", synthetic={"samples": 200, "shape": [4], "classes": 5, "per_device": 10},
        partition={"kind": "dirichlet", "alpha": 0.05}), 50, seed=3)
    assert classes_held(skewed) < 2.0 < 3.5 < classes_held(generated_split())
