"""The ``fedray`` command line: ``init``, ``run``, ``resume``, ``validate``, ``replay``, ``export``, ``privacy plan``."""

from __future__ import annotations

import os
import sys
import time
import traceback
from pathlib import Path

import click

from fedray.choose import init
from fedray.config import JobError, JobSpec, load_job
from fedray.config.job import MAX_ROUNDS

PRV_MAX_STEPS = 1000  # the prv accountant's memory grows with its compositions: about 0.5 GB here
_SET_HELP = "Override a job field, e.g. --set rounds=50 --set strategy.server_lr=0.5 (repeatable)."


def _load(path: str, overrides: tuple[str, ...]) -> JobSpec:
    try:
        return load_job(path, list(overrides))
    except JobError as e:
        raise click.ClickException(str(e)) from None


@click.group()
@click.version_option(package_name="fedray")
def main() -> None:
    """fedray: federated training on Ray, tracked in MLflow."""


main.add_command(init)


_URI_HELP = "MLflow tracking URI [default: MLFLOW_TRACKING_URI, else sqlite:///mlflow.db here]"


def _check_store(tracking_uri: str | None, job: JobSpec) -> str:
    """The tracking URI to use, if its store answers now (read-only: creates nothing)."""
    from fedray.platform.store import TrackingError, check, resolve_uri

    uri = resolve_uri(tracking_uri)
    try:
        check(uri, job.tracking.experiment)
    except TrackingError as e:
        raise click.ClickException(str(e)) from None
    return uri


def _prepare(job_file: str, job: JobSpec, tracking_uri: str | None = None):
    """Load the job's data and try its model (from ``model.start``, read at ``tracking_uri``), as
    the run would in its first seconds; the ``Prepared`` data and model."""
    import torch

    from fedray.platform.prepare import prepare

    sys.path.insert(0, os.getcwd())  # user models import from here, as on Ray's workers
    torch.set_num_threads(1)
    try:
        return prepare(job, tracking_uri)
    except JobError as e:
        raise click.ClickException(f"{job_file}: {e}") from None


@main.command()
@click.argument("job_file", type=click.Path(dir_okay=False))
@click.option("--set", "overrides", multiple=True, metavar="FIELD=VALUE", help=_SET_HELP)
@click.option("--tracking-uri", default=None, help=_URI_HELP)
def validate(job_file: str, overrides: tuple[str, ...], tracking_uri: str | None) -> None:
    """Check JOB_FILE without running it: its fields, its data, its model on a real batch and the
    tracking store. Creates nothing."""
    job = _load(job_file, overrides)
    prepared = _prepare(job_file, job, _check_store(tracking_uri, job))
    layout = prepared.layout
    if job.model.adapted or job.personalization is not None:
        click.echo(f"model: {layout.shared.size} values federated ({len(layout.shared.names)} parameters), "
                   f"{len(layout.frozen)} parameters frozen, {len(layout.personal.names) * (layout.method != 'ditto')} "
                   f"kept on each device" + (f"; starts from {job.model.start}" if job.model.start else ""))
    who = (f"{job.devices.per_round} of {job.devices.count} devices per round" if job.peers is None else
           f"{job.devices.count} agents, peer to peer ({job.peers.exchange} over {job.peers.graph.kind})")
    click.echo(f"{job_file}: valid job {job.name!r}: {job.rounds} rounds, {who}, dataset {job.data.dataset}")


@main.command()
@click.argument("job_file", type=click.Path(dir_okay=False))
@click.option("--set", "overrides", multiple=True, metavar="FIELD=VALUE", help=_SET_HELP)
@click.option("--tracking-uri", default=None, help=_URI_HELP)
@click.option("--runs-dir", default="fedray-runs", envvar="FEDRAY_RUNS_DIR", show_default=True,
              type=click.Path(file_okay=False), help="where each run keeps its journal (records MLflow has not "
                                                     "taken yet) and its error log")
def run(job_file: str, overrides: tuple[str, ...], tracking_uri: str | None, runs_dir: str) -> None:
    """Run JOB_FILE on the local machine, or on the Ray cluster in RAY_ADDRESS. SIGTERM and Ctrl-C
    end it as KILLED, keeping the rounds done."""
    job = _load(job_file, overrides)
    uri = _check_store(tracking_uri, job)  # before the data loads or Ray starts
    _prepare(job_file, job, uri)
    _execute(job, Path(job_file).read_text(), uri, Path(runs_dir), source=job_file)


_RUNS_DIR_HELP = "where each run keeps its journal (records MLflow has not taken yet) and its error log"


@main.command()
@click.argument("target")
@click.option("--tracking-uri", default=None, help="MLflow tracking URI [default: the run's own]")
@click.option("--runs-dir", default="fedray-runs", envvar="FEDRAY_RUNS_DIR", show_default=True,
              type=click.Path(file_okay=False), help=_RUNS_DIR_HELP)
def resume(target: str, tracking_uri: str | None, runs_dir: str) -> None:
    """Continue a run from its last checkpoint, in the same MLflow run. TARGET is the run's
    checkpoint folder (<checkpoint.path>/<run id>, a path or URI) or its MLflow run id."""
    import json

    from fedray.config import parse_job
    from fedray.platform import snapshot
    from fedray.platform.checkpoint import CheckpointError, CheckpointStore

    location = _checkpoint_location(target, tracking_uri)
    try:
        state, _ = CheckpointStore(location).load()
        job = parse_job(json.loads(state["job"]))
    except (CheckpointError, JobError, KeyError, ValueError) as e:
        raise click.ClickException(f"cannot resume from {location}: {e}") from None
    uri = _check_store(tracking_uri or state["tracking_uri"], job)
    prepared = _prepare(location, job, uri)
    run_id = location.rstrip("/").rsplit("/", 1)[-1]  # a run's checkpoints are in a folder named by its id
    mine = snapshot.identity(run_id, job, prepared.layout.shared, snapshot.data_digest(prepared.dataset.x,
                                                                                         prepared.dataset.y))
    try:  # before anything is touched: the MLflow run, the checkpoint
        snapshot.check(state, mine, location)
    except CheckpointError as e:
        raise click.ClickException(f"cannot resume: {e}") from None
    click.echo(f"Resuming run {state['run_id']} ({job.name!r}) after round {state['round']} of {job.rounds}, "
               f"from {location}", err=True)
    _execute(job, state["job"], uri, Path(runs_dir), (state["run_id"], location))


def _checkpoint_location(target: str, tracking_uri: str | None) -> str:
    """A checkpoint folder given as a path or URI, or found for a run id: under the default
    checkpoint path here, else where the run's logged ``checkpoint.path`` says."""
    if "://" in target or Path(target).exists():
        return target
    from fedray.config.job import CheckpointSpec
    from fedray.platform.checkpoint import CheckpointStore
    from fedray.platform.store import resolve_uri

    default = CheckpointStore.of_run(CheckpointSpec().path, target)
    if default.exists():
        return default.location
    from mlflow import MlflowClient

    uri = resolve_uri(tracking_uri)
    try:
        params = MlflowClient(uri).get_run(target).data.params
    except Exception:  # noqa: BLE001 - no such run, or no such store
        raise click.ClickException(f"{target} is neither a checkpoint folder nor the id of a run at {uri}") from None
    path = params.get("checkpoint.path")
    if path is None or path == "None":
        raise click.ClickException(f"run {target} has no checkpoints: its job has no checkpoint section")
    return CheckpointStore.of_run(path, target).location


def _execute(job: JobSpec, job_yaml: str, uri: str, runs_dir: Path, resume: tuple[str, str] | None = None,
             source: str | None = None) -> None:
    """Run (or, with ``resume``, continue) ``job`` (from the job file ``source``), printing its
    progress and summary."""
    from fedray.platform.run import STOP, Interrupted, RunError, connect, run_job  # Ray loads only when a job runs
    from fedray.platform.store import TrackingError

    from fedray import logs

    logs.to_file(runs_dir / "fedray.log")  # not the console: dependencies' INFO lines and warnings
    started = time.monotonic()
    progress = _Progress(job.rounds, started)
    try:
        connect()
        STOP.install()  # after Ray's start, whose SIGTERM handler would dump a native stack trace
        summary = run_job(job, job_yaml, uri, on_round=progress, runs_dir=runs_dir, resume=resume,
                          source=(source, " ".join(["fedray", *sys.argv[1:]])) if source else None)
    except RunError as e:
        progress.close()
        raise click.ClickException(_failure(e, uri, runs_dir)) from None
    except Interrupted as e:
        progress.close()
        click.echo(f"Stopped by {e.signal} after {e.rounds} rounds: MLflow run {e.run_id} ended KILLED with them"
                   + _unlogged(e.unlogged, runs_dir / e.run_id), err=True)
        sys.exit(143 if e.signal == "SIGTERM" else 130)
    except KeyboardInterrupt as e:
        click.echo(f"Stopped by {str(e) or 'SIGINT'} before the run started: nothing was recorded", err=True)
        sys.exit(143 if str(e) == "SIGTERM" else 130)
    except (TrackingError, JobError) as e:  # JobError: the job asks for what this cluster lacks
        raise click.ClickException(str(e)) from None
    progress.close()
    _print_summary(job, summary, time.monotonic() - started)
    if summary["unlogged"]:
        click.echo(f"Warning: MLflow at {uri} did not take everything" + _unlogged(summary["unlogged"],
                                                                                  Path(summary["journal"])), err=True)


def _unlogged(count: int, journal: Path) -> str:
    return (f"; {count} records it could not take are kept in {journal}: send them with `fedray replay {journal}`"
            if count else "")


def _failure(error, uri: str, runs_dir: Path) -> str:
    """The error line of a failed run, where its MLflow run is, and where its full log is."""
    message = f"{error}\n  MLflow run {error.run_id} ended FAILED at {uri}, with the rounds done"
    message += _unlogged(error.unlogged, error.journal)
    if error.__cause__ is not None:
        log = runs_dir.resolve() / error.run_id / "error.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        log.write_text("".join(traceback.format_exception(error.__cause__)))
        message += f"\n  full log: {log}"
    return message


@main.command()
@click.argument("journal", type=click.Path(exists=True, file_okay=False))
@click.option("--wait", "wait_s", type=click.FloatRange(min=0), default=60.0, show_default=True,
              help="seconds to keep trying a store in trouble")
def replay(journal: str, wait_s: float) -> None:
    """Send to MLflow what a run's JOURNAL (a directory under fedray-runs) still holds."""
    from fedray.platform.tracking import replay as send

    if not (Path(journal) / "run.json").exists():
        raise click.ClickException(f"{journal} is not a run's journal (it has no run.json)")
    run_id, left = send(journal, wait_s)
    if left:
        raise click.ClickException(f"run {run_id}: {left} records are still unsent; they stay in {journal}")
    click.echo(f"run {run_id}: everything sent to MLflow")


@main.command()
@click.argument("target")
@click.option("--format", "fmt", type=click.Choice(["onnx"]), default="onnx", show_default=True)
@click.option("--out", type=click.Path(dir_okay=False), default=None, help="the file to write [default: <run id>.onnx]")
@click.option("--tracking-uri", default=None, help=_URI_HELP)
def export(target: str, fmt: str, out: str | None, tracking_uri: str | None) -> None:
    """Export a model fedray logged, for devices. TARGET: a run id, runs:/<run id>/model, or
    models:/<name>/<version> (or @<alias>, or /latest). The file is checked with ONNX Runtime
    against PyTorch on held-out inputs of the run's job, and logged to that run with the check."""
    from fedray import logs
    from fedray.platform.store import resolve_uri
    from fedray.transfer.export import export_logged

    logs.to_file(Path("fedray-runs") / "fedray.log")
    sys.path.insert(0, os.getcwd())  # user models import from here
    try:
        path, check, run_id = export_logged(target, resolve_uri(tracking_uri), out and Path(out))
    except (ValueError, JobError) as e:
        raise click.ClickException(str(e)) from None
    verdict = "within" if check["passed"] else "OVER"
    click.echo(f"{path}: ONNX model of {check['model']} (run {run_id})\n  ONNX Runtime {check['onnxruntime']} vs "
               f"PyTorch on {check['samples']} held-out inputs: max abs difference {check['max_abs_diff']:.3g}, "
               f"{verdict} the tolerance {check['tolerance']:g}\n  logged to run {run_id} as onnx/{path.name} and "
               "onnx/check.json")
    if not check["passed"]:
        raise click.ClickException(f"the exported model differs from PyTorch by {check['max_abs_diff']:.3g}")


@main.group()
def privacy() -> None:
    """Differential privacy: what a job will spend, before it runs."""


@privacy.command()
@click.argument("job_file", type=click.Path(dir_okay=False))
@click.option("--set", "overrides", multiple=True, metavar="FIELD=VALUE", help=_SET_HELP)
@click.option("--rounds", type=click.IntRange(min=1, max=MAX_ROUNDS), default=None,
              help="rounds to account [default: the job's]")
def plan(job_file: str, overrides: tuple[str, ...], rounds: int | None) -> None:
    """Print the epsilon JOB_FILE spends after its rounds, by each accountant, and the rounds its
    budget affords. Sample level: per device, if it trains in every round or in its expected share."""
    job = _load(job_file, overrides)
    spec = job.privacy
    if spec is None:
        raise click.ClickException(f"{job_file}: no privacy section, so nothing to account")
    if spec.level == "sample":
        _plan_sample_level(job, rounds or job.rounds)
        return
    from fedray.platform.privacy import ACCOUNTANTS, Ledger

    ledger, rounds = Ledger.of(job), rounds or job.rounds
    click.echo(f"{job.name}: client-level DP-FedAvg, {spec.mode} noise, clip {spec.clip:g}, noise multiplier "
               f"{spec.noise_multiplier:g}, Poisson sampling rate {ledger.rate:g}, delta {spec.delta:g}")
    for kind in ACCOUNTANTS:
        chosen = "  (the job's accountant)" if kind == spec.accountant else ""
        if _too_long(kind, rounds):
            continue
        click.echo(f"  {kind}: epsilon {Ledger.of(job, kind).epsilon(rounds):.3f} after {rounds} rounds{chosen}")
    if spec.budget is not None:
        limit = PRV_MAX_STEPS if spec.accountant == "prv" else MAX_ROUNDS
        affordable = ledger.affordable(spec.budget.epsilon, limit)
        verdict = (f"the run stops before round {affordable + 1} of {job.rounds}" if affordable < job.rounds
                   else "the whole run fits")
        click.echo(f"  budget epsilon {spec.budget.epsilon:g}: {'at least ' * (affordable == limit)}{affordable} rounds "
                   f"affordable ({spec.accountant}); {verdict}")


def _too_long(kind: str, steps: int) -> bool:
    """Whether ``kind`` is prv and ``steps`` too many for its grid and memory (said so)."""
    if kind == "prv" and steps > PRV_MAX_STEPS:
        click.echo(f"  prv: not computed for more than {PRV_MAX_STEPS} compositions (its memory grows); the rdp bound holds")
        return True
    return False


def _plan_sample_level(job: JobSpec, rounds: int) -> None:
    import numpy as np

    from fedray.agents.privacy import epsilon
    from fedray.data import datasets, partition
    from fedray.platform.privacy import ACCOUNTANTS, sample_plan

    spec = job.privacy
    data = datasets.load(job.data, job.seed)
    plans = sample_plan(job, partition.split(data.y, job.data, job.devices.count, job.seed).train_sizes.tolist())
    share = job.devices.per_round / job.devices.count
    expected = max(1, round(rounds * share))
    edge_rounds = job.topology.edge_rounds if job.topology is not None else 1  # trainings per round
    noise = (f"noise multiplier {spec.noise_multiplier:g}" if spec.noise_multiplier else
             f"target epsilon {spec.target_epsilon:g}: noise multiplier {min(z for z, _, _ in plans):.3f}"
             f"-{max(z for z, _, _ in plans):.3f}")
    click.echo(f"{job.name}: sample-level DP-SGD on {len(plans)} devices, max_grad_norm {spec.max_grad_norm:g}, "
               f"{noise}, batch sampling rate {min(q for _, q, _ in plans):.3g}-{max(q for _, q, _ in plans):.3g}, "
               f"delta {spec.delta:g}")
    for kind in ACCOUNTANTS:
        shares = [("in every round", rounds)] + [(f"in {expected} rounds (its expected share)", expected)] * (expected < rounds)
        for label, times in shares:
            if _too_long(kind, max(steps for _, _, steps in plans) * times * edge_rounds):
                break
            distinct = {(z, q, steps * times * edge_rounds) for z, q, steps in plans}  # devices alike, computed once
            by_plan = {p: epsilon(kind, [p], spec.delta) for p in distinct}
            spent = [by_plan[z, q, steps * times * edge_rounds] for z, q, steps in plans]
            chosen = "  (the job's accountant)" if kind == spec.accountant else ""
            click.echo(f"  {kind}: device epsilon max {max(spent):.3f}, mean {np.mean(spent):.3f} if each trains "
                       f"{label}{chosen}")
    if spec.budget is not None:
        click.echo(f"  budget epsilon {spec.budget.epsilon:g}: a device refuses a round that would pass it, and the "
                   "run stops before a round in which a device that has trained would")


class _Progress:
    """One status line per round, redrawn in place on a terminal."""

    def __init__(self, rounds: int, started: float) -> None:
        self.rounds, self.started = rounds, started
        self.tty = sys.stderr.isatty()
        self.accuracy = self.loss = None

    def __call__(self, result) -> None:
        m = result.metrics
        self.accuracy = m.get("test_accuracy", self.accuracy)
        self.loss = m.get("test_loss", self.loss)
        width = 24
        done = int(width * result.round / self.rounds)
        line = (f"round {result.round:>{len(str(self.rounds))}}/{self.rounds} [{'#' * done}{'.' * (width - done)}]"
                f" acc {_fmt(self.accuracy)} loss {_fmt(self.loss)} "
                f"{time.monotonic() - self.started:6.1f}s"
                + ("" if result.completed else f"  round failed: {int(m['participants'])} answered")
                + (f"  {int(m['failures'])} failures" if m.get("failures") else "")
                + (f"  edges failed or down: {sorted(result.edge_failures)}" if result.edge_failures else "")
                + (f"  {result.tracking}" if result.tracking else ""))
        click.echo(f"\r{line}\x1b[K" if self.tty else line, nl=not self.tty, err=True)

    def close(self) -> None:
        if self.tty:
            click.echo(err=True)


def _fmt(value: float | None) -> str:
    return "  -   " if value is None else f"{value:.4f}"


def _print_summary(job: JobSpec, s: dict, seconds: float) -> None:
    uri = s["tracking_uri"]
    browse = uri if uri.startswith(("http://", "https://")) else f"mlflow ui --backend-store-uri {uri}"
    tree = "" if "bytes_edge_cloud" not in s else f"\n  edge<->cloud    {s['bytes_edge_cloud'] / 1e6:.2f} MB"
    if "sim_comm_seconds" in s:
        tree += f"\n  simulated comm  {s['sim_comm_seconds']:.1f}s (network section)"
    if "epsilon" in s:
        tree += f"\n  privacy         epsilon {s['epsilon']:.3f} at delta {job.privacy.delta:g}"
    if "device_epsilon_max" in s:
        tree += f"\n  privacy         device epsilon max {s['device_epsilon_max']:.3f} at delta {job.privacy.delta:g}"
    if job.secure is not None:
        tree += (f"\n  encrypted       {job.secure.scheme}: only sums of >= {job.secure.min_clients} devices were "
                 "decrypted (split and parameters in secure.json)")
    for key, label in (("stopped", "stopped early"), ("resumed", "resumed at"), ("resources", "resources")):
        tree += f"\n  {label:15s} {s[key]}" if key in s else ""
    wire = (f"bytes up/down   {s['bytes_up'] / 1e6:.2f} MB / {s['bytes_down'] / 1e6:.2f} MB" if job.peers is None
            else f"peer to peer    {s.get('bytes_sent', 0) / 1e6:.2f} MB sent agent to agent, none through the driver")
    accuracy = "test accuracy" if job.peers is None else "agents' mean  "
    click.echo(f"""
{job.name}: {s['completed_rounds']}/{s['rounds']} rounds completed in {seconds:.1f}s
  {accuracy}   {_fmt(s['test_accuracy'])}   test loss {_fmt(s['test_loss'])}
  {wire}{tree}
  device failures {s['failures']}
  MLflow run      {s['run_id']}  ({uri})
  browse with     {browse}""")
