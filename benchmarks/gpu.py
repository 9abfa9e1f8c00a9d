"""GPU workers against CPU workers, side by side, on the MNIST non-IID job (jobs/mnist_noniid.yaml).

    .venv/bin/python benchmarks/gpu.py [--rounds 20] [--per-gpu 1 2 4 8] [--set KEY=VALUE ...]
    .venv/bin/python benchmarks/gpu.py --logical     # no GPU here: place on logical GPUs, train on CPUs

Runs the job first with one worker per CPU core, then with k workers per GPU
(``devices.resources.num_gpus = 1 / k``) for each k of ``--per-gpu``, every run from the same seed.
Printed per run: rounds per second (wall clock over the rounds, evaluation included) and its ratio
to the CPU run, the largest GPU memory any worker holds after each round (it must not grow from
round to round: the last round's against the first's), and the final accuracy (the mean of the last
5 rounds) against the CPU run's, which should agree within 0.5 point.

Needs a machine whose Ray sees GPUs and a CUDA build of torch (``pip install torch==2.13.0`` from
PyPI on Linux). ``--logical`` starts Ray with one logical GPU so that the script itself can be
checked where there is none: workers are placed by their fractions but train on the CPU.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import ray  # noqa: E402
import yaml  # noqa: E402

from fedray.config import load_job  # noqa: E402
from fedray.platform.driver import Driver  # noqa: E402
from fedray.platform.run import connect  # noqa: E402
from fedray.platform.tracking import start_run  # noqa: E402


def run(overrides: list[str], rounds: int, uri: str, runs: Path) -> dict:
    """One run, round by round: seconds per round, the most GPU memory a worker holds after each
    round, the accuracies, and where the workers trained."""
    job = load_job(ROOT / "jobs" / "mnist_noniid.yaml",
                   [*overrides, f"rounds={rounds}", "tracking.experiment=bench-gpu", "tracking.log_model=false"])
    driver = Driver(job, str(start_run(uri, job.tracking.experiment, job.name, runs)), yaml.safe_dump(job.model_dump()))
    seconds, memory, accuracy = [], [], []
    try:
        for r in range(1, rounds + 1):
            started = time.perf_counter()
            result = driver.run_round(r)
            seconds.append(time.perf_counter() - started)
            accuracy.append(result.metrics["test_accuracy"])
            places = ray.get([w.placement.remote() for w in driver.pool.workers.actors])
            memory.append(max(p["gpu_memory"] for p in places))
        devices = sorted({p["device"] for p in places})
        return {"seconds": seconds, "memory": memory, "accuracy": accuracy, "workers": len(places),
                "devices": devices}
    finally:
        driver.finish()
        for actor in driver.pool.workers.actors:
            ray.kill(actor)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--per-gpu", type=int, nargs="*", default=[1, 2, 4, 8], help="workers per GPU")
    parser.add_argument("--set", nargs="*", default=[], help="overrides of the job for every run, as fedray run's")
    parser.add_argument("--logical", action="store_true", help="one logical GPU: check the script without a GPU")
    args = parser.parse_args()
    connect(num_gpus=1 if args.logical else None)
    gpus = ray.cluster_resources().get("GPU", 0)
    if not gpus:
        sys.exit("Ray sees no GPU on this machine: run on a GPU machine (or --logical to check the script)")
    cpus = os.cpu_count() or 1
    runs = {f"CPU, {cpus} workers": [f"devices.workers={cpus}"]}
    for k in args.per_gpu:
        runs[f"{k} per GPU, {int(k * gpus)} workers"] = [f"devices.resources={{num_gpus: {1 / k!r}}}"]
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, overrides in runs.items():
            print(f"{name} ...", file=sys.stderr, flush=True)
            results[name] = run([*args.set, *overrides], args.rounds, f"sqlite:///{tmp}/mlflow.db", Path(tmp))

    def final(r: dict) -> float:
        return sum(r["accuracy"][-5:]) / len(r["accuracy"][-5:])

    base = results[next(iter(runs))]
    base_rate = len(base["seconds"]) / sum(base["seconds"])
    print(f"\nMNIST non-IID (100 devices, 10 per round), {args.rounds} rounds; {gpus:g} GPU(s), {cpus} CPU cores"
          + (" (logical GPU: workers train on the CPU)" if args.logical else ""))
    print(f"{'run':26s} {'trains on':>10s} {'rounds/s':>9s} {'vs CPU':>7s} {'GPU MB first':>12s} {'GPU MB last':>11s} "
          f"{'final acc':>9s} {'vs CPU':>7s}")
    for name, r in results.items():
        rate = len(r["seconds"]) / sum(r["seconds"])
        print(f"{name:26s} {','.join(r['devices']):>10s} {rate:9.3f} {rate / base_rate:7.2f} "
              f"{r['memory'][0] / 2**20:12.1f} {r['memory'][-1] / 2**20:11.1f} {final(r):9.4f} "
              f"{100 * (final(r) - final(base)):+6.2f}p")


if __name__ == "__main__":
    main()
