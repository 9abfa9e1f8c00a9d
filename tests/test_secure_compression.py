"""Compression inside encrypted aggregation: shared random-k and quantization with real TenSEAL
(fewer ciphertexts, sums still exact), the extras' digits, error feedback of what was sealed, the
refusals, and a real round through Ray whose model moves only where the round's coordinates are."""

from __future__ import annotations

import secrets

import numpy as np
import pytest
import ray

from conftest import small_job
from fedray.agents.outbox import Outbox
from fedray.agents.state import DeviceState
from fedray.config import JobError, parse_job
from fedray.platform import strategies
from fedray.secure.authority import KeyAuthority
from fedray.secure.ciphers import CipherSum
from fedray.secure.plan import EXTRA_BITS, SecurePlan, Sealer, balanced_digits, digits_for

SIZES = [20000, 10]
RANDK = {"kind": "randk", "fraction": 0.5, "shared": True}
Q4 = {"kind": "quantize", "bits": 4}


def secure_job(*uplink, error_feedback=True, **overrides):
    compression = {"compression": {"uplink": list(uplink), "error_feedback": error_feedback}} if uplink else {}
    return parse_job(small_job(secure={"scheme": "ckks", "preset": "balanced", "min_clients": 3}, devices__count=6,
                               devices__per_round=4, **compression, **overrides))


def plan_of(job) -> SecurePlan:
    return SecurePlan.of(job, ("w", "b"), SIZES, [10] * 6, float)


def provisioned(plan: SecurePlan) -> tuple[KeyAuthority, Sealer]:
    keys = KeyAuthority(plan)
    seeds = {d: secrets.randbits(128) for d in range(6)}
    keys._seeds.update(seeds)  # as spawn hands them to a worker
    return keys, Sealer(plan, keys.public_context(), seeds)


@pytest.mark.parametrize("bits", [2, 4, 8, 15])
def test_extras_keep_their_precision_in_balanced_digits_however_few_bits_a_value_has(bits):
    limit, count = 2 ** (bits - 1) - 1, digits_for(bits)
    rng = np.random.default_rng(bits)
    values = rng.integers(-(2 ** (EXTRA_BITS - 1)) + 1, 2 ** (EXTRA_BITS - 1), (5, 3))
    digits = np.stack([balanced_digits(v, 2 * limit + 1, count) for v in values])  # 5 devices' digits
    assert np.abs(digits).max() <= limit
    powers = (2 * limit + 1) ** np.arange(count)
    np.testing.assert_array_equal(digits @ powers, values)  # each device's
    np.testing.assert_array_equal(digits.sum(axis=0) @ powers, values.sum(axis=0))  # and summed digit by digit


def test_shared_randk_and_quantization_cut_ciphertexts_and_the_sum_stays_exact():
    """Real CKKS: 4-bit values fill three times as many fields per slot, and shared random-k
    encrypts half the coordinates; the decrypted sum is the devices' sum on the round's
    coordinates within the quantization step, and the extras are exact to their 24 bits."""
    rng = np.random.default_rng(0)
    deltas = [rng.normal(0, 0.05, sum(SIZES)).astype(np.float32) for _ in range(4)]
    sizes = {}
    for name, uplink in {"none": [], "q4": [Q4], "randk": [RANDK], "randk+q4": [RANDK, Q4]}.items():
        plan = plan_of(secure_job(*uplink))
        keys, sealer = provisioned(plan)
        total = CipherSum(sealer.public, plan.layout.chunks)
        for d, delta in enumerate(deltas):
            plain, blob, sealed = sealer.seal(d, 7, delta, 1.0, 1.0, (0.25, 1.0), np.random.default_rng(d))
            assert len(plain) == 0 and len(sealed) == plan.kept
            total.add(blob, d, 7)
            sizes[name] = len(blob)
        summed, extras = plan.decode(keys.decrypt(total.to_bytes()), 1.0)
        step = 1.0 / plan.limit
        coordinates = plan.sent(7)
        assert len(coordinates) == plan.kept and set(coordinates) <= set(plan.encrypted)
        assert np.abs(summed / plan.weight_scale - sum(deltas)[coordinates]).max() <= 4 * step
        assert extras["loss"] == pytest.approx(1.0, abs=1e-4) and extras["below_clip"] == pytest.approx(4, abs=1e-4)
    assert plan.kept == sum(SIZES) // 2 and plan.bits == 4
    assert sizes["none"] / sizes["q4"] >= 2.4 and sizes["none"] / sizes["randk"] >= 1.6
    assert sizes["none"] / sizes["randk+q4"] >= 4.8
    # every device of a round encrypts the same coordinates, drawn anew each round
    again = plan_of(secure_job(RANDK, Q4))
    np.testing.assert_array_equal(again.sent(7), plan.sent(7))
    assert len(set(plan.sent(7)) ^ set(plan.sent(8))) > plan.kept // 2


def test_error_feedback_keeps_what_sealing_dropped_in_the_device_record():
    """Through the worker's sending side: after every round, what was sealed (scattered) plus the
    residual in the record is the sum of the device's true updates."""
    job = secure_job(RANDK, Q4, secure__range=0.2)
    plan = plan_of(job)
    keys, sealer = provisioned(plan)
    sealing = (plan, keys.public_context(), sealer.seeds)
    outbox = Outbox(job, strategies.for_job(job), [(20000,), (10,)], sealing)
    rng = np.random.default_rng(1)
    state, truth, delivered = DeviceState(), np.zeros(sum(SIZES)), np.zeros(sum(SIZES))
    step = 0.2 / plan.limit
    for r in range(1, 6):
        delta = rng.normal(0, 0.02, sum(SIZES)).astype(np.float32)
        sent, state = outbox.send(2, r, 10, 1, delta, 0.5, None, state, None, None)
        # the residual's norm, a statistic of the device's data, stays with it, as its loss does
        assert sent.sealed is not None and len(sent.delta) == 0 and sent.residual_norm is None and sent.loss == 0
        _, _, sealed = sealer.seal(2, r, delta + (truth - delivered), 1.0, 0.2, (0.0, 0.0),
                                   np.random.default_rng([job.seed, r, 2, 5]))
        truth += delta
        delivered[plan.sent(r)] += sealed
        np.testing.assert_allclose(delivered + state.residual, truth, atol=1e-5)
        # unsent coordinates carry all they hold; sent ones only their rounding, within a step
        assert np.abs(state.residual[plan.sent(r)]).max() <= step * (1 + 1e-6)
    without = Outbox(secure_job(RANDK, Q4, error_feedback=False), strategies.for_job(job), [(20000,), (10,)],
                     sealing)
    sent, record = without.send(2, 1, 10, 1, delta, 0.5, None, DeviceState(), None, None)
    assert record.residual is None and sent.residual_norm is None


@pytest.mark.parametrize("uplink, extra, message", [
    ([{"kind": "topk"}], {}, "reveals where its update is largest"),
    ([{"kind": "randk"}], {}, "needs shared: true"),
    ([{"kind": "lowrank"}], {}, "low-rank factors"),
    ([{"kind": "sign"}], {}, "its own magnitude"),
    ([Q4, {"kind": "entropy"}], {}, "do not compress"),
    ([{"kind": "quantize", "bits": 1}], {}, "no level beside 0"),
    ([RANDK], {"strategy": {"name": "fedbuff", "staleness": {"kind": "constant"}}}, "updates of one round"),
    ([RANDK], {"devices__late": "next_round", "devices__deadline_s": 5.0}, "updates of one round"),
    ([Q4], {"privacy": {"level": "client", "clip": 1.0, "noise_multiplier": 1.0}}, "beyond the clip bound"),
    ([Q4], {"secure__values_per_slot": 2}, "drop one"),
    ([RANDK], {"compression__warmup_rounds": 2}, "fixed for the run"),
])
def test_codecs_that_cannot_run_inside_encryption_are_refused_with_the_reason(uplink, extra, message):
    with pytest.raises(JobError, match=message):
        parse_job(small_job(secure={"scheme": "ckks", "min_clients": 2}, compression={"uplink": uplink}, **extra))


def test_a_compressed_encrypted_round_moves_the_model_only_at_the_rounds_coordinates(local_driver):
    driver = local_driver(small_job(secure={"scheme": "ckks", "min_clients": 2, "range": 0.1},
                                    compression={"uplink": [{"kind": "randk", "fraction": 0.3, "shared": True},
                                                            {"kind": "quantize", "bits": 4}]}))
    plan = driver.sealing.plan
    before = driver.state.params.copy()
    result = driver.run_round(1)
    assert result.completed
    moved = np.flatnonzero(driver.state.params != before)
    assert set(moved) <= set(plan.sent(1)) and len(moved) > 0.5 * plan.kept
    assert "residual_norm_mean" not in result.metrics and plan.summary()["encrypted_per_update"] == plan.kept
    unsent = np.setdiff1d(np.arange(len(before)), plan.sent(1))
    for device in result.updates:  # what was not sealed waits in each record
        residual = ray.get(driver.pool.records.ref(device)).residual
        assert np.count_nonzero(residual[unsent]) > 0.5 * len(unsent)  # (pixels that are always 0 have none)
