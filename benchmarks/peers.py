"""Peer-to-peer learning side by side on one job: gossip over a ring, a 4-regular graph, the full
graph and random matchings; more gossip steps per round; semi-decentralized averaging; distillation
between different models; agents that exchange nothing; and FedAvg over the same devices.

    .venv/bin/python benchmarks/peers.py [--rounds 40]

The job is jobs/mnist_gossip.yaml (16 MNIST agents, Dirichlet(0.5) labels, small CNN, one local
epoch per round). Printed per setting: the agents' mean and lowest accuracy on the held-out set
after the last round (FedAvg: its global model's), the consensus distance over the norm of the
agents' mean model, bytes each agent sent per round (FedAvg: what each device sends up and gets
down), seconds per round, and accuracy against FedAvg's.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fedray.config import load_job  # noqa: E402
from fedray.platform.run import connect, run_job  # noqa: E402

SETTINGS = {
    "gossip ring": [],
    "gossip ring, 3 steps": ["peers.gossip_steps=3"],
    "gossip 4-regular": ["peers.graph={kind: regular, degree: 4}"],
    "gossip full": ["peers.graph={kind: full}"],
    "gossip matchings": ["peers.graph={kind: matching}"],
    "ring + average every 5": ["peers.aggregate_every=5"],
    "distill logreg/mlp/cnn, full": ["peers.exchange=distill", "peers.graph={kind: full}",
                                     "peers.models=[{name: logreg}, {name: mlp}, {name: small_cnn}]"],
    "local logreg/mlp/cnn": ["peers.exchange=local", "peers.models=[{name: logreg}, {name: mlp}, {name: small_cnn}]"],
    "local (small cnn)": ["peers.exchange=local"],
    "FedAvg, all 16 per round": ["peers=null", "devices.per_round=16"],
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=40)
    args = p.parse_args()
    connect()
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        for label, overrides in SETTINGS.items():
            print(f"{label} ...", file=sys.stderr, flush=True)
            job = load_job(ROOT / "jobs" / "mnist_gossip.yaml",
                           [f"rounds={args.rounds}", f"evaluation.every={args.rounds}", *overrides])
            log, stamps = [], [time.perf_counter()]
            run_job(job, job.model_dump_json(), f"sqlite:///{tmp}/mlflow.db",
                    on_round=lambda h: (log.append(h), stamps.append(time.perf_counter())))
            last = log[-1].metrics
            per_round = statistics.median(b - a for a, b in zip(stamps[1:], stamps[2:]))  # first round dropped
            if job.peers is None:
                sent = statistics.mean(h.metrics["bytes_up"] + h.metrics["bytes_down"] for h in log) / job.devices.count
                rows[label] = (last["test_accuracy"], None, None, sent, per_round)
            else:
                sent = statistics.mean(h.metrics["bytes_sent_mean"] for h in log)
                rows[label] = (last["test_accuracy"], last["test_accuracy_min"], last["consensus_relative"], sent,
                               per_round)
    fedavg = rows["FedAvg, all 16 per round"][0]
    print(f"\n{args.rounds} rounds of jobs/mnist_gossip.yaml; accuracy on the held-out set after the last round")
    print(f"{'setting':30} {'mean acc':>9} {'min acc':>8} {'consensus':>10} {'KB/agent/round':>15} "
          f"{'s/round':>8} {'acc - FedAvg':>13}")
    for label, (mean, low, consensus, sent, seconds) in rows.items():
        low_text = "-" if low is None else f"{low:.4f}"
        consensus_text = "-" if consensus is None else f"{consensus:.4f}"
        print(f"{label:30} {mean:9.4f} {low_text:>8} {consensus_text:>10} {sent / 1e3:15.1f} {seconds:8.3f}"
              f" {mean - fedavg:+13.4f}")


if __name__ == "__main__":
    main()
