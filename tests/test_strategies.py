import numpy as np
import pytest
from pydantic import TypeAdapter

from fedray.agents.training import effective_steps
from fedray.platform import strategies
from fedray.platform.aggregation import Partial
from fedray.update import Update


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
    with pytest.raises(ValueError, match="weight and steps must be > 0"):
        Partial.zeros(3).add(np.ones(3, np.float32), 0)


def test_build_from_spec():
    from fedray.config.strategy import FedAvg

    s = strategies.build(FedAvg(name="fedavg", server_lr=2.0))
    p = Partial.zeros(1)
    s.fold(p, upd([1.0], 1, 1))
    assert s.apply(s.init(np.zeros(1, np.float32)), p)[0].params[0] == 2.0


def upd(delta, num_samples=10, local_steps=5, control=None):
    return Update(0, 1, num_samples, local_steps, 0.1, np.array(delta, np.float32),
                  None if control is None else np.array(control, np.float32))


def run(strategy, gradients, start=0.0):
    """Apply ``strategy`` to one-device rounds whose mean delta is each of ``gradients``."""
    state = strategy.init(np.full(len(gradients[0]), start, np.float32))
    for g in gradients:
        p = Partial.zeros(len(g))
        strategy.fold(p, upd(g))
        state, _ = strategy.apply(state, p)
    return state


def test_fedavgm_hand_computed():
    # v1 = [1, 2]; v2 = 0.5 * [1, 2] + [1, 0] = [1.5, 1]; params = v1 + v2
    state = run(strategies.fedavgm(server_lr=1.0, momentum=0.5), [[1, 2], [1, 0]])
    np.testing.assert_allclose(state.params, [2.5, 3.0])
    np.testing.assert_allclose(state.buffers[0], [1.5, 1.0])
    assert state.round == 2


def test_fedadam_fedyogi_fedadagrad_hand_computed():
    # tau = 0.5 -> v0 = 0.25; g = 2; beta1 = beta2 = 0.5 -> m = 1
    adam = run(strategies.fedadam(server_lr=1.0, beta1=0.5, beta2=0.5, tau=0.5), [[2.0]])
    # v = 0.5 * 0.25 + 0.5 * 4 = 2.125
    np.testing.assert_allclose(adam.params, [1 / (np.sqrt(2.125) + 0.5)], rtol=1e-6)
    yogi = run(strategies.fedadam(server_lr=1.0, beta1=0.5, beta2=0.5, tau=0.5, yogi=True), [[2.0]])
    # v = 0.25 - 0.5 * 4 * sign(0.25 - 4) = 2.25 -> step 1 / (1.5 + 0.5)
    np.testing.assert_allclose(yogi.params, [0.5], rtol=1e-6)
    np.testing.assert_allclose(yogi.buffers[1], [2.25], rtol=1e-6)
    adagrad = run(strategies.fedadagrad(server_lr=1.0, beta1=0.0, tau=0.5), [[2.0]])
    # m = 2, v = 0.25 + 4 = 4.25
    np.testing.assert_allclose(adagrad.params, [2 / (np.sqrt(4.25) + 0.5)], rtol=1e-6)


def test_yogi_second_moment_grows_slower_than_adagrad():
    g = [[1.0]] * 5
    yogi = run(strategies.fedadam(beta2=0.9, yogi=True), g)
    adagrad = run(strategies.fedadagrad(), g)
    assert yogi.buffers[1][0] < adagrad.buffers[1][0]


def test_fednova_hand_computed():
    # device 1: delta 2 after 1 step; device 2: delta 4 after 4 steps; equal samples
    # normalized mean d = (2/1 + 4/4) / 2 = 1.5; tau_eff = (1 + 4) / 2 = 2.5 -> step 3.75 (FedAvg: 3)
    for strategy, expected in ((strategies.fednova(), 3.75), (strategies.fedavg(), 3.0)):
        p = Partial.zeros(1)
        strategy.fold(p, upd([2.0], 10, 1))
        strategy.fold(p, upd([4.0], 10, 4))
        state, _ = strategy.apply(strategy.init(np.zeros(1, np.float32)), p)
        assert state.params[0] == pytest.approx(expected)


def test_fednova_effective_steps_with_momentum():
    # constant gradient g, rho = 0.5: steps g, 1.5 g -> a = 2.5
    assert effective_steps(2, 0.5) == pytest.approx(2.5)
    assert effective_steps(7, 0.0) == 7.0


def test_fednova_removes_objective_inconsistency():
    """Quadratic devices f_i(w) = |w - c_i|^2 / 2 taking different numbers of local SGD steps:
    FedAvg's fixed point leans towards the devices that take more steps; FedNova's does not."""
    centers = np.array([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]], np.float32)
    steps = [1, 5, 20]
    lr = 0.01
    optimum = centers.mean(0)  # equal samples: the global objective's minimizer

    def train(strategy):
        state = strategy.init(np.zeros(2, np.float32))
        for _ in range(3000):
            p = Partial.zeros(2)
            for c, tau in zip(centers, steps):
                # tau steps of gradient descent on |w - c|^2 / 2, in closed form
                delta = (1 - (1 - lr) ** tau) * (c - state.params)
                strategy.fold(p, upd(delta, 100, tau))
            state, _ = strategy.apply(state, p)
        return np.linalg.norm(state.params - optimum)

    avg, nova = train(strategies.fedavg()), train(strategies.fednova())
    assert avg > 2.0  # biased towards the 20-step device
    assert nova < 0.1 * avg and nova < 0.2


@pytest.mark.parametrize("fraction, k, needed", [(0.28, 25, 7), (0.14, 50, 7), (0.56, 25, 14), (0.5, 4, 2),
                                                 (0.5, 5, 3), (1.0, 10, 10), (0.01, 10, 1)])
def test_quorum(fraction, k, needed):
    from fedray.config.base import quorum

    assert quorum(fraction, k) == needed


def test_robust_rules_hand_computed():
    from fedray.platform import robust

    d = np.array([[1, 10], [2, 20], [3, 30], [4, 40], [100, -1000]], np.float32)
    np.testing.assert_array_equal(robust.coordinate_median(d), [3, 20])
    # beta 0.2 of 5 drops one each side per coordinate: [2, 3, 4] and [10, 20, 30]
    np.testing.assert_allclose(robust.trimmed_mean(d, 0.2), [3, 20])
    np.testing.assert_allclose(robust.trimmed_mean(d, 0.0), d.mean(0))
    with pytest.raises(ValueError, match="beta < 0.5"):
        robust.trimmed_mean(d, 0.5)


def test_krum_scores_and_selection_hand_computed():
    from fedray.platform import robust

    d = np.array([[0.0], [1.0], [2.0], [10.0]], np.float32)
    # f = 0: n - f - 2 = 2 nearest; squared distances: row0 -> 1, 4; row1 -> 1, 1; row2 -> 1, 4;
    # row3 -> 64, 81
    np.testing.assert_allclose(robust.krum_scores(d, 0), [5, 2, 5, 145])
    mean, chosen = robust.multi_krum(d, 0, 1)
    assert chosen.tolist() == [1] and mean[0] == 1.0
    mean, chosen = robust.multi_krum(d, 0, 3)
    assert chosen.tolist() == [0, 1, 2] and mean[0] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="more than 2f \\+ 2"):
        robust.krum_scores(d, 1)


def test_clip_to_norm():
    from fedray.platform import robust

    np.testing.assert_allclose(robust.clip_to_norm(np.array([3, 4], np.float32), 1.0), [0.6, 0.8])
    short = np.array([0.3, 0.4], np.float32)
    assert robust.clip_to_norm(short, 1.0) is short


def test_scaffold_hand_computed():
    # N = 4 devices, 2 answer: deltas 1 and 3 (equal samples), control changes 0.4 and 0.8
    # params: 0 + 0.5 * 2 = 1; server control: 0 + (0.4 + 0.8) / 4 = 0.3
    strategy = strategies.scaffold(num_devices=4, server_lr=0.5)
    p = Partial.zeros(1)
    strategy.fold(p, upd([1.0], 5, 3, control=[0.4]))
    strategy.fold(p, upd([3.0], 5, 3, control=[0.8]))
    state, diag = strategy.apply(strategy.init(np.zeros(1, np.float32)), p)
    assert state.params[0] == pytest.approx(1.0) and state.buffers[0][0] == pytest.approx(0.3)
    assert strategy.control_variates and diag["control_norm"] == pytest.approx(0.3)
    # the device half, option II: c_i+ = c_i - c + (x - y_i) / (K lr); x - y_i = -delta
    # c_i 0.2, c 0.5, delta -0.6 after K lr = 0.3: 0.2 - 0.5 + 0.6 / 0.3 = 1.7
    new = strategy.control(np.float32([0.2]), np.float32([0.5]), np.float32([-0.6]), 0.3)
    assert new[0] == pytest.approx(1.7) and new.dtype == np.float32


def test_strategies_say_what_they_ask_of_devices():
    from fedray.config.strategy import StrategySpec

    def built(**spec):
        return strategies.build(TypeAdapter(StrategySpec).validate_python(spec), num_devices=4)

    assert built(name="fedprox", mu=0.3).prox_mu == 0.3 and not built(name="fedprox", mu=0.3).control_variates
    assert built(name="fedavg").prox_mu == 0.0 and built(name="fedavg").control is None
    assert built(name="scaffold").control_variates and built(name="scaffold", norm_bound=1.0).control_variates


def test_control_sums_merge():
    a, b = Partial.zeros(2), Partial.zeros(2)
    a.add(np.ones(2, np.float32), 1, control=np.array([1, 2], np.float32))
    b.add(np.ones(2, np.float32), 1, control=np.array([3, 4], np.float32))
    a.merge(b)
    np.testing.assert_array_equal(a.control_sum, [4, 6])
    assert Partial.zeros(2).control_sum is None


def test_staleness_functions_hand_computed():
    constant = strategies.staleness_weight("constant")
    polynomial = strategies.staleness_weight("polynomial", a=0.5)
    hinge = strategies.staleness_weight("hinge", a=10, b=4)
    assert [constant(t) for t in (0, 7)] == [1.0, 1.0]
    assert [polynomial(t) for t in (0, 3, 8)] == [1.0, 0.5, pytest.approx(1 / 3)]
    assert [hinge(t) for t in (0, 4, 5, 6)] == [1.0, 1.0, pytest.approx(1 / 11), pytest.approx(1 / 21)]
    with pytest.raises(ValueError, match="unknown staleness function 'linear'"):
        strategies.staleness_weight("linear")


def test_fedasync_mixes_the_stale_local_model_hand_computed():
    # current model [1, 1]; a device trained from version [0, 0] to [2, 4] (delta [2, 4]), 1 step stale.
    # FedAsync: x <- (1 - a) x + a x_local with a = alpha * s(1) = 0.5 * 1 -> [1.5, 2.5]
    strategy = strategies.AsyncStrategy("fedasync", 1, 0.5, strategies.staleness_weight("constant"), True, 4)
    state = strategy.init(np.array([1, 1], np.float32))
    partial = Partial.zeros(2)
    assert strategy.fold(partial, upd([2, 4]), 1, lambda: np.zeros(2, np.float32) - state.params)
    new, diag = strategy.apply(state, partial)
    np.testing.assert_allclose(new.params, [1.5, 2.5])
    assert new.round == 1 and diag["update_norm"] == pytest.approx(np.hypot(0.5, 1.5))


def test_fedbuff_staleness_weighted_buffer_hand_computed():
    # buffer of 2, server_lr 1, s(t) = (1 + t)^-0.5: delta [2] fresh (s = 1), delta [4] 3 steps stale
    # (s = 0.5): step = (1 * 2 + 0.5 * 4) / 2 = 2; FedBuff does not rebase deltas
    strategy = strategies.AsyncStrategy("fedbuff", 2, 1.0, strategies.staleness_weight("polynomial", 0.5), False, 4)
    state = strategy.init(np.array([10], np.float32))
    partial = Partial.zeros(1)
    assert strategy.fold(partial, upd([2]), 0, lambda: 0 / 0)  # FedBuff never asks for the drift
    assert strategy.fold(partial, upd([4]), 3, lambda: 0 / 0)
    assert strategy.apply(state, partial)[0].params[0] == pytest.approx(12.0)
    capped = strategies.AsyncStrategy("fedbuff", 2, 1.0, strategies.staleness_weight("constant"), False, 4, 2)
    assert not capped.fold(partial, upd([4]), 3, lambda: 0 / 0) and partial.count == 2


def test_async_defaults_from_spec():
    from fedray.config.strategy import FedAsync, FedBuff

    buff = strategies.build_async(FedBuff(name="fedbuff"), per_round=5)
    assert (buff.concurrency, buff.buffer_size, buff.mixing, buff.server_lr) == (5, 3, False, 1.0)
    fedasync = strategies.build_async(FedAsync(name="fedasync", concurrency=2, max_staleness=3), per_round=5)
    assert (fedasync.concurrency, fedasync.buffer_size, fedasync.mixing, fedasync.server_lr) == (2, 1, True, 0.6)
    assert fedasync.max_staleness == 3 and fedasync.weight(3) == 0.5


def test_robust_rules_flag_suspect_updates_hand_computed():
    from fedray.platform import robust

    d = np.array([[1, 10], [2, 20], [3, 30], [4, 40], [100, -1000]], np.float32)
    # beta 0.2 keeps ranks 1..3 of each coordinate: [2, 4] and [10, 30]
    np.testing.assert_allclose(robust.trimmed_share(d, 0.2), [0.5, 0, 0, 0.5, 1.0])
    ties = np.zeros((5, 3), np.float32)
    np.testing.assert_array_equal(robust.trimmed_share(ties, 0.2), np.zeros(5))  # ties are kept
    partial, diagnostics, flagged = strategies.trimmed_mean(0.2).reduce(d, np.random.default_rng(0))
    assert flagged == [4] and diagnostics == {"flagged": 1.0}  # trimmed at over half its coordinates
    np.testing.assert_allclose(partial.mean(), [3, 20])
    # Multi-Krum with f = 1 selects n - f = 4 rows: the outlier is left out
    _, diagnostics, flagged = strategies.krum(1, None).reduce(d, np.random.default_rng(0))
    assert flagged == [4] and diagnostics == {"flagged": 1.0}
    _, diagnostics, flagged = strategies.median().reduce(d, np.random.default_rng(0))
    assert flagged == [] and diagnostics == {}  # the median flags no update as a whole


def test_bucketing_averages_random_buckets_before_the_rule():
    from fedray.platform import robust

    d = np.arange(10, dtype=np.float32).reshape(5, 2)
    means, buckets = robust.bucket_means(d, 2, np.random.default_rng(0))
    assert sorted(np.concatenate(buckets).tolist()) == [0, 1, 2, 3, 4] and [len(b) for b in buckets] == [2, 2, 1]
    np.testing.assert_allclose(means, [d[b].mean(0) for b in buckets])
    # 6 updates, one outlier; buckets of 2 then Krum (f = 0, selects 1): the outlier's bucket is
    # flagged along with the rest, and flagging maps back to the updates in flagged buckets
    d = np.array([[1, 1], [1.1, 1], [0.9, 1], [1, 1.1], [1, 0.9], [50, -50]], np.float32)
    partial, diagnostics, flagged = strategies.krum(0, 1, bucket_size=2).reduce(d, np.random.default_rng(1))
    assert 5 in flagged and len(flagged) == 4 and diagnostics == {"flagged": 4.0}
    assert np.abs(partial.mean() - 1).max() < 0.1 and partial.count == 3
