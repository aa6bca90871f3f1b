"""Balanced blocks: structures that need equal counts per block at free positions (a grouped convolution's
groups). Dead channels planted by hand at positions a tie could not express must be exactly the ones
removed, with the output unchanged."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import fxprune
from fxprune.errors import PlanError

X = torch.randn(2, 3, 8, 8)


def kill(producer: nn.Conv2d, channels, consumers=()):
    """Zero ``channels``: the producer's rows and bias, and each (consumer conv, columns) given."""
    with torch.no_grad():
        for c in channels:
            producer.weight[c] = 0
            if producer.bias is not None:
                producer.bias[c] = 0
        for conv, cols in consumers:  # cols: [(row slice, [columns])]
            for rows, js in cols:
                for j in js:
                    conv.weight[rows, j] = 0


class TwoGroups(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 8, 1)
        self.g = nn.Conv2d(8, 8, 3, padding=1, groups=2)
        self.out = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        return self.out(torch.relu(self.g(torch.relu(self.a(x)))))


def dead_two_groups():
    torch.manual_seed(0)
    m = TwoGroups().eval()
    # a's channel 1 (group 0, position 1) and 6 (group 1, position 2): the rows of a, and the columns of g
    kill(m.a, [1, 6], [(m.g, [(slice(0, 4), [1]), (slice(4, 8), [2])])])
    # g's output 3 (group 0) and 5 (group 1): g's rows, and out's columns
    kill(m.g, [3, 5], [(m.out, [(slice(None), [3, 5])])])
    return m


def test_grouped_conv_removes_one_dead_channel_per_group_at_different_positions():
    m = dead_two_groups()
    pruned = fxprune.compile(m, (X,), method="l1", ratio=2 / 8, onnx=False)
    rep = fxprune.report(pruned)
    assert rep.plan.keep == {"a": [0, 2, 3, 4, 5, 7], "g": [0, 1, 2, 4, 6, 7]}
    g = pruned.get_submodule("g")
    assert (g.groups, g.in_channels, g.out_channels) == (2, 6, 6)
    assert rep.mask["ok"]
    with torch.no_grad():
        assert float((pruned(X) - m(X)).abs().max()) < 1e-5
    assert rep.flops_after == rep.flops_predicted


def test_grouped_conv_round_to_applies_per_block():
    m = dead_two_groups()
    graph = fxprune.analyze(m, (X,))
    scores = {n: torch.arange(g.size, dtype=torch.float) for n, g in graph.groups.items()}
    plan = fxprune.make_plan(graph, scores, ratio=0.3, round_to=2)  # 8 - 2 = 6 kept: 3 per block, up to 4
    assert "a" not in plan.keep
    plan = fxprune.make_plan(graph, scores, ratio=0.6)  # 8 - 5 = 3 kept: 2 per block, the best of each
    assert plan.keep["a"] == [2, 3, 6, 7]


def test_unbalanced_plan_is_refused():
    graph = fxprune.analyze(TwoGroups().eval(), (X,))
    with pytest.raises(PlanError, match="unequal counts"):
        fxprune.apply(TwoGroups().eval(), (X,), fxprune.Plan({"a": [0, 1, 2, 4]}, {"a": 8}))
    assert graph.groups["a"].blocks.tolist() == [[0, 1, 2, 3], [4, 5, 6, 7]]


class SharedStream(nn.Module):  # two grouped convs read one stream with different group counts: tied
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 8, 1)
        self.g2 = nn.Conv2d(8, 4, 3, padding=1, groups=2)
        self.g4 = nn.Conv2d(8, 8, 3, padding=1, groups=4)

    def forward(self, x):
        y = torch.relu(self.a(x))
        return self.g2(y).sum(1) + self.g4(y).sum(1)


def test_two_partitions_of_one_group_fall_back_to_ties():
    m = SharedStream().eval()
    graph = fxprune.analyze(m, (X,))
    a = graph.groups["a"]
    assert a.blocks is None and a.size == 2  # column j of every group tied: 2 channels of 4 positions
    pruned = fxprune.compile(m, (X,), method="random", ratio=0.5, onnx=False)
    assert fxprune.report(pruned).mask["ok"]
    assert pruned.get_submodule("g4").in_channels == 4


class Attention(nn.Module):
    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(5, 8)
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
        self.out = nn.Linear(8, 3)

    def forward(self, x):
        t = self.inp(x)
        return self.out(t + self.attn(t, t, t, need_weights=False)[0])


def test_attention_heads_keep_equal_dims_at_their_own_positions():
    torch.manual_seed(0)
    m = Attention().eval()
    with torch.no_grad():  # stream channel 1 (head 0, dim 1) and 6 (head 1, dim 2) dead everywhere
        for c in (1, 6):
            m.inp.weight[c] = 0
            m.inp.bias[c] = 0
            m.attn.out_proj.weight[c] = 0
            m.attn.out_proj.bias[c] = 0
            m.attn.out_proj.weight[:, c] = 0
            m.out.weight[:, c] = 0
            for part in range(3):  # the q, k and v rows of that dim
                m.attn.in_proj_weight[part * 8 + c] = 0
                m.attn.in_proj_bias[part * 8 + c] = 0
            m.attn.in_proj_weight[:, c] = 0
    x = torch.randn(2, 6, 5)
    graph = fxprune.analyze(m, (x,))
    assert graph.groups["inp"].blocks.tolist() == [[0, 1, 2, 3], [4, 5, 6, 7]]
    pruned = fxprune.compile(m, (x,), method="l1", ratio=2 / 8, onnx=False)
    rep = fxprune.report(pruned)
    assert rep.plan.keep == {"inp": [0, 2, 3, 4, 5, 7]}
    attn = pruned.get_submodule("attn")
    assert (attn.embed_dim, attn.num_heads, attn.head_dim) == (6, 2, 3)
    assert rep.mask["ok"]
    with torch.no_grad():
        assert float((pruned(x) - m(x)).abs().max()) < 1e-5


class Shuffle(nn.Module):
    def __init__(self, module=False):
        super().__init__()
        self.a = nn.Conv2d(3, 16, 1)
        self.shuffle = nn.ChannelShuffle(2) if module else None
        self.out = nn.Conv2d(16, 4, 1)

    def forward(self, x):
        y = torch.relu(self.a(x))
        if self.shuffle is not None:
            y = self.shuffle(y)
        else:
            n, c, h, w = y.size()
            y = y.view(n, 2, c // 2, h, w).transpose(1, 2).contiguous().view(n, c, h, w)
        return self.out(y)


@pytest.mark.parametrize("module", [False, True])
def test_shuffle_removes_dead_channels_anywhere_in_either_half(module):
    torch.manual_seed(0)
    m = Shuffle(module).eval()
    dead = [1, 3, 9, 12]  # {1, 3} in the first half, {9, 12} in the second: no tie of j and j + 8
    # channel (half i, position j) sits at 2 * j + i after the shuffle: those are the consumer's columns
    kill(m.a, dead, [(m.out, [(slice(None), [2 * (c % 8) + c // 8 for c in dead])])])
    pruned = fxprune.compile(m, (X,), method="l1", ratio=4 / 16, onnx=True)
    rep = fxprune.report(pruned)
    assert rep.plan.keep == {"a": [c for c in range(16) if c not in dead]}
    assert pruned.get_submodule("out").in_channels == 12
    assert rep.mask["ok"] and rep.onnx["ok"]
    with torch.no_grad():
        assert float((pruned(X) - m(X)).abs().max()) < 1e-5


@pytest.mark.parametrize("model", [TwoGroups, Shuffle])
def test_masked_runner_zeroing_equals_the_pruned_model(model):
    """MaskedRunner (what CURL and CATRO ask) zeroes the removed channels at every value: for a grouped
    conv at free positions and through a shuffle, that is what the pruned model computes."""
    from fxprune.verify.masked import MaskedRunner
    torch.manual_seed(1)
    m = model().eval()
    pruned = fxprune.compile(m, (X,), method="random", ratio=0.5, seed=3, onnx=False)
    rep = fxprune.report(pruned)
    graph = fxprune.analyze(m, (X,))
    removed = (~rep.plan.mask(graph)).nonzero().flatten()
    assert removed.numel() >= 4
    with torch.no_grad():
        masked = MaskedRunner(graph, (X,)).run_one(removed)
        assert float((masked - pruned(X)).abs().max()) < 1e-5


class HandWrittenHeads(nn.Module):
    """Separate q/k/v projections split into heads by ``view``; attention by ``scaled_dot_product_attention``
    or by ``q @ k^T``; merged back heads first."""

    def __init__(self, matmul=False):
        super().__init__()
        self.heads, self.matmul = 2, matmul
        self.inp = nn.Linear(5, 8)
        self.q, self.k, self.v, self.o = (nn.Linear(8, 8) for _ in range(4))
        self.out = nn.Linear(8, 3)

    def forward(self, x):
        t = self.inp(x)
        b, n, c = t.shape
        q, k, v = (p(t).view(b, n, self.heads, c // self.heads).transpose(1, 2) for p in (self.q, self.k, self.v))
        if self.matmul:
            a = ((q @ k.transpose(-2, -1)) * 0.5).softmax(-1) @ v
        else:
            a = torch.nn.functional.scaled_dot_product_attention(q, k, v)
        return self.out(t + self.o(a.transpose(1, 2).reshape(b, n, c)))


@pytest.mark.parametrize("matmul", [False, True])
def test_hand_written_heads_keep_equal_dims_at_their_own_positions(matmul):
    torch.manual_seed(0)
    m = HandWrittenHeads(matmul).eval()
    with torch.no_grad():
        for c in (1, 6):  # q/k: head 0 dim 1, head 1 dim 2
            for p in (m.q, m.k):
                p.weight[c] = 0
                p.bias[c] = 0
        for c in (3, 4):  # v: head 0 dim 3, head 1 dim 0 (and o's columns)
            m.v.weight[c] = 0
            m.v.bias[c] = 0
            m.o.weight[:, c] = 0
        for c in (2, 5):  # the stream
            m.inp.weight[c] = 0
            m.inp.bias[c] = 0
            m.o.weight[c] = 0
            m.o.bias[c] = 0
            for p in (m.q, m.k, m.v, m.out):
                p.weight[:, c] = 0
    x = torch.randn(2, 6, 5)
    graph = fxprune.analyze(m, (x,))
    assert graph.groups["q"].blocks.tolist() == graph.groups["v"].blocks.tolist() == [[0, 1, 2, 3], [4, 5, 6, 7]]
    pruned = fxprune.compile(m, (x,), method="l1", ratio=2 / 8, onnx=True)
    rep = fxprune.report(pruned)
    assert rep.plan.keep == {"inp": [0, 1, 3, 4, 6, 7], "q": [0, 2, 3, 4, 5, 7], "v": [0, 1, 2, 5, 6, 7]}
    assert pruned.get_submodule("q").out_features == pruned.get_submodule("v").out_features == 6
    assert rep.mask["ok"] and rep.onnx["ok"]
    with torch.no_grad():
        assert float((pruned(x) - m(x)).abs().max()) < 1e-5


def test_heads_merged_heads_last_tie_dims_across_heads():
    """``permute(0, 2, 3, 1)`` before the merge puts each head's dims interleaved: per-head positions would
    not line up with the consumer's columns, so dim ``j`` is tied across heads there."""

    class HeadsLast(HandWrittenHeads):
        def forward(self, x):
            t = self.inp(x)
            b, n, c = t.shape
            q, k, v = (p(t).view(b, n, 2, 4).transpose(1, 2) for p in (self.q, self.k, self.v))
            a = torch.nn.functional.scaled_dot_product_attention(q, k, v).permute(0, 2, 3, 1)
            return self.out(t + self.o(a.reshape(b, n, 8)))

    x = torch.randn(2, 6, 5)
    graph = fxprune.analyze(HeadsLast().eval(), (x,))
    assert graph.groups["q"].blocks is not None and graph.groups["v"].blocks is None
    assert graph.groups["v"].size == 4  # dim j of both heads is one channel
    pruned = fxprune.compile(HeadsLast().eval(), (x,), method="l1", ratio=0.5, onnx=False)
    assert fxprune.report(pruned).mask["ok"]


@pytest.mark.parametrize("unshuffle", [False, True])
def test_pixel_shuffle_removes_the_dead_block_of_one_output_channel(unshuffle):
    """PixelShuffle(2) makes output channel ``c`` of input channels ``4c .. 4c + 3``: that block goes
    together (no balance to keep: any set of output channels is removable); PixelUnshuffle the other way."""
    torch.manual_seed(0)
    if unshuffle:
        m = nn.Sequential(nn.Conv2d(3, 4, 1), nn.PixelUnshuffle(2), nn.Conv2d(16, 2, 1)).eval()
        kill(m[0], [1], [(m[2], [(slice(None), [4, 5, 6, 7])])])
        ratio, expected = 1 / 4, {"0": [0, 2, 3]}
    else:
        m = nn.Sequential(nn.Conv2d(3, 16, 1), nn.PixelShuffle(2), nn.Conv2d(4, 2, 1)).eval()
        kill(m[0], [8, 9, 10, 11], [(m[2], [(slice(None), [2])])])
        ratio, expected = 1 / 4, {"0": [0, 1, 3]}  # the group's channels are the blocks
    pruned = fxprune.compile(m, (X,), method="l1", ratio=ratio, onnx=True)
    rep = fxprune.report(pruned)
    assert rep.plan.keep == expected
    assert pruned.get_submodule("0").out_channels == (3 if unshuffle else 12)
    assert rep.mask["ok"] and rep.onnx["ok"]
    with torch.no_grad():
        assert float((pruned(X) - m(X)).abs().max()) < 1e-5


def test_inspect_shows_the_blocks():
    from fxprune.view.inspect import group_rows, group_table
    graph = fxprune.analyze(dead_two_groups(), (X,))
    rows = {r["name"]: r for r in group_rows(graph)}
    assert rows["a"]["blocks"] == (2, 4) and rows["out"]["blocks"] is None
    assert any(line.startswith("| a ") and "8 (2 x 4)" in line for line in group_table(graph).splitlines())


def test_heads_split_into_q_k_v_after_the_heads_view_stay_prunable():
    """GPT-NeoX packs q, k and v per head (``view(b, n, heads, 3 * head_dim).chunk(3, -1)``): the pieces of a
    head grid are tied position by position, not left to a crash that pins the whole projection."""

    class PackedPerHead(nn.Module):
        def __init__(self):
            super().__init__()
            self.qkv, self.o = nn.Linear(8, 24), nn.Linear(8, 8)

        def forward(self, x):
            b, n, _ = x.shape
            q, k, v = self.qkv(x).view(b, n, 2, 12).transpose(1, 2).chunk(3, dim=-1)
            a = torch.nn.functional.scaled_dot_product_attention(q, k, v)
            return x + self.o(a.transpose(1, 2).reshape(b, n, 8))

    x = torch.randn(2, 6, 8)
    graph = fxprune.analyze(PackedPerHead().eval(), (x,))
    assert graph.groups["qkv"].prunable > 0 and not any("could not be analysed" in str(p) for p in graph.groups["qkv"].pins)
    pruned = fxprune.compile(PackedPerHead().eval(), (x,), method="l2", ratio=0.5, onnx=True)
    rep = fxprune.report(pruned)
    assert rep.mask["ok"] and rep.onnx["ok"] and pruned.get_submodule("qkv").out_features < 24
