"""DeviceState: everything one device keeps between its trainings, as one versioned record.

The run holds every device's record: in Ray's object store during a simulated run, in a checkpoint
on disk. A worker is handed a device's record with its task and returns the new one beside the
update, so any worker can train any device and a worker's death loses nothing. A new kind of
per-device state (an error-feedback residual, a personal layer, an agent's own model) is a new
field here, and is checkpointed and restored with the rest. No Ray, no I/O.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

import numpy as np


@dataclass(frozen=True)
class DeviceState:
    """``version``: how many of the device's trainings went into the run (its record changes only
    with an accepted update). ``control``: SCAFFOLD's control variate ``c_i`` (None: zero).
    ``params``: in peer-to-peer learning, the agent's own model (None: not trained yet).
    ``personal``: under personalization, the parameters the device keeps of its own (its head,
    its normalization layers, or Ditto's personal model; None: not trained yet). ``residual``:
    under compression with error feedback, what its codecs have not sent yet (None: nothing)."""

    version: int = 0
    control: np.ndarray | None = None
    params: np.ndarray | None = None
    personal: np.ndarray | None = None
    residual: np.ndarray | None = None

    def advanced(self, **changes) -> DeviceState:
        """The record after one more training, with ``changes``."""
        return replace(self, version=self.version + 1, **changes)

    def to_dict(self) -> dict:
        """Its fields that are set: what a checkpoint writes."""
        return {f.name: value for f in fields(self) if (value := getattr(self, f.name)) is not None}

    @classmethod
    def from_dict(cls, values: dict) -> DeviceState:
        unknown = set(values) - {f.name for f in fields(cls)}
        if unknown:
            raise ValueError(f"device record has unknown fields {sorted(unknown)}")
        return cls(**values)
