"""Who talks to whom in peer-to-peer learning: communication graphs, their gossip (mixing) matrices
and how fast gossip over them reaches consensus. NumPy only: no Ray, no torch.

A graph is a symmetric boolean adjacency matrix without self-loops. Gossip mixes each agent's
vector with its neighbours' by a symmetric, doubly stochastic matrix ``W`` (Metropolis-Hastings
weights), so repeated mixing keeps the average and converges to it at the rate of ``W``'s second
largest eigenvalue modulus: the error shrinks by ``1 - spectral_gap`` per step.
"""

from __future__ import annotations

import numpy as np

DRAWS = 1000  # a random graph is drawn again until it is connected, at most this many times


def ring(n: int) -> np.ndarray:
    return circulant(n, 1)


def circulant(n: int, k: int) -> np.ndarray:
    """Each agent linked to the ``k`` nearest on each side of a ring (k=1: the ring)."""
    a = np.zeros((n, n), dtype=bool)
    for step in range(1, k + 1):
        a[np.arange(n), (np.arange(n) + step) % n] = True
    return a | a.T


def grid(rows: int, cols: int, wrap: bool) -> np.ndarray:
    """A ``rows x cols`` lattice, agent ``i`` at (i // cols, i % cols); ``wrap``: a torus."""
    n = rows * cols
    a = np.zeros((n, n), dtype=bool)
    for i in range(n):
        r, c = divmod(i, cols)
        for dr, dc in ((0, 1), (1, 0)):
            rr, cc = r + dr, c + dc
            if wrap:
                rr, cc = rr % rows, cc % cols
            if rr < rows and cc < cols and (rr, cc) != (r, c):
                a[i, rr * cols + cc] = a[rr * cols + cc, i] = True
    return a


def full(n: int) -> np.ndarray:
    return ~np.eye(n, dtype=bool)


def from_edges(n: int, edges: list[tuple[int, int]]) -> np.ndarray:
    a = np.zeros((n, n), dtype=bool)
    for i, j in edges:
        a[i, j] = a[j, i] = True
    return a


def random_regular(n: int, k: int, rng: np.random.Generator) -> np.ndarray:
    """A uniformly drawn connected ``k``-regular graph (pairing model: stubs paired at random,
    drawn again on a self-loop, a double edge or a disconnected graph)."""
    for _ in range(DRAWS):
        stubs = rng.permutation(np.repeat(np.arange(n), k)).reshape(-1, 2)
        if (stubs[:, 0] == stubs[:, 1]).any():
            continue
        a = from_edges(n, stubs.tolist())
        if a.sum() == n * k and connected(a):  # no edge twice
            return a
    raise ValueError(f"no connected {k}-regular graph over {n} agents in {DRAWS} draws")


def erdos_renyi(n: int, p: float, rng: np.random.Generator) -> np.ndarray:
    """G(n, p), drawn again until connected."""
    for _ in range(DRAWS):
        upper = np.triu(rng.random((n, n)) < p, 1)
        a = upper | upper.T
        if connected(a):
            return a
    raise ValueError(f"Erdős–Rényi graphs over {n} agents with edge probability {p:g} were not connected in "
                     f"{DRAWS} draws; raise the probability (connected almost surely above ln(n)/n = {np.log(n) / n:.3f})")


def small_world(n: int, k: int, beta: float, rng: np.random.Generator) -> np.ndarray:
    """Watts–Strogatz: the ring lattice of ``k`` neighbours each side, each edge's far end rewired
    to a uniformly drawn agent with chance ``beta`` (never a self-loop or a double edge); drawn
    again until connected."""
    for _ in range(DRAWS):
        a = circulant(n, k)
        for step in range(1, k + 1):
            for i in range(n):
                j = (i + step) % n
                if rng.random() >= beta or not a[i, j]:
                    continue
                free = np.flatnonzero(~a[i] & (np.arange(n) != i))
                if len(free):
                    new = rng.choice(free)
                    a[i, j] = a[j, i] = False
                    a[i, new] = a[new, i] = True
        if connected(a):
            return a
    raise ValueError(f"no connected small-world graph over {n} agents (k={k}, beta={beta:g}) in {DRAWS} draws")


def random_matching(n: int, rng: np.random.Generator) -> np.ndarray:
    """A uniformly drawn perfect matching (one agent left out when ``n`` is odd): one round of a
    time-varying topology."""
    pairs = rng.permutation(n)[: n - n % 2].reshape(-1, 2)
    return from_edges(n, pairs.tolist())


def connected(a: np.ndarray) -> bool:
    seen = np.zeros(len(a), dtype=bool)
    seen[0], frontier = True, [0]
    while frontier:
        reached = a[frontier].any(axis=0) & ~seen
        seen |= reached
        frontier = np.flatnonzero(reached).tolist()
    return bool(seen.all())


def metropolis_hastings(a: np.ndarray) -> np.ndarray:
    """Gossip weights ``W_ij = 1 / (1 + max(d_i, d_j))`` on each edge, the rest of each row on the
    diagonal: symmetric and doubly stochastic for any graph."""
    degree = a.sum(axis=1)
    w = np.where(a, 1.0 / (1.0 + np.maximum.outer(degree, degree)), 0.0)
    w[np.diag_indices_from(w)] = 1.0 - w.sum(axis=1)
    return w


def without(w: np.ndarray, absent: np.ndarray) -> np.ndarray:
    """``w`` with the agents ``absent`` (a boolean mask) left out of this exchange: each link to
    or from one of them is dropped and its weight stays with the agent on the other end (an absent
    agent keeps its own vector). Still symmetric and doubly stochastic: the average is kept."""
    cut = np.outer(absent, np.ones(len(w), dtype=bool))
    cut = (cut | cut.T) & ~np.eye(len(w), dtype=bool)
    kept = np.where(cut, 0.0, w)
    kept[np.diag_indices_from(kept)] += w.sum(axis=1) - kept.sum(axis=1)
    return kept


def spectral_gap(w: np.ndarray) -> float:
    """``1 - |lambda_2|``: one minus the second largest eigenvalue modulus of the symmetric ``w``
    (0: gossip never reaches consensus; 1: one step does)."""
    moduli = np.sort(np.abs(np.linalg.eigvalsh(w)))
    return float(1.0 - moduli[-2]) if len(w) > 1 else 1.0


def matching_gap(n: int) -> float:
    """The spectral gap of the expected gossip matrix of a random matching where each pair
    averages (W = I - L/2, L the matching's Laplacian; W is a projection, so E[W'W] = E[W] sets the
    rate). Each pair meets with chance q = 1/(n-1) (n even) or 1/n (n odd: one agent sits out), so
    E[W] = I - q L_full / 2, whose eigenvalues off the all-ones vector are 1 - q n / 2."""
    q = 1 / (n - 1) if n % 2 == 0 else 1 / n
    return q * n / 2
