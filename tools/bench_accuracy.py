"""Accuracy versus FLOPs on Fashion-MNIST: fxprune's methods side by side with Torch-Pruning.

Per seed, trains a CIFAR-style ResNet-20 (stem adapted to 28x28x1) on Fashion-MNIST (Debian
package ``dataset-fashion-mnist``), or loads it from ``tools/results/cache/``. Then, for each
FLOPs target and each method, prunes to the same FLOPs (counted by ``fxprune.cost.count_flops``
for both libraries), trains with the same total budget (epochs, samples, optimizer, schedule,
seed), and records test accuracy, params, FLOPs and ONNX Runtime CPU latency at batch 1 and 64.
Each method runs in its own protocol: the training-time ones (DWGL, OICSR, GSM) spend the first
half of the budget on their regularised / GSM training, cut, and fine-tune for the second half;
the others cut the base and fine-tune for the whole budget. The seed sets the base's
initialisation, the data order and ``random``'s draw.

Every result is appended to ``accuracy.jsonl`` under ``--out`` (processes for different seeds
may share it); the table (mean ± std over seeds) and the plot are rebuilt from every row there
for the chosen setting: ``accuracy.md`` and ``accuracy.png``.

    python tools/bench_accuracy.py --seeds 0        # one seed, CPU setting: about 30 min on a quiet core
    python tools/bench_accuracy.py --seeds 1,2      # seeds may run side by side, one process each
    python tools/bench_accuracy.py --table-only     # the table and plot from every seed recorded
    python tools/bench_accuracy.py --quick          # a 3-minute version on a subset
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


def train(model, data, *, epochs, lr, samples, seed, device, extra_loss=None, optimizer=None, desc="train",
          scheduler=None):
    """SGD with momentum and a cosine schedule; ``samples`` per epoch (None: all). ``scheduler(optimizer)``
    replaces the cosine over these epochs (e.g. ``oicsr.LoopSchedule.attach``, one schedule across calls)."""
    (x, y) = data
    torch.manual_seed(seed)
    model.to(device).train()
    opt = optimizer or torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4, nesterov=True)
    steps = epochs * math.ceil((samples or len(y)) / 128)
    sched = scheduler(opt) if scheduler is not None else torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
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
    pruned = fxprune.compile(model, (x1,), method=method, flops=target, onnx=False, seed=cfg.seed,
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


def latency(base, model, x1):
    """ORT CPU latency (2 threads) of ``model`` side by side with ``base`` at batches 1 and 64
    (:func:`fxprune.cost.latency.compare_latency`, alternating rounds): the pruned model's median ms and
    its ratio to the baseline (median over rounds), which holds while other runs share the machine."""
    from fxprune.cost.latency import compare_latency

    out = {}
    for r in compare_latency(base, model, (x1,), batches=(1, 64), threads=2, repeats=40, rounds=4):
        out.update({f"lat{r['batch']}": r["pruned_ms"], f"ratio{r['batch']}": r["ratio"]})
    return out


# ----------------------------------------------------------------------------- main

SETTINGS = {  # name: (base epochs, base samples per epoch, budget epochs, samples per epoch, test images)
    "cpu": (4, 15000, 4, 4000, 10000),
    "gpu": (8, None, 4, 15000, 10000),
    "quick": (2, 4000, 2, 2000, 2000),
}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--setting", choices=sorted(SETTINGS), default="cpu",
                   help="training lengths: cpu (default, ~30 min a seed on one core), gpu (the longer one), quick")
    p.add_argument("--quick", action="store_true", help="--setting quick, one target, seed 0")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--methods", default=",".join(OURS + THEIRS))
    p.add_argument("--targets", default=None, help="FLOPs fractions kept, comma-separated (default 0.5,0.25)")
    p.add_argument("--data", default=None, help="folder of the Fashion-MNIST IDX files (default: Debian's)")
    p.add_argument("--table-only", action="store_true", help="no training: the table and plot from accuracy.jsonl")
    cfg = p.parse_args(argv)
    if cfg.quick:
        cfg.setting, cfg.seeds, cfg.targets = "quick", "0", cfg.targets or "0.5"
    cfg.base_epochs, cfg.base_samples, cfg.budget, cfg.samples, cfg.test_n = SETTINGS[cfg.setting]
    cfg.lr, cfg.lam = 0.05, 5e-4
    cfg.results = os.path.join(cfg.out, "accuracy.jsonl")
    if not cfg.table_only:
        targets = [float(t) for t in (cfg.targets or "0.5,0.25").split(",")]
        for seed in (int(s) for s in cfg.seeds.split(",")):
            cfg.seed = seed
            run_seed(cfg, targets, cfg.methods.split(","))
    write(cfg)


def run_seed(cfg, targets, methods):
    """One seed: its base model, then every (target, method); each row appended to ``cfg.results``."""
    def record(row):
        row.update(setting=cfg.setting, seed=cfg.seed, device=cfg.device, when=time.time())
        with open(cfg.results, "a") as f:
            f.write(json.dumps(row) + "\n")
        print(json.dumps(row), file=sys.stderr)

    (xtr, ytr), (xte, yte) = fashion_mnist(cfg.data) if cfg.data else fashion_mnist()
    train_data, test_data = (xtr, ytr), (xte[:cfg.test_n], yte[:cfg.test_n])
    os.makedirs(os.path.join(cfg.out, "cache"), exist_ok=True)
    cache = os.path.join(cfg.out, "cache", f"resnet20_fmnist_{cfg.setting}_seed{cfg.seed}.pt")
    torch.manual_seed(cfg.seed)
    base = ResNet20()
    if os.path.exists(cache):
        base.load_state_dict(torch.load(cache, weights_only=True))
    else:
        t = time.time()
        base = train(base, train_data, epochs=cfg.base_epochs, lr=0.1, samples=cfg.base_samples, seed=cfg.seed,
                     device=cfg.device, desc=f"baseline, seed {cfg.seed}")
        torch.save(base.state_dict(), cache)
        print(f"baseline trained in {time.time() - t:.0f} s", file=sys.stderr)
    base.eval()
    x1 = xtr[:1]
    record(dict(method="baseline", library="-", target=1.0, flops=count_flops(base, (x1,)),
                params=count_params(base), acc=accuracy(base, test_data, cfg.device), **latency(base, base, x1),
                split="-"))
    for target, method in tqdm([(t, m) for t in targets for m in methods], desc=f"seed {cfg.seed}", file=sys.stderr):
        library = "Torch-Pruning" if method.startswith("tp-") else "fxprune"
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                prune = prune_theirs if method.startswith("tp-") else prune_ours
                model, pre = prune(method, base, target, train_data, cfg)
                ft = cfg.budget - pre
                model = train(model, train_data, epochs=ft, lr=cfg.lr / 5, samples=cfg.samples, seed=cfg.seed,
                              device=cfg.device, desc=f"{method}@{target}")
            record(dict(method=method, library=library, target=target, flops=count_flops(model, (x1,)),
                        params=count_params(model), acc=accuracy(model, test_data, cfg.device),
                        **latency(base, model.eval(), x1), split=f"{pre} reg + {ft} ft" if pre else f"{ft} ft"))
        except Exception as exc:  # a method that fails is reported, not hidden
            record(dict(method=method, library=library, target=target, flops=None, params=None, acc=None,
                        lat1=None, lat64=None, split=f"failed: {type(exc).__name__}: {str(exc)[:80]}"))


def load_rows(cfg):
    """The newest row of each (seed, target, method) recorded for ``cfg.setting``."""
    newest = {}
    if os.path.exists(cfg.results):
        with open(cfg.results) as f:
            for row in map(json.loads, f):
                key = (row["seed"], row["target"], row["method"])
                if row["setting"] == cfg.setting and row["when"] >= newest.get(key, {"when": -1})["when"]:
                    newest[key] = row
    return list(newest.values())


def _ratios(rows, key):
    """Median (min-max) over seeds of a latency ratio to the baseline; '-' for rows timed before ratios."""
    vals = sorted(r[key] for r in rows if r.get(key) is not None)
    if not vals:
        return "-"
    return f"{vals[len(vals) // 2]:.2f} ({vals[0]:.2f}-{vals[-1]:.2f})" if len(vals) > 1 else f"{vals[0]:.2f}"


def mean_std(values):
    t = torch.tensor(values, dtype=torch.float64)
    return t.mean().item(), (t.std().item() if len(values) > 1 else 0.0)


def write(cfg):
    rows = load_rows(cfg)
    if not rows:
        raise SystemExit(f"no rows for setting {cfg.setting!r} in {cfg.results}")
    f0 = next(r["flops"] for r in rows if r["method"] == "baseline")
    groups = {}
    for r in rows:
        groups.setdefault((r["target"], r["method"]), []).append(r)
    order = OURS + THEIRS
    keys = sorted(groups, key=lambda k: (-k[0], k[1] != "baseline", order.index(k[1]) if k[1] in order else 99))
    summary, table = [], []
    for target, method in keys:
        ok = [r for r in groups[(target, method)] if r["acc"] is not None]
        failed = len(groups[(target, method)]) - len(ok)
        if not ok:
            table.append((method, "-", f"{target:.0%}", "-", "-", "-", "-", "-", "-",
                          groups[(target, method)][0]["split"]))
            continue
        acc_m, acc_s = mean_std([100 * r["acc"] for r in ok])
        summary.append(dict(method=method, target=target, flops=mean_std([r["flops"] / f0 for r in ok])[0],
                            acc=acc_m, std=acc_s, seeds=len(ok)))
        table.append((method, ok[0]["library"], f"{target:.0%}", f"{summary[-1]['flops']:.1%}",
                      f"{mean_std([r['params'] for r in ok])[0]:,.0f}", f"{acc_m:.2f} ± {acc_s:.2f}",
                      str(len(ok)) + (f" ({failed} failed)" if failed else ""),
                      _ratios(ok, "ratio1"), _ratios(ok, "ratio64"), ok[0]["split"]))
    head = ["method", "library", "target", "FLOPs kept", "params", "test acc (%)", "seeds",
            "ORT × baseline, b=1", "ORT × baseline, b=64", "budget split (epochs)"]
    seeds = sorted({r["seed"] for r in rows})
    md = tabulate(table, headers=head, tablefmt="github")
    base_on = f"{cfg.base_samples} samples" if cfg.base_samples else "all 60000 images"
    note = (f"\n\nResNet-20 on Fashion-MNIST, setting `{cfg.setting}`: baseline {cfg.base_epochs} epochs of {base_on} "
            f"(SGD lr 0.1, cosine); every pruned model gets the same budget of {cfg.budget} epochs of {cfg.samples} "
            f"samples (SGD lr {cfg.lr}, then {cfg.lr / 5} for fine-tuning, cosine), the training-time methods "
            f"half of it before their cut. Test accuracy on {cfg.test_n} test images, mean ± std over seeds "
            f"{', '.join(map(str, seeds))} (each seed its own baseline, data order and draws); params and FLOPs "
            f"are means. ORT latency: each model timed side by side with its seed's baseline (2 threads, 4 "
            f"alternating rounds of 10 runs each, batches 1 and 64), the median ratio over rounds; the table gives "
            f"the median over seeds and the range (min-max). Device {rows[0]['device']}. "
            f"Rows: `{os.path.basename(cfg.results)}`.\n")
    name = "accuracy" if cfg.setting == "cpu" else f"accuracy_{cfg.setting}"
    with open(os.path.join(cfg.out, f"{name}.md"), "w") as f:
        f.write(md + note)
    print(md + note)
    plot(summary, os.path.join(cfg.out, f"{name}.png"))


def plot(summary, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    base = [s for s in summary if s["method"] == "baseline"]
    colors = plt.get_cmap("tab20").colors
    for i, method in enumerate(dict.fromkeys(s["method"] for s in summary if s["method"] != "baseline")):
        pts = sorted((s["flops"], s["acc"], s["std"]) for s in summary if s["method"] == method)
        theirs = method.startswith("tp-")
        shift = (i - 6) * 0.002  # keeps the error bars of methods at the same FLOPs apart
        ax.errorbar([p[0] + shift for p in pts], [p[1] for p in pts], yerr=[p[2] for p in pts], capsize=2,
                    linestyle="--" if theirs else "-", marker="s" if theirs else "o", markersize=4,
                    color=colors[(2 * i) % 20 if i < 10 else (2 * i + 1) % 20], label=method)
    if base:
        ax.axhline(base[0]["acc"], color="grey", linestyle=":", label=f"baseline ({base[0]['acc']:.2f} %)")
    ax.set_xlabel("FLOPs kept (fraction of ResNet-20)")
    ax.set_ylabel("test accuracy (%), mean ± std over seeds")
    ax.set_title("Fashion-MNIST, ResNet-20: accuracy vs FLOPs at an equal training budget")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
