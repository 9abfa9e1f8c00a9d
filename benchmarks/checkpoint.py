"""What checkpointing every round costs, and how long `fedray resume` takes to the next round.

    .venv/bin/python benchmarks/checkpoint.py [--rounds 12 --repeats 2]

Runs jobs/mnist_noniid.yaml (FedAvg) and a SCAFFOLD variant of it (a control variate per device,
so each round writes the sampled devices' records), each without and with `checkpoint: {every: 1}`,
alternating, in one Ray session; a round's time is the wall time between the ends of consecutive
rounds as the caller sees them, the first round of each run dropped. Then, for the checkpointed
SCAFFOLD run, the time from `fedray resume <run id>` (a new process: Python, Ray, data, workers)
to its next round finished, and the same for a fresh `fedray run` to its first round, side by side.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent

from fedray.config import load_job, parse_job  # noqa: E402
from fedray.platform.run import connect, run_job  # noqa: E402


def round_seconds(job, uri: str) -> tuple[list[float], str]:
    stamps = [time.perf_counter()]
    summary = run_job(job, yaml.safe_dump(job.model_dump(mode="json", by_alias=True, exclude_unset=True)), uri,
                      on_round=lambda _: stamps.append(time.perf_counter()))
    return [b - a for a, b in zip(stamps[1:], stamps[2:])], summary["run_id"]


def seconds_to_round(args: list[str], cwd: str, stop_after: int = 1) -> float:
    """Wall seconds from starting ``fedray *args`` until it reports its first round; it is killed
    (SIGKILL) once it has reported ``stop_after`` rounds."""
    start = time.perf_counter()
    process = subprocess.Popen([str(BIN / "fedray"), *args], cwd=cwd, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True, start_new_session=True)
    reported = []
    for line in process.stdout:
        if re.match(r"round\s+\d+/", line):
            reported.append(time.perf_counter() - start)
            if len(reported) == stop_after:
                break
    else:
        sys.exit(f"fedray {' '.join(args)} ended before reporting {stop_after} rounds")
    os.killpg(process.pid, 9)
    process.wait()
    return reported[0]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=12)
    p.add_argument("--repeats", type=int, default=2)
    args = p.parse_args()
    base = load_job(ROOT / "jobs" / "mnist_noniid.yaml", [f"rounds={args.rounds}", "tracking.log_model=false"])
    raw = base.model_dump(mode="json", by_alias=True, exclude_unset=True)
    jobs = {"fedavg": raw, "scaffold": raw | {"strategy": {"name": "scaffold"}}}
    connect()
    seconds: dict[tuple[str, bool], list[float]] = {(name, on): [] for name in jobs for on in (False, True)}
    with tempfile.TemporaryDirectory() as tmp:
        uri = f"sqlite:///{tmp}/mlflow.db"
        checkpoints = f"{tmp}/checkpoints"
        last: dict[str, str] = {}
        for rep in range(args.repeats):
            for name, job_raw in jobs.items():
                for on in (False, True):
                    print(f"[{rep + 1}/{args.repeats}] {name}, checkpoint {'every round' if on else 'off'} ...",
                          file=sys.stderr, flush=True)
                    job = parse_job(job_raw | ({"checkpoint": {"path": checkpoints, "every": 1}} if on else {}))
                    rounds, run = round_seconds(job, uri)
                    seconds[name, on] += rounds
                    if on:
                        last[name] = run
        sizes = {name: sum(f.stat().st_size for f in Path(checkpoints, run).rglob("*") if f.is_file())
                 for name, run in last.items()}
        print(f"\nmedian seconds per round ({args.rounds} rounds, first dropped, {args.repeats} alternating runs each)")
        print(f"{'job':10} {'no checkpoint':>14} {'every round':>12} {'overhead':>9} {'checkpoint folder':>18}")
        for name in jobs:
            off, on = statistics.median(seconds[name, False]), statistics.median(seconds[name, True])
            print(f"{name:10} {off:14.3f} {on:12.3f} {on / off - 1:9.1%} {sizes[name] / 1e6:15.2f} MB")
        # a checkpointed run killed (SIGKILL) after round 2 (its checkpoint of round 1 is whole), then resumed
        job_file = Path(tmp, "job.yaml")
        job_file.write_text(yaml.safe_dump(jobs["scaffold"] | {"checkpoint": {"path": checkpoints, "every": 1},
                                                              "rounds": args.rounds + 1}))
        before = set(os.listdir(checkpoints))
        fresh = seconds_to_round(["run", str(job_file), "--tracking-uri", uri], tmp, stop_after=2)
        (run,) = set(os.listdir(checkpoints)) - before
        resumed = seconds_to_round(["resume", run, "--tracking-uri", uri], tmp)
        print(f"\nseconds from the command to its first round finished (new process, Ray start included)\n"
              f"  fedray run    {fresh:6.1f}\n  fedray resume {resumed:6.1f}  (the round after the checkpoint)"
              f"   resume/run {resumed / fresh:.2f}")


if __name__ == "__main__":
    main()
