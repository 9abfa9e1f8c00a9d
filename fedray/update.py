"""Update: what a device sends up each round, its wire format and its validation.

The wire format is a fixed little-endian binary header (38 bytes: the counts, the loss, the delta's
dtype and length, the sizes of the control variate and the encrypted part, and a flag per optional
number), the optional numbers present (float64 each), then the raw delta, the control variate and
the encrypted bytes. It is decoded without unpickling, and ``len(payload)`` is the number of bytes
uploaded: a compressed update of a few hundred bytes is not dominated by its header.
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass

import numpy as np

_HEADER = struct.Struct("<IIIIdcIIIB")  # device, round, samples, steps, loss, dtype, length, control, sealed, flags
_OPTIONAL = ("epsilon", "epsilon_next", "below_clip", "residual_norm")  # float64 after the header, flag bit i
_NUMBER = struct.Struct("<d")


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
        present = [(i, value) for i, name in enumerate(_OPTIONAL) if (value := getattr(self, name)) is not None]
        control = b"" if self.control is None else self.control.astype(np.float32).tobytes()
        header = _HEADER.pack(self.device_id, self.round, self.num_samples, self.local_steps, self.train_loss,
                              self.delta.dtype.char.encode(), self.delta.size, len(control) // 4,
                              len(self.sealed or b""), sum(1 << i for i, _ in present))
        numbers = b"".join(_NUMBER.pack(value) for _, value in present)
        return header + numbers + self.delta.tobytes() + control + (self.sealed or b"")

    @classmethod
    def from_bytes(cls, payload: bytes) -> Update:
        """Decode a payload. Raises ValueError when it is malformed; the delta is not copied."""
        try:
            (device_id, round, num_samples, local_steps, train_loss, char, length, controls, sealed,
             flags) = _HEADER.unpack_from(payload)
            if flags >> len(_OPTIONAL):
                raise ValueError(f"unknown flags {flags:#x}")
            dtype = np.dtype(char.decode())
            if dtype.hasobject:
                raise ValueError("an object dtype")
            present = [name for i, name in enumerate(_OPTIONAL) if flags >> i & 1]
            offset = _HEADER.size + _NUMBER.size * len(present)
            optional = {name: _NUMBER.unpack_from(payload, _HEADER.size + _NUMBER.size * i)[0]
                        for i, name in enumerate(present)}
            if len(payload) - offset != length * dtype.itemsize + 4 * controls + sealed:
                raise ValueError(f"payload holds {len(payload) - offset} bytes for {length} x {dtype}, {controls} "
                                 f"float32 control values and {sealed} encrypted bytes")
            delta = np.frombuffer(payload, dtype=dtype, count=length, offset=offset)
            control = (np.frombuffer(payload, dtype=np.float32, count=controls, offset=offset + length * dtype.itemsize)
                       if controls else None)
            return cls(device_id, round, num_samples, local_steps, train_loss, delta, control,
                       sealed=payload[len(payload) - sealed:] if sealed else None, **optional)
        except (struct.error, TypeError, UnicodeDecodeError, ValueError) as e:
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
