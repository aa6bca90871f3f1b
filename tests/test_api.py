"""The public API: budgets, plans, apply, criteria, and a clear error for every bad input."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torchvision

import fxprune
from fxprune.cost import count_params
from fxprune import passes
from fxprune.passes import bn_scale, magnitude, taylor
from helpers import assert_state_equal, state_copy

X = torch.randn(1, 3, 64, 64)


@pytest.fixture(scope="module")
def resnet():
    torch.manual_seed(0)
    return torchvision.models.resnet18().eval()


def test_apply_reproduces_compile_and_plan_round_trips(resnet):
    pruned = fxprune.compile(resnet, (X,), method="l1", flops=0.6, onnx=False)
    plan = fxprune.report(pruned).plan
    text = plan.to_json()
    again = fxprune.apply(resnet, (X,), fxprune.Plan.from_json(text), onnx=False)
    assert fxprune.Plan.from_json(text).keep == plan.keep
    assert pruned.state_dict().keys() == again.state_dict().keys()
    for k, v in pruned.state_dict().items():
        assert torch.equal(v, again.state_dict()[k]), k
    assert torch.equal(pruned(X), again(X))


def test_plan_file_round_trip(resnet, tmp_path):
    pruned = fxprune.compile(resnet, (X,), ratio=0.3, onnx=False, verify=False)
    path = tmp_path / "plan.json"
    fxprune.report(pruned).plan.save(path)
    again = fxprune.apply(resnet, (X,), str(path), onnx=False)
    assert torch.equal(again(X), pruned(X))


def test_ratio_removes_that_fraction_of_each_group(resnet):
    graph = fxprune.analyze(resnet, (X,))
    plan = fxprune.make_plan(graph, magnitude.l2(graph), ratio=0.25)
    for g in graph.prunable_groups():
        assert len(plan.keep[g.name]) == g.size - round(0.25 * g.size)


def test_round_to_and_floor(resnet):
    graph = fxprune.analyze(resnet, (X,))
    plan = fxprune.make_plan(graph, magnitude.l2(graph), flops=0.4, round_to=8, floor=0.3)
    assert plan.keep
    for name, kept in plan.keep.items():
        size = graph.groups[name].size
        assert len(kept) % 8 == 0 and len(kept) >= 0.3 * size


def test_params_budget(resnet):
    pruned = fxprune.compile(resnet, (X,), params=0.5, onnx=False)
    ratio = count_params(pruned) / count_params(resnet)
    assert 0.47 <= ratio <= 0.5


def test_ignore_keeps_groups_whole(resnet):
    pruned = fxprune.compile(resnet, (X,), ratio=0.5, ignore=[resnet.layer4, "conv1"], onnx=False)
    plan = fxprune.report(pruned).plan
    assert "conv1" not in plan.keep and "layer4.0.conv1" not in plan.keep and "layer4.1.conv1" not in plan.keep
    assert "layer3.0.conv1" in plan.keep
    assert pruned.get_submodule("layer4.0.conv1").out_channels == 512


def test_unreachable_budget_warns_and_keeps_the_floor():
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 2, 3))
    with pytest.warns(UserWarning, match="cannot be met"):
        pruned = fxprune.compile(net, (torch.randn(1, 3, 8, 8),), flops=0.01, onnx=False)
    assert pruned.get_submodule("0").out_channels == 1


def test_train_mode_model_is_not_touched():
    torch.manual_seed(0)
    model = torchvision.models.mobilenet_v2().train()
    before = state_copy(model)
    pruned = fxprune.compile(model, (torch.randn(2, 3, 64, 64),), ratio=0.3, onnx=False)
    assert_state_equal(model, before)
    assert model.training and pruned.training


def test_criteria_rank_known_weights():
    net = nn.Sequential(nn.Conv2d(3, 4, 1, bias=False), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 2, 1, bias=False))
    with torch.no_grad():
        net[0].weight.copy_(torch.tensor([1.0, 2.0, 0.0, 3.0]).view(4, 1, 1, 1).expand(4, 3, 1, 1))
        net[1].weight.copy_(torch.tensor([0.5, 0.1, 2.0, 1.0]))
        net[3].weight.fill_(1.0)
    net.eval()
    graph = fxprune.analyze(net, (torch.randn(1, 3, 4, 4),))
    # L1 over all members: conv rows (3|w|), BN gamma and beta, next conv's columns (2 x 1)
    assert magnitude.l1(graph)["0"].tolist() == pytest.approx([3 + 0.5 + 2, 6 + 0.1 + 2, 0 + 2.0 + 2, 9 + 1.0 + 2])
    assert bn_scale.score(graph)["0"].tolist() == pytest.approx([0.5, 0.1, 2.0, 1.0])
    # Taylor: a channel with zero weights everywhere has zero first-order importance
    with torch.no_grad():
        net[1].weight[2] = 0.0
        net[1].bias[2] = 0.0
        net[3].weight[:, 2] = 0.0
    graph = fxprune.analyze(net, (torch.randn(1, 3, 4, 4),))
    scores = taylor.score(graph, data=(torch.randn(8, 3, 4, 4), torch.randint(0, 2, (8,))))["0"]
    assert scores[2] == 0 and bool((scores[[0, 1, 3]] > 0).all())


class _DictOutput(nn.Module):
    """The network of a classifier returning a dict whose first entry is not its logits (as Hugging Face's
    ``ModelOutput`` or a detector's tuple): a data-driven criterion reads the first floating-point tensor."""

    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, x):
        logits = self.net(x)
        return {"label": logits.argmax(1), "logits": logits, "probs": logits.softmax(1)}


@pytest.mark.parametrize("method", ["taylor", "curl"])
def test_data_driven_criteria_read_the_logits_of_a_dict_output(method):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 16, 3)).eval()
    x, y = torch.randn(8, 3, 4, 4), torch.arange(8) % 3
    score = passes.get(method)
    plain = score(fxprune.analyze(net, (x[:1],)), data=(x, y), seed=0)
    wrapped = score(fxprune.analyze(_DictOutput(net), (x[:1],)), data=(x, y), seed=0)
    assert set(wrapped) == {"net.0"} and set(plain) == {"0"}
    assert torch.allclose(wrapped["net.0"], plain["0"]) and float(plain["0"].abs().sum()) > 0


def test_unlabelled_batches_of_several_inputs():
    ids, mask = torch.zeros(4, 6, dtype=torch.long), torch.ones(4, 6, dtype=torch.long)
    got = list(fxprune.io.data.batches([(ids, mask), [ids, mask], ((ids, mask), None)]))
    assert [(len(inputs), labels) for inputs, labels in got] == [(2, None)] * 3
    labelled = list(fxprune.io.data.batches([((ids, mask), torch.arange(4))]))
    assert labelled[0][1].tolist() == [0, 1, 2, 3]
    with pytest.raises(fxprune.DataError, match="a tuple of input tensors"):
        list(fxprune.io.data.batches([(ids, "mask")]))


def test_criteria_beat_random_on_a_planted_model():
    """Channels planted with tiny weights are found by l1/l2/bn and cost nothing to remove."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.Conv2d(16, 8, 3, padding=1)).eval()
    with torch.no_grad():
        net[0].weight[8:] *= 1e-4
        net[0].bias[8:] = 0
        net[1].weight[8:] = 1e-4
        net[1].bias[8:] = 0
    x = torch.randn(4, 3, 8, 8)
    ref = net(x)
    for method in ("l1", "l2", "bn"):
        pruned = fxprune.compile(net, (x,), method=method, ratio=0.5, onnx=False)
        assert fxprune.report(pruned).plan.keep["0"] == list(range(8)), method
        assert (pruned(x) - ref).abs().max() < 1e-3
    rand = fxprune.compile(net, (x,), method="random", ratio=0.5, onnx=False)
    assert (rand(x) - ref).abs().max() > 1e-2


@pytest.mark.parametrize("kwargs, error, words", [
    (dict(ratio=1.5), fxprune.ConfigError, "ratio=1.5"),
    (dict(flops=0), fxprune.ConfigError, "flops=0"),
    (dict(ratio=0.5, flops=0.5), fxprune.ConfigError, "exactly one budget"),
    (dict(), fxprune.ConfigError, "exactly one budget"),
    (dict(ratio=0.5, method="nope"), fxprune.ConfigError, "unknown method 'nope'"),
    (dict(ratio=0.5, round_to=0), fxprune.ConfigError, "round_to"),
    (dict(ratio=0.5, method="taylor"), fxprune.DataError, "needs data"),
    (dict(ratio=0.5, ignore=[nn.Linear(2, 2)]), fxprune.ConfigError, "not part of the model"),
])
def test_bad_arguments(kwargs, error, words):
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 2, 3))
    with pytest.raises(error, match=words):
        fxprune.compile(net, (torch.randn(1, 3, 8, 8),), onnx=False, **kwargs)


def test_bad_models_and_inputs():
    with pytest.raises(fxprune.TraceError, match="expected a torch.nn.Module"):
        fxprune.analyze(lambda x: x, (torch.randn(1),))
    with pytest.raises(fxprune.TraceError, match="example_inputs"):
        fxprune.analyze(nn.Conv2d(3, 4, 3), (torch.randn(1, 5, 8, 8),))
    with pytest.raises(fxprune.DataError, match="labels"):
        list(fxprune.io.data.batches([(torch.randn(2, 3), torch.arange(3))]))


def test_bad_plans(resnet):
    other = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 2, 3))
    plan = fxprune.report(fxprune.compile(resnet, (X,), ratio=0.5, onnx=False, verify=False)).plan
    with pytest.raises(fxprune.PlanError, match="does not have"):
        fxprune.apply(other, (torch.randn(1, 3, 8, 8),), plan)
    with pytest.raises(fxprune.PlanError, match="not an fxprune plan"):
        fxprune.Plan.from_json("{]")
    with pytest.raises(fxprune.PlanError, match="channels in this model"):
        fxprune.apply(resnet, (X,), fxprune.Plan({"conv1": [0]}, {"conv1": 32}))
    with pytest.raises(fxprune.PlanError, match="out of range"):
        fxprune.apply(resnet, (X,), fxprune.Plan({"conv1": [0, 99]}, {"conv1": 64}))
    with pytest.raises(fxprune.PlanError, match="keeps no channel"):
        fxprune.apply(resnet, (X,), fxprune.Plan({"conv1": []}, {"conv1": 64}))
    with pytest.raises(fxprune.PlanError, match="pinned"):
        fxprune.apply(resnet, (X,), fxprune.Plan({"fc": [0]}, {"fc": 1000}))


def test_report_table(resnet):
    pruned = fxprune.compile(resnet, (X,), flops=0.5)
    text = str(fxprune.report(pruned))
    assert "mask-equivalence" in text and "ONNX Runtime vs torch" in text and "FAILED" not in text
    with pytest.raises(fxprune.ConfigError, match="no fxprune report"):
        fxprune.report(resnet)


def test_verification_catches_a_wrong_rewrite(resnet, monkeypatch):
    """A rewrite that slices one member wrongly must fail verification, not pass silently."""
    import fxprune.rewrite.graph as rw

    real = rw.kept_positions

    def off_by_one(param_channels, keep):
        kept = real(param_channels, keep)
        kept["layer2.0.conv1.weight"][0] = torch.roll(kept["layer2.0.conv1.weight"][0], 1)
        return kept

    monkeypatch.setattr(rw, "kept_positions", off_by_one)
    with pytest.raises(fxprune.VerificationError, match="layer2"):
        fxprune.compile(resnet, (X,), ratio=0.5, onnx=False)
