"""Accuracy versus FLOPs on Fashion-MNIST: fxprune's methods side by side with Torch-Pruning.

Trains a CIFAR-style ResNet-20 (stem adapted to 28x28x1) on Fashion-MNIST (Debian package
``dataset-fashion-mnist``), or loads it from ``tools/results/cache/``. Then, for each FLOPs
target and each method, prunes to the same FLOPs (counted by ``fxprune.cost.count_flops``
for both libraries), fine-tunes with the same budget (epochs, optimizer, schedule, seed),
and records test accuracy, params, FLOPs and ONNX Runtime CPU latency at batch 1 and 64.
Training-time methods (DWGL, OICSR, GSM) spend the first half of the budget on their
regularised / GSM training and the second half on fine-tuning; the others fine-tune for
the whole budget. Writes ``accuracy.md``, ``accuracy.json`` and ``accuracy.png`` under
``--out``.

    python tools/bench_accuracy.py              # the whole benchmark (about an hour on 2 CPU cores)
    python tools/bench_accuracy.py --quick      # a 5-minute version on a subset
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import os
import sys
import time
import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F
from tabulate import tabulate
from tqdm import tqdm

import fxprune
from fxprune.cost import count_flops, count_params
from fxprune.io.datasets import fashion_mnist

OURS = ["l2", "bn", "taylor", "random", "dwgl", "oicsr", "gsm", "curl", "catro"]
THEIRS = ["tp-l2", "tp-bn", "tp-taylor"]
TRAINING_TIME = {"dwgl", "oicsr", "gsm"}


# ----------------------------------------------------------------------------- model

class BasicBlock(nn.Module):
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class ResNet20(nn.Module):
    """He et al.'s CIFAR ResNet-20 (3 stages x 3 blocks, widths 16/32/64), 1-channel 28x28 input,
    projection shortcuts (option B) where the shape changes."""

    def __init__(self, classes=10):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        layers, cin = [], 16
        for cout, stride in ((16, 1), (32, 2), (64, 2)):
            for i in range(3):
                layers.append(BasicBlock(cin, cout, stride if i == 0 else 1))
                cin = cout
        self.layers = nn.Sequential(*layers)
        self.fc = nn.Linear(64, classes)

    def forward(self, x):
        x = self.layers(F.relu(self.bn1(self.conv1(x))))
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


# ----------------------------------------------------------------------------- training

def batches(x, y, batch, gen, limit=None):
    perm = torch.randperm(len(y), generator=gen)[:limit]
    for i in range(0, len(perm), batch):
        idx = perm[i:i + batch]
        yield x[idx], y[idx]


def train(model, data, *, epochs, lr, samples, seed, device, extra_loss=None, optimizer=None, desc="train"):
    """SGD with momentum and a cosine schedule; ``samples`` per epoch (None: all)."""
    (x, y) = data
    torch.manual_seed(seed)
    model.to(device).train()
    opt = optimizer or torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4, nesterov=True)
    steps = epochs * math.ceil((samples or len(y)) / 128)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
    gen = torch.Generator().manual_seed(seed)
    with tqdm(total=steps, desc=desc, leave=False, file=sys.stderr) as bar:
        for _ in range(epochs):
            for xb, yb in batches(x, y, 128, gen, samples):
                xb, yb = xb.to(device), yb.to(device)
                loss = F.cross_entropy(model(xb), yb)
                if extra_loss is not None:
                    loss = loss + extra_loss(model)
                opt.zero_grad()
                loss.backward()
                opt.step()
                sched.step()
                bar.update()
    return model.cpu().eval()


@torch.no_grad()
def accuracy(model, data, device):
    model.to(device).eval()
    x, y = data
    correct = sum((model(x[i:i + 1000].to(device)).argmax(1).cpu() == y[i:i + 1000]).sum().item()
                  for i in range(0, len(y), 1000))
    model.cpu()
    return correct / len(y)


# ----------------------------------------------------------------------------- methods

def prune_ours(method, base, target, train_data, cfg):
    """Returns (pruned model, epochs used before pruning)."""
    x1 = train_data[0][:1]
    calib = (train_data[0][:256], train_data[1][:256])
    model, pre = copy.deepcopy(base), 0
    if method in TRAINING_TIME:
        pre = cfg.budget // 2
        model = train_time(method, model, x1, train_data, cfg, pre, target)
    pruned = fxprune.compile(model, (x1,), method=method, flops=target, onnx=False,
                             data=calib if method in ("taylor", "curl", "catro") else None)
    return pruned, pre


def train_time(method, model, x1, train_data, cfg, epochs, target):
    """The README's recipe: the regularizer / optimizer is told the FLOPs target."""
    from fxprune.passes import dwgl, gsm, oicsr

    graph = fxprune.analyze(model, (x1,))
    if method == "gsm":
        opt = gsm.GSM(model.parameters(), graph=graph, model=model, flops=target, lr=cfg.lr, momentum=0.98)
        return train(model, train_data, epochs=epochs, lr=cfg.lr, samples=cfg.samples, seed=cfg.seed,
                     device=cfg.device, optimizer=opt, desc=method)
    reg = (dwgl.Regularizer if method == "dwgl" else oicsr.Regularizer)(graph, lam=cfg.lam, flops=target)
    return train(model, train_data, epochs=epochs, lr=cfg.lr, samples=cfg.samples, seed=cfg.seed,
                 device=cfg.device, extra_loss=reg, desc=method)


def prune_theirs(method, base, target, train_data, cfg):
    """Torch-Pruning at the same FLOPs: bisect its uniform pruning ratio on our FLOPs counter."""
    import torch_pruning as tp

    x1 = train_data[0][:1]
    base_flops = count_flops(base, (x1,))
    imp = {"tp-l2": lambda: tp.importance.GroupMagnitudeImportance(p=2),
           "tp-bn": lambda: tp.importance.BNScaleImportance(),
           "tp-taylor": lambda: tp.importance.GroupTaylorImportance()}[method]

    def pruned_at(ratio):
        model = copy.deepcopy(base).eval()
        pruner = tp.pruner.MetaPruner(model, x1, importance=imp(), pruning_ratio=ratio, ignored_layers=[model.fc])
        if method == "tp-taylor":
            xb, yb = train_data[0][:256], train_data[1][:256]
            model.zero_grad()
            F.cross_entropy(model(xb), yb).backward()
        pruner.step()
        model.zero_grad()
        return model

    lo, hi = 0.0, 0.95
    best = pruned_at(hi)
    for _ in range(10):
        mid = (lo + hi) / 2
        m = pruned_at(mid)
        if count_flops(m, (x1,)) <= target * base_flops:
            hi, best = mid, m
        else:
            lo = mid
    return best, 0


def latency(model, x1):
    from fxprune.cost.latency import ort_latency

    return [ort_latency(model, (x1.expand(b, -1, -1, -1).contiguous(),), repeats=20, threads=2)["median_ms"]
            for b in (1, 64)]


# ----------------------------------------------------------------------------- main

def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="a 5-minute version: data subset, short training, one target")
    p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--methods", default=",".join(OURS + THEIRS))
    p.add_argument("--targets", default=None, help="FLOPs fractions kept, comma-separated (default 0.5,0.25)")
    p.add_argument("--data", default=None, help="folder of the Fashion-MNIST IDX files (default: Debian's)")
    p.add_argument("--merge", nargs="+", default=None, metavar="JSON",
                   help="no training: merge the accuracy.json files of runs made with other --targets into one table")
    cfg = p.parse_args(argv)
    cfg.seed, cfg.lr, cfg.lam = 0, 0.05, 5e-4
    if cfg.quick:
        cfg.base_epochs, cfg.budget, cfg.samples, cfg.test_n = 2, 2, 4000, 2000
        cfg.targets = cfg.targets or "0.5"
    else:
        cfg.base_epochs, cfg.budget, cfg.samples, cfg.test_n = 8, 4, 15000, 10000
        cfg.targets = cfg.targets or "0.5,0.25"
    if cfg.merge:
        return merge(cfg)
    targets = [float(t) for t in cfg.targets.split(",")]
    methods = cfg.methods.split(",")
    torch.manual_seed(cfg.seed)
    (xtr, ytr), (xte, yte) = fashion_mnist(cfg.data) if cfg.data else fashion_mnist()
    train_data, test_data = (xtr, ytr), (xte[:cfg.test_n], yte[:cfg.test_n])
    os.makedirs(os.path.join(cfg.out, "cache"), exist_ok=True)
    cache = os.path.join(cfg.out, "cache", f"resnet20_fmnist_{'quick' if cfg.quick else 'full'}.pt")
    base = ResNet20()
    if os.path.exists(cache):
        base.load_state_dict(torch.load(cache, weights_only=True))
    else:
        t = time.time()
        base = train(base, train_data, epochs=cfg.base_epochs, lr=0.1, samples=None if not cfg.quick else cfg.samples,
                     seed=cfg.seed, device=cfg.device, desc="baseline")
        torch.save(base.state_dict(), cache)
        print(f"baseline trained in {time.time() - t:.0f} s", file=sys.stderr)
    base.eval()
    x1 = xtr[:1]
    f0, p0 = count_flops(base, (x1,)), count_params(base)
    rows = [dict(method="baseline", library="-", target=1.0, flops=f0, params=p0, acc=accuracy(base, test_data, cfg.device),
                 lat1=None, lat64=None, split="-")]
    rows[0]["lat1"], rows[0]["lat64"] = latency(base, x1)
    runs = [(t, m) for t in targets for m in methods]
    for target, method in tqdm(runs, desc="methods", file=sys.stderr):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                prune = prune_theirs if method.startswith("tp-") else prune_ours
                model, pre = prune(method, base, target, train_data, cfg)
                ft = cfg.budget - pre
                model = train(model, train_data, epochs=ft, lr=cfg.lr / 5, samples=cfg.samples, seed=cfg.seed,
                              device=cfg.device, desc=f"{method}@{target}")
            lat1, lat64 = latency(model, x1)
            rows.append(dict(method=method, library="Torch-Pruning" if method.startswith("tp-") else "fxprune",
                             target=target, flops=count_flops(model, (x1,)), params=count_params(model),
                             acc=accuracy(model, test_data, cfg.device), lat1=lat1, lat64=lat64,
                             split=f"{pre} reg + {ft} ft" if pre else f"{ft} ft"))
        except Exception as exc:  # a method that fails is reported, not hidden
            rows.append(dict(method=method, library="fxprune", target=target, flops=None, params=None, acc=None,
                             lat1=None, lat64=None, split=f"failed: {type(exc).__name__}: {str(exc)[:80]}"))
        print(json.dumps(rows[-1]), file=sys.stderr)
    write(rows, cfg, f0)


def merge(cfg):
    """One table and plot from several runs (each run's baseline row is kept, marked with its targets)."""
    rows = []
    for path in cfg.merge:
        with open(path) as f:
            run = json.load(f)
        targets = sorted({r["target"] for r in run[1:]}, reverse=True)
        run[0]["method"] = f"baseline (run for {', '.join(f'{t:.0%}' for t in targets)})"
        rows.extend(run)
    rows.sort(key=lambda r: (r["library"] != "-", -r["target"]))
    write(rows, cfg, rows[0]["flops"], merged=len(cfg.merge))


def write(rows, cfg, f0, merged=0):
    def fmt(v, spec):
        return "-" if v is None else format(v, spec)

    table = [(r["method"], r["library"], fmt(r["target"], ".0%"), fmt(r["flops"] and r["flops"] / f0, ".1%"),
              fmt(r["params"], ","), fmt(r["acc"], ".2%"), fmt(r["lat1"], ".3f"), fmt(r["lat64"], ".2f"), r["split"])
             for r in rows]
    head = ["method", "library", "target", "FLOPs kept", "params", "test acc", "ORT ms (b=1)", "ORT ms (b=64)", "budget split (epochs)"]
    md = tabulate(table, headers=head, tablefmt="github")
    note = (f"\n\nResNet-20 on Fashion-MNIST; baseline {cfg.base_epochs} epochs; every pruned model gets the same "
            f"budget of {cfg.budget} epochs of {cfg.samples} samples (SGD, cosine, seed {cfg.seed}); "
            f"test on {cfg.test_n} images; device {cfg.device}.{' QUICK RUN.' if cfg.quick else ''}"
            f"{f' Merged from {merged} runs, each with its own baseline (same seed).' if merged else ''}\n")
    name = "accuracy_quick" if cfg.quick else "accuracy"
    with open(os.path.join(cfg.out, f"{name}.md"), "w") as f:
        f.write(md + note)
    with open(os.path.join(cfg.out, f"{name}.json"), "w") as f:
        json.dump(rows, f, indent=1)
    print(md + note)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    base = rows[0]
    colors = plt.get_cmap("tab20").colors
    for i, method in enumerate(dict.fromkeys(r["method"] for r in rows if r["library"] != "-")):
        pts = sorted((r["flops"] / f0, r["acc"]) for r in rows if r["method"] == method and r["acc"] is not None)
        if not pts:
            continue
        pts = pts + [(1.0, base["acc"])]
        theirs = method.startswith("tp-")
        ax.plot([p[0] for p in pts], [p[1] * 100 for p in pts], "--" if theirs else "-", marker="s" if theirs else "o",
                color=colors[(2 * i) % 20 if i < 10 else (2 * i + 1) % 20], label=method)
    ax.set_xlabel("FLOPs kept (fraction of ResNet-20)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title("Fashion-MNIST, ResNet-20: accuracy vs FLOPs after equal fine-tuning")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(os.path.join(cfg.out, f"{name}.png"), dpi=120)


if __name__ == "__main__":
    main()
