"""fxprune.verify.masked: zeroing channels at every tensor equals removing them; batching and caching are exact."""
from __future__ import annotations

import weakref

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from digits import SmallResNet

import fxprune
from fxprune.errors import ConfigError
from fxprune.verify.masked import MaskedRunner, feature_nodes, pooled_features
from fxprune.rewrite import rewrite


pytestmark = pytest.mark.usefixtures("one_thread")


class CatSplit(nn.Module):
    """cat of two branches, a chunk, a flatten into a linear: channel offsets everywhere."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(2, 4, 3, padding=1)
        self.b = nn.Conv2d(2, 6, 3, padding=1)
        self.bn = nn.BatchNorm2d(10)
        self.c = nn.Conv2d(5, 3, 1)
        self.d = nn.Conv2d(5, 3, 1)
        self.fc = nn.Linear(6 * 16, 5)

    def forward(self, x):
        y = F.relu(self.bn(torch.cat([self.a(x), self.b(x)], 1)))
        u, v = torch.chunk(y, 2, dim=1)
        z = torch.cat([self.c(u), self.d(v)], 1)
        return self.fc(z.flatten(1))


def _randomise_bn(model, seed=0):
    gen = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=gen) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
            m.weight.data.copy_(torch.randn(m.num_features, generator=gen))
            m.bias.data.copy_(torch.randn(m.num_features, generator=gen))  # beta != 0: zeroing weights is not enough
    return model.eval()


@pytest.mark.parametrize("make,shape", [(lambda: SmallResNet(8), (6, 1, 8, 8)), (CatSplit, (6, 2, 4, 4))])
def test_masked_output_equals_pruned_model(make, shape):
    torch.manual_seed(0)
    model = _randomise_bn(make())
    x = torch.randn(shape)
    graph = fxprune.analyze(model, (x[:1],))
    runner = MaskedRunner(graph, (x,), masks_per_forward=3)
    gen = torch.Generator().manual_seed(1)
    drops, plans = [], []
    for trial in range(3):
        keep, drop = {}, []
        for g in graph.prunable_groups():
            free = torch.nonzero(~g.pinned).flatten()
            k = int(torch.randint(1, max(2, len(free)), (1,), generator=gen))
            gone = free[torch.randperm(len(free), generator=gen)[:min(k, len(free) - 1)]]
            drop += (gone + graph.offsets[g.name]).tolist()
            keep[g.name] = sorted(set(range(g.size)) - set(gone.tolist()))
        drops.append(drop)
        plans.append(fxprune.Plan(keep, {n: graph.groups[n].size for n in keep}))
    outs = runner.run(drops)
    assert outs.shape == (3, shape[0], 10 if make is not CatSplit else 5)
    for out, plan in zip(outs, plans):
        with torch.no_grad():
            pruned = rewrite(graph, plan).eval()(x)
        assert torch.allclose(out, pruned, atol=1e-5, rtol=1e-4), (out - pruned).abs().max()
        assert not torch.allclose(out, model(x), atol=1e-3)  # the masks did something


def test_batched_and_cached_equal_one_at_a_time():
    torch.manual_seed(0)
    model = _randomise_bn(SmallResNet(8))
    x = torch.randn(5, 1, 8, 8)
    graph = fxprune.analyze(model, (x[:1],))
    drops = [[c] for c in range(graph.num_channels) if c % 7 == 0][:8]
    batched = MaskedRunner(graph, (x,), masks_per_forward=3)
    got = batched.run(drops)
    single = torch.stack([MaskedRunner(graph, (x,)).run_one(d) for d in reversed(drops)][::-1])
    assert torch.allclose(got, single, atol=1e-5)
    with torch.no_grad():
        assert torch.allclose(batched.reference(), model(x), atol=1e-5)
    # the cache: masks of the last block's inner group recompute only the end of the graph
    late = graph.offsets["stage2.conv1"]
    runner = MaskedRunner(graph, (x,), masks_per_forward=2)
    runner.run([[late + i] for i in range(16)])
    assert 0 < runner.forwards < 0.5 * 16  # measured 6.2 forward-equivalents for 16 masks


class PositionEmbedding(nn.Module):
    """A token model whose position embedding is computed from a buffer (as BERT's ``position_ids``): a value
    that carries channels but not the batch (``[1, tokens, width]``), added to the token embedding."""

    def __init__(self):
        super().__init__()
        self.tok, self.pos = nn.Embedding(10, 8), nn.Embedding(4, 8)
        self.register_buffer("position_ids", torch.arange(4).unsqueeze(0))
        self.up, self.down, self.head = nn.Linear(8, 16), nn.Linear(16, 8), nn.Linear(8, 3)

    def forward(self, ids):
        h = self.tok(ids) + self.pos(self.position_ids)
        h = h + self.down(F.relu(self.up(h)))
        return self.head(h.mean(1))


@pytest.mark.parametrize("capture", ["fx", "export"])
def test_masks_of_a_value_without_the_batch_run_one_per_pass(capture):
    torch.manual_seed(0)
    model = PositionEmbedding().eval()
    ids = torch.randint(0, 10, (5, 4))
    graph = fxprune.analyze(model, (ids[:1],), capture=capture)
    drops = [[c] for c in range(graph.num_channels)]
    single = torch.stack([MaskedRunner(graph, (ids,)).run_one(d) for d in drops])
    runner = MaskedRunner(graph, (ids,), masks_per_forward=4)
    with pytest.warns(UserWarning, match="one per forward pass"):
        got = runner.run(drops)
    assert torch.allclose(got, single, atol=1e-6) and runner.m == 1 and "shape (1, 4, 8)" in runner.unbatched
    assert float((single - runner.reference()).abs().amax(dim=(1, 2)).min()) > 0   # every mask moves the output
    scores = fxprune.passes.get("curl")(graph, data=ids, seed=0)    # CURL batches its masks by default
    assert all(bool((s > 0).all()) for s in scores.values())


def test_masks_per_pass_halve_when_a_pass_runs_out_of_memory(monkeypatch):
    torch.manual_seed(0)
    model = _randomise_bn(SmallResNet(8))
    x = torch.randn(3, 1, 8, 8)
    graph = fxprune.analyze(model, (x[:1],))
    drops = [[c] for c in range(0, graph.num_channels, 5)]
    single = torch.stack([MaskedRunner(graph, (x,)).run_one(d) for d in drops])
    runner = MaskedRunner(graph, (x,), masks_per_forward=8)
    masked_pass = runner._masked_pass

    def small_memory(env, start, end, chunk, m, capture):   # a machine where passes of more than 2 masks fail
        if m > 2:
            raise RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 1445068800 bytes")
        return masked_pass(env, start, end, chunk, m, capture)

    monkeypatch.setattr(runner, "_masked_pass", small_memory)
    with pytest.warns(UserWarning, match="out of memory with 8 masks per forward pass"):
        got = runner.run(drops)
    assert runner.m == 2 and torch.allclose(got, single, atol=1e-5)


class InPlace(nn.Module):
    """In-place ops in the prefix every pass resumes from, and one after it on a value of the prefix."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(2, 6, 3, padding=1)
        self.b = nn.Conv2d(6, 6, 3, padding=1)
        self.c = nn.Conv2d(6, 4, 1)
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        y = F.relu(self.a(x), inplace=True)
        y = F.relu(self.b(y), inplace=True) + y
        z = self.fc(F.relu(self.c(y)).mean((2, 3)))
        return z + y.mul_(2.0).mean((1, 2, 3)).unsqueeze(1)   # alters y after the last group's first node


@pytest.mark.parametrize("make,shape", [(lambda: SmallResNet(8), (5, 1, 8, 8)), (InPlace, (5, 2, 6, 6))])
def test_later_runs_resume_the_prefix_and_give_the_same_outputs(make, shape):
    """Successive runs on one runner (backward elimination's rounds) resume the cached unmasked prefix
    where it allows, restart it where a run starts earlier, and equal a fresh runner each time."""
    torch.manual_seed(0)
    model = _randomise_bn(make())
    x = torch.randn(shape)
    graph = fxprune.analyze(model, (x[:1],))
    groups = graph.prunable_groups()
    runner = MaskedRunner(graph, (x,), masks_per_forward=2)
    late, early = groups[-1], groups[0]
    calls = [[[graph.offsets[late.name] + i] for i in range(3)],
             [[graph.offsets[late.name] + i, graph.offsets[late.name] + 1] for i in range(2)],
             [[graph.offsets[early.name]], [graph.offsets[late.name]]],       # starts earlier: a fresh prefix
             [[graph.offsets[late.name] + 2]]]
    spent = []
    for drops in calls:
        before = runner.forwards
        got = runner.run(drops)
        spent.append(runner.forwards - before)
        fresh = MaskedRunner(graph, (x,), masks_per_forward=2).run(drops)
        assert torch.equal(got, fresh)
    fresh = MaskedRunner(graph, (x,), masks_per_forward=2)
    fresh.run(calls[1])
    assert spent[1] < fresh.forwards    # the second run resumed the first one's prefix


def test_base_drop_and_capture():
    torch.manual_seed(0)
    model = _randomise_bn(SmallResNet(8))
    x = torch.randn(4, 1, 8, 8)
    graph = fxprune.analyze(model, (x[:1],))
    stem = graph.groups["stem.0"]
    base = torch.zeros(graph.num_channels, dtype=torch.bool)
    base[graph.offsets["stem.0"] + 2] = True
    runner = MaskedRunner(graph, (x,), base_drop=base)
    names = feature_nodes(graph, stem)
    assert len(names) == 3  # the stem output and the two block outputs of stage 1 feed convs
    vals = runner.run([[]], capture=names)
    for name in names:
        assert vals[name].shape[:2] == (1, 4)
        feats = pooled_features(graph, stem, name, vals[name][0])
        assert feats.shape == (4, stem.size, 1)
        assert torch.all(feats[:, 2] == 0)  # the base-dropped channel is zero everywhere
        assert torch.all(feats[:, [0, 1, 3]].abs().sum() > 0)
    feats4 = pooled_features(graph, stem, names[0], vals[names[0]][0], pool=2)
    assert feats4.shape == (4, stem.size, 4)
    assert torch.allclose(feats4.mean(2), pooled_features(graph, stem, names[0], vals[names[0]][0])[:, :, 0], atol=1e-6)


def test_bad_masks():
    model = SmallResNet(4).eval()
    x = torch.randn(2, 1, 8, 8)
    graph = fxprune.analyze(model, (x[:1],))
    with pytest.raises(ConfigError, match="outside"):
        MaskedRunner(graph, (x,)).run([[graph.num_channels]])
    with pytest.raises(ConfigError, match="masks_per_forward"):
        MaskedRunner(graph, (x,), masks_per_forward=0)


class RsqrtOfZeros(torch.nn.Module):
    """An intermediate value with inf at the same positions in the original and the pruned model."""

    def __init__(self):
        super().__init__()
        self.conv1 = torch.nn.Conv2d(3, 8, 1)
        self.conv2 = torch.nn.Conv2d(8, 4, 1)

    def forward(self, x):
        y = self.conv1(x).relu()
        return self.conv2(torch.rsqrt(y).clamp(max=10.0))


def test_equal_infinities_are_equal_in_mask_equivalence():
    torch.manual_seed(0)
    pruned = fxprune.compile(RsqrtOfZeros().eval(), (torch.randn(1, 3, 6, 6),), method="l1", ratio=0.5, onnx=False)
    rep = fxprune.report(pruned)
    assert rep.mask["ok"] and rep.mask["max_rel_diff"] < 1e-5 and rep.plan.removed == 4


class LargeCommonLogits(nn.Module):
    """Logits that share a large common part: a softmax over them amplifies float32 rounding."""

    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(16, 256)
        self.fc2 = nn.Linear(256, 8)
        with torch.no_grad():
            self.fc2.weight.add_(300.0)  # every row: the same large component, plus the small init

    def forward(self, x):  # the cast is a dtype literal in an export graph
        return torch.softmax(self.fc2(torch.relu(self.fc1(x)).to(self.fc2.weight.dtype)), -1)


@pytest.mark.parametrize("capture", ["fx", "export"])
def test_float32_rounding_is_rechecked_in_float64(capture):
    """Cutting half of fc2's inputs changes its float32 summation order; the softmax over
    logits of ~1e4 magnifies that past the tolerance. In float64 the same rewrite agrees."""
    from fxprune.verify.mask import mask_equivalence
    torch.manual_seed(0)
    model, x = LargeCommonLogits().eval(), torch.randn(4, 16)
    pruned = fxprune.compile(model, (x,), method="l1", ratio=0.5, onnx=False, capture=capture)
    rep = fxprune.report(pruned)
    assert rep.mask["ok"] and rep.mask["checked_in"] == "float64"
    assert rep.mask["float32_max_rel_diff"] > 1e-4 > 1e-9 > rep.mask["max_rel_diff"]
    assert model.fc2.weight.dtype == torch.float32 and pruned.fc2.weight.dtype == torch.float32  # copies only
    assert "in float64" in str(rep)

    with torch.no_grad():
        assert float(pruned(x).sum()) == pytest.approx(4.0) and pruned(x).dtype == torch.float32
    # a rewrite that is wrong fails in both precisions: the float32 figures are what is reported
    graph = fxprune.analyze(model, (x,), capture=capture)
    keep = fxprune.make_plan(graph, {g.name: torch.arange(g.size, dtype=torch.float) for g in graph.prunable_groups()},
                             ratio=0.5).mask(graph)
    wrong = rewrite(graph, fxprune.make_plan(graph, {g.name: -torch.arange(g.size, dtype=torch.float)
                                                     for g in graph.prunable_groups()}, ratio=0.5))
    result = mask_equivalence(graph, keep, wrong, (x,))
    assert not result["ok"] and "checked_in" not in result and result["max_rel_diff"] > 1e-2


class CastsToFloat32(LargeCommonLogits):
    def forward(self, x):  # `.float()` keeps float32 in the float64 run: fc2 then fails there
        return torch.softmax(self.fc2(torch.relu(self.fc1(x)).float()), -1)


def test_a_float64_recheck_that_cannot_run_is_named_in_the_error():
    torch.manual_seed(0)
    with pytest.raises(fxprune.VerificationError, match="float64 re-check.*could not run: RuntimeError"):
        fxprune.compile(CastsToFloat32().eval(), (torch.randn(4, 16),), method="l1", ratio=0.5, onnx=False)


class TwoBranches(nn.Module):
    """A deep chain, then two branches that do not depend on each other."""

    def __init__(self, depth=12):
        super().__init__()
        self.chain = nn.Sequential(*[nn.Sequential(nn.Conv2d(8 if i else 3, 8, 3, padding=1), nn.ReLU())
                                     for i in range(depth)])
        self.a = nn.Conv2d(8, 6, 1)
        self.b = nn.Conv2d(8, 6, 1)
        self.head = nn.Conv2d(6, 2, 1)

    def forward(self, x):
        y = self.chain(x)
        return self.head(torch.relu(self.a(y)) + torch.relu(self.b(y)))


def _graph_keep_pruned(model, x):
    graph = fxprune.analyze(model, (x,))
    scores = {g.name: torch.rand(g.size, generator=torch.Generator().manual_seed(1)) for g in graph.prunable_groups()}
    plan = fxprune.make_plan(graph, scores, ratio=0.5)
    return graph, plan.mask(graph), rewrite(graph, plan)


def test_the_check_holds_a_few_values_at_once(monkeypatch):
    """The masked original and the pruned model run side by side, each node compared as soon as both
    have it: the values held at once stay a few, however deep the model (not one per node)."""
    from fxprune.verify import mask
    torch.manual_seed(0)
    model, x = TwoBranches(depth=24).eval(), torch.randn(1, 3, 8, 8)
    graph, keep, pruned = _graph_keep_pruned(model, x)
    alive, peak = set(), [0]
    snapshot = mask._snapshot

    def counted(*args):
        out = snapshot(*args)
        if isinstance(out, torch.Tensor):
            key = id(out)
            alive.add(key)
            peak[0] = max(peak[0], len(alive))
            weakref.finalize(out, alive.discard, key)
        return out
    monkeypatch.setattr(mask, "_snapshot", counted)
    result = mask.mask_equivalence(graph, keep, pruned, (x,))
    assert result["ok"] and result["nodes_compared"] >= 50
    assert 1 <= peak[0] <= 3


def test_a_pruned_graph_in_another_order_is_compared_node_by_node():
    """The pruned graph may compute a node before the original does (its own order): each node is
    still compared with the same node of the original, and a wrong one is found by name."""
    from fxprune.verify.mask import mask_equivalence
    torch.manual_seed(0)
    model, x = TwoBranches(depth=2).eval(), torch.randn(1, 3, 8, 8)
    graph, keep, pruned = _graph_keep_pruned(model, x)
    in_order = mask_equivalence(graph, keep, pruned, (x,))
    nodes = {n.name: n for n in pruned.graph.nodes}
    nodes["a"].prepend(nodes["b"])  # the pruned model now computes b before a; the original, after
    pruned.recompile()
    reordered = mask_equivalence(graph, keep, pruned, (x,))
    assert reordered["ok"] and reordered["nodes_compared"] == in_order["nodes_compared"]
    with torch.no_grad():
        pruned.b.weight[0].add_(1.0)
    wrong = mask_equivalence(graph, keep, pruned, (x,))
    assert not wrong["ok"] and wrong["worst_node"] == "b" and wrong["max_rel_diff"] > 1e-2


class _OutOfMemory(nn.Module):
    def forward(self, x):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate memory")


def test_running_out_of_memory_in_the_check_says_so():
    from fxprune.verify.mask import mask_equivalence
    torch.manual_seed(0)
    model, x = TwoBranches(depth=2).eval(), torch.randn(1, 3, 8, 8)
    graph, keep, pruned = _graph_keep_pruned(model, x)
    pruned.b = _OutOfMemory()
    with pytest.raises(fxprune.VerificationError,
                       match="out of memory at node 'b' of the pruned model.*verify=False") as info:
        mask_equivalence(graph, keep, pruned, (x,))
    assert "bug in fxprune" not in str(info.value)
