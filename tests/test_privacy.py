"""Client-level differential privacy: the accountant against published and independently computed
values, noise calibration and clipping measured, Poisson sampling's distribution, and real runs
(central and distributed noise, through edges, stopping at the budget)."""

import asyncio
import json
import math
import warnings

import numpy as np
import pytest
import ray
import yaml
from mlflow import MlflowClient
from scipy import integrate

from fedray.agents import privacy as device_privacy
from fedray.config import parse_job
from fedray.config.privacy import min_participants, share_std
from fedray.data.devices import Shards
from fedray.platform import privacy
from fedray.platform.aggregation import Partial
from fedray.platform.run import run_job

from conftest import history, small_job


def test_accountants_match_opacus_published_values():
    # Opacus's own tests: sigma 1.5, q 0.04, delta 1e-5, 90 epochs: int(90 / 0.04) = 2,250 steps for
    # RDP, but int(90 // 0.04) = 2,249 for PRV (floor division of floats)
    assert privacy.Ledger(1.5, 0.04, 1e-5, "rdp").epsilon(2250) == pytest.approx(7.32911117143, rel=1e-9)
    assert privacy.Ledger(1.5, 0.04, 1e-5, "prv").epsilon(2249) == pytest.approx(6.777395712150674, rel=1e-6)


def test_composed_epsilon_equals_opacus_accountant_bit_for_bit():
    """fedray composes RDP from each (noise, rate) pair's one-step curve, computed once: the same
    epsilon as Opacus's RDP accountant over the same history, to the last bit."""
    from opacus.accountants import RDPAccountant

    from fedray.agents.privacy import epsilon

    rng = np.random.default_rng(5)
    pairs = [(0.5, 0.9), (1.1, 0.01), (2.0, 0.25), (4.0, 0.06)]  # (noise multiplier, rate)
    for _ in range(6):
        history = [(*pairs[i], int(rng.integers(0, 500))) for i in rng.choice(4, size=int(rng.integers(1, 4)))]
        reference = RDPAccountant()
        reference.history = [m for m in history if m[2]]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            expected = reference.get_epsilon(delta=1e-5) if reference.history else 0.0
        assert epsilon("rdp", history, 1e-5) == expected, history


def _sampled_gaussian_rdp(q: float, sigma: float, order: int) -> float:
    """RDP of one Poisson-subsampled Gaussian step at an integer order, by numerical integration of
    its definition (Mironov et al. 2019): log E_{x~N(0, s^2)}[((1 - q) + q e^{(2x - 1)/(2 s^2)})^a] / (a - 1),
    in log space (the integrand peaks near x = a)."""
    def log_integrand(x):
        mix = np.logaddexp(math.log(1 - q), math.log(q) + (2 * x - 1) / (2 * sigma ** 2))
        return -x * x / (2 * sigma ** 2) - math.log(sigma * math.sqrt(2 * math.pi)) + order * mix

    low, high = -40 * sigma, order + 40 * sigma
    shift = max(log_integrand(x) for x in np.linspace(low, high, 20_001))
    value, _ = integrate.quad(lambda x: math.exp(log_integrand(x) - shift), low, high, points=[0.0, float(order)],
                              limit=500, epsabs=0, epsrel=1e-12)
    return (math.log(value) + shift) / (order - 1)


@pytest.mark.parametrize("q, sigma", [(0.01, 1.1), (0.1, 2.0), (0.25, 0.8)])
def test_rdp_curve_matches_an_independent_integration(q, sigma):
    from opacus.accountants.analysis.rdp import compute_rdp

    orders = [2, 3, 5, 8, 16, 32]
    ours = [_sampled_gaussian_rdp(q, sigma, a) for a in orders]
    np.testing.assert_allclose(compute_rdp(q=q, noise_multiplier=sigma, steps=1, orders=orders), ours, rtol=1e-6)


def test_full_participation_is_the_gaussian_mechanism_closed_form():
    # q = 1: RDP(a) = T a / (2 z^2); epsilon by Balle et al. 2020's conversion, over Opacus's orders
    from opacus.accountants import RDPAccountant

    z, rounds, delta = 3.0, 40, 1e-6
    a = np.array(RDPAccountant.DEFAULT_ALPHAS)
    closed = np.min(rounds * a / (2 * z ** 2) + np.log((a - 1) / a) - (np.log(delta) + np.log(a)) / (a - 1))
    assert privacy.Ledger(z, 1.0, delta, "rdp").epsilon(rounds) == pytest.approx(closed, rel=1e-12)


def test_ledger_affords_the_most_rounds_within_a_budget():
    ledger = privacy.Ledger(1.0, 0.1, 1e-5)
    n = ledger.affordable(4.0)
    assert ledger.epsilon(n) <= 4.0 < ledger.epsilon(n + 1)
    assert ledger.epsilon() == 0.0 and privacy.Ledger(50.0, 0.01, 1e-5).affordable(1.0, limit=1000) == 1000


def job(**privacy_section):
    secure = {"scheme": "ckks"} if privacy_section.get("mode") == "distributed" else None  # shares need it
    return parse_job(small_job(devices__count=40, devices__per_round=10, secure=secure,
                               privacy={"level": "client", "clip": 0.5, "noise_multiplier": 1.2, **privacy_section}))


def test_central_noise_is_calibrated_to_z_c_over_the_fixed_denominator():
    central = job()
    rng = np.random.default_rng(0)
    released, fraction = privacy.release(Partial(np.zeros(200_000, np.float32), 7.0, 7.0, 7), central, 0.5, rng)
    assert fraction is None  # no adaptive clipping
    assert released.weight == released.steps_weight == 10.0  # q N = 0.25 x 40, not the 7 that answered
    assert np.std(released.mean()) == pytest.approx(1.2 * 0.5 / 10, rel=0.05)


def test_distributed_shares_sum_to_at_least_the_accounted_noise():
    distributed = job(mode="distributed")
    m = min_participants(distributed)
    assert m == 5  # ceil(min_completion 0.5 x q N 10)
    std = share_std(1.2, 0.5, m)
    rng = np.random.default_rng(1)
    for answered in (m, 2 * m):  # more than m answering only adds noise
        partial = Partial.zeros(100_000)
        for _ in range(answered):
            partial.add(device_privacy.privatize(np.zeros(100_000, np.float32), 0.5, std, rng), 1.0)
        released, _ = privacy.release(partial, distributed, 0.5)
        assert np.std(released.mean()) == pytest.approx(1.2 * 0.5 * math.sqrt(answered / m) / 10, rel=0.05)


def test_adaptive_clipping_splits_the_noise_and_steps_the_bound_to_the_quantile():
    from fedray.config.privacy import count_noise, delta_noise_multiplier

    spec = job(noise_multiplier=0.8, adaptive_clip={"target_quantile": 0.5, "lr": 0.2})  # C 0.5, q N 10
    assert count_noise(spec) == 0.5  # sigma_b = q N / 20
    z_delta = delta_noise_multiplier(spec)
    assert z_delta == pytest.approx((0.8 ** -2 - 1.0 ** -2) ** -0.5)  # deltas get more noise than z alone
    assert (z_delta ** -2 + (2 * 0.5) ** -2) ** -0.5 == pytest.approx(0.8)  # together: accounted as z
    rng = np.random.default_rng(4)
    partial = Partial.zeros(200_000)
    for norm in (0.1,) * 7 + (0.9,) * 3:  # 7 of 10 devices within the bound
        partial.add(np.zeros(200_000, np.float32), 1.0)
        partial.below_clip += device_privacy.below_clip(np.full(4, norm / 2, np.float32), 0.5, 0.0)
    fractions = []
    for _ in range(400):
        released, fraction = privacy.release(partial, spec, 0.5, rng)
        fractions.append(fraction)
    assert np.std(released.mean()) == pytest.approx(z_delta * 0.5 / 10, rel=0.05)
    assert np.mean(fractions) == pytest.approx(0.7, abs=0.01) and np.std(fractions) == pytest.approx(0.05, rel=0.1)
    assert privacy.next_clip(spec, 0.5, 0.7) == pytest.approx(0.5 * math.exp(-0.2 * 0.2))  # too many within: shrink
    assert privacy.next_clip(spec, 0.5, 0.2) > 0.5
    with pytest.raises(ValueError, match=r"count_noise \(0.5\) must exceed half of privacy.noise_multiplier \(1.2"):
        job(noise_multiplier=1.2, adaptive_clip={"count_noise": 0.5})


@pytest.mark.usefixtures("ray_session")
@pytest.mark.parametrize("mode", ["central", "distributed"])
def test_adaptive_clip_bound_follows_the_updates_norms(tracking_uri, mode, local_run):
    """The bound starts far above every update's norm: each applied round it shrinks by
    exp(-lr (b - 0.5)) with the logged noised fraction b, until about half the updates fit.
    Distributed: the devices noise their indicators themselves."""
    overrides = dict(rounds=8, devices__count=6, devices__per_round=6,
                     secure={"scheme": "ckks"} if mode == "distributed" else None,
                     privacy={"level": "client", "mode": mode, "clip": 50.0, "noise_multiplier": 0.5,
                              "adaptive_clip": {"lr": 1.0, "count_noise": 0.3}})
    summary = local_run(**overrides)
    client = MlflowClient(tracking_uri)
    clips = history(client, summary["run_id"], "clip")
    fractions = history(client, summary["run_id"], "below_clip_fraction")
    assert clips[0] == 50.0 and len(clips) == 8
    for before, after, b in zip(clips, clips[1:], fractions):
        assert after == pytest.approx(before * math.exp(-(b - 0.5)))
    assert np.mean(fractions[:3]) > 0.7 and clips[-1] < clips[0] / 4  # all fit at first: the bound fell
    assert history(client, summary["run_id"], "epsilon")[-1] == pytest.approx(
        independent_adaptive_epsilon(parse_job(small_job(**overrides)), 8), rel=1e-3)


def independent_adaptive_epsilon(job, rounds):
    """Epsilon of an adaptive-clipping run by Google's dp-accounting, from what the devices really
    send: each round one Poisson sample (q) releases two Gaussian sums, the clipped deltas (noise std
    z_delta C, sensitivity C) and the below-clip indicators (noise std sigma_b, sensitivity: the
    largest indicator a device sends), composed, at Opacus's RDP orders."""
    import dp_accounting
    from dp_accounting import rdp
    from opacus.accountants.rdp import RDPAccountant

    from fedray.config.privacy import count_noise, delta_noise_multiplier, sampling_rate

    sensitivity = max(abs(device_privacy.below_clip(np.full(3, x, np.float32), 1.0, 0.0)) for x in (0.0, 10.0))
    both = dp_accounting.ComposedDpEvent([dp_accounting.GaussianDpEvent(delta_noise_multiplier(job)),
                                          dp_accounting.GaussianDpEvent(count_noise(job) / sensitivity)])
    accountant = rdp.RdpAccountant(orders=RDPAccountant.DEFAULT_ALPHAS)
    accountant.compose(dp_accounting.SelfComposedDpEvent(dp_accounting.PoissonSampledDpEvent(sampling_rate(job), both),
                                                         rounds))
    return accountant.get_epsilon(job.privacy.delta)


def test_devices_clip_their_whole_delta():
    rng = np.random.default_rng(2)
    for scale in (0.01, 1.0, 100.0):
        delta = rng.normal(size=1000).astype(np.float32) * np.float32(scale)
        clipped = device_privacy.privatize(delta, 2.0, 0.0)
        assert np.linalg.norm(clipped) <= 2.0 * (1 + 1e-6)
        if np.linalg.norm(delta) <= 2.0:
            np.testing.assert_array_equal(clipped, delta)
        else:  # the direction is kept
            assert np.dot(clipped, delta) / (np.linalg.norm(clipped) * np.linalg.norm(delta)) == pytest.approx(1.0)


def test_a_real_device_sends_a_clipped_delta():
    from fedray.agents.worker import DeviceWorker
    from fedray.data import datasets, partition
    from fedray.update import Update

    spec = parse_job(small_job(devices__local={"epochs": 3, "batch_size": 8, "lr": 2.0},
                               privacy={"level": "client", "clip": 0.3}))
    data = datasets.load(spec.data, 0)
    split = partition.split(data.y, spec.data, spec.devices.count, 0)
    worker = DeviceWorker(spec, (data.x, data.y), data.num_classes, split.of(np.arange(6)))
    start = np.zeros(64 * 10 + 10, np.float32)
    norms = [np.linalg.norm(Update.from_bytes(asyncio.run(worker.fit(d, 1, 0.0, start))[0]).delta) for d in range(6)]
    assert max(norms) <= 0.3 * (1 + 1e-6) and min(norms) > 0.29  # lr 2 x 3 epochs: every delta was longer


def test_poisson_sampling_has_the_distribution_the_accountant_assumes():
    rng = np.random.default_rng(3)
    n, q, draws = 50, 0.2, 4000
    rounds = np.zeros((draws, n), bool)
    for i in range(draws):
        rounds[i, privacy.poisson_sample(rng, n, q)] = True
    # each device at rate q
    assert np.abs(rounds.mean(0) - q).max() < 4 * math.sqrt(q * (1 - q) / draws)
    # independently: two devices are in a round together at rate q^2
    together = (rounds[:, :, None] & rounds[:, None, :]).mean(0)[np.triu_indices(n, 1)]
    assert np.abs(together.mean() - q * q) < 0.002
    # so the round size is Binomial(n, q), not fixed
    sizes = rounds.sum(1)
    assert sizes.mean() == pytest.approx(n * q, abs=4 * math.sqrt(n * q * (1 - q) / draws))
    assert sizes.var() == pytest.approx(n * q * (1 - q), rel=0.1)


@pytest.mark.usefixtures("ray_session")
@pytest.mark.parametrize("mode, topology", [("central", None), ("distributed", {"edges": 2})])
def test_a_round_moves_the_model_by_the_calibrated_noise(tracking_uri, mode, topology, local_run):
    """With noise far above the clipped deltas, each round's step is the noise: norm z C sqrt(d) / (q N),
    times sqrt(k / m) when k >= m devices each add a distributed share."""
    z, clip, d = 100.0, 1.0, 64 * 10 + 10
    summary = local_run(rounds=4, topology=topology,
                  secure={"scheme": "ckks", "min_clients": 2} if mode == "distributed" else None,
                  privacy={"level": "client", "mode": mode, "clip": clip, "noise_multiplier": z})
    client = MlflowClient(tracking_uri)
    participants = history(client, summary["run_id"], "participants")  # every round; update_norm: applied ones
    norms = {m.step: m.value for m in client.get_metric_history(summary["run_id"], "update_norm")}
    expected = 4 / 6 * 6  # q N with q = per_round / count
    m = 2 if mode == "distributed" else None  # ceil(0.5 x 4)
    ratios = [norm / (z * clip * math.sqrt(d) / expected * (math.sqrt(participants[r - 1] / m) if m else 1))
              for r, norm in norms.items()]
    assert len(ratios) >= 3 and np.mean(ratios) == pytest.approx(1.0, rel=0.05)
    assert summary["epsilon"] == pytest.approx(privacy.Ledger(z, 4 / 6, 1e-5).epsilon(4))


@pytest.mark.usefixtures("ray_session")
def test_the_run_stops_before_the_round_that_would_exceed_the_budget(tracking_uri, tmp_path):
    spent = privacy.Ledger(2.0, 4 / 6, 1e-5)
    budget = (spent.epsilon(3) + spent.epsilon(4)) / 2  # the 4th round would exceed it
    raw = small_job(rounds=10, privacy={"level": "client", "noise_multiplier": 2.0, "budget": {"epsilon": budget}})
    summary = run_job(parse_job(raw), yaml.safe_dump(raw), tracking_uri)  # run_job stops at the budget
    assert summary["rounds"] == 3 and "round 4 would bring epsilon to" in summary["stopped"]
    client = MlflowClient(tracking_uri)
    run_id = summary["run_id"]
    epsilons = history(client, run_id, "epsilon")
    assert epsilons == pytest.approx([spent.epsilon(r) for r in (1, 2, 3)]) and epsilons[-1] <= budget
    finished = client.get_run(run_id)
    assert finished.info.status == "FINISHED" and "round 4" in finished.data.tags["fedray.stopped"]
    report = json.load(open(client.download_artifacts(run_id, "privacy_report.json", str(tmp_path))))
    assert report["rounds"] == 3 and report["sampling"] == "poisson" and report["budget"] == budget
    assert report["epsilon"]["rdp"] == pytest.approx(epsilons[-1])
    assert report["epsilon"]["prv"] == pytest.approx(privacy.Ledger(2.0, 4 / 6, 1e-5, "prv").epsilon(3))
    assert "privacy.png" in [f.path for f in client.list_artifacts(run_id)]


# sample level: DP-SGD on the devices

def test_dp_sgd_noise_has_std_z_c_over_the_batch_size():
    """One DP-SGD step with lr 1 on all-zero inputs: the weights' per-sample gradients are zero, so
    the weights move by the noise alone, N(0, (z C / B)^2) per entry."""
    import torch

    from fedray.agents.training import LocalTraining, SampleDP, train

    model = torch.nn.Linear(2000, 10, bias=False)
    torch.nn.init.zeros_(model.weight)
    x, y = torch.zeros(64, 2000), torch.arange(64) % 10
    cfg = LocalTraining(epochs=None, steps=1, batch_size=16, lr=1.0)
    train(model, x, y, cfg, torch.Generator().manual_seed(0), dp=SampleDP(max_grad_norm=0.5, noise_multiplier=1.3))
    assert float(model.weight.detach().std()) == pytest.approx(1.3 * 0.5 / 16, rel=0.05)


def test_empty_poisson_batches_still_add_their_noise():
    """Batch size 1 of 1,000 samples: about e^-1 of the Poisson batches are empty. Every one of the
    50 steps must add its noise, so the weights end with std sqrt(50) z C (zero inputs: no gradient)."""
    import torch

    from fedray.agents.training import LocalTraining, SampleDP, train

    model = torch.nn.Linear(400, 10, bias=False)
    torch.nn.init.zeros_(model.weight)
    x, y = torch.zeros(1000, 400), torch.arange(1000) % 10
    cfg = LocalTraining(epochs=None, steps=50, batch_size=1, lr=0.1)
    train(model, x, y, cfg, torch.Generator().manual_seed(0), dp=SampleDP(max_grad_norm=1.0, noise_multiplier=0.8))
    assert float(model.weight.detach().std()) == pytest.approx(math.sqrt(50) * 0.8 * 0.1, rel=0.05)


def test_dp_sgd_clips_each_sample_gradient():
    """Without noise, a DP-SGD step over the whole set (rate 1) moves the model by lr x the mean of
    the clipped per-sample gradients: exactly C when every sample is the same, at most C otherwise."""
    import torch

    from fedray.agents.training import LocalTraining, SampleDP, train

    torch.manual_seed(0)
    same = (torch.randn(1, 30).repeat(200, 1), torch.full((200,), 3))  # gradient norms ~ 5 >> C
    varied = (torch.randn(200, 30) * 50, torch.randint(0, 5, (200,)))
    for (x, y), exact in ((same, True), (varied, False)):
        for clip in (0.01, 0.1):
            model = torch.nn.Linear(30, 5)
            start = torch.cat([p.detach().flatten().clone() for p in model.parameters()])
            cfg = LocalTraining(epochs=None, steps=1, batch_size=200, lr=1.0)
            train(model, x, y, cfg, torch.Generator().manual_seed(0), dp=SampleDP(clip, 1e-12))
            moved = float(torch.linalg.norm(torch.cat([p.detach().flatten() for p in model.parameters()]) - start))
            assert moved == pytest.approx(clip, rel=1e-3) if exact else 0 < moved <= clip * (1 + 1e-4)


def test_a_model_dp_sgd_cannot_train_is_refused_with_the_fix():
    from fedray.models.zoo import build_model

    x, y = np.random.default_rng(0).normal(size=(4, 1, 28, 28)).astype(np.float32), np.array([0, 1, 2, 3])

    with pytest.raises(ValueError, match="BatchNorm cannot support training with differential privacy.*GroupNorm"):
        privacy.check_model(build_model(None, "user_models:BatchStatsNet", {}, (64,), 10, 0), x.reshape(4, -1)[:, :64], y)
    privacy.check_model(build_model("small_cnn", None, {}, (1, 28, 28), 10, 0), x, y)


SAMPLE_DP = {"devices__per_round": 6, "devices__local": {"epochs": 1, "batch_size": 16, "lr": 0.1}}


def assert_device_epsilons(client, run_id: str, plans, rounds: int, trainings_per_round: int = 1) -> None:
    """Each round's logged device epsilons (max, mean) are those of every device's steps so far,
    composed here independently (``plans``: each device's (noise multiplier, rate, steps) per
    training)."""
    from fedray.agents.privacy import epsilon

    for r in range(1, rounds + 1):
        spent = [epsilon("rdp", [(z, q, steps * trainings_per_round * r)], 1e-5) for z, q, steps in plans]
        assert history(client, run_id, "device_epsilon_max")[r - 1] == pytest.approx(max(spent))
        assert history(client, run_id, "device_epsilon_mean")[r - 1] == pytest.approx(np.mean(spent))


def device_plans(raw):
    from fedray.data import datasets, partition

    job = parse_job(raw)
    data = datasets.load(job.data, job.seed)
    return job, privacy.sample_plan(job, [len(t) for t in partition.split(data.y, job.data, 6, job.seed).train])


@pytest.mark.usefixtures("ray_session")
def test_each_device_keeps_its_own_accountant_and_its_target_counts_every_edge_round(tracking_uri, tmp_path):
    """HierFAVG through two edges: every device trains in both edge rounds of each of 2 rounds,
    its noise sized so that the 4 trainings reach the target epsilon. Each round's device epsilons
    are the composition of that device's trainings so far, computed here independently; the
    target is reached, not passed."""
    from fedray.agents.privacy import epsilon

    target = 3.0
    raw = small_job(rounds=2, topology={"edges": 2, "edge_rounds": 2},
                    privacy={"level": "sample", "target_epsilon": target}, **SAMPLE_DP)
    job, plans = device_plans(raw)
    summary = run_job(job, yaml.safe_dump(raw), tracking_uri)
    client = MlflowClient(tracking_uri)
    assert_device_epsilons(client, summary["run_id"], plans, 2, trainings_per_round=2)
    assert target - 0.05 < summary["device_epsilon_max"] <= target
    report = json.load(open(client.download_artifacts(summary["run_id"], "privacy_report.json", str(tmp_path))))
    zs = [z for z, _, _ in plans]
    assert report["level"] == "sample" and report["noise_multiplier"] == {"min": min(zs), "max": max(zs)}
    assert report["epsilon"]["rdp"]["devices_trained"] == 6 and report["epsilon"]["rdp"]["max"] == pytest.approx(
        max(epsilon("rdp", [(z, q, steps * 4)], 1e-5) for z, q, steps in plans))


@pytest.mark.usefixtures("ray_session")
def test_target_epsilon_sizes_the_noise_and_the_budget_stops_the_run(tracking_uri):
    """Each device's noise is sized so that 3 rounds reach the target (composed here
    independently); with a budget between 2 and 3 rounds' spend the run stops before round 3,
    its logged epsilons those of the rounds that ran."""
    from fedray.agents.privacy import epsilon

    target = 4.0
    raw = small_job(rounds=3, privacy={"level": "sample", "target_epsilon": target}, **SAMPLE_DP)
    job, plans = device_plans(raw)
    assert target - 0.05 < max(epsilon("rdp", [(z, q, steps * 3)], 1e-5) for z, q, steps in plans) <= target
    after = [max(epsilon("rdp", [(z, q, steps * r)], 1e-5) for z, q, steps in plans) for r in (2, 3)]
    raw["privacy"]["budget"] = {"epsilon": (after[0] + after[1]) / 2}
    stopped = run_job(parse_job(raw), yaml.safe_dump(raw), tracking_uri)
    assert stopped["rounds"] == 2 and "before round 3" in stopped["stopped"]
    assert_device_epsilons(MlflowClient(tracking_uri), stopped["run_id"], plans, 2)
    assert stopped["device_epsilon_max"] == pytest.approx(after[0]) and after[0] <= raw["privacy"]["budget"]["epsilon"]


def test_a_device_refuses_a_round_past_its_budget():
    from fedray.agents.worker import DeviceWorker
    from fedray.data import datasets

    raw = small_job(privacy={"level": "sample", "noise_multiplier": 1.0, "budget": {"epsilon": 1.0}}, **SAMPLE_DP)
    job, _ = device_plans(raw)
    data = datasets.load(job.data, 0)
    worker = DeviceWorker(job, (data.x, data.y), 10, Shards(np.array([0]), [np.arange(100)], [np.arange(0)]))
    with pytest.raises(RuntimeError, match="device 0 refuses to train: its epsilon would reach .*, over privacy.budget"):
        asyncio.run(worker.fit(0, 1, 0.0, np.zeros(650, np.float32)))[0]


@pytest.mark.usefixtures("ray_session")
def test_device_spend_survives_a_killed_worker(local_driver):
    """Sample level: a worker is killed between rounds 2 and 3; its devices fail round 3 (and are
    charged for it: they were sent the model) and train again in round 4 on a new worker, from
    their spend so far. Every device's epsilon only grows, and equals its composed rounds."""
    from fedray.agents.privacy import epsilon

    raw = small_job(rounds=4, devices__workers=2, privacy={"level": "sample", "noise_multiplier": 1.1}, **SAMPLE_DP)
    _, plans = device_plans(raw)
    driver = local_driver(raw)
    spends, reported = [], []

    def record():  # what the devices themselves report, before the run takes the larger
        told = driver.pool.spend.told
        driver.pool.spend.told = lambda values: (reported.append(dict(values)), told(values))[1]

    for r in (1, 2, 3, 4):
        if r == 4:
            record()
        if r == 3:
            ray.kill(driver.pool.workers.actors[0], no_restart=True)
        result = driver.run_round(r)
        assert result.completed and (len(result.failures) > 0) == (r == 3)
        if r == 3:
            killed = sorted(result.failures)  # the devices sent to the killed worker
        spends.append(driver.pool.spend.view())
        expected = [epsilon("rdp", [(z, q, steps * r)], 1e-5) for z, q, steps in plans]
        assert [spends[-1][d][0] for d in range(6)] == pytest.approx(expected)
        assert result.metrics["device_epsilon_mean"] == pytest.approx(np.mean(expected))
    told = driver.pool.spend.history
    for d in killed:  # the new worker was handed the device's history: it reports 4 rounds' spend
        assert sum(steps for *_, steps in told[d]) == 4 * plans[d][2]
    assert killed and all(reported[0][d][0] == pytest.approx(spends[-1][d][0]) for d in killed)
    driver.finish()


@pytest.mark.usefixtures("ray_session")
def test_who_takes_part_is_secret_under_client_level_dp(tracking_uri, tmp_path, local_run):
    """Client level: the Poisson sample is not drawn from the logged seed (the run's round sizes are
    not those the seed's generator draws), and neither the round log nor the participation record
    names a device, though one always fails; nor does any device send its un-noised training loss."""
    from test_run import poisoned_digits

    # 12 rounds: the poisoned device is sampled in none of them with odds 0.5^12 < 1e-3
    summary = local_run(rounds=12, privacy={"level": "client", "noise_multiplier": 1.0, "sampling_rate": 0.5},
                  **poisoned_digits(tmp_path / "one.npz", [5]))
    client = MlflowClient(tracking_uri)
    seeded = np.random.default_rng([0, 1])  # what the driver drew from before: job seed 0
    from_seed = [len(privacy.poisson_sample(seeded, 6, 0.5)) for _ in range(12)]
    sampled = [p + f for p, f in zip(history(client, summary["run_id"], "participants"),
                                     history(client, summary["run_id"], "failures"))]
    assert sampled != from_seed  # equal by chance: odds < 1e-3
    rounds = json.load(open(client.download_artifacts(summary["run_id"], "rounds.json", str(tmp_path))))
    assert all(r["failures"] == {} and r["updates"] == [] for r in rounds)
    assert sum(r["metrics"]["failures"] for r in rounds) > 0
    participation = json.load(open(client.download_artifacts(summary["run_id"], "participation.json", str(tmp_path))))
    assert "devices" not in participation and participation["update_rate_min"] < 1 < 2 * participation["update_rate_mean"]
    assert "train_loss" not in client.get_run(summary["run_id"]).data.metrics


def test_a_device_keeps_its_loss_under_dp():
    """Both levels: the update a real device sends carries no training loss (an un-noised
    statistic of its data)."""
    from fedray.agents.worker import DeviceWorker
    from fedray.data import datasets
    from fedray.update import Update

    for section in ({"level": "sample", "noise_multiplier": 1.0}, {"level": "client"}, None):
        job = parse_job(small_job(privacy=section))
        data = datasets.load(job.data, 0)
        worker = DeviceWorker(job, (data.x, data.y), 10, Shards(np.array([0]), [np.arange(100)], [np.arange(0)]))
        update = Update.from_bytes(asyncio.run(worker.fit(0, 1, 0.0, np.zeros(650, np.float32)))[0])
        assert (update.train_loss == 0.0) == (section is not None)


def test_distributed_shares_set_the_authoritys_threshold():
    """Distributed noise shares sized for m = 5 participants: the key authority itself refuses a
    sum of fewer, though secure.min_clients says 3."""
    import secrets

    from fedray.secure.authority import DecryptionRefused, KeyAuthority
    from fedray.secure.ciphers import CipherSum
    from fedray.secure.plan import SecurePlan, Sealer

    spec = job(mode="distributed", min_participants=5)
    assert spec.secure.min_clients == 3
    plan = SecurePlan.of(spec, ("w", "b"), [640, 10], [30] * 40, lambda n: 1.0)
    assert plan.min_clients == 5
    keys, seeds = KeyAuthority(plan), {d: secrets.randbits(128) for d in range(5)}
    keys._seeds.update(seeds)
    sealer = Sealer(plan, keys.public_context(), seeds)
    total = CipherSum(sealer.public, plan.layout.chunks)
    rng = np.random.default_rng(0)
    for d in range(4):
        total.add(sealer.seal(d, 1, rng.normal(0, 0.1, 650).astype(np.float32), 1.0, 1.0, (0.0, 0.0), rng)[1], d, 1)
    with pytest.raises(DecryptionRefused, match="updates of 4 device.*at least secure.min_clients = 5"):
        keys.decrypt(total.to_bytes())
