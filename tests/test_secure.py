"""CKKS-encrypted aggregation: the packing math by hand, the parameters' checks, the key authority's
refusals (with real TenSEAL contexts), and real runs against their plaintext twins.

Tolerance: a device's encrypted values are stochastically rounded to a grid of step
``range / (2^(bits-1) - 1)`` (``bits`` per value from the preset), so each is off by less than one
step, and a sum of n by less than n steps (times the weight scale). CKKS's own error is far below
1/2 at these scales (``bounds.noise_floor_bits``), so decryption recovers the integer sums exactly.
"""

import json
import secrets

import numpy as np
import pytest
import ray
import tenseal as ts
from mlflow import MlflowClient

from fedray.config import JobError, parse_job
from fedray.config import secure as bounds
from fedray.platform import privacy
from fedray.platform.aggregation import Partial
from fedray.secure import packing
from fedray.secure.authority import DecryptionRefused, KeyAuthority
from fedray.secure.ciphers import CipherSum
from fedray.secure.plan import SecurePlan, Sealer, SumLoader
from fedray.update import Update

from conftest import history, small_job

SECURE = {"preset": "balanced", "min_clients": 3}


# the packing math, by hand

@pytest.mark.parametrize("per_slot", [1, 2, 3])
def test_packed_slots_sum_to_the_packed_sums(per_slot):
    """The extreme values, summed over the most contributions the headroom allows, and CKKS-sized
    noise on the slots, unpack to the exact sums; so do the tags."""
    rng = np.random.default_rng(0)
    field = 39 // per_slot
    contributions = 8
    bits = field - bounds.headroom(contributions)
    limit = 2 ** (bits - 1) - 1
    layout = packing.Layout(slots=64, per_slot=per_slot, field_bits=field, length=500, tag_fields=per_slot)
    values = [rng.choice([-limit, limit, 0, 1, -1], 500) for _ in range(contributions)]
    values[0][:10] = values[1][:10] = -limit  # every contribution at the bottom of the range
    for v in values[2:]:
        v[:10] = -limit
    tags = [packing.tags(seed, 7, layout.chunks, per_slot, bits) for seed in range(contributions)]
    slots = sum(layout.pack(v, t) for v, t in zip(values, tags))
    assert np.abs(slots).max() < 2.0 ** 38  # within the capacity of [60, 40] at scale 2^20
    got, got_tags = layout.unpack(slots + rng.normal(0, 0.05, slots.shape))
    np.testing.assert_array_equal(got, sum(values))
    np.testing.assert_array_equal(got_tags, sum(tags))
    assert got[0] == -contributions * limit


def test_quantization_is_unbiased_and_counts_what_it_clips():
    rng = np.random.default_rng(1)
    x = np.array([0.3, -0.3, 0.05, 5.0, -7.0])
    ints = np.stack([packing.quantize(x, 0.1, 4, rng)[0] for _ in range(20_000)])
    # limit 7: 5.0 / 0.1 = 50 and -70 are clipped to +-7
    np.testing.assert_allclose(ints.mean(0) * 0.1, [0.3, -0.3, 0.05, 0.7, -0.7], atol=0.005)
    assert packing.quantize(x, 0.1, 4, rng)[1] == 2
    assert set(np.unique(ints[:, 2])) == {0, 1}  # 0.5 steps: either neighbour


def test_capacity_and_noise_floor():
    assert bounds.capacity((60, 40), 20) == 39
    assert bounds.capacity((60, 60, 40), 20) == bounds.DOUBLE_BITS - 1  # double precision bounds it
    balanced = job(secure={"preset": "balanced"}).secure.fields(10)
    assert (balanced.slots, balanced.per_slot, balanced.field_bits, balanced.value_bits) == (2048, 2, 19, 15)
    paillier = job(secure={"scheme": "paillier", "key_bits": 2048, "value_bits": 20}).secure.fields(10)
    assert (paillier.slots, paillier.per_slot, paillier.field_bits, paillier.tag_fields) == (1, 2046 // 24, 24, 4)
    assert bounds.noise_floor_bits(4096, 1) == 14 and bounds.noise_floor_bits(16384, 1000) == 21


# parameters and combinations

def job(**overrides):
    return parse_job(small_job(**overrides))


@pytest.mark.parametrize("secure, needle", [
    ({"poly_modulus_degree": 4096, "coeff_mod_bit_sizes": [60, 50]}, "total 110 bits, over the 109 bits"),
    ({"poly_modulus_degree": 8192, "coeff_mod_bit_sizes": [60, 60, 60, 40]}, "over the 218 bits"),
    ({"poly_modulus_degree": 16384, "coeff_mod_bit_sizes": [60] * 7 + [40]}, "over the 438 bits"),
    ({"coeff_mod_bit_sizes": [60]}, "at least two primes"),
    ({"scale_bits": 40}, "secure.scale_bits 40 leaves 19 bits per slot: 2 values of 9 bits, 2 of them headroom"),
    ({"preset": "precise", "scale_bits": 10}, "below the noise of a sum of 4 ciphertexts"),
    ({"min_clients": 5}, "secure.min_clients \\(5\\) exceeds the most updates one sum can hold \\(4\\)"),
])
def test_parameters_that_are_unsafe_or_cannot_hold_the_values_are_rejected(secure, needle):
    with pytest.raises(JobError, match=needle):
        job(secure=secure)
    job(secure={"poly_modulus_degree": 4096, "coeff_mod_bit_sizes": [60, 49]})  # exactly at the bound


@pytest.mark.parametrize("overrides, needle", [
    ({"strategy": {"name": "median"}}, "strategy median is not a sum"),
    ({"strategy": {"name": "fedasync"}}, "fedasync mixes each single update"),
    ({"strategy": {"name": "scaffold"}}, "control variates that are not encrypted"),
    ({"strategy": {"name": "fedbuff"}}, "staleness.kind constant"),
    ({"strategy": {"name": "fedavg", "norm_bound": 1.0}}, "norm_bound clips updates at the aggregator"),
    ({"topology": {"edges": 2, "edge_rounds": 2}}, "HierFAVG"),
])
def test_combinations_encryption_cannot_do_are_rejected(overrides, needle):
    with pytest.raises(JobError, match=needle):
        job(secure=SECURE, **overrides)


# the key authority and the contexts, with TenSEAL

SCHEMES = {"ckks": {"preset": "balanced"}, "paillier": {"scheme": "paillier", "key_bits": 2048}}


def plan_for(scheme="ckks", devices=6, min_clients=3, per_round=4, weight=10):
    spec = job(secure={**SCHEMES[scheme], "min_clients": min_clients}, devices__count=devices,
               devices__per_round=per_round)
    return SecurePlan.of(spec, ("w", "b"), [300, 10], [weight] * devices, float)


@pytest.fixture(scope="module", params=list(SCHEMES))
def authority(request):
    plan = plan_for(request.param)
    return (plan, *provisioned(plan))


def provisioned(plan, devices=6):
    """A key authority (the plain class) and a sealer holding its devices' seeds, as ``spawn``
    would hand them to a worker."""
    keys = KeyAuthority(plan)
    seeds = {d: secrets.randbits(128) for d in range(devices)}
    keys._seeds.update(seeds)
    return keys, Sealer(plan, keys.public_context(), seeds)


def seal_all(sealer, deltas, round=1, devices=None):
    total = CipherSum(sealer.public, sealer.plan.layout.chunks)
    rng = np.random.default_rng(round)
    for d, delta in zip(devices or range(len(deltas)), deltas):
        _, blob, _ = sealer.seal(d, round, delta, 1.0, 1.0, (0.5, 1.0), rng)
        total.add(blob, d, round)
    return total


def test_aggregators_hold_a_public_context_that_cannot_decrypt(authority):
    plan, keys, sealer = authority
    if plan.scheme == "paillier":  # the public side is the modulus n alone
        assert set(json.loads(keys.public_context())) == {"n"}
        assert vars(SumLoader(plan, keys.public_context()).public).keys() == {"id", "slots", "key", "_width"}
        return
    aggregator = SumLoader(plan, keys.public_context()).public.context
    assert not aggregator.is_private() and not sealer.public.context.is_private()
    vector = ts.ckks_vector(aggregator, [1.0, 2.0])
    with pytest.raises(ValueError, match="secret_key"):
        vector.decrypt()
    assert len(keys.public_context()) < len(keys._keys.context.serialize(save_secret_key=True))


def test_the_decrypted_sum_equals_the_plaintext_sum_within_the_quantization_step(authority):
    plan, keys, sealer = authority
    rng = np.random.default_rng(0)
    deltas = [rng.normal(0, 0.1, 310).astype(np.float32) for _ in range(4)]
    total = seal_all(sealer, deltas, round=11)
    summed, extras = plan.decode(keys.decrypt(total.to_bytes()), 1.0)
    step = 1.0 / plan.limit
    # the devices scaled their deltas by 1: the decoded sum is weight_scale (10) x the deltas' sum
    assert np.abs(summed / plan.weight_scale - sum(deltas)).max() < 4 * step
    assert extras["loss"] == pytest.approx(4 * 0.5, abs=4 * 32 * step) and extras["below_clip"] == pytest.approx(4, abs=0.01)
    assert extras["clipped"] == 0


def test_a_partial_with_an_encrypted_sum_crosses_the_wire(authority):
    plan, keys, sealer = authority
    loader = SumLoader(plan, keys.public_context())
    partial = Partial.zeros(0, loader)
    rng = np.random.default_rng(0)
    for d in range(3):
        plain, blob, _ = sealer.seal(d, 21, rng.normal(0, 0.1, 310).astype(np.float32), 1.0, 1.0, (0.0, 0.0), rng)
        partial.fold(Update(d, 21, 10, 1, 0.0, plain, sealed=blob), 10.0)
    received = Partial.from_bytes(partial.to_bytes(), 0, loader.load)
    assert received.count == 3 and received.weight == 30 and [c[:2] for c in received.sealed.contributions] == [(0, 21), (1, 21), (2, 21)]
    np.testing.assert_array_equal(keys._keys.decrypt(received.sealed.items), keys._keys.decrypt(partial.sealed.items))
    with pytest.raises(ValueError, match="unexpected encrypted sum|aggregates in plaintext"):
        Partial.from_bytes(partial.to_bytes(), 0)


def test_the_authority_decrypts_only_verified_sums_of_enough_devices(authority):
    plan, keys, sealer = authority
    rng = np.random.default_rng(0)
    deltas = [rng.normal(0, 0.1, 310).astype(np.float32) for _ in range(4)]
    with pytest.raises(DecryptionRefused, match="updates of 1 device"):  # an individual update
        keys.decrypt(seal_all(sealer, deltas[:1], round=31).to_bytes())
    with pytest.raises(DecryptionRefused, match="updates of 2 device"):
        keys.decrypt(seal_all(sealer, deltas[:2], round=32).to_bytes())
    # an aggregator adds one device's ciphertext to itself three times, claiming three devices that sent
    one, three = seal_all(sealer, deltas[:1], round=33), seal_all(sealer, deltas[:3], round=33)
    forged = CipherSum(sealer.public, plan.layout.chunks)
    for contribution in three.contributions:
        forged._add([v.copy() if hasattr(v, "copy") else v for v in one.items], [contribution])
    with pytest.raises(DecryptionRefused, match="tags do not match"):
        keys.decrypt(forged.to_bytes())
    # a contribution claimed twice (among three different devices)
    twice = seal_all(sealer, deltas, round=34)
    twice.contributions[2] = twice.contributions[1]
    with pytest.raises(DecryptionRefused, match="claims a contribution twice"):
        keys.decrypt(twice.to_bytes())
    # a device that was never provisioned
    stranger = seal_all(sealer, deltas, round=35)
    stranger.contributions[0] = (99, 35, stranger.contributions[0][2])
    with pytest.raises(DecryptionRefused, match=r"contributions \[\(99, 35\)\].*no device sent"):
        keys.decrypt(stranger.to_bytes())
    # a verified sum decrypts once; a second sum over any of its contributions is refused
    keys.decrypt(seal_all(sealer, deltas[:3], round=36).to_bytes())
    again = seal_all(sealer, deltas[:3], round=36, devices=[0, 4, 5])
    with pytest.raises(DecryptionRefused, match=r"\(0, 36\).*decrypted or refused before"):
        keys.decrypt(again.to_bytes())


def test_a_malicious_aggregator_gets_one_guess_and_cannot_claim_updates_nobody_sent(authority):
    """Padding one update with claims of devices that sent nothing is refused by their receipts;
    a refused sum burns the contributions it claimed, so the honest sum over them never decrypts
    (no retries); every ciphertext's tag holds at least 64 secret bits."""
    plan, keys, sealer = authority
    rng = np.random.default_rng(1)
    deltas = [rng.normal(0, 0.1, 310).astype(np.float32) for _ in range(3)]
    alone = seal_all(sealer, deltas[:1], round=61)
    padded = CipherSum(sealer.public, plan.layout.chunks)
    padded._add(alone.items, alone.contributions + [(1, 61, "00" * 16), (2, 61, alone.contributions[0][2])])
    with pytest.raises(DecryptionRefused, match=r"\[\(1, 61\), \(2, 61\)\].*no device sent"):
        keys.decrypt(padded.to_bytes())
    with pytest.raises(DecryptionRefused, match=r"\(0, 61\).*decrypted or refused before"):  # device 0: burned
        keys.decrypt(seal_all(sealer, deltas, round=61).to_bytes())
    honest = seal_all(sealer, deltas, round=62)
    guessed = CipherSum(sealer.public, plan.layout.chunks)
    guessed._add(seal_all(sealer, deltas[:1], round=62).items, honest.contributions)  # receipts right, sum wrong
    with pytest.raises(DecryptionRefused, match="tags do not match"):
        keys.decrypt(guessed.to_bytes())
    with pytest.raises(DecryptionRefused, match="decrypted or refused before"):
        keys.decrypt(honest.to_bytes())
    assert plan.layout.tag_fields * (plan.bits - 1) >= 64


@pytest.mark.parametrize("secure", [{"preset": "fast"}, {"preset": "balanced"}, {"preset": "precise"},
                                    {"scheme": "paillier", "key_bits": 2048, "value_bits": 8}])
def test_every_preset_tags_each_ciphertext_with_at_least_64_secret_bits(secure):
    spec = job(secure=secure)
    plan = SecurePlan.of(spec, ("w", "b"), [300, 10], [10] * 6, float)
    assert plan.layout.tag_fields * (plan.bits - 1) >= 64


def test_a_ciphertext_under_another_context_is_rejected(authority):
    plan, keys, sealer = authority
    _, foreign = provisioned(plan)
    rng = np.random.default_rng(0)
    blob = foreign.seal(0, 41, rng.normal(0, 0.1, 310).astype(np.float32), 1.0, 1.0, (0.0, 0.0), rng)[1]
    with pytest.raises(ValueError, match="made under another context"):
        CipherSum(sealer.public, plan.layout.chunks).add(blob, 0, 41)
    # relabelled with this context's fingerprint, it does not decrypt to the tags (or, Paillier,
    # it may not even be below this key's n^2)
    with pytest.raises(ValueError, match="tags do not match|outside \\(0, n\\^2\\)"):
        relabelled = CipherSum(sealer.public, plan.layout.chunks)
        for d in range(3):
            relabelled.add(packing.receipt(sealer.seeds[d], d, 41) + sealer.public.id + blob[32:], d, 41)
        keys.decrypt(relabelled.to_bytes())
    with pytest.raises(ValueError, match="does not decode"):
        CipherSum(sealer.public, plan.layout.chunks).add(b"\0" * 16 + sealer.public.id + b"\0" * 40, 0, 41)


def test_a_device_does_not_seal_a_non_finite_delta(authority):
    _, _, sealer = authority
    delta = np.zeros(310, np.float32)
    delta[3] = np.nan
    with pytest.raises(ValueError, match="1 non-finite values"):
        sealer.seal(0, 51, delta, 1.0, 1.0, (0.0, 0.0), np.random.default_rng(0))


# real runs

PAILLIER = {"scheme": "paillier", "key_bits": 2048, "min_clients": 3}


@pytest.mark.usefixtures("ray_session")
@pytest.mark.parametrize("strategy, variants", [({"name": "fedavg"}, [(None, SECURE), ({"edges": 2}, SECURE),
                                                                      (None, PAILLIER)]),
                                                ({"name": "fednova"}, [({"edges": 2}, SECURE)]),
                                                ({"name": "fedadam"}, [(None, SECURE)])])
def test_encrypted_runs_equal_their_plaintext_twins(tracking_uri, reference, strategy, variants, local_run):
    """Flat plaintext runs against encrypted runs, flat and through edges, CKKS and Paillier; the
    losses agree to the quantization's error."""
    client = MlflowClient(tracking_uri)
    plain_client, plain = reference(rounds=3, strategy=strategy)
    for topology, secure in variants:
        sealed = local_run(rounds=3, strategy=strategy, topology=topology, secure=secure)
        np.testing.assert_allclose(history(client, sealed["run_id"], "test_loss"),
                                   history(plain_client, plain["run_id"], "test_loss"), rtol=2e-4)
        np.testing.assert_allclose(history(client, sealed["run_id"], "train_loss"),
                                   history(plain_client, plain["run_id"], "train_loss"), rtol=1e-3)
        assert sealed["bytes_up"] > plain["bytes_up"]
        assert history(client, sealed["run_id"], "clipped_fraction") == [0.0] * 3
        scheme = secure.get("scheme", "ckks")
        assert client.get_run(sealed["run_id"]).data.tags["fedray.secure"] == \
            f"{scheme}: 650 values encrypted, 0 in plaintext"
        assert "secure.json" in {a.path for a in client.list_artifacts(sealed["run_id"])}


@pytest.mark.usefixtures("ray_session")
def test_selective_encryption_keeps_the_rest_in_plaintext(tracking_uri, reference, local_run):
    plain_client, plain = reference(rounds=3)
    sealed = local_run(rounds=3, secure={**SECURE, "encrypt": ["*.bias"]})
    np.testing.assert_allclose(history(MlflowClient(tracking_uri), sealed["run_id"], "test_loss"),
                               history(plain_client, plain["run_id"], "test_loss"), rtol=1e-4)
    assert MlflowClient(tracking_uri).get_run(sealed["run_id"]).data.tags["fedray.secure"] == \
        "ckks: 10 values encrypted, 640 in plaintext"


@pytest.mark.usefixtures("ray_session")
def test_a_device_that_drops_out_contributes_nothing(local_driver, tmp_path):
    from test_run import poisoned_digits

    driver = local_driver(small_job(secure=SECURE, **poisoned_digits(tmp_path / "one.npz", [5])))
    result = driver.run_round(1)
    assert result.completed and result.metrics["participants"] == 5
    (bad,) = result.failures
    assert "non-finite values" in result.failures[bad] and "does not send it" in result.failures[bad]
    driver.finish()


@pytest.mark.usefixtures("ray_session")
def test_a_replaced_worker_is_given_its_devices_seeds_again(local_driver):
    driver = local_driver(small_job(rounds=3, devices__count=4, devices__per_round=4, devices__workers=2,
                                    secure={"min_clients": 2}))
    assert driver.run_round(1).completed
    ray.kill(driver.pool.workers.actors[0], no_restart=True)
    second = driver.run_round(2)  # the device sent to the dead worker fails
    assert second.completed and second.metrics["participants"] == 3 and len(second.failures) == 1
    third = driver.run_round(3)  # the new worker's devices' updates verify
    assert third.completed and third.metrics["participants"] == 4 and not third.failures
    driver.finish()


@pytest.mark.usefixtures("ray_session")
def test_too_few_devices_leave_the_sum_encrypted_and_the_model_unchanged(local_driver, tmp_path):
    from test_run import poisoned_digits

    driver = local_driver(small_job(secure={"min_clients": 6}, **poisoned_digits(tmp_path / "one.npz", [5])))
    before = driver.evaluate()
    result = driver.run_round(1)
    assert not result.completed and result.metrics["participants"] == 5  # the quorum is met, min_clients not
    assert driver.evaluate() == before
    driver.finish()


@pytest.mark.usefixtures("ray_session")
def test_fedbuff_steps_on_sums_of_different_devices(tracking_uri, local_run):
    client = MlflowClient(tracking_uri)
    summary = local_run(rounds=4, devices__count=6, devices__per_round=4,
                  strategy={"name": "fedbuff", "buffer_size": 3, "staleness": {"kind": "constant"}}, secure=SECURE)
    assert summary["completed_rounds"] == 4  # the authority refuses a buffer of fewer than 3 devices
    losses = history(client, summary["run_id"], "test_loss")
    assert losses[-1] < losses[0]


@pytest.mark.usefixtures("ray_session")
def test_distributed_noise_under_encryption_is_calibrated_and_accounted(tracking_uri, local_run):
    """As ``test_privacy``'s calibration test: with noise far above the clipped deltas, each
    round's step is the sum of the devices' shares, encrypted and decrypted once. A Poisson sample
    of the 6 devices at rate 2/3 holds fewer than min_clients = 3 in 10% of rounds, which then fail:
    6 rounds leave 3 complete but in 0.13% of runs."""
    z, clip, d = 100.0, 1.0, 64 * 10 + 10
    summary = local_run(rounds=6, topology={"edges": 2}, secure=SECURE,
                  privacy={"level": "client", "mode": "distributed", "clip": clip, "noise_multiplier": z})
    client = MlflowClient(tracking_uri)
    participants = history(client, summary["run_id"], "participants")
    norms = {m.step: m.value for m in client.get_metric_history(summary["run_id"], "update_norm")}
    ratios = [norm / (z * clip * np.sqrt(d) / 4 * np.sqrt(participants[r - 1] / 2)) for r, norm in norms.items()]
    assert len(ratios) >= 3 and np.mean(ratios) == pytest.approx(1.0, rel=0.05)
    assert history(client, summary["run_id"], "epsilon") == pytest.approx(
        [privacy.Ledger(z, 4 / 6, 1e-5).epsilon(r) for r in range(1, 7)])


@pytest.mark.usefixtures("ray_session")
def test_mnist_reaches_the_same_accuracy_encrypted(tracking_uri, local_run):
    mnist = {"data": {"dataset": "mnist", "partition": {"kind": "dirichlet", "alpha": 1.0}},
             "model": {"name": "small_cnn"}, "devices__count": 10, "devices__per_round": 5, "rounds": 3}
    plain = local_run(**mnist)
    sealed = local_run(**mnist, secure={"preset": "balanced", "min_clients": 3})
    assert abs(sealed["test_accuracy"] - plain["test_accuracy"]) <= 0.002


@pytest.mark.usefixtures("ray_session")
def test_the_threat_model_holds_through_the_real_actors(local_driver):
    """docs/secure.md's threat model, line by line, on a run's own actors (through two edges; the
    driver is this process, a curious one):
    - the driver, the edges and the devices hold public contexts that cannot decrypt;
    - the authority offers no call that returns a seed or enrolls a device: workers get their
      devices' seeds from the authority that starts them;
    - a curious driver that has one device's sealed update (it asked the device's worker itself)
      cannot get it decrypted: alone it is refused, and the refusal burns it, so the honest sum
      over it is refused too; padding it with claims of devices that sent nothing is refused;
    - by default a sum holds 3 devices, so one colluding device cannot subtract itself out of a
      sum to isolate another's update."""
    import time

    driver = local_driver(small_job(rounds=2, topology={"edges": 2}, secure={"preset": "balanced"}))
    assert driver.run_round(1).completed
    authority, plan, public, edge, worker, params = (driver.sealing.authority, driver.sealing.plan, driver.sealing.public,
                                                     driver.edges.group.actors[0], driver.pool.workers.actors[0],
                                                     driver.state.params)
    hosted = np.flatnonzero(driver.pool.group_of == driver.pool.group_of[0]).tolist()
    assert not driver.sealing.sums.public.context.is_private()
    assert not ray.get(edge.__ray_call__.remote(lambda self: self._sums.public.context.is_private()))
    assert not ray.get(worker.__ray_call__.remote(lambda self: self._outbox._sealer.public.context.is_private()))
    offered = {m for m in authority._ray_method_signatures if not m.startswith("__")}
    assert offered == {"public_context", "spawn", "decrypt"} and not hasattr(authority, "enroll")
    assert len(hosted) >= 3 and plan.min_clients == 3

    sealed = {d: Update.from_bytes(ray.get(worker.fit.remote(d, 99, time.time(), params))[0]).sealed for d in hosted[:3]}
    loader = SumLoader(plan, public)

    def decrypt(contributions):
        total = loader.empty()
        for d, blob in contributions:
            total.add(blob, d, 99)
        return ray.get(authority.decrypt.remote(total.to_bytes()))

    with pytest.raises(ray.exceptions.RayTaskError, match="updates of 1 device"):
        decrypt([(hosted[0], sealed[hosted[0]])])
    with pytest.raises(ray.exceptions.RayTaskError, match=rf"\({hosted[0]}, 99\).*decrypted or refused before"):
        decrypt(sealed.items())
    padded = [(hosted[1], sealed[hosted[1]])] + [(d, b"\0" * packing.RECEIPT_BYTES + sealed[hosted[1]][16:])
                                                 for d in hosted[2:3] + [hosted[0] + 100]]
    with pytest.raises(ray.exceptions.RayTaskError, match="no device sent"):
        decrypt(padded)
    driver.finish()
