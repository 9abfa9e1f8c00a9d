"""Every strategy on one non-IID job, Dirichlet alpha 0.1 and 1.0: rounds to a target test
accuracy and final accuracy, same seed and the same budget of device updates.

The job: the 5,000-image MNIST subset over 20 devices, the small CNN, 1 local epoch of SGD
(lr 0.05, batch 32), 10 devices a round for 30 rounds (300 device updates). Each strategy runs with
its defaults. The asynchronous ones keep 10 devices training and get the same 300 updates:
FedBuff steps every 5 (60 server steps), FedAsync every one (300 steps), so their "rounds" are
server steps; the updates column compares like with like.

    .venv/bin/python benchmarks/strategies.py [--rounds 30 --target 0.8]
"""

from __future__ import annotations

import argparse
import sys
import tempfile

import yaml

from fedray.config import parse_job
from fedray.platform.run import connect, run_job

SYNC = ["fedavg", "fedavgm", "fedprox", "fednova", "scaffold", "fedadam", "fedyogi", "fedadagrad",
        "median", "trimmed_mean", "krum", "multi_krum"]
ASYNC = {"fedbuff": 5, "fedasync": 1}  # updates per server step


def job(name: str, alpha: float, rounds: int) -> dict:
    per_step = ASYNC.get(name, 10)
    return {
        "name": f"strategies-{name}-{alpha}", "seed": 0, "rounds": rounds * 10 // per_step,
        "data": {"dataset": "mnist", "partition": {"kind": "dirichlet", "alpha": alpha}, "holdout": 0.2,
                 "test_fraction": 0.0},
        "model": {"name": "small_cnn"},
        "devices": {"count": 20, "per_round": 10, "local": {"epochs": 1, "batch_size": 32, "lr": 0.05}},
        "strategy": {"name": name},
        "evaluation": {"every": 10 // per_step},  # every 10 device updates
        "tracking": {"experiment": "benchmarks", "log_model": False},
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=30, help="synchronous rounds (x10 device updates)")
    p.add_argument("--target", type=float, default=0.8)
    args = p.parse_args()
    connect()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for alpha in (0.1, 1.0):
            for name in SYNC + list(ASYNC):
                print(f"alpha {alpha}: {name} ...", file=sys.stderr, flush=True)
                raw = job(name, alpha, args.rounds)
                history = []
                run_job(parse_job(raw), yaml.safe_dump(raw), f"sqlite:///{tmp}/mlflow.db", on_round=history.append)
                evaluated = [h for h in history if "test_accuracy" in h.metrics]
                first = next((h.round for h in evaluated if h.metrics["test_accuracy"] >= args.target), None)
                rows.append((alpha, name, first, first and first * ASYNC.get(name, 10),
                             evaluated[-1].metrics["test_accuracy"], sum(not h.completed for h in history)))
    print(f"\nMNIST 5k subset, 20 devices, small CNN, {args.rounds * 10} device updates per run; "
          f"target test accuracy {args.target}")
    print("| alpha | strategy | rounds to target | device updates to target | final accuracy | failed rounds |")
    print("|---|---|---|---|---|---|")
    for alpha, name, rounds, updates, final, failed in rows:
        print(f"| {alpha} | {name} | {rounds or '-'} | {updates or '-'} | {final:.4f} | {failed} |")


if __name__ == "__main__":
    main()
