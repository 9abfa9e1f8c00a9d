"""Federated transfer and personalization, side by side.

    .venv/bin/python benchmarks/transfer.py [--rounds 20] [--personal-rounds 30] [--per-round 20 5]
                                            [--skip-transfer]

Transfer (MNIST -> digits): jobs/mnist_pretrain.yaml trains the FedAvg paper's CNN on MNIST and
registers it; then jobs/digits_transfer.yaml's digits devices train (a) from the seed, (b) from the
registered model with a new head, everything training (at local lr 0.03 against the job's 0.1:
fine-tuning takes a smaller step), (c) the same with the backbone frozen (only the head trains
and is sent). Printed: each one's accuracy on the held-out set per round, the
rounds (b) and (c) need to reach (a)'s final accuracy, against (a)'s rounds, and the bytes each
device sends up per round.

Personalization (jobs/mnist_personalized.yaml: 20 MNIST devices, Dirichlet(0.1) labels): FedAvg,
FedPer, FedRep, FedBN (the CNN with BatchNorm) and Ditto, with all 20 devices in every round and
with 5 of them (partial participation); each device's accuracy on its own test split of the global
model, its personalized model and that model fine-tuned for one epoch (for FedAvg: FedAvg +
fine-tuning), as the mean over devices, their standard deviation and minimum.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fedray.config import load_job  # noqa: E402
from fedray.platform.run import connect, run_job  # noqa: E402

TRANSFER = {  # each at its learning rate: fine-tuning pretrained layers takes a smaller one
    "from scratch": ["model.start=null", "model.replace=[]", "model.train=[]"],
    "transfer, all layers train": ["model.train=[]", "devices.local.lr=0.03"],
    "transfer, backbone frozen": [],
}
PERSONAL = {
    "FedAvg": ["personalization.method=none"],
    "FedPer": ["personalization.method=fedper"],
    "FedRep": ["personalization.method=fedrep"],
    "FedBN": ["personalization.method=fedbn", "model.kwargs={norm: batch}"],
    "Ditto": ["personalization.method=ditto"],
}


def _run(job_file: str, overrides: list[str], uri: str) -> list:
    job = load_job(ROOT / "jobs" / job_file, overrides)
    log = []
    run_job(job, job.model_dump_json(), uri, on_round=log.append)
    return log


def transfer_curves(rounds: int, uri: str) -> tuple[dict[str, list[float]], dict[str, float]]:
    """Pretrain on MNIST, then train digits each way of ``TRANSFER``: each one's held-out accuracy per
    round, and the bytes each device sent up per round."""
    print("pretraining on MNIST (jobs/mnist_pretrain.yaml) ...", file=sys.stderr, flush=True)
    _run("mnist_pretrain.yaml", ["tracking.experiment=bench"], uri)
    curves, sent = {}, {}
    for label, overrides in TRANSFER.items():
        print(f"{label} ...", file=sys.stderr, flush=True)
        log = _run("digits_transfer.yaml", [f"rounds={rounds}", "tracking.export=null", "tracking.experiment=bench",
                                            *overrides], uri)
        curves[label] = [h.metrics["test_accuracy"] for h in log]
        sent[label] = sum(h.metrics["bytes_up"] / h.metrics["participants"] for h in log) / len(log)
    return curves, sent


def rounds_to(curve: list[float], target: float) -> int | None:
    """The first round whose accuracy reaches ``target``."""
    return next((r + 1 for r, acc in enumerate(curve) if acc >= target), None)


def transfer(rounds: int, uri: str) -> None:
    curves, sent = transfer_curves(rounds, uri)
    target = curves["from scratch"][-1]
    print(f"\nMNIST -> digits (28x28), {rounds} rounds; from scratch ends at accuracy {target:.4f}")
    print(f"{'setting':30s} {'final acc':>9s} {'rounds to ' + format(target, '.4f'):>17s} {'vs scratch':>10s} "
          f"{'KB up/device/round':>19s} {'vs all layers':>13s}")
    for label, curve in curves.items():
        reached = rounds_to(curve, target)
        print(f"{label:30s} {curve[-1]:9.4f} {reached or '-':>17} "
              f"{(reached / rounds if reached else float('nan')):10.3f} {sent[label] / 1e3:19.1f} "
              f"{sent[label] / sent['transfer, all layers train']:13.4f}")
    print("accuracy per round:")
    for label, curve in curves.items():
        print(f"  {label:30s} " + " ".join(f"{a:.3f}" for a in curve))


def personal_metrics(rounds: int, per_round: int, uri: str) -> dict[str, dict[str, float]]:
    """Each method of ``PERSONAL``'s last-round metrics (device_accuracy_{global,personal,finetuned}...)."""
    rows = {}
    for label, overrides in PERSONAL.items():
        print(f"{label}, {per_round} per round ...", file=sys.stderr, flush=True)
        rows[label] = _run("mnist_personalized.yaml", [f"rounds={rounds}", f"evaluation.every={rounds}",
                                                       f"devices.per_round={per_round}", "tracking.experiment=bench",
                                                       *overrides], uri)[-1].metrics
    return rows


def personalization(rounds: int, per_round: int, uri: str) -> None:
    rows = personal_metrics(rounds, per_round, uri)
    baseline = rows["FedAvg"]["device_accuracy_global"]
    print(f"\nMNIST, 20 devices ({per_round} per round), Dirichlet(0.1), {rounds} rounds: accuracy on each device's "
          "own test split (mean over devices +- std, min)")
    print(f"{'method':8s} {'global model':>22s} {'personalized':>22s} {'+ fine-tuning':>22s} {'best - FedAvg':>14s}")
    for label, m in rows.items():
        cells = [f"{m[f'device_accuracy_{k}']:.4f} +- {m[f'device_accuracy_{k}_std']:.3f} "
                 f"{m[f'device_accuracy_{k}_min']:.2f}" for k in ("global", "personal", "finetuned")]
        best = max(m["device_accuracy_personal"], m["device_accuracy_finetuned"])
        print(f"{label:8s} {cells[0]:>22s} {cells[1]:>22s} {cells[2]:>22s} {100 * (best - baseline):+13.1f}pt")
    print(f"(FedAvg's global model: {baseline:.4f}; the target is some method >= 15 points above it)")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=20, help="transfer rounds on digits")
    p.add_argument("--personal-rounds", type=int, default=30)
    p.add_argument("--per-round", type=int, nargs="+", default=[20, 5], help="devices per round, personalization")
    p.add_argument("--skip-transfer", action="store_true")
    args = p.parse_args()
    connect()
    with tempfile.TemporaryDirectory() as tmp:
        uri = f"sqlite:///{tmp}/mlflow.db"
        if not args.skip_transfer:
            transfer(args.rounds, uri)
        for per_round in args.per_round:
            personalization(args.personal_rounds, per_round, uri)


if __name__ == "__main__":
    main()
