"""Run a job: connect to Ray, start the Driver actor on this node, drive its rounds, finish."""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable

import ray
from ray._private import ray_constants
from ray.exceptions import RayError, RayTaskError
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from fedray.config import JobSpec
from fedray.platform.driver import Driver, RoundResult
from fedray.platform.tracking import is_relative_local, resolve_uri, terminate


class RunError(RuntimeError):
    """The run stopped: the driver or a round failed. The message names the root cause."""


def connect() -> None:
    """Join the cluster named by ``RAY_ADDRESS`` (as ``ray job submit`` sets it), else start an
    embedded local Ray bound to loopback."""
    if ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS"):
        ray.init(log_to_driver=True)
        return
    # Ray swaps 127.0.0.1 for the machine's address and listens on all interfaces unless it runs in
    # its single-machine mode (the default on macOS and Windows). Ray reads this flag at import, so
    # set it for the processes it starts and for this one.
    os.environ[ray_constants.ENABLE_RAY_CLUSTERS_ENV_VAR] = "0"
    ray_constants.ENABLE_RAY_CLUSTER = False
    ray.init(_node_ip_address="127.0.0.1", include_dashboard=False, log_to_driver=True)


def run_job(job: JobSpec, job_yaml: str, tracking_uri: str | None = None,
            on_round: Callable[[RoundResult], None] | None = None) -> dict:
    """Run ``job`` to completion and return the Driver's summary. ``tracking_uri`` as given by the
    user (None: ``MLFLOW_TRACKING_URI`` or MLflow's default). The MLflow run ends FINISHED, or FAILED
    (keeping every round already logged) if a round raises; Ray errors become ``RunError``."""
    connect()
    if ray.get_runtime_context().runtime_env.get("working_dir") and is_relative_local(
            tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")):
        warnings.warn("this Ray job logs MLflow runs to a relative path inside its temporary working "
                      "directory, which Ray deletes; use --tracking-uri with a tracking server or an "
                      "absolute path", stacklevel=2)
    uri = resolve_uri(tracking_uri)
    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    driver = ray.remote(Driver).options(num_cpus=0, scheduling_strategy=here, max_restarts=0).remote(
        job, uri, job_yaml)
    # a round waits at most timeout_s for training and again for federated evaluation
    round_timeout = 2 * job.devices.timeout_s + 600
    run_id = None
    try:
        run_id = ray.get(driver.run_id.remote(), timeout=600)  # the driver's setup is done
        for r in range(1, job.rounds + 1):
            if ray.get(driver.stop_reason.remote(r), timeout=600):  # the privacy budget is spent
                break
            result = ray.get(driver.run_round.remote(r), timeout=round_timeout)
            if on_round is not None:
                on_round(result)
        return ray.get(driver.finish.remote("FINISHED"), timeout=600)
    except BaseException as e:
        _end_run(driver, uri, run_id, "KILLED" if isinstance(e, KeyboardInterrupt) else "FAILED")
        if isinstance(e, RayError):
            raise RunError(f"job {job.name!r} failed: {_root_cause(e)}\n"
                           f"Rounds already run stay logged in MLflow at {uri}") from e
        raise
    finally:
        ray.kill(driver)  # its workers share its fate


def _end_run(driver, uri: str, run_id: str | None, status: str) -> None:
    """End the MLflow run with what was logged so far: through the driver if it answers (it
    flushes its pending metrics), else directly. On Ctrl-C the driver is not waited for."""
    if status != "KILLED":
        try:
            ray.get(driver.finish.remote(status), timeout=120)
            return
        except RayError:  # the driver is gone or stuck; a driver whose setup failed ended its run
            pass
    ray.kill(driver)
    if run_id is not None:
        terminate(uri, run_id, status)


def _root_cause(error: RayError) -> str:
    if isinstance(error, RayTaskError):
        return f"{type(error.cause).__name__}: {error.cause}"
    lines = [line for line in str(error).splitlines() if line.strip()]
    return lines[-1].strip() if lines else type(error).__name__
