"""The round log and figures a run logs, from its ``RoundResult`` history. Matplotlib is imported
when a figure is made, and without pyplot: no global figure state, no GUI backend."""

from __future__ import annotations

import json
from dataclasses import asdict
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from matplotlib.figure import Figure


def log_history(tracker, history: list, privacy: bool) -> None:
    """Log the per-round log (rounds.json) and the figures of the rounds run so far."""
    if history:
        tracker.log_text(json.dumps([asdict(h) for h in history], indent=1), "rounds.json")
        tracker.log_figure(accuracy_loss_figure(history), "accuracy_loss.png")
        if privacy:
            tracker.log_figure(privacy_figure(history), "privacy.png")


def privacy_figure(history: list) -> Figure:
    """Epsilon spent against rounds, next to the global model's test accuracy."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(9, 3.5))
    spent, acc = fig.subplots(1, 2)
    key = "epsilon" if "epsilon" in history[0].metrics else "device_epsilon_max"  # client, or sample level
    logged = [h for h in history if key in h.metrics]
    spent.plot([h.round for h in logged], [h.metrics[key] for h in logged], marker=".")
    spent.set(xlabel="round", ylabel=key.replace("_", " "), title="Privacy spent")
    evaluated = [h for h in history if "test_accuracy" in h.metrics]
    acc.plot([h.round for h in evaluated], [h.metrics["test_accuracy"] for h in evaluated], marker=".")
    acc.set(xlabel="round", ylabel="test accuracy", title="Global model accuracy")
    fig.tight_layout()
    return fig


def accuracy_loss_figure(history: list) -> Figure:
    """Test accuracy and test and training loss against rounds."""
    from matplotlib.figure import Figure

    evaluated = [h for h in history if "test_accuracy" in h.metrics]
    rounds = [h.round for h in evaluated]
    fig = Figure(figsize=(9, 3.5))
    acc, loss = fig.subplots(1, 2)
    acc.plot(rounds, [h.metrics["test_accuracy"] for h in evaluated], marker=".")
    acc.set(xlabel="round", ylabel="test accuracy", title="Global model accuracy")
    loss.plot(rounds, [h.metrics["test_loss"] for h in evaluated], marker=".", label="test")
    trained = [h for h in history if "train_loss" in h.metrics]
    loss.plot([h.round for h in trained], [h.metrics["train_loss"] for h in trained], label="train (devices)")
    loss.set(xlabel="round", ylabel="cross-entropy", title="Loss")
    loss.legend()
    fig.tight_layout()
    return fig
