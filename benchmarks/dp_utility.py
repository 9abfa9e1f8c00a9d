"""What differential privacy costs: test accuracy against epsilon at both levels, and how much
slower a DP-SGD local step is than a plain one.

1. Sample level (DP-SGD on every device, Opacus): the MNIST subset (5,000 images, IID) on 10
   devices of about 400 training images, small CNN, every device in every round, ``--sample-rounds``
   rounds of one epoch (batch 32, lr 0.3 for all: 0.6 diverges without privacy, max_grad_norm 1). For each target epsilon, fedray's
   ``target_epsilon`` picks each device's noise multiplier so that it spends exactly that by the
   last round; "none" is the same job without privacy.
2. Client level (DP-FedAvg, central noise): synthetic data (32 features, 10 overlapping classes:
   Gaussian clusters with noise std 3) on 1,000 devices of 20 samples, Poisson sampling at q = 0.1 (100 expected per round), ``--client-rounds``
   rounds, logistic regression, clip 0.5. The noise multiplier for each target is the smallest
   whose RDP epsilon after the last round is within it (Opacus's search); "none" is the same job
   without privacy (FedAvg over a fixed 100 devices a round).
3. Step time: a DP-SGD local step (batch 32: per-sample gradients, clipping, noise) against a
   plain SGD step on the same model and data, interleaved, median of ``--reps``.

    .venv/bin/python benchmarks/dp_utility.py [--epsilons 1 3 8 --sample-rounds 15 --client-rounds 30]
"""

from __future__ import annotations

import argparse
import tempfile
import time

import numpy as np
import torch
import yaml

from fedray.agents.privacy import noise_for
from fedray.agents.training import LocalTraining, SampleDP, train
from fedray.config import parse_job
from fedray.models.zoo import build_model
from fedray.platform.run import connect, run_job

DELTA = 1e-5


def sample_level_job(rounds: int, epsilon: float | None) -> dict:
    raw = {
        "name": "dp-sample", "seed": 0, "rounds": rounds,
        "data": {"dataset": "mnist", "partition": {"kind": "iid"}, "holdout": 0.2, "test_fraction": 0.0},
        "model": {"name": "small_cnn"},
        "devices": {"count": 10, "per_round": 10, "local": {"epochs": 1, "batch_size": 32, "lr": 0.3}},
        "evaluation": {"every": rounds},
        "tracking": {"experiment": "benchmarks", "log_model": False},
    }
    if epsilon is not None:
        raw["privacy"] = {"level": "sample", "max_grad_norm": 1.0, "target_epsilon": epsilon, "delta": DELTA}
    return raw


CLIENTS, RATE = 1000, 0.1


def client_level_job(rounds: int, noise_multiplier: float | None) -> dict:
    raw = {
        "name": "dp-client", "seed": 0, "rounds": rounds,
        "data": {"dataset": "synthetic", "synthetic": {"samples": 25_000, "shape": [32], "classes": 10, "noise": 3.0},
                 "partition": {"kind": "iid"}, "holdout": 0.2, "test_fraction": 0.0},
        "model": {"name": "logreg"},
        "devices": {"count": CLIENTS, "per_round": int(RATE * CLIENTS),
                    "local": {"epochs": 1, "batch_size": 10, "lr": 0.5}},
        "evaluation": {"every": rounds},
        "tracking": {"experiment": "benchmarks", "log_model": False},
    }
    if noise_multiplier is not None:
        raw["privacy"] = {"level": "client", "clip": 0.5, "noise_multiplier": noise_multiplier, "delta": DELTA}
    return raw


def run(raw: dict, uri: str) -> dict:
    started = time.perf_counter()
    summary = run_job(parse_job(raw), yaml.safe_dump(raw), uri)
    return summary | {"seconds": time.perf_counter() - started}


def step_times(model_name: str, reps: int, steps: int = 16) -> tuple[float, float]:
    """Median milliseconds of a plain and of a DP-SGD step (batch 32) on MNIST-shaped data."""
    torch.set_num_threads(1)
    model = build_model(model_name, None, {}, (1, 28, 28), 10, 0)
    x, y = torch.randn(1024, 1, 28, 28), torch.randint(0, 10, (1024,))
    cfg = LocalTraining(epochs=None, steps=steps, batch_size=32, lr=0.05)
    plain, private = [], []
    for i in range(reps + 1):  # the first of each warms up
        for times, dp in ((plain, None), (private, SampleDP(1.0, 1.0))):
            started = time.perf_counter()
            train(model, x, y, cfg, torch.Generator().manual_seed(i), dp=dp)
            times.append((time.perf_counter() - started) / steps * 1000)
    return float(np.median(plain[1:])), float(np.median(private[1:]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epsilons", type=float, nargs="+", default=[1.0, 3.0, 8.0])
    parser.add_argument("--sample-rounds", type=int, default=15)
    parser.add_argument("--client-rounds", type=int, default=30)
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--models", nargs="+", default=["small_cnn", "logreg", "mlp", "cnn"])
    args = parser.parse_args()

    print("3. step time, DP-SGD vs plain SGD (batch 32, one thread)")
    print(f"{'model':>10} {'plain ms':>9} {'DP-SGD ms':>10} {'ratio':>6}")
    for name in args.models:
        plain, private = step_times(name, args.reps)
        print(f"{name:>10} {plain:9.2f} {private:10.2f} {private / plain:6.2f}")

    connect()
    with tempfile.TemporaryDirectory() as tmp:
        uri = f"sqlite:///{tmp}/mlflow.db"
        print(f"\n1. sample level: DP-SGD, 10 MNIST devices, {args.sample_rounds} rounds, delta {DELTA:g}")
        print(f"{'target eps':>10} {'device eps max':>15} {'test acc':>9} {'seconds':>8}")
        for epsilon in [*args.epsilons, None]:
            s = run(sample_level_job(args.sample_rounds, epsilon), uri)
            spent = f"{s['device_epsilon_max']:.3f}" if epsilon else "-"
            print(f"{epsilon or 'none':>10} {spent:>15} {s['test_accuracy']:9.4f} {s['seconds']:8.1f}")

        print(f"\n2. client level: DP-FedAvg (central), {CLIENTS} synthetic devices, q {RATE:g}, "
              f"{args.client_rounds} rounds, delta {DELTA:g}")
        print(f"{'target eps':>10} {'noise z':>8} {'epsilon':>8} {'test acc':>9} {'seconds':>8}")
        for epsilon in [*args.epsilons, None]:
            z = None if epsilon is None else noise_for("rdp", epsilon, DELTA, RATE, args.client_rounds)
            s = run(client_level_job(args.client_rounds, z), uri)
            spent = f"{s['epsilon']:.3f}" if z else "-"
            print(f"{epsilon or 'none':>10} {z or 0:8.3f} {spent:>8} {s['test_accuracy']:9.4f} {s['seconds']:8.1f}")


if __name__ == "__main__":
    main()
