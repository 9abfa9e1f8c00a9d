"""The driver's side of encrypted aggregation: the plan, the key authority actor, and the whole
aggregate the authority's decryption of a round's encrypted sum gives back."""

from __future__ import annotations

import json
import math
import time
from typing import Any

import numpy as np
import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from fedray.config import JobSpec
from fedray.config.secure import value_range
from fedray.models.params import ParamSpec
from fedray.platform.aggregation import Partial
from fedray.platform.intake import Intake
from fedray.platform.pool import START_TIMEOUT_S
from fedray.platform.tracking import Tracker
from fedray.secure.authority import DecryptionRefused, KeyAuthority
from fedray.secure.plan import SecurePlan, SumLoader


class Sealing:
    """Makes the plan, starts the key authority on this node (the driver's) and records the split
    in the run (``secure.json``, tag ``fedray.secure``). ``weigh`` is the strategy's; the authority
    writes what it decrypts to the run's ``checkpoints`` location, if it has one."""

    def __init__(self, job: JobSpec, spec: ParamSpec, train_sizes: list[int], weigh, tracker: Tracker,
                 checkpoints: str | None = None) -> None:
        self.job, self.size = job, spec.size
        self.plan = SecurePlan.of(job, spec.names, [math.prod(s) for s in spec.shapes], train_sizes,
                                  lambda samples: weigh(samples, 1)[0])
        here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
        self.authority = ray.remote(KeyAuthority).options(num_cpus=0, max_restarts=0, scheduling_strategy=here).remote(
            self.plan, checkpoints)
        self.public = ray.get(self.authority.public_context.remote(), timeout=START_TIMEOUT_S)
        self.sums = SumLoader(self.plan, self.public)  # the driver adds ciphertexts too
        summary = self.plan.summary()
        tracker.log_text(json.dumps(summary, indent=1), "secure.json")
        tracker.set_tag("fedray.secure", f"{self.plan.scheme}: {summary['encrypted_values']} values encrypted, "
                                         f"{summary['plaintext_values']} in plaintext")

    @property
    def tiers(self) -> tuple[SecurePlan, Any, bytes]:
        """What the workers (plan, authority) and the edges (plan, public context) need."""
        return self.plan, self.authority, self.public

    def unseal(self, partial: Partial, intake: Intake, round: int, clip: float | None, statistics: bool
               ) -> tuple[Partial | None, dict]:
        """Have the key authority decrypt ``partial``'s encrypted sum of ``round`` (whose coordinates
        shared random-k chose; ``clip``: the round's DP clip bound, for the range); the whole
        aggregate and its metrics: ``decrypt_seconds`` and, if the
        devices send ``statistics`` (not under DP), ``train_loss`` and ``clipped_fraction`` (the
        devices' mean fraction of values beyond the range). None, with metric
        ``decryption_refused``, if the authority refuses (as it does a round of a resumed run
        that was decrypted before the crash)."""
        started = time.perf_counter()
        try:
            values = ray.get(self.authority.decrypt.remote(partial.sealed.to_bytes()),
                             timeout=self.job.devices.timeout_s)
        except DecryptionRefused:
            return None, {"decryption_refused": 1.0}
        total, extras = self.plan.decode(values, value_range(self.job, clip))
        full = np.zeros(self.size, dtype=np.float32)
        full[self.plan.plain], full[self.plan.sent(round)] = partial.weighted_sum, total
        metrics = {"decrypt_seconds": time.perf_counter() - started}
        if statistics and intake.samples:
            metrics.update(train_loss=extras["loss"] * self.plan.sample_scale / intake.samples,
                           clipped_fraction=extras["clipped"] / partial.count)
        return Partial(full, partial.weight, partial.steps_weight, partial.count, partial.control_sum,
                       extras["below_clip"]), metrics
