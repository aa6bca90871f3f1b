"""CATRO's feature-space formulation on digits: which feature point, pooling, data and order make it work?

scikit-learn's digits and the small residual CNN of ``tests/digits.py`` (trained 8 epochs, one base
model per seed). Each row cuts the base to the same FLOPs with one setting of ``catro.plan``
(``features="own"``: per-channel between/within-class scatter traces of pooled features, the
Dinkelbach trace-ratio iteration per group, groups shallow to deep) and reports test accuracy right
after the cut, after re-estimating the BN statistics on one pass over the training images
(``fxprune.train.recalibrate_bn``: isolates the choice of channels from the BN statistics the cut
leaves stale), and after one epoch of fine-tuning (batch 64, SGD lr 0.01). For reference: ``l2``,
``random`` and ``features="output"`` (the default: the trace ratio of the logits, backward
elimination).

    python tools/bench_catro_features.py                      # 3 seeds, 50 % and 25 % of the FLOPs
    python tools/bench_catro_features.py --seeds 0 --targets 0.5
    python tools/bench_catro_features.py --same-counts        # selection only: every row keeps CATRO's counts

``--same-counts`` separates the choice of channels within a group from the allocation across groups:
the keep counts of each group come from CATRO's plan (uniform allocation), and the channels are
CATRO's, the ``l2`` top ones, or random ones (3 draws per seed).
"""
from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import warnings

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))

import fxprune  # noqa: E402
from fxprune.train import recalibrate_bn  # noqa: E402
from digits import SmallResNet, accuracy, load, train  # noqa: E402

OWN = {"features": "own"}
SETTINGS = {
    "l2": None,
    "random": None,
    "output (default: logits' trace ratio)": {},
    "own, after BN+ReLU (the next layer's input)": dict(OWN),
    "own, after BN (before ReLU / add)": dict(OWN, point="normalized"),
    "own, conv output (before BN)": dict(OWN, point="produced"),
    "own, after BN+ReLU, 2x2 pooling": dict(OWN, pool_size=2),
    "own, after BN, 2x2 pooling": dict(OWN, point="normalized", pool_size=2),
    "own, after BN+ReLU, 64 per class": dict(OWN, samples_per_class=64),
    "own, after BN, 64 per class": dict(OWN, point="normalized", samples_per_class=64),
    "own, after BN+ReLU, not sequential (unpruned features)": dict(OWN, sequential=False),
    "own, after BN+ReLU, between-class trace only": dict(OWN, objective="between"),
}


def ms(v):
    return f"{statistics.mean(v):.3f} ± {statistics.stdev(v):.3f}" if len(v) > 1 else f"{v[0]:.3f}"


def same_counts(bases, data, target, batches):
    """Rows of the ``--same-counts`` table: CATRO's counts per group, three ways of choosing the channels."""
    from fxprune.passes import catro

    (xtr, ytr), (xte, yte) = data
    x1 = xtr[:1]
    rows: dict = {}
    for s, base in bases.items():
        graph = fxprune.analyze(base, (x1,))
        l2 = fxprune.passes.get("l2")(graph)
        plans = {f"CATRO ({f})": catro.plan(graph, data=(xtr, ytr), flops=target, features=f, progress=False).keep
                 for f in ("own", "output")}
        counts = {n: len(k) for n, k in plans["CATRO (own)"].items()}  # uniform allocation: the same for both
        plans["l2's top channels"] = {n: sorted(torch.argsort(-l2[n])[:k].tolist()) for n, k in counts.items()}
        for r in range(3):
            gen = torch.Generator().manual_seed(100 * s + r)
            plans[f"random channels {r}"] = {n: sorted(torch.randperm(graph.groups[n].size, generator=gen)[:k].tolist())
                                             for n, k in counts.items()}
        if any(len(v) != counts[n] for n, v in plans["CATRO (output)"].items()):
            raise RuntimeError("CATRO's two feature spaces allocated different counts")
        for name, keep in plans.items():
            plan = fxprune.Plan(keep, {n: graph.groups[n].size for n in keep}, {"method": name})
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                cut = fxprune.apply(base, (x1,), plan, onnx=False)
            key = "random channels (3 draws per seed)" if name.startswith("random") else name
            rows.setdefault(key, []).append((accuracy(cut, xte, yte),
                                             accuracy(recalibrate_bn(cut, batches), xte, yte)))
    print(f"\n### Same keep counts per group (CATRO's uniform allocation at {target:.0%} of the FLOPs), "
          "different channels\n")
    print("| channels kept in each group | right after the cut | + BN re-estimation |")
    print("|---|---|---|")
    for name, v in rows.items():
        print(f"| {name} | {ms([a for a, _ in v])} | {ms([b for _, b in v])} |", flush=True)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--targets", default="0.5,0.25")
    p.add_argument("--same-counts", action="store_true", help="only the table with CATRO's counts per group")
    cfg = p.parse_args(argv)
    torch.set_num_threads(1)
    (xtr, ytr), (xte, yte) = load()
    x1 = xtr[:1]
    batches = [xtr[i:i + 64] for i in range(0, len(xtr), 64)]
    seeds = [int(s) for s in cfg.seeds.split(",")]
    bases = {}
    for s in seeds:
        torch.manual_seed(s)
        bases[s] = train(SmallResNet(), xtr, ytr, epochs=8, seed=s)
    print(f"base accuracy {ms([accuracy(b, xte, yte) for b in bases.values()])} (seeds {seeds}; digits, "
          f"{len(ytr)} training and {len(yte)} test images)\n")
    if cfg.same_counts:
        for target in (float(t) for t in cfg.targets.split(",")):
            same_counts(bases, ((xtr, ytr), (xte, yte)), target, batches)
        return
    print("| FLOPs kept | selection | right after the cut | + BN re-estimation | + 1 epoch of fine-tuning |")
    print("|---|---|---|---|---|")
    for target in (float(t) for t in cfg.targets.split(",")):
        for name, options in SETTINGS.items():
            kept, cut_acc, bn_acc, ft_acc = [], [], [], []
            for s in seeds:
                method = name if options is None else "catro"
                extra = {} if options is None else {"data": (xtr, ytr),
                                                    "method_options": dict(options, progress=False)}
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    cut = fxprune.compile(bases[s], (x1,), method=method, flops=target, round_to=None, onnx=False,
                                          seed=s, **extra)
                rep = fxprune.report(cut)
                kept.append(rep.flops_after / rep.flops_before)
                cut_acc.append(accuracy(cut, xte, yte))
                bn_acc.append(accuracy(recalibrate_bn(cut, batches), xte, yte))
                ft = train(copy.deepcopy(cut), xtr, ytr, epochs=1, lr=0.01, seed=s)
                ft_acc.append(accuracy(ft, xte, yte))
            print(f"| {ms(kept)} | {name} | {ms(cut_acc)} | {ms(bn_acc)} | {ms(ft_acc)} |", flush=True)


if __name__ == "__main__":
    main()
