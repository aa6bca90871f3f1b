"""The capture stage's tracers: ``symbolic_trace``, and ``torch.export`` where it fails (``capture="auto"``),
with the ATen rule table; what the report says about them; real models fx cannot trace."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fxprune
from fxprune.couple import couple
from fxprune.errors import RewriteError
from fxprune.ops import ATEN_RULES, FX_RULES, Rule
from fxprune.passes import magnitude
from torch.utils._pytree import tree_leaves

from digits import SmallResNet
from helpers import assert_state_equal, prune_and_check, state_copy

X = torch.randn(1, 3, 8, 8)


def conv_bn(cin, cout, k=3, groups=1):
    return nn.Sequential(nn.Conv2d(cin, cout, k, padding=k // 2, groups=groups, bias=False), nn.BatchNorm2d(cout),
                         nn.SiLU(inplace=True))


class ShapeBranch(nn.Module):
    """fx cannot trace ``if x.shape[-1] % 2`` (a Proxy in control flow); export takes the branch the
    example takes. The rest touches the ATen rules: a split list, a slice of channels, a residual,
    a grouped conv, a view with literal sizes into a linear."""

    def __init__(self):
        super().__init__()
        self.stem = conv_bn(3, 16, 1)
        self.m = conv_bn(8, 8)
        self.dw = conv_bn(16, 16, 3, groups=4)
        self.mix = conv_bn(24, 16, 1)
        self.fc = nn.Linear(16 * 4 * 4, 10)

    def forward(self, x):
        y = self.stem(x)
        if x.shape[-1] % 2 == 0:
            y = y * 2.0
        a, b = list(y.chunk(2, 1))  # YOLO's C2f: fx's Proxy cannot be iterated
        b = self.m(b) + b
        z = self.mix(torch.cat([a, b, self.dw(y)[:, :8]], 1))
        z = F.max_pool2d(z, 2)
        return self.fc(z.reshape(z.shape[0], -1))


def test_auto_falls_back_to_export_prunes_and_verifies():
    net = ShapeBranch().eval()
    pruned, rep = prune_and_check(net, (X,), method="l2", ratio=0.5, must_shrink=["stem.0", "mix.0"])
    assert rep.capture["tracer"] == "export"
    assert rep.capture["why"].startswith("symbolic_trace failed:") and "\n" not in rep.capture["why"]
    assert "captured by" in str(rep) and "export" in str(rep)
    assert rep.plan.removed > 0 and rep.params_after < rep.params_before
    assert rep.mask["ok"] and rep.onnx["ok"]
    assert torch.allclose(net(X), net(X))  # the model still runs, unchanged
    assert fxprune.analyze(net, (X,)).table is ATEN_RULES
    # the same plan again, from the original
    again = fxprune.apply(net, (X,), rep.plan, onnx=False)
    assert torch.equal(again(X), pruned(X))


def test_fx_alone_raises_trace_error():
    with pytest.raises(fxprune.TraceError, match="could not trace") as err:
        fxprune.compile(ShapeBranch().eval(), (X,), ratio=0.5, capture="fx")
    assert "test_capture.py" in str(err.value)
    with pytest.raises(fxprune.ConfigError, match="capture must be one of"):
        fxprune.analyze(ShapeBranch(), (X,), capture="dynamo")


class Cache:
    """A result type that no pytree is registered for (as a Hugging Face DynamicCache)."""

    def __init__(self, t):
        self.t = t


class ReturnsCache(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3)

    def forward(self, x):
        y = self.conv(x)
        return y, Cache(y)


def test_export_names_an_output_it_cannot_flatten_and_the_fix():
    """A model returning an object of a type with no pytree (a Hugging Face causal LM with use_cache=True returns
    a DynamicCache): the error names the type and the fix, not export's generic advice."""
    with pytest.raises(fxprune.TraceError) as err:
        fxprune.analyze(ReturnsCache().eval(), (X,), capture="export")
    message = str(err.value)
    assert "test_capture.Cache" in message and "cannot flatten" in message and "use_cache=False" in message
    assert "register_pytree_node" in message and "shape-dependent" not in message


def test_export_matches_fx_on_a_plain_cnn():
    torch.manual_seed(0)
    net = SmallResNet(8).eval()
    x = torch.randn(1, 1, 8, 8)
    reps, outs = {}, {}
    for how, table in (("fx", FX_RULES), ("export", ATEN_RULES)):
        pipe = fxprune.Pipeline(net, (x,), capture=how, onnx=False)
        pruned = pipe.build(pipe.planner(magnitude.l2, "l2")(flops=0.6))
        assert pipe.graph.table is table
        reps[how], outs[how] = fxprune.report(pruned), pruned(x)
    fx, ex = reps["fx"], reps["export"]
    assert fx.capture == {"tracer": "fx"} and ex.capture["tracer"] == "export" and ex.capture["batch"] == "dynamic"
    assert torch.allclose(outs["fx"], outs["export"], atol=1e-6)
    assert (ex.groups, ex.prunable_groups, ex.pinned_groups) == (fx.groups, fx.prunable_groups, fx.pinned_groups)
    assert ex.plan.keep == fx.plan.keep  # groups named after the same modules, the same channels kept
    assert (ex.params_before, ex.params_after) == (fx.params_before, fx.params_after)
    assert (ex.flops_before, ex.flops_after) == (fx.flops_before, fx.flops_after)
    assert ex.flops_predicted == pytest.approx(fx.flops_predicted)
    assert ex.mask["ok"] and fx.mask["ok"]


class Heads(nn.Module):
    """Attention as HF writes it: per-head views with literal sizes, SDPA, a LayerNorm, GELU MLP."""

    def __init__(self, width=16, heads=2):
        super().__init__()
        self.heads = heads
        self.q, self.k, self.v, self.o = (nn.Linear(width, width) for _ in range(4))
        self.norm = nn.LayerNorm(width)
        self.up, self.down = nn.Linear(width, 32), nn.Linear(32, width)
        self.head = nn.Linear(width, 3)

    def forward(self, x):
        b, n, c = x.shape
        if n % 2 == 0:  # shape-dependent Python: fx cannot trace it
            x = x * 1.0
        split = [t(x).view(b, n, self.heads, c // self.heads).transpose(1, 2) for t in (self.q, self.k, self.v)]
        y = F.scaled_dot_product_attention(*split).transpose(1, 2).reshape(b, n, c)
        x = self.norm(x + self.o(y))
        x = x + self.down(F.gelu(self.up(x)))
        return self.head(x[:, 0])


def test_attention_through_export():
    torch.manual_seed(0)
    net = Heads().eval()
    x = torch.randn(1, 6, 16)
    pruned, rep = prune_and_check(net, (x,), method="l2", ratio=0.5, onnx=False)
    assert rep.capture["tracer"] == "export"
    assert {"q", "v", "up"} <= set(rep.plan.keep), rep.plan.keep  # head_dim of q/k, of v, MLP width
    sdpa = [n for n in pruned.graph.nodes if "scaled_dot_product_attention" in str(n.target)]
    assert sdpa and sdpa[0].kwargs["scale"] == pytest.approx(8 ** -0.5)  # the original 1/sqrt(head_dim)


def prune_structured(net, inputs, **kw):
    """``prune_and_check`` for models whose outputs are nested (YOLO's tuple, HF's ModelOutput)."""
    before = state_copy(net)
    pruned = fxprune.compile(net, inputs, method="l2", onnx=False, **kw)
    assert_state_equal(net, before)
    rep = fxprune.report(pruned)
    assert rep.mask["ok"] and rep.mask["nodes_compared"] > 0, rep.mask
    with torch.no_grad():
        ref, out = net(*inputs), pruned(*inputs)
    assert type(ref) is type(out)  # the output structure survives (torch.export's pytree spec)
    assert [t.shape for t in tree_leaves(ref)] == [t.shape for t in tree_leaves(out)]
    return pruned, rep


def test_yolov8n_detection_model():
    tasks = pytest.importorskip("ultralytics.nn.tasks")
    torch.manual_seed(0)
    net = tasks.DetectionModel("yolov8n.yaml", verbose=False).eval()
    x = torch.randn(1, 3, 32, 32)
    pruned, rep = prune_structured(net, (x,), ratio=0.3)
    assert rep.capture["tracer"] == "export"
    assert rep.prunable_groups > 20 and rep.flops_after < 0.8 * rep.flops_before


def test_tiny_gpt2():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=64, n_embd=16, n_layer=1, n_head=2, n_positions=16, use_cache=False,
                                     bos_token_id=0, eos_token_id=0)
    net = transformers.GPT2LMHeadModel(config).eval()
    ids = torch.randint(0, 64, (1, 8))
    pruned, rep = prune_structured(net, (ids,), ratio=0.5)
    assert rep.capture["tracer"] == "export"
    assert rep.plan.removed > 0 and rep.mask["ok"]


@pytest.mark.parametrize("output", ["graph", "module"])
def test_tiny_mixture_of_experts(output):
    """transformers' MoE (a router, experts' weights [E, out, in] run by its grouped_mm op): the experts keep
    the same channels, in counts of 8; the module copy runs transformers' own code on them."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.Qwen2MoeConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                         num_key_value_heads=1, num_experts=4, num_experts_per_tok=2,
                                         moe_intermediate_size=32, shared_expert_intermediate_size=16,
                                         intermediate_size=48, max_position_embeddings=16, use_cache=False)
    config._attn_implementation = "eager"
    net = transformers.Qwen2MoeForCausalLM(config).eval()
    ids = torch.randint(0, 64, (1, 8))
    pruned = fxprune.compile(net, (ids,), method="l2", ratio=0.6, output=output, onnx=False)
    rep = fxprune.report(pruned)
    assert rep.capture["tracer"] == "export" and rep.mask["ok"], rep.mask
    experts = dict(pruned.named_parameters())
    up, down = experts["model.layers.0.mlp.experts.gate_up_proj"], experts["model.layers.0.mlp.experts.down_proj"]
    d = 16 if output == "graph" else 32   # 32 * 0.4 kept, rounded up to 8s; whole in the module copy (below)
    assert up.shape == (4, 2 * 16, d) and down.shape == (4, d, 16), (up.shape, down.shape)
    if output == "module":   # the residual stream stays (RMSNorm's mean in the model's code); the experts prune
        assert type(pruned) is type(net)
        with torch.no_grad():   # transformers' eager path: torch's grouped_mm, 16-byte aligned rows
            assert pruned(torch.randint(0, 64, (1, 5))).logits.shape == (1, 5, 64)


def test_tiny_multi_head_latent_attention():
    """GLM-4.7-Flash's (DeepSeek's) attention builds q and k in ``new_empty`` buffers filled by in-place copies: the
    check compares what is read from them, not the allocator's garbage (which failed it: "differs at node
    'new_empty'"); its experts prune."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.Glm4MoeLiteConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, moe_intermediate_size=16, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=2, n_routed_experts=4, num_experts_per_tok=2, kv_lora_rank=16,
        q_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8, max_position_embeddings=16,
        use_cache=False, mlp_layer_types=["dense", "sparse"], pad_token_id=0)
    config._attn_implementation = "eager"
    net = transformers.AutoModelForCausalLM.from_config(config).eval()
    pruned = fxprune.compile(net, (torch.randint(0, 64, (1, 8)),), method="l2", ratio=0.5, onnx=False)
    rep = fxprune.report(pruned)
    assert rep.mask["ok"], rep.mask
    assert dict(pruned.named_parameters())["model.layers.1.mlp.experts.gate_up_proj"].shape == (4, 16, 16)


def test_fx_iterates_a_chunk_with_a_literal_count():
    class C2f(nn.Module):  # ultralytics' C2f: list(cv1(x).chunk(2, 1)), then appends to the list
        def __init__(self):
            super().__init__()
            self.cv1, self.m, self.cv2 = conv_bn(3, 16, 1), conv_bn(8, 8), conv_bn(24, 8, 1)

        def forward(self, x):
            y = list(self.cv1(x).chunk(2, 1))
            y.extend(m(y[-1]) for m in [self.m])
            return self.cv2(torch.cat(y, 1))

    pruned, rep = prune_and_check(C2f(), (X,), method="l2", ratio=0.5, onnx=False, must_shrink=["cv1.0", "m.0"])
    assert rep.capture == {"tracer": "fx"}


def test_aten_rows_read_aten_argument_order():
    """aten.batch_norm puts weight and bias before the running statistics (F.batch_norm after):
    each member must carry its own role, which the `bn` criterion scores."""
    torch.manual_seed(0)
    net = SmallResNet(8).eval()
    graph = fxprune.analyze(net, (torch.randn(1, 1, 8, 8),), capture="export")
    expected = {"weight": "norm_weight", "bias": "norm_bias", "running_mean": "running_mean", "running_var": "running_var"}
    norms = [(m.param, m.role) for g in graph.groups.values() for m in g.members if m.role in expected.values()]
    assert len(norms) == 4 * 8  # eight BatchNorms
    assert all(role == expected[param.rsplit(".", 1)[1]] for param, role in norms), norms
    aten = torch.ops.aten
    assert ATEN_RULES[aten.conv2d.default].couple.__name__ == "conv_function"
    assert ATEN_RULES[aten.linear.default].couple.__name__ == "linear_function"
    assert ATEN_RULES[aten.layer_norm.default].couple.__name__ == "layer_norm_rule"
    assert ATEN_RULES[aten.relu_.default].couple.__name__ == "elementwise"
    assert ATEN_RULES[aten.view.default].fix is not None and ATEN_RULES[aten.split_with_sizes.default].fix is not None
    assert aten.conv2d.default not in FX_RULES  # the fx table is unchanged


def test_failures_inside_rules_become_pins_or_named_errors():
    net = ShapeBranch().eval()
    # a rule that returns a label that does not fit its value: the node's channels are pinned, with the reason
    table = ATEN_RULES.extended("odd")
    table.register(Rule(lambda ctx, args, kwargs: torch.zeros(5, 5, dtype=torch.long)), torch.ops.aten.max_pool2d.default)
    pipe = fxprune.Pipeline(net, (X,), capture="export", onnx=False)
    graph = couple(pipe.graph.module, (X,), table)
    pins = [str(p) for g in graph.groups.values() for p in g.pins]
    assert any("could not be analysed" in p and "max_pool2d" in p for p in pins), pins
    # a fix that fails at rewrite time: a RewriteError naming the node, not a raw exception
    broken = ATEN_RULES.extended("broken")
    broken.register(Rule(ATEN_RULES[torch.ops.aten.view.default].couple, fix=lambda node, rw: 1 / 0),
                    torch.ops.aten.reshape.default)
    pipe.graph.table = broken
    with pytest.raises(RewriteError, match="reshape"):
        pipe.build(pipe.planner(magnitude.l2, "l2")(ratio=0.5))


def test_a_fixed_batch_export_says_why_data_driven_methods_fail():
    class FixedBatch(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.fc = nn.Conv2d(3, 8, 3), nn.Linear(8 * 36, 4)

        def forward(self, x):
            if x.shape[-1] % 2 == 0:
                x = x * 2.0
            return self.fc(torch.relu(self.conv(x)).view(1, -1))  # a literal batch of 1

    net = FixedBatch().eval()
    pruned, rep = prune_and_check(net, (X,), method="l2", ratio=0.5, onnx=False, must_shrink=["conv"])
    assert rep.capture["tracer"] == "export" and rep.capture["batch"] == "fixed"
    data = (torch.randn(6, 3, 8, 8), torch.arange(6) % 4)
    with pytest.raises(fxprune.DataError, match="example's batch size only"):
        fxprune.compile(net, (X,), method="taylor", data=data, ratio=0.5, onnx=False)


class CachesAnchors(nn.Module):
    """ultralytics' RT-DETR decoder: anchors made for the input's shapes and kept in plain attributes for the next call."""

    def __init__(self):
        super().__init__()
        self.conv, self.head = nn.Conv2d(3, 16, 3, padding=1), nn.Linear(16, 4)

    def forward(self, x):
        if getattr(self, "shapes", None) != tuple(x.shape[2:]):   # attributes made at the first call
            h, w = x.shape[2:]
            self.anchors = torch.stack(torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij"), -1).float()
            self.shapes = (h, w)
        y = torch.relu(self.conv(x)).permute(0, 2, 3, 1)
        return self.head(y)[..., :2] + self.anchors


def test_export_leaves_no_fake_tensor_in_the_users_model():
    """Export runs forward on fake tensors; an attribute the model caches there would be fake afterwards (and the
    batch-generic check's own eager run read it: a raw GuardOnDataDependentSymNode). The attributes are restored."""
    from torch._subclasses.fake_tensor import FakeTensor

    torch.manual_seed(0)
    model, x = CachesAnchors().eval(), torch.randn(1, 3, 6, 6)
    pruned = fxprune.compile(model, (x,), method="l2", ratio=0.5, capture="export", round_to=None)
    rep = fxprune.report(pruned)
    assert rep.mask["ok"] and rep.onnx["ok"] and pruned.conv.weight.shape[0] == 8
    assert not isinstance(getattr(model, "anchors", None), FakeTensor)
    with torch.no_grad():
        assert torch.allclose(model(x)[0, 5, 4, :] - model.head(torch.relu(model.conv(x)).permute(0, 2, 3, 1))[0, 5, 4, :2],
                              torch.tensor([5.0, 4.0]))


class CachesByDevice(nn.Module):
    """timm's LeViT: in eval mode its attention bias is computed once per device and kept in a dict."""

    def __init__(self):
        super().__init__()
        self.conv, self.bias = nn.Conv2d(3, 16, 3, padding=1), nn.Parameter(torch.randn(16, 1, 1))
        self.cache = {}

    def forward(self, x):
        key = str(x.device)
        if self.training:
            bias = self.bias * 2
        else:
            if key not in self.cache:
                self.cache[key] = self.bias * 2
            bias = self.cache[key]
        return torch.relu(self.conv(x)) + bias


@pytest.mark.parametrize("capture", ["fx", "export"])
def test_capture_leaves_a_dict_the_model_caches_in_as_it_was(capture):
    """Capture runs forward on proxies or fake tensors: the model's cache dict got a proxy key (fx) or a
    fake tensor (export), and a second compile of the same model failed inside torch. The dict is as it was."""
    torch.manual_seed(0)
    model, x = CachesByDevice().eval(), torch.randn(1, 3, 6, 6)
    for _ in range(2):
        pruned = fxprune.compile(model, (x,), method="l2", ratio=0.5, capture=capture, round_to=None)
        assert model.cache == {} and fxprune.report(pruned).verified
    with torch.no_grad():
        assert torch.allclose(model(x), torch.relu(model.conv(x)) + 2 * model.bias)
    assert list(model.cache) == ["cpu"]


class KeepsLast(nn.Module):  # a model that records a statistic of its last call in an attribute
    def __init__(self):
        super().__init__()
        self.conv, self.head = nn.Conv2d(3, 16, 3, padding=1), nn.Conv2d(16, 4, 1)

    def forward(self, x):
        self.last_peak = x.amax()
        return self.head(torch.relu(self.conv(x)))


def test_symbolic_trace_leaves_no_proxy_in_the_users_model():
    model, x = KeepsLast().eval(), torch.randn(1, 3, 6, 6)
    pruned = fxprune.compile(model, (x,), method="l2", ratio=0.5, capture="fx", round_to=None)
    assert fxprune.report(pruned).mask["ok"] and pruned.conv.weight.shape[0] == 8
    assert not isinstance(getattr(model, "last_peak", None), torch.fx.Proxy)
