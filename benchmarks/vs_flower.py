"""fedray vs Flower's simulation vs a serial no-framework floor, on the identical MNIST workload.

    bash benchmarks/setup_flower.sh            # once: Flower in .venv-flower (it pins another Ray)
    .venv/bin/python benchmarks/vs_flower.py [--rounds-a 30 --rounds-b 10 --repeats 2]

Workloads (both: MNIST subset 4,000 train / 1,000 test, Dirichlet alpha=0.5, small CNN, SGD
lr 0.05, batch 32, K=10 devices per round, test-set evaluation after every round):
  A) 100 devices, 1 local epoch  (overhead-bound)
  B) 20 devices, 5 local epochs  (compute-bound)
A round's time is wall time between the ends of consecutive rounds as seen by the caller; the
first round of each run (actor start-up, warm-up) is dropped. The parallel floor is the serial
floor divided by the number of fedray's device workers (one per CPU): the machine's limit. Each side's Ray start is outside its
rounds. The sides run one after another, alternating, so that slow spells of a shared machine
spread over all of them.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from workload import mnist_job, serial_floor, write_workload  # noqa: E402

import ray  # noqa: E402

from fedray.platform.run import connect, run_job  # noqa: E402


def fedray_rounds(job, tracking_uri) -> tuple[list[float], float]:
    stamps = [time.perf_counter()]
    summary = run_job(job, job.model_dump_json(), tracking_uri, on_round=lambda _: stamps.append(time.perf_counter()))
    return [b - a for a, b in zip(stamps, stamps[1:])], summary["test_accuracy"]


def flower_rounds(job, workdir: Path) -> tuple[list[float], float]:
    workload, out = workdir / f"{job.name}.npz", workdir / f"{job.name}-flower.json"
    write_workload(job, str(workload))
    python = ROOT / ".venv-flower" / "bin" / "python"
    if not python.exists():
        sys.exit("Flower is not installed: run  bash benchmarks/setup_flower.sh  first")
    local = job.devices.local
    subprocess.run([str(python), str(ROOT / "benchmarks" / "flower_side.py"), "--workload", str(workload),
                    "--rounds", str(job.rounds), "--per-round", str(job.devices.per_round),
                    "--epochs", str(local.epochs), "--lr", str(local.lr), "--batch-size", str(local.batch_size),
                    "--seed", str(job.seed), "--out", str(out)],
                   check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    result = json.loads(out.read_text())
    return result["round_seconds"], result["final_accuracy"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds-a", type=int, default=30)
    p.add_argument("--rounds-b", type=int, default=10)
    p.add_argument("--repeats", type=int, default=2, help="alternate the three sides this many times")
    args = p.parse_args()
    workloads = {"A: 100 devices x 1 epoch": mnist_job(100, 10, 1, args.rounds_a),
                 "B: 20 devices x 5 epochs": mnist_job(20, 10, 5, args.rounds_b)}
    connect()
    seconds = {(label, side): [] for label in workloads for side in ("fedray", "Flower", "floor")}
    accuracy = {}
    with tempfile.TemporaryDirectory() as tmp:
        for rep in range(args.repeats):
            for label, job in workloads.items():
                print(f"[{rep + 1}/{args.repeats}] {label}, {job.rounds} rounds ...", file=sys.stderr, flush=True)
                for side, run in (("fedray", lambda: fedray_rounds(job, f"sqlite:///{tmp}/mlflow.db")),
                                  ("Flower", lambda: flower_rounds(job, Path(tmp))),
                                  ("floor", lambda: serial_floor(job))):
                    rounds, accuracy[label, side] = run()
                    seconds[label, side] += rounds[1:]
    print(f"\nmedian seconds per round after warm-up (first round of each run dropped), {args.repeats} "
          "alternating runs per side; accuracy after the last round")
    workers = int(ray.cluster_resources()["CPU"])
    print(f"{'workload':26} {'fedray':>8} {'Flower':>8} {'floor':>8} {'par.floor':>9} {'fedray/Flower':>14}"
          f" {'fedray/floor':>13} {'fedray/par.floor':>17} {'acc fedray':>11} {'acc Flower':>11} {'acc floor':>10}")
    for label in workloads:
        fed, flw, floor = (statistics.median(seconds[label, side]) for side in ("fedray", "Flower", "floor"))
        parallel = floor / workers
        print(f"{label:26} {fed:8.3f} {flw:8.3f} {floor:8.3f} {parallel:9.3f} {fed / flw:14.3f} {fed / floor:13.3f}"
              f" {fed / parallel:17.3f} {accuracy[label, 'fedray']:11.4f} {accuracy[label, 'Flower']:11.4f}"
              f" {accuracy[label, 'floor']:10.4f}")
    print(f"parallel floor: the serial floor / {workers} workers")


if __name__ == "__main__":
    main()
