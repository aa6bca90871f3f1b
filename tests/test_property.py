"""Property-based: random architectures built from the hard pieces, pruned with random plans,
must stay mask-equivalent (and, for a sample, agree with ONNX Runtime)."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fxprune


def conv_bn(cin, cout, k=3, groups=1):
    return nn.Sequential(nn.Conv2d(cin, cout, k, padding=k // 2, groups=groups, bias=False), nn.BatchNorm2d(cout), nn.ReLU())


class ResidualPiece(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.body = nn.Sequential(conv_bn(c, c // 2 + 1), nn.Conv2d(c // 2 + 1, c, 3, padding=1), nn.BatchNorm2d(c))

    def forward(self, x):
        return F.relu(x + self.body(x))


class ConcatPiece(nn.Module):  # DenseNet-style growth
    def __init__(self, c):
        super().__init__()
        self.grow = conv_bn(c, 4)
        self.out_channels = c + 4

    def forward(self, x):
        return torch.cat([x, self.grow(x)], 1)


class SEPiece(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.squeeze = nn.Conv2d(c, 4, 1)
        self.expand = nn.Conv2d(4, c, 1)

    def forward(self, x):
        return x * torch.sigmoid(self.expand(F.relu(self.squeeze(F.adaptive_avg_pool2d(x, 1)))))


class DepthwisePiece(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.dw = conv_bn(c, c, groups=c)
        self.pw = conv_bn(c, c, 1)

    def forward(self, x):
        return self.pw(self.dw(x))


class ChunkCatPiece(nn.Module):  # C2f-like: chunk, transform one half, cat
    def __init__(self, c):
        super().__init__()
        self.c = c + c % 2
        self.pre = conv_bn(c, self.c, 1)
        self.branch = conv_bn(self.c // 2, self.c // 2)
        self.out_channels = self.c + self.c // 2

    def forward(self, x):
        a, b = self.pre(x).chunk(2, 1)
        return torch.cat([a, b, self.branch(b)], 1)


class ShufflePiece(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.c = c + c % 2
        self.pre = conv_bn(c, self.c, 1)

    def forward(self, x):
        y = self.pre(x)
        n, c, h, w = y.size()
        return y.view(n, 2, c // 2, h, w).transpose(1, 2).contiguous().view(n, c, h, w)


class GroupedPiece(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.pre = conv_bn(c, 8, 1)
        self.g = conv_bn(8, 8, 3, groups=2)

    def forward(self, x):
        return self.g(self.pre(x))


PIECES = [ResidualPiece, ConcatPiece, SEPiece, DepthwisePiece, ChunkCatPiece, ShufflePiece, GroupedPiece]


def out_channels(piece, c):
    if isinstance(piece, (ConcatPiece, ChunkCatPiece)):
        return piece.out_channels
    if isinstance(piece, ShufflePiece):
        return piece.c
    if isinstance(piece, GroupedPiece):
        return 8
    return c


class Net(nn.Module):
    def __init__(self, kinds, width, head):
        super().__init__()
        self.stem = conv_bn(3, width)
        pieces, c = [], width
        for k in kinds:
            p = PIECES[k](c)
            c = out_channels(p, c)
            pieces.append(p)
        self.body = nn.Sequential(*pieces)
        self.head_kind = head
        self.fc = nn.Linear(c * (4 if head == "flatten" else 1), 5)

    def forward(self, x):
        x = self.body(self.stem(x))
        if self.head_kind == "flatten":
            return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 2), 1))
        return self.fc(x.mean((2, 3)))


architectures = st.tuples(
    st.lists(st.integers(0, len(PIECES) - 1), min_size=1, max_size=4),
    st.integers(4, 12),
    st.sampled_from(["flatten", "mean"]),
    st.floats(0.1, 0.8),
    st.integers(0, 10_000),
)


def _build(kinds, width, head, seed):
    torch.manual_seed(seed)
    net = Net(kinds, width, head)
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.3, 0.3)
            m.running_var.uniform_(0.5, 1.5)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.3, 0.3)
    return net.eval()


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(architectures)
def test_random_architectures_are_mask_equivalent(arch):
    kinds, width, head, ratio, seed = arch
    net = _build(kinds, width, head, seed)
    x = torch.randn(2, 3, 8, 8)
    pruned = fxprune.compile(net, (x,), method="random", ratio=ratio, seed=seed, onnx=False)
    rep = fxprune.report(pruned)
    assert rep.mask["ok"], (kinds, rep.mask)
    assert pruned(x).shape == (2, 5)
    if rep.plan.keep:
        assert rep.params_after < rep.params_before


@settings(max_examples=4, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(architectures)
def test_random_architectures_agree_with_onnx_runtime(arch):
    kinds, width, head, ratio, seed = arch
    net = _build(kinds, width, head, seed)
    pruned = fxprune.compile(net, (torch.randn(1, 3, 8, 8),), method="random", ratio=ratio, seed=seed)
    rep = fxprune.report(pruned)
    assert rep.mask["ok"] and rep.onnx["ok"], (kinds, rep.onnx)
