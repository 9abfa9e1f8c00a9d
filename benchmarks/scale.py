"""Scale: 100,000 and 1,000,000 virtual devices vs 100, 100 trained per round, same per-device work.

    .venv/bin/python benchmarks/scale.py [--rounds 15 --repeats 2]

All jobs: synthetic devices that draw their 20 training samples (32 features, 10 classes) from their
own seed when they train (``data.synthetic.per_device``: no data is held for the others), an MLP with
one hidden layer of 64, 1 local epoch, 100 devices per round, one worker per CPU. Prints the median
seconds per round after the first, their ratio to 100 devices', and each job's peak memory of all
processes of this benchmark (this process, Ray's processes and the actors), summed as PSS so that
shared pages (the object store) count once. Targets (issue 14): 100,000 devices within 1.2x the
round time of 100 and under 4 GB; 1,000,000 within 1.5x and under 8 GB.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import threading
import time
from pathlib import Path

from fedray.config import parse_job
from fedray.platform.run import connect, run_job

SAMPLES_PER_DEVICE = 20


SIZES = (100, 100_000, 1_000_000)
TARGETS = {100_000: (1.2, 4), 1_000_000: (1.5, 8)}  # (round time ratio, GiB)


def scale_job(devices: int, rounds: int):
    return parse_job({
        "name": f"bench-scale-{devices}", "seed": 0, "rounds": rounds,
        "data": {"dataset": "synthetic", "synthetic": {"samples": 1000, "shape": [32], "classes": 10,
                                                        "per_device": SAMPLES_PER_DEVICE},
                 "partition": {"kind": "iid"}, "holdout": 0.0, "test_fraction": 0.0},
        "model": {"name": "mlp", "kwargs": {"hidden": [64]}},
        "devices": {"count": devices, "per_round": 100, "local": {"epochs": 1, "batch_size": 32, "lr": 0.05}},
        "tracking": {"experiment": "benchmarks", "log_model": False},
    })


class PeakMemory:
    """Samples the summed PSS of this process and all its descendants every ``interval`` seconds."""

    def __init__(self, interval: float = 0.25) -> None:
        self.peak, self._interval, self._stop = 0, interval, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, sum(_pss(pid) for pid in _family(os.getpid())))
            self._stop.wait(self._interval)

    def __enter__(self) -> PeakMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def _family(root: int) -> list[int]:
    """``root`` and all its descendants, from /proc (Linux)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    family, todo = [], [root]
    while todo:
        pid = todo.pop()
        family.append(pid)
        todo.extend(children.get(pid, []))
    return family


def _pss(pid: int) -> int:
    """Proportional set size of ``pid`` in bytes (0 if it is gone)."""
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def rounds_seconds(job, uri) -> list[float]:
    """Seconds of each round after the first, as seen by the caller."""
    stamps = [time.perf_counter()]
    run_job(job, job.model_dump_json(), uri, on_round=lambda _: stamps.append(time.perf_counter()))
    return [b - a for a, b in zip(stamps[1:], stamps[2:])]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--repeats", type=int, default=2, help="alternate the jobs this many times")
    args = p.parse_args()
    connect()
    seconds: dict[int, list[float]] = {n: [] for n in SIZES}
    peak: dict[int, int] = dict.fromkeys(SIZES, 0)
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(args.repeats):
            for devices in SIZES:
                with PeakMemory() as memory:
                    seconds[devices] += rounds_seconds(scale_job(devices, args.rounds), f"sqlite:///{tmp}/mlflow.db")
                peak[devices] = max(peak[devices], memory.peak)
                print(f"{devices:>9,} devices: median {statistics.median(seconds[devices]):.3f} s per round", flush=True)
    base = statistics.median(seconds[SIZES[0]])
    print(f"\nmedian seconds per round after the first (100 devices trained per round), {args.repeats} "
          "alternating runs per job; peak memory of all processes during the job")
    print(f"{'devices':>10} {'s/round':>8} {'ratio':>6} {'target':>7} {'peak GiB':>9} {'target':>7}")
    for devices in SIZES:
        median = statistics.median(seconds[devices])
        ratio_target, memory_target = TARGETS.get(devices, (None, None))
        print(f"{devices:>10,} {median:8.3f} {median / base:6.3f} "
              f"{'' if ratio_target is None else f'<= {ratio_target}':>7} {peak[devices] / 2**30:9.2f} "
              f"{'' if memory_target is None else f'< {memory_target}':>7}")


if __name__ == "__main__":
    main()
