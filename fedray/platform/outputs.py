"""What a run leaves in MLflow when it ends: its artifacts (round log and plots, privacy report,
per-device and per-agent results), its description, and the final model with its registration
and ONNX export. Called by ``Driver.finish``."""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

from fedray.platform import plots

if TYPE_CHECKING:
    from fedray.platform.driver import Driver
    from fedray.transfer.layout import Layout


def layout_params(layout: Layout) -> dict[str, str]:
    """What the model federates, keeps frozen and keeps on devices, as MLflow params (sizes in
    float32 values)."""
    return {"model.federated_size": str(layout.shared.size), "model.frozen_parameters": str(len(layout.frozen)),
            "model.personal_size": str(layout.personal.size)}


def log_end(driver: Driver, status: str) -> None:
    """Log what the run ending with ``status`` leaves: artifacts, tags, its description and (if
    FINISHED) the final model."""
    tracker, job = driver.tracker, driver.job
    if driver.staleness:
        tracker.log_text(json.dumps(dict(sorted(driver.staleness.items()))), "staleness.json")
    if driver.pool.attackers:
        tracker.log_text(json.dumps(sorted(driver.pool.attackers)), "attackers.json")
    if driver.peers and driver.peers.scores:
        tracker.log_text(json.dumps(driver.peers.scores, indent=1), "agents.json")
    if driver.personal_scores:
        tracker.log_text(json.dumps(driver.personal_scores, indent=1), "personalization.json")
    if driver.peers is None:
        tracker.log_text(json.dumps(participation(driver), indent=1), "participation.json")
    plots.log_history(tracker, driver.history, job.privacy is not None)
    if driver.stopped:
        tracker.set_tag("fedray.stopped", driver.stopped)
    tracker.set_tag("mlflow.note.content", description(driver, status))
    if job.privacy is not None:
        tracker.log_text(json.dumps(driver.privacy_report(), indent=1), "privacy_report.json")
    if job.tracking.log_model and status == "FINISHED" and driver.peers is None:  # agents keep their own
        log_model(driver)
    if status == "FINISHED" and job.personalization is not None and job.personalization.export:
        export_personal(driver, job.personalization.export)


def summary(driver: Driver) -> dict:
    """What ``Driver.finish`` returns: the run, its rounds, its last accuracy, what it spent and sent."""
    history, tracker = driver.history, driver.tracker
    last = history[-1].metrics if history else {}
    out = {"run_id": tracker.run_id, "tracking_uri": tracker.uri,
           "unlogged": tracker.backlog,  # records left in the journal, for ``fedray replay``
           "journal": str(tracker.directory), "rounds": len(history),
           "completed_rounds": sum(h.completed for h in history),
           "test_accuracy": last.get("test_accuracy"), "test_loss": last.get("test_loss"),
           "failures": sum(h.metrics["failures"] for h in history)}
    if driver.ledger is not None:
        out["epsilon"] = driver.ledger.epsilon()
    if driver.device_epsilon:
        out["device_epsilon_max"] = max(e for e, _ in driver.device_epsilon.values())
    out |= {key: value for key, value in (("stopped", driver.stopped), ("resumed", driver.restored),
                                          ("resources", driver.pool.note)) if value}
    return out | {key: sum(h.metrics.get(key, 0) for h in history) for key in
                  ("bytes_up", "bytes_down", "bytes_sent", "bytes_edge_cloud", "sim_comm_seconds")
                  if any(key in h.metrics for h in history)}


def participation(driver: Driver) -> dict:
    """How often devices answered: the per-round update rate's mean and minimum and, unless who
    took part must stay secret (client-level DP), per device the updates accepted from it and
    its failures."""
    rates = [h.metrics["update_rate"] for h in driver.history if "update_rate" in h.metrics]
    out = {"rounds": len(driver.history), "update_rate_mean": sum(rates) / len(rates) if rates else None,
           "update_rate_min": min(rates, default=None)}
    if driver.ledger is not None:
        return out
    devices: dict[int, dict[str, int]] = {}
    for h in driver.history:
        for d in h.updates:
            devices.setdefault(d, {"updates": 0, "failures": 0})["updates"] += 1
        for d in h.failures:
            devices.setdefault(d, {"updates": 0, "failures": 0})["failures"] += 1
    return out | {"devices": {str(d): devices[d] for d in sorted(devices)}}


def latest(driver: Driver) -> dict[str, float]:
    """Each metric's latest value in the run."""
    return {k: v for h in driver.history for k, v in h.metrics.items()}


def description(driver: Driver, status: str) -> str:
    """The run's end-of-run summary (Markdown): its MLflow description."""
    history, job = driver.history, driver.job
    done = sum(h.completed for h in history)
    lines = [f"**{job.name}**: {status.lower()}, {done}/{len(history)} rounds completed of {job.rounds}"
             + (f"; stopped: {driver.stopped}" if driver.stopped else "")]
    last = latest(driver)
    for key, label in (("test_accuracy", "test accuracy"), ("device_accuracy_personal", "personalized accuracy "
                       "(device mean)"), ("device_accuracy_finetuned", "fine-tuned accuracy (device mean)"),
                       ("epsilon", "epsilon"), ("device_epsilon_max", "device epsilon max")):
        if key in last:
            lines.append(f"- {label}: {last[key]:.4f}")
    sent = sum(h.metrics.get("bytes_up", h.metrics.get("bytes_sent", 0)) for h in history)
    lines.append(f"- bytes sent by devices: {sent / 1e6:.2f} MB; device failures: "
                 f"{sum(h.metrics.get('failures', 0) for h in history):g}")
    return "\n".join(lines)


def log_model(driver: Driver) -> None:
    """Log the final model (``model``: MLflow's PyTorch flavour and the weights a job can start
    from), export it (``tracking.export``: ``onnx/model.onnx`` and ``onnx/check.json``) and
    register it (``tracking.register``, with the run's latest metrics and the job)."""
    tracker, tracking, model = driver.tracker, driver.job.tracking, driver.model
    driver.spec.load(model, driver.state.params)
    tracker.log_model(model, driver.example)
    if tracking.export == "onnx":
        from fedray.transfer import export

        with tempfile.TemporaryDirectory() as directory:
            path = Path(directory) / "model.onnx"
            check = export.to_onnx(model, driver.holdout_inputs, path)
            tracker.log_bytes(path.read_bytes(), "onnx/model.onnx")
        tracker.log_text(json.dumps(check, indent=1), "onnx/check.json")
        tracker.set_tag("fedray.onnx_max_abs_diff", f"{check['max_abs_diff']:.3g}")

    if tracking.register_:
        last = latest(driver)
        tags = {k: f"{last[k]:.6g}" for k in ("test_accuracy", "test_loss", "epsilon", "device_epsilon_max",
                                               "device_accuracy_personal") if k in last}
        tags |= {"fedray.job": driver.job.name, "fedray.rounds": str(len(driver.history))}
        tracker.register(tracking.register_, f"{description(driver, 'FINISHED')}\n\nrun {tracker.run_id}, job:\n"
                         f"```yaml\n{driver.job_yaml}\n```", tags)


def export_personal(driver: Driver, devices: list[int]) -> None:
    """Each of ``devices`` exports its personalized model to ONNX on a worker of its own group
    (``DeviceWorker.export_personal``); logged as ``personal/device_<id>.onnx`` with its check
    (``.json``). A device whose export fails is named in ``personal/failures.json``."""
    import ray

    pool = driver.pool
    params = ray.put(driver.state.params)
    refs = [pool.submit("export_personal", d, params, state=pool.records.ref(d)) for d in devices]
    failures = {}
    for done in pool.as_completed(refs, time.monotonic() + driver.job.devices.timeout_s):
        if done.failure is not None:
            failures[done.task.device] = done.failure
            continue
        data, check = done.value
        driver.tracker.log_bytes(data, f"personal/device_{done.task.device}.onnx")
        driver.tracker.log_text(json.dumps(check, indent=1), f"personal/device_{done.task.device}.json")
    failures |= {done.task.device: done.failure for done in pool.expire(driver.job.devices.timeout_s, refs)}
    if failures:
        driver.tracker.log_text(json.dumps(failures, indent=1), "personal/failures.json")
