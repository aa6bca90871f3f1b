"""Deployment: save/load without pickled code, torch.compile, train mode, latency search.

ONNX export is tested through the command line in test_cli.py (one export is seconds)."""
from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn as nn
import torchvision

import fxprune
from digits import SmallResNet
from fxprune.errors import ConfigError, PlanError
from fxprune.cost.latency import history_table, search_latency


def small_resnet(c: int = 16):
    torch.manual_seed(0)
    return SmallResNet(c).eval()


X = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def pruned():
    return fxprune.compile(small_resnet(), (X,), method="l2", flops=0.5, onnx=False)


# ----------------------------------------------------------------------------- save / load

def test_save_load_round_trip_keeps_fine_tuned_weights(pruned, tmp_path):
    tuned = copy.deepcopy(pruned).train()
    opt = torch.optim.SGD(tuned.parameters(), lr=0.1)
    for _ in range(3):                                     # weights now differ from any re-application of the plan
        opt.zero_grad()
        nn.functional.cross_entropy(tuned(X), torch.tensor([1, 2])).backward()
        opt.step()
    tuned.eval()
    path = str(tmp_path / "tuned.pt")
    fxprune.save(tuned, path)
    raw = torch.load(path, weights_only=True)             # plain data: no pickled code
    assert raw["format"] == "fxprune.saved/1" and set(raw["state_dict"]) == set(tuned.state_dict())
    loaded = fxprune.load(path, lambda: small_resnet().train(), (torch.randn(7, 1, 8, 8),))
    assert not loaded.training
    for k, v in tuned.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k
    with torch.no_grad():
        assert torch.equal(loaded(X), tuned(X))
    assert fxprune.report(loaded).plan.keep == fxprune.report(pruned).plan.keep


class Strided(SmallResNet):
    """The same parameter shapes as SmallResNet(16), another function: a different stride."""

    def __init__(self):
        super().__init__(16)
        self.down[0].stride = (1, 1)


def test_a_file_that_does_not_match_raises(pruned, tmp_path):
    path = str(tmp_path / "p.pt")
    fxprune.save(pruned, path)
    with pytest.raises(PlanError, match="group 'stem.0' has 8 channels in this model but 16"):
        fxprune.load(path, lambda: small_resnet(8), (X,))
    with pytest.raises(PlanError, match="not the architecture that was saved"):
        fxprune.load(path, Strided, (X,))
    with pytest.raises(PlanError, match=r"shape \(2, 1, 9, 9\).*pruned with \(2, 1, 8, 8\)"):
        fxprune.load(path, small_resnet, (torch.randn(2, 1, 9, 9),))
    data = torch.load(path, weights_only=True)
    data["state_dict"]["fc.weight"] = torch.zeros(3, 3)
    torch.save(data, str(tmp_path / "bad.pt"))
    with pytest.raises(PlanError, match="weight 'fc.weight'"):
        fxprune.load(str(tmp_path / "bad.pt"), small_resnet, (X,))
    torch.save({"weights": torch.zeros(1)}, str(tmp_path / "other.pt"))
    with pytest.raises(PlanError, match="not an fxprune save file"):
        fxprune.load(str(tmp_path / "other.pt"), small_resnet, (X,))
    with pytest.raises(ConfigError, match="carries no fxprune report"):
        fxprune.save(small_resnet(), str(tmp_path / "x.pt"))


# ----------------------------------------------------------------------------- torch.compile

def test_pruned_module_works_with_torch_compile(pruned):
    torch._dynamo.reset()
    model = copy.deepcopy(pruned).eval()
    compiled = torch.compile(model, backend="aot_eager")
    with torch.no_grad():
        assert torch.allclose(compiled(X), model(X), atol=1e-6)
    model.train()                                          # and trains: gradients through the compiled graph
    torch.manual_seed(0)
    loss = nn.functional.cross_entropy(compiled(X), torch.tensor([3, 4]))
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    torch._dynamo.reset()


@pytest.mark.slow
def test_pruned_module_works_with_inductor(pruned):
    torch._dynamo.reset()
    compiled = torch.compile(copy.deepcopy(pruned).eval())
    with torch.no_grad():
        assert torch.allclose(compiled(X), pruned.eval()(X), atol=1e-5)
    torch._dynamo.reset()


# ----------------------------------------------------------------------------- train mode, auxiliary heads

def googlenet():
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torchvision.models.googlenet(weights=None, aux_logits=True, init_weights=True)


def test_googlenet_traced_in_train_mode_keeps_aux_heads_at_the_right_widths():
    model = googlenet().train()
    x = torch.randn(2, 3, 64, 64)
    before = copy.deepcopy(model.state_dict())
    pruned = fxprune.compile(model, (x,), method="l2", ratio=0.3, onnx=False)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())   # user's model untouched
    rep = fxprune.report(pruned)
    assert rep.mask["ok"]                                   # the eval path, aux heads included, verified
    assert pruned.training and pruned.meta["fxprune_training"]
    for aux, inception in (("aux1", "inception4a"), ("aux2", "inception4d")):
        width = sum(pruned.get_submodule(f"{inception}.{b}").out_channels
                    for b in ("branch1.conv", "branch2.1.conv", "branch3.1.conv", "branch4.1.conv"))
        conv = pruned.get_submodule(f"{aux}.conv.conv")
        assert conv.in_channels == width < 512 + 528        # reads the pruned inception output
        assert pruned.get_submodule(f"{aux}.fc1").in_features == 16 * conv.out_channels < 2048
    out = pruned(x)                                         # train-mode forward: main + two aux logits
    assert [tuple(o.shape) for o in out] == [(2, 1000)] * 3
    # fine-tunes: the GoogLeNet loss (main + 0.3 × each aux) falls on a fixed batch
    y = torch.tensor([3, 7])
    opt = torch.optim.SGD(pruned.parameters(), lr=0.01, momentum=0.9)
    losses = []
    for _ in range(3):
        torch.manual_seed(0)
        main, aux2, aux1 = pruned(x)
        loss = sum(w * nn.functional.cross_entropy(o, y) for w, o in ((1, main), (0.3, aux1), (0.3, aux2)))
        opt.zero_grad()
        loss.backward()
        assert pruned.get_submodule("aux1.fc2").weight.grad.abs().sum() > 0
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]


@pytest.mark.slow
def test_googlenet_save_load_retraces_the_aux_heads(tmp_path):
    x = torch.randn(2, 3, 64, 64)
    pruned = fxprune.compile(googlenet().train(), (x,), method="l2", ratio=0.3, onnx=False).eval()
    path = str(tmp_path / "g.pt")
    fxprune.save(pruned, path)
    loaded = fxprune.load(path, lambda: googlenet().eval(), (x,))
    assert loaded.meta["fxprune_training"] and not loaded.training
    with torch.no_grad():
        for a, b in zip(loaded(x), pruned(x)):
            assert torch.equal(a, b)


class AuxNet(nn.Module):
    """A branch that runs only in training (as GoogLeNet's auxiliary heads)."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, 12, 3, padding=1), nn.BatchNorm2d(12), nn.ReLU())
        self.body = nn.Sequential(nn.Conv2d(12, 16, 3, padding=1), nn.ReLU())
        self.aux = nn.Sequential(nn.Conv2d(12, 6, 1), nn.ReLU(), nn.Flatten(), nn.Linear(6 * 64, 10))
        self.head = nn.Linear(16, 10)

    def forward(self, x):
        x = self.stem(x)
        out = self.head(self.body(x).mean((2, 3)))
        if self.training:
            return out, self.aux(x)
        return out


def test_save_load_retraces_a_training_only_branch(tmp_path):
    torch.manual_seed(0)
    pruned = fxprune.compile(AuxNet().train(), (X,), method="l2", ratio=0.5, onnx=False)
    assert pruned.meta["fxprune_training"] and fxprune.report(pruned).mask["ok"]
    assert pruned.get_submodule("aux.0").in_channels == pruned.get_submodule("stem.0").out_channels == 6
    assert pruned.get_submodule("aux.3").in_features == 64 * pruned.get_submodule("aux.0").out_channels == 192
    main, aux = pruned(X)
    assert main.shape == aux.shape == (2, 10)
    pruned.eval()                                           # the user switches to eval before saving
    path = str(tmp_path / "aux.pt")
    fxprune.save(pruned, path)
    loaded = fxprune.load(path, lambda: AuxNet().eval(), (X,))   # a factory in eval mode: no aux in its trace
    assert not loaded.training and loaded.get_submodule("aux.3").in_features == 192
    with torch.no_grad():
        for a, b in zip(loaded(X), pruned(X)):
            assert torch.equal(a, b)


class OptionalScale(nn.Module):
    """A forward with an argument that has a default (as timm's attn_mask=None): traced, it is a placeholder."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 16, 3, padding=1), nn.Conv2d(16, 4, 1)

    def forward(self, x, scale: float = 1.0):
        return self.b(torch.relu(self.a(x))) * scale


def test_save_load_with_an_argument_left_at_its_default(tmp_path):
    """Saved from a trace of ``forward(x, scale=1.0)`` given x alone, the model loads from x alone (it was
    'saved with 2 inputs, 1 given': `fxprune bench timm:vit_tiny_patch16_224 --load` failed so), and not
    from more inputs than the forward takes."""
    torch.manual_seed(0)
    x = torch.randn(2, 3, 8, 8)
    pruned = fxprune.compile(OptionalScale().eval(), (x,), method="l2", ratio=0.5, onnx=False)
    assert fxprune.report(pruned).capture["tracer"] == "fx"
    assert [n.name for n in pruned.graph.nodes if n.op == "placeholder"] == ["x", "scale"]
    path = str(tmp_path / "opt.pt")
    fxprune.save(pruned, path)
    loaded = fxprune.load(path, OptionalScale, (x,))
    with torch.no_grad():
        assert torch.equal(loaded(x), pruned(x))
    with pytest.raises(PlanError, match="saved with 1 to 2 inputs, 3 given"):
        fxprune.load(path, OptionalScale, (x, None, None))


@pytest.mark.slow
def test_googlenet_traced_in_eval_mode_has_no_aux_heads():
    x = torch.randn(1, 3, 64, 64)
    pruned = fxprune.compile(googlenet().eval(), (x,), method="l2", ratio=0.3, onnx=False)
    assert not any(name.startswith("aux") for name, _ in pruned.named_modules())
    out = pruned.train()(x)                                 # the trace baked in eval mode: one output
    assert isinstance(out, torch.Tensor) and out.shape == (1, 1000)


@pytest.mark.slow
def test_inception_v3_in_train_mode():
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = torchvision.models.inception_v3(weights=None, aux_logits=True, init_weights=True).train()
    x = torch.randn(2, 3, 299, 299)
    pruned = fxprune.compile(model, (x,), method="l2", ratio=0.3, onnx=False)
    assert fxprune.report(pruned).mask["ok"]
    conv0 = pruned.get_submodule("AuxLogits.conv0.conv")
    width = pruned.get_submodule("Mixed_6e.branch1x1.conv").out_channels + sum(
        pruned.get_submodule(f"Mixed_6e.{b}.conv").out_channels
        for b in ("branch7x7_3", "branch7x7dbl_5", "branch_pool"))
    assert conv0.in_channels == width < 768
    out = pruned(x)
    assert tuple(out.logits.shape) == (2, 1000) and tuple(out.aux_logits.shape) == (2, 1000)
    out.logits.sum().add(out.aux_logits.sum()).backward()


# ----------------------------------------------------------------------------- latency

class Wide(nn.Module):
    """Convolutions heavy enough that ONNX Runtime's time follows the channel counts."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 64, 3, padding=1), nn.ReLU(), nn.Conv2d(64, 128, 3, padding=1),
                                  nn.ReLU(), nn.Conv2d(128, 128, 3, padding=1), nn.ReLU())
        self.head = nn.Linear(128, 10)

    def forward(self, x):
        return self.head(self.body(x).mean((2, 3)))


def test_latency_search_returns_a_faster_plan():
    torch.manual_seed(0)
    model = Wide().eval()
    x = torch.randn(1, 3, 32, 32)
    pipe = fxprune.Pipeline(model, (x,))
    planner = pipe.planner(fxprune.passes.get("l2"), "l2", round_to=8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        plan, history = search_latency(model, pipe.graph, 0.5, planner=lambda f: planner(flops=f), steps=2,
                                       repeats=12)
    assert [round(r["flops"], 3) for r in history][0] == 0.5 and 1 <= len(history) <= 2
    for r in history:   # the ratio is the median of the alternating rounds' ratios (paired_ratio)
        assert r["ratio"] > 0 and r["ok"] == (r["ratio"] <= 0.5)
    passing = [r for r in history if r["ok"]]
    # a plan read in the band [0.9, 0.96] x target wins, else the passing one read nearest the band
    in_band = [r for r in passing if 0.9 * 0.5 <= r["ratio"] <= 0.96 * 0.5]
    if in_band:
        assert plan.meta["flops_budget"] == max(r["flops"] for r in in_band)
    elif passing:
        gap = lambda r: max(0.9 * 0.5 - r["ratio"], r["ratio"] - 0.96 * 0.5)  # noqa: E731
        assert plan.meta["flops_budget"] == min(passing, key=lambda r: (gap(r), -r["flops"]))["flops"]
    if passing:
        assert plan.meta["latency_ratio"] <= 0.5
    assert "FLOPs budget" in history_table(history)
    pruned = fxprune.apply(model, (x,), plan, onnx=False)
    rep = fxprune.report(pruned)
    # which candidate wins depends on wall-clock timings, so only what holds for any of them is
    # asserted here; the search logic is tested deterministically in tests/test_latency_table.py
    # (test_search_latency_lands_in_its_band)
    assert rep.mask["ok"] and rep.flops_after < rep.flops_before
    assert any(r["flops"] == plan.meta["flops_budget"] for r in history)


def test_latency_target_out_of_range():
    model = Wide().eval()
    graph = fxprune.analyze(model, (torch.randn(1, 3, 8, 8),))
    with pytest.raises(ConfigError, match="latency target"):
        search_latency(model, graph, 1.5, planner=lambda f: None)
