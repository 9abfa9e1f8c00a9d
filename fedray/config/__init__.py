"""The job description: ``JobSpec`` and its sections, loaded and validated from YAML."""

from fedray.config.base import JobError
from fedray.config.data import DataSpec
from fedray.config.job import (AttackSpec, DevicesSpec, JobSpec, LocalSpec, SpeedSpec, format_errors, load_job,
                               parse_job)
from fedray.config.strategy import ASYNC_STRATEGIES, ROBUST_STRATEGIES, Staleness, StrategySpec
from fedray.config.topology import Link, NetworkSpec, TopologySpec

__all__ = ["ASYNC_STRATEGIES", "ROBUST_STRATEGIES", "AttackSpec", "DataSpec", "DevicesSpec", "JobError", "JobSpec",
           "Link", "LocalSpec", "NetworkSpec", "SpeedSpec", "Staleness", "StrategySpec", "TopologySpec",
           "format_errors", "load_job", "parse_job"]
