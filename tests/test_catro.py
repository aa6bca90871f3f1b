"""CATRO: scatter traces, the Dinkelbach iteration against brute force, data errors, digits end to end, sub-tasks."""
from __future__ import annotations

import copy
import itertools
import warnings

import pytest
import torch
from digits import SmallResNet, accuracy, load, train

import fxprune
import fxprune.train.finetune as ft
from fxprune.cost import CostModel
from fxprune.errors import ConfigError, DataError
from fxprune.passes import catro

pytestmark = pytest.mark.usefixtures("one_thread")


def test_scatter_traces_match_a_direct_computation():
    gen = torch.Generator().manual_seed(0)
    feats, y = torch.randn(60, 5, 3, generator=gen), torch.randint(0, 4, (60,), generator=gen)
    stats = catro.ScatterStats(5, 3)
    for i in range(0, 60, 7):  # running sums over uneven batches
        stats.update(feats[i:i + 7], y[i:i + 7])
    f, mu = feats.double(), feats.double().mean(0)
    b = sum((y == k).sum() * (f[y == k].mean(0) - mu).pow(2).sum(1) for k in range(4))
    w = sum((f[y == k] - f[y == k].mean(0)).pow(2).sum((0, 2)) for k in range(4))
    assert torch.allclose(stats.between(), b) and torch.allclose(stats.within(), w)


def test_separating_channel_first_dead_channel_last():
    gen = torch.Generator().manual_seed(0)
    y = torch.arange(40) % 4
    feats = torch.zeros(40, 4, 1)
    feats[:, 0, 0] = y.float() * 3 + 0.01 * torch.randn(40, generator=gen)  # separates the classes perfectly
    feats[:, 1, 0] = torch.randn(40, generator=gen)                          # noise
    feats[:, 2, 0] = y.float() + torch.randn(40, generator=gen)               # weakly informative
    # channel 3 stays 0: dead
    stats = catro.ScatterStats(4, 1)
    stats.update(feats, y)
    b, w = stats.between(), stats.within()
    ratio = b / (w + 1e-12)
    ratio[(b + w) <= 1e-12] = 0
    assert ratio.argsort(descending=True).tolist() == [0, 2, 1, 3]
    assert catro.dinkelbach(b, w, 1)[0].tolist() == [0]
    assert catro.dinkelbach(b, w, 3)[0].tolist() == [0, 1, 2]  # the dead channel is chosen last
    assert 3 in catro.dinkelbach(b, w, 4)[0].tolist()


def _brute(b, w, k, forced, eps=1e-12):
    best, arg = -1.0, None
    must = set(torch.nonzero(forced).flatten().tolist())
    for sel in itertools.combinations(range(len(b)), k):
        if not must <= set(sel):
            continue
        r = float(b[list(sel)].sum() / (w[list(sel)].sum() + eps))
        if r > best + 1e-12:
            best, arg = r, sel
    return best, arg


def test_dinkelbach_reaches_the_brute_force_optimum():
    gen = torch.Generator().manual_seed(0)
    iters = []
    for case in range(60):
        c = int(torch.randint(3, 9, (), generator=gen))
        b = torch.rand(c, generator=gen).double() * 5
        w = torch.rand(c, generator=gen).double() + 0.05
        forced = torch.zeros(c, dtype=torch.bool)
        if case % 3 == 0:
            forced[int(torch.randint(0, c, (), generator=gen))] = True
        for k in range(max(1, int(forced.sum())), c + 1):
            sel, lam, it = catro.dinkelbach(b, w, k, forced, max_iter=50)
            best, _ = _brute(b, w, k, forced)
            assert lam == pytest.approx(best, rel=1e-9), (case, k)
            assert len(sel) == k and bool(forced[sel].sum() == forced.sum())
            iters.append(it)
    assert max(iters) <= 6  # converges in a few steps


def test_bad_data():
    model = SmallResNet(4).eval()
    x = torch.randn(20, 1, 8, 8)
    graph = fxprune.analyze(model, (x[:1],))
    with pytest.raises(DataError, match="needs labels"):
        catro.plan(graph, data=[x], flops=0.5, progress=False)
    y = torch.tensor([0] * 10 + [1] * 9 + [2])
    with pytest.raises(DataError, match=r"class\(es\) \[2\] have fewer than two"):
        catro.plan(graph, data=(x, y), flops=0.5, progress=False)
    with pytest.raises(DataError, match="shaped like"):
        catro.plan(graph, data=(torch.randn(20, 2, 8, 8), torch.arange(20) % 2), flops=0.5, progress=False)
    with pytest.raises(DataError, match="no sample of class"):
        catro.plan(graph, data=(x, torch.arange(20) % 2), flops=0.5, classes=[0, 5], progress=False)
    with pytest.raises(ConfigError, match="samples_per_class"):
        catro.plan(graph, data=(x, torch.arange(20) % 2), flops=0.5, samples_per_class=1, progress=False)
    with pytest.raises(ConfigError, match="objective"):
        catro.plan(graph, data=(x, torch.arange(20) % 2), flops=0.5, objective="fisher", progress=False)
    with pytest.raises(ConfigError, match="features"):
        catro.plan(graph, data=(x, torch.arange(20) % 2), flops=0.5, features="input", progress=False)
    with pytest.raises(ConfigError, match="space"):
        catro.plan(graph, data=(x, torch.arange(20) % 2), flops=0.5, space="features", progress=False)
    with pytest.raises(ConfigError, match="step="):
        catro.plan(graph, data=(x, torch.arange(20) % 2), flops=0.5, step=1.0, progress=False)
    with pytest.raises(ConfigError, match="reg="):
        catro.plan(graph, data=(x, torch.arange(20) % 2), flops=0.5, reg=-1.0, progress=False)
    with pytest.raises(ConfigError, match="allocation"):
        catro.plan(graph, data=(x, torch.arange(20) % 2), flops=0.5, allocation="best", progress=False)
    with pytest.raises(ConfigError, match="point="):
        catro.plan(graph, data=(x, torch.arange(20) % 2), flops=0.5, point="pre", progress=False)


def test_feature_points_read_the_conv_the_bn_or_the_activation():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.ReLU(),
                              torch.nn.Conv2d(4, 2, 1), torch.nn.Flatten(), torch.nn.Linear(2 * 36, 3))
    with torch.no_grad():
        net[1].running_mean.uniform_(-1, 1)
        net[1].running_var.uniform_(0.5, 2)
        net[1].weight.uniform_(-2, 2)
        net[1].bias.uniform_(-1, 1)
    net.eval()
    x, y = torch.randn(30, 1, 8, 8), torch.arange(30) % 3
    graph = fxprune.analyze(net, (x[:1],))
    group = graph.groups["0"]
    with torch.no_grad():
        values = {"produced": net[0](x), "normalized": net[1](net[0](x)), "consumed": net[2](net[1](net[0](x)))}
    for point, value in values.items():
        b, w = catro.group_stats(graph, [group], (x,), y, point=point)["0"]
        stats = catro.ScatterStats(4, 1)
        stats.update(value.mean((2, 3)).unsqueeze(2), y)  # global average pooling of that value
        assert torch.allclose(b, stats.between()) and torch.allclose(w, stats.within()), point
    # BN changes each channel's scale, so the traces (and the ranking b / w after the ReLU) differ
    assert not torch.allclose(catro.group_stats(graph, [group], (x,), y, point="produced")["0"][0],
                              catro.group_stats(graph, [group], (x,), y, point="normalized")["0"][0])


def test_collect_is_class_balanced():
    x, y = torch.randn(100, 3), torch.tensor([0] * 70 + [1] * 20 + [2] * 10)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=16)
    (xs,), ys = catro.collect(loader, samples_per_class=8)
    assert torch.bincount(ys).tolist() == [8, 8, 8] and xs.shape == (24, 3)
    (xs,), ys = catro.collect(loader, samples_per_class=8, classes=[2, 1])
    assert sorted(set(ys.tolist())) == [1, 2]


@pytest.fixture(scope="module")
def digits_model():
    (xtr, ytr), (xte, yte) = load()
    torch.manual_seed(0)
    model = train(SmallResNet(16), xtr, ytr)
    return model, (xtr, ytr), (xte, yte)


def _short_finetune(pruned, xtr, ytr, xte, yte):
    """The issue's "one short fine-tune": 20 SGD steps of cross-entropy (batch 32) on 640 samples."""
    tuned = ft.fit(copy.deepcopy(pruned), xtr[:640], ytr[:640], stage="ce", epochs=1, lr=0.02, progress=False)
    return accuracy(tuned, xte, yte)


def test_digits_catro_budget_recovery_and_beats_random(digits_model):
    model, (xtr, ytr), (xte, yte) = digits_model
    base = accuracy(model, xte, yte)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(xtr, ytr), batch_size=64)
    pruned = fxprune.compile(model, (xtr[:1],), method="catro", flops=0.5, data=loader, onnx=False,
                             method_options={"progress": False, "samples_per_class": 16})
    rep = fxprune.report(pruned)
    assert rep.mask["ok"] and 0.45 <= rep.flops_after / rep.flops_before <= 0.5
    assert rep.plan.meta["method"] == "catro" and rep.plan.meta["samples_per_class"] == 16
    assert rep.plan.meta["features"] == "output"
    # right after the cut, CATRO keeps far more than random (measured 0.40 vs 0.11-0.16 on this model as an
    # AVX-512 CPU trains it, 0.25 vs 0.11-0.12 as an AVX2 CPU does)
    cut = accuracy(pruned, xte, yte)
    rand = [fxprune.compile(model, (xtr[:1],), method="random", flops=0.5, onnx=False, seed=s) for s in range(3)]
    rand_cut = [accuracy(r, xte, yte) for r in rand]
    assert cut >= max(rand_cut) + 0.1, (cut, rand_cut)
    # after the same short fine-tune (20 steps), CATRO is at least as good as random's mean over 3 seeds
    # (10 steps on the AVX-512 model: catro 0.84, random 0.61, 0.60, 0.63; on the AVX2 model that short a
    # fine-tune is noise: catro 0.43, random 0.59, 0.40, 0.41, l2 0.71; 20 steps: catro 0.98, random 0.97, 0.94, 0.89)
    tuned = _short_finetune(pruned, xtr, ytr, xte, yte)
    rand_tuned = [_short_finetune(r, xtr, ytr, xte, yte) for r in rand]
    assert tuned >= sum(rand_tuned) / len(rand_tuned), (tuned, rand_tuned)
    # one longer fine-tune (2 epochs of distillation with mixup) brings it back near the unpruned model
    student = ft.fit(copy.deepcopy(pruned), xtr, ytr, stage="kd", teacher=model, epochs=2, lr=0.02, progress=False)
    assert accuracy(student, xte, yte) >= base - 0.03


def test_greedy_allocation_meets_the_budget_and_sequential_changes_later_sets(digits_model):
    model, (xtr, ytr), _ = digits_model
    graph = fxprune.analyze(model, (xtr[:1],))
    greedy = catro.plan(graph, data=(xtr, ytr), flops=0.5, allocation="greedy", samples_per_class=16, features="own",
                        progress=False)
    cost = CostModel(graph)
    assert cost.flops(greedy.mask(graph).numpy()) <= 0.5 * cost.base_flops
    own = {"samples_per_class": 16, "features": "own", "progress": False}
    one = catro.plan(graph, data=(xtr, ytr), ratio=0.5, sequential=False, **own)
    seq = catro.plan(graph, data=(xtr, ytr), ratio=0.5, sequential=True, **own)
    order = list(one.keep)
    assert one.keep[order[0]] == seq.keep[order[0]]  # the shallowest group sees the same network
    assert any(one.keep[n] != seq.keep[n] for n in order[1:])  # deeper ones see the pruned one
    assert all(len(one.keep[n]) == len(seq.keep[n]) == graph.groups[n].size // 2 for n in order)


def test_subtask_shrinks_the_classifier(digits_model):
    model, (xtr, ytr), (xte, yte) = digits_model
    classes = [3, 8]
    small = catro.subtask(model, (xtr[:1],), classes, (xtr, ytr), ratio=0.25, progress=False)
    rep = fxprune.report(small)
    assert rep.mask["ok"] and rep.plan.meta["subtask"] == classes
    sel = (yte == 3) | (yte == 8)
    with torch.no_grad():
        out = small(xte[sel])
    assert out.shape == (int(sel.sum()), 2)
    truth = (yte[sel] == 8).long()
    tuned = ft.fit(copy.deepcopy(small), xtr[(ytr == 3) | (ytr == 8)], (ytr[(ytr == 3) | (ytr == 8)] == 8).long(),
                   epochs=2, lr=0.02, progress=False)
    with torch.no_grad():
        assert (tuned(xte[sel]).argmax(1) == truth).float().mean() >= 0.95


def test_backward_output_keeps_the_channel_that_separates_the_classes_at_the_output():
    gen = torch.Generator().manual_seed(0)
    y = torch.arange(40) % 2
    x = torch.randn(40, 2, 4, 4, generator=gen)
    x[:, 0] += 3 * y.float().view(-1, 1, 1)  # input channel 0 carries the class; channel 1 is noise
    conv = torch.nn.Conv2d(2, 4, 1, bias=False)
    with torch.no_grad():
        conv.weight.zero_()
        conv.weight[0, 0] = 1.0   # channel 0: the class signal
        conv.weight[1, 1] = 2.0   # channel 1: loud noise
        conv.weight[2, 1] = 0.5   # channel 2: quiet noise; channel 3: dead
    fc = torch.nn.Linear(4, 2)
    with torch.no_grad():
        fc.weight.copy_(torch.tensor([[1.0, 1.0, 1.0, 1.0], [-1.0, 1.0, -1.0, 1.0]]))
    net = torch.nn.Sequential(conv, torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), fc).eval()
    graph = fxprune.analyze(net, (x[:1],))
    g = next(g for g in graph.prunable_groups() if g.size == 4)
    assert catro.backward_output(graph, g, 1, (x,), y).tolist() == [0]
    assert catro.backward_output(graph, g, 3, (x,), y).tolist() == [0, 2, 3]  # the loud noise goes first
    assert catro.backward_output(graph, g, 2, (x,), y, step=0.5).tolist() == [0, 3]  # two per round: both noises
    out = torch.stack([net(x), torch.zeros(40, 2)])
    assert catro.output_trace_ratio(out, y).tolist()[1] == 0.0


class ChunkedBlock(torch.nn.Module):
    """YOLO's C2f in small: a group's two halves, the second read by a conv, both concatenated."""

    def __init__(self, c=32):
        super().__init__()
        self.stem, self.cv1 = torch.nn.Conv2d(3, c, 3, padding=1), torch.nn.Conv2d(c, c, 1)
        self.m, self.cv2 = torch.nn.Conv2d(c // 2, c // 2, 3, padding=1), torch.nn.Conv2d(c // 2 * 3, c, 1)
        self.head = torch.nn.Linear(c, 4)

    def forward(self, x):
        y = list(torch.relu(self.cv1(torch.relu(self.stem(x)))).chunk(2, 1))
        y.append(torch.relu(self.m(y[-1])))
        return self.head(torch.relu(self.cv2(torch.cat(y, 1))).mean((2, 3)))


def test_a_budget_the_channel_choice_misses_is_said():
    """CATRO chooses each group's channels after the counts are allocated; where its choice leaves a chunk
    of a group empty, the chunk keeps its best channel and the plan can keep more than the budget (yolo11n-cls
    at flops=0.5: 0.533, silently). It meets the budget or says by how much it does not."""
    torch.manual_seed(0)
    model, x = ChunkedBlock().eval(), torch.randn(1, 3, 16, 16)
    g = torch.Generator().manual_seed(0)
    data = [(torch.randn(16, 3, 16, 16, generator=g), torch.arange(16) % 4) for _ in range(2)]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pruned = fxprune.compile(model, (x,), method="catro", flops=0.5, data=data, onnx=False, round_to=None)
    rep = fxprune.report(pruned)
    said = [str(w.message) for w in caught if "CATRO's channels keep" in str(w.message)]
    kept = rep.flops_after / rep.flops_before
    assert kept <= 0.5 + 1e-6 or (said and f"{kept:.1%}" in said[0]), (kept, said)
