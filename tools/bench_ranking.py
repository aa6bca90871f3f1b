"""The two rankings of a FLOPs budget on fast counts: latency-weighted (the default) against importance alone.

At ``flops=0.5`` (``compile(model, x, method="l2", flops=0.5)``, the defaults) channels are ranked by
importance over the square root of their group's predicted ORT latency per FLOP
(:func:`fxprune.plan.budget.latency_intensity`); ``latency_options={"ranking": "importance"}`` ranks by
importance alone. This prints, per model and ranking, the FLOPs and parameters kept and the ORT latency
ratio against the original, timed side by side (batch 1, ``--threads``; ``tools/bench_latency.py
--configs defaults "importance ranking"`` gives the same on the five torchvision models with its
kernel-sum column). With ``--accuracy`` the Fashion-MNIST nets of ``tools/bench_equal_latency.py``
(``resnet20``, ``mobilenet_s``) are trained once, pruned by each ranking and fine-tuned the same way for
``--seeds`` seeds (mean ± std), and timed at batch 1 and 64 after fine-tuning.

    python tools/bench_ranking.py --accuracy                          # the Fashion-MNIST nets (about 5 min)
    python tools/bench_ranking.py --models resnet50 mobilenet_v3_large   # 224x224, random weights, no accuracy
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
from tabulate import tabulate

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import fxprune  # noqa: E402
from bench_accuracy import accuracy, train  # noqa: E402
from bench_equal_latency import MODELS as SMALL  # noqa: E402
from bench_latency import load  # noqa: E402
from fxprune.cost import count_flops, count_params  # noqa: E402
from fxprune.cost.latency import compare_latency  # noqa: E402

RANKINGS = {"latency-weighted (default)": None, "importance": {"ranking": "importance"}}


def prune(model, x, options):
    os.environ.pop("FXPRUNE_ROUND_TO", None)   # the defaults as a user gets them
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fxprune.compile(model, (x,), method="l2", flops=0.5, onnx=False, latency_options=options)


def fmt(r):
    return f"{r['ratio']:.3f} ({r['ratio_min']:.3f}-{r['ratio_max']:.3f})"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="*", default=None, help="default: resnet20 mobilenet_s")
    ap.add_argument("--accuracy", action="store_true", help="train and fine-tune (Fashion-MNIST nets only)")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=100, help="timed runs per model and batch (5 rounds)")
    args = ap.parse_args(argv)
    models = args.models or list(SMALL)
    torch.set_num_threads(args.threads)
    data = None
    if args.accuracy:
        from fxprune.io.datasets import fashion_mnist
        (xtr, ytr), (xte, yte) = data = fashion_mnist()
        test = (xte[:2000], yte[:2000])
    rows, t0 = [], time.time()
    for name in models:
        small = name in SMALL
        torch.manual_seed(0)
        base = SMALL[name]() if small else load(name)
        x = torch.randn(1, 1, 28, 28) if small else torch.randn(1, 3, 224, 224)
        if args.accuracy:
            if not small:
                raise SystemExit(f"--accuracy takes the Fashion-MNIST nets ({', '.join(SMALL)}), not {name}")
            base = train(base, data[0], epochs=1, lr=0.1, samples=10000, seed=0, device="cpu", desc=f"{name} base")
            rows.append((name, "baseline", "1", f"{count_params(base):,}", "1", "1",
                         f"{100 * accuracy(base, test, 'cpu'):.2f}"))
        f0 = count_flops(base, (x,))
        for label, options in RANKINGS.items():
            pruned = prune(base, x, options)
            acc, tuned = "-", pruned
            if args.accuracy:
                accs = []
                for seed in range(args.seeds):
                    tuned = train(copy.deepcopy(pruned), data[0], epochs=1, lr=0.05, samples=5000, seed=seed,
                                  device="cpu", desc=f"{name} {label} seed {seed}")
                    accs.append(accuracy(tuned, test, "cpu"))
                acc = f"{100 * statistics.mean(accs):.2f} ± {100 * statistics.stdev(accs):.2f}" if len(accs) > 1 \
                    else f"{100 * accs[0]:.2f}"
            lat = compare_latency(base, tuned, (x,), batches=(1, 64) if small else (1,), threads=args.threads,
                                  repeats=args.repeats, rounds=5)
            rows.append((name, label, f"{count_flops(pruned, (x,)) / f0:.3f}", f"{count_params(pruned):,}",
                         fmt(lat[0]), fmt(lat[1]) if len(lat) > 1 else "-", acc))
            print(rows[-1], f"({time.time() - t0:.0f} s)", flush=True)
    print(tabulate(rows, headers=["model", "ranking", "FLOPs kept", "params", "ORT ratio b=1 (min-max)",
                                  "ORT ratio b=64 (min-max)", "test acc % (mean ± std)"], tablefmt="github"))


if __name__ == "__main__":
    main()
