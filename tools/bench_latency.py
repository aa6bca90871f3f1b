"""ONNX Runtime latency of pruned models: the measured latency model's error, and plans that run fast.

    python tools/bench_latency.py --check             # predicted vs measured latency, unpruned and flops=0.5
    python tools/bench_latency.py                     # latency ratio table: no rounding, round_to=8, defaults, importance ranking, latency=0.5
    python tools/bench_latency.py --configs defaults "importance ranking" --rounds 9   # the defaults' two rankings
    python tools/bench_latency.py --breakdown         # where the time goes: ORT kernel ms per op kind, original vs defaults
    python tools/bench_latency.py --scan --rounds 7 --repeats 35   # the defaults on 56 more torchvision and timm models (20 min)

``defaults`` is ``fxprune.compile(model, (x,), method="l2", flops=0.5)`` with nothing else given (round_to
defaults to fast counts for these convolutional models, and channels are ranked latency-weighted);
``importance ranking`` is the same ranked by importance alone (``latency_options={"ranking": "importance"}``,
the defaults until the ranking became latency-weighted); ``latency=0.5`` is ``compile(..., latency=0.5)``:
planned on the latency model (channels ranked latency-weighted, fast counts), each plan measured against the
original and re-planned from the misses until one measures within ``[0.45, 0.48]`` of its latency (at ``--threads``).

Latency is ORT CPU, batch 1, ``--threads`` intra-op threads (default 2). Two figures per model:
``wall`` is the median wall time of ``session.run``; ``kernel`` sums each node's fastest kernel time
from ORT's profiler (what the latency table measures per op: on a shared machine, other processes
only ever add time, so the minimum is the quiet machine's figure). Ratios pair each candidate with
the original in alternating rounds (``--rounds``), each round a loop of its own per session; the
table gives the median ratio over rounds and its spread (min-max).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import warnings

import numpy as np
import torch
import torchvision
from tabulate import tabulate

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import fxprune  # noqa: E402
from fxprune import passes  # noqa: E402
from fxprune.io.onnx import write_onnx  # noqa: E402
from fxprune.cost.latency import ort_session, run_times as _times  # noqa: E402
from fxprune.cost.latency_table import LatencyModel, profile_session  # noqa: E402
from fxprune.plan import make_plan  # noqa: E402
from fxprune.rewrite import rewrite  # noqa: E402

MODELS = ["resnet50", "mobilenet_v3_large", "efficientnet_b0", "regnet_y_400mf", "densenet121"]


def load(name):
    """A torchvision classifier by name, or a timm one as ``timm:NAME`` (random weights, seed 0)."""
    torch.manual_seed(0)
    if name.startswith("timm:"):
        import timm
        return timm.create_model(name[len("timm:"):], pretrained=False).eval()
    return getattr(torchvision.models, name)(weights=None).eval()


# --scan: families the five above do not cover (torchvision, and timm as ``timm:NAME``)
SCAN_MODELS = (
    "resnet18 resnet34 resnet101 resnext50_32x4d wide_resnet50_2 mobilenet_v2 mobilenet_v3_small mnasnet0_5 "
    "mnasnet1_0 shufflenet_v2_x0_5 shufflenet_v2_x2_0 squeezenet1_1 googlenet inception_v3 densenet169 "
    "efficientnet_b1 efficientnet_v2_s regnet_x_400mf regnet_y_800mf regnet_x_1_6gf convnext_tiny vgg11_bn alexnet "
    "swin_t vit_b_32 maxvit_t").split() + ["timm:" + n for n in (
        "resnet18d resnext26ts mobilenetv2_100 mixnet_m regnety_004 regnetz_b16 cs3darknet_s cspdarknet53 "
        "ese_vovnet19b_dw dla34 hrnet_w18_small repvgg_a0 fbnetc_100 semnasnet_100 lcnet_050 tinynet_b resnet26t "
        "seresnext26d_32x4d res2next50 dpn68 convnextv2_atto levit_128s efficientvit_b0 fastvit_t8 mobilevitv2_050 "
        "edgenext_xx_small poolformer_s12 ghostnetv2_100 rexnet_100 efficientnet_es").split()]


def input_size(name, model) -> int:
    """The side of the example image: timm's default input size, 299 for inception_v3, else 224."""
    if name.startswith("timm:"):
        return model.default_cfg.get("input_size", (3, 224, 224))[-1]
    return 299 if name == "inception_v3" else 224


def scan_one(name, args) -> dict:
    """The defaults (``compile(model, x, method="l2", flops=0.5)``, nothing else) against the original."""
    from fxprune.cost import count_flops
    from fxprune.cost.latency import compare_latency

    os.environ.pop("FXPRUNE_ROUND_TO", None)   # the defaults as a user gets them
    model = load(name)
    side = input_size(name, model)
    x = torch.randn(1, 3, side, side)
    pruned = fxprune.compile(model, (x,), method="l2", flops=0.5, onnx=False, verify=False)
    row = compare_latency(model, pruned, (x,), batches=(1,), threads=args.threads, repeats=args.repeats,
                          rounds=args.rounds)[0]
    return dict(model=name, flops=count_flops(pruned, (x,)) / count_flops(model, (x,)), ratio=row["ratio"],
                lo=row["ratio_min"], hi=row["ratio_max"])


def scan(args):
    """Each model in a process of its own (memory, and ORT's threads start fresh), then one table."""
    rows = []
    for name in args.models:
        cmd = [sys.executable, __file__, "--scan-one", name, "--threads", str(args.threads), "--repeats",
               str(args.repeats), "--rounds", str(args.rounds)]
        out = subprocess.run(cmd, capture_output=True, text=True)
        lines = [line for line in out.stdout.splitlines() if line.startswith("{")]
        if not lines:
            print(f"{name}: failed\n{out.stderr[-2000:]}", flush=True)
            continue
        r = json.loads(lines[-1])
        rows.append([name, f"{r['flops']:.3f}", f"{r['ratio']:.3f}", f"{r['lo']:.3f}-{r['hi']:.3f}"])
        print(" ".join(rows[-1]), flush=True)
    print(tabulate(rows, headers=["model", "FLOPs kept", "ORT ratio (median)", "spread (min-max)"], tablefmt="github"))
    ratios = [float(r[2]) for r in rows]
    if ratios:
        print(f"{len(ratios)} models: {min(ratios):.3f}-{max(ratios):.3f}, median {statistics.median(ratios):.3f}, "
              f"geometric mean {float(np.exp(np.mean(np.log(ratios)))):.3f}, slower than the original: "
              f"{sum(r >= 1 for r in ratios)}")


def kernel_ms(path, threads, repeats=20):
    return sum(profile_session(path, threads, repeats=repeats, warmup=5).values())


def check(args):
    rows, errs = [], []
    x = torch.randn(1, 3, 224, 224)
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models:
            model = load(name)
            graph = fxprune.analyze(model, (x,))
            t0 = time.perf_counter()
            lm = LatencyModel(graph, threads=args.threads)
            build = time.perf_counter() - t0
            scores = passes.get("l2")(graph, data=None, seed=0)
            for label, plan in (("original", None), ("flops=0.5", make_plan(graph, scores, flops=0.5)),
                                ("flops=0.5 fast", make_plan(graph, scores, flops=0.5, round_to="fast",
                                                             latency_model=lm))):
                keep = np.ones(graph.num_channels, bool) if plan is None else plan.mask(graph).numpy()
                pred = lm.latency(keep)
                module = model if plan is None else rewrite(graph, plan)
                path = os.path.join(tmp, f"{name}.onnx")
                write_onnx(module, (x,), path, dynamic_batch=False)
                kern = kernel_ms(path, args.threads)
                sess = ort_session(path, args.threads)
                wall = statistics.median(_times(sess, (x,), args.repeats, 5))
                del sess
                err = pred / kern - 1
                errs.append(abs(err))
                rows.append((name, label, f"{build:.0f}", f"{pred:.2f}", f"{kern:.2f}", f"{100 * err:+.1f}%",
                             f"{wall:.2f}", f"{100 * (pred / wall - 1):+.1f}%"))
                print(rows[-1], flush=True)
    print(tabulate(rows, headers=["model", "plan", "model build s", "predicted ms", "kernel ms", "error",
                                  "wall ms", "vs wall"], tablefmt="github"))
    print(f"mean |error| vs kernel sum: {100 * statistics.mean(errs):.1f}%, max {100 * max(errs):.1f}%")


def kernel_nodes(path, threads, repeats=15, warmup=5):
    """``[(op type, input shapes, fastest kernel ms)]`` per ORT node, from its profiler."""
    import json

    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.intra_op_num_threads, opts.inter_op_num_threads, opts.log_severity_level = threads, 1, 3
    opts.enable_profiling = True
    with tempfile.TemporaryDirectory() as tmp:
        opts.profile_file_prefix = os.path.join(tmp, "prof")
        sess = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
        feed = {i.name: np.random.default_rng(0).standard_normal(i.shape).astype(np.float32) for i in sess.get_inputs()}
        for _ in range(warmup + repeats):
            sess.run(None, feed)
        with open(sess.end_profiling()) as f:
            events = json.load(f)
    nodes = {}
    for e in events:
        if e.get("cat") == "Node" and e.get("name", "").endswith("_kernel_time"):
            a = e.get("args", {})
            n = nodes.setdefault(e["name"], [a.get("op_name", ""), [list(d.values())[0] for d in a.get("input_type_shape", [])], []])
            n[2].append(e["dur"] / 1e3)
    return [(op, shapes, min(t[len(t) * warmup // (warmup + repeats):] or t)) for op, shapes, t in nodes.values()]


def node_kind(op, shapes):
    """An ORT node's kind, named as the latency model's terms are."""
    if op.startswith("Reorder"):
        return "reorder"
    if op in ("Conv", "FusedConv") and len(shapes) > 1 and len(shapes[0]) == 4:
        x, w = shapes[0], shapes[1]
        if x[2] * x[3] == 1:
            return "conv (SE, 1x1 input)"
        groups = x[1] // w[1] if w[1] and x[1] % w[1] == 0 else 1   # a blocked conv's input is padded to 16
        if groups < 2:
            return "conv"
        if w[1] == 1:   # a 1x1 depthwise conv is how ORT runs a BatchNorm with no conv before it to fold into
            return "bn" if w[2:] == [1, 1] else "dw"
        return "grouped"
    if op in ("MatMul", "FusedMatMul") and len(shapes) > 1 and len(shapes[0]) >= 4 and len(shapes[1]) >= 4:
        return "attn"   # a product of two activations: q k^T or (softmax) v
    return {"Gemm": "gemm", "MatMul": "gemm", "QuickGelu": "silu", "Mul": "mul_se", "ReduceMean": "gap",
            "GlobalAveragePool": "gap", "Concat": "concat", "MaxPool": "maxpool", "AveragePool": "avgpool",
            "Softmax": "attn", "LayerNormalization": "ln", "SkipLayerNormalization": "ln", "Gelu": "gelu",
            "BiasGelu": "gelu", "FastGelu": "gelu", "Add": "add"}.get(op, op)


def term_kind(t):
    if t.kind == "conv" and t.make(t.xs[0], t.ys[0]).h * t.make(t.xs[0], t.ys[0]).w == 1:
        return "conv (SE, 1x1 input)"
    return t.kind


def breakdown(args):
    """ORT kernel time per op kind, original vs the defaults' plan (flops=0.5), and the model's prediction."""
    from collections import defaultdict

    x = torch.randn(1, 3, 224, 224)
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models:
            model = load(name)
            graph = fxprune.analyze(model, (x,))
            lm = LatencyModel(graph, threads=args.threads, progress=False)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                os.environ.pop("FXPRUNE_ROUND_TO", None)   # the defaults as a user gets them
                plan = fxprune.report(fxprune.compile(model, (x,), method="l2", flops=0.5, verify=False,
                                                      onnx=False)).plan
            graph, lm = plan_graph(model, x, graph, lm, plan, args.threads)  # the graph the plan was made on
            cols = {}
            for label, p in (("original", None), ("defaults", plan)):
                keep = np.ones(graph.num_channels, bool) if p is None else p.mask(graph).numpy()
                pred = defaultdict(float)
                for t in lm.terms:
                    pred[term_kind(t)] += t(keep)
                path = os.path.join(tmp, f"{name}-{label}.onnx")
                write_onnx(model if p is None else rewrite(graph, p), (x,), path, dynamic_batch=False)
                cols[label] = (pred, path)
            runs = {label: [] for label in cols}
            for _ in range(max(1, args.rounds)):   # alternating; each node's fastest run over the rounds
                for label, (_, path) in cols.items():
                    runs[label].append(kernel_nodes(path, args.threads))
            rows = []
            meas = {}
            for label, rs in runs.items():
                m, n = defaultdict(float), defaultdict(int)
                for i, (op, shapes, _) in enumerate(rs[0]):
                    k = node_kind(op, shapes)
                    m[k] += min(r[i][2] for r in rs)
                    n[k] += 1
                meas[label] = (m, n)
            kinds = sorted(set().union(*(set(m) for m, _ in meas.values()), *(set(p) for p, _ in cols.values())))
            for k in kinds + ["total"]:
                if k == "total":
                    vals = [sum(meas[lb][0].values()) for lb in cols] + [sum(cols[lb][0].values()) for lb in cols]
                    nodes = [sum(meas[lb][1].values()) for lb in cols]
                else:
                    vals = [meas[lb][0].get(k, 0.0) for lb in cols] + [cols[lb][0].get(k, 0.0) for lb in cols]
                    nodes = [meas[lb][1].get(k, 0) for lb in cols]
                rows.append((name, k, f"{nodes[0]}/{nodes[1]}", f"{vals[0]:.3f}", f"{vals[1]:.3f}",
                             f"{vals[1] / vals[0]:.2f}" if vals[0] > 0 else "-", f"{vals[2]:.3f}", f"{vals[3]:.3f}",
                             f"{vals[3] / vals[2]:.2f}" if vals[2] > 0 else "-"))
            print(tabulate(rows, headers=["model", "op kind", "ORT nodes", "kernel ms original", "kernel ms defaults",
                                          "ratio", "predicted original", "predicted defaults", "ratio"],
                           tablefmt="github"), flush=True)


def configs(model, x, graph, scores, threads):
    def compiled(**kw):
        os.environ.pop("FXPRUNE_ROUND_TO", None)   # the defaults as a user gets them
        pruned = fxprune.compile(model, (x,), method="l2", verify=False, onnx=False, **kw)
        rep = fxprune.report(pruned)
        if rep.search:   # latency=: the plans the search measured
            print(f"  searches ({rep.plan.meta['ranking']} ranking): " + ", ".join(
                (f"predicted {r['predicted']:.3f}" if "predicted" in r else f"FLOPs {r['flops']:.3f}")
                + f" -> measured {r['ratio']:.3f}" for r in rep.search), flush=True)
        return rep.plan

    return {
        "no rounding": lambda: make_plan(graph, scores, flops=0.5),
        "round_to=8": lambda: make_plan(graph, scores, flops=0.5, round_to=8),
        "defaults": lambda: compiled(flops=0.5),
        "importance ranking": lambda: compiled(flops=0.5, latency_options={"ranking": "importance"}),
        "latency=0.5": lambda: compiled(latency=0.5, latency_options={"threads": threads, "repeats": 20}),
    }


def plan_graph(model, x, graph, lm, plan, threads):
    """The channel graph a plan was made on, and its latency model: ``graph`` and ``lm`` unless the defaults
    (``groups="auto"``) took whole groups of the grouped convs on ORT's block."""
    groups = plan.meta.get("groups", "balanced")
    if groups == "balanced":
        return graph, lm
    g = fxprune.Pipeline(model, (x,), groups=groups, block=plan.meta.get("block")).graph
    return g, LatencyModel(g, threads=threads, progress=False)


def ratios(args):
    x = torch.randn(1, 3, 224, 224)
    rows, per_cfg = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models:
            model = load(name)
            graph = fxprune.analyze(model, (x,))
            lm = LatencyModel(graph, threads=args.threads)
            scores = passes.get("l2")(graph, data=None, seed=0)
            base_path = os.path.join(tmp, f"{name}.onnx")
            write_onnx(model, (x,), base_path, dynamic_batch=False)
            base = ort_session(base_path, args.threads)
            for cfg, planner in configs(model, x, graph, scores, args.threads).items():
                if args.configs and cfg not in args.configs:
                    continue
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    plan = planner()
                g, g_lm = plan_graph(model, x, graph, lm, plan, args.threads)
                keep = plan.mask(g).numpy()
                path = os.path.join(tmp, f"{name}-{cfg}.onnx")
                write_onnx(rewrite(g, plan), (x,), path, dynamic_batch=False)
                cand = ort_session(path, args.threads)
                rs, ks = [], []
                for _ in range(args.rounds):   # alternating rounds, each a loop of its own per session
                    a = statistics.median(_times(base, (x,), args.repeats, 3))
                    b = statistics.median(_times(cand, (x,), args.repeats, 3))
                    rs.append(b / a)
                for _ in range(max(1, args.rounds // 2)):   # kernel sums, alternating too
                    ks.append(kernel_ms(path, args.threads, 10) / kernel_ms(base_path, args.threads, 10))
                del cand
                kr = statistics.median(ks)
                med = statistics.median(rs)
                per_cfg.setdefault(cfg, []).append(med)
                cost = fxprune.cost.CostModel(g)
                rows.append((name, cfg, f"{cost.flops(keep) / cost.base_flops:.3f}", f"{med:.3f}",
                             f"{min(rs):.3f}-{max(rs):.3f}", f"{kr:.3f}", f"{g_lm.latency(keep) / g_lm.base:.3f}"))
                print(rows[-1], flush=True)
            del base
    print(tabulate(rows, headers=["model", "plan", "FLOPs kept", "ORT ratio (median)", "spread (min-max)",
                                  "kernel-sum ratio", "predicted ratio"], tablefmt="github"))
    for cfg, rs in per_cfg.items():
        print(f"{cfg}: geometric mean ratio {float(np.exp(np.mean(np.log(rs)))):.3f}")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--check", action="store_true", help="predicted vs measured latency")
    ap.add_argument("--breakdown", action="store_true", help="kernel ms per op kind, original vs defaults")
    ap.add_argument("--scan", action="store_true", help="the defaults on SCAN_MODELS (or --models), side by side")
    ap.add_argument("--scan-one", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--models", nargs="*", default=None)
    ap.add_argument("--configs", nargs="*", default=None)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.scan_one:
        print(json.dumps(scan_one(args.scan_one, args)))
        return
    if args.models is None:
        args.models = SCAN_MODELS if args.scan else MODELS
    if args.scan:
        scan(args)
    else:
        check(args) if args.check else breakdown(args) if args.breakdown else ratios(args)


if __name__ == "__main__":
    main()
