"""Accuracy at equal ONNX Runtime latency on Fashion-MNIST: the latency planner versus a FLOPs budget.

For ResNet-20 (``tools/bench_accuracy.py``'s) and a small MobileNetV2-style net (inverted residual
blocks, depthwise 3x3 convs), both on 28x28x1 inputs: train a baseline once, then prune it to the
same ONNX Runtime CPU latency target (``--target`` × the original's, batch 1, 2 threads) three ways,
each with ``method="l2"`` and the default rounding (fast counts):

* ``latency planner`` (the default ranking, latency-weighted): ``fxprune.compile(model, x, latency=T)`` —
  channels ranked by importance over the square root of their group's predicted latency per FLOP, the
  latency budget fitted so that the exported model measures within ``[0.9, 0.96] × T``, every candidate
  timed against the original. A FLOPs budget on fast counts ranks the same way, so this is also the FLOPs
  budget at equal latency of the issue's comparison;
* ``importance ranking``: the same with ``latency_options={"ranking": "importance"}``: a FLOPs budget
  ranked by importance alone (the defaults before commit 55e4c9b), at equal latency;
* ``per-ms ranking``: the same with ``latency_options={"ranking": "per ms"}``: channels ranked by
  importance per millisecond of a measured per-op latency model (HALP's ranking), its plans measured
  against the original and corrected the same way.

Each pruned model is fine-tuned the same way for each of ``--seeds`` seeds (same epochs, samples,
SGD + cosine schedule, seed = data order), and its test accuracy reported as mean ± std. Latency of
every model (the baseline and each pruned one) is timed against the baseline side by side in ORT at
batch 1 and 64 (``fxprune.cost.latency.compare_latency``: alternating rounds, each a loop of its own).

    python tools/bench_equal_latency.py               # both models, 3 seeds (25 min on 2 CPU cores at a load of 4-5)
    python tools/bench_equal_latency.py --quick       # a smoke run: tiny training, 1 seed
"""
from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import time
import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F
from tabulate import tabulate

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import fxprune  # noqa: E402
from bench_accuracy import ResNet20, accuracy, train  # noqa: E402
from fxprune.cost import count_flops, count_params  # noqa: E402
from fxprune.cost.latency import compare_latency, history_table  # noqa: E402
from fxprune.io.datasets import fashion_mnist  # noqa: E402


class InvertedResidual(nn.Module):
    def __init__(self, cin, cout, stride, expand):
        super().__init__()
        mid = cin * expand
        self.use_res = stride == 1 and cin == cout
        self.body = nn.Sequential(
            nn.Conv2d(cin, mid, 1, bias=False), nn.BatchNorm2d(mid), nn.ReLU6(),
            nn.Conv2d(mid, mid, 3, stride, 1, groups=mid, bias=False), nn.BatchNorm2d(mid), nn.ReLU6(),
            nn.Conv2d(mid, cout, 1, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = self.body(x)
        return x + out if self.use_res else out


class MobileNetS(nn.Module):
    """A MobileNetV2-style net for 28x28x1: a stride-2 stem of 32, inverted residual blocks (expansion 4)
    of widths 32/48/96 at strides 1/2/2 (2, 2, 3 blocks), a 1x1 head of 256 channels."""

    def __init__(self, classes=10):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, 32, 3, 2, 1, bias=False), nn.BatchNorm2d(32), nn.ReLU6())
        blocks, cin = [], 32
        for cout, stride, n in ((32, 1, 2), (48, 2, 2), (96, 2, 3)):
            for i in range(n):
                blocks.append(InvertedResidual(cin, cout, stride if i == 0 else 1, 4))
                cin = cout
        self.blocks = nn.Sequential(*blocks)
        self.head = nn.Sequential(nn.Conv2d(cin, 256, 1, bias=False), nn.BatchNorm2d(256), nn.ReLU6())
        self.fc = nn.Linear(256, classes)

    def forward(self, x):
        x = self.head(self.blocks(self.stem(x)))
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


MODELS = {"resnet20": ResNet20, "mobilenet_s": MobileNetS}


ARMS = ("latency planner (latency-weighted ranking, default)", "importance ranking", "per-ms ranking")
RANKING = {"importance ranking": "importance", "per-ms ranking": "per ms"}


def prune(base, x1, target, arm, args):
    options = {"threads": args.threads, "repeats": args.search_repeats, "rounds": 3}
    if arm in RANKING:
        options["ranking"] = RANKING[arm]
    os.environ.pop("FXPRUNE_ROUND_TO", None)   # the defaults as a user gets them
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pruned = fxprune.compile(base, (x1,), method="l2", latency=target, onnx=False, latency_options=options)
    for w in caught:
        if "latency target" in str(w.message):
            print(f"  warning: {w.message}", flush=True)
    return pruned


def fmt_ratio(r):
    return f"{r['ratio']:.3f} ({r['ratio_min']:.3f}-{r['ratio_max']:.3f})"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="*", default=["resnet20", "mobilenet_s"])
    ap.add_argument("--arms", nargs="*", default=list(ARMS), choices=ARMS)
    ap.add_argument("--target", type=float, default=0.5, help="latency target, fraction of the baseline's (batch 1)")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--base-epochs", type=int, default=1)
    ap.add_argument("--base-samples", type=int, default=10000)
    ap.add_argument("--ft-epochs", type=int, default=1)
    ap.add_argument("--ft-samples", type=int, default=5000)
    ap.add_argument("--test-n", type=int, default=2000, help="test images (the first n)")
    ap.add_argument("--lr", type=float, default=0.05, help="fine-tuning learning rate (baseline: 0.1)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--search-repeats", type=int, default=40, help="timed runs per candidate in the searches")
    ap.add_argument("--repeats", type=int, default=100, help="timed runs per model and batch in the final table")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "equal_latency.md"))
    args = ap.parse_args(argv)
    if args.quick:
        args.seeds, args.base_epochs, args.base_samples, args.ft_epochs, args.ft_samples = 1, 1, 1000, 1, 500
        args.test_n = 500
        args.search_repeats, args.repeats = 20, 20
    torch.set_num_threads(args.threads)
    (xtr, ytr), (xte, yte) = fashion_mnist()
    test = (xte[:args.test_n], yte[:args.test_n])
    x1 = torch.randn(1, 1, 28, 28)
    rows, t_start = [], time.time()
    for name in args.models:
        torch.manual_seed(0)
        base = MODELS[name]()
        base = train(base, (xtr, ytr), epochs=args.base_epochs, lr=0.1, samples=args.base_samples, seed=0,
                     device="cpu", desc=f"{name} baseline")
        base_acc = accuracy(base, test, "cpu")
        f0, p0 = count_flops(base, (x1,)), count_params(base)
        print(f"{name}: baseline {base_acc:.4f} ({time.time() - t_start:.0f} s)", flush=True)
        rows.append((name, "baseline", "1.000", f"{p0:,}", "1 (reference)", "1 (reference)", f"{100 * base_acc:.2f}",
                     "-", "-"))
        for arm in args.arms:
            pruned = prune(base, x1, args.target, arm, args)
            rep = fxprune.report(pruned)
            meta = rep.plan.meta
            if rep.search:   # the search's steps, for the log
                print(f"{name} {arm}: search steps\n{history_table(rep.search)}", flush=True)
            accs, before = [], accuracy(pruned, test, "cpu")
            for seed in range(args.seeds):
                tuned = train(copy.deepcopy(pruned), (xtr, ytr), epochs=args.ft_epochs, lr=args.lr,
                              samples=args.ft_samples, seed=seed, device="cpu", desc=f"{name} {arm} seed {seed}")
                accs.append(accuracy(tuned, test, "cpu"))
            lat = compare_latency(base, tuned, (x1,), batches=(1, 64), threads=args.threads, repeats=args.repeats,
                                  rounds=5)
            mean = 100 * statistics.mean(accs)
            std = 100 * statistics.stdev(accs) if len(accs) > 1 else 0.0
            search = (f"predicted {meta['latency_budget']:.3f}" if "latency_budget" in meta
                      else f"FLOPs {meta['flops_budget']:.3f}")
            rows.append((name, arm, f"{count_flops(pruned, (x1,)) / f0:.3f}", f"{count_params(pruned):,}",
                         fmt_ratio(lat[0]), fmt_ratio(lat[1]), f"{mean:.2f} ± {std:.2f}", f"{100 * before:.2f}",
                         f"{search}, searched {meta['latency_ratio']:.3f}"))
            print(rows[-1], f"({time.time() - t_start:.0f} s)", flush=True)
        write(rows, args, t_start)


def write(rows, args, t_start):
    head = ["model", "pruned by", "FLOPs kept", "params", "ORT ratio b=1 (min-max)", "ORT ratio b=64 (min-max)",
            "test acc % (mean ± std)", "acc before fine-tune", "budget found, ratio in search"]
    table = tabulate(rows, headers=head, tablefmt="github")
    note = (f"\n\nFashion-MNIST, 28x28. Baseline: {args.base_epochs} epochs of {args.base_samples} training samples "
            f"(SGD momentum 0.9, nesterov, weight decay 5e-4, lr 0.1, cosine, batch 128, seed 0). Every "
            f"arm prunes the same baseline with l2 scores to a latency target of {args.target} × the baseline's "
            f"(ORT CPU, batch 1, {args.threads} threads, measured in the search), default rounding; each pruned model is "
            f"fine-tuned {args.ft_epochs} epochs of {args.ft_samples} samples (lr {args.lr}, cosine) with seeds "
            f"0..{args.seeds - 1} (data order); accuracy on the first {args.test_n} test images, mean ± sample std over seeds. "
            f"ORT ratios: pruned / baseline median over 5 alternating rounds of {args.repeats // 5} runs each, "
            f"{args.threads} threads, the spread is min-max over rounds (timed after fine-tuning, seed "
            f"{args.seeds - 1}). Total run time {time.time() - t_start:.0f} s.\n")
    print(table + note)
    if not args.quick:
        with open(args.out, "w") as f:
            f.write("# Accuracy at equal ONNX Runtime latency (tools/bench_equal_latency.py)\n\n" + table + note)


if __name__ == "__main__":
    main()
