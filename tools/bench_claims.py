"""Each training-time paper's own claim, measured at small scale (mean ± std over seeds).

* ``dwgl``: DWGL removes more channels than plain group lasso at equal accuracy on a residual net.
  Digits, the small residual CNN of ``tests/digits.py``; proximal training (4 epochs) with the
  directed coefficients (``schedule="linear"``) or without them (``"none"``, plain group lasso), at
  several ``lam``; the channels every voter agrees on (``removable(tau=0.05)``) are cut and the cut
  model is evaluated without fine-tuning.
* ``oicsr``: the global greedy loop with retraining beats a one-shot cut at equal FLOPs. Digits;
  2 epochs with the OICSR term, then either ``oicsr.prune`` (steps of 10 % of the FLOPs, 1 epoch of
  OICSR retraining after each) or one ``compile(method="oicsr")`` cut followed by as many epochs of
  fine-tuning as the loop retrained.
* ``gsm``: unstructured GSM (global top-Q by ``|w * g|``, momentum 0.99, Nesterov) reaches 10x fewer
  non-zero weights on a LeNet-5-style net on Fashion-MNIST within 0.5 point of the dense net,
  without fine-tuning; against global magnitude pruning of the dense net.

    python tools/bench_claims.py                       # all three, 3 seeds (~15 min on 2 CPU cores)
    python tools/bench_claims.py --claims gsm --seeds 0 --gsm-epochs 2
"""
from __future__ import annotations

import argparse
import copy
import math
import os
import statistics
import sys
import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))

import fxprune  # noqa: E402
from fxprune.passes import dwgl, gsm, oicsr  # noqa: E402
from digits import SmallResNet, accuracy, load, train  # noqa: E402


def ms(v):
    return f"{statistics.mean(v):.3f} ± {statistics.stdev(v):.3f}" if len(v) > 1 else f"{v[0]:.3f}"


def digits_bases(seeds):
    (xtr, ytr), (xte, yte) = load()
    bases = {}
    for s in seeds:
        torch.manual_seed(s)
        bases[s] = train(SmallResNet(), xtr, ytr, epochs=8, seed=s)
    return ((xtr, ytr), (xte, yte)), bases


# ----------------------------------------------------------------------------- DWGL

def train_prox(model, reg, x, y, epochs, seed, lr=0.05, batch=64):
    """Proximal training: plain SGD, then the regularizer's proximal step after every step."""
    return train(model, x, y, epochs=epochs, lr=lr, batch=batch, seed=seed, after_step=lambda m: reg.prox(m, lr))


def voted_cut(model, reg, graph, x1, tau):
    """Cut exactly the channels every voter agrees on (each group keeps at least its best channel)."""
    votes = reg.removable(model, tau=tau)
    keep, sizes = {}, {}
    imp = dwgl.score(fxprune.analyze(model, (x1,)))
    for name, gone in votes.items():
        if not bool(gone.any()):
            continue
        kept = torch.nonzero(~gone).flatten().tolist() or [int(imp[name].argmax())]
        keep[name], sizes[name] = kept, graph.groups[name].size
    plan = fxprune.Plan(keep, sizes, {"method": "dwgl-vote"})
    return fxprune.apply(model, (x1,), plan, onnx=False), sum(sizes[n] - len(k) for n, k in keep.items())


def claim_dwgl(seeds, lams=(0.1, 0.3, 1.0), epochs=4, tau=0.05):
    ((xtr, ytr), (xte, yte)), bases = digits_bases(seeds)
    x1 = xtr[:1]
    graph = fxprune.analyze(bases[seeds[0]], (x1,))
    total = sum(g.size for g in graph.prunable_groups() if g.name != "fc")
    print(f"\n### DWGL against plain group lasso (digits, {epochs} proximal epochs, vote tau={tau}, "
          f"{total} prunable channels; no fine-tuning)\n")
    print("| lam | coefficients | channels removed by the vote | FLOPs kept | accuracy before the cut | after the cut |")
    print("|---|---|---|---|---|---|")
    for lam in lams:
        for schedule in ("linear", "none"):
            removed, flops, acc, before = [], [], [], []
            for s in seeds:
                reg = dwgl.Regularizer(graph, lam=lam, schedule=schedule)
                model = train_prox(copy.deepcopy(bases[s]), reg, xtr, ytr, epochs, s)
                before.append(accuracy(model, xte, yte))
                cut, n = voted_cut(model, reg, graph, x1, tau)
                rep = fxprune.report(cut)
                removed.append(n)
                flops.append(rep.flops_after / rep.flops_before)
                acc.append(accuracy(cut, xte, yte))
            label = "directed (DWGL)" if schedule == "linear" else "plain group lasso"
            print(f"| {lam} | {label} | {ms(removed)} | {ms(flops)} | {ms(before)} | {ms(acc)} |", flush=True)


# ----------------------------------------------------------------------------- OICSR

def claim_oicsr(seeds, flops=0.5, step=0.1, lam=3e-3):
    ((xtr, ytr), (xte, yte)), bases = digits_bases(seeds)
    x1 = xtr[:1]
    rows = {"greedy loop (retrain 1 epoch per step)": [], "one-shot, no fine-tuning": [],
            "one-shot + the same epochs of fine-tuning": [], "one-shot + the same epochs with the OICSR term": []}
    epochs_used, kept = [], []
    for s in seeds:
        base = bases[s]
        graph = fxprune.analyze(base, (x1,))
        model = train(copy.deepcopy(base), xtr, ytr, epochs=2, seed=s,
                      extra_loss=oicsr.Regularizer(graph, lam=lam, residual=True))
        rounds = []

        def retrain(module):
            rounds.append(1)
            g = fxprune.analyze(module, (x1,))
            train(module, xtr, ytr, epochs=1, lr=0.02, seed=s + len(rounds),
                  extra_loss=oicsr.Regularizer(g, lam=lam, residual=True))

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            greedy = oicsr.prune(model, (x1,), flops=flops, step=step, cap=0.6, residual=True, retrain=retrain)
        rows["greedy loop (retrain 1 epoch per step)"].append(accuracy(greedy, xte, yte))
        n = len(rounds)
        epochs_used.append(n)
        target = fxprune.cost.count_flops(greedy, (x1,)) / fxprune.cost.count_flops(base, (x1,))
        kept.append(target)
        one = fxprune.compile(model, (x1,), method="oicsr", flops=target, onnx=False)
        rows["one-shot, no fine-tuning"].append(accuracy(one, xte, yte))
        ft = copy.deepcopy(one)
        train(ft, xtr, ytr, epochs=n, lr=0.02, seed=s)
        rows["one-shot + the same epochs of fine-tuning"].append(accuracy(ft, xte, yte))
        reg_ft = copy.deepcopy(one)
        train(reg_ft, xtr, ytr, epochs=n, lr=0.02, seed=s,
              extra_loss=oicsr.Regularizer(fxprune.analyze(reg_ft, (x1,)), lam=lam, residual=True))
        rows["one-shot + the same epochs with the OICSR term"].append(accuracy(reg_ft, xte, yte))
    print(f"\n### OICSR: greedy loop against one-shot at equal FLOPs (digits, {ms(kept)} of the FLOPs kept, "
          f"{ms(epochs_used)} retraining epochs)\n")
    print("| pruning | accuracy |")
    print("|---|---|")
    for name, acc in rows.items():
        print(f"| {name} | {ms(acc)} |", flush=True)


# ----------------------------------------------------------------------------- GSM

class LeNet5(nn.Module):
    """LeNet-5 for 28x28x1 (conv 20, conv 50, fc 500 as in Caffe's / GSM's LeNet-5: 431k weights)."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 20, 5)
        self.conv2 = nn.Conv2d(20, 50, 5)
        self.fc1 = nn.Linear(50 * 4 * 4, 500)
        self.fc2 = nn.Linear(500, 10)

    def forward(self, x):
        x = F.max_pool2d(self.conv1(x), 2)
        x = F.max_pool2d(self.conv2(x), 2)
        return self.fc2(F.relu(self.fc1(x.flatten(1))))


def train_fm(model, data, epochs, lr, seed, optimizer=None, batch=256):
    x, y = data
    torch.manual_seed(seed)
    model.train()
    opt = optimizer or torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4, nesterov=True)
    steps = epochs * math.ceil(len(y) / batch)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: 0.5 * (1 + math.cos(math.pi * min(k, steps) / steps)))
    gen = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        perm = torch.randperm(len(y), generator=gen)
        for i in range(0, len(y), batch):
            idx = perm[i:i + batch]
            loss = F.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    return model.eval()


@torch.no_grad()
def acc_fm(model, data):
    x, y = data
    model.eval()
    return sum((model(x[i:i + 2000]).argmax(1) == y[i:i + 2000]).sum().item() for i in range(0, len(y), 2000)) / len(y)


def claim_gsm(seeds, epochs=4, base_epochs=4, keep=0.1):
    from fxprune.datasets import fashion_mnist

    train_data, test_data = fashion_mnist()
    rows = {"dense": [], "magnitude top-10 % of the dense net": [], "GSM, then magnitude top-10 %": [],
            "GSM nonzero fraction": []}
    for s in seeds:
        torch.manual_seed(s)
        base = train_fm(LeNet5(), train_data, base_epochs, 0.05, s)
        rows["dense"].append(acc_fm(base, test_data))
        rows["magnitude top-10 % of the dense net"].append(
            acc_fm(gsm.masked_copy(base, gsm.magnitude_masks(base, keep)), test_data))
        model = copy.deepcopy(base)
        opt = gsm.GSM(model.named_parameters(), keep=keep, lr=3e-2, momentum=0.99, weight_decay=5e-4, nesterov=True)
        train_fm(model, train_data, epochs, 3e-2, s, optimizer=opt)
        masked = gsm.masked_copy(model, gsm.magnitude_masks(model, keep))
        rows["GSM, then magnitude top-10 %"].append(acc_fm(masked, test_data))
        rows["GSM nonzero fraction"].append(gsm.sparsity(masked)[1])
        print(f"seed {s}: " + ", ".join(f"{k} {v[-1]:.4f}" for k, v in rows.items()), file=sys.stderr, flush=True)
    print(f"\n### GSM unstructured: LeNet-5 on Fashion-MNIST, {keep:.0%} of the kernel weights kept "
          f"({base_epochs} dense epochs, {epochs} GSM epochs, no fine-tuning)\n")
    print("| model | test accuracy |")
    print("|---|---|")
    for name, v in rows.items():
        print(f"| {name} | {ms(v)} |", flush=True)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--claims", default="dwgl,oicsr,gsm")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--gsm-epochs", type=int, default=4)
    cfg = p.parse_args(argv)
    torch.set_num_threads(1)
    seeds = [int(s) for s in cfg.seeds.split(",")]
    for claim in cfg.claims.split(","):
        {"dwgl": lambda: claim_dwgl(seeds), "oicsr": lambda: claim_oicsr(seeds),
         "gsm": lambda: claim_gsm(seeds, epochs=cfg.gsm_epochs)}[claim]()


if __name__ == "__main__":
    main()
