"""Acceptance checks: the accuracy experiments behind fedray's claims, each figure printed beside its
threshold with PASS or FAIL. They train for minutes, so they are not tests and not part of CI; an
issue that touches one of these areas runs its check and quotes the lines.

    .venv/bin/python benchmarks/accept.py [--only gossip robust ...] [--seeds 0 1 2]

Exits 1 if any check fails. The checks (about 30 minutes in all on 2 cores):

- gossip: 16 MNIST agents on a ring (jobs/mnist_gossip.yaml, 3 gossip steps a round, 100 rounds)
  against FedAvg over the same 16 devices, all in every round: mean accuracy within 2 points of
  FedAvg's, the worst agent within 8, the agents' models within 10% of their mean.
- distill: jobs/mnist_distill.yaml (logistic regression, MLP and CNN agents exchanging predictions)
  against the same agents training alone: every agent gains, by 10 points on average.
- robust: 10 digits devices, 2 of them sending -10 x their update every round (6 rounds): FedAvg
  loses over 30 points (the attack bites); median, trimmed mean and Multi-Krum stay within 5
  points of clean FedAvg.
- compression: top-k 3% + 2-bit quantization + entropy coding on jobs/mnist_noniid.yaml (5 local
  epochs, 200 rounds, benchmarks/compression.py): at least 100x fewer bytes up than float32 and a
  final accuracy within 1 point of it, averaged over ``--seeds``.
- transfer: MNIST -> digits (benchmarks/transfer.py): fine-tuning every layer of the pretrained
  model reaches the from-scratch run's final accuracy in at most half its rounds; with the backbone
  frozen a device sends at most 1% of the bytes.
- personalization: jobs/mnist_personalized.yaml, 5 of 20 devices a round, 30 rounds: each method's
  personalized (or fine-tuned) accuracy on the devices' own test splits at least 15 points above
  FedAvg's global model.
- fedbuff: 20 MNIST devices, 30% 5x slower (benchmarks/async_vs_sync.py): FedBuff reaches 0.85 test
  accuracy in at most half the wall time synchronous FedAvg takes.
- dp: benchmarks/dp_utility.py's jobs: client-level DP at epsilon 1 within 3 points of the same job
  without privacy; sample-level DP-SGD at epsilon 8 reaches 0.75 (0.957 without privacy).
"""

from __future__ import annotations

import argparse
import json
import operator
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import yaml
from mlflow import MlflowClient

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import async_vs_sync  # noqa: E402
import compression  # noqa: E402
import dp_utility  # noqa: E402
import transfer  # noqa: E402
from fedray.agents.privacy import noise_for  # noqa: E402
from fedray.config import load_job, parse_job  # noqa: E402
from fedray.platform.run import connect, run_job  # noqa: E402


@dataclass(frozen=True)
class Line:
    """One figure against its threshold: ``figure op threshold`` passes."""

    what: str
    figure: float
    op: str  # ">=", ">" or "<=", "<"
    threshold: float

    @property
    def passed(self) -> bool:
        ops = {">=": operator.ge, ">": operator.gt, "<=": operator.le, "<": operator.lt}
        return bool(np.isfinite(self.figure)) and ops[self.op](self.figure, self.threshold)


def _log(job, uri: str) -> list:
    log = []
    run_job(job, job.model_dump_json(), uri, on_round=log.append)
    return log


def gossip(uri: str) -> list[Line]:
    path = ROOT / "jobs" / "mnist_gossip.yaml"
    rounds = ["rounds=100", "evaluation.every=10"]
    ring = _log(load_job(path, rounds + ["peers.gossip_steps=3"]), uri)
    fedavg = _log(load_job(path, rounds + ["peers=null", "name=mnist-fedavg16", "devices.per_round=16"]), uri)
    final, reference = [h.metrics for h in ring if "consensus_distance" in h.metrics][-1], fedavg[-1].metrics["test_accuracy"]
    return [Line("ring of 16: mean accuracy - FedAvg's", final["test_accuracy"] - reference, ">=", -0.02),
            Line("ring of 16: worst agent's accuracy - FedAvg's", final["test_accuracy_min"] - reference, ">", -0.08),
            Line("ring of 16: consensus distance / mean model's norm", final["consensus_relative"], "<", 0.10)]


def distill(uri: str) -> list[Line]:
    path = ROOT / "jobs" / "mnist_distill.yaml"
    final = {}
    for exchange in ("distill", "local"):
        job = load_job(path, [f"peers.exchange={exchange}", "evaluation.every=20"])
        summary = run_job(job, job.model_dump_json(), uri)
        scores = json.loads(Path(MlflowClient(uri).download_artifacts(summary["run_id"], "agents.json")).read_text())
        final[exchange] = [scores[a]["test_accuracy"] for a in sorted(scores, key=int)]
    gains = np.subtract(final["distill"], final["local"])
    return [Line("distillation: mean gain over training alone", float(gains.mean()), ">=", 0.10),
            Line("distillation: smallest agent's gain", float(gains.min()), ">", 0.0)]


def robust(uri: str) -> list[Line]:
    def accuracy(strategy: dict, attacked: bool = True) -> float:
        raw = {"name": "accept-robust", "seed": 0, "rounds": 6,
               "data": {"dataset": "digits", "partition": {"kind": "iid"}},
               "model": {"name": "logreg"}, "strategy": strategy,
               "devices": {"count": 10, "per_round": 10, "workers": 2, "min_completion": 1.0,
                           "local": {"epochs": 2, "batch_size": 32, "lr": 0.5}},
               "attack": {"fraction": 0.2, "kind": "sign_flip", "scale": 10.0} if attacked else None,
               "tracking": {"experiment": "accept", "log_model": False}}
        return run_job(parse_job(raw), yaml.safe_dump(raw), uri)["test_accuracy"]

    clean = accuracy({"name": "fedavg"}, attacked=False)
    lines = [Line("20% sign-flipping attackers: FedAvg - clean FedAvg", accuracy({"name": "fedavg"}) - clean, "<=", -0.30)]
    for label, strategy in (("median", {"name": "median"}), ("trimmed mean", {"name": "trimmed_mean", "beta": 0.2}),
                            ("Multi-Krum", {"name": "multi_krum", "byzantine": 2})):
        lines.append(Line(f"20% sign-flipping attackers: {label} - clean FedAvg", accuracy(strategy) - clean, ">=", -0.05))
    return lines


def compressed(uri: str, seeds: list[int]) -> list[Line]:
    chain = "topk 3% + q2 + entropy"
    ratios, differences = [], []
    for seed in seeds:
        extra = ["devices.local.epochs=5", f"seed={seed}"]
        base, sent = compression.run("float32", 200, uri, extra), compression.run(chain, 200, uri, extra)
        ratios.append(compression.per_update(base) / compression.per_update(sent))
        differences.append(compression.final(sent) - compression.final(base))
    return [Line(f"{chain}: bytes up, float32 / compressed", float(np.mean(ratios)), ">=", 100.0),
            Line(f"{chain}: final accuracy - float32's (mean of {len(seeds)} seeds)", float(np.mean(differences)),
                 ">=", -0.01)]


def transferred(uri: str) -> list[Line]:
    rounds = 20
    curves, sent = transfer.transfer_curves(rounds, uri)
    reached = transfer.rounds_to(curves["transfer, all layers train"], curves["from scratch"][-1])
    return [Line("transfer: rounds to scratch's final accuracy / scratch's rounds",
                 reached / rounds if reached else float("nan"), "<=", 0.5),
            Line("transfer, backbone frozen: bytes up / all layers'",
                 sent["transfer, backbone frozen"] / sent["transfer, all layers train"], "<=", 0.01)]


def personalized(uri: str) -> list[Line]:
    rows = transfer.personal_metrics(30, 5, uri)
    baseline = rows["FedAvg"]["device_accuracy_global"]
    return [Line(f"{label} (5 of 20 a round): own-split accuracy - FedAvg global's",
                 max(m["device_accuracy_personal"], m["device_accuracy_finetuned"]) - baseline, ">=", 0.15)
            for label, m in rows.items()]


def fedbuff(uri: str) -> list[Line]:
    sides = async_vs_sync.strategies(60.0)
    seconds = {}
    for name in ("fedavg (sync)", "fedbuff"):
        strategy, rounds, every = sides[name]
        seconds[name] = async_vs_sync.time_to_target(async_vs_sync.job(strategy, rounds, every, seed=0), 0.85, uri)[0]
    ratio = (seconds["fedbuff"] / seconds["fedavg (sync)"] if None not in seconds.values() else float("nan"))
    return [Line("slow devices: FedBuff's time to 0.85 / synchronous FedAvg's", ratio, "<=", 0.5)]


def dp(uri: str) -> list[Line]:
    rounds = 30
    z = noise_for("rdp", 1.0, dp_utility.DELTA, dp_utility.RATE, rounds)
    private = dp_utility.run(dp_utility.client_level_job(rounds, z), uri)["test_accuracy"]
    public = dp_utility.run(dp_utility.client_level_job(rounds, None), uri)["test_accuracy"]
    sample = dp_utility.run(dp_utility.sample_level_job(15, 8.0), uri)["test_accuracy"]
    return [Line("client-level DP, epsilon 1: accuracy - without privacy", private - public, ">=", -0.03),
            Line("sample-level DP-SGD, epsilon 8: accuracy", sample, ">=", 0.75)]


CHECKS = {"gossip": gossip, "distill": distill, "robust": robust, "compression": compressed,
          "transfer": transferred, "personalization": personalized, "fedbuff": fedbuff, "dp": dp}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--only", nargs="+", choices=list(CHECKS), default=list(CHECKS))
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="seeds of the compression check")
    args = p.parse_args()
    connect()
    lines: list[tuple[str, Line]] = []
    with tempfile.TemporaryDirectory() as tmp:
        uri = f"sqlite:///{tmp}/mlflow.db"
        for name in args.only:
            print(f"{name} ...", file=sys.stderr, flush=True)
            started = time.perf_counter()
            checked = compressed(uri, args.seeds) if name == "compression" else CHECKS[name](uri)
            for line in checked:
                print(f"  {'PASS' if line.passed else 'FAIL'}  {line.what}: {line.figure:.4f} {line.op} "
                      f"{line.threshold:g}", file=sys.stderr, flush=True)
            print(f"{name}: {time.perf_counter() - started:.0f} s", file=sys.stderr, flush=True)
            lines += [(name, line) for line in checked]
    print(f"\n{'':5} {'check':16} {'figure':>9}  threshold  what")
    for name, line in lines:
        print(f"{'PASS' if line.passed else 'FAIL':5} {name:16} {line.figure:9.4f}  {line.op} {line.threshold:<7g}  {line.what}")
    failed = sum(not line.passed for _, line in lines)
    print(f"\n{len(lines) - failed} of {len(lines)} passed" + (f", {failed} FAILED" if failed else ""))
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
