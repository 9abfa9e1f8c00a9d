"""Codecs for a device's update, the flat float32 delta: a chain of at most one sparsifier (top-k,
random-k) or factorizer (PowerSGD's low rank), one quantizer (stochastic ``bits``-bit, sign with
scale) and a lossless entropy coder, with error feedback. Pure NumPy: no Ray, no torch.

An encoded update is ``[entropy flag: 1 byte][gain: float32][body]``; the body, zlib-compressed
when the flag is 1, is ``[position bytes: uint32 length, then the bytes][the values, as the
quantizer writes them]``. The receiver knows the chain, the vector's shapes, the round and the
device, so it knows how many values and bytes to expect and checks each; nothing is unpickled and
a compressed body cannot inflate beyond its expected size. ``gain`` scales the decoded vector:
it is how a device clips what it sends (client-level DP) without encoding again.
"""

from __future__ import annotations

import math
import struct
import zlib
from dataclasses import dataclass
from typing import Any

import numpy as np

_HEAD = struct.Struct("<Bf")  # entropy flag, gain
_LENGTH = struct.Struct("<I")
_RANGE = struct.Struct("<ff")  # quantize: the lowest and highest level
_SCALE = struct.Struct("<f")  # sign: the magnitude


@dataclass(frozen=True)
class Chain:
    """The codecs for vectors of parameters shaped ``shapes``: ``sparsify`` (a ``TopK``,
    ``RandK`` or ``LowRank`` section, or None), ``quantize`` (``Quantize``, ``Sign`` or None) and
    ``entropy`` (``Entropy`` or None). ``seed`` (the job's) seeds random-k's coordinates and the
    low-rank power iteration; ``warmup_rounds`` ramps the sparsity."""

    shapes: tuple[tuple[int, ...], ...]
    sparsify: Any = None
    quantize: Any = None
    entropy: Any = None
    seed: int = 0
    warmup_rounds: int = 0

    @classmethod
    def of(cls, job, shapes, stages: list | None = None) -> Chain:
        """The chain of ``stages`` (default the job's ``compression.uplink``) for parameters of ``shapes``."""
        from fedray.config.compression import ORDER

        steps = {ORDER[s.kind]: s for s in (job.compression.uplink if stages is None else stages)}
        return cls(tuple(tuple(s) for s in shapes), steps.get(0), steps.get(1), steps.get(2), job.seed,
                   job.compression.warmup_rounds)

    @classmethod
    def uplink(cls, job, shapes) -> Chain | None:
        """The chain devices' updates go through in the clear; None without uplink codecs, or under
        encrypted aggregation, whose plan applies them inside the ciphertexts."""
        return cls.of(job, shapes) if job.compression and job.compression.uplink and job.secure is None else None

    @classmethod
    def edge(cls, job, size: int) -> Chain | None:
        """The chain an edge's sum of ``size`` values goes up through; None without edge codecs.
        Its codecs (quantize, entropy) do not depend on the parameters' shapes."""
        return cls.of(job, [(size,)], job.compression.edge) if job.compression and job.compression.edge else None

    @property
    def size(self) -> int:
        return sum(math.prod(s) for s in self.shapes)

    def kept(self, round: int) -> int:
        """How many coordinates top-k or random-k keep in ``round`` (1-based)."""
        return sum(self._blocks(round)[1])

    def _blocks(self, round: int) -> tuple[list[int], list[int]]:
        """Where the blocks top-k or random-k choose in start (top-k per layer: each parameter;
        else the whole vector), and how many coordinates each keeps in ``round``: their fraction,
        or during the warm-up ``fraction^(round / warmup_rounds)``."""
        fraction = self.sparsify.fraction
        if round < self.warmup_rounds:
            fraction = fraction ** (round / self.warmup_rounds)
        sizes = [math.prod(s) for s in self.shapes] if getattr(self.sparsify, "per_layer", False) else [self.size]
        return [0, *np.cumsum(sizes)[:-1].tolist()], [max(1, min(n, round_half_up(fraction * n))) for n in sizes]

    # the chain

    def encode(self, x: np.ndarray, round: int, device: int, rng: np.random.Generator) -> bytes:
        """``x`` (float32, the chain's size) encoded for ``round`` by ``device``; ``rng`` draws the
        quantizer's rounding."""
        positions, values = self._sparsify(np.asarray(x, dtype=np.float32), round, device)
        body = _LENGTH.pack(len(positions)) + positions + self._quantize(values, rng)
        entropy = self.entropy
        if entropy is not None and len(packed := zlib.compress(body, entropy.level)) < len(body):
            return _HEAD.pack(1, 1.0) + packed
        return _HEAD.pack(0, 1.0) + body

    def decode(self, blob: bytes, round: int, device: int) -> np.ndarray:
        """The float32 vector ``blob`` encodes; raises ValueError saying what is wrong with it."""
        blob = bytes(blob)
        if len(blob) < _HEAD.size:
            raise ValueError(f"compressed update of {len(blob)} bytes is shorter than its header")
        flag, gain = _HEAD.unpack_from(blob)
        body = blob[_HEAD.size:]
        if flag not in (0, 1) or not math.isfinite(gain):
            raise ValueError(f"compressed update has entropy flag {flag} and gain {gain}")
        if flag == 1:
            if self.entropy is None:
                raise ValueError("compressed update is entropy-coded, but the chain has no entropy stage")
            body = _inflate(body, self._most_bytes(round))
        if len(body) < _LENGTH.size:
            raise ValueError(f"compressed body of {len(body)} bytes is shorter than its header")
        (n,) = _LENGTH.unpack_from(body)
        positions, values = body[_LENGTH.size:_LENGTH.size + n], body[_LENGTH.size + n:]
        if len(positions) != n:
            raise ValueError(f"compressed body declares {n} position bytes but holds {len(positions)}")
        x = self._unsparsify(positions, self._dequantize(values, self._values(round)), round, device)
        return x * np.float32(gain) if gain != 1.0 else x

    def compress(self, x: np.ndarray, residual: np.ndarray | None, round: int, device: int,
                 rng: np.random.Generator, bound: float | None = None) -> tuple[bytes, np.ndarray, np.ndarray | None]:
        """Error feedback: encode ``x`` plus the ``residual`` the device kept (None: no error
        feedback), scaled down if need be so the decoded vector's norm is at most ``bound``;
        return the encoded bytes, the vector the receiver will decode and the new residual
        (``x + residual - sent``; None without error feedback)."""
        target = x if residual is None else x + residual
        body = self.encode(target, round, device, rng)
        sent = self.decode(body, round, device)
        norm = float(np.linalg.norm(sent.astype(np.float64)))
        gain = np.float32(bound / norm) if bound is not None and norm > bound else None
        while gain is not None:  # float32 rounding may leave the first gain a hair too large
            body = body[:1] + struct.pack("<f", gain) + body[_HEAD.size:]
            sent = self.decode(body, round, device)  # exactly what the receiver computes
            gain = np.nextafter(gain, np.float32(0)) if np.linalg.norm(sent.astype(np.float64)) > bound else None
        return body, sent, None if residual is None else (target - sent).astype(np.float32)

    # stage 0: which values are sent

    def _values(self, round: int) -> int:
        """How many values the quantizer carries in ``round``."""
        stage = self.sparsify
        if stage is None:
            return self.size
        if stage.kind == "lowrank":
            return _factored_size(self.shapes, stage.rank)
        return self.kept(round)

    def _most_bytes(self, round: int) -> int:
        """The largest body a valid update of ``round`` has (a bound for inflating)."""
        positions = 5 * self.kept(round) if self.sparsify is not None and self.sparsify.kind == "topk" else 0
        return _LENGTH.size + positions + _RANGE.size + 4 * self._values(round)

    def _coordinates(self, round: int, device: int, k: int) -> np.ndarray:
        """random-k's sorted coordinates: drawn from the job's seed and the round (and the device,
        unless ``shared``)."""
        shared = self.sparsify.shared
        rng = np.random.default_rng([self.seed, round, 11] if shared else [self.seed, round, device, 11])
        return np.sort(rng.choice(self.size, k, replace=False))

    def _sparsify(self, x: np.ndarray, round: int, device: int) -> tuple[bytes, np.ndarray]:
        stage = self.sparsify
        if stage is None:
            return b"", x
        if stage.kind == "lowrank":
            return b"", _factorize(x, self.shapes, stage.rank, np.random.default_rng([self.seed, round, device, 12]))
        if stage.kind == "randk":
            return b"", x[self._coordinates(round, device, self.kept(round))]
        starts, kept = self._blocks(round)
        index = np.concatenate([start + _largest(x[start:end], k) for start, end, k
                                in zip(starts, [*starts[1:], len(x)], kept)])
        return varint(np.diff(index, prepend=0)), x[index]

    def _unsparsify(self, positions: bytes, values: np.ndarray, round: int, device: int) -> np.ndarray:
        stage = self.sparsify
        if stage is not None and stage.kind == "topk" or positions:
            if stage is None or stage.kind != "topk":
                raise ValueError(f"compressed body holds {len(positions)} position bytes; this chain sends none")
            gaps = unvarint(positions)
            if len(gaps) != len(values) or len(gaps) and np.any(gaps[1:] == 0):
                raise ValueError(f"top-k positions: {len(gaps)} for {len(values)} values, or a position repeats")
            index = np.cumsum(gaps, dtype=np.uint64)
            if len(index) and index[-1] >= self.size:
                raise ValueError(f"top-k position {int(index[-1])} is beyond the vector's {self.size} values")
            out = np.zeros(self.size, dtype=np.float32)
            out[index.astype(np.int64)] = values
            return out
        if stage is None:
            return values
        if stage.kind == "lowrank":
            return _unfactorize(values, self.shapes, stage.rank)
        out = np.zeros(self.size, dtype=np.float32)
        out[self._coordinates(round, device, len(values))] = values
        return out

    # stage 1: how the values are written

    def _quantize(self, values: np.ndarray, rng: np.random.Generator) -> bytes:
        stage = self.quantize
        if stage is None:
            return values.astype("<f4").tobytes()
        if stage.kind == "sign":
            scale = float(np.mean(np.abs(values), dtype=np.float64)) if len(values) else 0.0
            return _SCALE.pack(scale) + np.packbits(values > 0).tobytes()
        lo, hi = (float(values.min()), float(values.max())) if len(values) else (0.0, 0.0)
        return _RANGE.pack(lo, hi) + pack_bits(stochastic_levels(values, lo, hi, stage.bits, rng), stage.bits)

    def _dequantize(self, data: bytes, count: int) -> np.ndarray:
        stage = self.quantize
        if stage is None:
            if len(data) != 4 * count:
                raise ValueError(f"{len(data)} value bytes for {count} float32 values")
            return np.frombuffer(data, dtype="<f4").astype(np.float32)
        if stage.kind == "sign":
            expected = _SCALE.size + -(-count // 8)
            if len(data) != expected:
                raise ValueError(f"{len(data)} value bytes for {count} signs (expected {expected})")
            (scale,) = _SCALE.unpack_from(data)
            signs = np.unpackbits(np.frombuffer(data, np.uint8, offset=_SCALE.size), count=count)
            return np.where(signs == 1, np.float32(scale), np.float32(-scale))
        expected = _RANGE.size + -(-count * stage.bits // 8)
        if len(data) != expected:
            raise ValueError(f"{len(data)} value bytes for {count} values of {stage.bits} bits (expected {expected})")
        lo, hi = _RANGE.unpack_from(data)
        if not (math.isfinite(lo) and math.isfinite(hi) and lo <= hi):
            raise ValueError(f"quantization range [{lo}, {hi}] is not a finite interval")
        levels = unpack_bits(data[_RANGE.size:], stage.bits, count)
        step = (hi - lo) / (2 ** stage.bits - 1)
        return (lo + levels * np.float64(step)).astype(np.float32)


def _largest(x: np.ndarray, k: int) -> np.ndarray:
    """The sorted positions of the ``k`` entries of ``x`` largest in magnitude."""
    return np.sort(np.argpartition(np.abs(x), len(x) - k)[len(x) - k:]) if k < len(x) else np.arange(len(x))


def round_half_up(value: float) -> int:
    return int(math.floor(value + 0.5))


def stochastic_levels(values: np.ndarray, lo: float, hi: float, bits: int, rng: np.random.Generator) -> np.ndarray:
    """Each value's level in ``0 .. 2^bits - 1`` over ``[lo, hi]``, rounded up with probability
    equal to its distance past the level below: ``lo + level x step`` is ``value`` in
    expectation."""
    top = 2 ** bits - 1
    if hi <= lo:
        return np.zeros(len(values), dtype=np.uint8)
    scaled = (values.astype(np.float64) - lo) * (top / (hi - lo))
    return np.clip(np.floor(scaled + rng.random(len(values))), 0, top).astype(np.uint8)


def pack_bits(levels: np.ndarray, bits: int) -> bytes:
    """``levels`` (each < 2^bits, bits in 1, 2, 4, 8), ``8 / bits`` to a byte, the first in the low bits."""
    per = 8 // bits
    padded = np.zeros(-(-len(levels) // per) * per, dtype=np.uint8)
    padded[:len(levels)] = levels
    shifts = np.arange(per, dtype=np.uint8) * bits
    return np.bitwise_or.reduce(padded.reshape(-1, per) << shifts, axis=1).astype(np.uint8).tobytes()


def unpack_bits(data: bytes, bits: int, count: int) -> np.ndarray:
    per, mask = 8 // bits, 2 ** bits - 1
    raw = np.frombuffer(data, dtype=np.uint8)
    shifts = np.arange(per, dtype=np.uint8) * bits
    return ((raw[:, None] >> shifts) & mask).reshape(-1)[:count].astype(np.float64)


def varint(values: np.ndarray) -> bytes:
    """Non-negative integers (< 2^35) as LEB128: 7 bits a byte, the high bit set on all but the last."""
    v = np.asarray(values, dtype=np.uint64)
    lengths = 1 + sum((v >= np.uint64(1 << (7 * j))).astype(np.int64) for j in range(1, 5))
    out = np.empty(int(lengths.sum()), dtype=np.uint8)
    starts = np.cumsum(lengths) - lengths
    for j in range(5):
        has = lengths > j
        byte = (v[has] >> np.uint64(7 * j)) & np.uint64(0x7F)
        out[starts[has] + j] = byte.astype(np.uint8) | ((lengths[has] > j + 1).astype(np.uint8) << 7)
    return out.tobytes()


def unvarint(data: bytes) -> np.ndarray:
    """The integers ``varint`` wrote; raises ValueError on a truncated or over-long number."""
    raw = np.frombuffer(data, dtype=np.uint8)
    ends = np.flatnonzero(raw < 0x80)
    if len(raw) and (not len(ends) or ends[-1] != len(raw) - 1):
        raise ValueError("top-k positions end inside a number")
    starts = np.concatenate([[0], ends[:-1] + 1]).astype(np.int64)
    lengths = ends - starts + 1
    if len(lengths) and lengths.max() > 5:
        raise ValueError("a top-k position is longer than 5 bytes")
    out = np.zeros(len(ends), dtype=np.uint64)
    for j in range(int(lengths.max()) if len(lengths) else 0):
        has = lengths > j
        out[has] |= (raw[starts[has] + j] & 0x7F).astype(np.uint64) << np.uint64(7 * j)
    return out


def _inflate(body: bytes, most: int) -> bytes:
    """zlib's output for ``body``, refused if it is not whole or longer than ``most`` bytes."""
    inflater = zlib.decompressobj()
    try:
        out = inflater.decompress(body, most + 1)
    except zlib.error as e:
        raise ValueError(f"entropy-coded body does not decode: {e}") from e
    if len(out) > most or not inflater.eof or inflater.unused_data:
        raise ValueError(f"entropy-coded body is not one zlib stream of at most {most} bytes")
    return out


def _matrix(shape: tuple[int, ...], rank: int) -> tuple[int, int] | None:
    """The (rows, columns) a parameter of ``shape`` is factorized as, or None when it goes whole
    (a vector, or a matrix its factors would not shrink)."""
    if len(shape) < 2:
        return None
    rows, cols = shape[0], math.prod(shape[1:])
    return (rows, cols) if rank * (rows + cols) < rows * cols else None


def _factored_size(shapes, rank: int) -> int:
    """How many values the factors (and the parameters that go whole) of ``shapes`` hold."""
    return sum(rank * sum(m) if (m := _matrix(s, rank)) else math.prod(s) for s in shapes)


def _factorize(x: np.ndarray, shapes, rank: int, rng: np.random.Generator) -> np.ndarray:
    """PowerSGD's one power iteration per matrix: ``P = orth(M Q)`` for a random ``Q``, then
    ``Q = M^T P``; ``P Q^T`` is ``M`` projected on P's span. Returns P and Q of each matrix and the
    other parameters' values, in order."""
    parts, offset = [], 0
    for shape in shapes:
        n = math.prod(shape)
        block = x[offset:offset + n].astype(np.float64)
        offset += n
        dims = _matrix(shape, rank)
        if dims is None:
            parts.append(block)
            continue
        m = block.reshape(dims)
        p, _ = np.linalg.qr(m @ rng.standard_normal((dims[1], rank)))
        parts += [p.ravel(), (m.T @ p).ravel()]
    return np.concatenate(parts).astype(np.float32)


def _unfactorize(values: np.ndarray, shapes, rank: int) -> np.ndarray:
    parts, offset = [], 0
    for shape in shapes:
        dims = _matrix(shape, rank)
        if dims is None:
            n = math.prod(shape)
            parts.append(values[offset:offset + n])
            offset += n
            continue
        (rows, cols) = dims
        p = values[offset:offset + rows * rank].reshape(rows, rank).astype(np.float64)
        q = values[offset + rows * rank:offset + rank * (rows + cols)].reshape(cols, rank).astype(np.float64)
        offset += rank * (rows + cols)
        parts.append((p @ q.T).ravel())
    return np.concatenate(parts).astype(np.float32)
