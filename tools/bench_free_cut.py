"""Is the cut of the training-time methods free? Accuracy right before and right after the cut, on digits.

scikit-learn's digits and the small residual CNN of ``tests/digits.py`` (trained 8 epochs), one
seed per base model. Each training-time method runs as the README's recipe says, for ``--epochs``
epochs (SGD lr 0.05, momentum 0.9 for the regularizers; GSM lr 5e-3, momentum 0.98), then
``fxprune.compile(method=..., flops=target)``; "before" is the trained model, "after" the cut one,
no fine-tuning. Rows marked "paper" use the papers' settings (regularizers without ``flops=``, GSM
with ``keep=target`` and ``grow=0``). For reference: ``random`` and ``l2`` cuts of the base, and
``l2`` fine-tuned for the same number of epochs after its cut (the budget a baseline gets). With ``--bn``,
a last column: the cut model with its BN running statistics re-estimated on one pass over the training
images (:func:`fxprune.train.recalibrate_bn`; weights untouched; for "+ fine-tune" rows, after the
fine-tuning). Every cut plans without rounding (``round_to=None``) so that all meet the same FLOPs, and so
do the regularizers' and GSM's schedules (they round as the cut does); ``--defaults`` runs the README recipe
exactly as written instead, schedules and cuts on ``compile``'s default rounding (the fast counts).

With ``--fmnist``: ResNet-20 of ``tools/bench_accuracy.py`` on Fashion-MNIST instead (base: 3 epochs
of 8000 samples, lr 0.1 cosine; each method 2 epochs of 8000 samples, lr 0.05 cosine, ``lam=5e-4``;
2000 test images; one base per seed), rows appended to ``results/free_cut_fmnist.jsonl`` and the table of
``results/free_cut_fmnist.md`` printed from every seed there.

    python tools/bench_free_cut.py                     # 3 seeds, 50 % and 25 % of the FLOPs, ~3 min
    python tools/bench_free_cut.py --seeds 0 --targets 0.5
    python tools/bench_free_cut.py --bn                # and a column with BN statistics re-estimated after the cut
    python tools/bench_free_cut.py --defaults --methods dwgl,oicsr,gsm   # the recipe with compile's default rounding
    python tools/bench_free_cut.py --fmnist --seeds 0  # ~15 min a seed on a quiet core; seeds may run side by side
    python tools/bench_free_cut.py --fmnist --table-only
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
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import fxprune  # noqa: E402
from fxprune.passes import dwgl, gsm, oicsr  # noqa: E402
from fxprune.train import recalibrate_bn  # noqa: E402
from digits import SmallResNet, accuracy, load, train  # noqa: E402


# every schedule and every cut: unrounded, so that all meet the same FLOPs; --defaults: compile's default
ROUNDING: dict = {"round_to": None}


def run(method, base, graph, target, data, epochs, seed, bn=False):
    """(accuracy before the cut, accuracy right after it, FLOPs kept, accuracy after BN re-estimation) for one
    method; the last is None unless ``bn``."""
    (xtr, ytr), (xte, yte) = data
    x1 = xtr[:1]
    model = copy.deepcopy(base)
    name, _, setting = method.partition(" ")
    paper = setting == "(paper)"
    if name in ("dwgl", "oicsr"):
        cls = dwgl.Regularizer if name == "dwgl" else oicsr.Regularizer
        reg = cls(graph, lam=1e-4) if paper else cls(graph, lam=1e-4, flops=target, **ROUNDING)
        train(model, xtr, ytr, epochs=epochs, extra_loss=reg, seed=seed)
    elif name == "gsm":
        budget = {"keep": target, "grow": 0} if paper else {"flops": target, **ROUNDING}
        opt = gsm.GSM(model.named_parameters(), graph=graph, lr=5e-3, momentum=0.98, **budget)
        train(model, xtr, ytr, epochs=epochs, optimizer=opt, seed=seed)
    before = accuracy(model, xte, yte)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pruned = fxprune.compile(model, (x1,), method=name, flops=target, **ROUNDING, onnx=False, seed=seed)
    after = accuracy(pruned, xte, yte)
    if setting == "+ fine-tune":
        train(pruned, xtr, ytr, epochs=epochs, seed=seed)
        after = accuracy(pruned, xte, yte)
    rep = fxprune.report(pruned)
    recal = None
    if bn:  # one pass over the training images, batches of 64, weights untouched
        recal = accuracy(recalibrate_bn(pruned, [xtr[i:i + 64] for i in range(0, len(xtr), 64)]), xte, yte)
    return before, after, rep.flops_after / rep.flops_before, recal


FMNIST_CACHE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "free_cut_fmnist.jsonl")
FMNIST_DEFAULTS = FMNIST_CACHE.replace(".jsonl", "_defaults.jsonl")   # --fmnist --defaults


def fmnist(targets, seeds, methods=("dwgl", "oicsr", "gsm", "l2"), cache=FMNIST_CACHE):
    """Per seed: a ResNet-20 base (3 epochs of 8000 Fashion-MNIST samples, lr 0.1 cosine), then each method
    for 2 epochs of 8000 samples (lr 0.05 cosine, ``lam=5e-4``; the seed sets the data order and the
    initialisation) and its cut; each result appended to ``cache`` as one JSON line (runs of different
    seeds may share the file)."""
    import json

    from bench_accuracy import ResNet20, accuracy as acc, train as train_fm
    from fxprune.io.datasets import fashion_mnist

    (xtr, ytr), (xte, yte) = fashion_mnist()
    test, x1 = (xte[:2000], yte[:2000]), xtr[:1]
    for seed in seeds:
        torch.manual_seed(seed)
        base = train_fm(ResNet20(), (xtr, ytr), epochs=3, lr=0.1, samples=8000, seed=seed, device="cpu",
                        desc=f"base {seed}").eval()
        graph = fxprune.analyze(base, (x1,))
        base_acc = acc(base, test, "cpu")
        for target in targets:
            for name in methods:
                model = copy.deepcopy(base)
                if name == "gsm":
                    opt = gsm.GSM(model.named_parameters(), graph=graph, flops=target, lr=5e-3, momentum=0.98,
                                  **ROUNDING)
                    train_fm(model, (xtr, ytr), epochs=2, lr=0.05, samples=8000, seed=seed, device="cpu", optimizer=opt)
                elif name in ("dwgl", "oicsr"):
                    reg = (dwgl if name == "dwgl" else oicsr).Regularizer(graph, lam=5e-4, flops=target, **ROUNDING)
                    train_fm(model, (xtr, ytr), epochs=2, lr=0.05, samples=8000, seed=seed, device="cpu",
                             extra_loss=reg)
                before = acc(model, test, "cpu")
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    pruned = fxprune.compile(model, (x1,), method=name, flops=target, **ROUNDING, onnx=False)
                rep = fxprune.report(pruned)
                row = {"seed": seed, "target": target, "method": name, "base": base_acc, "before": before,
                       "after": acc(pruned, test, "cpu"), "flops": rep.flops_after / rep.flops_before}
                print(row, flush=True)
                with open(cache, "a") as f:
                    f.write(json.dumps(row) + "\n")


def fmnist_table(cache=FMNIST_CACHE) -> str:
    """The Markdown table of every result in ``cache``: mean ± std over seeds, and the largest drop."""
    import json

    rows = [json.loads(line) for line in open(cache) if line.strip()]

    def ms(v, scale=100, digits=2):
        v = [scale * x for x in v]
        return f"{statistics.mean(v):.{digits}f} ± {statistics.stdev(v):.{digits}f}" if len(v) > 1 else f"{v[0]:.{digits}f}"

    seeds = sorted({r["seed"] for r in rows})
    bases = {r["seed"]: r["base"] for r in rows}
    out = [f"Base accuracy {ms(list(bases.values()))} % over seeds {seeds}.", "",
           "| FLOPs kept | method | seeds | before the cut (%) | right after the cut (%) | drop, largest over seeds (points) |",
           "|---|---|---|---|---|---|"]
    keys = sorted({(r["target"], r["method"]) for r in rows}, key=lambda k: (-k[0], k[1]))
    for target, method in keys:
        rs = [r for r in rows if (r["target"], r["method"]) == (target, method)]
        drop = max(100 * (r["before"] - r["after"]) for r in rs)
        out.append(f"| {ms([r['flops'] for r in rs], 1, 3)} | {method} | {len(rs)} | {ms([r['before'] for r in rs])} | "
                   f"{ms([r['after'] for r in rs])} | {drop:+.2f} |")
    return "\n".join(out)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--targets", default="0.5,0.25")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--methods", default="random,l2,l2 + fine-tune,dwgl,dwgl (paper),oicsr,oicsr (paper),gsm,gsm (paper)")
    p.add_argument("--bn", action="store_true", help="add a column: right after the cut, BN statistics re-estimated "
                   "(fxprune.train.recalibrate_bn, one pass over the training images)")
    p.add_argument("--fmnist", action="store_true", help="Fashion-MNIST ResNet-20 instead of digits (rows appended "
                   "to results/free_cut_fmnist.jsonl; --table-only prints the table of every seed there)")
    p.add_argument("--table-only", action="store_true", help="with --fmnist: only print the table from the results")
    p.add_argument("--defaults", action="store_true", help="the README recipe exactly as written: schedules and cuts "
                   "with compile's default rounding (the fast counts), not unrounded")
    cfg = p.parse_args(argv)
    if cfg.defaults:
        ROUNDING.clear()
    torch.set_num_threads(1)
    if cfg.fmnist:
        cache = FMNIST_DEFAULTS if cfg.defaults else FMNIST_CACHE
        if not cfg.table_only:
            fmnist([float(t) for t in cfg.targets.split(",")], [int(x) for x in cfg.seeds.split(",")], cache=cache)
        return print(fmnist_table(cache))
    data = load()
    (xtr, ytr), (xte, yte) = data
    seeds = [int(s) for s in cfg.seeds.split(",")]
    bases = {}
    for seed in seeds:
        torch.manual_seed(seed)
        bases[seed] = train(SmallResNet(), xtr, ytr, epochs=8, seed=seed)
    graph = fxprune.analyze(bases[seeds[0]], (xtr[:1],))
    base_acc = [accuracy(b, xte, yte) for b in bases.values()]

    def ms(v):
        return f"{statistics.mean(v):.3f} ± {statistics.stdev(v):.3f}" if len(v) > 1 else f"{v[0]:.3f}"

    print(f"base accuracy {ms(base_acc)} over seeds {seeds}; {cfg.epochs} epochs of training or fine-tuning\n")
    extra = " + BN re-estimation |" if cfg.bn else ""
    print("| FLOPs kept | method | before the cut | right after the cut | gap (max over seeds) |" + extra)
    print("|---|---|---|---|---|" + ("---|" if cfg.bn else ""))
    for target in (float(t) for t in cfg.targets.split(",")):
        for method in cfg.methods.split(","):
            res = [run(method, bases[s], graph, target, data, cfg.epochs, s, bn=cfg.bn) for s in seeds]
            before = [r[0] for r in res] if method.split()[0] in ("dwgl", "oicsr", "gsm") else base_acc
            after = [r[1] for r in res]
            gap = max(b - a for b, a in zip(before, after))
            recal = f" {ms([r[3] for r in res])} |" if cfg.bn else ""
            print(f"| {max(r[2] for r in res):.3f} | {method} | {ms(before)} | {ms(after)} | {gap:+.3f} |{recal}",
                  flush=True)


if __name__ == "__main__":
    main()
