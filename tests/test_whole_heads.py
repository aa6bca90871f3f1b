"""Whole attention heads (``heads="whole"``): a head of q, k and v is one channel, removed with its
``head_dim`` intact; with grouped-query attention a key/value head goes with its query heads. Dead heads
planted by hand must be exactly the ones removed, with the output unchanged."""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fxprune
from fxprune.errors import ConfigError

X = torch.randn(2, 6, 5)


def rotate_half(x):
    """Llama's rotary helper: the two halves of each head's dims swapped, one negated."""
    x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2:]
    return torch.cat((-x2, x1), dim=-1)


class Heads(nn.Module):
    """Attention over 4 heads of 2 dims, q/k/v as separate linears, head_dim a constant (as Hugging Face
    writes it), optionally with rotary embeddings and fewer key/value heads (``kv`` of them), repeated by
    ``expand`` + ``reshape`` (``repeat_kv``) or passed to SDPA with ``enable_gqa``."""

    def __init__(self, kv=4, rotary=False, gqa="repeat", matmul=False):
        super().__init__()
        self.heads, self.kv, self.head_dim, self.rotary, self.gqa, self.matmul = 4, kv, 2, rotary, gqa, matmul
        self.inp = nn.Linear(5, 8)
        self.q, self.o = nn.Linear(8, 8), nn.Linear(8, 8)
        self.k, self.v = nn.Linear(8, 2 * kv), nn.Linear(8, 2 * kv)
        self.out = nn.Linear(8, 3)
        angle = torch.arange(6.0)[:, None] * 0.5  # one frequency: head_dim 2
        self.register_buffer("cos", torch.cat([angle, angle], -1).cos())
        self.register_buffer("sin", torch.cat([angle, angle], -1).sin())

    def forward(self, x):
        t = self.inp(x)
        b, n, _ = t.shape
        q = self.q(t).view(b, n, -1, self.head_dim).transpose(1, 2)
        k = self.k(t).view(b, n, -1, self.head_dim).transpose(1, 2)
        v = self.v(t).view(b, n, -1, self.head_dim).transpose(1, 2)
        if self.rotary:
            q = q * self.cos + rotate_half(q) * self.sin
            k = k * self.cos + rotate_half(k) * self.sin
        gqa = {}
        if self.kv < self.heads and self.gqa == "repeat":
            rep = self.heads // self.kv
            k = k[:, :, None, :, :].expand(b, self.kv, rep, n, self.head_dim).reshape(b, self.heads, n, self.head_dim)
            v = v[:, :, None, :, :].expand(b, self.kv, rep, n, self.head_dim).reshape(b, self.heads, n, self.head_dim)
        elif self.kv < self.heads:
            gqa = {"enable_gqa": True}
        if self.matmul:
            a = ((q @ k.transpose(-2, -1)) * self.head_dim ** -0.5).softmax(-1) @ v
        else:
            a = F.scaled_dot_product_attention(q, k, v, **gqa)
        return self.out(t + self.o(a.transpose(1, 2).reshape(b, n, -1)))


class Packed(nn.Module):
    """timm's attention: one ``qkv`` linear, ``reshape(b, n, 3, heads, head_dim).permute(2, 0, 3, 1, 4)``."""

    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(5, 8)
        self.qkv, self.proj = nn.Linear(8, 24), nn.Linear(8, 8)
        self.out = nn.Linear(8, 3)

    def forward(self, x):
        t = self.inp(x)
        b, n, c = t.shape
        q, k, v = self.qkv(t).reshape(b, n, 3, 4, 2).permute(2, 0, 3, 1, 4).unbind(0)
        a = F.scaled_dot_product_attention(q, k, v)
        return self.out(t + self.proj(a.transpose(1, 2).reshape(b, n, c)))


def zero(linear, rows=(), cols=()):
    with torch.no_grad():
        for r in rows:
            linear.weight[r] = 0
            if linear.bias is not None:
                linear.bias[r] = 0
        for c in cols:
            linear.weight[:, c] = 0


def dead_stream(m, consumers):
    """Stream channels 2 and 5 dead: ``inp``'s and the output projection's rows, every reader's columns."""
    zero(m.inp, rows=(2, 5))
    zero(m.o if hasattr(m, "o") else m.proj, rows=(2, 5))
    for lin in consumers:
        zero(lin, cols=(2, 5))


def check(m, plan_keep, ratio, ignore=(), **shapes):
    with torch.no_grad():
        expected = m(X)
    pruned = fxprune.compile(m, (X,), method="l1", ratio=ratio, heads="whole", ignore=ignore)
    rep = fxprune.report(pruned)
    assert rep.plan.keep == plan_keep
    for name, (attr, size) in shapes.items():
        assert getattr(pruned.get_submodule(name), attr) == size, name
    assert rep.mask["ok"] and rep.onnx["ok"]
    with torch.no_grad():
        assert float((pruned(X) - expected).abs().max()) < 1e-5
    return pruned


@pytest.mark.parametrize("matmul", [False, True])
def test_the_dead_head_is_removed_whole(matmul):
    torch.manual_seed(0)
    m = Heads(matmul=matmul).eval()
    zero(m.q, rows=(4, 5))  # head 2 of q, k and v, and its columns of o
    zero(m.k, rows=(4, 5))
    zero(m.v, rows=(4, 5))
    zero(m.o, cols=(4, 5))
    dead_stream(m, (m.q, m.k, m.v, m.out))
    graph = fxprune.analyze(m, (X,), heads="whole")
    assert graph.groups["q"].size == 4 and graph.groups["q"].blocks is None  # one channel per head
    check(m, {"inp": [0, 1, 3, 4, 6, 7], "q": [0, 1, 3]}, 1 / 4,
          q=("out_features", 6), k=("out_features", 6), v=("out_features", 6), o=("in_features", 6))


@pytest.mark.parametrize("gqa", ["repeat", "enable_gqa"])
def test_grouped_query_attention_with_rotary_drops_a_key_value_head_with_its_query_heads(gqa):
    """4 query heads on 2 key/value heads: key/value head 1 serves query heads 2 and 3, and goes with them.
    Rotary embeddings (slices and a cat along head_dim) leave whole heads prunable."""
    torch.manual_seed(0)
    m = Heads(kv=2, rotary=True, gqa=gqa).eval()
    zero(m.q, rows=range(4, 8))
    zero(m.k, rows=(2, 3))
    zero(m.v, rows=(2, 3))
    zero(m.o, cols=range(4, 8))
    check(m, {"q": [0]}, 1 / 2, ignore=["inp"],
          q=("out_features", 4), k=("out_features", 2), v=("out_features", 2), o=("in_features", 4))


def test_packed_qkv_drops_the_same_head_of_q_k_and_v():
    torch.manual_seed(0)
    m = Packed().eval()
    zero(m.qkv, rows=(2, 3, 10, 11, 18, 19))  # head 1 of q (rows 0-7), k (8-15) and v (16-23)
    zero(m.proj, cols=(2, 3))
    dead_stream(m, (m.qkv, m.out))
    check(m, {"inp": [0, 1, 3, 4, 6, 7], "qkv": [0, 2, 3]}, 1 / 4,
          qkv=("out_features", 18), proj=("in_features", 6))


def test_a_plan_says_how_it_treats_heads():
    torch.manual_seed(0)
    m = Heads(kv=2, rotary=True).eval()
    pruned = fxprune.compile(m, (X,), method="l2", ratio=0.5, heads="whole", onnx=False)
    plan = fxprune.report(pruned).plan
    assert plan.meta["heads"] == "whole"
    again = fxprune.apply(m, (X,), plan.to_json(), onnx=False)  # analysed with whole heads, as the plan says
    with torch.no_grad():
        assert torch.equal(again(X), pruned(X))
    per_dim = fxprune.analyze(m, (X,))  # the default prunes dims: rotary keeps q's and k's
    assert per_dim.groups["q"].prunable == 0
    with pytest.raises(ConfigError, match="heads must be one of"):
        fxprune.analyze(m, (X,), heads="some")


def llama_like():
    """A factory for the command line: 4 query heads on 2 key/value heads, rotary embeddings."""
    torch.manual_seed(0)
    return Heads(kv=2, rotary=True).eval()


def test_command_line_prunes_whole_heads_and_load_rebuilds_them(capsys, tmp_path):
    from fxprune.cli import main
    shape = ["--input-shape", "2,6,5"]
    assert main(["inspect", "test_whole_heads:llama_like", *shape, "--heads", "whole", "--json"]) == 0
    rows = {r["name"]: r for r in json.loads(capsys.readouterr().out)}
    assert rows["q"]["size"] == rows["q"]["prunable"] == 2   # two key/value groups of heads
    saved = str(tmp_path / "p.pt")
    assert main(["prune", "test_whole_heads:llama_like", *shape, "--ratio", "0.5", "--heads", "whole",
                 "--save", saved]) == 0
    capsys.readouterr()
    loaded = fxprune.load(saved, llama_like, (X,))
    assert fxprune.report(loaded).plan.keep["q"] in ([0], [1])
    assert loaded.get_submodule("k").out_features == 2
    with torch.no_grad():
        assert torch.equal(loaded(X), fxprune.apply(llama_like(), (X,), fxprune.report(loaded).plan, onnx=False)(X))


@pytest.mark.parametrize("fused", [False, True])
def test_timm_attention_loses_whole_heads(fused):
    """timm's ``Attention`` (packed qkv; ``maybe_add_mask`` between ``q @ k^T`` and softmax when not fused)."""
    timm_layers = pytest.importorskip("timm.layers")
    torch.manual_seed(0)
    attn = timm_layers.Attention(16, num_heads=4, qkv_bias=True)
    attn.fused_attn = fused
    m = nn.Sequential(nn.Linear(5, 16), attn, nn.Linear(16, 3)).eval()
    pruned = fxprune.compile(m, (X,), method="l2", ratio=0.5, heads="whole", ignore=["0"])
    rep = fxprune.report(pruned)
    assert len(rep.plan.keep["1.qkv"]) == 2
    assert pruned.get_submodule("1.qkv").out_features == 24 and pruned.get_submodule("1.proj").in_features == 8
    assert rep.mask["ok"] and rep.onnx["ok"]


class RotaryAtRunTime(nn.Module):
    """Llama's attention as Hugging Face writes it: cos/sin computed in ``forward`` from an ``inv_freq``
    buffer and the positions, 4 query heads of 8 dims on 2 key/value heads (``repeat_kv``)."""

    def __init__(self):
        super().__init__()
        self.heads, self.kv, self.head_dim = 4, 2, 8
        self.inp = nn.Linear(5, 16)
        self.q, self.o = nn.Linear(16, 32), nn.Linear(32, 16)
        self.k, self.v = nn.Linear(16, 16), nn.Linear(16, 16)
        self.register_buffer("inv_freq", 1.0 / 100 ** (torch.arange(0, 8, 2).float() / 8))
        self.out = nn.Linear(16, 3)

    def rotate_half(self, x):  # halves at a literal (Llama's x.shape[-1] // 2 is one once exported; traced by fx,
        return torch.cat((-x[..., 4:], x[..., :4]), dim=-1)  # a size read from the channels pins them)

    def forward(self, x):
        t = self.inp(x)
        b, n, _ = t.shape
        freqs = torch.arange(n, dtype=t.dtype)[:, None] * self.inv_freq[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        cos, sin = emb.cos()[None, None], emb.sin()[None, None]
        q = self.q(t).view(b, n, -1, self.head_dim).transpose(1, 2)
        k = self.k(t).view(b, n, -1, self.head_dim).transpose(1, 2)
        v = self.v(t).view(b, n, -1, self.head_dim).transpose(1, 2)
        q, k = q * cos + self.rotate_half(q) * sin, k * cos + self.rotate_half(k) * sin
        k = k[:, :, None].expand(b, self.kv, 2, n, self.head_dim).reshape(b, self.heads, n, self.head_dim)
        v = v[:, :, None].expand(b, self.kv, 2, n, self.head_dim).reshape(b, self.heads, n, self.head_dim)
        a = F.scaled_dot_product_attention(q, k, v)
        return self.out(t + self.o(a.transpose(1, 2).reshape(b, n, -1)))


@pytest.mark.parametrize("capture", ["fx", "export"])
def test_per_head_dims_prune_under_rotary_embeddings_computed_at_run_time(capture):
    """cos/sin carry no channels but vary along head_dim: the pruned graph reads them at each head's kept
    dims, and rotate_half ties dim i to dim i + 4, so q and k lose dims in pairs."""
    torch.manual_seed(0)
    m = RotaryAtRunTime().eval()
    graph = fxprune.analyze(m, (X,), capture=capture)
    assert all(g.prunable == g.size for g in graph.groups.values() if g.name != "out")  # nothing pinned but the output
    pruned = fxprune.compile(m, (X,), method="l2", ratio=0.5, round_to=None, capture=capture)
    rep = fxprune.report(pruned)
    assert rep.mask["ok"] and rep.onnx["ok"] and rep.mask["max_rel_diff"] < 1e-5
    b, b0 = pruned.get_parameter("q.bias"), m.q.bias
    kept = [int(torch.nonzero(b0 == value)[0]) for value in b]  # the original rows q kept (by their biases)
    per_head = [[i % 8 for i in kept if i // 8 == h] for h in range(4)]
    assert 0 < len(kept) < 32 and len({len(p) for p in per_head}) == 1  # every head keeps as many dims
    assert all(sorted((i + 4) % 8 for i in p) == sorted(p) for p in per_head)  # in rotary pairs
    assert pruned.get_parameter("k.weight").shape[0] == len(kept) // 2  # k's heads keep as many as q's
