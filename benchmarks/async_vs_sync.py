"""Asynchronous vs synchronous rounds with stragglers: wall time for FedBuff and FedAsync to reach a
target test accuracy, as a ratio to synchronous FedAvg, with 30% of the devices 5x slower.

All three train the same 20 MNIST devices (the 5,000-image subset, Dirichlet 1.0) with the small
CNN. A full-speed device takes 30 ms per local step (a phone, not this machine's core), a slow one
150 ms, so a device's time is its speed, not its share of this machine's 2 cores. FedAvg samples 10
devices a round and waits for all of them; FedBuff and FedAsync keep 10 devices training and step
every 5 arrivals (FedBuff) or every arrival (FedAsync). Time is the sum of the rounds' wall time,
evaluation included, for each until its test accuracy first reaches the target.

    .venv/bin/python benchmarks/async_vs_sync.py [--target 0.85 --seconds 60 --repeats 1]
"""

from __future__ import annotations

import argparse
import sys
import tempfile

import numpy as np
import yaml

from fedray.config import parse_job
from fedray.platform.run import connect, run_job

STEP_SECONDS = 0.03
SEC_PER_SYNC_ROUND = 7 * STEP_SECONDS * 5  # 7 local steps; nearly every round waits for a slow device


def job(strategy: dict, rounds: int, every: int, seed: int) -> dict:
    return {
        "name": f"async-vs-sync-{strategy['name']}", "seed": seed, "rounds": rounds,
        "data": {"dataset": "mnist", "partition": {"kind": "dirichlet", "alpha": 1.0}, "holdout": 0.2,
                 "test_fraction": 0.0},
        "model": {"name": "small_cnn"},
        "devices": {"count": 20, "per_round": 10, "local": {"epochs": 1, "batch_size": 32, "lr": 0.05},
                    "speed": {"kind": "slow_fraction", "fraction": 0.3, "slowdown": 5, "step_seconds": STEP_SECONDS}},
        "strategy": strategy,
        "evaluation": {"every": every},
        "tracking": {"experiment": "benchmarks", "log_model": False},
    }


def strategies(seconds: float) -> dict[str, tuple[dict, int, int]]:
    """Each side's (strategy, rounds, evaluation.every), for about ``seconds`` of training each."""
    sync_rounds = int(seconds / SEC_PER_SYNC_ROUND)
    # expected server steps in the same time: 10 devices in flight, mean device time
    # 7 x 0.03 x (0.7 + 0.3 x 5) = 0.46 s, so ~22 arrivals a second
    arrivals = int(seconds * 10 / (7 * STEP_SECONDS * (0.7 + 0.3 * 5)))
    return {
        "fedavg (sync)": ({"name": "fedavg"}, sync_rounds, 1),
        "fedbuff": ({"name": "fedbuff", "concurrency": 10, "buffer_size": 5}, arrivals // 5, 2),
        "fedasync": ({"name": "fedasync", "concurrency": 10, "alpha": 0.6}, arrivals, 10),
    }


def time_to_target(raw: dict, target: float, uri: str) -> tuple[float | None, float, float]:
    """(seconds until test accuracy first reached ``target`` or None, best accuracy, seconds run)."""
    elapsed, reached, best = 0.0, None, 0.0

    def on_round(result) -> None:
        nonlocal elapsed, reached, best
        elapsed += result.metrics["round_seconds"]
        accuracy = result.metrics.get("test_accuracy")
        if accuracy is not None:
            best = max(best, accuracy)
            if reached is None and accuracy >= target:
                reached = elapsed

    run_job(parse_job(raw), yaml.safe_dump(raw), uri, on_round=on_round)
    return reached, best, elapsed


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--target", type=float, default=0.85)
    p.add_argument("--seconds", type=float, default=60.0, help="about how long each run trains")
    p.add_argument("--repeats", type=int, default=1)
    args = p.parse_args()
    sides = strategies(args.seconds)
    connect()
    results: dict[str, list[tuple[float | None, float, float]]] = {name: [] for name in sides}
    with tempfile.TemporaryDirectory() as tmp:
        for repeat in range(args.repeats):
            order = list(sides) if repeat % 2 == 0 else list(reversed(sides))  # alternate: the machine drifts
            for name in order:
                strategy, rounds, every = sides[name]
                print(f"{name}: {rounds} rounds ...", file=sys.stderr, flush=True)
                results[name].append(time_to_target(job(strategy, rounds, every, seed=repeat), args.target,
                                                    f"sqlite:///{tmp}/mlflow.db"))
    print(f"\n20 devices, 30% 5x slower (30 ms / 150 ms per local step), target test accuracy {args.target}")
    print(f"{'strategy':15} {'seconds to target':>18} {'best accuracy':>14} {'seconds run':>12} {'ratio to sync':>14}")
    sync = [r[0] for r in results["fedavg (sync)"]]
    for name, runs in results.items():
        for i, (reached, best, ran) in enumerate(runs):
            ratio = f"{reached / sync[i]:.2f}" if reached is not None and sync[i] is not None else "-"
            shown = f"{reached:.1f}" if reached is not None else "not reached"
            print(f"{name:15} {shown:>18} {best:14.4f} {ran:12.1f} {ratio:>14}")
    for name in list(sides)[1:]:
        ratios = [a[0] / s for a, s in zip(results[name], sync) if a[0] is not None and s is not None]
        if ratios:
            print(f"{name}: time to {args.target} / synchronous FedAvg's = {np.mean(ratios):.2f} (mean of {len(ratios)})")


if __name__ == "__main__":
    main()
