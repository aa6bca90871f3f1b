"""Fuzz: random architectures from the hard pieces, pruned with random plans (random scores, random
ratio or FLOPs budget), must compile, verify (mask-equivalence node by node) and never raise anything
but an :class:`fxprune.errors.FxPruneError` that is not a verification failure.

The default run takes 50 examples (well under a minute); ``python -m pytest -m slow tests/test_fuzz.py``
runs 1,000.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fxprune
from fxprune.errors import ConfigError

# ---------------------------------------------------------------------------------------------
# pieces: each maps [N, c, H, W] -> [N, out, H, W] (H = W = 8 stays; pooling pieces pool and upsample back)


def cbr(cin, cout, k=1, groups=1):
    return nn.Sequential(nn.Conv2d(cin, cout, k, padding=k // 2, groups=groups, bias=False), nn.BatchNorm2d(cout), nn.ReLU())


class Residual(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.body = nn.Sequential(cbr(c, c // 2 + 1, 3), nn.Conv2d(c // 2 + 1, c, 1), nn.BatchNorm2d(c))
        self.out = c

    def forward(self, x):
        return F.relu(x + self.body(x))


class Concat(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.grow = cbr(c, 3)
        self.out = c + 3

    def forward(self, x):
        return torch.cat([x, self.grow(x)], 1)


class SplitCat(nn.Module):  # split into uneven pieces, transform one, cat in another order
    def __init__(self, c):
        super().__init__()
        self.pre = cbr(c, 6)
        self.branch = cbr(2, 2, 3)
        self.out = 6

    def forward(self, x):
        a, b = torch.split(self.pre(x), [4, 2], 1)
        return torch.cat([self.branch(b), a], 1)


class ChunkC2f(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.pre = cbr(c, 8)
        self.branch = cbr(4, 4, 3)
        self.out = 12

    def forward(self, x):
        a, b = self.pre(x).chunk(2, 1)
        return torch.cat([a, b, self.branch(b)], 1)


class Shuffle(nn.Module):
    def __init__(self, c, groups=2):
        super().__init__()
        self.pre = cbr(c, 4 * groups)
        self.g = groups
        self.out = 4 * groups

    def forward(self, x):
        y = self.pre(x)
        n, c, h, w = y.size()
        return y.view(n, self.g, c // self.g, h, w).transpose(1, 2).contiguous().view(n, c, h, w)


class ShuffleUnit(nn.Module):  # ShuffleNetV2 unit: chunk, branch, cat, shuffle
    def __init__(self, c):
        super().__init__()
        self.pre = cbr(c, 8)
        self.branch = nn.Sequential(cbr(4, 4), cbr(4, 4, 3, groups=4), cbr(4, 4))
        self.out = 8

    def forward(self, x):
        a, b = self.pre(x).chunk(2, 1)
        y = torch.cat([a, self.branch(b)], 1)
        n, c, h, w = y.shape
        return y.view(n, 2, c // 2, h, w).transpose(1, 2).reshape(n, c, h, w)


class Grouped(nn.Module):
    def __init__(self, c, groups=2):
        super().__init__()
        self.pre = cbr(c, 4 * groups)
        self.g = cbr(4 * groups, 6 * groups, 3, groups=groups)
        self.out = 6 * groups

    def forward(self, x):
        return self.g(self.pre(x))


class Depthwise(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.dw = cbr(c, 2 * c, 3, groups=c)
        self.out = 2 * c

    def forward(self, x):
        return self.dw(x)


class SE(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.squeeze = nn.Conv2d(c, 3, 1)
        self.expand = nn.Conv2d(3, c, 1)
        self.out = c

    def forward(self, x):
        return x * torch.sigmoid(self.expand(F.relu(self.squeeze(F.adaptive_avg_pool2d(x, 1)))))


class Attention(nn.Module):  # tokens from the spatial grid, hand-written multi-head attention
    def __init__(self, c, heads=2):
        super().__init__()
        self.embed = nn.Conv2d(c, 8, 1)
        self.heads = heads
        self.qkv = nn.Linear(8, 3 * 8)
        self.proj = nn.Linear(8, 8)
        self.out = 8

    def forward(self, x):
        x = self.embed(x)
        n, c, h, w = x.shape
        t = x.flatten(2).transpose(1, 2)  # [n, hw, c]
        q, k, v = self.qkv(t).reshape(n, h * w, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        a = (q @ k.transpose(-2, -1)) * (c // self.heads) ** -0.5
        y = (a.softmax(-1) @ v).transpose(1, 2).reshape(n, h * w, c)
        t = t + self.proj(y)
        return t.transpose(1, 2).reshape(n, c, h, w)


class HeadsSDPA(nn.Module):  # separate q/k/v over scaled_dot_product_attention: each head keeps its own dims
    def __init__(self, c, heads=2, heads_last=False, matmul=False):
        super().__init__()
        self.embed = nn.Conv2d(c, 8, 1)
        self.heads, self.heads_last, self.matmul = heads, heads_last, matmul
        self.q, self.k, self.v = nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 6)
        self.proj = nn.Linear(6, 8)
        self.out = 8

    def forward(self, x):
        x = self.embed(x)
        n, c, h, w = x.shape
        t = x.flatten(2).transpose(1, 2)
        q, k, v = (p(t).view(n, h * w, self.heads, -1).transpose(1, 2) for p in (self.q, self.k, self.v))
        if self.matmul:
            y = ((q @ k.transpose(-2, -1)) * 0.5).softmax(-1) @ v
        else:
            y = F.scaled_dot_product_attention(q, k, v)  # [n, heads, hw, dims]
        # heads first when merged back (their own positions), or heads last (tied across heads)
        y = y.permute(0, 2, 3, 1) if self.heads_last else y.transpose(1, 2)
        t = t + self.proj(y.reshape(n, h * w, -1))
        return t.transpose(1, 2).reshape(n, c, h, w)


class HeadsLast(HeadsSDPA):
    def __init__(self, c):
        super().__init__(c, heads_last=True)


class HeadsMatmul(HeadsSDPA):
    def __init__(self, c):
        super().__init__(c, matmul=True)


class HeadsGQA(nn.Module):  # Llama-style: rotary embeddings, 4 query heads on 2 key/value heads
    def __init__(self, c, repeat=True):
        super().__init__()
        self.embed = nn.Conv2d(c, 8, 1)
        self.repeat = repeat
        self.q, self.k, self.v, self.o = nn.Linear(8, 8), nn.Linear(8, 4), nn.Linear(8, 4), nn.Linear(8, 8)
        angle = torch.arange(64.0)[:, None] * 0.3
        self.register_buffer("cos", torch.cat([angle, angle], -1).cos())
        self.register_buffer("sin", torch.cat([angle, angle], -1).sin())
        self.out = 8

    @staticmethod
    def rotate_half(x):
        return torch.cat((-x[..., x.shape[-1] // 2:], x[..., : x.shape[-1] // 2]), dim=-1)

    def forward(self, x):
        x = self.embed(x)
        n, c, h, w = x.shape
        t = x.flatten(2).transpose(1, 2)
        q, k, v = (p(t).view(n, h * w, -1, 2).transpose(1, 2) for p in (self.q, self.k, self.v))
        q = q * self.cos + self.rotate_half(q) * self.sin
        k = k * self.cos + self.rotate_half(k) * self.sin
        if self.repeat:  # repeat_kv
            k, v = (a[:, :, None].expand(n, 2, 2, h * w, 2).reshape(n, 4, h * w, 2) for a in (k, v))
            y = F.scaled_dot_product_attention(q, k, v)
        else:
            y = F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
        t = t + self.o(y.transpose(1, 2).reshape(n, h * w, -1))
        return t.transpose(1, 2).reshape(n, c, h, w)


class HeadsGQAFused(HeadsGQA):
    def __init__(self, c):
        super().__init__(c, repeat=False)


class MHA(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.embed = nn.Conv2d(c, 8, 1)
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
        self.out = 8

    def forward(self, x):
        x = self.embed(x)
        n, c, h, w = x.shape
        t = x.flatten(2).transpose(1, 2)
        t = t + self.attn(t, t, t, need_weights=False)[0]
        return t.transpose(1, 2).reshape(n, c, h, w)


class LayerNormChannels(nn.Module):  # ConvNeXt-style: permute, LayerNorm over channels, linear MLP, permute back
    def __init__(self, c):
        super().__init__()
        self.norm = nn.LayerNorm(c)
        self.fc1 = nn.Linear(c, 2 * c)
        self.fc2 = nn.Linear(2 * c, c)
        self.out = c

    def forward(self, x):
        y = x.permute(0, 2, 3, 1)
        y = self.fc2(F.gelu(self.fc1(self.norm(y))))
        return x + y.permute(0, 3, 1, 2)


class RMSNormChannels(LayerNormChannels):  # the same with nn.RMSNorm (a large eps: a wrong rescale shows)
    def __init__(self, c):
        super().__init__(c)
        self.norm = nn.RMSNorm(c, eps=0.3)


class MeanSquareChannels(LayerNormChannels):  # RMSNorm as Hugging Face's Gemma writes it: mean, rsqrt, 1 + weight
    def __init__(self, c):
        super().__init__(c)
        self.norm = None
        self.weight = nn.Parameter(torch.rand(c) - 0.5)

    def forward(self, x):
        y = x.permute(0, 2, 3, 1)
        y = y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + 0.3) * (1.0 + self.weight)
        return x + self.fc2(F.gelu(self.fc1(y))).permute(0, 3, 1, 2)


class SpatialGate(nn.Module):  # CBAM-style: a gate from the mean, sum, maximum and minimum over the channels
    def __init__(self, c):
        super().__init__()
        self.conv = nn.Conv2d(4, 1, 3, padding=1)
        self.out = c

    def forward(self, x):
        stats = torch.cat([x.mean(1, keepdim=True), x.sum(1, keepdim=True) / 8, torch.max(x, 1, keepdim=True)[0],
                           x.amin(1, keepdim=True)], 1)
        return x * torch.sigmoid(self.conv(stats))


class LayerScale(nn.Module):  # timm's conv LayerScale on a residual, and an embedding computed at run time
    def __init__(self, c):
        super().__init__()
        self.body = cbr(c, c, 3)
        self.gamma = nn.Parameter(torch.rand(c) + 0.5)
        self.out = c

    def forward(self, x):
        x = x + self.body(x).mul(self.gamma.reshape(1, -1, 1, 1))
        return x + torch.cos(torch.arange(self.out, dtype=x.dtype) * 0.7).view(1, -1, 1, 1)


class GroupNorms(nn.Module):  # GroupNorms of 4 groups, one per channel and one group (a large eps shows a wrong one)
    def __init__(self, c):
        super().__init__()
        self.pre = nn.Conv2d(c, 8, 1)
        self.norm = nn.GroupNorm(4, 8, eps=0.3)
        self.body = nn.Sequential(nn.Conv2d(8, 12, 3, padding=1), nn.GroupNorm(12, 12, eps=0.3), nn.SiLU(),
                                  nn.Conv2d(12, 8, 1))
        self.last = nn.GroupNorm(1, 8, eps=0.3)
        self.out = 8

    def forward(self, x):
        y = self.norm(self.pre(x))
        return self.last(y + self.body(y))


class StdConv(nn.Conv2d):  # timm's StdConv2d: the weight standardised row by row at every call
    def forward(self, x):
        w = F.batch_norm(self.weight.reshape(1, self.out_channels, -1), None, None, training=True, momentum=0.0,
                         eps=1e-5).reshape_as(self.weight)
        return F.conv2d(x, w, self.bias, self.stride, self.padding, self.dilation, self.groups)


class Standardised(nn.Module):  # BiT / NF-Net style: standardised plain, grouped and depthwise convs, a residual
    def __init__(self, c):
        super().__init__()
        self.pre = StdConv(c, 8, 1)
        self.body = nn.Sequential(StdConv(8, 12, 1), nn.ReLU(), StdConv(12, 12, 3, padding=1, groups=3), nn.ReLU(),
                                  StdConv(12, 12, 3, padding=1, groups=12), nn.ReLU(), StdConv(12, 4, 1))
        self.out = 8

    def forward(self, x):
        y = F.relu(self.pre(x))
        return y + self.body(y).repeat_interleave(2, dim=1)


class PixelShuffle(nn.Module):  # 2x up with PixelShuffle, pooled back down
    def __init__(self, c):
        super().__init__()
        self.pre = cbr(c, 8)
        self.up = nn.PixelShuffle(2)
        self.post = cbr(2, 4, 3)
        self.out = 4

    def forward(self, x):
        return F.avg_pool2d(self.post(self.up(self.pre(x))), 2)


class Pool(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv = cbr(c, c, 3)
        self.out = c

    def forward(self, x):
        y = F.max_pool2d(self.conv(x), 2)
        return F.interpolate(y, scale_factor=2.0, mode="nearest") + x


class Shuffle3(Shuffle):
    def __init__(self, c):
        super().__init__(c, groups=3)


class Grouped4(Grouped):
    def __init__(self, c):
        super().__init__(c, groups=4)


class GroupedResidual(nn.Module):  # ResNeXt-style: a grouped conv inside a residual block
    def __init__(self, c):
        super().__init__()
        self.c = 2 * ((c + 1) // 2)
        self.pre = cbr(c, self.c)
        self.body = nn.Sequential(cbr(self.c, 4, 1), cbr(4, 4, 3, groups=2), nn.Conv2d(4, self.c, 1, groups=2))
        self.out = self.c

    def forward(self, x):
        y = self.pre(x)
        return F.relu(y + self.body(y))


class HeadsInterleaved(nn.Module):  # GPT-J / EVA: interleaved rotary (x[..., ::2]); a scale read from the width
    def __init__(self, c):
        super().__init__()
        self.embed = nn.Conv2d(c, 8, 1)
        self.q, self.k, self.v, self.o = (nn.Linear(8, 8) for _ in range(4))
        angle = (torch.arange(64.0)[:, None] * torch.tensor([0.3, 0.1])).repeat_interleave(2, -1)
        self.register_buffer("cos", angle.cos())
        self.register_buffer("sin", angle.sin())
        self.out = 8

    @staticmethod
    def rotate(x):
        return torch.stack((-x[..., 1::2], x[..., ::2]), -1).reshape(x.shape)

    def forward(self, x):
        x = self.embed(x)
        n, c, h, w = x.shape
        t = x.flatten(2).transpose(1, 2)
        q, k, v = (p(t).view(n, h * w, 2, -1).transpose(1, 2) for p in (self.q, self.k, self.v))
        q = q * self.cos + self.rotate(q) * self.sin
        k = k * self.cos + self.rotate(k) * self.sin
        y = (q @ k.transpose(-2, -1) * (c // 2) ** -0.5).softmax(-1) @ v
        t = t + self.o(y.transpose(1, 2).reshape(n, h * w, -1))
        return t.transpose(1, 2).reshape(n, c, h, w)


class ECAGate(nn.Module):  # efficient channel attention on a residual: a conv across the pooled channels
    def __init__(self, c):
        super().__init__()
        self.conv = cbr(c, c, 3)
        self.eca = nn.Conv1d(1, 1, 3, padding=1, bias=False)
        self.out = c

    def forward(self, x):
        y = self.conv(x)
        gate = self.eca(y.mean((2, 3)).unsqueeze(1)).sigmoid()
        return x + y * gate.transpose(1, 2).unsqueeze(-1)


class RowsLSTM(nn.Module):  # Sequencer: a bidirectional LSTM along each row, a linear back, on a residual
    def __init__(self, c):
        super().__init__()
        self.rnn = nn.LSTM(c, 6, batch_first=True, bidirectional=True)
        self.fc = nn.Linear(12, c)
        self.out = c

    def forward(self, x):
        n, c, h, w = x.shape
        rows = x.permute(0, 2, 3, 1).reshape(n * h, w, c)
        y = self.fc(self.rnn(rows)[0]).reshape(n, h, w, c).permute(0, 3, 1, 2)
        return x + y


class ChannelAttention(nn.Module):  # Restormer's MDTA: attention across channels, q/k/v chunked from one conv
    def __init__(self, c):
        super().__init__()
        self.qkv = nn.Conv2d(c, 3 * c, 1)
        self.proj = nn.Conv2d(c, c, 1)
        self.t = nn.Parameter(torch.rand(1, 1, 1) + 0.5)
        self.out = c

    def forward(self, x):
        n, c, h, w = x.shape
        q, k, v = (t.reshape(n, 1, c, h * w) for t in self.qkv(x).chunk(3, dim=1))
        attn = (F.normalize(q, dim=-1) @ F.normalize(k, dim=-1).transpose(-2, -1) * self.t).softmax(-1)
        return x + self.proj((attn @ v).reshape(n, c, h, w))


class GroupStd(nn.Module):  # EvoNorm-S0: x * sigmoid(v x) / the std of each group, on a residual
    def __init__(self, c):
        super().__init__()
        self.conv = cbr(c, c, 3)
        self.groups = 2 if c % 2 == 0 else 1
        self.v = nn.Parameter(torch.rand(1, c, 1, 1) + 0.5)
        self.out = c

    def forward(self, x):
        y = self.conv(x)
        n, c, h, w = y.shape
        torch._assert(c % self.groups == 0, "groups")
        g = y.reshape(n, self.groups, c // self.groups, h, w)
        std = g.var(dim=(2, 3, 4), unbiased=False, keepdim=True).add(1e-5).sqrt().expand(g.shape).reshape(n, c, h, w)
        return x + y * torch.sigmoid(y * self.v) / std


PIECES = [Residual, Concat, SplitCat, ChunkC2f, Shuffle, ShuffleUnit, Grouped, Depthwise, SE, Attention, MHA,
          LayerNormChannels, PixelShuffle, Pool, Shuffle3, Grouped4, GroupedResidual, HeadsSDPA, HeadsLast,
          HeadsMatmul, HeadsGQA, HeadsGQAFused, RMSNormChannels, MeanSquareChannels, SpatialGate,
          LayerScale, GroupNorms, Standardised, HeadsInterleaved, ECAGate, RowsLSTM, ChannelAttention, GroupStd]


class Net(nn.Module):
    def __init__(self, kinds, width, head):
        super().__init__()
        self.stem = cbr(3, width, 3)
        pieces, c = [], width
        for k in kinds:
            p = PIECES[k](c)
            c = p.out
            pieces.append(p)
        self.body = nn.Sequential(*pieces)
        self.head = head
        self.fc = nn.Linear(c * (4 if head == "flatten" else 1), 5)

    def forward(self, x):
        x = self.body(self.stem(x))
        if self.head == "flatten":
            return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 2), 1))
        return self.fc(x.mean((2, 3)))


def build(kinds, width, head, seed):
    torch.manual_seed(seed)
    net = Net(kinds, width, head)
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.3, 0.3)
            m.running_var.uniform_(0.5, 1.5)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.3, 0.3)
    return net.eval()


def random_scores(graph, data=None, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return {name: torch.rand(g.size, generator=gen) for name, g in graph.groups.items()}


architectures = st.tuples(
    st.lists(st.integers(0, len(PIECES) - 1), min_size=1, max_size=4),
    st.integers(2, 10),
    st.sampled_from(["flatten", "mean"]),
    st.one_of(st.tuples(st.just("ratio"), st.floats(0.0, 0.9)), st.tuples(st.just("flops"), st.floats(0.2, 1.0))),
    st.sampled_from([None, None, 2]),
    st.integers(0, 10_000),
    st.sampled_from(["dims", "whole"]),
)


def check(arch):
    """Compile one architecture; returns the report. Raises on a failed verification or a raw exception."""
    kinds, width, head, (budget, amount), round_to, seed, heads = arch
    net = build(kinds, width, head, seed)
    x = torch.randn(1, 3, 8, 8)
    try:
        pruned = fxprune.compile(net, (x,), method=random_scores, seed=seed, onnx=False, round_to=round_to,
                                 heads=heads, **{budget: amount})
    except ConfigError:  # a budget the model cannot meet is refused with a ConfigError, which is fine
        return None
    rep = fxprune.report(pruned)
    assert rep.mask["ok"], ([PIECES[k].__name__ for k in kinds], rep.mask)
    assert pruned(x).shape == (1, 5)
    return rep


@pytest.mark.filterwarnings("ignore::UserWarning")
@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True)
@given(arch=architectures)
def test_fuzz(arch, one_thread):
    check(arch)


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::UserWarning")
@settings(max_examples=1000, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(arch=architectures)
def test_fuzz_slow(arch, one_thread):
    check(arch)


def draw(rng):
    """One architecture drawn with ``random.Random`` (the counting runner below)."""
    kinds = [rng.randrange(len(PIECES)) for _ in range(rng.randint(1, 4))]
    budget = ("ratio", rng.uniform(0.0, 0.9)) if rng.random() < 0.5 else ("flops", rng.uniform(0.2, 1.0))
    return kinds, rng.randint(2, 10), rng.choice(["flatten", "mean"]), budget, rng.choice([None, None, 2]), \
        rng.randrange(10_000), rng.choice(["dims", "whole"])


if __name__ == "__main__":  # python tests/test_fuzz.py 1000: counts failures and crashes instead of stopping
    import random
    import sys
    import time
    import traceback
    import warnings

    from fxprune.errors import VerificationError

    warnings.simplefilter("ignore")
    torch.set_num_threads(1)
    n, rng = int(sys.argv[1]) if len(sys.argv) > 1 else 100, random.Random(int(sys.argv[2]) if len(sys.argv) > 2 else 0)
    counts, t0 = {"ok": 0, "refused": 0, "failed": 0, "crashed": 0}, time.time()
    for i in range(n):
        arch = draw(rng)
        try:
            counts["ok" if check(arch) is not None else "refused"] += 1
        except (AssertionError, VerificationError) as exc:
            counts["failed"] += 1
            print("FAILED", arch, str(exc)[:300], flush=True)
        except Exception as exc:
            counts["crashed"] += 1
            print("CRASHED", arch, type(exc).__name__, str(exc)[:300], flush=True)
            traceback.print_exc(limit=3)
    print(f"{n} examples in {time.time() - t0:.0f} s: {counts}")
