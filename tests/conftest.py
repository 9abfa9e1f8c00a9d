import os
import shutil
from pathlib import Path

import pytest
import ray

# Ray workers inherit the environment: let them import tests/user_models.py
os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(Path(__file__).parent), os.environ.get("PYTHONPATH")]))


def start_ray() -> None:
    """The tests' embedded local Ray, with two logical GPUs: GPU jobs are placed as on a GPU
    cluster and train on the CPU (test_gpu.py)."""
    from fedray.platform.run import connect

    connect(num_gpus=2)


@pytest.fixture(scope="session")
def ray_session():
    """One Ray for the whole test session (ray.init takes seconds)."""
    start_ray()
    yield
    ray.shutdown()


@pytest.fixture
def ray_address(ray_session) -> str:
    """The session Ray's address: a `fedray` command in a process of its own joins it
    (``RAY_ADDRESS``, as a job submitted to a cluster does) rather than start a Ray of its own,
    which takes seconds."""
    return ray.get_runtime_context().gcs_address


@pytest.fixture(scope="session")
def _empty_store(tmp_path_factory) -> Path:
    """An MLflow SQLite store with its tables made: MLflow takes a second or more to make them in a
    new file, so each test's store is a copy of this one."""
    from mlflow import MlflowClient

    path = tmp_path_factory.mktemp("store") / "mlflow.db"
    MlflowClient(f"sqlite:///{path}").search_experiments()
    return path


@pytest.fixture
def tracking_uri(tmp_path, _empty_store):
    """A new, empty MLflow store of the test's own."""
    shutil.copyfile(_empty_store, tmp_path / "mlflow.db")
    return f"sqlite:///{tmp_path / 'mlflow.db'}"


@pytest.fixture(scope="session")
def reference(ray_session, tmp_path_factory, _empty_store):
    """Plain runs that several tests compare against, each run once in the session:
    ``reference(**overrides)`` runs ``small_job(**overrides)`` (or finds it run) and returns
    (a client of its MLflow store, its summary). Jobs that parse alike are the same run."""
    from mlflow import MlflowClient

    from fedray.config import parse_job

    shutil.copyfile(_empty_store, path := (folder := tmp_path_factory.mktemp("reference")) / "mlflow.db")
    uri, made = f"sqlite:///{path}", {}

    def run(**overrides):
        raw = small_job(**overrides)
        key = parse_job(raw).model_dump_json()
        if key not in made:
            made[key] = run_here(make_driver(raw, uri, folder))
        return MlflowClient(uri), made[key]

    return run


def small_job(**overrides) -> dict:
    """A job mapping that trains in about a second per round on digits, on one worker (tests
    whose behaviour involves several workers ask for them)."""
    job = {
        "name": "test",
        "seed": 0,
        "rounds": 2,
        "data": {"dataset": "digits", "partition": {"kind": "iid"}},
        "model": {"name": "logreg"},
        "devices": {"count": 6, "per_round": 4, "workers": 1, "local": {"epochs": 1, "batch_size": 32, "lr": 0.1}},
        "tracking": {"experiment": "tests", "log_model": False},
    }
    for key, value in overrides.items():
        node = job
        *parents, leaf = key.split("__")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return job


def history(client, run_id: str, key: str) -> list[float]:
    """A run's values of metric ``key`` in step order."""
    return [m.value for m in sorted(client.get_metric_history(run_id, key), key=lambda m: m.step)]


def make_driver(raw: dict, uri: str, runs_dir: Path):
    """A Driver for a job mapping in this process (not an actor: a driver process takes seconds to
    start), logging to ``uri``; ``release`` kills its actors."""
    import yaml

    from fedray.config import parse_job
    from fedray.platform.driver import Driver
    from fedray.platform.tracking import start_run

    job = parse_job(raw)
    return Driver(job, str(start_run(uri, job.tracking.experiment, job.name, runs_dir)), yaml.safe_dump(raw))


def release(driver) -> None:
    """Kill the actors a Driver in this process made (the authority made the workers of an
    encrypted run): a driver actor's go with it, these would hold the CPUs until the session ends."""
    edges = driver.edges.group.actors if driver.edges else []
    for actor in driver.pool.workers.actors + edges + ([driver.sealing.authority] if driver.sealing else []):
        ray.kill(actor)


def run_here(driver, on_round=None) -> dict:
    """Run a Driver's rounds in this process, calling ``on_round(result)`` after each, end its run
    and kill its actors: returns its summary. (``run_job`` does the same with the Driver as an
    actor, and stops at a privacy budget.)"""
    try:
        for r in range(1, driver.job.rounds + 1):
            result = driver.run_round(r)
            if on_round is not None:
                on_round(result)
        return driver.finish()
    finally:
        release(driver)


@pytest.fixture
def local_driver(ray_session, tmp_path, tracking_uri):
    """Makes a Driver for a job mapping in this process (``make_driver``) logging to the test's
    store, to run rounds one by one and reach into its pool; its actors are killed after the test."""
    made = []

    def make(raw: dict):
        made.append(make_driver(raw, tracking_uri, tmp_path))
        return made[-1]

    yield make
    for driver in made:
        release(driver)


@pytest.fixture
def local_run(local_driver):
    """``local_run(on_round=None, **overrides)``: ``small_job(**overrides)`` run by ``run_here`` on
    a ``local_driver``; returns its summary."""
    return lambda on_round=None, **overrides: run_here(local_driver(small_job(**overrides)), on_round)
