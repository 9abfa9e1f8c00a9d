"""Server strategies as pure state transitions: ``init(params) -> state`` and
``apply(state, partial) -> (state, diagnostics)``. No Ray, no MLflow, no I/O."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from fedray.config import StrategySpec
from fedray.platform.aggregation import Partial


@dataclass(frozen=True)
class ServerState:
    """The global model (flat float32 federated parameters) after ``round`` applied rounds."""

    params: np.ndarray
    round: int = 0


@dataclass(frozen=True)
class Strategy:
    name: str
    init: Callable[[np.ndarray], ServerState]
    apply: Callable[[ServerState, Partial], tuple[ServerState, dict[str, float]]]


def fedavg(server_lr: float = 1.0) -> Strategy:
    """FedAvg (McMahan et al., 2017): step the global model by ``server_lr`` times the
    sample-weighted mean delta. ``server_lr = 1`` is plain weighted model averaging."""

    def init(params: np.ndarray) -> ServerState:
        return ServerState(np.array(params, dtype=np.float32))

    def apply(state: ServerState, partial: Partial) -> tuple[ServerState, dict[str, float]]:
        step = partial.mean()
        step *= np.float32(server_lr)
        return ServerState(state.params + step, state.round + 1), {"update_norm": float(np.linalg.norm(step))}

    return Strategy("fedavg", init, apply)


def build(spec: StrategySpec) -> Strategy:
    return fedavg(spec.server_lr)
