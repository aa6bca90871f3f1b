"""Analysis + rewrite time of fxprune against Torch-Pruning, and ORT latency against FLOPs.

For each model: fxprune's ``analyze`` + L2 plan at ``--ratio`` + ``rewrite`` (no verification)
against Torch-Pruning's dependency-graph build + pruning step at the same ratio, the
median of ``--repeats`` runs each, alternated, in the same process; then the ONNX Runtime CPU latency
of fxprune's pruned model over the original's, next to its FLOPs ratio (we want the
latency ratio close to the FLOPs ratio).

    python tools/bench_speed.py                       # the five models of the benchmark issue
    python tools/bench_speed.py --models resnet50 --repeats 5
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
import torchvision
from tabulate import tabulate
from tqdm import tqdm

import fxprune
from fxprune.cost import count_flops
from fxprune.cost.latency import paired_medians, ort_session
from fxprune.io.onnx import write_onnx
from fxprune.passes import magnitude
from fxprune.rewrite import rewrite

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_pairs import publish  # noqa: E402

MODELS = ["resnet50", "densenet121", "mobilenet_v3_large", "efficientnet_b0", "regnet_y_1_6gf", "convnext_tiny",
          "vit_b_16"]


def ours(model, x, ratio):
    t = time.perf_counter()
    graph = fxprune.analyze(model, (x,))
    pruned = rewrite(graph, fxprune.make_plan(graph, magnitude.l2(graph), ratio=ratio))
    return time.perf_counter() - t, pruned


def theirs(model, x, ratio):
    import torch_pruning as tp

    model = copy.deepcopy(model)
    head = [m for m in model.modules() if isinstance(m, torch.nn.Linear)][-1:]
    t = time.perf_counter()
    pruner = tp.pruner.MetaPruner(model, x, importance=tp.importance.GroupMagnitudeImportance(p=2),
                                  pruning_ratio=ratio, ignored_layers=head)
    pruner.step()
    return time.perf_counter() - t, model


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", default=",".join(MODELS))
    p.add_argument("--ratio", type=float, default=0.5)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "speed.md"))
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = []
    for name in tqdm(args.models.split(","), desc="models", file=sys.stderr):
        model = torchvision.models.get_model(name, weights=None).eval()
        x = torch.randn(1, 3, 224, 224)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            times_ours, times_theirs, pruned = [], [], None
            for _ in range(args.repeats):  # alternated, so that both see the same machine load
                t, result = ours(model, x, args.ratio)
                times_ours.append(t)
                pruned = result if pruned is None else pruned
                if times_theirs is not None:
                    try:
                        times_theirs.append(theirs(model, x, args.ratio)[0])
                    except Exception as exc:  # Torch-Pruning fails on some models: say so
                        times_theirs = None
                        print(f"{name}: Torch-Pruning failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        t_ours = statistics.median(times_ours)
        t_theirs = statistics.median(times_theirs) if times_theirs else None
        flops_ratio = count_flops(pruned, (x,)) / count_flops(model, (x,))
        paths = [f"/tmp/fxprune_speed_{name}_{k}.onnx" for k in ("base", "pruned")]
        write_onnx(model, (x,), paths[0], dynamic_batch=False)  # latency at batch 1; ViT exports no dynamic batch
        write_onnx(pruned, (x,), paths[1], dynamic_batch=False)
        base_ms, cand_ms = paired_medians(ort_session(paths[0]), ort_session(paths[1]), (x,))
        rows.append((name, f"{t_ours:.2f}", "-" if t_theirs is None else f"{t_theirs:.2f}",
                     "-" if t_theirs is None else f"{t_theirs / t_ours:.1f}x", f"{flops_ratio:.1%}",
                     f"{base_ms:.1f} -> {cand_ms:.1f}", f"{cand_ms / base_ms:.1%}",
                     f"{(cand_ms / base_ms) / flops_ratio:.2f}"))
    head = ["model", "fxprune s", "Torch-Pruning s", "speed-up", "FLOPs kept", "ORT ms (b=1)", "latency kept",
            "latency / FLOPs"]
    text = tabulate(rows, headers=head, tablefmt="github")
    note = (f"\n\nratio={args.ratio} per group, L2; fxprune = analyze + plan + rewrite, Torch-Pruning = MetaPruner "
            f"build + step, alternated; median of {args.repeats} each; {args.threads} torch thread(s); ORT latency median, paired with the original.\n")
    publish(text + note, args.out)


if __name__ == "__main__":
    main()
