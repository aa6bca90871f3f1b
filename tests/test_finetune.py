"""fxprune.train.finetune: the KD+mixup loss, label refinement's update rule, the expanded set, the trainer."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import fxprune.train.finetune as ft
from fxprune.errors import ConfigError, DataError


pytestmark = pytest.mark.usefixtures("one_thread")


def test_kd_mixup_loss_matches_the_formula():
    gen = torch.Generator().manual_seed(0)
    s, t = torch.randn(6, 5, generator=gen), torch.randn(6, 5, generator=gen)
    y, yp, lam = torch.randint(0, 5, (6,), generator=gen), torch.randint(0, 5, (6,), generator=gen), 0.3
    got = ft.KDMixupLoss(temperature=2.0, alpha=0.7)(s, t, y, yp, lam)
    pt, ps = F.softmax(t / 2, 1), F.softmax(s / 2, 1)
    kl = (pt * (pt.log() - ps.log())).sum(1).mean()  # KL(teacher || student) at T = 2
    want = 0.7 * 4 * kl + 0.3 * (lam * F.cross_entropy(s, y) + (1 - lam) * F.cross_entropy(s, yp))
    assert float(got) == pytest.approx(float(want), rel=1e-5)


def test_mixup_mixes_with_a_permutation():
    x, y = torch.arange(8.0).view(8, 1), torch.arange(8)
    xm, ya, yb, lam = ft.mixup(x, y, 1.0, torch.Generator().manual_seed(3))
    assert 0 <= lam <= 1 and torch.equal(ya, y)
    assert torch.allclose(xm, lam * x + (1 - lam) * x[yb])  # yb = y[perm] names the partner of each row
    again = ft.mixup(x, y, 1.0, torch.Generator().manual_seed(3))
    assert again[3] == lam and torch.equal(again[2], yb)


def test_label_refinement_step_is_the_closed_form():
    gen = torch.Generator().manual_seed(0)
    q0 = torch.randn(10, 4, generator=gen)
    labels = ft.RefinedLabels(q0, lr=1.0, alpha=0.7)
    idx = torch.tensor([1, 4, 7])
    s = torch.randn(3, 4, generator=gen, requires_grad=True)
    y = torch.tensor([0, 2, 3])
    loss = labels.loss(s, idx, y)
    want = 0.7 * F.kl_div(F.log_softmax(q0[idx], 1), F.softmax(s, 1), reduction="batchmean") \
        + 0.3 * F.cross_entropy(s, y)  # KL(student || label)
    assert float(loss.detach()) == pytest.approx(float(want.detach()), rel=1e-5)
    loss.backward()
    labels.step()
    expect = q0[idx] - 1.0 * 0.7 / 3 * (F.softmax(q0[idx], 1) - F.softmax(s.detach(), 1))
    assert torch.allclose(labels.logits[idx], expect, atol=1e-6)
    others = torch.tensor([i for i in range(10) if i not in idx.tolist()])
    assert torch.equal(labels.logits[others], q0[others])  # only the batch's labels move


def test_expand_makes_the_six_copies():
    gen = torch.Generator().manual_seed(0)
    x, y = torch.rand(4, 1, 12, 12, generator=gen) + 0.1, torch.arange(4)
    xe, ye = ft.expand(x, y, seed=1)
    assert xe.shape == (24, 1, 12, 12) and ye.tolist() == list(range(4)) * 6
    assert torch.equal(xe[:4], x)
    for k in range(1, 4):  # patch shuffles (12 divides by 2, 3 and 4) keep each image's pixels
        shuffled = xe[4 * k:4 * k + 4]
        assert torch.equal(shuffled.flatten(1).sort(1).values, x.flatten(1).sort(1).values)
        assert not torch.equal(shuffled, x)
    cut = xe[16:20]
    zero_frac = (cut == 0).flatten(1).float().mean(1)
    assert bool(((zero_frac >= 0.2 ** 2 - 1e-6) & (zero_frac <= 0.5 ** 2 + 0.05)).all())
    with pytest.raises(DataError):
        ft.expand(torch.rand(4, 12, 12), y)


def test_fit_stages_learn_and_check_arguments():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(256, 6, generator=gen)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0).long()
    torch.manual_seed(0)
    teacher = ft.fit(torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3)), x, y,
                     epochs=25, lr=0.1, batch_size=64, progress=False)
    acc_t = (teacher(x).argmax(1) == y).float().mean()
    student = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
    before = (student(x).argmax(1) == y).float().mean()
    ft.fit(student, x, y, stage="kd", teacher=teacher, epochs=25, lr=0.1, batch_size=64, progress=False)
    after = (student(x).argmax(1) == y).float().mean()
    assert acc_t > 0.9 and after > max(before, 0.8)
    assert not teacher.training  # the teacher stays in eval mode
    labels = ft.RefinedLabels(ft.teacher_logits(teacher, x))
    ft.fit(student, x, y, stage="refine", labels=labels, epochs=2, progress=False)
    assert not torch.equal(labels.logits, ft.teacher_logits(teacher, x))
    with pytest.raises(ConfigError, match="teacher"):
        ft.fit(student, x, y, stage="kd")
    with pytest.raises(ConfigError, match="RefinedLabels"):
        ft.fit(student, x, y, stage="refine", labels=ft.RefinedLabels(torch.zeros(3, 3)))
    with pytest.raises(ConfigError, match="stage"):
        ft.fit(student, x, y, stage="sgd")


def test_warmup_cosine_schedule():
    f = ft.warmup_cosine(100, 10)
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0)
    assert f(10) == pytest.approx(1.0) and f(55) == pytest.approx(0.5) and f(100) == pytest.approx(0.0)


def test_refinement_keeps_the_batch_norm_statistics_by_default():
    """Refinement's expanded set is mostly distorted copies: its default leaves the BN running statistics
    (and the BN's forward in eval mode) as they were; ``bn_stats="update"`` is the authors' train mode."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.ReLU(),
                              torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(4, 3))
    x, y = torch.randn(64, 1, 8, 8) * 3 + 1, torch.randint(0, 3, (64,))
    stats = (net[1].running_mean.clone(), net[1].running_var.clone())
    labels = ft.RefinedLabels(torch.randn(64, 3))
    ft.fit(net, x, y, stage="refine", labels=labels, epochs=1, lr=0.1, progress=False)
    assert torch.equal(net[1].running_mean, stats[0]) and torch.equal(net[1].running_var, stats[1])
    assert not torch.equal(net[1].weight, torch.ones(4))  # the affine parameters still trained
    assert not net.training and not net[1].training
    ft.fit(net, x, y, stage="refine", labels=labels, epochs=1, lr=0.1, progress=False, bn_stats="update")
    assert not torch.equal(net[1].running_mean, stats[0])
    before = net[1].running_mean.clone()
    ft.fit(net, x, y, stage="ce", epochs=1, progress=False)  # the other stages update them
    assert not torch.equal(net[1].running_mean, before)
    with pytest.raises(ConfigError, match="bn_stats"):
        ft.fit(net, x, y, stage="ce", bn_stats="off")
