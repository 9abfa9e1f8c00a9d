"""The job description: ``JobSpec`` and its sections, loaded and validated from YAML."""

from fedray.config.base import JobError
from fedray.config.job import (AttackSpec, DataSpec, DevicesSpec, JobSpec, LocalSpec, SpeedSpec, format_errors,
                               load_job, parse_job)
from fedray.config.strategy import ASYNC_STRATEGIES, Staleness, StrategySpec

__all__ = ["ASYNC_STRATEGIES", "AttackSpec", "DataSpec", "DevicesSpec", "JobError", "JobSpec", "LocalSpec",
           "SpeedSpec", "Staleness", "StrategySpec", "format_errors", "load_job", "parse_job"]
