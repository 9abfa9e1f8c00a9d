import numpy as np
import pytest

from fedray.config import StrategySpec
from fedray.platform import strategies
from fedray.platform.aggregation import Partial


def test_fedavg_hand_computed():
    # two devices: 10 samples with delta [1, 2], 30 samples with delta [3, -2]
    # weighted mean = ([10, 20] + [90, -60]) / 40 = [2.5, -1.0]; server_lr 0.5 -> step [1.25, -0.5]
    partial = Partial.zeros(2)
    partial.add(np.array([1, 2], np.float32), 10)
    partial.add(np.array([3, -2], np.float32), 30)
    strategy = strategies.fedavg(server_lr=0.5)
    state = strategy.init(np.array([1.0, 1.0], np.float32))
    new, diag = strategy.apply(state, partial)
    np.testing.assert_allclose(new.params, [2.25, 0.5])
    assert new.round == 1 and diag["update_norm"] == pytest.approx(np.hypot(1.25, 0.5))
    np.testing.assert_array_equal(state.params, [1.0, 1.0])  # the old state is untouched


def test_partials_merge_associatively():
    rng = np.random.default_rng(0)
    deltas = rng.standard_normal((6, 4)).astype(np.float32)
    weights = rng.integers(1, 50, 6)
    flat = Partial.zeros(4)
    for d, w in zip(deltas, weights):
        flat.add(d, w)
    edges = [Partial.zeros(4) for _ in range(2)]
    for i, (d, w) in enumerate(zip(deltas, weights)):
        edges[i % 2].add(d, w)
    tree = Partial.zeros(4)
    for e in edges:
        tree.merge(e)
    assert tree.count == flat.count == 6 and tree.weight == flat.weight
    np.testing.assert_allclose(tree.mean(), flat.mean(), rtol=1e-6)
    np.testing.assert_allclose(flat.mean(), np.average(deltas, axis=0, weights=weights), rtol=1e-5)


def test_empty_partial_and_bad_weight_raise():
    with pytest.raises(ValueError, match="empty aggregate"):
        Partial.zeros(3).mean()
    with pytest.raises(ValueError, match="weight must be > 0"):
        Partial.zeros(3).add(np.ones(3, np.float32), 0)


def test_build_from_spec():
    s = strategies.build(StrategySpec(name="fedavg", server_lr=2.0))
    p = Partial.zeros(1)
    p.add(np.array([1.0], np.float32), 1)
    assert s.apply(s.init(np.zeros(1, np.float32)), p)[0].params[0] == 2.0


def test_balanced_assignment_spreads_samples():
    from fedray.platform.pool import balanced_assignment

    sizes = [100, 1, 1, 1, 50, 50, 3]
    worker_of = balanced_assignment(sizes, 2)
    loads = [sum(s for s, w in zip(sizes, worker_of) if w == k) for k in range(2)]
    assert sorted(loads) == [103, 103]
    assert sorted(balanced_assignment([5, 5, 5], 3).tolist()) == [0, 1, 2]


@pytest.mark.parametrize("fraction, k, needed", [(0.28, 25, 7), (0.14, 50, 7), (0.56, 25, 14), (0.5, 4, 2),
                                                 (0.5, 5, 3), (1.0, 10, 10), (0.01, 10, 1)])
def test_quorum(fraction, k, needed):
    from fedray.platform.driver import quorum

    assert quorum(fraction, k) == needed
