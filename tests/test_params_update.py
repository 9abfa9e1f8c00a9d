import numpy as np
import pytest
import torch

from fedray.models.params import ParamSpec
from fedray.models.zoo import build_model
from fedray.update import Update, rejection_reason


def test_flatten_load_round_trip_in_named_parameter_order():
    model = build_model("cnn", None, {}, (1, 28, 28), 10, seed=0)
    spec = ParamSpec.of(model)
    flat = spec.flatten(model)
    assert flat.dtype == np.float32 and flat.shape == (spec.size,)
    assert spec.size == sum(p.numel() for p in model.parameters())
    first = next(model.parameters())
    np.testing.assert_array_equal(flat[: first.numel()], first.detach().numpy().ravel())
    other = build_model("cnn", None, {}, (1, 28, 28), 10, seed=1)
    assert not np.array_equal(ParamSpec.of(other).flatten(other), flat)
    spec.load(other, flat)
    np.testing.assert_array_equal(spec.flatten(other), flat)


def test_frozen_parameters_are_not_federated():
    model = build_model("mlp", None, {"hidden": [8]}, (4,), 3, seed=0)
    model[1].weight.requires_grad_(False)
    spec = ParamSpec.of(model)
    assert "1.weight" not in spec.names and spec.size == 8 + 8 * 3 + 3


def test_load_rejects_wrong_size_and_accepts_read_only():
    model = build_model("logreg", None, {}, (4,), 3, seed=0)
    spec = ParamSpec.of(model)
    with pytest.raises(ValueError, match=r"expected \(15,\)"):
        spec.load(model, np.zeros(14, np.float32))
    vec = np.arange(15, dtype=np.float32)
    vec.flags.writeable = False
    spec.load(model, vec)
    assert torch.equal(model[1].bias.detach(), torch.tensor([12.0, 13.0, 14.0]))


def test_same_seed_same_model():
    a, b = (build_model("small_cnn", None, {}, (1, 8, 8), 10, seed=5) for _ in range(2))
    np.testing.assert_array_equal(ParamSpec.of(a).flatten(a), ParamSpec.of(b).flatten(b))


def update(**kw):
    fields = dict(device_id=3, round=2, num_samples=10, local_steps=4, train_loss=0.5,
                  delta=np.arange(5, dtype=np.float32))
    fields.update(kw)
    return Update(**fields)


def test_update_wire_round_trip_counts_bytes():
    u = update()
    payload = u.to_bytes()
    back = Update.from_bytes(payload)
    assert (back.device_id, back.round, back.num_samples, back.local_steps, back.train_loss) == (3, 2, 10, 4, 0.5)
    np.testing.assert_array_equal(back.delta, u.delta)
    assert len(payload) > u.delta.nbytes and len(payload) < u.delta.nbytes + 200
    private = Update.from_bytes(update(epsilon=1.25, epsilon_next=1.5).to_bytes())
    assert (back.epsilon, private.epsilon, private.epsilon_next) == (None, 1.25, 1.5)


def _patched(offset: int, value: bytes) -> bytes:
    good = update().to_bytes()
    return good[:offset] + value + good[offset + len(value):]


@pytest.mark.parametrize("payload, needle", [
    (b"", "at least 38 bytes"),
    (update().to_bytes()[:20], "at least 38 bytes"),
    (update().to_bytes()[:-4], "payload holds 16 bytes for 5 x float32"),
    (update().to_bytes() + b"\0", "payload holds 21 bytes"),
    (_patched(24, b"O"), "object dtype"),  # the delta's dtype
    (_patched(24, b"\xff"), "codec can't decode"),
    (_patched(25, b"\xff\xff\xff\x7f"), "for 2147483647 x float32"),  # the delta's length
    (_patched(37, b"\x10"), "unknown flags 0x10"),
    (_patched(37, b"\x01"), "payload holds 12 bytes"),  # says an epsilon follows: the delta is 8 bytes short
])
def test_malformed_payload_raises(payload, needle):
    with pytest.raises(ValueError, match="malformed update payload") as e:
        Update.from_bytes(payload)
    assert needle in str(e.value)


def test_update_header_is_small_and_binary():
    u = update(delta=np.zeros(0, np.uint8), residual_norm=0.5)
    assert len(u.to_bytes()) == 38 + 8  # a compressed update's few hundred bytes are not its header's
    assert Update.from_bytes(u.to_bytes()).residual_norm == 0.5


@pytest.mark.parametrize("u, needle", [
    (update(round=1), "for round 1, expected round 2"),
    (update(device_id=4), "claims device 4"),
    (update(delta=np.zeros(4, np.float32)), "shape (4,)"),
    (update(delta=np.zeros(5, np.float64)), "dtype float64"),
    (update(delta=np.array([0, np.nan, np.inf, 1, 2], np.float32)), "2 non-finite"),
    (update(num_samples=0), "num_samples is 0"),
    (update(num_samples=10**30), "but the device holds 10 training samples"),
    (update(train_loss=10**400), "train_loss is 1000"),
    (update(num_samples=2.5), "num_samples is 2.5"),
    (update(local_steps=True), "local_steps is True"),
    (update(train_loss=float("nan")), "train_loss is nan"),
    (update(epsilon=1.0), "epsilon and epsilon_next come together"),
    (update(epsilon=-1.0, epsilon_next=2.0), "epsilon is -1.0, expected a finite number >= 0"),
    (update(epsilon=1.0, epsilon_next=float("inf")), "epsilon_next is inf"),
    (update(epsilon="1", epsilon_next=2.0), "epsilon is '1'"),
    (update(below_clip=float("nan")), "below_clip is nan"),
])
def test_rejection_reasons(u, needle):
    reason = rejection_reason(u, expected_device=3, expected_round=2, expected_size=5, expected_samples=10)
    assert reason is not None and needle in reason


def test_valid_update_is_accepted():
    assert rejection_reason(update(), expected_device=3, expected_round=2, expected_size=5, expected_samples=10) is None


def test_update_with_control_round_trip_and_checks():
    u = update(control=np.full(5, 0.5, np.float32))
    back = Update.from_bytes(u.to_bytes())
    np.testing.assert_array_equal(back.control, u.control)
    np.testing.assert_array_equal(back.delta, u.delta)
    kwargs = dict(expected_device=3, expected_round=2, expected_size=5, expected_samples=10)
    assert rejection_reason(back, **kwargs, expect_control=True) is None
    assert "unexpected control variate" in rejection_reason(back, **kwargs)
    assert "control variate missing" in rejection_reason(update(), **kwargs, expect_control=True)
    bad = update(control=np.array([0, 0, np.nan, 0, 0], np.float32))
    assert "non-finite" in rejection_reason(bad, **kwargs, expect_control=True)
