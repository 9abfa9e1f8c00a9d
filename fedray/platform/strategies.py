"""Strategies as pure state transitions: ``init(params) -> state``, ``fold(partial, update)`` and
``apply(state, partial) -> (state, diagnostics)`` on the server, and what a strategy asks of a
device's training (its client half: FedProx's ``prox_mu``, SCAFFOLD's ``control`` update, FedNova's
``weigh``), which workers read from here. No Ray, no MLflow, no I/O.

Linear strategies fold updates into a ``Partial`` (so they run unchanged through a tree of
aggregators) and differ in how an update is weighted and how the server steps on the mean. Robust
rules have ``reduce`` instead: it takes all the round's deltas as one ``(n, d)`` array and
returns the Partial that ``apply`` steps on, diagnostics, and the rows it flagged as suspect. Asynchronous strategies (``AsyncStrategy``) fold each
arriving update with a weight that depends on its staleness and step once their buffer is full.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

import numpy as np

from fedray.agents.training import effective_steps
from fedray.config import ASYNC_STRATEGIES
from fedray.config.privacy import client_level
from fedray.platform import robust
from fedray.platform.aggregation import Partial
from fedray.update import Update


@dataclass(frozen=True)
class ServerState:
    """The global model (flat float32 federated parameters) after ``round`` applied rounds, and the
    server optimizer's buffers (momentum, first and second moments), each shaped like ``params``."""

    params: np.ndarray
    round: int = 0
    buffers: tuple[np.ndarray, ...] = ()


Weigh = Callable[[int, int], tuple[float, float]]  # (samples, local steps) -> weight and effective steps
Reduce = Callable[[np.ndarray, np.random.Generator], tuple[Partial, dict[str, float], list[int]]]


def by_samples(samples: int, local_steps: int) -> tuple[float, float]:
    return float(samples), 1.0


def unweighted(samples: int, local_steps: int) -> tuple[float, float]:
    return 1.0, 1.0


@dataclass(frozen=True)
class Strategy:
    name: str
    init: Callable[[np.ndarray], ServerState]
    weigh: Weigh  # an update's weight in the sum and its effective local steps
    apply: Callable[[ServerState, Partial], tuple[ServerState, dict[str, float]]]
    reduce: Reduce | None = None  # set for robust (non-linear) rules, which do not fold
    norm_bound: float | None = None  # every delta is clipped to this L2 norm first
    prox_mu: float = 0.0  # FedProx: devices add (mu/2)||w - w_start||^2 to their loss
    # SCAFFOLD: devices get buffers[0] (c), correct each gradient by c - c_i and send the change of c_i;
    # control(c_i, c, delta, lr x effective steps) is a device's new c_i
    control: Callable[[np.ndarray, np.ndarray, np.ndarray, float], np.ndarray] | None = None

    @property
    def control_variates(self) -> bool:
        return self.control is not None

    def fold(self, partial: Partial, update: Update) -> None:
        """Add ``update`` to ``partial`` with its weight, clipped to ``norm_bound`` if set."""
        if self.norm_bound is not None:
            update = replace(update, delta=robust.clip_to_norm(update.delta, self.norm_bound))
        partial.fold(update, *self.weigh(update.num_samples, update.local_steps))


def _stepper(name: str, weigh: Weigh, buffer_inits: tuple[float, ...],
             step: Callable[[np.ndarray, tuple[np.ndarray, ...]], tuple[np.ndarray, tuple[np.ndarray, ...]]],
             ) -> Strategy:
    """A strategy whose server moves by ``step(pseudo_gradient, buffers) -> (step, buffers)``, where
    the pseudo-gradient is the Partial's mean delta scaled by its effective steps; the buffers start
    filled with ``buffer_inits``."""

    def init(params: np.ndarray) -> ServerState:
        params = np.array(params, dtype=np.float32)
        return ServerState(params, 0, tuple(np.full_like(params, value) for value in buffer_inits))

    def apply(state: ServerState, partial: Partial) -> tuple[ServerState, dict[str, float]]:
        pseudo_gradient = partial.mean() * np.float32(partial.effective_steps())
        update, buffers = step(pseudo_gradient, state.buffers)
        return (ServerState(state.params + update, state.round + 1, buffers),
                {"update_norm": float(np.linalg.norm(update))})

    return Strategy(name, init, weigh, apply)


def fedavg(server_lr: float = 1.0, name: str = "fedavg", weigh: Weigh = by_samples) -> Strategy:
    """FedAvg (McMahan et al. 2017): step by ``server_lr`` x the sample-weighted mean delta.
    ``server_lr = 1`` is plain weighted model averaging."""
    lr = np.float32(server_lr)
    return _stepper(name, weigh, (), lambda g, buffers: (lr * g, buffers))


def fedavgm(server_lr: float = 1.0, momentum: float = 0.9) -> Strategy:
    """Server momentum (Hsu et al. 2019): ``v = momentum * v + delta``; step ``server_lr * v``."""
    lr, beta = np.float32(server_lr), np.float32(momentum)

    def step(g, buffers):
        (v,) = buffers
        v = beta * v + g
        return lr * v, (v,)

    return _stepper("fedavgm", by_samples, (0.0,), step)


def fednova(server_lr: float = 1.0, local_momentum: float = 0.0) -> Strategy:
    """FedNova (Wang et al. 2020): device i's delta is divided by its effective number of local
    steps ``a_i`` and the mean is scaled back by ``sum p_i a_i``; with plain SGD ``a_i = tau_i``
    (its local steps), with momentum rho ``a_i = (tau_i - rho (1 - rho^tau_i) / (1 - rho)) / (1 - rho)``."""

    def weigh(samples: int, local_steps: int) -> tuple[float, float]:
        return float(samples), effective_steps(local_steps, local_momentum)

    return fedavg(server_lr, "fednova", weigh)


def fedadam(server_lr: float = 0.01, beta1: float = 0.9, beta2: float = 0.99, tau: float = 1e-3,
            yogi: bool = False) -> Strategy:
    """FedAdam / FedYogi (Reddi et al. 2021, Algorithm 2, no bias correction, v starts at tau^2):
    ``m = b1 m + (1 - b1) g``; Adam ``v = b2 v + (1 - b2) g^2``, Yogi
    ``v = v - (1 - b2) g^2 sign(v - g^2)``; step ``server_lr * m / (sqrt(v) + tau)``."""
    lr, b1, b2, eps = (np.float32(v) for v in (server_lr, beta1, beta2, tau))

    def step(g, buffers):
        m, v = buffers
        m = b1 * m + (1 - b1) * g
        g2 = g * g
        v = v - (1 - b2) * g2 * np.sign(v - g2) if yogi else b2 * v + (1 - b2) * g2
        return lr * m / (np.sqrt(v) + eps), (m, v)

    return _stepper("fedyogi" if yogi else "fedadam", by_samples, (0.0, tau * tau), step)


def fedadagrad(server_lr: float = 0.1, beta1: float = 0.0, tau: float = 1e-3) -> Strategy:
    """FedAdagrad (Reddi et al. 2021): ``m = b1 m + (1 - b1) g``, ``v = v + g^2``;
    step ``server_lr * m / (sqrt(v) + tau)``; v starts at tau^2."""
    lr, b1, eps = np.float32(server_lr), np.float32(beta1), np.float32(tau)

    def step(g, buffers):
        m, v = buffers
        m = b1 * m + (1 - b1) * g
        v = v + g * g
        return lr * m / (np.sqrt(v) + eps), (m, v)

    return _stepper("fedadagrad", by_samples, (0.0, tau * tau), step)


def scaffold(num_devices: int, server_lr: float = 1.0) -> Strategy:
    """SCAFFOLD (Karimireddy et al. 2020, option II): devices correct each gradient by ``c - c_i``
    and send the change of their control variate ``c_i``; the server steps by ``server_lr`` x the
    sample-weighted mean delta and moves ``c`` (``buffers[0]``) by the sum of the control changes
    divided by the number of devices ``N``."""
    lr = np.float32(server_lr)

    def control(own: np.ndarray, server: np.ndarray, delta: np.ndarray, scale: float) -> np.ndarray:
        """A device's new ``c_i = c_i - c + (x - y_i) / (K lr)``: ``-delta`` is ``x - y_i`` and
        ``scale`` is ``K lr``, K its effective plain-SGD steps."""
        return own - server - delta / np.float32(scale)

    def init(params: np.ndarray) -> ServerState:
        params = np.array(params, dtype=np.float32)
        return ServerState(params, 0, (np.zeros_like(params),))

    def apply(state: ServerState, partial: Partial) -> tuple[ServerState, dict[str, float]]:
        step = lr * partial.mean()
        control = state.buffers[0] + (partial.control_sum / num_devices).astype(np.float32)
        return (ServerState(state.params + step, state.round + 1, (control,)),
                {"update_norm": float(np.linalg.norm(step)), "control_norm": float(np.linalg.norm(control))})

    return Strategy("scaffold", init, by_samples, apply, control=control)


def robust_rule(name: str, rule: Callable[[np.ndarray], tuple[np.ndarray, list[int] | None]],
                server_lr: float = 1.0, bucket_size: int = 1) -> Strategy:
    """A robust aggregation ``rule(rows) -> (aggregate, flagged rows)`` with a plain server step;
    a rule that flags nothing per update returns None. With ``bucket_size > 1`` the rule sees the
    means of random buckets of that many deltas (drawn from ``reduce``'s rng), and flagging a
    bucket flags its updates. Diagnostics: ``flagged``, the number of flagged updates."""

    def reduce(deltas: np.ndarray, rng: np.random.Generator) -> tuple[Partial, dict[str, float], list[int]]:
        buckets = None
        if bucket_size > 1:
            deltas, buckets = robust.bucket_means(deltas, bucket_size, rng)
        aggregate, flagged = rule(deltas)
        if buckets is not None and flagged is not None:
            flagged = sorted(int(i) for b in flagged for i in buckets[b])
        partial = Partial(aggregate, weight=1.0, steps_weight=1.0, count=len(deltas))
        return partial, ({} if flagged is None else {"flagged": float(len(flagged))}), flagged or []

    return replace(fedavg(server_lr, name), reduce=reduce)


def median(server_lr: float = 1.0, bucket_size: int = 1) -> Strategy:
    """Coordinate-wise median; it flags no update as a whole."""
    return robust_rule("median", lambda d: (robust.coordinate_median(d), None), server_lr, bucket_size)


def trimmed_mean(beta: float, server_lr: float = 1.0, bucket_size: int = 1) -> Strategy:
    """Coordinate-wise trimmed mean; flags the updates trimmed at most (over half) of the coordinates."""

    def rule(deltas: np.ndarray) -> tuple[np.ndarray, list[int]]:
        mostly_trimmed = np.flatnonzero(robust.trimmed_share(deltas, beta) > 0.5)
        return robust.trimmed_mean(deltas, beta), mostly_trimmed.tolist()

    return robust_rule("trimmed_mean", rule, server_lr, bucket_size)


def krum(byzantine: int, selected: int | None, server_lr: float = 1.0, name: str = "multi_krum",
         bucket_size: int = 1) -> Strategy:
    """Multi-Krum with ``selected`` updates (default ``n - byzantine``); Krum when ``selected = 1``.
    Flags the updates left out."""

    def rule(deltas: np.ndarray) -> tuple[np.ndarray, list[int]]:
        m = selected if selected is not None else len(deltas) - byzantine
        aggregate, chosen = robust.multi_krum(deltas, byzantine, m)
        return aggregate, np.setdiff1d(np.arange(len(deltas)), chosen).tolist()

    return robust_rule(name, rule, server_lr, bucket_size)


def norm_bounded(strategy: Strategy, bound: float) -> Strategy:
    """``strategy`` with every delta clipped to L2 norm ``bound`` before it is folded or reduced."""

    def reduce(deltas: np.ndarray, rng: np.random.Generator) -> tuple[Partial, dict[str, float], list[int]]:
        return strategy.reduce(np.stack([robust.clip_to_norm(d, bound) for d in deltas]), rng)

    return replace(strategy, norm_bound=bound, reduce=reduce if strategy.reduce else None)


def staleness_weight(kind: str, a: float = 0.5, b: int = 4) -> Callable[[int], float]:
    """Xie et al. 2019's weight for an update ``t`` server steps stale: ``constant`` 1,
    ``polynomial`` ``(1 + t)^-a``, ``hinge`` 1 for ``t <= b`` else ``1 / (1 + a (t - b))``."""
    if kind == "constant":
        return lambda t: 1.0
    if kind == "polynomial":
        return lambda t: (1.0 + t) ** -a
    if kind == "hinge":
        return lambda t: 1.0 if t <= b else 1.0 / (1.0 + a * (t - b))
    raise ValueError(f"unknown staleness function {kind!r}; valid: constant, polynomial, hinge")


@dataclass(frozen=True)
class AsyncStrategy:
    """FedAsync and FedBuff. Up to ``concurrency`` devices train at once, each from the model
    current when it started. Every arriving delta is folded with weight ``weight(t)``, where ``t``
    is its staleness (server steps since its device started); after ``buffer_size`` arrivals the
    server steps by ``server_lr * sum weight(t_i) delta_i / buffer_size``. With ``mixing``
    (FedAsync, buffer 1) a delta is first rebased on the current model, so the step is
    ``x <- (1 - a) x + a x_local`` with ``a = server_lr * weight(t)``. Updates staler than
    ``max_staleness`` are dropped."""

    name: str
    buffer_size: int
    server_lr: float
    weight: Callable[[int], float]
    mixing: bool
    concurrency: int
    max_staleness: int | None = None
    # nothing asked of devices' training (class attributes, not fields)
    prox_mu, control, control_variates = 0.0, None, False

    def init(self, params: np.ndarray) -> ServerState:
        return ServerState(np.array(params, dtype=np.float32))

    def weigh(self, samples: int, local_steps: int) -> tuple[float, float]:
        """A fresh update's weight (every update counts alike before its staleness weight)."""
        return self.weight(0), 1.0

    def fold(self, partial: Partial, update: Update, staleness: int, drift: Callable[[], np.ndarray]) -> bool:
        """Fold an update trained ``staleness`` server steps ago into ``partial``, or return False
        if it is staler than ``max_staleness``. ``drift()`` is the model the device started from
        minus the current one (asked only to rebase a stale delta, and only by FedAsync)."""
        if self.max_staleness is not None and staleness > self.max_staleness:
            return False
        if self.mixing and staleness:
            update = replace(update, delta=update.delta + drift())
        partial.fold(update, self.weight(staleness))
        return True

    def apply(self, state: ServerState, partial: Partial) -> tuple[ServerState, dict[str, float]]:
        step = (self.server_lr / partial.count * partial.weighted_sum).astype(np.float32)
        return ServerState(state.params + step, state.round + 1), {"update_norm": float(np.linalg.norm(step))}


def build_async(spec, per_round: int) -> AsyncStrategy:
    """The FedAsync or FedBuff a job's ``strategy`` section names; ``per_round`` (devices.per_round)
    is the default concurrency."""
    concurrency = spec.devices_at_once(per_round)
    weight = staleness_weight(spec.staleness.kind, spec.staleness.a, spec.staleness.b)
    if spec.name == "fedasync":
        return AsyncStrategy("fedasync", 1, spec.alpha, weight, True, concurrency, spec.max_staleness)
    if spec.name == "fedbuff":
        return AsyncStrategy("fedbuff", spec.buffer(per_round), spec.server_lr, weight, False, concurrency,
                             spec.max_staleness)
    raise ValueError(f"unknown asynchronous strategy {spec.name!r}")


def for_job(job) -> Strategy | AsyncStrategy:
    """The server strategy of a job (a ``JobSpec``), synchronous or asynchronous. Under
    client-level DP every device's (clipped) delta counts once, whatever its samples."""
    if job.strategy.name in ASYNC_STRATEGIES:
        return build_async(job.strategy, job.devices.per_round)
    strategy = build(job.strategy, job.devices.local.momentum, job.devices.count)
    return strategy if client_level(job) is None else replace(strategy, weigh=unweighted)


def build(spec, local_momentum: float = 0.0, num_devices: int = 1) -> Strategy:
    """The strategy a job's ``strategy`` section names, norm-bounded if it sets ``norm_bound``.
    ``local_momentum`` is the devices' SGD momentum, which FedNova's normalization needs;
    ``num_devices`` (N) scales SCAFFOLD's control update."""
    strategy = _build(spec, local_momentum, num_devices)
    return norm_bounded(strategy, spec.norm_bound) if spec.norm_bound else strategy


def _build(spec, local_momentum: float, num_devices: int) -> Strategy:
    if spec.name == "scaffold":
        return scaffold(num_devices, spec.server_lr)
    if spec.name == "median":
        return median(spec.server_lr, spec.bucket_size)
    if spec.name == "trimmed_mean":
        return trimmed_mean(spec.beta, spec.server_lr, spec.bucket_size)
    if spec.name in ("krum", "multi_krum"):
        selected = 1 if spec.name == "krum" else spec.selected
        return krum(spec.byzantine, selected, spec.server_lr, spec.name, spec.bucket_size)
    if spec.name == "fedavg":
        return fedavg(spec.server_lr)
    if spec.name == "fedprox":  # its server half is FedAvg's
        return replace(fedavg(spec.server_lr, "fedprox"), prox_mu=spec.mu)
    if spec.name == "fedavgm":
        return fedavgm(spec.server_lr, spec.momentum)
    if spec.name == "fednova":
        return fednova(spec.server_lr, local_momentum)
    if spec.name in ("fedadam", "fedyogi"):
        return fedadam(spec.server_lr, spec.beta1, spec.beta2, spec.tau, yogi=spec.name == "fedyogi")
    if spec.name == "fedadagrad":
        return fedadagrad(spec.server_lr, spec.beta1, spec.tau)
    raise ValueError(f"unknown strategy {spec.name!r}")
