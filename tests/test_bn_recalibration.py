"""fxprune.train.recalibrate_bn: BN running statistics re-estimated on given batches, weights untouched."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn

import fxprune
from fxprune.errors import ConfigError
from fxprune.train import recalibrate_bn

from digits import SmallResNet, accuracy, load, train

pytestmark = pytest.mark.usefixtures("one_thread")


def small_net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(2, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Dropout(0.5), nn.Conv2d(4, 3, 1),
                         nn.BatchNorm2d(3)).eval()


def test_statistics_are_the_average_over_the_batches_and_nothing_else_moves():
    net = small_net()
    gen = torch.Generator().manual_seed(1)
    xs = [2 + 3 * torch.randn(16, 2, 6, 6, generator=gen) for _ in range(4)]
    state = copy.deepcopy(net.state_dict())
    out = recalibrate_bn(net, xs)
    # the user's model is not changed
    assert all(torch.equal(v, state[k]) for k, v in net.state_dict().items())
    # the batch means and unbiased variances of conv1's output, averaged over the 4 equal batches
    with torch.no_grad():
        feats = [net[0](x) for x in xs]
    mean = torch.stack([f.mean((0, 2, 3)) for f in feats]).mean(0)
    var = torch.stack([f.transpose(0, 1).flatten(1).var(1, unbiased=True) for f in feats]).mean(0)
    assert torch.allclose(out[1].running_mean, mean, atol=1e-5)
    assert torch.allclose(out[1].running_var, var, rtol=1e-4)
    assert int(out[1].num_batches_tracked) == 4
    # the second BN sees the first one in train mode (batch statistics) and dropout off: its mean is that
    with torch.no_grad():
        ref = [net[4](torch.relu(nn.functional.batch_norm(f, None, None, net[1].weight, net[1].bias, True)))
               for f in feats]
    assert torch.allclose(out[5].running_mean, torch.stack([r.mean((0, 2, 3)) for r in ref]).mean(0), atol=1e-5)
    # weights, affine parameters, momentum and training flags are as before
    for k, v in out.state_dict().items():
        if "running" not in k and "num_batches" not in k:
            assert torch.equal(v, state[k]), k
    assert out[1].momentum == 0.1 and not any(m.training for m in out.modules())


def test_data_forms_num_batches_and_inplace():
    net = small_net()
    gen = torch.Generator().manual_seed(2)
    x, y = torch.randn(32, 2, 6, 6, generator=gen), torch.randint(0, 3, (32,), generator=gen)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=8)
    first = recalibrate_bn(net, loader, num_batches=1)
    with torch.no_grad():
        assert torch.allclose(first[1].running_mean, net[0](x[:8]).mean((0, 2, 3)), atol=1e-5)
    net.train()
    same = recalibrate_bn(net, (x[:8], y[:8]), inplace=True)  # one (inputs, labels) pair
    assert same is net and net.training and all(m.training for m in net.modules())
    assert torch.allclose(net[1].running_mean, first[1].running_mean, atol=1e-6)
    with pytest.raises(ConfigError):
        recalibrate_bn(nn.Linear(2, 2), x)
    with pytest.raises(ConfigError):
        recalibrate_bn(net, x, num_batches=0)


def test_stale_statistics_come_back_to_the_reference_on_digits():
    (xtr, ytr), (xte, yte) = load()
    torch.manual_seed(0)
    early = train(SmallResNet(), xtr, ytr, epochs=1, seed=0)
    model = train(copy.deepcopy(early), xtr, ytr, epochs=3, lr=0.05, seed=1)
    ref = accuracy(recalibrate_bn(model, [xtr[i:i + 64] for i in range(0, len(xtr), 64)]), xte, yte)
    stale = copy.deepcopy(model)  # the trained weights with the statistics of epoch 1: BN lags behind
    for m, e in zip(stale.modules(), early.modules()):
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(e.running_mean)
            m.running_var.copy_(e.running_var)
    bad = accuracy(stale, xte, yte)
    fixed = recalibrate_bn(stale, [xtr[i:i + 64] for i in range(0, len(xtr), 64)])
    assert ref > 0.95 and bad < ref - 0.1  # the stale statistics cost accuracy
    assert accuracy(fixed, xte, yte) == pytest.approx(ref, abs=1e-6)  # same batches, same statistics
    # on a pruned GraphModule too: the cut model's statistics are re-estimated, its weights kept
    cut = fxprune.compile(model, (xtr[:1],), method="l2", flops=0.5, round_to=None, onnx=False)
    again = recalibrate_bn(cut, xtr[:512])
    assert all(torch.equal(p, q) for p, q in zip(cut.parameters(), again.parameters()))
    assert accuracy(again, xte, yte) > accuracy(cut, xte, yte) + 0.1  # measured 0.63 -> 0.82
