"""One tiny model per rule of fxprune/rules.py: pruned, mask-equivalent, and equal in ONNX Runtime."""
from __future__ import annotations

import collections

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fxprune
from helpers import prune_and_check

X = torch.randn(2, 3, 16, 16)


def conv_bn(cin, cout, k=3, groups=1, stride=1):
    return nn.Sequential(nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False), nn.BatchNorm2d(cout), nn.ReLU())


class Plain(nn.Module):  # conv (groups=1), BN, activations, dropout, identity, head
    def __init__(self, act=nn.ReLU):
        super().__init__()
        self.conv = nn.Conv2d(3, 16, 3, padding=1)
        self.bn = nn.BatchNorm2d(16)
        self.act = act()
        self.drop = nn.Dropout2d(0.2)
        self.id = nn.Identity()
        self.out = nn.Conv2d(16, 4, 1)

    def forward(self, x):
        return self.out(self.id(self.drop(self.act(self.bn(self.conv(x))))))


class Depthwise(nn.Module):
    def __init__(self):
        super().__init__()
        self.pw = conv_bn(3, 16, 1)
        self.dw = conv_bn(16, 16, 3, groups=16)
        self.dw_mult = nn.Conv2d(16, 32, 3, padding=1, groups=16)  # depth multiplier 2
        self.out = nn.Conv2d(32, 4, 1)

    def forward(self, x):
        return self.out(self.dw_mult(self.dw(self.pw(x))))


class Grouped(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = conv_bn(3, 16, 1)
        self.g = conv_bn(16, 24, 3, groups=4)
        self.out = nn.Conv2d(24, 4, 1)

    def forward(self, x):
        return self.out(self.g(self.a(x)))


class Norms(nn.Module):  # BatchNorm1d on [N, C], InstanceNorm2d with affine, BatchNorm3d path
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 16, 3, padding=1)
        self.inorm = nn.InstanceNorm2d(16, affine=True)
        self.conv2 = nn.Conv2d(16, 12, 3, padding=1)
        self.fc1 = nn.Linear(12, 20)
        self.bn1d = nn.BatchNorm1d(20)
        self.fc2 = nn.Linear(20, 5)

    def forward(self, x):
        x = self.conv2(F.relu(self.inorm(self.conv(x))))
        x = x.mean((2, 3))
        return self.fc2(F.relu(self.bn1d(self.fc1(x))))


class Residual(nn.Module):  # add, sub and mul as residual joins
    def __init__(self, op):
        super().__init__()
        self.op = op
        self.stem = conv_bn(3, 16)
        self.b1 = nn.Sequential(conv_bn(16, 8), nn.Conv2d(8, 16, 3, padding=1))
        self.b2 = nn.Sequential(conv_bn(16, 8), nn.Conv2d(8, 16, 3, padding=1))
        self.head = nn.Conv2d(16, 4, 1)

    def forward(self, x):
        x = self.stem(x)
        x = self.op(x, self.b1(x))
        x = self.op(self.b2(x), x)
        return self.head(x)


class SE(nn.Module):  # squeeze-excitation: x * sigmoid(fc(pool(x))) broadcasts [N, C, 1, 1]
    def __init__(self):
        super().__init__()
        self.conv = conv_bn(3, 16)
        self.squeeze = nn.Conv2d(16, 4, 1)
        self.expand = nn.Conv2d(4, 16, 1)
        self.out = nn.Conv2d(16, 4, 1)

    def forward(self, x):
        x = self.conv(x)
        s = torch.sigmoid(self.expand(F.relu(self.squeeze(F.adaptive_avg_pool2d(x, 1)))))
        return self.out(x * s)


class Concat(nn.Module):  # cat of two branches, then split, chunk and slicing on the channel dim
    def __init__(self):
        super().__init__()
        self.a = conv_bn(3, 16)
        self.b = conv_bn(3, 8)
        self.c = nn.Conv2d(24, 16, 1)
        self.d = nn.Conv2d(12, 4, 1)
        self.e = nn.Conv2d(8, 4, 1)
        self.f = nn.Conv2d(4, 4, 1)

    def forward(self, x):
        y = torch.cat([self.a(x), self.b(x)], dim=1)
        y1, y2 = torch.split(y, [12, 12], dim=1)
        p, q = self.c(y).chunk(2, dim=1)
        r = y2[:, 4:]
        return self.d(y1) + self.e(p) + self.e(r) + self.f(q[:, :4])


class FlattenLinear(nn.Module):  # flatten / view / reshape into linear, literal sizes recomputed
    def __init__(self, how):
        super().__init__()
        self.how = how
        self.conv = conv_bn(3, 16, stride=2)
        self.pool = nn.AdaptiveAvgPool2d(4)
        self.fc = nn.Linear(16 * 4 * 4, 10)

    def forward(self, x):
        x = self.pool(self.conv(x))
        if self.how == "flatten":
            x = torch.flatten(x, 1)
        elif self.how == "view":
            x = x.view(-1, 16 * 4 * 4)
        else:
            x = x.reshape(x.size(0), 256)
        return self.fc(x)


class Spatial(nn.Module):  # pooling, interpolate, pad, mean over spatial dims
    def __init__(self):
        super().__init__()
        self.a = conv_bn(3, 16)
        self.b = nn.Conv2d(16, 16, 3)
        self.fc = nn.Linear(16, 3)

    def forward(self, x):
        x = F.max_pool2d(self.a(x), 2)
        x = F.interpolate(x, scale_factor=2.0, mode="nearest")
        x = F.avg_pool2d(F.pad(self.b(F.pad(x, (1, 1, 1, 1))), (0, 1, 0, 1)), 2)
        return self.fc(x.mean(dim=(2, 3)))


class ChannelsLast(nn.Module):  # ConvNeXt style: permute to NHWC, linear on C, permute back
    def __init__(self):
        super().__init__()
        self.dw = nn.Conv2d(3, 16, 7, padding=3)
        self.pw1 = nn.Linear(16, 32)
        self.pw2 = nn.Linear(32, 16)
        self.out = nn.Conv2d(16, 4, 1)

    def forward(self, x):
        x = self.dw(x).permute(0, 2, 3, 1)
        x = self.pw2(F.gelu(self.pw1(x)))
        return self.out(x.permute(0, 3, 1, 2))


class WidthLinear(nn.Module):  # a Linear over the width dim must not couple with channels
    def __init__(self):
        super().__init__()
        self.conv = conv_bn(3, 16)
        self.width = nn.Linear(16, 16)
        self.out = nn.Conv2d(16, 4, 1)

    def forward(self, x):
        return self.out(self.width(self.conv(x)))


class Shuffle(nn.Module):  # channel shuffle by view -> transpose -> view (ShuffleNet)
    def __init__(self, literal=False):
        super().__init__()
        self.literal = literal
        self.a = conv_bn(3, 8)
        self.b = conv_bn(3, 8)
        self.out = nn.Conv2d(16, 4, 1)

    def forward(self, x):
        y = torch.cat([self.a(x), self.b(x)], 1)
        n, c, h, w = y.size()
        if self.literal:
            y = y.view(2, 2, 8, 16, 16).transpose(1, 2).contiguous().view(2, 16, 16, 16)
        else:
            y = y.view(n, 2, c // 2, h, w).transpose(1, 2).contiguous().view(n, c, h, w)
        return self.out(y)


class PixelShuffleNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = conv_bn(3, 32)
        self.ps = nn.PixelShuffle(2)
        self.out = nn.Conv2d(8, 4, 3, padding=1)

    def forward(self, x):
        return self.out(self.ps(self.a(x)))


class Functional(nn.Module):  # F.conv2d / F.batch_norm / F.linear on raw parameters and buffers
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(16, 3, 3, 3) * 0.2)
        self.b = nn.Parameter(torch.randn(16) * 0.1)
        self.gamma = nn.Parameter(torch.rand(16) + 0.5)
        self.beta = nn.Parameter(torch.randn(16) * 0.1)
        self.register_buffer("mean", torch.randn(16) * 0.1)
        self.register_buffer("var", torch.rand(16) + 0.5)
        self.scale = nn.Parameter(torch.rand(16, 1, 1) + 0.5)  # layer-scale style
        self.w2 = nn.Parameter(torch.randn(6, 16) * 0.2)

    def forward(self, x):
        x = F.conv2d(x, self.w, self.b, padding=1)
        x = F.relu(F.batch_norm(x, self.mean, self.var, self.gamma, self.beta, False, 0.1, 1e-5))
        x = (x * self.scale).mean((2, 3))
        return F.linear(x, self.w2)


class OtherDims(nn.Module):  # Conv1d + BatchNorm1d, ConvTranspose2d, Conv3d + BatchNorm3d + InstanceNorm3d
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv1d(3, 12, 3, padding=1)
        self.bn1 = nn.BatchNorm1d(12)
        self.c1b = nn.Conv1d(12, 4, 1)
        self.up = nn.ConvTranspose2d(3, 10, 2, stride=2)
        self.c2 = nn.Conv2d(10, 4, 3)
        self.c3 = nn.Conv3d(1, 6, 3, padding=1)
        self.bn3 = nn.BatchNorm3d(6)
        self.in3 = nn.InstanceNorm3d(6, affine=True)
        self.c3b = nn.Conv3d(6, 2, 1)

    def forward(self, x):
        a = self.c1b(F.relu(self.bn1(self.c1(x.flatten(2)))))
        b = self.c2(F.relu(self.up(x)))
        c = self.c3b(self.in3(F.relu(self.bn3(self.c3(x[:, :1].unsqueeze(1))))))
        return a.mean(-1) + b.mean((2, 3)) + c.mean((2, 3, 4)).sum(1, keepdim=True)


CASES = {
    "conv1d_transposed_conv3d": (OtherDims(), ["c1", "up", "c3"]),
    "conv_bn_act": (Plain(), ["conv"]),
    "conv_bn_gelu": (Plain(nn.GELU), ["conv"]),
    "conv_bn_hardswish": (Plain(nn.Hardswish), ["conv"]),
    "depthwise": (Depthwise(), ["pw.0"]),
    "grouped": (Grouped(), ["a.0"]),
    "norms": (Norms(), ["conv", "conv2", "fc1"]),
    "residual_add": (Residual(torch.add), ["stem.0", "b1.0.0"]),
    "residual_sub": (Residual(lambda a, b: a - b), ["stem.0"]),
    "residual_mul": (Residual(lambda a, b: a * b), ["stem.0"]),
    "se_gate": (SE(), ["conv.0", "squeeze"]),
    "cat_split_chunk_slice": (Concat(), ["a.0", "b.0"]),  # e is shared: c's channels join b's group
    "flatten_linear": (FlattenLinear("flatten"), ["conv.0"]),
    "view_linear": (FlattenLinear("view"), ["conv.0"]),
    "reshape_linear": (FlattenLinear("reshape"), ["conv.0"]),
    "spatial_ops": (Spatial(), ["a.0", "b"]),
    "permute_linear": (ChannelsLast(), ["dw", "pw1"]),
    "channel_shuffle": (Shuffle(), ["a.0"]),
    "channel_shuffle_literal": (Shuffle(literal=True), ["a.0"]),
    "pixel_shuffle": (PixelShuffleNet(), ["a.0"]),
    "functional_params": (Functional(), ["conv2d"]),
}


@pytest.mark.parametrize("name", list(CASES))
def test_rule(name):
    torch.manual_seed(0)
    model, must_shrink = CASES[name]
    for m in model.modules():  # non-trivial BN statistics, so a mis-sliced buffer shows
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 1.5)
    prune_and_check(model, (X,), must_shrink=must_shrink)


def test_grouped_conv_keeps_its_groups_with_balanced_blocks():
    model = Grouped().eval()
    graph = fxprune.analyze(model, (X,))
    a, g = graph.groups["a.0"], graph.groups["g.0"]
    # 16 input channels in 4 blocks of 4 (equal counts, free positions); 24 outputs in 4 blocks of 6
    assert a.size == 16 and a.blocks.tolist() == torch.arange(16).view(4, 4).tolist()
    assert g.size == 24 and tuple(g.blocks.shape) == (4, 6)
    pruned, _ = prune_and_check(model, (X,), ratio=0.5, onnx=False)
    g = pruned.get_submodule("g.0")
    assert (g.groups, g.in_channels, g.out_channels) == (4, 8, 12)


def test_depthwise_ties_input_to_output():
    graph = fxprune.analyze(Depthwise().eval(), (X,))
    g = graph.groups["pw.0"]
    # pw conv, its BN, the depthwise conv and its BN, and the multiplier conv (2 outputs per input)
    producers = {(m.param, m.dim) for m in g.members if m.kind == "producer"}
    assert {("pw.0.weight", 0), ("dw.0.weight", 0), ("dw_mult.weight", 0)} <= producers
    assert g.size == 16
    pruned, _ = prune_and_check(Depthwise(), (X,), ratio=0.25, onnx=False)
    assert pruned.get_submodule("dw_mult").weight.shape == (24, 1, 3, 3)


def test_width_linear_does_not_couple():
    graph = fxprune.analyze(WidthLinear().eval(), (X,))
    conv = graph.groups["conv.0"]
    assert conv.size == 16 and conv.prunable == 16
    assert all(not m.param.startswith("width") for m in conv.members)
    assert "width" not in graph.groups or graph.groups["width"].prunable == 0
    pruned, rep = prune_and_check(WidthLinear(), (X,), ratio=0.5)
    assert pruned.get_submodule("width").weight.shape == (16, 16)
    assert pruned.get_submodule("out").in_channels == 8


def test_flatten_linear_maps_channel_blocks():
    graph = fxprune.analyze(FlattenLinear("view").eval(), (X,))
    fc = [m for m in graph.groups["conv.0"].members if m.param == "fc.weight"][0]
    assert fc.dim == 1
    assert fc.index[:16].tolist() == [0] * 16 and fc.index[16:32].tolist() == [1] * 16
    plan = fxprune.Plan({"conv.0": [1, 5, 9]}, {"conv.0": 16})
    pruned = fxprune.apply(FlattenLinear("view").eval(), (X,), plan, onnx=False)
    assert pruned.get_submodule("fc").in_features == 48
    assert "48" in pruned.code  # the literal of view(-1, 256) was recomputed


def test_cat_of_the_same_tensor_twice():
    class CatTwice(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = conv_bn(3, 8)
            self.out = nn.Conv2d(16, 4, 1)

        def forward(self, x):
            y = self.a(x)
            return self.out(torch.cat([y, y], 1))

    pruned, _ = prune_and_check(CatTwice(), (X,), must_shrink=["a.0"])
    assert pruned.get_submodule("out").in_channels == 8


def test_chunk_branch_cat_c2f():
    class C2f(nn.Module):
        def __init__(self):
            super().__init__()
            self.cv1 = conv_bn(3, 16, 1)
            self.m1 = conv_bn(8, 8)
            self.m2 = conv_bn(8, 8)
            self.cv2 = conv_bn(32, 12, 1)
            self.out = nn.Conv2d(12, 4, 1)

        def forward(self, x):
            y0, y1 = self.cv1(x).chunk(2, 1)
            y2 = self.m1(y1)
            y3 = self.m2(y2)
            return self.out(self.cv2(torch.cat([y0, y1, y2, y3], 1)))

    prune_and_check(C2f(), (X,), must_shrink=["cv1.0", "m1.0", "m2.0", "cv2.0"])


def test_untraceable_model_names_module_line_and_fix():
    class Listy(nn.Module):  # YOLO's Detect branches on shapes: fx cannot use a proxy in control flow
        def __init__(self):
            super().__init__()
            self.cv1 = conv_bn(3, 16, 1)

        def forward(self, x):
            y = list(self.cv1(x).chunk(2, 1))  # fx iterates this (a literal count of pieces)
            if y[0].shape[-1] % 2:
                y = y[::-1]
            return torch.cat(y, 1)

    class Outer(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = conv_bn(3, 3, 1)
            self.c2f = Listy()

        def forward(self, x):
            return self.c2f(self.stem(x))

    with pytest.raises(fxprune.TraceError) as err:
        fxprune.analyze(Outer(), (X,), capture="fx")  # "auto" would fall back to torch.export
    msg = str(err.value)
    assert "'c2f'" in msg and "test_rules.py" in msg and "if y[0].shape[-1] % 2:" in msg
    assert "leaf_modules=['c2f']" in msg
    # the suggested fix works: c2f becomes one opaque node, its channels pinned, the stem still analysed
    graph = fxprune.analyze(Outer(), (X,), leaf_modules=["c2f"], capture="fx")
    assert graph.groups["stem.0"].prunable == 0
    assert any("c2f" in p.reason for p in graph.groups["stem.0"].pins)


def test_shuffle_is_a_free_permutation():
    graph = fxprune.analyze(Shuffle().eval(), (X,))
    # the shuffle interleaves a and b but ties nothing: each branch is its own group, every channel free
    assert (graph.groups["a.0"].size, graph.groups["b.0"].size) == (8, 8)
    assert graph.groups["a.0"].prunable == 8 and graph.groups["a.0"].blocks is None
    assert {m.param for m in graph.groups["a.0"].members} >= {"a.0.weight", "out.weight"}
    pruned, rep = prune_and_check(Shuffle().eval(), (X,), ratio=0.5, onnx=False)
    assert rep.plan.removed == 8
    # the pruned shuffle is one index_select of the kept channels in the shuffled order
    assert [n.target for n in pruned.graph.nodes if n.op == "call_function"].count(torch.index_select) == 1


def test_unknown_op_pins_with_reason():
    class Unknown(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = conv_bn(3, 8)
            self.b = conv_bn(3, 8)
            self.out = nn.Conv2d(8, 4, 1)

        def forward(self, x):
            return self.out(torch.flip(self.a(x), [1]) + self.b(x))

    graph = fxprune.analyze(Unknown().eval(), (X,))
    a = graph.groups["a.0"]
    assert a.prunable == 0
    assert any("flip" in p.reason for p in a.pins)
    # b meets a's fixed channels in the add: b still prunes, the add reading a's value at b's kept positions
    assert graph.groups["b.0"].prunable == 8
    pruned, rep = prune_and_check(Unknown(), (X,), onnx=False)
    assert list(rep.plan.keep) == ["b.0"] and pruned.get_submodule("out").in_channels == len(rep.plan.keep["b.0"])
    assert any(n.target is torch.index_select for n in pruned.graph.nodes)


def test_model_output_is_pinned():
    graph = fxprune.analyze(Plain().eval(), (X,))
    out = graph.groups["out"]
    assert out.prunable == 0 and out.pins[0].reason == "model output"
    assert graph.groups["conv"].prunable == 16


class SizeReadFromTheStream(nn.Module):
    """``n, c, h, w = x.shape`` ... ``a.reshape(n, h * w, c)``: ``a``'s own channels are fixed (a
    softmax over them), so ``c`` must stay the stream's original channel count."""

    def __init__(self):
        super().__init__()
        self.conv0 = nn.Conv2d(3, 8, 1)
        self.conv1 = nn.Conv2d(8, 8, 1)
        self.inner = nn.Linear(8, 8)
        self.out = nn.Linear(8, 4)

    def forward(self, x):
        x = self.conv1(torch.relu(self.conv0(x)))
        n, c, h, w = x.shape
        t = x.flatten(2).transpose(1, 2)
        a = self.inner(t).softmax(-1).transpose(1, 2).reshape(n, h * w, c)
        return self.out(a).mean(1)


def test_a_size_read_from_one_tensor_shaping_another_is_the_original_size():
    torch.manual_seed(0)
    model = SizeReadFromTheStream().eval()
    x = torch.randn(1, 3, 4, 4)
    pruned = fxprune.compile(model, (x,), method="l1", ratio=0.5)
    rep = fxprune.report(pruned)
    assert rep.verified and rep.plan.keep.keys() == {"conv0", "conv1"}
    reshape = [n for n in pruned.graph.nodes if n.target == "reshape"][0]
    assert reshape.args[3] == 8 and isinstance(reshape.args[2], torch.fx.Node)  # c folded; h * w still read
    assert pruned(torch.randn(1, 3, 6, 6)).shape == (1, 4)   # other input sizes still run
    copy = fxprune.compile(model, (x,), method="l1", ratio=0.5, output="module")
    reasons = [p.reason for p in fxprune.analyze(model, (x,), output="module").groups["conv1"].pins]
    assert fxprune.report(copy).plan.keep.keys() == {"conv0"}
    assert any("reads a channel count at run time" in r for r in reasons), reasons


# --- RMSNorm and reductions over channels: exact, so a residual stream through them prunes

class MeanSquareNorm(nn.Module):
    """RMSNorm as Hugging Face's Llama writes it: ``x * rsqrt(x.pow(2).mean(-1) + eps)``, with
    ``gemma=True`` the weight applied as ``1 + weight`` (Gemma's)."""

    def __init__(self, d, eps=0.5, gemma=False):
        super().__init__()
        self.weight, self.eps, self.gemma = nn.Parameter(torch.rand(d) + 0.5), eps, gemma

    def forward(self, x):
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return x * (1.0 + self.weight.float()) if self.gemma else self.weight * x


class FunctionalRMSNorm(nn.Module):
    def __init__(self, d, weight=True, eps=0.5):
        super().__init__()
        self.d, self.eps = d, eps
        self.weight = nn.Parameter(torch.rand(d) + 0.5) if weight else None

    def forward(self, x):
        return F.rms_norm(x, (self.d,), self.weight, self.eps)


class RMSStream(nn.Module):
    """A pre-norm residual stream of width 24 (the group 'inp') read by every norm; a large ``eps``
    so that a wrong ``eps`` in the pruned norms shows in the outputs."""

    def __init__(self, norm, d=24, blocks=2):
        super().__init__()
        self.inp = nn.Linear(6, d)
        self.norms = nn.ModuleList(norm(d) for _ in range(blocks))
        self.up = nn.ModuleList(nn.Linear(d, 32) for _ in range(blocks))
        self.down = nn.ModuleList(nn.Linear(32, d) for _ in range(blocks))
        self.last, self.head = norm(d), nn.Linear(d, 3)

    def forward(self, x):
        h = self.inp(x)
        for norm, up, down in zip(self.norms, self.up, self.down):
            h = h + down(F.gelu(up(norm(h))))
        return self.head(self.last(h))


RMS_NORMS = {
    "nn.RMSNorm": lambda d: nn.RMSNorm(d, eps=0.5),
    "nn.RMSNorm, no weight, default eps": lambda d: nn.RMSNorm(d, elementwise_affine=False),
    "x.pow(2).mean(-1)": MeanSquareNorm,
    "gemma 1 + weight": lambda d: MeanSquareNorm(d, gemma=True),
    "F.rms_norm": FunctionalRMSNorm,
    "F.rms_norm, no weight": lambda d: FunctionalRMSNorm(d, weight=False),
}


@pytest.mark.parametrize("capture", ["fx", "export"])
@pytest.mark.parametrize("norm", list(RMS_NORMS))
def test_rms_norm_stream_prunes_exactly(norm, capture):
    torch.manual_seed(0)
    model = RMSStream(RMS_NORMS[norm])
    with torch.no_grad():
        for m in model.modules():
            if getattr(m, "weight", None) is not None and m.weight.dim() == 1:
                m.weight.uniform_(0.5, 1.5)
    x = torch.randn(2, 5, 6)
    pruned, rep = prune_and_check(model, (x,), ratio=0.5, capture=capture, round_to=None, must_shrink=["inp"])
    assert rep.pinned_groups == 1  # the head's outputs only
    assert not rep.mask.get("checked_in")  # exact in float32: no re-check in float64 was needed
    assert rep.mask["max_rel_diff"] < 1e-5
    assert rep.mask["nodes_compared"] >= 10
    assert len(rep.plan.keep["inp"]) < 24


def test_rms_norm_module_copy_rescales_eps_and_weight():
    torch.manual_seed(0)
    model = RMSStream(lambda d: nn.RMSNorm(d, eps=0.5)).eval()
    x = torch.randn(2, 5, 6)
    copy, rep = prune_and_check(model, (x,), ratio=0.5, output="module", round_to=None, must_shrink=["inp"])
    n, k = 24, copy.inp.out_features
    kept = torch.tensor(rep.plan.keep["inp"])
    assert copy.last.normalized_shape == (k,) and copy.last.eps == pytest.approx(0.5 * n / k)
    assert torch.allclose(copy.last.weight, model.last.weight[kept] * (n / k) ** 0.5)
    assert rep.mask["module"]["ok"]


def test_mean_over_channels_in_user_code_pins_for_a_module_copy():
    model = RMSStream(MeanSquareNorm).eval()
    x = torch.randn(2, 5, 6)
    graph_out = fxprune.compile(model, (x,), ratio=0.5, onnx=False, round_to=None)
    assert len(fxprune.report(graph_out).plan.keep["inp"]) < 24
    copy = fxprune.compile(model, (x,), ratio=0.5, onnx=False, round_to=None, output="module")
    rep = fxprune.report(copy)
    assert copy.inp.out_features == 24 and "inp" not in rep.plan.keep
    assert "mean" in rep.first_pin and "test_rules.py" in rep.first_pin and "output='graph'" in rep.first_pin


class Reductions(nn.Module):
    def __init__(self, op):
        super().__init__()
        self.a, self.b, self.op = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 4, 1), op

    def forward(self, x):
        h = F.relu(self.a(x))
        return self.b(h) + self.op(h)


@pytest.mark.parametrize("op, prunes", [
    (lambda h: h.sum(1, keepdim=True), True),
    (lambda h: torch.mean(h, dim=(1, 2), keepdim=True), True),
    (lambda h: h.amax(1, keepdim=True), True),  # the kept channels' maximum and a zero (a removed one)
    (lambda h: h.mean((2, 3), keepdim=True).sum(1, keepdim=True), True),
    (lambda h: h.mean(), False),  # over every dim: pinned, and the rewrite leaves it alone
    (lambda h: torch.mean(h, dim=[]), False),
])
def test_reductions_over_channels(op, prunes):
    torch.manual_seed(0)
    model = Reductions(op).eval()
    for capture in ("fx", "export"):
        _, rep = prune_and_check(model, (X,), ratio=0.5, capture=capture, round_to=None)
        assert ("a" in rep.plan.keep) == prunes, capture
        if not prunes:  # pinned by the reduction, with its reason
            assert rep.first_pin.startswith(("amax", "mean")), rep.first_pin


# --- a tensor without channels that varies along theirs: read at the kept positions

class LayerScaleConv(nn.Module):
    """timm's conv LayerScale (``x.mul(gamma.reshape(1, -1, 1, 1))``) on a residual stream, and a
    channel embedding computed at run time (``sin`` of a frequency ramp) added to it."""

    def __init__(self, c=12):
        super().__init__()
        self.stem = nn.Conv2d(3, c, 3, padding=1)
        self.body = nn.Sequential(nn.Conv2d(c, 2 * c, 1), nn.GELU(), nn.Conv2d(2 * c, c, 1))
        self.gamma = nn.Parameter(torch.rand(c) + 0.5)
        self.c = c
        self.head = nn.Conv2d(c, 4, 1)

    def forward(self, x):
        h = self.stem(x)
        h = h + self.body(h).mul(self.gamma.reshape(1, -1, 1, 1))
        freq = torch.arange(self.c, dtype=h.dtype, device=h.device) * 0.3
        h = h + torch.sin(freq).view(1, -1, 1, 1)
        return self.head(torch.where(freq.view(1, -1, 1, 1) > 1.0, h, -h))


@pytest.mark.parametrize("capture", ["fx", "export"])
def test_a_fixed_tensor_along_the_channels_is_gathered(capture):
    torch.manual_seed(0)
    model = LayerScaleConv().eval()
    pruned, rep = prune_and_check(model, (X,), ratio=0.5, capture=capture, round_to=None, must_shrink=["stem"])
    kept = len(rep.plan.keep["stem"])
    gathers = [n for n in pruned.graph.nodes if n.target is torch.index_select]
    assert len(gathers) == 2 and kept < 12  # the embedding, the where's condition
    assert all(int(getattr(pruned, g.args[2].target).numel()) == kept for g in gathers)
    assert pruned.gamma.shape == (kept,)    # gamma.reshape(1, -1, 1, 1): the vector is sliced, its view follows
    assert rep.mask["max_rel_diff"] < 1e-5


def test_a_fixed_tensor_along_the_channels_pins_them_for_a_module_copy():
    model = LayerScaleConv().eval()
    copy = fxprune.compile(model, (X,), ratio=0.5, onnx=False, round_to=None, output="module")
    rep = fxprune.report(copy)
    assert copy.stem.out_channels == 12 and "stem" not in rep.plan.keep
    assert "kept positions" in rep.first_pin and "test_rules.py" in rep.first_pin
    assert copy.body[0].out_channels < 24  # the MLP's inner width still prunes


class LayerScaleOnly(LayerScaleConv):
    def forward(self, x):
        h = self.stem(x)
        return self.head(h + self.body(h).mul(self.gamma.reshape(1, -1, 1, 1)))


def test_layer_scale_alone_prunes_in_a_module_copy():
    torch.manual_seed(0)
    model = LayerScaleOnly().eval()
    copy = fxprune.compile(model, (X,), ratio=0.5, round_to=None, output="module")   # ONNX Runtime too
    rep = fxprune.report(copy)
    assert type(copy) is LayerScaleOnly and rep.verified and rep.onnx["ok"]
    assert copy.stem.out_channels == copy.gamma.numel() == 6 and model.gamma.numel() == 12


class GroupNormStream(nn.Module):
    """A residual stream of 16 channels normalised by ``norm(16)`` before each block; a block's inner
    width (32) by a functional ``group_norm`` of 8 groups; a large ``eps`` so a wrong one shows."""

    def __init__(self, norm):
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.norms = nn.ModuleList(norm(16) for _ in range(2))
        self.up = nn.ModuleList(nn.Conv2d(16, 32, 1) for _ in range(2))
        self.gw = nn.ParameterList(nn.Parameter(torch.rand(32) + 0.5) for _ in range(2))
        self.down = nn.ModuleList(nn.Conv2d(32, 16, 3, padding=1) for _ in range(2))
        self.head = nn.Conv2d(16, 4, 1)

    def forward(self, x):
        h = self.stem(x)
        for norm, up, gw, down in zip(self.norms, self.up, self.gw, self.down):
            h = h + down(F.silu(F.group_norm(up(norm(h)), 8, gw, -gw, eps=0.3)))
        return self.head(h)


GROUP_NORMS = {  # norm over the stream, the stream's kept-count granularity
    "4 groups": (lambda c: nn.GroupNorm(4, c, eps=0.3), 4),
    "one per channel": (lambda c: nn.GroupNorm(c, c, eps=0.3), 1),
}


@pytest.mark.parametrize("capture", ["fx", "export"])
@pytest.mark.parametrize("norm", list(GROUP_NORMS))
def test_group_norm_prunes_whole_groups_exactly(norm, capture):
    torch.manual_seed(0)
    make, per = GROUP_NORMS[norm]
    model = GroupNormStream(make)
    pruned, rep = prune_and_check(model, (X,), ratio=0.5, capture=capture, round_to=None,
                                  must_shrink=["stem", "up.0", "up.1"])
    assert rep.mask["approximate_groups"] == 0 and rep.mask["max_rel_diff"] < 1e-5
    # each group of a norm is one channel of the plan, kept or removed whole
    state = pruned.state_dict()
    for conv, width in (("stem", per), ("up.0", 4), ("up.1", 4)):
        assert rep.plan.sizes[conv] == model.get_submodule(conv).out_channels // width
        assert state[f"{conv}.weight"].shape[0] == len(rep.plan.keep[conv]) * width


def test_group_norm_module_copy_keeps_channels_per_group():
    torch.manual_seed(0)
    model = GroupNormStream(lambda c: nn.GroupNorm(4, c, eps=0.3)).eval()
    copy, rep = prune_and_check(model, (X,), ratio=0.5, output="module", round_to=None, must_shrink=["stem"])
    assert copy.norms[0].num_channels == copy.stem.out_channels == 8
    assert copy.norms[0].num_groups == 2  # 4 channels per group, as before
    assert "up.0" not in rep.plan.keep   # the literal 8 groups of the functional call: a copy keeps them
    assert "literal 8" in rep.first_pin and "test_rules.py" in rep.first_pin


def test_group_norm_of_one_group_prunes_approximately_like_a_layer_norm():
    torch.manual_seed(0)
    model = GroupNormStream(lambda c: nn.GroupNorm(1, c, eps=0.3))
    pruned, rep = prune_and_check(model, (X,), ratio=0.5, round_to=None, must_shrink=["stem"])
    assert rep.mask["approximate_groups"] == 1   # the stream; the inner widths stay exact
    norm = pruned.get_submodule("norms.0")
    assert norm.num_groups == 1 and norm.num_channels == 8


def test_powers_and_unary_ops_are_elementwise():
    class Star(nn.Module):  # MetaFormer's StarReLU: s * relu(x) ** 2 + b
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Conv2d(3, 8, 1), nn.Conv2d(8, 4, 1)

        def forward(self, x):
            y = torch.relu(self.a(x)) ** 2
            return self.b(0.8 * y + torch.square(y).add(1).reciprocal().log() + y.sin())

    prune_and_check(Star(), (X,), ratio=0.5, round_to=None, must_shrink=["a"])


class FusedArithmetic(nn.Module):  # ConvNeXt-V2's GRN: torch.addcmul(bias, weight, x * nx) + x; addcdiv, lerp
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 8, 1), nn.Conv2d(8, 4, 1)
        self.weight, self.bias = nn.Parameter(torch.rand(1, 8, 1, 1)), nn.Parameter(torch.rand(1, 8, 1, 1))

    def forward(self, x):
        y = torch.relu(self.a(x))
        y = torch.addcmul(self.bias, self.weight, y * 0.5, value=2.0) + y
        y = y.addcdiv(y, y.abs() + 1.0).lerp(y.sin(), 0.3) + torch.lerp(y, torch.zeros_like(y), self.weight)
        return self.b(y)


@pytest.mark.parametrize("capture", ["fx", "export"])
def test_addcmul_addcdiv_and_lerp_are_elementwise(capture):
    torch.manual_seed(0)
    pruned, _ = prune_and_check(FusedArithmetic(), (X,), ratio=0.5, round_to=None, capture=capture, must_shrink=["a"])
    assert pruned.state_dict()["weight"].shape[1] == 4


class CatBias(nn.Module):  # BEiT's and Swin V2's qkv: F.linear(x, qkv.weight, cat((q_bias, k_bias, v_bias)))
    def __init__(self):
        super().__init__()
        self.embed, self.qkv, self.head = nn.Linear(6, 16), nn.Linear(16, 48, bias=False), nn.Linear(16, 3)
        self.q_bias, self.v_bias = nn.Parameter(torch.rand(16)), nn.Parameter(torch.rand(16))
        self.register_buffer("k_bias", torch.zeros(16), persistent=False)

    def forward(self, x):
        x = self.embed(x)
        q, k, v = F.linear(x, self.qkv.weight, torch.cat((self.q_bias, self.k_bias, self.v_bias))).chunk(3, -1)
        return self.head(F.relu(q) * k + v + x)


@pytest.mark.parametrize("capture", ["fx", "export"])
def test_a_bias_computed_at_run_time_is_read_at_the_kept_outputs(capture):
    torch.manual_seed(0)
    pruned, rep = prune_and_check(CatBias(), (torch.randn(2, 5, 6),), ratio=0.5, round_to=None, capture=capture,
                                  must_shrink=["embed"])   # q, k and v are tied to the stream
    assert pruned.state_dict()["qkv.weight"].shape == (24, 8)   # q, k, v of 2 heads: 4 dims each, the 8 kept
    assert pruned.state_dict()["q_bias"].shape == (16,)   # computed from: kept whole, read at the kept outputs
    assert len([n for n in pruned.graph.nodes if n.target in (torch.index_select, torch.ops.aten.index_select.default)]) == 1


class Repeats(nn.Module):  # GCViT's global query repeated over windows (batch); channels repeated or tiled
    def __init__(self):
        super().__init__()
        self.a, self.b, self.head = nn.Conv2d(3, 8, 1), nn.Conv2d(16, 8, 1), nn.Conv2d(16, 4, 1)

    def forward(self, x):
        y = torch.relu(self.a(x))
        q = y.mean((2, 3), keepdim=True).repeat_interleave(x.shape[0] // 2, dim=0)   # over the batch
        y = self.b((y + q).repeat_interleave(2, dim=1))                                # each channel twice
        return self.head(torch.tile(y, (1, 2, 1, 1)) + y.repeat(1, 2, 1, 1))         # the channels tiled


@pytest.mark.parametrize("capture", ["fx", "export"])
def test_repeats_and_tiles_tie_each_channel_to_its_copies(capture):
    torch.manual_seed(0)
    pruned, rep = prune_and_check(Repeats(), (torch.randn(2, 3, 8, 8),), ratio=0.5, round_to=None, capture=capture,
                                  must_shrink=["a", "b"])
    state = pruned.state_dict()
    assert state["b.weight"].shape == (4, 8, 1, 1) and state["head.weight"].shape == (4, 8, 1, 1)


class VarianceNorms(nn.Module):  # timm's SimpleNorm (x * rsqrt(var(x) + eps)) over channels, a std, a var over positions
    def __init__(self):
        super().__init__()
        self.a, self.fc, self.head = nn.Conv2d(3, 8, 1), nn.Linear(8, 8), nn.Linear(8, 3)
        self.weight = nn.Parameter(torch.rand(8) + 0.5)

    def forward(self, x):
        y = self.a(x).permute(0, 2, 3, 1)                                     # [B, H, W, C]
        y = y * torch.rsqrt(torch.var(y, dim=(-1,), keepdim=True) + 1e-5) * self.weight
        y = y + y.std(-1).unsqueeze(-1) + y.var(dim=(1, 2), keepdim=True, unbiased=False)
        return self.head(F.gelu(self.fc(y)) + y).mean((1, 2))


@pytest.mark.parametrize("capture", ["fx", "export"])
def test_variance_over_the_channels_keeps_the_masked_originals_count(capture):
    torch.manual_seed(0)
    pruned, _ = prune_and_check(VarianceNorms(), (X,), ratio=0.5, round_to=None, capture=capture, must_shrink=["a"])
    assert pruned.state_dict()["weight"].shape == (4,)


class RelPosBias(nn.Module):  # timm's RelPosMlp: a bias per head, mlp(coords)[index.view(-1)], as sdpa's mask
    def __init__(self, dim=16, heads=4, n=6):
        super().__init__()
        self.heads, self.n = heads, n
        self.embed, self.qkv, self.proj, self.head = nn.Linear(5, dim), nn.Linear(dim, 3 * dim), nn.Linear(dim, dim), \
            nn.Linear(dim, 3)
        self.mlp = nn.Sequential(nn.Linear(2, 8), nn.ReLU(), nn.Linear(8, heads))
        self.register_buffer("coords", torch.randn(2 * n - 1, 2))
        self.register_buffer("index", (torch.arange(n)[:, None] - torch.arange(n)[None, :] + n - 1))

    def forward(self, x):
        x = self.embed(x)
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
        bias = self.mlp(self.coords)[self.index.view(-1)].view(n, n, -1).permute(2, 0, 1)
        x = x + self.proj(F.scaled_dot_product_attention(q, k, v, attn_mask=bias).transpose(1, 2).reshape(b, n, -1))
        return self.head(x)


class RelPosBiasMatmul(RelPosBias):  # the same with attention written out (Hugging Face's Swin V2)
    def forward(self, x):
        x = self.embed(x)
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
        bias = 16 * torch.sigmoid(self.mlp(self.coords)[self.index.view(-1)].view(n, n, -1).permute(2, 0, 1))
        attn = (q @ k.transpose(-2, -1) + bias).softmax(-1)
        return self.head(x + self.proj((attn @ v).transpose(1, 2).reshape(b, n, -1)))


@pytest.mark.parametrize("capture", ["fx", "export"])
@pytest.mark.parametrize("model", [RelPosBias, RelPosBiasMatmul])
def test_a_table_read_at_an_index_of_positions_keeps_its_channels(capture, model):
    torch.manual_seed(0)
    pruned, rep = prune_and_check(model(), (torch.randn(2, 6, 5),), ratio=0.5, round_to=None, capture=capture,
                                  must_shrink=["embed", "qkv"])
    assert pruned.state_dict()["qkv.weight"].shape == (24, 8)   # every head keeps 2 of its 4 dims
    assert pruned.state_dict()["mlp.2.weight"].shape == (4, 4)  # one bias per head: the 4 heads stay


class SizeSlice(nn.Module):  # Hiera's h, w = x.shape[1:3] on a channels-last map: sizes of positions, not channels
    def __init__(self):
        super().__init__()
        self.embed, self.fc, self.head = nn.Conv2d(3, 8, 2, stride=2), nn.Linear(8, 8), nn.Linear(8, 3)
        self.pos = nn.Parameter(torch.randn(1, 8, 3, 3))

    def forward(self, x):
        x = self.embed(x).permute(0, 2, 3, 1)
        h, w = x.shape[1:3]
        x = x + F.interpolate(self.pos, size=(h, w), mode="bilinear").permute(0, 2, 3, 1)
        return self.head(F.relu(self.fc(x)) + x).mean((1, 2))


def test_sizes_sliced_from_a_shape_read_only_those_dims():
    pruned, rep = prune_and_check(SizeSlice(), (X,), ratio=0.5, round_to=None, must_shrink=["embed"])
    assert pruned.state_dict()["embed.weight"].shape == (4, 3, 2, 2)   # the interpolated table: read at the kept channels


class TokenTwice(nn.Module):  # CaiT: cls_token.expand(n, -1, -1) added to a branch and concatenated to the tokens
    def __init__(self):
        super().__init__()
        self.embed, self.attn, self.head = nn.Linear(5, 16), nn.Linear(16, 16), nn.Linear(16, 3)
        self.cls_token = nn.Parameter(torch.randn(1, 1, 16))

    def forward(self, x):
        x = self.embed(x)
        cls = self.cls_token.expand(x.shape[0], -1, -1)
        cls = cls + self.attn(torch.cat([cls, x], dim=1)).mean(1, keepdim=True)
        return self.head(cls[:, 0])


@pytest.mark.parametrize("capture", ["fx", "export"])
def test_a_token_broadcast_into_an_add_and_a_cat_is_sliced_once(capture):
    torch.manual_seed(0)
    pruned, _ = prune_and_check(TokenTwice(), (torch.randn(2, 6, 5),), ratio=0.5, round_to=None, capture=capture,
                                must_shrink=["embed"])
    assert pruned.state_dict()["cls_token"].shape == (1, 1, 8)


class StdConv(nn.Conv2d):  # weight standardisation at every call (timm's StdConv2d, BiT, NF-Nets)
    def forward(self, x):
        w = F.batch_norm(self.weight.reshape(1, self.out_channels, -1), None, None, training=True, momentum=0.0,
                         eps=1e-6).reshape_as(self.weight)
        return F.conv2d(x, w, self.bias, self.stride, self.padding, self.dilation, self.groups)


class ScaledStdConv(nn.Conv2d):  # NF-Nets' ScaledStdConv2d: a gain per row as the standardisation's weight
    def __init__(self, *args, **kw):
        super().__init__(*args, **kw)
        self.gain = nn.Parameter(torch.rand(self.out_channels, 1, 1, 1) + 0.5)

    def forward(self, x):
        w = F.batch_norm(self.weight.reshape(1, self.out_channels, -1), None, None,
                         weight=(self.gain * 0.5).view(-1), training=True, momentum=0.0, eps=1e-6)
        return F.conv2d(x, w.reshape_as(self.weight), self.bias, self.stride, self.padding)


class NormedConv(nn.Conv2d):  # weight normalisation written out: each row's norm is its gain g
    def __init__(self, *args, **kw):
        super().__init__(*args, **kw)
        self.g = nn.Parameter(torch.ones(self.out_channels, 1, 1, 1))

    def forward(self, x):
        w = self.g * self.weight / self.weight.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
        return F.conv2d(x, w, self.bias, self.stride, self.padding)


class ComputedWeights(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = ScaledStdConv(3, 16, 3, padding=1)
        self.norm = nn.GroupNorm(8, 16)
        self.b = NormedConv(16, 16, 3, padding=1)
        self.dw = StdConv(16, 16, 3, padding=1, groups=16)
        self.head = StdConv(16, 4, 1)

    def forward(self, x):
        return self.head(F.relu(self.dw(F.relu(self.b(F.relu(self.norm(self.a(x))))))))


@pytest.mark.parametrize("capture", ["fx", "export"])
def test_weights_computed_at_run_time_are_read_at_the_kept_channels(capture):
    torch.manual_seed(0)
    model = ComputedWeights()
    with torch.no_grad():
        model.b.g[8:] = 4.0   # b's last 8 rows are large after normalisation: l2 sees it
    with pytest.warns(UserWarning, match=r"(computes its weight|compute their weights) at run time"):
        pruned, rep = prune_and_check(model, (X,), method="l2", ratio=0.5, capture=capture, round_to=None,
                                      must_shrink=["b"])
    assert rep.plan.keep["b"] == list(range(8, 16))
    assert rep.flops_after < 0.4 * rep.flops_before and rep.mask["max_rel_diff"] < 1e-5
    # standardised or normalised row by row: the rows of what the weights are computed from are sliced,
    # their columns (which the statistics span) read at the kept positions at run time
    state = pruned.state_dict()
    assert state["b.weight"].shape == (8, 16, 3, 3) and state["b.g"].shape == (8, 1, 1, 1)
    assert state["a.weight"].shape == (8, 3, 3, 3) and state["a.gain"].shape == (8, 1, 1, 1)
    assert state["dw.weight"].shape == (8, 1, 3, 3) and state["head.weight"].shape == (4, 16, 1, 1)
    index_selects = [n for n in pruned.graph.nodes if n.target in (torch.index_select, torch.ops.aten.index_select.default)]
    assert len(index_selects) == 2   # the kept columns of b and head


class WeightNormed(nn.Module):  # nn.utils.parametrizations.weight_norm: torch._weight_norm(v, g, dim) at every call
    def __init__(self, dim=0):
        super().__init__()
        wn = nn.utils.parametrizations.weight_norm
        self.a = wn(nn.Conv1d(3, 16, 3, padding=1), dim=dim)
        self.b = wn(nn.Conv1d(16, 8, 3, padding=1), dim=dim)
        self.head = nn.Conv1d(8, 4, 1)

    def forward(self, x):
        return self.head(F.relu(self.b(F.relu(self.a(x)))))


@pytest.mark.parametrize("capture", ["fx", "export"])
def test_weight_norm_along_the_rows_slices_v_and_g(capture):
    torch.manual_seed(0)
    pruned, rep = prune_and_check(WeightNormed(), (torch.randn(2, 3, 12),), ratio=0.5, round_to=None, capture=capture,
                                  must_shrink=["a", "b"])
    state = pruned.state_dict()
    assert state["a.parametrizations.weight.original0"].shape == (8, 1, 1)     # g
    assert state["a.parametrizations.weight.original1"].shape == (8, 3, 3)     # v: its columns are the input's
    assert state["b.parametrizations.weight.original1"].shape == (4, 16, 3)    # read at the kept inputs at run time
    mlp = nn.Sequential(nn.utils.parametrizations.weight_norm(nn.Linear(6, 16)), nn.ReLU(),
                        nn.utils.parametrizations.weight_norm(nn.Linear(16, 3)))
    pruned, rep = prune_and_check(mlp, (torch.randn(2, 6),), ratio=0.5, round_to=None, capture=capture,
                                  must_shrink=["0"] if capture == "fx" else ())
    assert pruned.state_dict()["0.parametrizations.weight.original1"].shape == (8, 6)
    across = WeightNormed(dim=2)   # normalised across the rows: v and g kept whole, the weight read at the kept
    pruned, rep = prune_and_check(across, (torch.randn(2, 3, 12),), ratio=0.5, round_to=None, capture=capture)
    assert pruned.state_dict()["a.parametrizations.weight.original1"].shape == (16, 3, 3)


class CastWeights(nn.Module):  # weight.float(): the parameter itself, sliced along both dims (no seed, no gather)
    def __init__(self):
        super().__init__()
        self.a, self.c, self.h = nn.Linear(5, 16), nn.Conv2d(3, 8, 1), nn.Linear(8, 3)
        self.w, self.cw = nn.Parameter(torch.randn(8, 16)), nn.Parameter(torch.randn(8, 8, 1, 1))

    def forward(self, x, y):
        z = F.linear(torch.relu(self.a(x)), self.w.float())
        q = F.conv2d(torch.relu(self.c(y)), self.cw.float()).mean((2, 3))
        return self.h(torch.relu(z) + q)


def test_a_weight_cast_at_run_time_is_the_parameter_itself():
    pruned, _ = prune_and_check(CastWeights(), (torch.randn(2, 5), torch.randn(2, 3, 4, 4)), ratio=0.5, round_to=None,
                                must_shrink=["a", "c"])
    state = pruned.state_dict()
    assert state["w"].shape == (4, 8) and state["cw"].shape == (4, 4, 1, 1)


class GroupedComputed(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = StdConv(3, 16, 3, padding=1)
        self.grouped = StdConv(16, 24, 3, padding=1, groups=4)   # 4 input and 6 output channels per group
        self.head = nn.Conv2d(24, 4, 1)

    def forward(self, x):
        return self.head(F.relu(self.grouped(F.relu(self.a(x)))))


@pytest.mark.parametrize("capture", ["fx", "export"])
def test_a_grouped_conv_on_a_computed_weight_reads_each_groups_columns(capture):
    torch.manual_seed(0)
    with pytest.warns(UserWarning, match=r"(computes its weight|compute their weights) at run time"):
        pruned, rep = prune_and_check(GroupedComputed(), (X,), method="l2", ratio=0.5, capture=capture,
                                      round_to=None, must_shrink=["a", "grouped"])
    state = pruned.state_dict()
    assert state["a.weight"].shape == (8, 3, 3, 3) and state["grouped.weight"].shape == (12, 4, 3, 3)
    assert state["head.weight"].shape == (4, 12, 1, 1)
    kept = torch.tensor(rep.plan.keep["a"]).view(4, 2) % 4   # balanced: 2 of each group's 4 inputs
    gathers = [n for n in pruned.graph.nodes if n.target in (torch.gather, torch.ops.aten.gather.default)]
    assert len(gathers) == 1
    index = getattr(pruned, gathers[0].args[2].target)
    assert index.shape == (12, 2, 3, 3)
    assert torch.equal(index[::3, :, 0, 0], kept)   # each kept output row reads its own group's kept columns


def test_weights_computed_at_run_time_pin_for_a_module_copy():
    copy, rep = prune_and_check(ComputedWeights(), (X,), ratio=0.5, output="module", round_to=None)
    # the weight's computation (and its reshape(1, out_channels, -1)) is code the copy runs unchanged: the pin names it
    assert copy.b.out_channels == 16 and copy.a.out_channels == 16
    assert "a module copy runs that code unchanged" in rep.first_pin


class TokensBN(nn.Module):  # LeViT's linear + BatchNorm1d over tokens: bn(x.flatten(0, 1)).reshape_as(x)
    def __init__(self, cin, cout, view=False):
        super().__init__()
        self.fc, self.bn, self.view = nn.Linear(cin, cout), nn.BatchNorm1d(cout), view

    def forward(self, x):
        x = self.fc(x)
        y = self.bn(x.flatten(0, 1))
        return y.view_as(x) if self.view else y.reshape_as(x)


class RollsAndNorms(nn.Module):
    """Swin's shifted windows (``torch.roll`` over positions), a roll over the channels (a permutation),
    ConvNeXt-V2's global response norm (``torch.norm`` over positions, then a mean over the channels),
    cosine attention's ``F.normalize`` and ``linalg.vector_norm`` over the channels, LeViT's tokens BN (and its
    ``view_as`` spelling)."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Conv2d(3, 16, 4, stride=4)
        self.fc1 = nn.Linear(16, 32)
        self.gamma, self.beta = nn.Parameter(torch.rand(32)), nn.Parameter(torch.rand(32))
        self.fc2 = nn.Linear(32, 16)
        self.tok1, self.tok2 = TokensBN(16, 24), TokensBN(24, 16, view=True)
        self.head = nn.Linear(16, 5)

    def forward(self, x):
        x = self.embed(x).permute(0, 2, 3, 1)                      # [B, H, W, C]
        x = torch.roll(x, shifts=(1, 1), dims=(1, 2))
        y = F.gelu(self.fc1(x))
        gx = torch.norm(y, p=2, dim=(1, 2), keepdim=True)           # GRN: over positions
        y = self.gamma * (y * (gx / (gx.mean(dim=-1, keepdim=True) + 1e-6))) + self.beta + y
        y = self.fc2(y).roll(3, dims=3)                              # a roll of the channels
        x = x + F.normalize(y, dim=-1) * torch.linalg.vector_norm(y, dim=-1, keepdim=True).clamp(max=4.0)
        t = self.tok2(F.relu(self.tok1(x.flatten(1, 2))))
        return self.head(t.mean(1))


@pytest.mark.parametrize("capture", ["fx", "export"])
def test_rolls_vector_norms_and_reshape_as(capture):
    torch.manual_seed(0)
    model = RollsAndNorms()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm1d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 1.5)
    pruned, rep = prune_and_check(model, (X,), ratio=0.5, capture=capture, round_to=None,
                                  must_shrink=["embed", "fc1", "tok1.fc"])
    assert rep.pinned_groups == 1 and rep.mask["approximate_groups"] == 0   # the head's outputs only
    assert rep.mask["max_rel_diff"] < 1e-5


class ParamMatmul(nn.Module):  # SwiftFormer's additive attention: a 2-d parameter multiplied in, as a linear layer
    def __init__(self):
        super().__init__()
        self.q = nn.Linear(6, 16)
        self.w_g = nn.Parameter(torch.randn(16, 8))
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        q = F.normalize(self.q(x), dim=-1)
        return self.head(torch.relu(q @ self.w_g) + torch.einsum("bnc,cd->bnd", q, self.w_g))


@pytest.mark.parametrize("capture", ["fx", "export"])
def test_a_matmul_by_a_parameter_is_a_linear_layer(capture):
    torch.manual_seed(0)
    pruned, rep = prune_and_check(ParamMatmul(), (torch.randn(2, 5, 6),), ratio=0.5, capture=capture,
                                  round_to=None, must_shrink=["q"])
    state = pruned.state_dict()
    assert state["w_g"].shape == (8, 4) and state["q.weight"].shape == (8, 6)   # rows follow q, columns are new
    assert rep.mask["max_rel_diff"] < 1e-5


class Embeddings(nn.Module):
    """A token model's embedding tables in their three spellings (module, ``F.embedding``, ``torch.embedding``)
    summed into one residual stream, as a model that ``symbolic_trace`` captures writes them."""

    def __init__(self, max_norm=None):
        super().__init__()
        self.tok = nn.Embedding(10, 8, padding_idx=0, max_norm=max_norm)
        self.pos = nn.Parameter(torch.randn(4, 8))
        self.kind = nn.Parameter(torch.randn(2, 8))
        self.register_buffer("position_ids", torch.arange(4))
        self.up, self.down, self.head = nn.Linear(8, 16), nn.Linear(16, 8), nn.Linear(8, 3)

    def forward(self, ids):
        h = self.tok(ids) + F.embedding(self.position_ids, self.pos) + torch.embedding(self.kind, ids % 2)
        h = h + self.down(F.relu(self.up(h)))
        return self.head(h.mean(1))


@pytest.mark.parametrize("capture", ["fx", "export"])
@pytest.mark.parametrize("output", ["graph", "module"])
def test_embedding_tables_are_the_streams_producers(capture, output):
    torch.manual_seed(0)
    ids = torch.randint(0, 10, (3, 4))
    pruned, rep = prune_and_check(Embeddings(), (ids,), ratio=0.5, capture=capture, output=output,
                                  must_shrink=["tok"])
    state = pruned.state_dict()
    assert state["tok.weight"].shape == (10, 4) and state["pos"].shape == (4, 4) and state["kind"].shape == (2, 4)
    assert state["up.weight"].shape == (8, 4) and state["head.weight"].shape == (3, 4)
    if output == "module":
        assert pruned.tok.embedding_dim == 4 and pruned.tok.padding_idx == 0


@pytest.mark.parametrize("capture", ["fx", "export"])
def test_an_embedding_with_max_norm_keeps_its_width_and_the_users_table(capture):
    """``max_norm`` renormalises the rows looked up, in place, by a norm over their channels: the table stays
    whole, and fxprune's runs of the captured graph leave the user's table as it was (prune_and_check)."""
    torch.manual_seed(0)
    ids = torch.randint(0, 10, (3, 4))
    pruned, rep = prune_and_check(Embeddings(max_norm=1.0), (ids,), ratio=0.5, capture=capture, must_shrink=["up"])
    assert pruned.state_dict()["tok.weight"].shape == (10, 8)


class TransposedWeights(nn.Module):  # Falcon's linear layer: x @ weight.T (+ bias), in its spellings
    def __init__(self):
        super().__init__()
        self.a = nn.Parameter(torch.randn(16, 6))
        self.b = nn.Parameter(torch.randn(12, 16))
        self.c = nn.Parameter(torch.randn(3, 12))

    def forward(self, x):
        h = torch.relu(x @ self.a.t())
        h = torch.relu(h @ self.b.transpose(0, 1))
        return h @ self.c.permute(1, 0) + h @ self.c.T


@pytest.mark.parametrize("capture", ["fx", "export"])
def test_a_matmul_by_a_transposed_parameter_is_a_linear_layer(capture):
    torch.manual_seed(0)
    pruned, rep = prune_and_check(TransposedWeights(), (torch.randn(2, 5, 6),), ratio=0.5, capture=capture,
                                  round_to=None)
    state = pruned.state_dict()
    assert state["a"].shape == (8, 6) and state["b"].shape == (6, 8) and state["c"].shape == (3, 6)


class Experts(nn.Module):  # a mixture of experts as transformers runs it: rows sorted by expert, one grouped_mm each
    def __init__(self, d=16, hidden=32, experts=4, k=2, bias=False):
        super().__init__()
        self.k, self.experts = k, experts
        self.inp = nn.Linear(6, d)
        self.router = nn.Linear(d, experts, bias=False)
        self.gate_up = nn.Parameter(torch.randn(experts, 2 * hidden, d) / d ** 0.5)   # [E, out, in]
        self.down = nn.Parameter(torch.randn(experts, d, hidden) / hidden ** 0.5)
        self.gate_up_bias = nn.Parameter(torch.randn(experts, 2 * hidden)) if bias else None
        self.head = nn.Linear(d, 3)

    def forward(self, x):
        h = self.inp(x)
        flat = h.reshape(-1, h.shape[-1])
        weights, index = self.router(flat).topk(self.k, dim=-1)
        weights = weights.softmax(-1).reshape(-1)
        ids, perm = torch.sort(index.reshape(-1))
        rows = flat[perm // self.k]
        offs = torch.cumsum(torch.histc(ids.float(), bins=self.experts, min=0, max=self.experts - 1), 0,
                            dtype=torch.int32)
        y = torch._grouped_mm(rows, self.gate_up.transpose(-2, -1), offs=offs)
        if self.gate_up_bias is not None:
            y = y + self.gate_up_bias[ids]
        gate, up = y.chunk(2, dim=-1)
        y = torch._grouped_mm(F.silu(gate) * up, self.down.transpose(-2, -1), offs=offs) * weights[perm].unsqueeze(-1)
        moe = y[torch.argsort(perm)].view(flat.shape[0], self.k, -1).sum(1)
        return self.head(h + moe.view(h.shape))


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("ratio,d,hidden", [(0.5, 8, 16), (0.6, 8, 16), (0.3, 16, 24)])
def test_experts_of_a_grouped_mm_keep_the_same_channels(bias, ratio, d, hidden):
    torch.manual_seed(0)
    model = Experts(bias=bias)
    # fx only: torch.export's fake grouped_mm takes 16-bit floats alone (transformers' MoE exports through its own
    # op, tests/test_capture.py); no ONNX check: torch.onnx has no conversion of grouped_mm
    pruned, rep = prune_and_check(model, (torch.randn(2, 5, 6),), ratio=ratio, capture="fx", round_to=None,
                                  onnx=False, must_shrink=["_grouped_mm"])
    state = pruned.state_dict()
    # [E, out, in] of each expert; counts of 8 (grouped_mm's 16-byte rows), else the whole group (d at 0.3)
    assert state["gate_up"].shape == (4, 2 * hidden, d) and state["down"].shape == (4, d, hidden)
    assert state["router.weight"].shape == (4, d)   # the experts stay; the router reads the kept stream
    assert rep.mask["max_rel_diff"] < 1e-5
    assert rep.flops_before > 2 * 20 * 16 * 64 + 2 * 20 * 32 * 16 and rep.flops_after < rep.flops_before  # counted
    with torch.no_grad():   # routing is computed, not baked in: new tokens agree with the masked original
        x = torch.randn(3, 7, 6)
        assert pruned(x).shape == model(x).shape == (3, 7, 3)


class WidthRead(nn.Module):
    """Numbers computed from a channel count read at run time (DaViT's and XCiT's ``B, N, C = x.shape``):
    the attention's scale from the stream's width, and a reshape to ``C`` of channels an op pins."""
    def __init__(self):
        super().__init__()
        self.inp, self.q, self.k = nn.Linear(5, 16), nn.Linear(16, 8), nn.Linear(16, 8)
        self.v, self.out, self.out2 = nn.Linear(16, 16), nn.Linear(16, 3), nn.Linear(16, 3)

    def forward(self, x):
        h = self.inp(x)
        b, n, c = h.shape
        attn = (self.q(h) @ self.k(h).transpose(-2, -1) * c ** -0.5).softmax(-1)
        mixed = (attn @ self.v(h).softmax(-1)).transpose(1, 2).reshape(b, c, n)  # v's channels: pinned
        return self.out(h) + self.out2(mixed.transpose(1, 2))


@pytest.mark.parametrize("capture", ["fx", "export"])
def test_a_number_computed_from_a_channel_count_is_the_original_number(capture):
    torch.manual_seed(0)
    model, x = WidthRead().eval(), torch.randn(2, 6, 5)
    pruned, rep = prune_and_check(model, (x,), ratio=0.5, round_to=None, capture=capture, must_shrink=["inp", "q"])
    assert pruned.state_dict()["inp.weight"].shape == (8, 5) and pruned.state_dict()["q.weight"].shape == (4, 8)
    assert pruned.state_dict()["v.weight"].shape == (16, 8)
    floats = [a for n in pruned.graph.nodes for a in n.args if isinstance(a, float)]
    assert 0.25 in floats   # 16 ** -0.5: the masked original's scale
    assert rep.mask["max_rel_diff"] < 1e-5



def rotate_every_two(x):  # GPT-J's interleaved rotary: dims (2i, 2i + 1) turn together
    return torch.stack((-x[..., 1::2], x[..., ::2]), dim=-1).flatten(-2)


def rotate_as_eva(x):  # timm's EVA: the same, back to x's shape read at run time
    return torch.stack([-x[..., 1::2], x[..., ::2]], -1).reshape(x.shape)


class InterleavedRotary(nn.Module):
    def __init__(self, rotate=rotate_every_two):
        super().__init__()
        self.rotate = rotate
        self.inp, self.q, self.k = nn.Linear(5, 16), nn.Linear(16, 8), nn.Linear(16, 8)
        self.v, self.out = nn.Linear(16, 16), nn.Linear(16, 3)
        self.register_buffer("inv_freq", 1.0 / 100 ** (torch.arange(4) / 4))

    def forward(self, x):
        h = self.inp(x)
        ang = torch.repeat_interleave(torch.arange(x.shape[1], dtype=x.dtype)[:, None] * self.inv_freq, 2, dim=-1)
        q, k = self.q(h), self.k(h)
        q = q * ang.cos() + self.rotate(q) * ang.sin()
        k = k * ang.cos() + self.rotate(k) * ang.sin()
        return self.out(h + (q @ k.transpose(-2, -1)).softmax(-1) @ self.v(h))


@pytest.mark.parametrize("capture", ["fx", "export"])
@pytest.mark.parametrize("rotate", [rotate_every_two, rotate_as_eva])
def test_every_second_channel_ties_pairs(capture, rotate):
    torch.manual_seed(0)
    pruned, rep = prune_and_check(InterleavedRotary(rotate), (torch.randn(2, 6, 5),), ratio=0.5, round_to=None,
                                  capture=capture, must_shrink=["q"])
    assert rep.plan.sizes["q"] == 4 and len(rep.plan.keep["q"]) == 2  # q's and k's 8 dims: 4 pairs, one channel each
    assert pruned.state_dict()["q.weight"].shape[0] == 4
    assert rep.mask["max_rel_diff"] < 1e-5


def test_a_strided_slice_reads_the_kept_blocks():
    from fxprune.ops.shape import kept_slice
    kept = torch.tensor([1, 1, 0, 0, 1, 1, 1, 1], dtype=torch.bool)   # blocks of 2: 0, 2 and 3 kept
    x = torch.arange(8)
    for item in (slice(None, None, 2), slice(1, None, 2), slice(2, 7, 2), slice(3, 8, 2), slice(4, 4, 2)):
        assert x[kept][kept_slice(kept, item.start, item.stop, item.step)].tolist() == \
            [i for i in x[item].tolist() if kept[i]]
    assert kept_slice(kept, 1, 6, None) == slice(1, 4)


class ECA(nn.Module):  # efficient channel attention: a conv over the pooled channels' axis
    def __init__(self):
        super().__init__()
        self.stem, self.conv = nn.Conv2d(3, 16, 3, padding=1), nn.Conv2d(16, 16, 3, padding=1)
        self.head = nn.Linear(16, 3)
        self.eca = nn.Conv1d(1, 1, 5, padding=2, bias=False)

    def forward(self, x):
        x = F.relu(self.stem(x))
        y = self.conv(x)
        gate = self.eca(y.mean((2, 3)).view(y.shape[0], 1, -1)).sigmoid().view(y.shape[0], -1, 1, 1)
        return self.head((x + y * gate).mean((2, 3)))


@pytest.mark.parametrize("capture", ["fx", "export"])
def test_a_conv_over_the_channels_runs_at_the_original_width(capture):
    torch.manual_seed(0)
    pruned, rep = prune_and_check(ECA(), (X,), ratio=0.5, round_to=None, capture=capture, must_shrink=["stem"])
    assert pruned.state_dict()["stem.weight"].shape[0] == 8
    selects = [n for n in pruned.graph.nodes if n.target is torch.index_select]
    assert len(selects) == 2   # spread to 16 positions with zeros, then the 8 kept read back
    assert rep.mask["max_rel_diff"] < 1e-5


def test_a_conv_over_the_channels_pins_for_a_module_copy():
    copy = fxprune.compile(ECA().eval(), (X,), ratio=0.5, onnx=False, round_to=None, output="module")
    rep = fxprune.report(copy)
    assert copy.stem.out_channels == 16 and "stem" not in rep.plan.keep
    assert "neighbouring channels" in rep.first_pin and "test_rules.py" in rep.first_pin


class AlibiScores(nn.Module):  # Bloom: scores = baddbmm(alibi, q, k^T), heads folded into the batch
    def __init__(self):
        super().__init__()
        self.inp, self.qkv, self.out = nn.Linear(5, 16), nn.Linear(16, 48), nn.Linear(16, 3)
        self.register_buffer("slopes", torch.tensor([0.5, 0.25]))

    def forward(self, x):
        n = x.shape[1]
        h = self.inp(x)
        q, k, v = self.qkv(h).view(1, n, 2, 3, 8).unbind(3)   # per head: its q, k and v
        q, k, v = (t.transpose(1, 2).reshape(2, n, 8) for t in (q, k, v))
        alibi = (self.slopes[:, None] * torch.arange(n, dtype=x.dtype))[:, None, :]
        scores = torch.baddbmm(alibi, q, k.transpose(1, 2), beta=1.0, alpha=8 ** -0.5).softmax(-1)
        y = torch.bmm(scores, v).view(1, 2, n, 8).transpose(1, 2).reshape(1, n, 16)
        return self.out(h + torch.multiply(y, 0.5))


@pytest.mark.parametrize("capture", ["fx", "export"])
def test_scores_added_to_a_batched_product_prune_like_a_matmul(capture):
    torch.manual_seed(0)
    model, x = AlibiScores().eval(), torch.randn(1, 6, 5)
    graph = fxprune.analyze(model, (x,), capture=capture)
    assert all(g.prunable == g.size for name, g in graph.groups.items() if name != "out"), \
        {name: [p.reason for p in g.pins] for name, g in graph.groups.items()}
    pruned, rep = prune_and_check(model, (x,), ratio=0.5, round_to=None, capture=capture, must_shrink=["inp"])
    assert pruned.state_dict()["qkv.weight"].shape == (24, 8)   # q, k, v of 2 heads: 4 dims each, the 8 kept
    assert rep.mask["max_rel_diff"] < 1e-5


class DeadRead(nn.Module):  # Bart: embed_positions(inputs_embeds[:, :, -1]) reads a channel "for the shape only"
    def __init__(self):
        super().__init__()
        self.inp, self.out = nn.Linear(5, 16), nn.Linear(16, 3)
        self.pos = nn.Parameter(torch.randn(6, 16))

    def forward(self, x):
        h = self.inp(x)
        n = h[:, :, -1].shape[1]
        return self.out(h + self.pos[:n])


def test_a_channel_read_for_its_shape_only_pins_nothing():
    graph = fxprune.analyze(DeadRead().eval(), (torch.randn(1, 6, 5),), capture="export")
    assert graph.groups["inp"].prunable == 16


class RelPosEinsum(nn.Module):  # SAM / MViT-v2: q summed against a position table computed from parameters
    def __init__(self):
        super().__init__()
        self.inp, self.q, self.k = nn.Linear(5, 16), nn.Linear(16, 8), nn.Linear(16, 8)
        self.v, self.out = nn.Linear(16, 16), nn.Linear(16, 3)
        self.rel = nn.Parameter(torch.randn(11, 8))

    def forward(self, x):
        n = x.shape[1]
        h = self.inp(x)
        q, k = self.q(h), self.k(h)
        table = self.rel[torch.arange(n)[:, None] - torch.arange(n)[None, :] + n - 1]   # [n, n, dims]
        scores = q @ k.transpose(1, 2) + torch.einsum("bqd,qkd->bqk", q, table)
        return self.out(h + scores.softmax(-1) @ self.v(h))


@pytest.mark.parametrize("capture", ["fx", "export"])
def test_a_table_summed_against_channels_is_read_at_the_kept_ones(capture):
    torch.manual_seed(0)
    model, x = RelPosEinsum().eval(), torch.randn(2, 6, 5)
    pruned, rep = prune_and_check(model, (x,), ratio=0.5, round_to=None, capture=capture, must_shrink=["q"])
    assert pruned.state_dict()["q.weight"].shape[0] == 4 and pruned.state_dict()["rel"].shape == (11, 8)
    assert rep.mask["max_rel_diff"] < 1e-5
    copy = fxprune.compile(model, (x,), ratio=0.5, onnx=False, round_to=None, output="module", capture=capture)
    assert copy.q.out_features == 8 and "kept positions" in fxprune.report(copy).first_pin


class PaddedChannels(nn.Module):  # EfficientViT's linear attention: a row of ones appended to v's channels
    def __init__(self):
        super().__init__()
        self.inp, self.mid, self.out = nn.Linear(5, 16), nn.Linear(17, 8), nn.Linear(8, 3)
        self.zero = nn.ConstantPad1d((2, 0), 0.0)

    def forward(self, x):
        h = F.relu(self.inp(x))
        y = self.mid(F.pad(h, (0, 1), mode="constant", value=1.0))
        return self.out(self.zero(y)[..., 2:])


@pytest.mark.parametrize("capture", ["fx", "export"])
def test_channels_padded_by_a_constant_keep_the_padding(capture):
    torch.manual_seed(0)
    pruned, rep = prune_and_check(PaddedChannels(), (torch.randn(2, 5),), ratio=0.5, round_to=None, capture=capture,
                                  must_shrink=["inp", "mid"])
    assert pruned.state_dict()["mid.weight"].shape == (4, 9)   # 8 kept and the padded one


class SpatialMaxGate(nn.Module):  # CBAM's spatial attention: the mean and the maximum over the channels
    def __init__(self):
        super().__init__()
        self.stem, self.conv = nn.Conv2d(3, 16, 3, padding=1), nn.Conv2d(2, 1, 3, padding=1)
        self.head = nn.Linear(16, 3)

    def forward(self, x):
        x = self.stem(x)
        neg, pos = -F.relu(x) - 0.1, F.relu(x) + 0.1   # a removed channel, a zero, is their maximum / minimum
        pooled = torch.cat([neg.mean(1, keepdim=True), torch.max(neg, 1, keepdim=True)[0]], 1)
        x = x * self.conv(pooled).sigmoid() + pos.amin(1, keepdim=True) * neg.amax((1, 2), keepdim=True)
        return self.head(x.mean((2, 3)))


@pytest.mark.parametrize("capture", ["fx", "export"])
def test_a_maximum_over_channels_is_the_masked_originals(capture):
    torch.manual_seed(0)
    pruned, rep = prune_and_check(SpatialMaxGate(), (X,), ratio=0.5, round_to=None, capture=capture,
                                  must_shrink=["stem"])
    assert pruned.state_dict()["stem.weight"].shape[0] == 8 and rep.mask["max_rel_diff"] < 1e-5


def test_a_maximum_over_channels_pins_for_a_module_copy():
    copy = fxprune.compile(SpatialMaxGate().eval(), (X,), ratio=0.5, onnx=False, round_to=None, output="module")
    assert copy.stem.out_channels == 16 and "stem" not in fxprune.report(copy).plan.keep


class Unfolded(nn.Module):  # ConvBERT's span convolution, TNT: patches of a map unfolded into channels x kernel
    def __init__(self):
        super().__init__()
        self.stem, self.head = nn.Conv2d(3, 8, 3, padding=1), nn.Linear(8 * 4, 3)
        self.unfold = nn.Unfold(2, stride=2)

    def forward(self, x):
        x = F.relu(self.stem(x))
        a = F.unfold(x, kernel_size=(2, 2), stride=2) + self.unfold(x)   # [n, 8 * 4, L]
        return self.head(a.transpose(1, 2)).mean(1)


@pytest.mark.parametrize("capture", ["fx", "export"])
def test_unfolded_channels_carry_their_kernel_positions(capture):
    torch.manual_seed(0)
    pruned, rep = prune_and_check(Unfolded(), (X,), ratio=0.5, round_to=None, capture=capture, must_shrink=["stem"])
    assert pruned.state_dict()["head.weight"].shape == (3, 16)   # 4 kept channels, 4 kernel positions each


class HeadsInBatch(nn.Module):  # HaloNets: heads folded into the batch, a size read back from that dim
    def __init__(self):
        super().__init__()
        self.inp, self.q = nn.Linear(5, 16), nn.Linear(16, 16)
        self.out, self.out2 = nn.Linear(16, 3), nn.Linear(16, 3)

    def forward(self, x):
        b, n, _ = x.shape
        h = self.inp(x)
        q = self.q(h).view(b, n, 2, 8).transpose(1, 2).reshape(b * 2, n, 8)
        y = (q @ q.transpose(1, 2)).softmax(-1) @ q
        return self.out(h) + self.out2(y.reshape(q.shape[0] // 2, 2, n, 8).transpose(1, 2).reshape(b, n, 16))


def test_a_number_that_follows_the_batch_is_not_folded():
    model, x = HeadsInBatch().eval(), torch.randn(1, 6, 5)   # at batch 1, dim 0 of q holds the 2 heads alone
    graph = fxprune.analyze(model, (x,), capture="fx")
    assert not [n.name for n in graph.module.graph.nodes if "fxprune_fold" in n.meta]   # q.shape[0] // 2 is read
    assert graph.groups["inp"].prunable == 16


class Folded(nn.Module):  # VOLO's outlook attention: unfold, weigh each kernel position, fold back
    def __init__(self):
        super().__init__()
        self.stem, self.head = nn.Conv2d(3, 8, 3, padding=1), nn.Linear(8, 3)

    def forward(self, x):
        x = F.relu(self.stem(x))
        cols = F.unfold(x, kernel_size=3, padding=1) * 0.5     # [n, 8 * 9, h * w]
        y = F.fold(cols, output_size=x.shape[-2:], kernel_size=3, padding=1)
        return self.head((x + y).mean((2, 3)))


@pytest.mark.parametrize("capture", ["fx", "export"])
def test_folded_channels_come_back_whole(capture):
    torch.manual_seed(0)
    pruned, rep = prune_and_check(Folded(), (X,), ratio=0.5, round_to=None, capture=capture, must_shrink=["stem"])
    assert pruned.state_dict()["stem.weight"].shape[0] == 4 and rep.mask["max_rel_diff"] < 1e-5


class TransposedAttention(nn.Module):  # Restormer's MDTA, XCiT's XCA: attention across channels, not positions
    def __init__(self, dim=16, heads=2):
        super().__init__()
        self.heads = heads
        self.inp, self.qkv, self.proj = nn.Conv2d(3, dim, 1), nn.Conv2d(dim, 3 * dim, 1), nn.Conv2d(dim, 4, 1)
        self.temperature = nn.Parameter(torch.rand(heads, 1, 1) + 0.5)

    def forward(self, x):
        x = self.inp(x)
        b, c, h, w = x.shape
        q, k, v = (t.reshape(b, self.heads, c // self.heads, h * w) for t in self.qkv(x).chunk(3, dim=1))
        q, k = F.normalize(q, dim=-1), F.normalize(k, dim=-1)
        attn = (q @ k.transpose(-2, -1) * self.temperature).softmax(dim=-1)   # [heads, q's dims, k's dims]
        return self.proj((attn @ v).reshape(b, c, h, w))


@pytest.mark.parametrize("capture", ["fx", "export"])
def test_attention_across_channels_keeps_the_softmaxed_ones(capture):
    """``softmax(q @ k^T)`` over k's channels: k's stay (a softmax over channels cannot shrink), q's rows
    go to the output and prune, and v's, summed against k's positions, prune on their own."""
    torch.manual_seed(0)
    model, x = TransposedAttention().eval(), torch.randn(2, 3, 5, 5)
    graph = fxprune.analyze(model, (x,), capture=capture)
    pins = [p.reason for g in graph.groups.values() for p in g.pins]
    assert sum("several output dims, and a softmax normalises over these" in r for r in pins) == 1
    pruned, rep = prune_and_check(model, (x,), ratio=0.5, round_to=None, capture=capture, must_shrink=["qkv"])
    qkv, proj = pruned.state_dict()["qkv.weight"], pruned.state_dict()["proj.weight"]
    assert 0 < proj.shape[1] < 16                        # the output carries q's kept rows
    assert qkv.shape[0] == 24 and qkv.shape[0] - proj.shape[1] - 16 > 0   # all of k's 16, some of v's


class SoftmaxModules(nn.Module):  # Swin V2's `self.softmax = nn.Softmax(dim=-1)`; a segmentation head's over classes
    def __init__(self, over_channels):
        super().__init__()
        self.inp, self.q, self.k, self.v = nn.Linear(5, 16), nn.Linear(16, 8), nn.Linear(16, 8), nn.Linear(16, 12)
        self.out = nn.Linear(12, 3)
        self.softmax = nn.Softmax(dim=-1) if not over_channels else nn.LogSoftmax(dim=2)

    def forward(self, x):
        h = self.inp(x)
        if isinstance(self.softmax, nn.LogSoftmax):   # over v's channels: they stay
            return self.out(self.softmax(self.v(h)))
        return self.out(self.softmax(self.q(h) @ self.k(h).transpose(1, 2)) @ self.v(h))


@pytest.mark.parametrize("capture", ["fx", "export"])
def test_softmax_modules_normalise_over_their_dim(capture):
    torch.manual_seed(0)
    x = torch.randn(2, 6, 5)
    pruned, _ = prune_and_check(SoftmaxModules(False).eval(), (x,), ratio=0.5, round_to=None, capture=capture,
                                must_shrink=["q", "v"])
    assert pruned.state_dict()["q.weight"].shape[0] == 4 and pruned.state_dict()["v.weight"].shape[0] == 6
    graph = fxprune.analyze(SoftmaxModules(True).eval(), (x,), capture=capture)
    v = next(g for g in graph.groups.values() if g.name == "v")
    assert v.prunable == 0 and "normalises over the channels" in v.pins[0].reason


class Recurrent(nn.Module):  # Sequencer: an LSTM over the rows of a feature map, between linear layers
    def __init__(self, cell, bidirectional):
        super().__init__()
        self.inp = nn.Linear(4, 8)
        self.rnn = cell(8, 5, batch_first=True, bidirectional=bidirectional)
        self.out = nn.Linear(10 if bidirectional else 5, 3)

    def forward(self, x):
        y, _ = self.rnn(torch.relu(self.inp(x)))
        return self.out(y)


@pytest.mark.parametrize("capture", ["fx", "export"])
@pytest.mark.parametrize("cell, bidirectional", [(nn.LSTM, True), (nn.GRU, False), (nn.RNN, True)])
def test_a_recurrent_layer_reads_the_kept_input_features(cell, bidirectional, capture):
    """Its input weights' columns follow the features it reads; what it makes (its hidden state) stays."""
    torch.manual_seed(0)
    model, x = Recurrent(cell, bidirectional).eval(), torch.randn(2, 7, 4)
    pruned, rep = prune_and_check(model, (x,), ratio=0.5, round_to=None, capture=capture, must_shrink=["inp"])
    state = pruned.state_dict()
    assert state["inp.weight"].shape == (4, 4) and state["rnn.weight_ih_l0"].shape[1] == 4
    assert state["rnn.weight_hh_l0"].shape == model.rnn.weight_hh_l0.shape and state["out.weight"].shape[1] == \
        model.out.in_features
    copy = fxprune.compile(model, (x,), ratio=0.5, onnx=False, round_to=None, output="module", capture=capture)
    assert copy.rnn.input_size == 4 and fxprune.report(copy).mask["module"]["ok"]


def group_std(x, groups, eps=1e-5):   # timm's EvoNorm: the std of each group, spread back over its channels
    b, c, h, w = x.shape
    torch._assert(c % groups == 0, "channels must split into the groups")
    x = x.reshape(b, groups, c // groups, h, w)
    std = x.var(dim=(2, 3, 4), unbiased=False, keepdim=True).add(eps).sqrt()
    return std.expand(x.shape).reshape(b, c, h, w)


class GroupStd(nn.Module):
    def __init__(self, channels=32, group_size=4):
        super().__init__()
        self.groups = channels // group_size
        self.a, self.b = nn.Conv2d(3, channels, 3, padding=1), nn.Conv2d(channels, 4, 1)
        self.weight = nn.Parameter(torch.rand(1, channels, 1, 1) + 0.5)

    def forward(self, x):
        y = self.a(x)
        return self.b(y * torch.sigmoid(y) / group_std(y, self.groups) * self.weight)


@pytest.mark.parametrize("capture", ["fx", "export"])
def test_a_variance_over_each_group_prunes_whole_groups(capture):
    """``x.reshape(b, groups, c // groups, h, w).var((2, 3, 4))``: groups go whole, the std is expanded to the
    pruned shape, and the check ``c % groups == 0`` sees the original's numbers (5 of 8 groups kept: 20 % 8 != 0)."""
    torch.manual_seed(0)
    model, x = GroupStd().eval(), torch.randn(2, 3, 6, 6)
    pruned, rep = prune_and_check(model, (x,), ratio=0.375, round_to=None, capture=capture, must_shrink=["a"])
    assert pruned.state_dict()["a.weight"].shape[0] == 20 and rep.mask["max_rel_diff"] < 1e-5
    groups = model.a.weight.detach().view(8, 4, -1)   # the kept rows are whole groups of 4
    kept = pruned.state_dict()["a.weight"].view(5, 4, -1)
    assert all(any(torch.equal(k, g) for g in groups) for k in kept)


class GroupedThenGroupStd(nn.Module):  # RegNetZ with EvoNorm: a norm group spans whole groups of a grouped conv
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 32, 3, padding=1)
        self.g = nn.Conv2d(32, 32, 3, padding=1, groups=4)   # groups of 8 channels
        self.b = nn.Conv2d(32, 4, 1)

    def forward(self, x):
        y = self.a(x)
        y = y / group_std(y, 2)                              # norm groups of 16: two conv groups each
        return self.b(self.g(y))


@pytest.mark.parametrize("capture", ["fx", "export"])
def test_a_grouped_conv_keeps_its_groups_when_other_ties_make_them_whole(capture):
    """Whole norm groups would make the conv's groups go whole, which its rewrite cannot cut: their columns
    are tied instead (all of the conv's input kept), and the model is pruned elsewhere, verified."""
    torch.manual_seed(0)
    model, x = GroupedThenGroupStd().eval(), torch.randn(2, 3, 6, 6)
    pruned, rep = prune_and_check(model, (x,), ratio=0.5, round_to=None, capture=capture, must_shrink=["g"])
    assert pruned.state_dict()["g.weight"].shape[1] == 8 and pruned.state_dict()["a.weight"].shape[0] == 32


class GroupNormIntoHeads(nn.Module):  # a GroupNorm whose groups are exactly the heads of the attention after it
    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(5, 8)
        self.norm = nn.GroupNorm(2, 8)
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
        self.out = nn.Linear(8, 3)

    def forward(self, x):
        h = self.inp(x)
        h = self.norm(h.transpose(1, 2)).transpose(1, 2)
        return self.out(h + self.attn(h, h, h, need_weights=False)[0])


@pytest.mark.parametrize("capture", ["fx", "export"])
def test_attention_heads_made_whole_by_a_norm_keep_the_module_s_heads(capture):
    """The GroupNorm takes each head's channels whole. nn.MultiheadAttention keeps its num_heads, so a head
    cannot go whole: the heads' columns are tied too (the stream kept), not cut into a plan the module cannot
    run. Exported, the attention is ops whose reshape into heads can lose a head: one GroupNorm group goes."""
    torch.manual_seed(0)
    model, x = GroupNormIntoHeads().eval(), torch.randn(2, 6, 5)
    pruned, rep = prune_and_check(model, (x,), ratio=0.5, round_to=None, capture=capture)
    assert rep.mask["max_rel_diff"] < 1e-5
    assert pruned.state_dict()["out.weight"].shape[1] == (8 if capture == "fx" else 4)


class KeywordInput(nn.Module):  # every argument of the functional conv given by keyword, the input too
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(16, 3, 3, 3))
        self.b = nn.Parameter(torch.randn(16))
        self.head = nn.Conv2d(16, 4, 1)

    def forward(self, x):
        return self.head(F.relu(F.conv2d(input=x, weight=self.w, bias=self.b, padding=1)))


@pytest.mark.parametrize("capture,output", [("fx", "graph"), ("fx", "module"), ("export", "graph")])
def test_a_functional_conv_given_its_input_by_keyword_prunes(capture, output):
    torch.manual_seed(0)
    pruned, rep = prune_and_check(KeywordInput(), (torch.randn(2, 3, 8, 8),), ratio=0.5, capture=capture,
                                  output=output, round_to=None, onnx=output == "graph")
    assert pruned.state_dict()["w"].shape == (8, 3, 3, 3) and pruned.state_dict()["head.weight"].shape == (4, 8, 1, 1)


class ConformerConv(nn.Module):  # Conformer's convolution module: a pointwise conv to 2C, GLU over the channels, depthwise
    def __init__(self, functional=False):
        super().__init__()
        self.functional = functional
        self.up = nn.Conv1d(8, 32, 1)
        self.glu = nn.GLU(dim=1)
        self.dw = nn.Conv1d(16, 16, 3, padding=1, groups=16)
        self.down = nn.Conv1d(16, 8, 1)
        self.ffn = nn.Linear(8, 24)
        self.out = nn.Linear(12, 8)

    def forward(self, x):  # x: [batch, channels, time]
        h = self.up(x)
        h = F.glu(h, dim=1) if self.functional else self.glu(h)
        x = x + self.down(F.silu(self.dw(h)))
        return self.out(F.glu(self.ffn(x.transpose(1, 2))))   # GLU along the last dim, too


@pytest.mark.parametrize("capture,functional", [("fx", False), ("fx", True), ("export", False)])
def test_glu_ties_the_two_halves_position_by_position(capture, functional):
    torch.manual_seed(0)
    pruned, rep = prune_and_check(ConformerConv(functional), (torch.randn(2, 8, 10),), ratio=0.5, capture=capture,
                                  round_to=None)
    sd = pruned.state_dict()
    assert sd["up.weight"].shape == (16, 8, 1) and sd["dw.weight"].shape == (8, 1, 3)
    assert sd["ffn.weight"].shape[0] == 12 and sd["out.weight"].shape[1] == 6
    # the kept rows of each half are the same positions: half i gates half i
    kept = [i for i in range(32) if any(torch.equal(ConformerConv(functional).up.weight[i], r) for r in sd["up.weight"])]
    assert [k for k in kept if k < 16] == [k - 16 for k in kept if k >= 16]


def test_glu_module_copy_prunes():
    torch.manual_seed(0)
    pruned, rep = prune_and_check(ConformerConv(), (torch.randn(2, 8, 10),), ratio=0.5, output="module",
                                  round_to=None, onnx=False)
    assert isinstance(pruned, ConformerConv) and pruned.up.out_channels == 16 and pruned.ffn.out_features == 12


class EmptyCache(nn.Module):  # XLM / Flaubert: a key cache starts as torch.tensor([]), joined along the tokens
    def __init__(self):
        super().__init__()
        self.k = nn.Linear(8, 16)
        self.out = nn.Linear(16, 4)

    def forward(self, x):
        k = torch.cat([torch.tensor([]), self.k(x)], dim=-2)   # torch.cat skips the 1-d empty piece
        return self.out(torch.relu(k))


@pytest.mark.parametrize("capture", ["fx", "export"])
def test_a_cat_with_an_empty_1d_piece_prunes(capture):
    torch.manual_seed(0)
    pruned, rep = prune_and_check(EmptyCache(), (torch.randn(2, 5, 8),), ratio=0.5, capture=capture, round_to=None)
    assert pruned.state_dict()["k.weight"].shape == (8, 8) and pruned.state_dict()["out.weight"].shape == (4, 8)


class InstanceNormed(nn.Module):  # RAFT's feature encoder: convs with instance norms (affine, and not)
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 16, 3, padding=1)
        self.na = nn.InstanceNorm2d(16, affine=True)
        self.b = nn.Conv2d(16, 12, 3, padding=1)
        self.c = nn.Conv2d(12, 4, 1)

    def forward(self, x):
        x = torch.relu(self.na(self.a(x)))
        x = self.b(x)
        x = F.instance_norm(x)
        return self.c(torch.relu(x))


@pytest.mark.parametrize("capture", ["fx", "export"])
def test_instance_norm_prunes_channel_by_channel(capture):
    torch.manual_seed(0)
    model = InstanceNormed()
    with torch.no_grad():
        model.na.weight.uniform_(0.5, 1.5), model.na.bias.uniform_(-0.5, 0.5)
    pruned, rep = prune_and_check(model, (torch.randn(2, 3, 8, 8),), ratio=0.5, capture=capture, round_to=None)
    sd = pruned.state_dict()
    assert sd["a.weight"].shape[0] == 8 and sd["na.weight"].shape == (8,) and sd["b.weight"].shape[0] == 6


class ShiftRight(nn.Module):  # Bart's shift_tokens_right: a bare squeeze, then an indexed write
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(50, 16)
        self.fc = nn.Linear(16, 32)
        self.out = nn.Linear(32, 8)

    def forward(self, ids):
        shifted = ids.new_zeros(ids.shape)
        shifted[:, 1:] = ids[:, :-1].clone()
        shifted[:, 0] = ids.gather(1, (ids.ne(0).sum(dim=1) - 1).unsqueeze(-1)).squeeze()
        return self.out(torch.relu(self.fc(self.emb(shifted))))


def test_an_exported_bare_squeeze_keeps_the_batch_dim_at_batch_1():
    """Exported with a symbolic batch (so not 1), a bare squeeze at batch 1 would drop the batch dim too; the
    ONNX file of that graph did not load. The capture names the dims that were 1."""
    ids = torch.randint(1, 50, (1, 6), generator=torch.Generator().manual_seed(0))
    pruned, rep = prune_and_check(ShiftRight(), (ids,), ratio=0.5, capture="export", round_to=None,
                                  must_shrink=["fc"])
    squeezes = [n for n in pruned.graph.nodes if "squeeze" in str(n.target) and "unsqueeze" not in str(n.target)]
    assert [str(n.target) for n in squeezes] == ["aten.squeeze.dims"] and squeezes[0].args[1] == [1]


class Warp(nn.Module):  # RAFT, spatial transformers: features sampled at the points a conv predicts
    def __init__(self):
        super().__init__()
        self.feat = nn.Conv2d(3, 16, 3, padding=1)
        self.flow = nn.Conv2d(16, 2, 3, padding=1)
        self.head = nn.Conv2d(16, 4, 1)

    def forward(self, x):
        f = torch.relu(self.feat(x))
        grid = torch.tanh(self.flow(f)).permute(0, 2, 3, 1)
        return self.head(F.grid_sample(f, grid, align_corners=False))


@pytest.mark.parametrize("capture", ["fx", "export"])
def test_grid_sample_passes_channels_and_keeps_its_grid_whole(capture):
    torch.manual_seed(0)
    pruned, rep = prune_and_check(Warp(), (torch.randn(2, 3, 8, 8),), ratio=0.5, capture=capture, round_to=None)
    sd = pruned.state_dict()
    assert sd["feat.weight"].shape[0] == 8 and sd["head.weight"].shape == (4, 8, 1, 1)
    assert sd["flow.weight"].shape == (2, 8, 3, 3)   # its two outputs are the grid's coordinates


@torch.fx.wrap
def add_in_place(x, shortcut):  # torchvision MViT's _add_shortcut: traced as one call, which acts in place
    x[:, :, 1:] += shortcut[:, :, 1:]
    return x


class InPlaceShortcut(nn.Module):
    def __init__(self):
        super().__init__()
        self.q, self.v, self.mlp, self.out = nn.Linear(8, 16), nn.Linear(8, 16), nn.Linear(8, 32), nn.Linear(16, 4)

    def forward(self, x):
        y = torch.relu(self.v(x)) * 2
        add_in_place(y, self.q(x))   # its result is dropped: y itself changed
        return self.out(y) + self.out(torch.relu(self.mlp(x))[..., :16])


@pytest.mark.parametrize("capture", ["fx", "export"])
def test_a_call_whose_result_is_dropped_stays_in_the_pruned_graph(capture):
    torch.manual_seed(0)
    pruned, rep = prune_and_check(InPlaceShortcut(), (torch.randn(2, 5, 8),), ratio=0.5, capture=capture,
                                  round_to=None)
    if capture == "fx":
        assert any(n.target is add_in_place for n in pruned.graph.nodes)


class PReLUs(nn.Module):  # a slope per channel, as a module and as a call
    def __init__(self):
        super().__init__()
        self.a, self.act_a = nn.Conv2d(3, 16, 3, padding=1), nn.PReLU(16)
        self.b, self.slope = nn.Conv2d(16, 12, 1), nn.Parameter(torch.rand(12))
        self.c, self.act_c = nn.Conv2d(12, 4, 1), nn.PReLU()

    def forward(self, x):
        x = F.prelu(self.b(self.act_a(self.a(x))), self.slope)
        return self.act_c(self.c(x))


@pytest.mark.parametrize("capture", ["fx", "export"])
def test_prelu_slopes_follow_their_channels(capture):
    torch.manual_seed(0)
    pruned, rep = prune_and_check(PReLUs(), (torch.randn(2, 3, 8, 8),), ratio=0.5, capture=capture, round_to=None)
    sd = pruned.state_dict()
    assert sd["act_a.weight"].shape == (8,) and sd["slope"].shape == (6,) and sd["c.weight"].shape == (4, 6, 1, 1)


class OrderedOut(nn.Module):  # torchvision's segmentation models return an OrderedDict
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 16, 3, padding=1), nn.Conv2d(16, 4, 1)

    def forward(self, x):
        result = collections.OrderedDict()
        result["out"] = self.b(torch.relu(self.a(x)))
        return result


def test_a_model_returning_an_ordered_dict_still_does_pruned_and_reloaded(tmp_path):
    torch.manual_seed(0)
    x = torch.randn(2, 3, 8, 8)
    pruned = fxprune.compile(OrderedOut().eval(), (x,), method="l2", ratio=0.5, round_to=None, capture="fx")
    rep = fxprune.report(pruned)
    assert rep.mask["ok"] and rep.onnx["ok"] and pruned.state_dict()["a.weight"].shape[0] == 8
    assert type(pruned(x)) is collections.OrderedDict
    fxprune.save(pruned, tmp_path / "p.pt")
    again = fxprune.load(tmp_path / "p.pt", OrderedOut, (x,))
    assert type(again(x)) is collections.OrderedDict and torch.allclose(again(x)["out"], pruned(x)["out"])


class CondConv(nn.Module):  # timm's CondConv2d: the batch folded into the channels, groups=self.groups * B
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.routing = nn.Linear(8, 2)
        self.experts = nn.Parameter(torch.randn(2, 8 * 8 * 3 * 3) / 24)
        self.kw = nn.Conv2d(8, 12, 1)
        self.head = nn.Conv2d(12, 4, 1)

    def forward(self, x):
        x = torch.relu(self.stem(x))
        b, c, h, w = x.shape
        weight = (torch.sigmoid(self.routing(x.mean((2, 3)))) @ self.experts).view(b * 8, c, 3, 3)
        x = F.conv2d(x.reshape(1, b * c, h, w), weight, None, 1, 1, 1, b).view(b, 8, h, w)
        x = F.conv2d(x, weight=self.kw.weight, bias=self.kw.bias)   # weight and bias as keywords: prunes
        return self.head(torch.relu(x))


def test_a_conv_whose_groups_are_computed_at_run_time_pins():
    torch.manual_seed(0)
    pruned, rep = prune_and_check(CondConv(), (torch.randn(2, 3, 8, 8),), ratio=0.5, capture="fx", round_to=None,
                                  must_shrink=["conv2d_1"])
    graph = fxprune.analyze(CondConv().eval(), (torch.randn(2, 3, 8, 8),), capture="fx")
    assert any("computed at run time" in p.reason for g in graph.groups.values() for p in g.pins)
    assert pruned.state_dict()["kw.weight"].shape == (6, 8, 1, 1)
