"""What fedray says about each bad input or fault, and how long it takes to say it.

Runs the real `fedray` CLI (in its own process, as a user would) on bad job files, data files,
user models and tracking stores, and prints one table row each: the input, the first line fedray
printed, the exit code and the seconds until it exited. With --faults it also runs a 40-round job
whose SQLite store another process locks for 45 s mid-run, and one stopped with SIGTERM, and
reports whether every round's metrics reached MLflow and the run's final status.

    python benchmarks/bad_inputs.py [--faults]
"""

from __future__ import annotations

import argparse
import re
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import yaml

FEDRAY = str(Path(sys.executable).parent / "fedray")
JOB = {"name": "bad", "rounds": 2, "data": {"dataset": "digits"}, "model": {"name": "logreg"},
       "devices": {"count": 6, "per_round": 4, "workers": 2}, "tracking": {"experiment": "bad", "log_model": False}}


def job(tmp: Path, **overrides) -> str:
    path = tmp / f"job{len(list(tmp.glob('job*.yaml')))}.yaml"
    path.write_text(yaml.safe_dump({**JOB, **overrides}))
    return str(path)


def npz(tmp: Path, **arrays) -> dict:
    path = tmp / f"data{len(list(tmp.glob('data*.npz')))}.npz"
    np.savez(path, **arrays)
    return {"data": {"dataset": "npz", "path": str(path)}}


def cases(tmp: Path) -> list[tuple[str, list[str]]]:
    x = np.random.default_rng(0).random((60, 8), dtype=np.float32)
    y = np.arange(60) % 3
    nan_x = x.copy()
    nan_x[7, 2] = np.nan
    (tmp / "dup.yaml").write_text(yaml.safe_dump(JOB) + "rounds: 3\n")
    (tmp / "latin.yaml").write_bytes("name: caf\xe9\n".encode("latin-1"))
    (tmp / "garbage.npz").write_bytes(b"garbage")
    (tmp / "corrupt.db").write_bytes(b"not a database" * 100)
    (tmp / "table.csv").write_text('"f1","label"\n' + "\n".join(f"{i / 10},{i % 2}" for i in range(40)) + "\n")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]
    user = lambda cls, **kwargs: {"model": {"class": cls, "kwargs": kwargs}}
    run, validate = ["run"], ["validate"]
    return [
        ("duplicate key in the job", validate + [str(tmp / "dup.yaml")]),
        ("job file not UTF-8", validate + [str(tmp / "latin.yaml")]),
        ("unparsable --set value", validate + [job(tmp), "--set", "rounds=[3"]),
        ("rounds: true", validate + [job(tmp, rounds=True)]),
        ("seed 2**64", validate + [job(tmp, seed=2**64)]),
        ("blank experiment name", validate + [job(tmp, tracking={"experiment": " "})]),
        ("data file missing", run + [job(tmp, data={"dataset": "npz", "path": str(tmp / "none.npz")})]),
        ("data path is a directory", run + [job(tmp, data={"dataset": "npz", "path": str(tmp)})]),
        ("npz not a zip", run + [job(tmp, data={"dataset": "npz", "path": str(tmp / "garbage.npz")})]),
        ("npz without y", run + [job(tmp, **npz(tmp, x=x))]),
        ("x and y lengths differ", run + [job(tmp, **npz(tmp, x=x, y=y[:50]))]),
        ("NaN feature", run + [job(tmp, **npz(tmp, x=nan_x, y=y))]),
        ("fractional labels", run + [job(tmp, **npz(tmp, x=x, y=y + 0.5))]),
        ("label column missing", run + [job(tmp, data={"dataset": "csv", "path": str(tmp / "table.csv"),
                                                       "label_column": "target"})]),
        ("too few samples for the devices", run + [job(tmp, **npz(tmp, x=x, y=y), devices={"count": 40, "per_round": 4})]),
        ("model kwargs wrong", run + [job(tmp, **user("torch.nn:Linear", in_features=64))]),
        ("model not a Module", run + [job(tmp, **user("collections:OrderedDict"))]),
        ("model without parameters", run + [job(tmp, **user("torch.nn:Flatten"))]),
        ("model forward fails", run + [job(tmp, **user("torch.nn:Linear", in_features=63, out_features=10))]),
        ("model gives 7 logits for 2 classes",
         run + [job(tmp, data={"dataset": "breast_cancer"}, **user("torch.nn:Linear", in_features=30, out_features=7))]),
        ("tracking server refused", run + [job(tmp), "--tracking-uri", f"http://127.0.0.1:{closed}"]),
        ("tracking server silent", run + [job(tmp), "--tracking-uri", "SILENT"]),
        ("tracking db corrupt", run + [job(tmp), "--tracking-uri", f"sqlite:///{tmp / 'corrupt.db'}"]),
        ("tracking db directory missing", run + [job(tmp), "--tracking-uri", f"sqlite:///{tmp / 'no' / 'm.db'}"]),
        ("privacy plan --rounds 10**7", ["privacy", "plan", job(tmp, privacy={"level": "client"}), "--rounds", "10000000"]),
        ("privacy noise 0.01", ["privacy", "plan", job(tmp, privacy={"level": "client", "noise_multiplier": 0.01})]),
    ]


def said(args: list[str], cwd: Path) -> tuple[str, int, float]:
    started = time.monotonic()
    done = subprocess.run([FEDRAY, *args], cwd=cwd, capture_output=True, text=True, timeout=300)
    took = time.monotonic() - started
    lines = [line for line in (done.stderr + done.stdout).splitlines()
             if line.strip() and not line.startswith(("Usage:", "Try "))]
    return (lines[0] if lines else "").replace(str(cwd), "."), done.returncode, took


def faults(tmp: Path) -> None:
    from mlflow import MlflowClient

    raw = {**JOB, "rounds": 40, "tracking": {"experiment": "faults", "log_model": True}}
    raw["devices"] = {**JOB["devices"], "speed": {"kind": "slow_fraction", "fraction": 1.0, "slowdown": 1.0,
                                                  "step_seconds": 0.1}}
    (tmp / "fault.yaml").write_text(yaml.safe_dump(raw))
    for fault in ("45 s SQLite lock from round 3", "SIGTERM after round 3"):
        db = tmp / f"{fault[:2].strip()}.db"
        process = subprocess.Popen([FEDRAY, "run", "fault.yaml", "--tracking-uri", f"sqlite:///{db}"], cwd=tmp,
                                   stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        output = []
        for line in process.stdout:
            output.append(line)
            if re.search(r"round\s+3/40", line):
                break
        started = time.monotonic()
        if fault.startswith("45"):
            holder = sqlite3.connect(db, isolation_level=None)
            holder.execute("BEGIN EXCLUSIVE")
            time.sleep(45)
            holder.rollback()
            holder.close()
        else:
            process.send_signal(signal.SIGTERM)
        output += process.stdout.readlines()
        code = process.wait()
        text = "".join(output)
        run = re.search(r"MLflow run\s+([0-9a-f]{32})", text)[1]
        client = MlflowClient(f"sqlite:///{db}")
        steps = len(client.get_metric_history(run, "test_accuracy"))
        last = [line for line in output if line.strip()][-1].strip()
        print(f"| {fault} | {last[:110]} | {code} | {time.monotonic() - started:.1f} | "
              f"{client.get_run(run).info.status}, test_accuracy logged for {steps} rounds, "
              f"tracebacks {text.count('Traceback')} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--faults", action="store_true", help="also the 45 s lock and SIGTERM runs (~3 min)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as directory:
        tmp = Path(directory)
        silent = socket.socket()
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)  # accepts, never answers
        print("| bad input | what fedray says (first line) | exit | seconds |\n|---|---|---|---|")
        for name, command in cases(tmp):
            command = [c.replace("SILENT", f"http://127.0.0.1:{silent.getsockname()[1]}") for c in command]
            line, code, took = said(command, tmp)
            print(f"| {name} | {line[:160]} | {code} | {took:.1f} |", flush=True)
        silent.close()
        created = sorted(p.name for p in tmp.iterdir() if p.suffix == ".db" or p.name in ("mlflow.db", "fedray-runs"))
        print(f"\ndatabases or run directories created by the failed commands: {created or 'none'} "
              "(corrupt.db was there before)")
        if args.faults:
            print("\n| fault | last line | exit | seconds after the fault | MLflow |\n|---|---|---|---|---|")
            faults(tmp)


if __name__ == "__main__":
    main()
