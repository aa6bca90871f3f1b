"""FLOPs kept under ``flops=0.5`` with and without the search's refill, and what it does to accuracy.

The budget search removes channels until the budget is met; with rounding, the step that meets it can
move a group by a whole rounding step and leave far less than asked. ``fxprune.plan.budget.refilled`` then
gives channels back, most important first, while the budget holds. This prints, per model, the FLOPs kept
by the defaults (``compile(model, x, method="l2", flops=0.5)``) without that step and with it, and with
``--accuracy`` fine-tunes both plans of the Fashion-MNIST nets of ``tools/bench_equal_latency.py`` the
same way (3 seeds, mean ± std).

    python tools/bench_refill.py                                   # FLOPs kept on the default model list
    python tools/bench_refill.py --models mobilenet_s resnet20 --accuracy   # and accuracy (about 10 min)

Models: torchvision names, ``timm:NAME`` (224x224, random weights) or ``mobilenet_s`` / ``resnet20``
(28x28x1).
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import os
import sys
import warnings
from unittest import mock

import torch
from tabulate import tabulate

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import fxprune  # noqa: E402
from bench_accuracy import accuracy, mean_std, train  # noqa: E402
from bench_equal_latency import MODELS as SMALL  # noqa: E402
from bench_latency import load  # noqa: E402
from fxprune.cost import count_flops, count_params  # noqa: E402
from fxprune.plan import budget  # noqa: E402

DEFAULT_MODELS = ["mobilenet_s", "resnet20", "resnet18", "mobilenet_v3_large", "efficientnet_b0", "densenet121",
                  "mnasnet1_0", "timm:ghostnet_100", "timm:repvit_m1", "timm:mixnet_s"]


def build(name):
    """``(model, example input)``: random weights, seed 0."""
    torch.manual_seed(0)
    if name in SMALL:
        return SMALL[name]().eval(), torch.randn(1, 1, 28, 28)
    return load(name), torch.randn(1, 3, 224, 224)


def pruned(model, x, refill: bool):
    """The defaults at ``flops=0.5``, with or without the refill step."""
    os.environ.pop("FXPRUNE_ROUND_TO", None)
    off = mock.patch.object(budget, "refilled", lambda groups, taken, counts, *args, **kw: counts)
    with warnings.catch_warnings(), (contextlib.nullcontext() if refill else off):
        warnings.simplefilter("ignore")
        return fxprune.compile(model, (x,), method="l2", flops=0.5, onnx=False, verify=False)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="*", default=DEFAULT_MODELS)
    ap.add_argument("--accuracy", action="store_true", help="fine-tune both plans (Fashion-MNIST nets only)")
    ap.add_argument("--seeds", type=int, default=3)
    args = ap.parse_args(argv)
    torch.set_num_threads(2)
    rows = []
    if args.accuracy:
        from fxprune.io.datasets import fashion_mnist
        (xtr, ytr), (xte, yte) = fashion_mnist()
        test = (xte[:2000], yte[:2000])
    for name in args.models:
        model, x = build(name)
        if args.accuracy and name in SMALL:
            model = train(model, (xtr, ytr), epochs=1, lr=0.1, samples=10000, seed=0, device="cpu", desc="baseline")
        base = count_flops(model, (x,))
        for refill in (False, True):
            p = pruned(model, x, refill)
            row = [name, "refill" if refill else "without", f"{count_flops(p, (x,)) / base:.3f}", f"{count_params(p):,}"]
            if args.accuracy and name in SMALL:
                accs = [100 * accuracy(train(copy.deepcopy(p), (xtr, ytr), epochs=1, lr=0.05, samples=5000, seed=s,
                                             device="cpu", desc="fine-tune"), test, "cpu") for s in range(args.seeds)]
                row.append("{:.2f} ± {:.2f}".format(*mean_std(accs)))
            rows.append(row)
            print(row, flush=True)
    head = ["model", "search", "FLOPs kept", "params"] + (["test acc % (mean ± std)"] if args.accuracy else [])
    print(tabulate(rows, headers=head, tablefmt="github"))


if __name__ == "__main__":
    main()
