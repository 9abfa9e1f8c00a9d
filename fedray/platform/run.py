"""Run a job: connect to Ray, start the Driver actor on this node, drive its rounds, finish."""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable

import ray
from ray.exceptions import RayError, RayTaskError
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from fedray.config import JobSpec
from fedray.platform.driver import Driver, RoundResult
from fedray.platform.tracking import is_relative_local, resolve_uri


class RunError(RuntimeError):
    """The run stopped: the driver or a round failed. The message names the root cause."""


def connect() -> None:
    """Join the cluster named by ``RAY_ADDRESS`` (as ``ray job submit`` sets it), else start an
    embedded local Ray bound to loopback."""
    if ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS"):
        ray.init(log_to_driver=True)
    else:
        ray.init(_node_ip_address="127.0.0.1", include_dashboard=False, log_to_driver=True)


def run_job(job: JobSpec, job_yaml: str, tracking_uri: str | None = None,
            on_round: Callable[[RoundResult], None] | None = None) -> dict:
    """Run ``job`` to completion and return the Driver's summary. The MLflow run ends FINISHED, or
    FAILED (keeping every round already logged) if a round raises."""
    if os.environ.get("RAY_JOB_SUBMISSION_ID") and is_relative_local(tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")):
        warnings.warn("this Ray job logs to a relative MLflow path inside its temporary working directory, "
                      "which Ray deletes; pass --tracking-uri with a tracking server or an absolute path",
                      stacklevel=2)
    connect()
    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    driver = ray.remote(Driver).options(num_cpus=0, scheduling_strategy=here, max_restarts=0).remote(
        job, resolve_uri(tracking_uri), job_yaml)
    # a round waits at most timeout_s for training and again for federated evaluation
    round_timeout = 2 * job.devices.timeout_s + 600
    try:
        for r in range(1, job.rounds + 1):
            result = ray.get(driver.run_round.remote(r), timeout=round_timeout)
            if on_round is not None:
                on_round(result)
        return ray.get(driver.finish.remote("FINISHED"), timeout=600)
    except BaseException as e:
        # end the MLflow run with what was logged so far; a driver that is gone already ended it
        status = "KILLED" if isinstance(e, KeyboardInterrupt) else "FAILED"
        try:
            ray.get(driver.finish.remote(status), timeout=120)
        except RayError:
            pass
        if isinstance(e, RayError):
            raise RunError(f"job {job.name!r} failed: {_root_cause(e)}") from e
        raise
    finally:
        ray.kill(driver)  # its workers share its fate


def _root_cause(error: RayError) -> str:
    if isinstance(error, RayTaskError):
        return f"{type(error.cause).__name__}: {error.cause}"
    lines = [line for line in str(error).splitlines() if line.strip()]
    return lines[-1].strip() if lines else type(error).__name__
