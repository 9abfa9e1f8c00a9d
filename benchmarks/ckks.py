"""Encrypted aggregation against plaintext, on a ~1M-parameter model with 10 devices.

1. One update, side by side: fedray's CKKS presets (fixed point, several values per slot, one
   data prime) and an NVFlare-style encoding (TenSEAL CKKS, N = 8192, moduli [60, 40, 40], scale
   2^40, one float per slot). The deltas are real: 10 MNIST devices (the 5,000-image subset, IID)
   each train the MLP (784-1024-128-10, 936,330 parameters) for one epoch from the same start.
   Printed: ciphertext bytes per parameter as a multiple of float32's 4, one device's encrypt +
   serialize time, the aggregator's time per device (load and add), the decryption of the
   10-device sum, and the largest error of the decrypted weighted mean delta against the plaintext
   one. fedray's decryption includes verifying the tags of every ciphertext.
   Then the same for a small model, logistic regression on sklearn's digits (650 parameters, 10
   devices), with Paillier (2048- and 3072-bit keys) beside CKKS.
2. Whole rounds, side by side in one Ray: the same job (10 devices, all in every round,
   ``--rounds`` rounds) in plaintext and encrypted with each preset: mean round time and its ratio
   to plaintext, bytes uploaded per round, final test accuracy.
3. ``--mnist-job``: jobs/mnist_noniid.yaml (100 devices, 50 rounds) in plaintext and encrypted
   (balanced): final test accuracy.

    .venv/bin/python benchmarks/ckks.py [--rounds 3 --mnist-job]
"""

from __future__ import annotations

import argparse
import math
import secrets
import tempfile
import time

import numpy as np
import tenseal as ts
import torch
import yaml

from fedray.agents.training import LocalTraining, device_generator, train
from fedray.config import parse_job
from fedray.data import datasets, partition
from fedray.models.params import ParamSpec
from fedray.models.zoo import build_model
from fedray.platform.run import connect, run_job
from fedray.secure.authority import KeyAuthority
from fedray.secure.ciphers import CipherSum
from fedray.secure.plan import SecurePlan, Sealer

DEVICES = 10
LARGE = ("mnist", {"name": "mlp", "kwargs": {"hidden": [1024, 128]}})
SMALL = ("digits", {"name": "logreg"})


def job(name: str, rounds: int, secure: dict | None, workload: tuple[str, dict] = LARGE) -> dict:
    raw = {"name": name, "seed": 0, "rounds": rounds,
           "data": {"dataset": workload[0], "partition": {"kind": "iid"}, "holdout": 0.2, "test_fraction": 0.0},
           "model": workload[1],
           "devices": {"count": DEVICES, "per_round": DEVICES, "local": {"epochs": 1, "batch_size": 32, "lr": 0.05}},
           "tracking": {"experiment": "benchmarks", "log_model": False}}
    return raw | ({"secure": secure} if secure else {})


def real_deltas(workload: tuple[str, dict]) -> tuple[list[np.ndarray], list[int], ParamSpec]:
    """Each device's delta after one local epoch from the seed's model, and its sample count."""
    torch.set_num_threads(1)
    spec_job = parse_job(job("deltas", 1, None, workload))
    data = datasets.load(spec_job.data, 0)
    split = partition.split(data.y, spec_job.data, DEVICES, 0)
    model = build_model(spec_job.model.name, None, spec_job.model.kwargs, data.input_shape, data.num_classes, 0)
    params = ParamSpec.of(model)
    start = params.flatten(model)
    deltas = []
    for d, rows in enumerate(split.train):
        params.load(model, start)
        train(model, torch.from_numpy(data.x[rows]), torch.from_numpy(data.y[rows]), LocalTraining(lr=0.05),
              device_generator(0, 1, d))
        deltas.append(params.flatten(model) - start)
    return deltas, [len(rows) for rows in split.train], params


def fedray_scheme(name: str, secure: dict, deltas: list[np.ndarray], samples: list[int], params: ParamSpec) -> dict:
    spec_job = parse_job(job("secure", 1, secure))
    plan = SecurePlan.of(spec_job, params.names, [math.prod(s) for s in params.shapes], samples, float)
    authority = KeyAuthority(plan)  # the plain class: provisioned here as its spawn would provision a worker
    seeds = {d: secrets.randbits(128) for d in range(DEVICES)}
    authority._seeds.update(seeds)
    sealer = Sealer(plan, authority.public_context(), seeds)
    rng = np.random.default_rng(0)
    total, blobs, encrypt = CipherSum(sealer.public, plan.layout.chunks), [], []
    for d, delta in enumerate(deltas):
        started = time.perf_counter()
        blobs.append(sealer.seal(d, 1, delta, samples[d] / plan.weight_scale, 1.0, (0.0, 0.0), rng)[1])
        encrypt.append(time.perf_counter() - started)
    started = time.perf_counter()
    for d, blob in enumerate(blobs):
        total.add(blob, d, 1)
    aggregate = (time.perf_counter() - started) / DEVICES
    started = time.perf_counter()
    summed, _ = plan.decode(authority.decrypt(total.to_bytes()), 1.0)
    decrypt = time.perf_counter() - started
    expected = sum(n * delta for n, delta in zip(samples, deltas))
    return {"name": name, "bytes": len(blobs[0]) / params.size / 4, "encrypt": float(np.median(encrypt)),
            "aggregate": aggregate, "decrypt": decrypt, "error": float(np.abs(summed - expected).max() / sum(samples))}


def nvflare_style(deltas: list[np.ndarray], samples: list[int], params: ParamSpec) -> dict:
    """TenSEAL CKKS as NVFlare's HE filters use it: the weighted delta as floats, one per slot."""
    context = ts.context(ts.SCHEME_TYPE.CKKS, poly_modulus_degree=8192, coeff_mod_bit_sizes=[60, 40, 40], n_threads=1)
    context.global_scale = 2.0 ** 40
    public = ts.context_from(context.serialize(save_secret_key=False, save_relin_keys=False, save_galois_keys=False),
                             n_threads=1)
    slots, blobs, encrypt = 4096, [], []
    for n, delta in zip(samples, deltas):
        started = time.perf_counter()
        weighted = (n * delta).astype(np.float64)
        blobs.append([ts.ckks_vector(public, weighted[i:i + slots].tolist()).serialize()
                      for i in range(0, len(weighted), slots)])
        encrypt.append(time.perf_counter() - started)
    started = time.perf_counter()
    total = [ts.ckks_vector_from(public, blob) for blob in blobs[0]]
    for update in blobs[1:]:
        for t, blob in zip(total, update):
            t += ts.ckks_vector_from(public, blob)
    aggregate = (time.perf_counter() - started) / DEVICES
    started = time.perf_counter()
    summed = np.concatenate([np.array(t.decrypt(context.secret_key())) for t in total])
    decrypt = time.perf_counter() - started
    expected = sum(n * delta for n, delta in zip(samples, deltas))
    return {"name": "nvflare-style", "bytes": sum(map(len, blobs[0])) / params.size / 4,
            "encrypt": float(np.median(encrypt)), "aggregate": aggregate, "decrypt": decrypt,
            "error": float(np.abs(summed - expected).max() / sum(samples))}


def rounds(raw: dict, uri: str) -> tuple[list[dict], dict]:
    metrics: list[dict] = []
    summary = run_job(parse_job(raw), yaml.safe_dump(raw), uri, on_round=lambda r: metrics.append(r.metrics))
    return metrics, summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--presets", nargs="+", default=["fast", "balanced", "precise"])
    parser.add_argument("--mnist-job", action="store_true", help="also run jobs/mnist_noniid.yaml both ways")
    args = parser.parse_args()

    for workload, schemes in ((LARGE, {p: {"preset": p} for p in args.presets}),
                              (SMALL, {"balanced": {"preset": "balanced"},
                                       "paillier-2048": {"scheme": "paillier", "key_bits": 2048},
                                       "paillier-3072": {"scheme": "paillier", "key_bits": 3072}})):
        deltas, samples, params = real_deltas(workload)
        print(f"1. one update of {params.size:,} parameters ({workload[1]['name']} on {workload[0]}), {DEVICES} devices")
        print(f"{'encoding':>14} {'x float32':>9} {'encrypt s':>9} {'add s/dev':>9} {'decrypt s':>9} {'max err':>9}")
        rows = [nvflare_style(deltas, samples, params)] if workload is LARGE else []
        for row in rows + [fedray_scheme(name, secure, deltas, samples, params) for name, secure in schemes.items()]:
            print(f"{row['name']:>14} {row['bytes']:9.2f} {row['encrypt']:9.4f} {row['aggregate']:9.5f} "
                  f"{row['decrypt']:9.4f} {row['error']:9.1e}")
    print("   (max err: of the decrypted weighted mean delta, against the plaintext one)")

    connect()
    with tempfile.TemporaryDirectory() as tmp:
        uri = f"sqlite:///{tmp}/mlflow.db"
        print(f"\n2. {args.rounds} rounds, {DEVICES} devices every round, MLP on MNIST")
        print(f"{'run':>10} {'round s':>8} {'ratio':>6} {'MB up/round':>11} {'test acc':>8}")
        base = None
        for preset in [None, *args.presets]:
            metrics, summary = rounds(job(preset or "plaintext", args.rounds, preset and {"preset": preset}), uri)
            seconds = float(np.mean([m["round_seconds"] for m in metrics]))
            base = base or seconds
            print(f"{preset or 'plaintext':>10} {seconds:8.2f} {seconds / base:6.2f} "
                  f"{np.mean([m['bytes_up'] for m in metrics]) / 1e6:11.2f} {summary['test_accuracy']:8.4f}")
        if args.mnist_job:
            print("\n3. jobs/mnist_noniid.yaml, plaintext and encrypted (balanced)")
            with open("jobs/mnist_noniid.yaml") as f:
                raw = yaml.safe_load(f) | {"tracking": {"experiment": "benchmarks", "log_model": False}}
            for secure in (None, {"preset": "balanced"}):
                started = time.perf_counter()
                _, summary = rounds(raw | ({"secure": secure} if secure else {}), uri)
                print(f"{'encrypted' if secure else 'plaintext':>10}: test accuracy {summary['test_accuracy']:.4f} "
                      f"in {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
