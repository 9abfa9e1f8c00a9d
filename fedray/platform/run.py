"""Run a job: connect to Ray, create its MLflow run, start the Driver actor on this node, drive its
rounds, finish. However the run ends, its MLflow run ends with the right status and keeps every
round already done."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import warnings
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import ray
from ray._private import ray_constants
from ray.autoscaler.sdk import request_resources
from ray.exceptions import GetTimeoutError, RayError, RayTaskError
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from fedray.config import JobError, JobSpec
from fedray.platform.driver import Driver, RoundResult
from fedray.platform.plots import log_history
from fedray.platform.store import cause, is_relative_local, resolve_uri
from fedray.platform.tracking import Tracker, reopen_run, start_run

RUNS_DIR = Path("fedray-runs")  # each run's journal (and error log), under the working directory
_KILL_WAIT_S = 10.0  # how long a stopped run waits for the tracking store: a scheduler kills soon after


class RunError(RuntimeError):
    """The run stopped: its driver or every round failed. The message names the root cause;
    ``run_id`` the MLflow run (ended FAILED), ``unlogged`` the records left in ``journal``."""

    def __init__(self, message: str, run_id: str, unlogged: int, journal: Path) -> None:
        super().__init__(message)
        self.run_id, self.unlogged, self.journal = run_id, unlogged, journal


class Interrupted(KeyboardInterrupt):
    """The run was stopped (Ctrl-C or SIGTERM) and its MLflow run ended KILLED."""

    def __init__(self, signal: str, run_id: str | None = None, rounds: int = 0, unlogged: int = 0) -> None:
        super().__init__(signal)
        self.signal, self.run_id, self.rounds, self.unlogged = signal, run_id, rounds, unlogged


class StopSignals:
    """SIGINT and SIGTERM as ``KeyboardInterrupt(signal name)``, held back while a run is being
    created or ended, so that a run is never left RUNNING by a stop request (``install`` them)."""

    def __init__(self) -> None:
        self.holding, self.held = False, None

    def install(self) -> None:
        for number in (signal.SIGINT, signal.SIGTERM):
            signal.signal(number, self._on)

    def _on(self, number: int, frame) -> None:
        name = signal.Signals(number).name
        if not self.holding:
            raise KeyboardInterrupt(name)
        self.held = self.held or name

    @contextlib.contextmanager
    def hold(self):
        self.holding = True
        try:
            yield
        finally:
            self.holding = False

    def release(self) -> None:
        """Raise the stop request that came while held, if any."""
        held, self.held = self.held, None
        if held:
            raise KeyboardInterrupt(held)


STOP = StopSignals()


def connect(num_gpus: int | None = None) -> None:
    """Join the cluster named by ``RAY_ADDRESS`` (as ``ray job submit`` sets it), else start an
    embedded local Ray bound to loopback, with ``num_gpus`` logical GPUs if given (Ray's count of
    the machine's otherwise: logical GPUs let GPU jobs be placed, and train on the CPU, where
    there are none). Actors' output goes to Ray's log files, not the console."""
    if ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS"):
        ray.init(log_to_driver=False)
        return
    # Ray swaps 127.0.0.1 for the machine's address and listens on all interfaces unless it runs in
    # its single-machine mode (the default on macOS and Windows). Ray reads this flag at import, so
    # set it for the processes it starts and for this one.
    os.environ[ray_constants.ENABLE_RAY_CLUSTERS_ENV_VAR] = "0"
    ray_constants.ENABLE_RAY_CLUSTER = False
    # "local": a new Ray even where /tmp/ray names another cluster (`ray start`'s, or a dead one's)
    ray.init(address="local", _node_ip_address="127.0.0.1", include_dashboard=False, log_to_driver=False,
             num_gpus=num_gpus)


def _node_gpus() -> float:
    """The GPUs of the node this process runs on."""
    node = ray.get_runtime_context().get_node_id()
    return next((n["Resources"].get("GPU", 0.0) for n in ray.nodes() if n["NodeID"] == node), 0.0)


def run_job(job: JobSpec, job_yaml: str, tracking_uri: str | None = None,
            on_round: Callable[[RoundResult], None] | None = None, runs_dir: Path = RUNS_DIR,
            resume: tuple[str, str] | None = None, source: tuple[str, str] | None = None) -> dict:
    """Run ``job`` to completion and return the Driver's summary. ``tracking_uri`` as given by the
    user (None: ``MLFLOW_TRACKING_URI`` or MLflow's default). The MLflow run ends FINISHED; FAILED
    (keeping every round already logged) if the driver fails or no round completed, raising
    ``RunError``; KILLED on KeyboardInterrupt, raising ``Interrupted``. ``resume``: (run id,
    checkpoint location) of a run to continue from its checkpoint, in the same MLflow run.
    ``source``: (job file, command line) the run is tagged with (MLflow's source)."""
    connect()
    if ray.get_runtime_context().runtime_env.get("working_dir") and is_relative_local(
            tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")):
        warnings.warn("this Ray job logs MLflow runs to a relative path inside its temporary working "
                      "directory, which Ray deletes; use --tracking-uri with a tracking server or an "
                      "absolute path", stacklevel=2)
    gpus = job.evaluation.num_gpus  # the driver's, on this node (below)
    if gpus and gpus > (here := _node_gpus()):
        raise JobError(f"evaluation.num_gpus is {gpus:g} but this node, where the driver runs, has "
                       f"{here:g} GPUs: run from a GPU node, or set evaluation.num_gpus 0 to evaluate "
                       "on the device workers")
    with STOP.hold():
        if resume is None:
            run_dir = start_run(resolve_uri(tracking_uri), job.tracking.experiment, job.name, runs_dir.resolve(),
                                run_tags(job, source))
        else:
            run_dir = reopen_run(resolve_uri(tracking_uri), resume[0], runs_dir.resolve())
    history: list[RoundResult] = []
    driver = None
    try:
        STOP.release()
        here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
        driver = ray.remote(Driver).options(num_cpus=0, num_gpus=gpus, scheduling_strategy=here, max_restarts=0).remote(
            job, str(run_dir), job_yaml, resume and resume[1])
        history = ray.get(driver.round_log.remote(), timeout=600)  # when its setup is done; a resumed run's rounds
        round_timeout = 2 * job.devices.timeout_s + 600  # training, then federated evaluation
        for r in range(len(history) + 1, job.rounds + 1):
            if ray.get(driver.stop_reason.remote(r), timeout=600):  # the privacy budget is spent
                break
            history.append(ray.get(driver.run_round.remote(r), timeout=round_timeout))
            if on_round is not None:
                on_round(history[-1])
        if any(h.completed for h in history):
            return ray.get(driver.finish.remote("FINISHED"), timeout=job.tracking.wait_s + 600)
        stopped = ray.get(driver.stop_reason.remote(len(history) + 1), timeout=600)
        error = f"no round completed: {_why_nothing_trained(history, stopped)}"
        summary = ray.get(driver.finish.remote("FAILED", error), timeout=job.tracking.wait_s + 600)
        raise RunError(f"job {job.name!r}: {error}", summary["run_id"], summary["unlogged"], run_dir)
    except RunError:
        raise
    except KeyboardInterrupt as e:
        with STOP.hold():  # a second stop request does not cut the run's end short, and is dropped
            unlogged = _end_without_driver(driver, run_dir, "KILLED", None, history, job)
        STOP.held = None
        raise Interrupted(str(e) or "SIGINT", run_dir.name, len(history), unlogged) from None
    except BaseException as e:
        error = _root_cause(e)
        with STOP.hold():
            unlogged = _end_without_driver(driver, run_dir, "FAILED", error, history, job)
        STOP.held = None
        raise RunError(f"job {job.name!r} failed: {error}", run_dir.name, unlogged, run_dir) from e
    finally:
        if driver is not None:
            ray.kill(driver)  # its workers share its fate
        if job.devices.scale_up:  # the pool's request to the autoscaler ends with the run
            request_resources(bundles=[])


def run_tags(job: JobSpec, source: tuple[str, str] | None) -> dict[str, str]:
    """The tags a run starts with, to filter and compare runs in the MLflow UI: its source (the job
    file, and the command), strategy, privacy level, secure scheme, topology and personalization."""
    privacy = "none" if job.privacy is None else (
        "sample" if job.privacy.level == "sample" else f"client-{job.privacy.mode}")
    if job.peers is not None:
        topology = f"peers-{job.peers.graph.kind}"
    else:
        topology = "flat" if job.topology is None else f"edges-{job.topology.edges}"
    tags = {"fedray.strategy": f"peers-{job.peers.exchange}" if job.peers else job.strategy.name,
            "fedray.privacy": privacy, "fedray.secure": job.secure.scheme if job.secure else "none",
            "fedray.topology": topology, "fedray.dataset": job.data.dataset,
            "fedray.personalization": job.personalization.method if job.personalization else "none",
            "fedray.start": job.model.start or "seed"}
    if source is not None:
        job_file, command = source
        tags |= {"mlflow.source.name": job_file, "mlflow.source.type": "LOCAL", "fedray.command": command}
    return tags


def _end_without_driver(driver, run_dir: Path, status: str, error: str | None, history: list[RoundResult],
                        job: JobSpec) -> int:
    """Stop the driver and end its MLflow run from here, from its journal and the rounds it
    returned: its unsent records, the round log and plots, ``error`` and ``status``. Returns the
    records still unsent."""
    if driver is not None:
        ray.kill(driver)
        try:  # wait until it is gone: one process at a time writes the journal
            ray.get(driver.run_id.remote(), timeout=_KILL_WAIT_S)
        except (RayError, GetTimeoutError):
            pass
    if not (run_dir / "run.json").exists():  # the driver had sent everything, and ended the run
        return 0
    tracker = Tracker(run_dir)
    if error is not None:
        tracker.set_tag("fedray.error", error)
    log_history(tracker, history, job.privacy is not None)
    return tracker.finish(status, _KILL_WAIT_S if status == "KILLED" else job.tracking.wait_s)


def _why_nothing_trained(history: list[RoundResult], stopped: str | None) -> str:
    if not history:
        return stopped or "no round ran"
    reasons = Counter(reason for h in history for reason in h.failures.values())
    if not reasons:
        told = ("device failures are not named under client-level DP" if any(h.metrics.get("failures")
                for h in history) else "too few valid updates")
        return f"{len(history)} rounds failed ({told})"
    common = "; ".join(f"{n}x {reason}" for reason, n in reasons.most_common(3))
    return f"{len(history)} rounds failed; device failures: {common}"


def _root_cause(error: BaseException) -> str:
    """One line: what went wrong, without Ray's tracebacks."""
    if isinstance(error, RayTaskError):
        first = (str(error.cause).splitlines() or [""])[0]
        return first if isinstance(error.cause, JobError) else f"{type(error.cause).__name__}: {first}"
    text = str(error)
    if isinstance(error, RayError) and ("OutOfMemoryError" in text or "out of memory" in text.lower()):
        memory = next((line.strip() for line in text.splitlines() if "Memory on the node" in line), "")
        return f"Ray killed the driver: out of memory. {memory}".strip()
    if isinstance(error, RayError):  # e.g. the driver's setup raised: its exception is the last line
        lines = [line.strip() for line in text.splitlines() if line.strip() and not line.startswith(" ")]
        last = re.fullmatch(r"(?:[\w.]+\.)?(\w+): (.*)", lines[-1]) if lines else None
        if last is None:
            return lines[-1] if lines else type(error).__name__
        return last[2] if last[1] == "JobError" else f"{last[1]}: {last[2]}"
    return f"{type(error).__name__}: {cause(error)}"
