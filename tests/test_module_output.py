"""output="module": the user's own model back, pruned (same class, own forward), verified against the
pruned GraphModule; literals in the model's code pin the channels they count, naming the line."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision

import fxprune
from helpers import same_state, saved_and_loaded, state_copy
from fxprune.errors import ConfigError, PlanError


def test_resnet18_module_output(tmp_path):
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10).eval()
    before = state_copy(model)
    x = torch.randn(1, 3, 32, 32)
    p = fxprune.compile(model, (x,), flops=0.5, onnx=False, output="module")
    assert type(p) is torchvision.models.ResNet
    assert p.fc.in_features < 512 and p.fc.in_features == p.layer4[1].bn2.num_features
    assert p.layer1[0].conv1.out_channels == p.layer1[0].conv1.weight.shape[0] == p.layer1[0].bn1.num_features
    assert same_state(model, before) and model.fc.in_features == 512    # the input model is untouched
    rep = fxprune.report(p)
    assert rep.output == "module" and rep.mask["ok"] and rep.mask["module"]["ok"]
    assert rep.mask["module"]["modules_compared"] > 40
    assert rep.flops_after <= 0.5 * rep.flops_before and rep.params_after == sum(t.numel() for t in p.parameters())
    g = fxprune.apply(model, (x,), rep.plan, onnx=False)               # the same plan, output="graph"
    xb = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        assert (p(xb) - g(xb)).abs().max() <= 1e-5
    # torch.save of the whole object (the user's class), and fxprune.save / load (plan + weights)
    again = saved_and_loaded(p)
    assert type(again) is torchvision.models.ResNet and fxprune.report(again).plan.keep == rep.plan.keep
    path = str(tmp_path / "p.pt")
    fxprune.save(p, path)
    loaded = fxprune.load(path, lambda: torchvision.models.resnet18(num_classes=10), (x,))
    assert type(loaded) is torchvision.models.ResNet
    as_graph = fxprune.load(path, lambda: torchvision.models.resnet18(num_classes=10), (x,), output="graph")
    assert isinstance(as_graph, torch.fx.GraphModule)
    with torch.no_grad():
        assert torch.equal(loaded(xb), p(xb)) and torch.equal(again(xb), p(xb))
        assert (as_graph(xb) - p(xb)).abs().max() <= 1e-5
    with pytest.raises(PlanError, match="not the architecture"):
        fxprune.load(path, lambda: torchvision.models.resnet34(num_classes=10), (x,))


class Literal(nn.Module):
    """A CNN whose flatten writes its channel count: ``view(n, 16 * 4 * 4)``."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 16, 3, padding=1)
        self.b1 = nn.BatchNorm2d(16)
        self.c2 = nn.Conv2d(16, 16, 3, stride=2, padding=1)
        self.fc1 = nn.Linear(16 * 4 * 4, 32)
        self.fc2 = nn.Linear(32, 10)

    def forward(self, x):
        x = F.relu(self.b1(self.c1(x)))
        x = F.relu(self.c2(x))
        x = x.view(x.size(0), 16 * 4 * 4)   # LITERAL
        return self.fc2(F.relu(self.fc1(x)))


class Runtime(Literal):
    """The same, with the size read at run time: nothing to pin."""

    def forward(self, x):
        x = F.relu(self.b1(self.c1(x)))
        x = F.relu(self.c2(x))
        x = x.view(x.size(0), x.size(1) * x.size(2) * x.size(3))
        return self.fc2(F.relu(self.fc1(x)))


def test_literal_pins_its_channels_and_names_the_line():
    torch.manual_seed(0)
    model, x = Literal().eval(), torch.randn(2, 3, 8, 8)
    line = next(i for i, text in enumerate(open(__file__).read().splitlines(), 1) if text.endswith("# LITERAL"))
    p = fxprune.compile(model, (x,), ratio=0.5, output="module")          # ONNX Runtime checked too
    assert type(p) is Literal and p.c2.out_channels == 16 and p.fc1.in_features == 256
    assert p.c1.out_channels == 8 and p.fc1.out_features == 16             # the rest is pruned
    rep = fxprune.report(p)
    assert rep.verified and rep.onnx["ok"]
    graph = fxprune.Pipeline(model, (x,), output="module").graph
    pins = [str(pin) for pin in graph.groups["c2"].pins]
    assert len(pins) == 1 and f"test_module_output.py:{line}" in pins[0]
    assert "the literal 256" in pins[0] and "x.view(x.size(0), 16 * 4 * 4)" in pins[0]
    g = fxprune.compile(model, (x,), ratio=0.5, onnx=False)               # graph output rewrites the literal
    assert g.get_submodule("c2").out_channels == 8 and g.get_submodule("fc1").in_features == 128
    # a plan made for the graph output removes those channels: refused for a module copy, with the line
    with pytest.raises(PlanError, match="pinned channels of group 'c2'"):
        fxprune.apply(model, (x,), fxprune.report(g).plan, onnx=False, output="module")
    with pytest.raises(PlanError, match="writes the literal 256 .* needs 128 there"):
        fxprune.Pipeline(model, (x,), onnx=False).build(fxprune.report(g).plan, output="module")
    # sizes read at run time follow the pruning: nothing pinned
    r = fxprune.compile(Runtime().eval(), (x,), ratio=0.5, onnx=False, output="module")
    assert type(r) is Runtime and r.c2.out_channels == 8 and r.fc1.in_features == 128
    with pytest.raises(ConfigError, match="output"):
        fxprune.compile(model, (x,), ratio=0.5, output="tree")


class Pieces(nn.Module):
    """Literal split sizes and a literal ``groups=`` in a functional conv."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 16, 1)
        self.left = nn.Conv2d(8, 8, 3, padding=1)
        self.right = nn.Conv2d(8, 8, 3, padding=1)
        self.b = nn.Conv2d(16, 12, 1)
        self.dw = nn.Parameter(torch.randn(12, 1, 3, 3) * 0.3)
        self.c = nn.Conv2d(12, 12, 1)
        self.d = nn.Conv2d(12, 6, 1)

    def forward(self, x):
        u, v = self.a(x).split([8, 8], dim=1)
        y = self.b(torch.cat([self.left(F.relu(u)), self.right(F.relu(v))], 1))
        y = F.conv2d(F.relu(y), self.dw, padding=1, groups=12)
        y = self.c(y)
        return self.d(F.relu(y))


def test_split_and_functional_groups_pin_in_module_mode():
    torch.manual_seed(0)
    model, x = Pieces().eval(), torch.randn(1, 3, 8, 8)
    p = fxprune.compile(model, (x,), ratio=0.5, onnx=False, output="module")
    assert type(p) is Pieces and p.a.out_channels == 16 and p.b.out_channels == 12
    assert p.left.out_channels == 4 and p.c.out_channels == 6                # pruned elsewhere
    graph = fxprune.Pipeline(model, (x,), output="module").graph
    reasons = " ".join(str(pin) for g in graph.groups.values() for pin in g.pins)
    assert "the literal [8, 8]" in reasons and "the literal 12" in reasons
    assert "self.a(x).split([8, 8], dim=1)" in reasons and "groups=12" in reasons
    g = fxprune.compile(model, (x,), ratio=0.5, onnx=False)
    assert g.get_submodule("a").out_channels == 8 and g.get_submodule("b").out_channels == 6


def test_vision_transformer_module_output():
    torch.manual_seed(0)
    vit = torchvision.models.VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=4, hidden_dim=32,
                                               mlp_dim=64, num_classes=10).eval()
    before, x = state_copy(vit), torch.randn(1, 3, 32, 32)
    p = fxprune.compile(vit, (x,), ratio=0.5, onnx=False, output="module")
    assert type(p) is torchvision.models.VisionTransformer and same_state(vit, before) and vit.hidden_dim == 32
    block = p.encoder.layers.encoder_layer_0
    assert block.mlp[0].out_features == 32 and block.mlp[3].in_features == 32
    # reshape(n, self.hidden_dim, n_h * n_w) reads an attribute that nothing else reads: the copy's is set
    assert p.hidden_dim == 16 and p.conv_proj.out_channels == 16 and block.ln_1.normalized_shape == (16,)
    attn = block.self_attention
    assert attn.embed_dim == 16 and attn.head_dim == 4 and attn.out_proj.in_features == 16
    rep = fxprune.report(p)
    assert rep.mask["ok"] and rep.mask["module"]["ok"] and rep.mask["module"]["modules_compared"] > 15
    g = fxprune.apply(vit, (x,), rep.plan, onnx=False)
    with torch.no_grad():
        assert (p(x) - g(x)).abs().max() <= 1e-5


class Attribute(nn.Module):
    """A width held in an attribute, read by one reshape (set on the copy) or also by a check (pinned)."""

    def __init__(self, checked: bool):
        super().__init__()
        self.width, self.checked = 16, checked
        self.c1 = nn.Conv2d(3, 16, 3, padding=1)
        self.fc = nn.Linear(16, 4)

    def forward(self, x):
        y = self.c1(x)
        if self.checked:
            torch._assert(y.shape[1] == self.width, "width")
        y = y.reshape(y.shape[0], self.width, -1).mean(-1)
        return self.fc(F.relu(y))


def test_attribute_literal_is_set_on_the_copy_or_pinned():
    torch.manual_seed(0)
    x = torch.randn(1, 3, 6, 6)
    p = fxprune.compile(Attribute(False).eval(), (x,), ratio=0.5, output="module")   # ONNX too
    assert p.width == 8 and p.c1.out_channels == 8 and fxprune.report(p).verified
    model = Attribute(True).eval()
    q = fxprune.compile(model, (x,), ratio=0.5, onnx=False, output="module")
    assert q.width == 16 and q.c1.out_channels == 16
    pins = " ".join(str(pin) for pin in fxprune.Pipeline(model, (x,), output="module").graph.groups["c1"].pins)
    assert "torch._assert(y.shape[1] == self.width" in pins and "a module copy runs that code" in pins
    g = fxprune.compile(model, (x,), ratio=0.5, onnx=False)   # the graph passes the check the original's number
    assert g.c1.out_channels == 8 and fxprune.report(g).mask["ok"]


class Ghost(nn.Module):
    """GhostNet's module: a conv and a cheap depthwise conv of its output, concatenated (12 channels) and
    cut back to a width held in an attribute (``out[:, :self.out_chs]``)."""

    def __init__(self, out_chs=10):
        super().__init__()
        self.out_chs = out_chs
        self.primary = nn.Conv2d(3, 6, 1)
        self.cheap = nn.Conv2d(6, 6, 3, padding=1, groups=6)
        self.head = nn.Conv2d(out_chs, 4, 1)

    def forward(self, x):
        x1 = self.primary(x)
        out = torch.cat([x1, self.cheap(x1)], 1)
        return self.head(F.relu(out[:, :self.out_chs]))


def test_a_slice_bound_held_in_an_attribute_is_set_on_the_copy():
    torch.manual_seed(0)
    model, x = Ghost().eval(), torch.randn(1, 3, 6, 6)
    p = fxprune.compile(model, (x,), ratio=0.5, output="module")          # pinned every channel before
    rep = fxprune.report(p)
    assert type(p) is Ghost and rep.verified and rep.onnx["ok"] and model.out_chs == 10
    assert p.primary.out_channels == 3 and p.out_chs == p.head.in_channels < 10
    g = fxprune.compile(model, (x,), ratio=0.5, onnx=False)
    with torch.no_grad():
        assert (p(x) - g(x)).abs().max() <= 1e-5


class Attention(nn.Module):
    """nn.MultiheadAttention on a stream whose width nothing in the code writes: embed_dim and head_dim shrink."""

    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(12, 32)
        self.attn = nn.MultiheadAttention(32, 4, batch_first=True)
        self.out = nn.Linear(32, 5)

    def forward(self, x):
        h = self.inp(x)
        a, _ = self.attn(h, h, h, need_weights=False)
        return self.out(h + a)


def test_multihead_attention_module_output():
    torch.manual_seed(0)
    model, x = Attention().eval(), torch.randn(2, 6, 12)
    before = state_copy(model)
    p = fxprune.compile(model, (x,), ratio=0.5, output="module")
    assert type(p) is Attention and same_state(model, before)
    assert p.attn.embed_dim == 16 and p.attn.head_dim == 4 and p.attn.out_proj.in_features == 16
    rep = fxprune.report(p)
    assert rep.verified and rep.mask["module"]["max_rel_diff"] <= 1e-5
    g = fxprune.apply(model, (x,), rep.plan, onnx=False)
    with torch.no_grad():
        assert (p(x) - g(x)).abs().max() <= 1e-5                 # the query scale is folded in both


class Mixer(nn.Module):
    """A residual stream and an attention-like inner width of 4 heads, written back with the *stream's*
    size read at run time (``B, N, C = x.shape ... reshape(B, N, C)``, as timm's MetaFormer attention
    does): a module copy reads the stream's kept width there, not the inner one."""

    def __init__(self, dim=16, heads=4):
        super().__init__()
        self.heads = heads
        self.inp = nn.Linear(6, dim)
        self.v = nn.Linear(dim, dim)
        self.proj = nn.Linear(dim, dim)
        self.head = nn.Linear(dim, 3)

    def forward(self, x):
        x = self.inp(x)
        B, N, C = x.shape
        v = self.v(x).reshape(B, N, self.heads, -1).transpose(1, 2)
        h = F.relu(v).transpose(1, 2).reshape(B, N, C)   # RUN-TIME SIZE
        return self.head(x + self.proj(h))


def test_a_size_read_at_run_time_from_another_tensor_pins_in_module_output():
    torch.manual_seed(0)
    model, x = Mixer().eval(), torch.randn(2, 5, 6)
    line = next(i for i, text in enumerate(open(__file__).read().splitlines(), 1) if text.endswith("# RUN-TIME SIZE"))
    p = fxprune.compile(model, (x,), ratio=0.5, output="module")          # raised a raw RuntimeError before
    rep = fxprune.report(p)
    assert type(p) is Mixer and rep.verified and rep.onnx["ok"]
    assert p.v.out_features == 16 and p.proj.in_features == 16 and p.inp.out_features == 16   # both kept
    pins = [str(pin) for g in fxprune.Pipeline(model, (x,), output="module").graph.groups.values() for pin in g.pins]
    assert any(f"test_module_output.py:{line}" in pin and "reads the size" in pin and "at run time" in pin
               for pin in pins)
    g = fxprune.compile(model, (x,), ratio=0.5, onnx=False)               # the graph passes the number
    assert g.get_submodule("proj").in_features == 8 and fxprune.report(g).mask["ok"]
    plan = fxprune.report(g).plan
    plan.keep["v"] = plan.keep["v"][::2]                      # the inner width cut to 4 (1 per head), the stream to 8
    with pytest.raises(PlanError, match="reads the size .* at run time: under this plan, the pruned graph passes 4"):
        fxprune.Pipeline(model, (x,), onnx=False).build(plan, output="module")   # refused by name, not a raw error


def test_hugging_face_resnet_module_output():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.ResNetConfig(embedding_size=16, hidden_sizes=[16, 32, 64, 128], depths=[1, 1, 1, 1],
                                    layer_type="bottleneck", num_labels=10)
    model = transformers.ResNetForImageClassification(cfg).eval()
    before = state_copy(model)
    # the embedder branches on the input's channel count (a leaf for fx); the flags are fixed Python values
    inputs = (torch.randn(1, 3, 32, 32), None, False, False)
    p = fxprune.compile(model, inputs, ratio=0.5, onnx=False, output="module", leaf_modules=["resnet.embedder"],
                        concrete_args={"labels": None, "output_hidden_states": False, "return_dict": False})
    assert type(p) is transformers.ResNetForImageClassification and same_state(model, before)
    rep = fxprune.report(p)
    assert rep.mask["ok"] and rep.mask["module"]["ok"] and rep.params_after < 0.5 * rep.params_before
    def width(m):
        return m.resnet.encoder.stages[1].layers[0].layer[0].convolution.out_channels

    assert width(p) < width(model)
    with torch.no_grad():
        assert p(inputs[0], return_dict=True).logits.shape == (1, 10)     # the user's forward, any flags


def test_a_channel_shuffle_keeps_its_channels_in_module_output():
    """The pruned graph gathers a shuffle's kept channels in the shuffled order; a module copy runs the
    shuffle code unchanged, so module output keeps those channels, says why, and still verifies."""
    torch.manual_seed(0)
    model = torchvision.models.shufflenet_v2_x0_5().eval()
    x = torch.randn(1, 3, 64, 64)
    copy = fxprune.compile(model, (x,), ratio=0.5, onnx=False, output="module")
    rep = fxprune.report(copy)
    assert type(copy) is type(model) and rep.mask["ok"] and rep.mask["module"]["ok"]
    assert rep.params_after < 0.6 * rep.params_before
    graph = fxprune.analyze(model, (x,), output="module")
    reasons = [p.reason for g in graph.groups.values() for p in g.pins]
    assert any("ends a channel shuffle" in r for r in reasons)
