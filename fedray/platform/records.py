"""DeviceRecords: every device's state record (``DeviceState``) during a simulated run, in Ray's
object store, and which records changed since the last checkpoint."""

from __future__ import annotations

import ray

from fedray.agents.state import DeviceState


class DeviceRecords:
    """Refs to the devices' current records; a device that never trained has none (a fresh
    ``DeviceState``). The records are owned by the run's driver, not by a worker: a worker that
    dies loses none of them."""

    def __init__(self) -> None:
        self._refs: dict[int, ray.ObjectRef] = {}
        self.changed: set[int] = set()  # since the last checkpoint

    def ref(self, device: int) -> ray.ObjectRef | None:
        return self._refs.get(device)

    def commit(self, device: int, ref: ray.ObjectRef) -> None:
        self._refs[device] = ref
        self.changed.add(device)

    def refs(self, devices: list[int]) -> dict[int, ray.ObjectRef]:
        """The records of those ``devices`` that have one."""
        return {d: self._refs[d] for d in devices if d in self._refs}

    def load(self, records: dict[int, DeviceState]) -> None:
        """Records from a checkpoint."""
        self._refs.update({d: ray.put(record) for d, record in records.items()})
