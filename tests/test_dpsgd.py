"""DP-SGD's per-sample clipping against its definition: one backward pass per sample, each sample's
whole gradient clipped to C, summed. No Ray."""

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from fedray.agents.dpsgd import PerSampleClipping
from fedray.models.zoo import build_model


class Mixed(nn.Module):
    """Every kind of layer the rules treat differently: Embedding, LayerNorm, GroupNorm, Conv1d
    (Opacus's per-sample rules), a Linear over sequences, a frozen Linear, and a layer left unused."""

    def __init__(self):
        super().__init__()
        self.embed, self.norm = nn.Embedding(30, 8), nn.LayerNorm(8)
        self.conv, self.group = nn.Conv1d(8, 6, 3, padding=1), nn.GroupNorm(2, 6)
        self.frozen, self.out, self.unused = nn.Linear(6, 6), nn.Linear(6, 5), nn.Linear(5, 5)
        self.frozen.requires_grad_(False)

    def forward(self, tokens):
        h = self.group(self.conv(self.norm(self.embed(tokens)).transpose(1, 2))).transpose(1, 2)
        return self.out(torch.tanh(self.frozen(h))).mean(1)


def clipped_sum_by_definition(model, x, y, clip):
    params = [p for p in model.parameters() if p.requires_grad]
    total = [torch.zeros_like(p) for p in params]
    for i in range(len(x)):
        grads = torch.autograd.grad(F.cross_entropy(model(x[i:i + 1]), y[i:i + 1]), params, allow_unused=True)
        grads = [torch.zeros_like(p) if g is None else g for g, p in zip(grads, params)]
        norm = float(torch.sqrt(sum((g * g).sum() for g in grads)))
        for t, g in zip(total, grads):
            t += min(1.0, clip / (norm + 1e-6)) * g
    return total


@pytest.mark.parametrize("name", ["cnn", "small_cnn", "mlp", "logreg", "mixed"])
def test_clipped_sum_equals_the_per_sample_definition(name):
    """The zoo's conv nets run in channels-last order, on which Opacus's own unfolding of conv
    inputs gives wrong per-sample norms; the clip bound is met on them too. In float64, so that
    the comparison is of the rule, not of float32's summation order (which varies by CPU)."""
    torch.manual_seed(0)
    if name == "mixed":
        model, x = Mixed().double(), torch.randint(0, 30, (8, 7))
    else:
        model, x = build_model(name, None, {}, (1, 28, 28), 5, 0).double(), torch.randn(8, 1, 28, 28, dtype=torch.float64) * 3
    y = torch.randint(0, 5, (8,))
    norms = []
    for i in range(len(x)):
        grads = torch.autograd.grad(F.cross_entropy(model(x[i:i + 1]), y[i:i + 1]),
                                    [p for p in model.parameters() if p.requires_grad], allow_unused=True)
        norms.append(float(torch.sqrt(sum((g * g).sum() for g in grads if g is not None))))
    clip = sorted(norms)[len(norms) // 2]  # half the samples are clipped
    expected = clipped_sum_by_definition(model, x, y, clip)
    with PerSampleClipping(model, clip) as clipping:
        clipping.backward(F.cross_entropy(model(x), y, reduction="none"))
    got = [p.grad for p in model.parameters() if p.requires_grad]
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, rtol=1e-9, atol=1e-12)
    assert all(p.grad is None for p in model.parameters() if not p.requires_grad)
    if name == "mixed":
        assert not model.unused.weight.grad.any()


def test_hooks_are_removed_and_an_empty_batch_gives_zero_gradients():
    model = nn.Linear(4, 3)
    with PerSampleClipping(model, 1.0) as clipping:
        clipping.backward(torch.zeros(0))
        assert not model.weight.grad.any() and not model.bias.grad.any()
    model(torch.randn(2, 4)).sum().backward()  # no hook left: an ordinary backward pass
    assert not clipping.calls


def test_what_per_sample_rules_cannot_see_through_is_refused():
    inplace = nn.Sequential(nn.Linear(4, 4), nn.ReLU(inplace=True), nn.Linear(4, 2))
    shared = nn.Linear(4, 4)
    x, y = torch.randn(3, 4), torch.tensor([0, 1, 0])
    with PerSampleClipping(inplace, 1.0) as clipping:
        with pytest.raises(ValueError, match="layer '0' is changed in place.*inplace=False"):
            clipping.backward(F.cross_entropy(inplace(x), y, reduction="none"))
    with PerSampleClipping(shared, 1.0) as clipping:
        with pytest.raises(ValueError, match="called more than once"):
            clipping.backward(F.cross_entropy(shared(shared(x))[:, :2], y, reduction="none"))


class Grid(nn.Module):
    """Layers whose per-sample rules were wrong before: a Linear over a 4-d input (a norm per
    position grid), convolutions with every padding_mode, 'same' padding, groups, 1-d and 3-d."""

    def __init__(self, mode):
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 3, padding=1, padding_mode=mode)
        self.grouped = nn.Conv2d(4, 4, 3, padding="same", groups=2, padding_mode=mode, dilation=2)
        self.line = nn.Conv1d(4, 3, 3, padding=2, padding_mode=mode, stride=2)
        self.cube = nn.Conv3d(1, 2, 2, padding=1, padding_mode=mode)
        self.mix = nn.Linear(6, 5)  # applied to (n, 3, 6, 6) activations: 3-d positions per sample
        self.out = nn.Linear(5 + 3 + 2, 4)

    def forward(self, x):
        h = torch.tanh(self.grouped(torch.tanh(self.conv(x))))  # (n, 4, 6, 6)
        line = self.line(h.mean(3)).mean(2)  # (n, 3)
        cube = self.cube(h[:, None, :, :3, :3]).flatten(2).mean(2)  # (n, 2)
        grid = self.mix(h[:, :3]).mean((1, 2))  # (n, 5)
        return self.out(torch.cat([grid, line, cube], 1))


@pytest.mark.parametrize("mode", ["zeros", "reflect", "replicate", "circular"])
def test_every_layer_type_is_clipped_by_its_definition(mode):
    """Each sample's whole gradient, over every trainable parameter, is clipped to C: Linear layers
    on 4-d inputs and convolutions with any padding_mode included, and a norm is computed for every
    trainable parameter."""
    torch.manual_seed(1)
    model, x, y = Grid(mode), torch.randn(6, 2, 6, 6) * 2, torch.randint(0, 4, (6,))
    params = [p for p in model.parameters() if p.requires_grad]
    norms = []
    for i in range(len(x)):
        grads = torch.autograd.grad(F.cross_entropy(model(x[i:i + 1]), y[i:i + 1]), params)
        norms.append(float(torch.sqrt(sum((g * g).sum() for g in grads))))
    clip = sorted(norms)[len(norms) // 2]
    expected = clipped_sum_by_definition(model, x, y, clip)
    with PerSampleClipping(model, clip) as clipping:
        clipping.backward(F.cross_entropy(model(x), y, reduction="none"))
    assert clipping.normed == set(params)
    for p, e in zip(params, expected):
        torch.testing.assert_close(p.grad, e, rtol=1e-4, atol=1e-6)


class Tied(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed, self.head = nn.Embedding(10, 4), nn.Linear(4, 3)

    def forward(self, tokens):  # the embedding matrix is used again outside its layer
        h = self.embed(tokens).mean(1)
        return self.head(h) + (h @ self.embed.weight.t())[:, :3]


def test_a_model_whose_gradients_escape_their_layer_is_refused_before_training():
    from fedray.agents.dpsgd import check

    with pytest.raises(ValueError, match="parameters embed.weight get gradient outside the layer"):
        check(Tied(), torch.randint(0, 10, (4, 5)), torch.tensor([0, 1, 2, 0]))
    check(Grid("reflect"), torch.randn(4, 2, 6, 6), torch.tensor([0, 1, 2, 3]))  # every parameter is covered
