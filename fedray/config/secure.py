"""The ``secure`` section: homomorphically encrypted aggregation, with CKKS (TenSEAL) or Paillier
(python-paillier, for small models).

Devices quantize their pre-weighted update to signed fixed point, pack several values into each
plaintext slot (with headroom for the sum) and encrypt; aggregators only add ciphertexts; a key
authority decrypts sums of at least ``min_clients`` devices. The checks against the rest of the
job live in ``check``; the packing arithmetic (capacity, headroom, noise floor) in
``fedray.secure.packing``.
"""

from __future__ import annotations

import math

from typing import Annotated, Literal, NamedTuple

from pydantic import Field, model_validator

from fedray.config.base import AsTuple, PositiveFloat, PositiveInt, Section
from fedray.config.strategy import ROBUST_STRATEGIES

# the largest total coefficient modulus (bits) for 128-bit classical security, by polynomial
# modulus degree N (HomomorphicEncryption.org security standard, 2018, ternary secrets)
SECURITY_BITS = {2048: 54, 4096: 109, 8192: 218, 16384: 438, 32768: 881}

# preset -> (poly_modulus_degree, coeff_mod_bit_sizes, scale_bits, values_per_slot). Adding never
# rescales, so one data prime (the first) and the special prime for key switching are enough: a
# ciphertext holds one 64-bit word per coefficient, 32 bytes per slot.
PRESETS = {
    "fast": (4096, (60, 40), 20, 3),
    "balanced": (4096, (60, 40), 20, 2),
    "precise": (8192, (60, 40), 20, 1),
}


TAG_BITS = 64  # a ciphertext's tag digits span at least this many secret bits: a forger guesses with odds 2^-64
MIN_VALUE_BITS = 8  # fewer bits per value would quantize updates too coarsely to be useful
DOUBLE_BITS = 46  # CKKS decodes through double precision: beyond |value| ~ 2^47 rounding errors reach 0.5


def capacity(moduli: tuple[int, ...], scale_bits: int) -> int:
    """Bits of the signed integer one slot holds, ``|P| < 2^(capacity - 1)``: the data primes (all
    but the last, the special prime) above the scale, within what double precision decodes, less a
    bit of margin."""
    return min(sum(moduli[:-1]) - scale_bits, DOUBLE_BITS) - 1


def headroom(contributions: int) -> int:
    """Bits a field needs above a value's so that the sum of ``contributions`` values fits."""
    return math.ceil(math.log2(contributions)) if contributions > 1 else 0


def noise_floor_bits(degree: int, contributions: int) -> int:
    """The smallest log2 scale at which a sum of ``contributions`` fresh ciphertexts still decrypts
    to the right integers: a fresh public-key encryption's error has standard deviation about
    ``degree / 6`` in units of the scale (measured: 685, 1368, 2721 at N = 4096, 8192, 16384), a sum
    of n has sqrt(n) times that, and 8 standard deviations must stay under 1/2."""
    return math.ceil(math.log2(16 * degree / 6 * math.sqrt(contributions)))


def tag_fields(value_bits: int) -> int:
    """Fields a ciphertext's tag takes: digits of ``value_bits - 1`` secret bits, ``TAG_BITS`` in all."""
    return math.ceil(TAG_BITS / max(1, value_bits - 1))


class Fields(NamedTuple):
    """How a scheme's plaintexts hold values: ``slots`` per ciphertext, ``per_slot`` fields of
    ``field_bits`` in each, values of ``value_bits`` (sign included), ``tag_fields`` for the tag."""

    slots: int
    per_slot: int
    field_bits: int
    value_bits: int
    tag_fields: int


class _Secure(Section):
    range: PositiveFloat | None = Field(None, description="each encrypted value, (w / a) / max w x delta, is "
                                                          "clipped to +-range (default 1.0; under client-level DP "
                                                          "the clip plus 6 std of a noise share)")
    min_clients: Annotated[int, Field(ge=2)] = Field(3, description="the fewest devices a decrypted sum holds: "
                                                                     "3 keeps one device colluding with an "
                                                                     "aggregator from isolating another's update")
    encrypt: Annotated[tuple[str, ...], AsTuple] = Field(("*",), min_length=1, description="parameter-name patterns (fnmatch) to "
                                                                        "encrypt; the rest is summed in plaintext")


class CKKSSpec(_Secure):
    """CKKS (TenSEAL): a ``preset`` (``fast``: 3 values per slot, ``balanced``: 2, ``precise``: 1),
    with any of ``poly_modulus_degree``, ``coeff_mod_bit_sizes``, ``scale_bits`` (log2 of the
    scale) and ``values_per_slot`` set to override it; the bits of each value follow from them."""

    scheme: Literal["ckks"]
    preset: Literal["fast", "balanced", "precise"] = "balanced"
    poly_modulus_degree: Literal[2048, 4096, 8192, 16384, 32768] | None = None
    coeff_mod_bit_sizes: Annotated[tuple[Annotated[int, Field(ge=20, le=60)], ...], AsTuple] | None = None
    scale_bits: Annotated[int, Field(ge=1, le=59)] | None = None
    values_per_slot: PositiveInt | None = None

    @model_validator(mode="after")
    def _check(self) -> CKKSSpec:
        n, moduli = self.degree, self.moduli
        if len(moduli) < 2:
            raise ValueError("secure.coeff_mod_bit_sizes needs at least two primes: the data prime(s) and the "
                             "special prime that TenSEAL's key switching keys need")
        if sum(moduli) > SECURITY_BITS[n]:
            raise ValueError(f"secure.coeff_mod_bit_sizes {list(moduli)} total {sum(moduli)} bits, over the "
                             f"{SECURITY_BITS[n]} bits that keep 128-bit security at poly_modulus_degree {n}")
        return self

    def _param(self, name: str, index: int):
        value = getattr(self, name)
        return PRESETS[self.preset][index] if value is None else value

    @property
    def degree(self) -> int:
        return self._param("poly_modulus_degree", 0)

    @property
    def moduli(self) -> tuple[int, ...]:
        return self._param("coeff_mod_bit_sizes", 1)

    @property
    def scale(self) -> int:
        return self._param("scale_bits", 2)

    @property
    def keys(self) -> dict:
        """What the key authority makes its context from."""
        return {"degree": self.degree, "moduli": self.moduli, "scale_bits": self.scale}

    def fields(self, contributions: int, value_bits: int | None = None) -> Fields:
        """Values per slot as set, each field a share of the slot's capacity; or, for values of
        ``value_bits`` (a quantize codec's), as many fields of those bits plus the headroom as a
        slot holds. The tag in the first fields of each ciphertext (``TAG_BITS`` secret bits)."""
        if value_bits is None:
            per_slot = self._param("values_per_slot", 3)
            field = capacity(self.moduli, self.scale) // per_slot
            value_bits = field - headroom(contributions)
        else:
            field = value_bits + headroom(contributions)
            per_slot = capacity(self.moduli, self.scale) // field
        return Fields(self.degree // 2, per_slot, field, value_bits, tag_fields(value_bits))


class PaillierSpec(_Secure):
    """Paillier (python-paillier): one ciphertext per ``key_bits - 2`` bits of packed values, each of
    ``value_bits`` (sign included) plus the sum's headroom. For small models: an encryption takes
    milliseconds. A 3072-bit modulus gives about 128-bit security, 2048 about 112 (NIST SP 800-57)."""

    scheme: Literal["paillier"]
    key_bits: Literal[2048, 3072] = 3072
    value_bits: Annotated[int, Field(ge=8, le=48)] = 24

    @property
    def keys(self) -> dict:
        """What the key authority makes its key pair from."""
        return {"key_bits": self.key_bits}

    def fields(self, contributions: int, value_bits: int | None = None) -> Fields:
        """As set, or for values of ``value_bits`` (a quantize codec's)."""
        value_bits = value_bits or self.value_bits
        field = value_bits + headroom(contributions)
        return Fields(1, (self.key_bits - 2) // field, field, value_bits, tag_fields(value_bits))


SecureSpec = Annotated[CKKSSpec | PaillierSpec, Field(discriminator="scheme")]


def max_contributions(job) -> int:
    """The most device updates one encrypted sum can hold: the buffer (FedBuff), every device
    (Poisson-sampled rounds under client-level DP), or a round's sample plus the late updates it
    takes in."""
    if job.strategy.name == "fedbuff":
        return job.strategy.buffer(job.devices.per_round)
    if job.privacy is not None and job.privacy.level == "client":
        return job.devices.count
    return job.devices.per_round * (2 if job.devices.late == "next_round" else 1)


def quantized_bits(job) -> int | None:
    """The bits of the uplink's quantize codec, which under encryption set the bits of each value."""
    stages = job.compression.uplink if job.compression else []
    return next((s.bits for s in stages if s.kind == "quantize"), None)


def value_range(job, clip: float | None = None) -> float:
    """The bound on an encrypted value: ``secure.range``; by default 1.0, or under client-level DP
    the round's clip bound (``clip``, default ``privacy.clip``) plus six standard deviations of a
    device's noise share."""
    if job.secure.range is not None:
        return job.secure.range
    privacy = job.privacy
    if privacy is None or privacy.level != "client":
        return 1.0
    from fedray.config.privacy import delta_noise_multiplier, min_participants, share_std

    clip = clip or privacy.clip
    if privacy.mode == "central":
        return clip
    return clip + 6 * share_std(delta_noise_multiplier(job), clip, min_participants(job))


def check(job) -> None:
    """What encrypted aggregation cannot do, and parameters that cannot hold the values; raises
    ValueError naming the field."""
    spec, name = job.secure, job.strategy.name
    if name in ROBUST_STRATEGIES:
        raise ValueError(f"secure: strategy {name} is not a sum; it needs every update in the clear, and "
                         "aggregators only see ciphertexts (use a linear strategy)")
    if name == "fedasync":
        raise ValueError("secure: strategy fedasync mixes each single update into the model, which would "
                         "decrypt one device's update (use fedbuff with buffer_size >= secure.min_clients)")
    if name == "scaffold":
        raise ValueError("secure: strategy scaffold sends control variates that are not encrypted "
                         "(use fedavg, fedprox, fednova or a server optimizer)")
    if name == "fedbuff" and job.strategy.staleness.kind != "constant":
        raise ValueError("secure: strategy fedbuff weights each update by its staleness, which aggregators "
                         "cannot apply to ciphertexts; set strategy.staleness.kind constant "
                         "(strategy.max_staleness still drops old updates)")
    if getattr(job.strategy, "norm_bound", None) is not None:
        raise ValueError("secure: strategy.norm_bound clips updates at the aggregator, which sees only "
                         "ciphertexts")
    if job.topology is not None and job.topology.edge_rounds > 1:
        raise ValueError("secure: topology.edge_rounds > 1 (HierFAVG) averages into an edge model that the "
                         "edge would have to decrypt (use edge_rounds 1)")
    most = max_contributions(job)
    if spec.min_clients > most:
        raise ValueError(f"secure.min_clients ({spec.min_clients}) exceeds the most updates one sum can hold "
                         f"({most}), so nothing could ever be decrypted")
    bits = quantized_bits(job)
    fields = spec.fields(most, bits)
    if spec.scheme == "paillier":
        if fields.per_slot <= fields.tag_fields:
            raise ValueError(f"secure.value_bits {spec.value_bits}: {fields.field_bits}-bit fields leave no room "
                             f"for values beside the tag in a {spec.key_bits}-bit plaintext")
        return
    if bits is None and fields.value_bits < MIN_VALUE_BITS:
        raise ValueError(f"secure.scale_bits {spec.scale} leaves {capacity(spec.moduli, spec.scale)} bits per slot: {fields.per_slot} "
                         f"values of {fields.field_bits} bits, {headroom(most)} of them headroom "
                         f"for {most} updates, leave {fields.value_bits} bits per value (at least "
                         f"{MIN_VALUE_BITS}); lower values_per_slot or scale_bits")
    floor = noise_floor_bits(spec.degree, most)
    if spec.scale < floor:
        raise ValueError(f"secure.scale_bits {spec.scale} is below the noise of a sum of {most} ciphertexts at "
                         f"poly_modulus_degree {spec.degree}: decryption could round wrongly (needs >= {floor})")
