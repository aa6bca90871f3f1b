"""CURL: KL scores against a hand computation, residual-stream masking, CURL's selection, digits end to end."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from digits import SmallResNet, accuracy, load, train

import fxprune
import fxprune.train.finetune as ft
from fxprune.cost import CostModel
from fxprune.errors import ConfigError, DataError
from fxprune.passes import curl
from fxprune.rewrite import rewrite

pytestmark = pytest.mark.usefixtures("one_thread")


def _kl(p_logits, q_logits):
    """KL(softmax(p) || softmax(q)), mean over rows."""
    lp, lq = F.log_softmax(p_logits.double(), 1), F.log_softmax(q_logits.double(), 1)
    return float((lp.exp() * (lp - lq)).sum(1).mean())


def test_scores_are_kl_of_the_pruned_model():
    torch.manual_seed(0)
    model = SmallResNet(4).eval()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.bias.data.normal_()
    x = torch.randn(16, 1, 8, 8)
    graph = fxprune.analyze(model, (x[:1],))
    code = curl.score(graph, data=x, progress=False, masks_per_forward=5)
    paper = curl.score(graph, data=x, progress=False, kl_direction="paper")
    with torch.no_grad():
        ref = model(x)
    # a residual-stream channel (every tensor of stage 1) and an inside channel
    for name, j in [("stem.0", 1), ("stage1.1.conv1", 2), ("down.0", 5)]:
        g = graph.groups[name]
        plan = fxprune.Plan({name: [i for i in range(g.size) if i != j]}, {name: g.size})
        with torch.no_grad():
            out = rewrite(graph, plan).eval()(x)
        assert code[name][j].item() == pytest.approx(_kl(out, ref), rel=1e-4, abs=1e-7)
        assert paper[name][j].item() == pytest.approx(_kl(ref, out), rel=1e-4, abs=1e-7)
    assert set(code) == {g.name for g in graph.prunable_groups()}
    assert all(bool((s >= 0).all()) for s in code.values())
    assert not torch.allclose(code["stem.0"], paper["stem.0"])


def test_curl_min_kept_matches_the_authors_rule():
    # remove while kept / size >= 0.3: the group stops at the first count below 30 %
    for size in range(1, 200):
        kept = size
        while kept > 1 and kept / size >= 0.3:
            kept -= 1
        assert curl.curl_min_kept(size, 0.3) == kept, size


def _graph():
    model = SmallResNet(8).eval()
    return fxprune.analyze(model, (torch.randn(1, 1, 8, 8),))


def test_select_raw_ranking_floor_protect_and_budget():
    graph = _graph()
    gen = torch.Generator().manual_seed(0)
    # raw scales differ by group: the global ranking must follow raw values (not per-group normalised ones)
    scores = {g.name: torch.rand(g.size, generator=gen) * (10.0 if g.name == "down.0" else 1.0)
              for g in graph.prunable_groups()}
    plan = curl.select(graph, scores, flops=0.5, protect=["stage2.conv1"])
    cost = CostModel(graph)
    mask = plan.mask(graph).numpy()
    assert cost.flops(mask) <= 0.5 * cost.base_flops
    assert "stage2.conv1" not in plan.keep
    for name, kept in plan.keep.items():
        size = graph.groups[name].size
        assert len(kept) >= curl.curl_min_kept(size, 0.3)
        s = scores[name]
        gone = sorted(set(range(size)) - set(kept))
        assert max(s[gone]) <= min(s[kept])  # lowest scores of each group go first
    # the removed set is a prefix of one global raw ranking, with floors skipping
    removed = [(float(scores[n][i]), n, i) for n, k in plan.keep.items()
               for i in set(range(graph.groups[n].size)) - set(k)]
    threshold, last_group, last_index = max(removed)
    for name, s in scores.items():
        if name == "stage2.conv1":
            continue
        kept = plan.keep.get(name, list(range(graph.groups[name].size)))
        below = [i for i in kept if float(s[i]) < threshold]
        assert not below or len(kept) == curl.curl_min_kept(graph.groups[name].size, 0.3), name
    # down.0's raw scores are 10x larger: it keeps a larger share than any other group
    share = {n: len(plan.keep.get(n, range(g.size))) / g.size for n, g in graph.groups.items() if n in scores}
    assert share["down.0"] >= 13 / 16
    assert all(v <= 0.65 for n, v in share.items() if n not in ("down.0", "stage2.conv1"))
    # the search is tight: putting back the last channel removed misses the budget
    mask[graph.offsets[last_group] + last_index] = True
    assert cost.flops(mask) > 0.5 * cost.base_flops
    # ratio budget and the normalised variant
    r = curl.select(graph, scores, ratio=0.5, min_keep_frac=0.0)
    assert all(len(v) == graph.groups[k].size // 2 for k, v in r.keep.items())
    norm = curl.select(graph, scores, flops=0.5, ranking="normalized")
    assert CostModel(graph).flops(norm.mask(graph).numpy()) <= 0.5 * cost.base_flops


def test_bad_inputs():
    graph = _graph()
    with pytest.raises(DataError, match="needs data"):
        curl.score(graph, data=None)
    with pytest.raises(DataError, match="shaped like"):
        curl.score(graph, data=torch.randn(4, 1, 9, 9), progress=False)
    with pytest.raises(ConfigError, match="kl_direction"):
        curl.score(graph, data=torch.randn(4, 1, 8, 8), kl_direction="forward")
    scores = {g.name: torch.ones(g.size) for g in graph.prunable_groups()}
    with pytest.raises(ConfigError, match="exactly one budget"):
        curl.select(graph, scores)
    with pytest.raises(ConfigError, match="cannot be met"):
        curl.select(graph, scores, flops=0.01)
    with pytest.raises(ConfigError, match="min_keep_frac"):
        curl.select(graph, scores, flops=0.5, min_keep_frac=1.5)


@pytest.fixture(scope="module")
def digits_model():
    (xtr, ytr), (xte, yte) = load()
    torch.manual_seed(0)
    model = train(SmallResNet(16), xtr, ytr)
    return model, (xtr, ytr), (xte, yte)


def test_digits_curl_beats_random_and_l2_and_recovers(digits_model):
    model, (xtr, ytr), (xte, yte) = digits_model
    base = accuracy(model, xte, yte)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(xtr, ytr), batch_size=64)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    pruned = fxprune.compile(model, (xtr[:1],), method="curl", flops=0.5, data=loader, onnx=False,
                             method_options={"progress": False})
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    rep = fxprune.report(pruned)
    assert rep.mask["ok"] and rep.flops_after <= 0.5 * rep.flops_before
    assert rep.plan.meta["method"] == "curl" and rep.plan.meta["ranking"] == "raw"
    cut = accuracy(pruned, xte, yte)
    others = {m: accuracy(fxprune.compile(model, (xtr[:1],), method=m, flops=0.5, onnx=False), xte, yte)
              for m in ("random", "l2")}
    # measured: base 0.992; right after the cut curl 0.46, l2 0.19-0.29, random 0.16
    assert cut > others["random"] + 0.15 and cut > others["l2"] + 0.05, (cut, others)
    # one short fine-tune: distillation with mixup from the unpruned model (measured 0.986)
    student = ft.fit(copy.deepcopy(pruned), xtr, ytr, stage="kd", teacher=model, epochs=2, lr=0.02, batch_size=32,
                     progress=False)
    assert accuracy(student, xte, yte) >= base - 0.03
