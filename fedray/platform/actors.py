"""ActorGroup: the actors of one kind in a run (device workers, edge aggregators).

Each member is spawned with its own options, is up once it has answered ``node_id``, and is
replaced (killed, spawned again, its generation counted) when it dies, hangs or its node is lost.
Calls are gathered by a deadline; results and failures come back as values, never as exceptions.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import ray
from ray.exceptions import GetTimeoutError, RayError, RayTaskError


class ActorGroup:
    """One actor per entry of ``placement`` (Ray options that place it: resources, labels,
    scheduling strategy), made by ``spawn(i, placement[i])``, an actor with a ``node_id`` method;
    ``name`` names a member in messages ("edge 2")."""

    def __init__(self, spawn: Callable[[int, dict[str, Any]], Any], placement: list[dict[str, Any]], name: str) -> None:
        self._spawn, self.placement, self.name = spawn, placement, name
        self.actors: list[Any] = [None] * len(placement)
        self.generation = [0] * len(placement)  # how many times each member was replaced
        self._started: dict[int, ray.ObjectRef] = {}  # member -> its node id, once it has started
        self._up: set[int] = set()
        for i in range(len(placement)):
            self._start(i)

    def _start(self, i: int) -> None:
        self.actors[i] = self._spawn(i, self.placement[i])
        self._started[i] = self.actors[i].node_id.remote()
        self._up.discard(i)

    def wait_started(self, wanted: int, timeout: float, hint: str = "") -> None:
        """Wait up to ``timeout`` seconds until ``wanted`` members have started. Raises
        RuntimeError saying how many did (and ``hint``), or a member's own error at start (a user
        model that does not import)."""
        started, _ = ray.wait(list(self._started.values()), num_returns=wanted, timeout=timeout)
        if len(started) < wanted:
            raise RuntimeError(f"{len(started)} of {len(self.actors)} {self.name}s started within {timeout:g}s"
                               + (f": {hint}" if hint else ""))
        ray.get(started)

    def up(self) -> set[int]:
        """The members that have started (checked without waiting)."""
        starting = {ref: i for i, ref in self._started.items() if i not in self._up}
        if starting:
            ready, _ = ray.wait(list(starting), num_returns=len(starting), timeout=0)
            self._up.update(starting[ref] for ref in ready)
        return self._up

    def nodes(self, timeout: float = 60) -> list[str | None]:
        """The node each member runs on, None for one not up within ``timeout`` seconds."""
        return node_ids(list(self._started.values()), timeout)

    def replace(self, i: int, generation: int | None = None) -> None:
        """Kill member ``i`` and spawn it again, unless ``generation`` is given and was already
        replaced. Calls pending on the old actor fail with it."""
        if generation is not None and generation != self.generation[i]:
            return
        ray.kill(self.actors[i], no_restart=True)
        self.generation[i] += 1
        self._start(i)

    def replace_lost(self) -> None:
        """Replace the members whose node has died (a member is otherwise found dead only when called)."""
        dead = {node["NodeID"] for node in ray.nodes() if not node["Alive"]}
        for i, node in enumerate(self.nodes(timeout=0)):
            if node in dead:
                self.replace(i)

    def down(self) -> dict[int, str]:
        """``{member: reason}`` for the members that cannot take a call now: not started yet, or
        dead (replaced here)."""
        down = {}
        for i, ref in self._started.items():
            if not finished([ref], 0):
                down[i] = f"{self.name} {i} is not up (starting, or waiting for a node: {self.placement[i] or 'any'})"
                continue
            try:
                ray.get(ref)
            except RayError as err:
                down[i] = f"{self.name} {i} died: {type(err).__name__}"
                self.replace(i)
        return down

    def gather(self, calls: dict[ray.ObjectRef, int], seconds: float) -> tuple[dict[int, Any], dict[int, str]]:
        """Wait up to ``seconds`` for ``calls`` (call -> member); return each answering member's
        value and ``{member: reason}`` for those that failed or did not answer, which are replaced."""
        values, failed = {}, {}
        until = time.monotonic() + seconds
        left = list(calls)
        while left and (remaining := until - time.monotonic()) > 0:
            for ref in finished(left, remaining):
                left.remove(ref)
                value, error, _ = result(ref)
                if error is None:
                    values[calls[ref]] = value
                else:
                    failed[calls[ref]] = f"{self.name} {calls[ref]} failed: {error}"
        failed |= {calls[ref]: f"{self.name} {calls[ref]} did not answer within {seconds:g}s" for ref in left}
        for i in failed:
            self.replace(i)
        return values, failed


def result(ref: ray.ObjectRef) -> tuple[Any, str | None, bool]:
    """A finished call's ``(value, None, False)``, or ``(None, error, lost)``: the call's own
    error (``lost`` False), or its actor's death (``lost`` True)."""
    try:
        return ray.get(ref), None, False
    except RayTaskError as e:
        return None, f"{type(e.cause).__name__}: {e.cause}", False
    except RayError as e:
        return None, f"{type(e).__name__}: {first_line(e)}", True


def finished(refs: list[ray.ObjectRef], timeout: float) -> list[ray.ObjectRef]:
    """Wait at most ``timeout`` seconds for one of ``refs`` to finish; return all that have."""
    ready, _ = ray.wait(refs, num_returns=1, timeout=max(0.0, timeout))
    if ready:
        ready, _ = ray.wait(refs, num_returns=len(refs), timeout=0)
    return ready


def node_ids(refs: list[ray.ObjectRef], timeout: float) -> list[str | None]:
    """What ``node_id`` calls ``refs`` answered; None for a call that failed or did not answer in time."""
    ray.wait(refs, num_returns=len(refs), timeout=timeout)
    answers = []
    for ref in refs:
        try:
            answers.append(ray.get(ref, timeout=0))
        except (GetTimeoutError, RayError):
            answers.append(None)
    return answers


def first_line(error: Exception) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else ""
