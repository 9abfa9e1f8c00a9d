"""Robust aggregation under attack on the MNIST non-IID job: accuracy of each rule, clean and with
20% of devices sending sign-flipped updates scaled by 10, side by side in one run. The coordinate-
wise rules also run with bucketing (means of random pairs of updates first; Karimireddy et al. 2022).

    .venv/bin/python benchmarks/robustness.py [--rounds 50 --per-round 20]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from fedray.config import load_job
from fedray.platform.run import connect, run_job

JOB = Path(__file__).resolve().parents[1] / "jobs" / "mnist_noniid.yaml"
ATTACK = ["attack.fraction=0.2", "attack.kind=sign_flip", "attack.scale=10"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=50)
    p.add_argument("--per-round", type=int, default=20)
    args = p.parse_args()
    byzantine = max(1, int(0.3 * args.per_round))  # room for unlucky rounds with more attackers
    base = [f"rounds={args.rounds}", f"devices.per_round={args.per_round}", "devices.min_completion=1.0",
            f"evaluation.every={args.rounds}", "tracking.log_model=false"]
    rules = {"fedavg": [], "median": ["strategy.name=median"],
             "trimmed_mean": ["strategy.name=trimmed_mean", "strategy.beta=0.3"],
             "multi_krum": ["strategy.name=multi_krum", f"strategy.byzantine={byzantine}"],
             # a bucket of 2 holding an attacker is bad: up to 2 x 30% of the buckets
             "median, buckets of 2": ["strategy.name=median", "strategy.bucket_size=2"],
             "trimmed_mean, buckets of 2": ["strategy.name=trimmed_mean", "strategy.beta=0.45",
                                            "strategy.bucket_size=2"]}
    connect()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, rule in rules.items():
            accuracy = []
            for attack in ([], ATTACK):
                print(f"{name}{' under attack' if attack else ''} ...", file=sys.stderr, flush=True)
                job = load_job(JOB, base + rule + attack)
                accuracy.append(run_job(job, JOB.read_text(), f"sqlite:///{tmp}/mlflow.db")["test_accuracy"])
            rows.append((name, *accuracy))
    clean_fedavg = rows[0][1]
    print(f"\n{args.rounds} rounds, {args.per_round} devices per round, 20% attackers (sign flip x10)")
    print(f"{'rule':27} {'clean':>7} {'attacked':>9} {'attacked - clean FedAvg':>24}")
    for name, clean, attacked in rows:
        print(f"{name:27} {clean:7.4f} {attacked:9.4f} {attacked - clean_fedavg:+24.4f}")


if __name__ == "__main__":
    main()
