"""The fast paths of the analysis agree with the slow, obvious ones.

The union-find is vectorised, FLOPs are counted with ``flop_registry`` in one dispatch
mode instead of ``FlopCounterMode`` per node, shape propagation computes convolutions
and linears from formulas and skips modules that keep their input's shape, labels that
no union changed are not looked up again, magnitude sums are taken in blocks, and the
rewrite copies modules without ``copy.deepcopy``: each is checked here against the plain
way of doing it.
"""
from __future__ import annotations

import random

import pytest
import torch
import torchvision
from torch.fx.passes.shape_prop import ShapeProp
from torch.utils.flop_counter import FlopCounterMode

import fxprune
import fxprune.couple.analysis as coupling
from fxprune.couple.analysis import UnionFind
from fxprune.labels import collapse
from fxprune.passes import magnitude
from fxprune.rewrite import rewrite
from fxprune.ops import FX_RULES
from fxprune.capture import ValueProp, meta_shapes, trace


def _naive_components(n, pairs):
    parent = list(range(n))

    def find(x):
        while parent[x] != x:
            x = parent[x]
        return x

    for a, b in pairs:
        ra, rb = find(a), find(b)
        if ra != rb:
            parent[max(ra, rb)] = min(ra, rb)
    return [find(i) for i in range(n)]


@pytest.mark.parametrize("seed", range(5))
def test_vectorised_union_find_matches_a_plain_one(seed):
    rng = random.Random(seed)
    n = rng.randint(5, 300)
    uf = UnionFind()
    uf.new(n)
    pairs = []
    for _ in range(rng.randint(1, 6)):  # several batches of unions, chains and repeats included
        batch = [(rng.randrange(n), rng.randrange(n)) for _ in range(rng.randint(1, 40))]
        pairs += batch
        a = torch.tensor([p[0] for p in batch]).numpy()
        b = torch.tensor([p[1] for p in batch]).numpy()
        uf.union(a, b)
    expected = _naive_components(n, pairs)  # roots are the smallest id of each set in both
    assert uf.all_roots().tolist() == expected
    label = torch.tensor([[-1, 0], [n - 1, 3 % n]])
    roots = uf.roots(label)
    assert roots[0, 0] == -1 and roots[1, 0] == expected[n - 1]


@pytest.mark.parametrize("name,size", [("resnet18", 64), ("mobilenet_v3_small", 64), ("swin_t", 64)])
def test_node_flops_add_up_to_flop_counter_mode(name, size):
    torch.manual_seed(0)
    model = torchvision.models.get_model(name, weights=None).eval()
    x = torch.randn(1, 3, size, size)
    graph = fxprune.analyze(model, (x,))
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(x)
    assert sum(graph.node_flops.values()) == counter.get_total_flops() > 0
    # the shapes recorded on meta (modules that keep shapes skipped) are the real ones
    outputs = [n for n in graph.module.graph.nodes if n.op == "output"]
    assert tuple(outputs[0].args[0].meta["tensor_meta"].shape) == (1, 1000)


def test_blocked_magnitude_sums_equal_direct_norms():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.Conv2d(8, 6, 1), torch.nn.Flatten(1),
                              torch.nn.Linear(6 * 4 * 4, 300), torch.nn.Linear(300, 5)).eval()
    graph = fxprune.analyze(net, (torch.randn(1, 3, 6, 6),))
    scores = magnitude.l2(graph)
    w0, w1, w3, w4 = (net[i].weight.detach() for i in (0, 1, 3, 4))
    expected_0 = (w0.square().sum((1, 2, 3)) + net[0].bias.detach().square() + w1.square().sum((0, 2, 3))).sqrt()
    torch.testing.assert_close(scores["0"], expected_0)
    expected_3 = (w3.square().sum(1) + net[3].bias.detach().square() + w4.square().sum(0)).sqrt()
    torch.testing.assert_close(scores["3"], expected_3)


def test_rewrite_shares_no_tensor_with_the_original():
    torch.manual_seed(0)
    model = torchvision.models.resnet18().eval()
    x = torch.randn(1, 3, 64, 64)
    graph = fxprune.analyze(model, (x,))
    pruned = rewrite(graph, fxprune.make_plan(graph, magnitude.l2(graph), ratio=0.5,
                                              ignore=["layer4.1.conv1"]))
    original = {t.untyped_storage().data_ptr() for t in model.state_dict().values()}
    copied = {t.untyped_storage().data_ptr() for t in pruned.state_dict().values()}
    assert not original & copied
    originals = {id(m) for m in model.modules()}
    assert not any(id(m) in originals for m in pruned.modules())
    # an unpruned tensor is an equal copy; the pruned model still runs
    assert torch.equal(pruned.get_submodule("fc").bias, model.fc.bias)
    # modes are copied too (fx's own path containers, which compute nothing, are made in train mode)
    assert not pruned.training and not any(m.training for m in pruned.modules() if isinstance(m, torch.nn.BatchNorm2d))
    assert pruned(x).shape == (1, 1000)


def test_vit_flops_before_and_after_are_counted_the_same_way():
    """A real eval-mode ViT runs ``nn.MultiheadAttention``'s fused fast path, which
    ``FlopCounterMode`` does not count: the report counts both models on meta instead."""
    torch.manual_seed(0)
    model = torchvision.models.VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=4,
                                                 hidden_dim=32, mlp_dim=64, num_classes=10).eval()
    x = torch.randn(1, 3, 32, 32)
    pruned = fxprune.compile(model, (x,), method="l2", ratio=0.5, onnx=False)
    rep = fxprune.report(pruned)
    assert rep.flops_after == pytest.approx(rep.flops_predicted, rel=1e-6)
    assert 0.2 < rep.flops_after / rep.flops_before < 0.35  # half of the stream and of each hidden width


@pytest.mark.parametrize("module,shape", [
    (torch.nn.Conv2d(4, 6, 3, stride=2, padding=1), (2, 4, 9, 7)),
    (torch.nn.Conv2d(4, 8, (3, 5), stride=(1, 2), padding=(2, 0), dilation=(2, 1), groups=2), (1, 4, 11, 12)),
    (torch.nn.Conv2d(4, 4, 4, padding="same", dilation=2, padding_mode="reflect"), (1, 4, 10, 10)),
    (torch.nn.Conv2d(4, 4, 3, padding="valid", bias=False), (4, 6, 6)),  # unbatched
    (torch.nn.Conv1d(3, 5, 4, stride=3, padding=2), (2, 3, 17)),
    (torch.nn.Conv3d(2, 3, (1, 3, 3), stride=(1, 2, 2), padding=(0, 1, 1)), (1, 2, 3, 8, 8)),
    (torch.nn.Linear(6, 4), (5, 6)),
    (torch.nn.Linear(6, 4, bias=False), (2, 3, 6)),
])
def test_shape_formulas_equal_running_the_module(module, shape):
    x = torch.randn(shape)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        expected = module(x)
    out, flops = FX_RULES.meta_formula(module)(module, x.to("meta"))
    assert out.device.type == "meta" and out.shape == expected.shape and out.dtype == expected.dtype
    assert flops == counter.get_total_flops() > 0


def test_shape_formulas_leave_calls_they_do_not_cover_to_a_real_run():
    conv = torch.nn.Conv2d(4, 6, 3)
    assert FX_RULES.meta_formula(conv)(conv, torch.empty(1, 5, 8, 8, device="meta")) is None  # wrong channels: torch raises
    assert FX_RULES.meta_formula(torch.nn.Linear(3, 2))(torch.nn.Linear(3, 2), torch.empty(3, device="meta")) is None
    assert FX_RULES.meta_formula(torch.nn.ConvTranspose2d(4, 4, 3)) is None


@pytest.mark.parametrize("name,size", [("resnet18", 64), ("mobilenet_v3_small", 64), ("shufflenet_v2_x0_5", 64),
                                       ("swin_t", 64), ("squeezenet1_1", 64)])
def test_meta_propagation_equals_a_real_forward(name, size):
    """Shapes, plain values and FLOPs from the meta pass (formulas, skipped modules) are
    those of running every op on real tensors."""
    torch.manual_seed(0)
    model = torchvision.models.get_model(name, weights=None).eval()
    x = torch.randn(1, 3, size, size)
    fast = trace(model, (x,))  # on meta
    slow, plain = torch.fx.symbolic_trace(model), torch.fx.symbolic_trace(model)
    with torch.no_grad():
        out = ValueProp(slow).propagate(x)  # every op run on real tensors
        ShapeProp(plain).propagate(x)  # torch's own shape propagation
    assert out.shape == (1, 1000)
    fast_nodes, slow_nodes = list(fast.graph.nodes), list(slow.graph.nodes)
    assert [n.name for n in fast_nodes] == [n.name for n in slow_nodes]
    for f, s, p in zip(fast_nodes, slow_nodes, plain.graph.nodes):
        assert meta_shapes(f) == meta_shapes(s) == meta_shapes(p), f.name
        assert f.meta.get("flops") == s.meta.get("flops"), f.name
        assert repr(f.meta.get("value")) == repr(s.meta.get("value")), f.name


def test_label_cache_changes_no_group(monkeypatch):
    """Labels that no union changed are passed through without a new lookup; the groups
    are those of looking every label up again."""
    torch.manual_seed(0)
    model = torchvision.models.regnet_y_400mf(weights=None).eval()  # residual adds and SE gates
    x = torch.randn(1, 3, 64, 64)

    def summary(graph):
        return {name: (g.size, int(g.pinned.sum()), [(m.param, m.dim, m.index.tolist()) for m in g.members])
                for name, g in graph.groups.items()}

    cached = summary(fxprune.analyze(model, (x,)))
    monkeypatch.setattr(coupling.Analysis, "collapsed_roots",
                        lambda self, label: collapse(self.uf.roots(label)))
    assert summary(fxprune.analyze(model, (x,))) == cached


def test_reduce_of_a_covering_member_equals_the_scatter():
    torch.manual_seed(0)
    graph = fxprune.analyze(torchvision.models.resnet18().eval(), (torch.randn(1, 3, 32, 32),))
    checked = 0
    for g in graph.prunable_groups():
        for m in g.members:
            values = torch.randn(len(m.index))
            keep = m.index >= 0
            plain = torch.zeros(g.size).index_add_(0, m.index[keep], values[keep])
            assert torch.equal(g.reduce(values, m), plain)
            checked += m.covers(g.size)
    assert checked > 50  # the fast path was taken
