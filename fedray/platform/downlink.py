"""Downlink: the broadcast model sent as a compressed delta from what the devices hold."""

from __future__ import annotations

import numpy as np

from fedray.compression.codecs import Chain


class Downlink:
    """Each round ``chain`` encodes ``model - view`` and the message moves the ``view``, the model
    every device holds and trains from; what the message drops stays in ``model - view`` and goes
    out in later messages (the server keeps the error). A device that missed rounds applies every
    message since the last it applied (or downloads the whole view, when that is smaller), so all
    devices hold the same view, and the bytes counted are what each one downloads. ``start`` is the
    model every device starts with."""

    def __init__(self, chain: Chain, start: np.ndarray, devices: int, seed: int) -> None:
        self.chain, self.view, self.seed = chain, start.astype(np.float32), seed
        self.sizes: list[int] = []  # bytes of each round's message
        self.applied = np.zeros(devices, dtype=np.int64)  # messages each device has applied

    def send(self, model: np.ndarray, devices: np.ndarray) -> tuple[np.ndarray, list[int]]:
        """This round's message: the new view, and the bytes each of ``devices`` downloads to hold it."""
        number = len(self.sizes) + 1
        message = self.chain.encode(model - self.view, number, -1, np.random.default_rng([self.seed, number, 15]))
        self.view = self.view + self.chain.decode(message, number, -1)
        self.sizes.append(len(message))
        sent = np.concatenate([[0], np.cumsum(self.sizes)])
        downloads = [min(self.view.nbytes, int(sent[-1] - sent[self.applied[d]])) for d in devices]
        self.applied[devices] = number
        return self.view, downloads

    def state(self) -> dict:
        return {"view": self.view, "sizes": list(self.sizes), "applied": self.applied.tolist()}

    def restore(self, state: dict) -> None:
        self.view, self.sizes = np.asarray(state["view"], dtype=np.float32), list(state["sizes"])
        self.applied = np.asarray(state["applied"], dtype=np.int64)
