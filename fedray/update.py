"""Update: what a device sends up each round, its wire format and its validation.

The wire format is a 4-byte little-endian header length, a JSON header, then the raw float32
delta. It is decoded without unpickling, and ``len(payload)`` is the number of bytes uploaded.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass

import numpy as np

_HEADER_LEN = struct.Struct("<I")


@dataclass(frozen=True)
class Update:
    """One device's result for one round.

    ``delta`` is ``local - global`` of the federated parameters (float32, flat); ``num_samples`` is
    the number of local training samples; ``local_steps`` the optimizer steps taken; ``control``
    the change of the device's control variate (SCAFFOLD only), shaped like ``delta``. Under
    sample-level DP, ``epsilon`` is what the device has spent so far and ``epsilon_next`` what it
    would have spent after one more round like its last. Under adaptive clipping ``below_clip`` is
    +1/2 if the device's delta was within the clip bound, else -1/2 (plus its noise share when distributed).
    With encrypted aggregation, ``delta`` holds only the plaintext coordinates and ``sealed`` the
    encrypted rest (``fedray.secure``), which nobody but the key authority can read. Under
    compression, ``delta`` is the encoded bytes (uint8) until the receiver decodes it
    (``fedray.compression``), and ``residual_norm`` is the norm of what error feedback holds back.
    """

    device_id: int
    round: int
    num_samples: int
    local_steps: int
    train_loss: float
    delta: np.ndarray
    control: np.ndarray | None = None
    epsilon: float | None = None
    epsilon_next: float | None = None
    below_clip: float | None = None
    sealed: bytes | None = None
    residual_norm: float | None = None

    def to_bytes(self) -> bytes:
        header = {"device_id": self.device_id, "round": self.round, "num_samples": self.num_samples,
                  "local_steps": self.local_steps, "train_loss": self.train_loss,
                  "dtype": str(self.delta.dtype), "length": int(self.delta.size),
                  "control": 0 if self.control is None else int(self.control.size)}
        header |= {name: value for name in ("epsilon", "epsilon_next", "below_clip", "residual_norm")  # only when set: DP runs
                   if (value := getattr(self, name)) is not None}
        if self.sealed is not None:
            header["sealed"] = len(self.sealed)
        blob = json.dumps(header).encode()
        control = b"" if self.control is None else self.control.astype(np.float32).tobytes()
        return _HEADER_LEN.pack(len(blob)) + blob + self.delta.tobytes() + control + (self.sealed or b"")

    @classmethod
    def from_bytes(cls, payload: bytes) -> Update:
        """Decode a payload. Raises ValueError when it is malformed; the delta is not copied."""
        try:
            (n,) = _HEADER_LEN.unpack_from(payload)
            header = json.loads(payload[_HEADER_LEN.size:_HEADER_LEN.size + n])
            if not isinstance(header, dict):
                raise ValueError(f"header is a {type(header).__name__}, not an object")
            dtype, length = np.dtype(header.pop("dtype")), int(header.pop("length"))
            controls, sealed = int(header.pop("control")), int(header.pop("sealed", 0))
            offset = _HEADER_LEN.size + n
            if len(payload) - offset != length * dtype.itemsize + 4 * controls + sealed or min(sealed, controls) < 0:
                raise ValueError(f"payload holds {len(payload) - offset} bytes for {length} x {dtype}, {controls} "
                                 f"float32 control values and {sealed} encrypted bytes")
            delta = np.frombuffer(payload, dtype=dtype, count=length, offset=offset)
            control = (np.frombuffer(payload, dtype=np.float32, count=controls, offset=offset + length * dtype.itemsize)
                       if controls else None)
            return cls(delta=delta, control=control, sealed=payload[len(payload) - sealed:] if sealed else None, **header)
        except (struct.error, TypeError, KeyError, ValueError, OverflowError, RecursionError) as e:
            raise ValueError(f"malformed update payload: {e}") from e


def rejection_reason(update: Update, *, expected_device: int, expected_round: int, expected_size: int,
                     expected_samples: int, expect_control: bool = False, expect_sealed: bool = False) -> str | None:
    """Why ``update`` must not be aggregated, or None when it is valid. The encrypted part is
    checked where it is loaded (``CipherSum.add``) and, summed, by the key authority."""
    if update.device_id != expected_device:
        return f"update claims device {update.device_id}, expected device {expected_device}"
    if update.round != expected_round:
        return f"update is for round {update.round}, expected round {expected_round}"
    if update.delta.dtype != np.float32:
        return f"delta has dtype {update.delta.dtype}, expected float32"
    if update.delta.shape != (expected_size,):
        return f"delta has shape {update.delta.shape}, expected ({expected_size},)"
    for name in ("num_samples", "local_steps"):
        value = getattr(update, name)
        if type(value) is not int or value <= 0:
            return f"{name} is {value!r}, expected an integer > 0"
    if update.num_samples != expected_samples:
        return f"num_samples is {update.num_samples}, but the device holds {expected_samples} training samples"
    if not np.isfinite(update.delta).all():
        return f"delta has {int((~np.isfinite(update.delta)).sum())} non-finite values"
    if (update.sealed is not None) != expect_sealed:
        return "encrypted part missing" if expect_sealed else "unexpected encrypted part"
    if (update.control is not None) != expect_control:
        return "control variate missing" if expect_control else "unexpected control variate"
    if update.control is not None and (update.control.shape != update.delta.shape
                                       or not np.isfinite(update.control).all()):
        return f"control variate has shape {update.control.shape} or non-finite values"
    if type(update.train_loss) is not float or not math.isfinite(update.train_loss):
        return f"train_loss is {update.train_loss!r}, expected a finite number"
    if update.below_clip is not None and (type(update.below_clip) is not float or not math.isfinite(update.below_clip)):
        return f"below_clip is {update.below_clip!r}, expected a finite number"
    if (update.epsilon is None) != (update.epsilon_next is None):
        return "epsilon and epsilon_next come together"
    for name in ("epsilon", "epsilon_next", "residual_norm"):
        value = getattr(update, name)
        if value is not None and (type(value) is not float or not value >= 0 or not math.isfinite(value)):
            return f"{name} is {value!r}, expected a finite number >= 0"
    return None
