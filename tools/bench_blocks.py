"""Balanced blocks against tied positions, on Fashion-MNIST: does letting each block choose its own
positions (channel shuffle halves, grouped-convolution groups, attention heads) prune better than
tying position ``j`` of every block together?

Three small networks, each built around one structure, are trained from scratch on Fashion-MNIST,
then pruned by ``l2`` to the same FLOPs fraction twice: with fxprune's balanced blocks (the default)
and with every balance constraint replaced by the tie the analysis made before (position ``j`` of
each block is one channel). Accuracy right after the cut and after the same short fine-tune, over
seeds, mean ± std. Writes ``blocks.md`` and ``blocks.json`` under ``--out``.

    python tools/bench_blocks.py                 # 3 seeds, about 15 minutes on 2 CPU cores
    python tools/bench_blocks.py --seeds 1 --samples 5000 --epochs 1   # a quick look
    python tools/bench_blocks.py --models vit --name blocks_heads    # the ViT only, with whole heads too

The ViT is also pruned with whole heads (``heads="whole"``: each head kept or removed whole, ``head_dim``
intact), a third variant at the same FLOPs budget. Counts are not rounded (`round_to=None`), so every variant
meets the budget as closely as its structure allows.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F
from tabulate import tabulate

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import fxprune  # noqa: E402
from fxprune.couple.analysis import Context  # noqa: E402
from fxprune.io.datasets import fashion_mnist  # noqa: E402
from fxprune.ops import shape  # noqa: E402
from bench_accuracy import accuracy, train  # noqa: E402


def cbr(cin, cout, k=3, stride=1, groups=1):
    return nn.Sequential(nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False), nn.BatchNorm2d(cout),
                         nn.ReLU())


class ShuffleUnit(nn.Module):
    """ShuffleNetV2's unit: half the channels pass, half go through a branch, then a channel shuffle."""

    def __init__(self, c):
        super().__init__()
        h = c // 2
        self.branch = nn.Sequential(cbr(h, h, 1), nn.Conv2d(h, h, 3, 1, 1, groups=h, bias=False), nn.BatchNorm2d(h),
                                    cbr(h, h, 1))

    def forward(self, x):
        a, b = x.chunk(2, dim=1)
        y = torch.cat([a, self.branch(b)], 1)
        n, c, hh, w = y.shape
        return y.view(n, 2, c // 2, hh, w).transpose(1, 2).reshape(n, c, hh, w)


class ShuffleNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = cbr(1, 32, 3, 2)
        self.units = nn.Sequential(ShuffleUnit(32), ShuffleUnit(32), cbr(32, 64, 3, 2), ShuffleUnit(64), ShuffleUnit(64))
        self.fc = nn.Linear(64, 10)

    def forward(self, x):
        return self.fc(self.units(self.stem(x)).mean((2, 3)))


class GroupedBlock(nn.Module):
    """ResNeXt's block: 1x1, a 3x3 convolution in 4 groups, 1x1, a residual add."""

    def __init__(self, c, inner=32, groups=4):
        super().__init__()
        self.body = nn.Sequential(cbr(c, inner, 1), cbr(inner, inner, 3, groups=groups),
                                  nn.Conv2d(inner, c, 1, bias=False), nn.BatchNorm2d(c))

    def forward(self, x):
        return F.relu(x + self.body(x))


class ResNeXt(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = cbr(1, 32, 3, 2)
        self.blocks = nn.Sequential(GroupedBlock(32), GroupedBlock(32), cbr(32, 48, 3, 2), GroupedBlock(48, 48))
        self.fc = nn.Linear(48, 10)

    def forward(self, x):
        return self.fc(self.blocks(self.stem(x)).mean((2, 3)))


class HeadsBlock(nn.Module):
    """Attention written by hand: separate q/k/v, 4 heads split by ``view``, scaled_dot_product_attention."""

    def __init__(self, c=48, heads=4):
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(c), nn.LayerNorm(c)
        self.q, self.k, self.v, self.o = (nn.Linear(c, c) for _ in range(4))
        self.mlp = nn.Sequential(nn.Linear(c, 2 * c), nn.GELU(), nn.Linear(2 * c, c))

    def forward(self, t):
        b, n, c = t.shape
        h = self.norm1(t)
        q, k, v = (p(h).view(b, n, self.heads, -1).transpose(1, 2) for p in (self.q, self.k, self.v))
        a = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, -1)
        t = t + self.o(a)
        return t + self.mlp(self.norm2(t))


class TinyViT(nn.Module):
    def __init__(self, c=48):
        super().__init__()
        self.stem = nn.Sequential(cbr(1, 32, 3, 2), nn.Conv2d(32, c, 3, 2, 1))  # 7 x 7 tokens
        self.pos = nn.Parameter(torch.zeros(1, 49, c))
        self.blocks = nn.Sequential(HeadsBlock(c), HeadsBlock(c))
        self.fc = nn.Linear(c, 10)

    def forward(self, x):
        t = self.stem(x).flatten(2).transpose(1, 2) + self.pos
        return self.fc(self.blocks(t).mean(1))


MODELS = {"shufflenet (channel shuffle)": ShuffleNet, "resnext (groups=4)": ResNeXt,
          "vit (4 heads, by hand)": TinyViT}


@contextlib.contextmanager
def tied_blocks():
    """The analysis as it was before balanced blocks: each balance constraint becomes the tie of
    position ``j`` across its blocks, and a channel shuffle ties position ``j`` of each half instead
    of being a free permutation."""
    balance, permutation = Context.balance, shape.permutation

    def tie(self, blocks):
        self.unify(blocks[:1].expand_as(blocks), blocks, "position j of every block is one channel")

    Context.balance, shape.permutation = tie, lambda *args: False
    try:
        yield
    finally:
        Context.balance, shape.permutation = balance, permutation


def run(name, seed, cfg, train_data, test_data):
    torch.manual_seed(seed)
    model = MODELS[name]()
    train(model, train_data, epochs=cfg.epochs, lr=0.05, samples=cfg.samples, seed=seed, device="cpu", desc=name)
    x = train_data[0][:2]
    row = {"model": name, "seed": seed, "base": accuracy(model, test_data, "cpu")}
    heads = {"whole": "whole"} if name.startswith("vit") else {}
    for variant in ("balanced", "tied", *heads):
        with tied_blocks() if variant == "tied" else contextlib.nullcontext():
            pruned = fxprune.compile(model, (x,), method="l2", flops=cfg.flops, onnx=False, round_to=None,
                                     heads=heads.get(variant, "dims"))
        rep = fxprune.report(pruned)
        assert rep.mask["ok"], rep.mask
        with tied_blocks() if variant == "tied" else contextlib.nullcontext():
            graph = fxprune.analyze(model, (x,))
        free = sum(g.blocks is not None for g in graph.groups.values()) + \
            sum("fxprune_perm" in n.meta for n in graph.module.graph.nodes)
        row[variant] = {"cut": accuracy(pruned, test_data, "cpu"), "flops": rep.flops_after / rep.flops_before,
                        "params": rep.params_after, "free_structures": free}
        train(pruned, train_data, epochs=cfg.finetune, lr=0.01, samples=cfg.samples, seed=seed, device="cpu",
              desc=f"{name} {variant}")
        row[variant]["tuned"] = accuracy(pruned, test_data, "cpu")
    return row


def summary(rows):
    def ms(values):
        values = [100 * v for v in values]
        sd = statistics.stdev(values) if len(values) > 1 else 0.0
        return f"{statistics.mean(values):.2f} ± {sd:.2f}"

    table = []
    for name in MODELS:
        mine = [r for r in rows if r["model"] == name]
        if not mine:
            continue
        b, t = [r["balanced"] for r in mine], [r["tied"] for r in mine]
        w = [r["whole"] for r in mine if "whole" in r]
        table.append([name, ms([r["base"] for r in mine]), f'{b[0]["free_structures"]} / {t[0]["free_structures"]}',
                      f"{statistics.mean(r['flops'] for r in b):.3f} / {statistics.mean(r['flops'] for r in t):.3f}",
                      ms([r["cut"] for r in b]), ms([r["cut"] for r in t]),
                      ms([r["tuned"] for r in b]), ms([r["tuned"] for r in t])]
                     + ([f"{statistics.mean(r['flops'] for r in w):.3f}", ms([r["cut"] for r in w]),
                         ms([r["tuned"] for r in w])] if w else (["-"] * 3 if any("whole" in r for r in rows) else [])))
    whole = ["FLOPs kept (whole heads)", "cut: whole heads %", "tuned: whole heads %"]
    return tabulate(table, headers=["model", "trained %", "balanced groups + free shuffles (bal. / tied)", "FLOPs kept (bal. / tied)",
                                    "cut: balanced %", "cut: tied %", "tuned: balanced %", "tuned: tied %"]
                    + (whole if any("whole" in r for r in rows) else []), tablefmt="github")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--epochs", type=int, default=3, help="training epochs from scratch")
    p.add_argument("--finetune", type=int, default=1, help="fine-tuning epochs after the cut")
    p.add_argument("--samples", type=int, default=20000, help="training images per epoch")
    p.add_argument("--flops", type=float, default=0.5, help="FLOPs fraction kept")
    p.add_argument("--models", default=None, help="comma-separated name prefixes (default: all three)")
    p.add_argument("--name", default="blocks", help="file name of the results (.md, .json)")
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    cfg = p.parse_args(argv)
    warnings.simplefilter("ignore")
    torch.set_num_threads(1)
    train_data, test_data = fashion_mnist()
    names = [n for n in MODELS if cfg.models is None or any(n.startswith(m) for m in cfg.models.split(","))]
    rows = [run(name, seed, cfg, train_data, test_data) for seed in range(cfg.seeds) for name in names]
    text = summary(rows)
    print(text)
    with open(os.path.join(cfg.out, f"{cfg.name}.json"), "w") as f:
        json.dump({"config": vars(cfg), "rows": rows}, f, indent=1)
    with open(os.path.join(cfg.out, f"{cfg.name}.md"), "w") as f:
        models = f" --models {cfg.models} --name {cfg.name}" if cfg.models else ""
        f.write("# Balanced blocks against tied positions (Fashion-MNIST)\n\n"
                f"`python tools/bench_blocks.py --seeds {cfg.seeds} --epochs {cfg.epochs} --finetune {cfg.finetune} "
                f"--samples {cfg.samples} --flops {cfg.flops}{models}`: each network trained from scratch ({cfg.epochs} epochs "
                f"of {cfg.samples} images, SGD, cosine), pruned by `l2` to {cfg.flops:.0%} of its FLOPs with balanced "
                f"blocks and with position j tied across blocks, accuracy on the 10,000 test images right after the "
                f"cut and after {cfg.finetune} epoch(s) of fine-tuning (lr 0.01); mean ± std over {cfg.seeds} seeds.\n\n"
                + text + "\n")


if __name__ == "__main__":
    main()
