"""Hierarchical (device -> edge -> cloud) vs flat FedAvg: bytes on the cloud links, simulated
communication time to a target accuracy over a slow cloud link, and final accuracy at equal total
local steps.

Both train the same 20 MNIST devices (the 5,000-image subset, Dirichlet 1.0) with the small CNN,
every device every round. Flat: FedAvg for ``--rounds`` rounds; every device's model download and
update cross its device<->edge link and the edge<->cloud link. Hierarchical: 4 edges of 5 devices
(round robin) running HierFAVG with ``--edge-rounds`` edge rounds per cloud round, for
``rounds / edge_rounds`` cloud rounds: the same local steps in total. Links: device<->edge 50 Mbit/s,
20 ms; edge<->cloud 5 Mbit/s, 150 ms. Communication time is fedray's ``sim_comm_seconds``, computed
from the bytes each run actually serialized; flat is evaluated every round, hierarchical only every
cloud round (which can only delay when it is seen to reach the target).

    .venv/bin/python benchmarks/hierarchy.py [--rounds 40 --edge-rounds 4 --target 0.9 --seeds 0 1 2]
"""

from __future__ import annotations

import argparse
import tempfile

import numpy as np
import yaml

from fedray.config import parse_job
from fedray.platform.run import connect, run_job

NETWORK = {"device_edge": {"bandwidth_mbps": 50, "latency_ms": 20},
           "edge_cloud": {"bandwidth_mbps": 5, "latency_ms": 150}}
EDGES = 4


def job(rounds: int, seed: int, topology: dict | None) -> dict:
    raw = {
        "name": "hierarchy-" + ("flat" if topology is None else "tree"), "seed": seed, "rounds": rounds,
        "data": {"dataset": "mnist", "partition": {"kind": "dirichlet", "alpha": 1.0}, "holdout": 0.2,
                 "test_fraction": 0.0},
        "model": {"name": "small_cnn"},
        "devices": {"count": 20, "per_round": 20, "local": {"epochs": 1, "batch_size": 32, "lr": 0.05}},
        "network": NETWORK,
        "tracking": {"experiment": "benchmarks", "log_model": False},
    }
    if topology is not None:
        raw["topology"] = topology
    return raw


def trace(raw: dict, uri: str) -> list[dict[str, float]]:
    """Each round's metrics."""
    rounds: list[dict[str, float]] = []
    run_job(parse_job(raw), yaml.safe_dump(raw), uri, on_round=lambda result: rounds.append(result.metrics))
    return rounds


def to_target(rounds: list[dict[str, float]], target: float) -> float | None:
    """Simulated communication seconds until test accuracy first reaches ``target``."""
    elapsed = 0.0
    for metrics in rounds:
        elapsed += metrics["sim_comm_seconds"]
        if metrics["test_accuracy"] >= target:
            return elapsed
    return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=40, help="flat rounds (= edge rounds in total)")
    parser.add_argument("--edge-rounds", type=int, default=4)
    parser.add_argument("--target", type=float, default=0.9)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    args = parser.parse_args()
    if args.rounds % args.edge_rounds:
        parser.error("--rounds must be a multiple of --edge-rounds")
    connect()
    uri = f"sqlite:///{tempfile.mkdtemp()}/mlflow.db"
    devices_per_edge = 20 // EDGES
    print(f"20 devices, {EDGES} edges ({devices_per_edge} devices each), {args.rounds} flat rounds vs "
          f"{args.rounds // args.edge_rounds} cloud rounds x {args.edge_rounds} edge rounds; target {args.target}")
    print(f"{'seed':>4} {'cloud B/round flat':>18} {'tree':>9} {'ratio':>6} {'total ratio':>11} "
          f"{'comm s to target flat':>21} {'tree':>6} {'ratio':>6} {'final acc flat':>14} {'tree':>6} {'diff':>6} "
          f"{'wall s flat':>11} {'tree':>6}")
    for seed in args.seeds:
        tree_topology = {"edges": EDGES, "edge_rounds": args.edge_rounds}
        flat = trace(job(args.rounds, seed, None), uri)
        tree = trace(job(args.rounds // args.edge_rounds, seed, tree_topology), uri)
        # flat: every device's download and upload crosses its region's edge<->cloud link
        flat_cloud = [m["bytes_up"] + m["bytes_down"] for m in flat]
        tree_cloud = [m["bytes_edge_cloud"] for m in tree]
        per_round = np.mean(flat_cloud) / np.mean(tree_cloud)
        total = sum(flat_cloud) / sum(tree_cloud)
        t_flat, t_tree = to_target(flat, args.target), to_target(tree, args.target)
        ratio = f"{t_tree / t_flat:6.2f}" if t_flat and t_tree else "   n/a"
        acc_flat, acc_tree = flat[-1]["test_accuracy"], tree[-1]["test_accuracy"]
        wall_flat, wall_tree = (sum(m["round_seconds"] for m in runs) for runs in (flat, tree))
        print(f"{seed:>4} {np.mean(flat_cloud):>18,.0f} {np.mean(tree_cloud):>9,.0f} {per_round:>6.3f} {total:>11.3f} "
              f"{t_flat or float('nan'):>21.1f} {t_tree or float('nan'):>6.1f} {ratio} {acc_flat:>14.3f} "
              f"{acc_tree:>6.3f} {100 * (acc_tree - acc_flat):>+5.1f}p {wall_flat:>11.1f} {wall_tree:>6.1f}")
    print(f"targets: cloud bytes per round reduced >= {devices_per_edge}x (devices per edge); "
          "comm time to target ratio <= 0.5; final accuracy within 1 point")


if __name__ == "__main__":
    main()
