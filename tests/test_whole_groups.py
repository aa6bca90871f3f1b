"""Grouped convs that lose whole groups (``groups="whole"``, and ``"blocked"`` for groups whose widths are
multiples of ORT's NCHWc block; ``compile``'s ``"auto"`` takes ``"blocked"`` where the latency model predicts it faster): each group's input and output channels go together, the conv's ``groups`` shrinks and each kept group
keeps its width. Dead groups planted by hand must be exactly the ones removed, the output unchanged."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fxprune
from fxprune.cost.latency_table import FunctionTable, LatencyModel
from helpers import padded_table

X = torch.randn(2, 3, 8, 8)


class Grouped(nn.Module):
    """A 1x1 conv, a grouped 3x3 conv (``groups`` groups of ``width``), a 1x1 conv; ``functional`` calls the
    grouped conv as ``F.conv2d``."""

    def __init__(self, groups=4, width=16, functional=False):
        super().__init__()
        c = groups * width
        self.a = nn.Conv2d(3, c, 1)
        self.g = nn.Conv2d(c, c, 3, padding=1, groups=groups)
        self.out = nn.Conv2d(c, 5, 1)
        self.functional = functional

    def forward(self, x):
        x = torch.relu(self.a(x))
        if self.functional:
            x = F.conv2d(x, self.g.weight, self.g.bias, 1, 1, 1, self.g.groups)
        else:
            x = self.g(x)
        return self.out(torch.relu(x))


def dead_groups(model, groups, width=16):
    """Zero groups ``groups`` of ``model.g``: a's rows feeding them, their rows of g, out's columns."""
    with torch.no_grad():
        for b in groups:
            rows = slice(b * width, (b + 1) * width)
            model.a.weight[rows] = 0
            model.a.bias[rows] = 0
            model.g.weight[rows] = 0
            model.g.bias[rows] = 0
            model.out.weight[:, rows] = 0
    return model


@pytest.mark.parametrize("capture", ["fx", "export"])
@pytest.mark.parametrize("functional", [False, True])
def test_dead_groups_are_the_groups_removed(capture, functional):
    torch.manual_seed(0)
    model = dead_groups(Grouped(functional=functional).eval(), [1, 3])
    graph = fxprune.analyze(model, (X,), capture=capture, groups="blocked")
    # one group of 4 channels: each of g's groups, its 16 inputs (a's rows) and 16 outputs
    (group,) = [g for g in graph.groups.values() if g.size != 5]
    assert group.size == 4
    pruned = fxprune.compile(model, (X,), method="l1", ratio=0.5, round_to=None, capture=capture, onnx=True,
                             groups="blocked")
    rep = fxprune.report(pruned)
    assert list(rep.plan.keep.values()) == [[0, 2]]
    weight = pruned.state_dict()[[k for k in pruned.state_dict() if k.endswith("g.weight")][0]]
    assert tuple(weight.shape) == (32, 16, 3, 3)          # two groups, each 16 wide
    assert rep.mask["ok"] and rep.onnx["ok"] and rep.flops_after == rep.flops_predicted
    with torch.no_grad():
        assert float((pruned(X) - model(X)).abs().max()) < 1e-5


def test_the_module_copy_runs_fewer_groups():
    torch.manual_seed(0)
    model = dead_groups(Grouped().eval(), [0])
    pruned = fxprune.compile(model, (X,), method="l1", ratio=0.25, round_to=None, output="module", onnx=False,
                             groups="blocked")
    assert type(pruned) is Grouped
    assert (pruned.g.groups, pruned.g.in_channels, pruned.g.out_channels) == (3, 48, 48)
    with torch.no_grad():
        assert float((pruned(X) - model(X)).abs().max()) < 1e-5


def test_narrow_groups_stay_balanced_unless_asked():
    model = Grouped(groups=4, width=4).eval()
    blocked = fxprune.analyze(model, (X,), groups="blocked")
    assert blocked.groups["a"].size == 16 and tuple(blocked.groups["a"].blocks.shape) == (4, 4)
    whole = fxprune.analyze(model, (X,), groups="whole")
    assert whole.groups["a"].size == 4
    pruned = fxprune.compile(model, (X,), method="l2", ratio=0.5, round_to=None, groups="whole", onnx=False)
    assert (pruned.get_submodule("g").groups, pruned.get_submodule("g").in_channels) == (2, 8)
    plan = fxprune.report(pruned).plan
    assert plan.meta["groups"] == "whole" and "whole groups" in str(fxprune.report(pruned))
    again = fxprune.apply(model, (X,), plan, onnx=False)     # the plan says how its groups were made
    assert torch.equal(again(X), pruned(X))
    wide = Grouped().eval()
    balanced = fxprune.analyze(wide, (X,))
    assert balanced.groups["a"].size == 64 and tuple(balanced.groups["a"].blocks.shape) == (4, 16)


class Shuffled(nn.Module):
    """Two grouped 1x1 convs with a channel shuffle between them (ShuffleNet v1's unit): whole groups would
    tie every group of both into one channel."""

    def __init__(self, groups=2, width=16):
        super().__init__()
        c = groups * width
        self.groups = groups
        self.a = nn.Conv2d(3, c, 1)
        self.g1 = nn.Conv2d(c, c, 1, groups=groups)
        self.g2 = nn.Conv2d(c, c, 1, groups=groups)
        self.out = nn.Conv2d(c, 5, 1)

    def forward(self, x):
        x = torch.relu(self.g1(torch.relu(self.a(x))))
        n, c, h, w = x.shape
        x = x.view(n, self.groups, c // self.groups, h, w).transpose(1, 2).reshape(n, c, h, w)
        return self.out(torch.relu(self.g2(x)))


def test_a_channel_shuffle_between_grouped_convs_keeps_balanced_counts():
    torch.manual_seed(0)
    model = Shuffled().eval()
    sizes = {mode: {n: g.size for n, g in fxprune.analyze(model, (X,), groups=mode).groups.items()}
             for mode in ("blocked", "whole", "balanced")}
    assert sizes["blocked"] == sizes["whole"] == sizes["balanced"] == {"a": 32, "g1": 8, "g2": 32, "out": 5}
    pruned = fxprune.compile(model, (X,), method="l2", ratio=0.5, round_to=None, onnx=False, groups="blocked")
    g1, g2 = pruned.get_submodule("g1"), pruned.get_submodule("g2")
    assert (g1.groups, g1.in_channels, g1.out_channels) == (2, 16, 16)
    assert (g2.groups, g2.in_channels, g2.out_channels) == (2, 16, 16)
    assert fxprune.report(pruned).mask["ok"]


def test_the_latency_model_costs_fewer_groups_each_as_wide():
    model = Grouped(groups=4, width=16).eval()
    graph = fxprune.analyze(model, (X,), groups="blocked")
    lm = LatencyModel(graph, table=FunctionTable(padded_table(16)), progress=False)   # convs padded to blocks of 16
    keep = torch.ones(graph.num_channels, dtype=torch.bool).numpy()
    full = lm.node_latency(keep)["g"]
    keep[graph.offsets["a"] + 1] = False                      # one group of four
    assert lm.node_latency(keep)["g"] == pytest.approx(0.75 * full)


def predicted(model, groups, lm_of):
    """The predicted latency ratio of ``compile(model, flops=0.5, groups=groups)`` on fast counts."""
    graph = fxprune.analyze(model, (X,), groups=groups)
    lm = lm_of(graph)
    plan = fxprune.report(fxprune.compile(model, (X,), method="l2", flops=0.5, round_to="fast", latency_model=lm,
                                          groups=groups, onnx=False)).plan
    return lm.latency(plan.mask(graph).numpy()) / lm.base, plan


def test_auto_takes_the_coupling_the_latency_model_predicts_faster():
    """Groups of 16 on a table whose convs pad channels to 16: the balanced plan keeps 10 and 12 of each
    group's 16, padded back (predicted 0.77 of the latency); whole groups keep 2 of 4 (0.50). With no such
    groups auto is balanced."""
    torch.manual_seed(0)
    lm_of = lambda graph: LatencyModel(graph, table=FunctionTable(padded_table(16)), progress=False)   # noqa: E731
    model = Grouped(groups=4, width=16).eval()
    figures = {mode: predicted(model, mode, lm_of) for mode in ("balanced", "blocked")}
    assert figures["blocked"][0] < figures["balanced"][0]
    lm = lm_of(fxprune.analyze(model, (X,)))
    auto = fxprune.report(fxprune.compile(model, (X,), method="l2", flops=0.5, latency_model=lm, onnx=False,
                                          round_to="fast")).plan
    assert auto.meta["groups"] == "blocked" and auto.keep == figures["blocked"][1].keep
    narrow = Grouped(groups=4, width=8).eval()
    lm = lm_of(fxprune.analyze(narrow, (X,)))
    auto = fxprune.report(fxprune.compile(narrow, (X,), method="l2", flops=0.5, latency_model=lm, onnx=False,
                                          round_to="fast")).plan
    assert "groups" not in auto.meta and auto.keep == predicted(narrow, "balanced", lm_of)[1].keep


def test_save_and_load_rebuild_whole_groups(tmp_path):
    torch.manual_seed(0)
    model = dead_groups(Grouped().eval(), [2])
    pruned = fxprune.compile(model, (X,), method="l1", ratio=0.25, round_to=None, onnx=False, groups="blocked")
    fxprune.save(pruned, tmp_path / "p.pt")
    again = fxprune.load(tmp_path / "p.pt", Grouped, (X,))
    assert again.get_submodule("g").groups == 3
    assert torch.equal(again(X), pruned(X))


class StdGrouped(nn.Module):
    """A grouped conv whose weight is standardised at every call (timm's ScaledStdConv2d in NF-RegNets):
    its columns are read at run time, where whole groups keep every one."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 64, 1)
        self.weight = nn.Parameter(torch.randn(64, 16, 3, 3))
        self.out = nn.Conv2d(64, 5, 1)

    def forward(self, x):
        w = F.batch_norm(self.weight.reshape(1, 64, -1), None, None, training=True, momentum=0.0, eps=1e-5)
        x = F.conv2d(torch.relu(self.a(x)), w.reshape_as(self.weight), None, 1, 1, 1, 4)
        return self.out(torch.relu(x))


@pytest.mark.parametrize("capture", ["fx", "export"])
def test_a_standardised_weight_keeps_each_kept_groups_columns(capture):
    torch.manual_seed(0)
    model = StdGrouped().eval()
    pruned = fxprune.compile(model, (X,), method="l2", ratio=0.5, round_to=None, capture=capture, groups="blocked")
    rep = fxprune.report(pruned)
    assert rep.mask["ok"] and rep.onnx["ok"]
    convs = [n for n in pruned.graph.nodes if n.target in (F.conv2d, torch.conv2d, torch.ops.aten.conv2d.default)]
    assert [n.args[6] for n in convs if len(n.args) > 6] == [2]                      # 2 of 4 groups
    assert not [n for n in pruned.graph.nodes if n.target in (torch.gather, torch.ops.aten.gather.default)]
    assert pruned.state_dict()["weight"].shape == (32, 16, 3, 3)   # its rows sliced, its columns whole


def test_nchwc_block_is_the_width_ort_runs_grouped_convs_blocked_at():
    """Asked of ORT's optimiser on this machine (16 on AVX-512, 8 on AVX2): a grouped conv whose widths per
    group are the block runs blocked, half of it does not."""
    from fxprune.cost.latency_table import Sig, build_onnx, nchwc_block, optimized_layouts

    block = nchwc_block()
    if block is None:
        pytest.skip("ONNX Runtime blocks no conv on this machine")
    layout = lambda w: optimized_layouts(build_onnx(Sig("conv", cin=4 * w, cout=4 * w, h=8, w=8, kh=3, kw=3,  # noqa: E731
                                                          ph=1, pw=1, groups=4)))[0]
    assert layout(block) and layout(2 * block) and not layout(block // 2) and not layout(block + block // 2)


def test_blocked_takes_groups_whole_on_the_block_the_plan_records(tmp_path):
    """Groups of 8 are on AVX2's block, not AVX-512's: ``"blocked"`` takes them whole at ``block=8`` only, the
    plan records the block, and applying it elsewhere (a pipeline left to find its own) rebuilds the same model."""
    torch.manual_seed(0)
    model = dead_groups(Grouped(groups=4, width=8).eval(), [1], width=8)
    at = {b: fxprune.Pipeline(model, (X,), groups="blocked", block=b, onnx=False) for b in (8, 16)}
    assert sorted(g.size for g in at[8].graph.groups.values()) == [4, 5]                 # one channel per group
    assert 4 not in [g.size for g in at[16].graph.groups.values()]                        # balanced: no whole groups
    pipe = at[8]
    plan = pipe.planner(fxprune.passes.get("l1"), "l1", round_to=None)(ratio=0.25)
    assert plan.meta["groups"] == "blocked" and plan.meta["block"] == 8
    pruned = pipe.build(plan)
    assert pruned.get_submodule("g").groups == 3 and torch.allclose(pruned(X), model(X), atol=1e-5)
    again = fxprune.Pipeline(model, (X,), onnx=False, block=16).apply(plan)
    assert again.get_submodule("g").groups == 3 and torch.equal(again(X), pruned(X))
    fxprune.save(pruned, tmp_path / "p.pt")
    assert torch.equal(fxprune.load(tmp_path / "p.pt", lambda: Grouped(groups=4, width=8), (X,))(X), pruned(X))
    old = plan.__class__(**{**plan.__dict__, "meta": {k: v for k, v in plan.meta.items() if k != "block"}})
    with pytest.raises(fxprune.errors.ConfigError, match="block=16"):   # a plan from before the block was recorded
        at[8].apply(old)
