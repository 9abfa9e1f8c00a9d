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
