"""Why fedray's conv nets use channels-last order and pool before the ReLU: the small CNN as built
by the zoo vs the textbook NCHW conv -> ReLU -> pool order, one torch thread, side by side.

    .venv/bin/python benchmarks/conv_layout.py
"""

from __future__ import annotations

import time

import torch
from torch import nn
from torch.nn import functional as F

from fedray.agents.training import evaluate
from fedray.models.zoo import small_cnn


def textbook_small_cnn() -> nn.Module:
    """The same function as ``small_cnn`` in the default memory order, ReLU before pooling."""
    return nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Flatten(), nn.Linear(32 * 7 * 7, 10))


def step_ms(model: nn.Module, x: torch.Tensor, y: torch.Tensor, repeats: int = 100) -> float:
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)

    def step() -> None:
        optimizer.zero_grad()
        F.cross_entropy(model(x), y).backward()
        optimizer.step()

    for _ in range(10):
        step()
    start = time.perf_counter()
    for _ in range(repeats):
        step()
    return (time.perf_counter() - start) / repeats * 1e3


def eval_ms(model: nn.Module, x: torch.Tensor, y: torch.Tensor, repeats: int = 5) -> float:
    evaluate(model, x, y)
    start = time.perf_counter()
    for _ in range(repeats):
        evaluate(model, x, y)
    return (time.perf_counter() - start) / repeats * 1e3


def main() -> None:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    xb, yb = torch.randn(32, 1, 28, 28), torch.randint(0, 10, (32,))
    xe, ye = torch.randn(1000, 1, 28, 28), torch.randint(0, 10, (1000,))
    zoo, textbook = small_cnn((1, 28, 28), 10), textbook_small_cnn()
    rows = [(name, step_ms(m, xb, yb), eval_ms(m, xe, ye)) for name, m in (("textbook", textbook), ("zoo", zoo))]
    print(f"{'small CNN':10} {'train step, batch 32':>21} {'evaluate 1,000 images':>22}")
    for name, step, ev in rows:
        print(f"{name:10} {step:18.2f} ms {ev:19.1f} ms")
    print(f"{'ratio':10} {rows[1][1] / rows[0][1]:21.3f} {rows[1][2] / rows[0][2]:22.3f}")


if __name__ == "__main__":
    main()
