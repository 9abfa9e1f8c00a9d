"""The driver's state as a checkpoint, and back: what a run needs to continue exactly where it was.

``take`` reads a Driver after a round: its round, server state, sampler, privacy ledger, round log
and asynchronous bookkeeping, and the device records and spend that changed since the last
checkpoint. ``restore`` puts a checkpoint back into a freshly set-up Driver of the same job, after
checking that the checkpoint is this run's, of this model and this data. Not restored, by design:
tasks in flight when the run stopped (their devices train again) and, under client-level DP, the
sampler (its draws are secret, so a new one comes from OS entropy).
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict
from typing import TYPE_CHECKING

import numpy as np
import ray

from fedray.agents.state import DeviceState
from fedray.platform.checkpoint import CheckpointError
from fedray.platform.strategies import ServerState

if TYPE_CHECKING:
    from fedray.platform.driver import Driver


def data_digest(x: np.ndarray, y: np.ndarray) -> str:
    """A fingerprint of a dataset: a checkpoint resumes only on the data it was trained on."""
    digest = hashlib.sha256()
    for array in (x, y):
        digest.update(str((array.dtype, array.shape)).encode())
        digest.update(np.ascontiguousarray(array).data)
    return digest.hexdigest()


def canonical(job) -> str:
    """A job as the checkpoint keeps it (``fedray.config.parse_job(json.loads(...))`` reads it back):
    every field, overrides applied."""
    return json.dumps(job.model_dump(mode="json", by_alias=True, exclude_unset=True), sort_keys=True)


def identity(run_id: str, job, spec, digest: str) -> dict:
    """What a checkpoint must match to be resumed: its run, job, model (``ParamSpec``) and data."""
    return {"run_id": run_id, "job": canonical(job),
            "model": [[name, list(shape)] for name, shape in zip(spec.names, spec.shapes)], "data": digest}


def take(driver: Driver) -> tuple[dict, Callable[[], dict]]:
    """The driver's state now, and what changed since the last ``take`` (the rounds' log, and per
    device its record and spend), given by a function that fetches the records: the checkpoint's
    writer calls it, so that the round does not wait for them."""
    server = driver.state
    state = identity(driver.tracker.run_id, driver.job, driver.spec, driver.data_digest) | {
        "tracking_uri": driver.tracker.uri,
        "round": len(driver.history),
        "server": {"params": server.params, "round": server.round, "buffers": list(server.buffers)},
        "sampler": None if driver.ledger is not None else driver.sampler.bit_generator.state,
        "ledger_rounds": None if driver.ledger is None else driver.ledger.rounds,
        "clip": driver.clip,
        "staleness": [[t, n] for t, n in sorted(driver.staleness.items())],
        "dispatched": driver.dispatched,
        "stopped": driver.stopped,
        "downlink": None if driver.downlink is None else driver.downlink.state(),
    }
    rounds = [asdict(h) for h in driver.history[driver.checkpointed:]]
    driver.checkpointed = len(driver.history)
    pool = driver.pool
    refs = pool.record_refs(sorted(pool.records.changed))
    pool.records.changed.clear()
    spend = {}
    if pool.spend is not None:
        spend = {str(d): {"history": [list(m) for m in pool.spend.history.get(d, [])], "view": list(pool.spend.view()[d])}
                 for d in sorted(pool.spend.changed)}
        pool.spend.changed.clear()

    def changes() -> dict:
        records = dict(zip(refs, ray.get(list(refs.values()))))
        return {"rounds": rounds, "records": {str(d): r.to_dict() for d, r in records.items()}, "spend": spend}
    return state, changes


def charge_ahead(driver: Driver, number: int, trainings: list[tuple[int, int]]) -> None:
    """Under DP with checkpoints: write what round (or dispatch) ``number`` spends before any
    device trains: the round (client level, where who takes part stays secret), or its
    ``trainings`` as (device, the round number it trains for) (sample level)."""
    if driver.checkpoints and driver.job.privacy is not None:
        driver.checkpoints.charge(number, {} if driver.ledger is not None else {"trainings": trainings})


def check(state: dict, mine: dict, location: str) -> None:
    """Raise CheckpointError naming what in ``state`` (loaded from ``location``) does not match
    the ``identity`` of the run resuming it."""
    if state.get("run_id") != mine["run_id"]:
        raise CheckpointError(f"the checkpoint at {location} is of run {state.get('run_id')}, not of run {mine['run_id']}")
    if state.get("job") != mine["job"]:
        raise CheckpointError(f"the checkpoint at {location} is of another job than run {mine['run_id']}'s")
    if state.get("model") != mine["model"]:
        theirs = {name: shape for name, shape in state.get("model") or []}
        ours = dict(mine["model"])
        differ = sorted(set(theirs) ^ set(ours)) or sorted(n for n in ours if theirs[n] != ours[n])
        raise CheckpointError(f"the checkpoint at {location} is of another model: parameters {differ[:5]} differ "
                              "(was the model's code changed?)")
    if state.get("data") != mine["data"]:
        raise CheckpointError(f"the checkpoint at {location} was trained on other data: the dataset's contents "
                              "changed since (data.path?)")


def resume(driver: Driver) -> str:
    """Continue ``driver``'s run from its checkpoint (``driver.checkpoints``), once it is checked
    to be this run's; what was restored, in words."""
    from fedray.platform.strategies import AsyncStrategy

    store = driver.checkpoints
    state, changes = store.load()
    check(state, identity(driver.tracker.run_id, driver.job, driver.spec, driver.data_digest), store.location)
    after = state["dispatched"] if isinstance(driver.strategy, AsyncStrategy) else state["round"]
    charges = store.charges(after) if driver.job.privacy else []
    restore(driver, state, changes, charges)
    records = sum(len(c["records"]) for c in changes)
    spent = "" if not driver.job.privacy else (
        f", the privacy ledger with {len(charges)} interrupted rounds counted" if charges else ", the privacy ledger")
    return (f"round {state['round']} of {driver.job.rounds}: the model and server state, the sampler, "
            f"{records} device records{spent}")


def restore(driver: Driver, state: dict, changes: list[dict], charges: list[tuple[int, dict]]) -> None:
    """Put checkpoint ``state`` and its device ``changes`` back into ``driver``; ``charges`` are
    the privacy spends written ahead after it (rounds a crash cut short): they count."""
    from fedray.platform.driver import RoundResult

    server = state["server"]
    driver.state = ServerState(server["params"], server["round"], tuple(server["buffers"]))
    if state["sampler"] is not None:
        driver.sampler.bit_generator.state = state["sampler"]
    driver.history = [_round_result(RoundResult, h) for change in changes for h in change["rounds"]]
    driver.checkpointed = len(driver.history)
    driver.staleness = Counter({t: n for t, n in state["staleness"]})
    driver.dispatched, driver.stopped, driver.clip = state["dispatched"], state["stopped"], state["clip"]
    if driver.downlink is not None:
        driver.downlink.restore(state["downlink"])
    records, spend = {}, {}
    for change in changes:
        records.update({int(d): DeviceState.from_dict(r) for d, r in change["records"].items()})
        spend.update({int(d): s for d, s in change["spend"].items()})
    driver.pool.restore_records(records)
    if driver.pool.spend is not None:
        for d, s in spend.items():
            driver.pool.spend.history[d] = [tuple(m) for m in s["history"]]
            driver.pool.spend.told({d: tuple(s["view"])})
    if driver.ledger is not None:
        driver.ledger.rounds = state["ledger_rounds"]
    for number, spent in charges:
        if driver.ledger is not None:
            driver.ledger.step()
        for d, trained_for in spent.get("trainings", []):
            driver.pool.spend.charge(d, trained_for)


def _round_result(cls, values: dict):
    keyed = {name: {int(d): reason for d, reason in values[name].items()}
             for name in ("failures", "evaluation_failures", "edge_failures")}
    return cls(**(values | keyed))
