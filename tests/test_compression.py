"""Update compression: the codecs' math (no Ray), their checks at the receiver, the refusals at
validation, and runs through real Ray with error feedback in the device records."""

from __future__ import annotations

import asyncio
import struct
import zlib
from types import SimpleNamespace

import numpy as np
import pytest
import ray
from mlflow.tracking import MlflowClient

from conftest import history, small_job
from fedray.compression.codecs import Chain, unvarint, varint
from fedray.config import JobError, parse_job
from fedray.config.compression import CompressionSpec

SHAPES = ((16, 1, 3, 3), (16,), (32, 16, 3, 3), (32,), (10, 288), (10,))
SIZE = sum(int(np.prod(s)) for s in SHAPES)


def chain(*stages, shapes=SHAPES, **spec) -> Chain:
    if not stages:
        return Chain(shapes)  # float32, as it is
    job = SimpleNamespace(seed=0, compression=CompressionSpec(uplink=list(stages), **spec))
    return Chain.of(job, shapes)


def vector(seed: int = 0, n: int = SIZE) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(n).astype(np.float32)


def roundtrip(c: Chain, x: np.ndarray, seed: int = 1, round: int = 1, device: int = 0) -> np.ndarray:
    return c.decode(c.encode(x, round, device, np.random.default_rng(seed)), round, device)


@pytest.mark.parametrize("bits", [1, 2, 4, 8])
def test_stochastic_quantization_is_unbiased_and_within_one_step(bits):
    """Each decoded value is within one level's step of the true one, and the mean over many
    encodings converges to it: every coordinate within 5 standard errors of the mean (the
    rounding's variance is at most step^2 / 4)."""
    c = chain({"kind": "quantize", "bits": bits}, shapes=((200,),))
    x = vector(n=200)
    x[:2] = [x.min() - 1, x.max() + 1]  # the range's ends
    step = (x.max() - x.min()) / (2 ** bits - 1)
    trials = 3000
    decoded = np.stack([roundtrip(c, x, seed=s, device=0) for s in range(trials)])
    assert np.abs(decoded - x).max() <= step * (1 + 1e-5)
    assert len(c.encode(x, 1, 0, np.random.default_rng(0))) == 5 + 4 + 8 + -(-200 * bits // 8)
    error = np.abs(decoded.mean(axis=0) - x)
    assert error.max() < 5 * (step / 2) / np.sqrt(trials)
    if bits == 1:  # a one-bit value is one of the ends: its sign alone would be biased
        np.testing.assert_allclose(np.unique(decoded), [x.min(), x.max()], rtol=1e-6)


def test_sign_sends_the_mean_magnitude_with_each_sign():
    x = vector()
    decoded = roundtrip(chain({"kind": "sign"}), x)
    np.testing.assert_allclose(decoded, np.where(x > 0, 1, -1) * np.abs(x).mean(), rtol=1e-6)
    assert np.linalg.norm(decoded) <= np.linalg.norm(x)  # never longer: clipping still bounds it


def test_topk_keeps_the_largest_coordinates_exactly_and_sends_their_positions():
    x = vector()
    c = chain({"kind": "topk", "fraction": 0.05})
    k = c.kept(1)
    assert k == 385  # 5% of 7690, rounded half up
    decoded = roundtrip(c, x)
    kept = np.argsort(-np.abs(x))[:k]
    np.testing.assert_array_equal(decoded[kept], x[kept])
    assert np.count_nonzero(decoded) == k
    x[:160] *= 1e-3  # the first layer's update is small: chosen per layer, it still sends its 5%
    decoded, offset = roundtrip(chain({"kind": "topk", "fraction": 0.05, "per_layer": True}), x), 0
    for shape in SHAPES:
        n = int(np.prod(shape))
        block, sent = x[offset:offset + n], decoded[offset:offset + n]
        kept = np.argsort(-np.abs(block))[:max(1, int(np.floor(0.05 * n + 0.5)))]
        np.testing.assert_array_equal(sent[kept], block[kept])
        assert np.count_nonzero(sent) == len(kept)
        offset += n
    # positions go as varint gaps: fewer bytes than 4 per position
    assert len(c.encode(x, 1, 0, np.random.default_rng(0))) < 5 + 4 + 4 * k + 2 * k


def test_randk_draws_coordinates_from_a_seed_shared_with_the_receiver():
    x = vector()
    independent = chain({"kind": "randk", "fraction": 0.1})
    shared = chain({"kind": "randk", "fraction": 0.1, "shared": True})
    a, b = (np.flatnonzero(roundtrip(independent, x, device=d)) for d in (0, 1))
    assert len(a) == len(b) == round(0.1 * SIZE) and not np.array_equal(a, b)
    same = [np.flatnonzero(roundtrip(shared, x, device=d)) for d in (0, 1)]
    np.testing.assert_array_equal(*same)
    assert not np.array_equal(same[0], np.flatnonzero(roundtrip(shared, x, round=2)))  # new coordinates each round
    np.testing.assert_array_equal(roundtrip(shared, x)[same[0]], x[same[0]])
    assert len(shared.encode(x, 1, 0, np.random.default_rng(0))) == 5 + 4 + 4 * len(a)  # no positions sent


def test_lowrank_reproduces_low_rank_matrices_and_sends_vectors_whole():
    rng = np.random.default_rng(0)
    parts = []
    for shape in SHAPES:
        if len(shape) == 1:
            parts.append(rng.standard_normal(shape[0]))
        else:
            rows, cols = shape[0], int(np.prod(shape[1:]))
            parts.append((rng.standard_normal((rows, 2)) @ rng.standard_normal((2, cols))).ravel())
    x = np.concatenate(parts).astype(np.float32)
    c = chain({"kind": "lowrank", "rank": 2})
    np.testing.assert_allclose(roundtrip(c, x), x, atol=1e-4)
    full_rank = vector()
    error = np.linalg.norm(roundtrip(c, full_rank) - full_rank) / np.linalg.norm(full_rank)
    assert 0.3 < error < 1.0  # a projection: loses most of a random matrix, never adds
    matrices = [(16, 9), (32, 144), (10, 288)]
    assert len(c.encode(x, 1, 0, rng)) == 5 + 4 + 4 * (sum(2 * (m + n) for m, n in matrices) + 16 + 32 + 10)


def test_entropy_coding_is_lossless_and_only_kept_when_smaller():
    x = np.round(vector(), 1)  # few distinct values: compressible
    for stages in ([], [{"kind": "topk", "fraction": 0.1}, {"kind": "quantize", "bits": 4}]):
        plain, coded = chain(*stages), chain(*stages, {"kind": "entropy"})
        a, b = (c.encode(x, 1, 0, np.random.default_rng(3)) for c in (plain, coded))
        assert len(b) < len(a) and b[0] == 1
        np.testing.assert_array_equal(plain.decode(a, 1, 0), coded.decode(b, 1, 0))
    # random one-bit levels do not compress: sent as they are
    blob = chain({"kind": "quantize", "bits": 1}, {"kind": "entropy"}).encode(vector(), 1, 0, np.random.default_rng(0))
    assert blob[0] == 0 and len(blob) == 5 + 4 + 8 + SIZE // 8 + 1


def test_warm_up_ramps_the_kept_fraction_down_to_its_target():
    c = chain({"kind": "topk", "fraction": 0.01}, warmup_rounds=4)
    kept = [c.kept(r) for r in range(1, 7)]
    assert kept == sorted(kept, reverse=True) and kept[0] > 0.3 * SIZE
    assert kept[3:] == [round(0.01 * SIZE)] * 3


@pytest.mark.parametrize("stages", [
    [{"kind": "topk", "fraction": 0.02}, {"kind": "quantize", "bits": 2}, {"kind": "entropy"}],
    [{"kind": "randk", "fraction": 0.05}],
    [{"kind": "sign"}],
    [{"kind": "lowrank", "rank": 1}, {"kind": "quantize", "bits": 4}],
])
def test_error_feedback_sends_every_update_in_the_end(stages):
    """Sent plus residual equals the sum of the true updates after every round, and the residual
    stays bounded (what is held back is sent later)."""
    c = chain(*stages)
    rng = np.random.default_rng(0)
    residual, total, sent_total, norms = np.zeros(SIZE, np.float32), np.zeros(SIZE), np.zeros(SIZE), []
    for r in range(1, 41):
        x = vector(r) * 0.1
        _, sent, residual = c.compress(x, residual, r, 0, rng)
        total += x
        sent_total += sent
        np.testing.assert_allclose(sent_total + residual, total, atol=1e-4)
        norms.append(np.linalg.norm(residual))
    assert max(norms[20:]) < 3 * max(norms[:20]) + 1e-3  # no blow-up


def test_a_bound_clips_what_is_sent_and_the_residual_keeps_the_rest():
    c = chain({"kind": "topk", "fraction": 0.1}, {"kind": "quantize", "bits": 4})
    x, residual = vector(), vector(1) * 0.5
    blob, sent, new = c.compress(x, residual, 1, 0, np.random.default_rng(0), bound=0.3)
    np.testing.assert_array_equal(c.decode(blob, 1, 0), sent)  # what the receiver decodes
    assert 0.299 < np.linalg.norm(sent.astype(np.float64)) <= 0.3
    np.testing.assert_allclose(sent + new, x + residual, atol=1e-5)


def test_varint_round_trips_and_refuses_truncated_numbers():
    values = np.array([0, 1, 127, 128, 16383, 16384, 2**21, 2**28 + 5, 2**34], dtype=np.uint64)
    data = varint(values)
    np.testing.assert_array_equal(unvarint(data), values)
    with pytest.raises(ValueError, match="end inside"):
        unvarint(data[:-1])


def _malformed(c: Chain, x: np.ndarray) -> dict[str, bytes]:
    good = c.encode(x, 1, 0, np.random.default_rng(0))
    body = zlib.decompress(good[5:])
    (n,) = struct.unpack_from("<I", body)
    gaps = unvarint(body[4:4 + n])
    gaps[-1] += SIZE
    beyond = struct.pack("<I", len(varint(gaps))) + varint(gaps) + body[4 + n:]
    gaps[-1] = 0
    repeated = struct.pack("<I", len(varint(gaps))) + varint(gaps) + body[4 + n:]
    return {
        "shorter than its header": good[:3],
        "entropy flag 7": bytes([7]) + good[1:],
        "not one zlib stream": good[:-4],
        "does not decode": good[:5] + b"garbage!" * 8,
        "not one zlib stream of at most": good[:5] + zlib.compress(bytes(10**6)),
        "declares": good[:5] + zlib.compress(struct.pack("<I", 10**6) + body[4:]),
        "value bytes": good[:5] + zlib.compress(body + b"\x00"),
        "not a finite interval": good[:5] + zlib.compress(body[:4 + n] + struct.pack("<ff", np.nan, 1) + body[12 + n:]),
        "beyond the vector": good[:5] + zlib.compress(beyond),
        "a position repeats": good[:5] + zlib.compress(repeated),
        "gain": good[:1] + struct.pack("<f", np.inf) + good[5:],
    }


def test_malformed_compressed_updates_are_rejected_naming_the_device():
    from fedray.platform.intake import Intake
    from fedray.platform.pool import Done, Task
    from fedray.update import Update

    c = chain({"kind": "topk", "fraction": 0.05}, {"kind": "quantize", "bits": 4}, {"kind": "entropy"})
    x = vector()
    cases = _malformed(c, x)
    for reason, blob in cases.items():
        with pytest.raises(ValueError, match=reason):
            c.decode(blob, 1, 0)
    intake = Intake()
    check = {"size": SIZE, "train_sizes": [10] * 20, "expect_control": False, "codec": c}
    payloads = [Update(d, 1, 10, 1, 0.5, np.frombuffer(blob, np.uint8)).to_bytes() for d, blob in enumerate(cases.values())]
    payloads.append(Update(len(cases), 1, 10, 1, 0.5, x).to_bytes())  # uncompressed, in a compressed run
    payloads.append(Update(len(cases) + 1, 1, 10, 1, 0.5, np.frombuffer(c.encode(x, 1, len(cases) + 1,
                                                                              np.random.default_rng(0)), np.uint8)).to_bytes())
    for d, payload in enumerate(payloads):
        intake.accept(Done(Task(d, 1, 0, 0, 0.0), payload), 1, **check)
    assert intake.accepted == [len(cases) + 1]  # the well-formed one
    for d, reason in enumerate(cases):
        assert intake.failures[d].startswith(f"rejected: device {d}'s compressed update:") and reason in intake.failures[d]
    assert intake.failures[len(cases)] == f"rejected: device {len(cases)} sent a float32 delta; this run's updates are compressed"


def test_the_downlink_sends_each_device_what_it_missed_and_keeps_the_error():
    """Devices that missed rounds download every message since (or the whole view, when smaller)
    and all hold the server's view; what the messages drop stays in model - view and is sent later."""
    from fedray.platform.downlink import Downlink

    c = chain({"kind": "topk", "fraction": 0.1}, {"kind": "quantize", "bits": 4})
    model = vector()
    downlink = Downlink(c, model, 4, seed=0)
    errors, last = [], {d: 0 for d in range(4)}  # the messages each device has applied
    for r, devices in enumerate([[0], [1], [0, 1], [2], [0]], 1):
        model = model + 0.05 * vector(r)
        view, downloads = downlink.send(model, np.array(devices))
        errors.append(np.linalg.norm(model - view))
        for d, got in zip(devices, downloads):
            assert got == sum(downlink.sizes[last[d]:]) > 0  # the messages after the last it applied
            last[d] = r
    assert downlink.sizes[0] < SIZE  # a tenth of the values, 4 bits each, with positions
    assert max(errors) < 3 * errors[0]  # the error is carried, not accumulated
    eight_bits = Downlink(chain({"kind": "quantize", "bits": 8}), model, 2, seed=0)
    for r in range(1, 6):
        _, downloads = eight_bits.send(model + 0.05 * vector(r), np.array([0] if r < 5 else [0, 1]))
    assert downloads == [eight_bits.sizes[-1], 4 * SIZE]  # device 1 missed 5 messages: the whole view is smaller


def test_an_edge_sends_its_sum_quantized_and_the_driver_checks_it():
    """An edge's Partial with compression.edge (8 bits, zlib): the sum comes back within one
    quantization step, everything else exactly, in under a third of the float32 bytes; a payload
    that does not decode, or a float32 sum where a compressed one is due, is refused."""
    from fedray.platform.aggregation import Partial

    job = SimpleNamespace(seed=0, compression=CompressionSpec(edge=[{"kind": "quantize", "bits": 8},
                                                                    {"kind": "entropy"}]))
    up = Chain.edge(job, SIZE)
    p = Partial.zeros(SIZE)
    for d in range(3):
        p.add(vector(d), 10.0 + d, control=vector(10 + d))
    payload = p.to_bytes(lambda x: up.encode(x, 0, 1, np.random.default_rng(0)))
    q = Partial.from_bytes(payload, SIZE, decode=lambda blob: up.decode(blob, 0, 1))
    step = (p.weighted_sum.max() - p.weighted_sum.min()) / 255
    assert np.abs(q.weighted_sum - p.weighted_sum).max() <= step * 1.001
    np.testing.assert_array_equal(q.control_sum, p.control_sum.astype(np.float32))  # control sums go as float32
    assert (q.weight, q.steps_weight, q.count) == (p.weight, p.steps_weight, 3)
    assert len(payload) - 4 * SIZE < len(p.to_bytes()) / 3 * 2  # the sum's part: 8 bits + zlib, not 32
    with pytest.raises(ValueError, match="entropy flag 7"):
        Partial.from_bytes(payload[:57] + b"\x07" + payload[58:], SIZE, decode=lambda blob: up.decode(blob, 0, 1))
    with pytest.raises(ValueError, match="partial holds"):
        Partial.from_bytes(payload[:-1], SIZE, decode=lambda blob: up.decode(blob, 0, 1))
    with pytest.raises(ValueError, match="entropy flag"):
        Partial.from_bytes(p.to_bytes(), SIZE, decode=lambda blob: up.decode(blob, 0, 1))  # float32, uncompressed
    with pytest.raises(ValueError, match="expected vectors of"):
        Partial.from_bytes(payload, SIZE)  # a compressed sum where float32 is due


@pytest.mark.parametrize("extra, message", [
    ({"compression": {"edge": [{"kind": "topk"}]}, "topology": {"edges": 2}}, "edge topk: an edge keeps no residual"),
    ({"compression": {"edge": [{"kind": "quantize"}]}}, "the job has no topology"),
    ({"compression": {"edge": [{"kind": "quantize"}]}, "topology": {"edges": 2}, "secure": {"preset": "balanced"}},
     "ciphertext"),
    ({"compression": {"edge": [{"kind": "quantize"}]}, "topology": {"edges": 2}, "privacy": {
      "level": "client", "clip": 1.0, "noise_multiplier": 1.0}}, "one device could move the decoded sum"),
    ({"compression": {"uplink": [{"kind": "quantize"}, {"kind": "topk"}]}}, "out of order"),
    ({"compression": {"uplink": [{"kind": "topk"}, {"kind": "randk"}]}}, "out of order or repeats"),
    ({"compression": {"uplink": [{"kind": "quantize", "bits": 3}]}}, "bits"),
    ({"compression": {"uplink": []}}, "needs uplink, downlink or edge"),
    ({"compression": {"downlink": [{"kind": "entropy"}, {"kind": "sign"}]}}, "downlink .* out of order"),
    ({"compression": {"downlink": [{"kind": "quantize"}]}, "topology": {"edges": 2}}, "synchronous rounds without"),
    ({"compression": {"downlink": [{"kind": "quantize"}]}, "privacy": {"level": "client", "clip": 1.0,
      "noise_multiplier": 1.0}}, "who took part"),
    ({"compression": {"uplink": [{"kind": "sign"}], "warmup_rounds": 3}}, "neither"),
    ({"compression": {"uplink": [{"kind": "topk"}]}, "peers": {"graph": {"kind": "ring"}}, "devices__per_round": 6},
     "peers exchange"),
])
def test_impossible_compression_jobs_are_refused_with_the_reason(extra, message):
    with pytest.raises(JobError, match=message):
        parse_job(small_job(**extra))


def test_a_device_clips_what_it_sends_under_client_level_dp_and_keeps_the_residual():
    """A real device worker under client-level DP: every update the receiver decodes is within the
    clip, and the record it returns holds the residual."""
    from fedray.agents.worker import DeviceWorker
    from fedray.data import datasets, partition
    from fedray.update import Update

    job = parse_job(small_job(devices__local={"epochs": 3, "batch_size": 8, "lr": 2.0},
                              privacy={"level": "client", "clip": 0.3, "noise_multiplier": 1.0},
                              compression={"uplink": [{"kind": "topk", "fraction": 0.2}, {"kind": "quantize", "bits": 2}]}))
    data = datasets.load(job.data, 0)
    split = partition.split(data.y, job.data, job.devices.count, 0)
    worker = DeviceWorker(job, (data.x, data.y), data.num_classes, split.of(np.arange(6)))
    c = Chain.of(job, worker._spec.shapes)
    start = np.zeros(c.size, np.float32)
    norms = []
    for d in range(6):
        record = None
        for r in (1, 2):  # the second round sends its clipped delta plus the first's residual
            payload, record = asyncio.run(worker.fit(d, r, 0.0, start, state=record))
            update = Update.from_bytes(payload)
            sent = c.decode(update.delta, r, d)
            norms.append(np.linalg.norm(sent.astype(np.float64)))
            assert update.residual_norm is None and update.train_loss == 0.0  # statistics of its data stay home
            assert record.residual.shape == (c.size,) and np.linalg.norm(record.residual) > 0
            if r == 1:  # lr 2 x 3 epochs: every delta was longer than the clip; what top-k left is kept
                assert np.linalg.norm(sent.astype(np.float64) + record.residual) == pytest.approx(0.3, rel=1e-4)
    assert max(norms) <= 0.3 and max(norms) > 0.299


def test_compressed_rounds_survive_worker_replacement_with_the_residuals_in_the_records(local_driver):
    """Two runs from one seed, one with every worker killed and replaced after round 1, end with
    the same model bit for bit: the residuals live in the device records, not in the workers. The
    metrics say how much smaller the updates (and the 8-bit broadcasts) were and how much error
    feedback holds."""
    raw = small_job(rounds=3, compression={"uplink": [{"kind": "topk", "fraction": 0.05}, {"kind": "quantize", "bits": 4},
                                                     {"kind": "entropy"}], "downlink": [{"kind": "quantize", "bits": 8}]})
    finals = []
    for replace in (False, True):
        driver = local_driver(raw)
        results = [driver.run_round(1)]
        if replace:
            for i in range(len(driver.pool.workers.actors)):
                driver.pool.workers.replace(i)
            driver.pool.workers.wait_started(len(driver.pool.workers.actors), 60)
        results += [driver.run_round(r) for r in (2, 3)]
        assert all(r.completed and not r.failures for r in results)
        records = {d: ray.get(ref) for d, ref in driver.pool.record_refs(list(range(6))).items()}
        trained = [d for d, s in records.items() if s.version > 0]
        assert trained and all(records[d].residual.shape == (driver.spec.size,) for d in trained)
        finals.append(driver.state.params.copy())
        metrics = results[-1].metrics
        assert metrics["compression_ratio"] > 5 and metrics["residual_norm_mean"] > 0
        # round 1's 4 devices each download its 8-bit message, about a quarter of the float32 model
        assert results[0].metrics["bytes_down"] == 4 * driver.downlink.sizes[0] < 0.3 * 4 * 4 * driver.spec.size
        summary = driver.finish("FINISHED")
        for actor in driver.pool.workers.actors:  # their CPUs, for the next run's workers
            ray.kill(actor)
    np.testing.assert_array_equal(*finals)
    client = MlflowClient(summary["tracking_uri"])
    ratios = history(client, summary["run_id"], "compression_ratio")
    assert len(ratios) == 3 and all(r > 5 for r in ratios)  # 650 values: the header weighs


@pytest.mark.usefixtures("ray_session")
def test_edges_decode_compressed_arrivals_of_an_asynchronous_run(tracking_uri):
    """FedBuff through two edges with compressed updates: each edge decodes and folds its devices'
    arrivals and sends its sum up quantized (compression.edge); every server step completes, and the
    run's participation is recorded per device."""
    import json

    from mlflow.artifacts import download_artifacts

    from fedray.platform.run import run_job

    raw = small_job(rounds=4, topology={"edges": 2}, strategy={"name": "fedbuff", "concurrency": 4, "buffer_size": 2},
                    compression={"uplink": [{"kind": "randk", "fraction": 0.2}, {"kind": "quantize", "bits": 8},
                                            {"kind": "entropy"}], "edge": [{"kind": "quantize", "bits": 8}]})
    job = parse_job(raw)
    log = []
    summary = run_job(job, job.model_dump_json(), tracking_uri, on_round=log.append)
    assert summary["completed_rounds"] == 4 and summary["failures"] == 0
    for step in log:
        assert step.metrics["compression_ratio"] > 3 and step.metrics["update_rate"] == 1.0
        edges = [k for k in step.metrics if k.startswith("participants_edge_")]
        assert sum(step.metrics[k] for k in edges) == 2
        # models down (4 x 650 bytes each), and up from each edge a Partial of 57 + 5 + 4 + 8 + 650 bytes (an 8-bit
        # sum), not 57 + 4 x 650
        assert step.metrics["bytes_edge_cloud"] % (4 * 650) in (724, 2 * 724)
    local = download_artifacts(f"runs:/{summary['run_id']}/participation.json", tracking_uri=tracking_uri)
    participation = json.loads(open(local).read())
    assert participation["update_rate_min"] == 1.0
    assert sum(d["updates"] for d in participation["devices"].values()) == sum(len(s.updates) for s in log) >= 8
    assert all(d["failures"] == 0 for d in participation["devices"].values())
