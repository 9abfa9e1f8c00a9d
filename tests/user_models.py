"""User models for tests, loaded by workers as `user_models:Name` (tests/ is on PYTHONPATH)."""

import time

from torch import nn


class SlowLogReg(nn.Module):
    """Logistic regression whose forward pass sleeps, to make a device miss its deadline."""

    def __init__(self, features: int, classes: int, sleep_s: float):
        super().__init__()
        self.linear = nn.Linear(features, classes)
        self.sleep_s = sleep_s

    def forward(self, x):
        if self.training:
            time.sleep(self.sleep_s)
        return self.linear(x.flatten(1))


class BatchStatsNet(nn.Module):
    """Normalizes with the batch's statistics (no running buffers): DP-SGD cannot train it."""

    def __init__(self, features: int = 64, classes: int = 10):
        super().__init__()
        self.layers = nn.Sequential(nn.Flatten(), nn.Linear(features, 16), nn.BatchNorm1d(16, track_running_stats=False),
                                    nn.ReLU(), nn.Linear(16, classes))

    def forward(self, x):
        return self.layers(x)


class NeedsLocalFile(nn.Module):
    """Logistic regression that cannot be built inside Ray: as a model that reads a file only the
    submitting machine has. Validation (before Ray starts) passes; the run's driver fails."""

    def __init__(self, features: int = 64, classes: int = 10):
        import ray

        if ray.is_initialized():
            raise FileNotFoundError("weights.pt: no such file on this node")
        super().__init__()
        self.linear = nn.Linear(features, classes)

    def forward(self, x):
        return self.linear(x.flatten(1))
