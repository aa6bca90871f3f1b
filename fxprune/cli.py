"""The ``fxprune`` command line: ``prune``, ``inspect``, ``export`` and ``bench`` a model.

A model is named ``torchvision:<name>`` (built with ``weights=None``, its random weights drawn from seed 0),
``timm:<name>`` (``timm.create_model(name, pretrained=False)``, seed 0; timm installed) or
``module.path:factory`` (a callable returning an ``nn.Module``). The input shape
defaults to the model's native one for torchvision and timm models, else ``1,3,224,224``.
Models are traced in eval mode; ``--train-mode`` traces them in train mode, which keeps
branches that only run in training (GoogLeNet's and Inception-v3's auxiliary heads).

Example::

    $ fxprune prune torchvision:resnet18 --method l2 --flops 0.5 --out resnet18_pruned.onnx --save r18.pt
    $ fxprune prune torchvision:resnet18 --latency 0.5 --out resnet18_fast.onnx
    $ fxprune prune torchvision:resnet18 --flops 0.5 --output module --save r18_module.pt
    $ fxprune inspect torchvision:resnet18 --graph resnet18.svg
    $ fxprune export torchvision:resnet18 --load r18.pt --out resnet18_pruned.onnx
    $ fxprune bench torchvision:resnet18 --load r18.pt --batch 1 64 --threads 2
    $ fxprune prune timm:mobilevit_xxs --latency 0.5 --out mobilevit_fast.onnx
"""
from __future__ import annotations

import argparse
import importlib
import json
import sys
import warnings

import torch

from .api import DEFAULT, analyze, apply, compile
from .capture import TRACERS
from .couple import GROUPS, HEADS
from .cost import count_flops, count_params
from .cost.latency import compare_latency, compare_table, history_table
from .errors import FxPruneError
from .io.onnx import export_onnx, figures_table
from .io.save import load, save
from .view.inspect import graph_to_dot, group_rows, group_table, render
from .view.report import report


def load_model(spec: str) -> torch.nn.Module:
    """Build the model named by ``spec`` (see the module docstring), in eval mode."""
    if ":" not in spec:
        raise FxPruneError(f"model '{spec}' is not of the form torchvision:<name>, timm:<name> or module.path:factory")
    source, name = spec.split(":", 1)
    if source == "torchvision":
        import torchvision

        if name not in torchvision.models.list_models():
            raise FxPruneError(f"torchvision has no model '{name}'; see torchvision.models.list_models()")
        with torch.random.fork_rng(devices=[]):   # the same random weights every run: reproducible plans
            torch.manual_seed(0)
            return torchvision.models.get_model(name, weights=None).eval()
    if source == "timm":
        timm = _timm()
        if not timm.is_model(name):
            raise FxPruneError(f"timm has no model '{name}'; see timm.list_models()")
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            return timm.create_model(name, pretrained=False).eval()
    try:
        factory = getattr(importlib.import_module(source), name)
    except (ImportError, AttributeError) as exc:
        raise FxPruneError(f"cannot load '{spec}': {exc}") from exc
    model = factory()
    if not isinstance(model, torch.nn.Module):
        raise FxPruneError(f"'{spec}' returned a {type(model).__name__}, not a torch.nn.Module")
    return model.eval()


def _timm():
    try:
        import timm
    except ImportError as exc:
        raise FxPruneError("a timm:<name> model needs timm (pip install timm)") from exc
    return timm


def native_input_shape(spec: str) -> tuple:
    """The input shape a model expects: torchvision's weights metadata or timm's pretrained config, else
    1x3x224x224."""
    if spec.startswith("torchvision:"):
        import torchvision

        try:
            weights = torchvision.models.get_model_weights(spec.split(":", 1)[1]).DEFAULT
            crop = weights.transforms().crop_size
            crop = crop[0] if isinstance(crop, (list, tuple)) else crop
            return (1, 3, int(crop), int(crop))
        except Exception:  # models without registered weights
            pass
    if spec.startswith("timm:"):
        cfg = _timm().models.get_pretrained_cfg(spec.split(":", 1)[1])
        if cfg is not None and len(getattr(cfg, "input_size", ()) or ()) == 3:
            return (1, *cfg.input_size)
    return (1, 3, 224, 224)


def _shape(text: str) -> tuple:
    try:
        shape = tuple(int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--input-shape wants comma-separated integers, got '{text}'") from None
    if not shape or any(v <= 0 for v in shape):
        raise argparse.ArgumentTypeError(f"--input-shape wants positive sizes, got '{text}'")
    return shape


def _fraction(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got '{text}'") from None


MODEL_HELP = "torchvision:<name>, timm:<name> or module.path:factory"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fxprune", description="Structured pruning of PyTorch models, verified.")
    sub = parser.add_subparsers(dest="command", required=True)

    prune = sub.add_parser("prune", help="prune a model and export it to ONNX")
    prune.add_argument("model", help=MODEL_HELP)
    prune.add_argument("--method", default="l2", help="criterion (l1, l2, bn, taylor, random, ...)")
    budget = prune.add_mutually_exclusive_group(required=True)
    budget.add_argument("--ratio", type=_fraction, help="fraction of each group's channels removed")
    budget.add_argument("--flops", type=_fraction, help="fraction of the model's FLOPs kept")
    budget.add_argument("--params", type=_fraction, help="fraction of the model's parameters kept")
    budget.add_argument("--latency", type=_fraction,
                        help="fraction of the original's ONNX Runtime CPU latency allowed (searched, measured)")
    prune.add_argument("--round-to", type=_round_to, default=DEFAULT,
                       help="fast (counts ONNX Runtime runs well, measured; the default for convolutional models), "
                            "a multiple, or none")
    prune.add_argument("--input-shape", type=_shape, default=None, help="e.g. 1,3,224,224")
    prune.add_argument("--train-mode", action="store_true", help="trace in train mode (keeps auxiliary heads)")
    prune.add_argument("--capture", choices=TRACERS + ("parts",), default="auto",
                       help="tracer: symbolic_trace, else torch.export, else part by part (auto), or only one of them")
    prune.add_argument("--heads", choices=HEADS, default="dims",
                       help="attention heads lose dims, the same number per head (dims), or whole heads (whole: "
                            "keeps head_dim; for rotary embeddings and grouped-query attention)")
    prune.add_argument("--groups", choices=("auto",) + GROUPS, default="auto",
                       help="grouped convs lose the same number of channels per group (balanced), whole groups "
                            "(whole), whole groups where their widths are multiples of ORT's NCHWc block, 16 on AVX-512 and 8 on AVX2 (blocked), or blocked or "
                            "balanced, whichever the latency model predicts faster (auto)")
    prune.add_argument("--out", default=None, help="write the pruned model as ONNX to this path")
    prune.add_argument("--plan", default=None, help="write the plan as JSON to this path")
    prune.add_argument("--save", default=None, help="write plan + weights (fxprune.save) to this path")
    prune.add_argument("--no-verify", action="store_true", help="skip mask-equivalence and ONNX checks")
    prune.add_argument("--output", choices=("graph", "module"), default="graph",
                       help="graph: a torch.fx GraphModule (default); module: a pruned copy of the model, same "
                            "class (channels counted by literals in its code are kept)")
    prune.add_argument("--repeats", type=int, default=30, help="--latency: timed runs per candidate (median)")
    prune.add_argument("--steps", type=int, default=None,
                       help="--latency: candidates measured (default 6)")
    prune.add_argument("--latency-ranking", choices=("importance", "per-ms", "latency-weighted"), default=None,
                       help="how channels are ranked on the measured per-op latency model: --latency, and "
                            "--flops with the default fast counts, rank latency-weighted by default (importance "
                            "over the square root of the group's latency per FLOP); 'importance' ranks by importance "
                            "alone, 'per-ms' by importance per millisecond (HALP's ranking)")

    inspect = sub.add_parser("inspect", help="print the channel groups of a model, or draw its graph")
    inspect.add_argument("model", help=MODEL_HELP)
    inspect.add_argument("--input-shape", type=_shape, default=None, help="e.g. 1,3,224,224")
    inspect.add_argument("--train-mode", action="store_true", help="trace in train mode (keeps auxiliary heads)")
    inspect.add_argument("--capture", choices=TRACERS, default="auto",
                       help="tracer: symbolic_trace, else torch.export (auto), or only one of them")
    inspect.add_argument("--heads", choices=HEADS, default="dims", help="as prune --heads")
    inspect.add_argument("--groups", choices=GROUPS, default="balanced",
                         help="as prune --groups (auto chooses when planning: inspect one of the others)")
    inspect.add_argument("--json", action="store_true", help="print JSON instead of a table")
    inspect.add_argument("--output", choices=("graph", "module"), default="graph",
                         help="module: with the pins of prune --output module (literals in the model's code)")
    inspect.add_argument("--graph", default=None, metavar="PATH",
                         help="draw the graph, coloured by channel group, to PATH (.svg, .png, .pdf or .dot)")
    inspect.add_argument("--collapse", type=_collapse, default="auto",
                         help="auto (default), chains, none, or a module depth: how much to merge in --graph")

    export = sub.add_parser("export", help="export a model (or a pruned one) to ONNX, checked in ONNX Runtime")
    export.add_argument("model", help=MODEL_HELP + " (the original architecture)")
    source = export.add_mutually_exclusive_group()
    source.add_argument("--load", default=None, help="a file written by fxprune.save / prune --save")
    source.add_argument("--plan", default=None, help="a plan JSON written by prune --plan")
    export.add_argument("--out", required=True, help="the .onnx file to write")
    export.add_argument("--input-shape", type=_shape, default=None, help="e.g. 1,3,224,224")
    export.add_argument("--train-mode", action="store_true", help="trace in train mode (with --plan)")
    export.add_argument("--capture", choices=TRACERS, default="auto", help="tracer (with --plan)")
    export.add_argument("--no-verify", action="store_true", help="do not fail when ONNX Runtime disagrees")

    bench = sub.add_parser("bench", help="ONNX Runtime CPU latency of the original and a pruned model, side by side")
    bench.add_argument("model", help=MODEL_HELP + " (the original architecture)")
    pruned = bench.add_mutually_exclusive_group(required=True)
    pruned.add_argument("--load", default=None, help="a file written by fxprune.save / prune --save")
    pruned.add_argument("--plan", default=None, help="a plan JSON written by prune --plan")
    bench.add_argument("--input-shape", type=_shape, default=None, help="e.g. 1,3,224,224 (its batch is replaced)")
    bench.add_argument("--batch", type=int, nargs="+", default=[1], help="batch sizes to time (default 1)")
    bench.add_argument("--threads", type=int, default=2, help="ONNX Runtime intra-op threads (default 2)")
    bench.add_argument("--repeats", type=int, default=30, help="timed runs per model and batch size")
    bench.add_argument("--rounds", type=int, default=5, help="alternating rounds the runs are split into")
    bench.add_argument("--train-mode", action="store_true", help="trace in train mode (with --plan)")
    bench.add_argument("--capture", choices=TRACERS, default="auto", help="tracer (with --plan)")
    return parser


def _round_to(text: str):
    if text in ("fast", "none", DEFAULT):
        return None if text == "none" else text
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"--round-to wants fast, none or a positive multiple, got '{text}'")
    return value


def _collapse(text: str):
    if text in ("auto", "chains", "none"):
        return text
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"--collapse wants auto, chains, none or a depth >= 0, got '{text}'")
    return value


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return {"prune": _prune, "inspect": _inspect, "export": _export, "bench": _bench}[args.command](args)
    except FxPruneError as exc:
        print(f"fxprune: error: {exc}", file=sys.stderr)
        return 2


def _inputs(args):
    shape = args.input_shape or native_input_shape(args.model)
    return (torch.randn(shape),)


def _model(args):
    model = load_model(args.model)
    return model.train() if getattr(args, "train_mode", False) else model


def _prune(args) -> int:
    model = _model(args)
    inputs = _inputs(args)
    ranking = {"per-ms": "per ms"}.get(args.latency_ranking, args.latency_ranking)
    latency_options = None if ranking is None else {"ranking": ranking}
    if args.latency is not None:
        steps = args.steps or 6
        if args.repeats < 1 or steps < 1:
            raise FxPruneError(f"--repeats {args.repeats} and --steps {steps} must be at least 1")
        latency_options = {"steps": steps, "repeats": args.repeats, "progress": True, **(latency_options or {})}
        ranking = ranking or "latency-weighted"
        how = f"latency model, channels ranked by {'importance per ms' if ranking == 'per ms' else ranking}"
        print(f"searching a plan within {args.latency} × the original's ONNX Runtime CPU latency "
              f"({how}: at most {steps} candidates, at least {args.repeats} runs each in 5 alternating "
              "rounds, median of the rounds' ratios):", flush=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pruned = compile(model, inputs, method=args.method, ratio=args.ratio, flops=args.flops, params=args.params,
                         latency=args.latency, latency_options=latency_options, round_to=args.round_to,
                         verify=not args.no_verify, onnx=False, capture=args.capture, output=args.output,
                         heads=args.heads, groups=args.groups)
    for w in caught:
        if issubclass(w.category, UserWarning) and "fxprune" in str(w.filename):
            print(f"fxprune: warning: {w.message}", file=sys.stderr)
    rep = report(pruned)
    if rep.output == "parts":  # pruned part by part (fxprune.partial): one plan per part, no single graph
        print(rep)
        if args.out or args.plan or args.save:
            raise FxPruneError("the model was pruned part by part (no tracer captures it whole): --out, --plan and "
                               "--save are not available for such a model yet")
        return 0
    if rep.search is not None:
        print(history_table(rep.search) + "\n")
    if args.out:
        rep.onnx = export_onnx(pruned, inputs, args.out, check=not args.no_verify)
    print(rep)
    if args.latency is not None:
        meta = rep.plan.meta
        budget = (f"FLOPs budget {meta['flops_budget']:.3f}" if "flops_budget" in meta
                  else f"predicted latency budget {meta['latency_budget']:.3f}")
        print(f"\nONNX Runtime CPU latency: {meta['latency_ratio']:.3f} × the original "
              f"(target {args.latency}, {meta.get('ranking', 'importance')} ranking, {budget})")
    if args.out:
        print("\n" + figures_table(rep.onnx))
    if args.plan:
        rep.plan.save(args.plan)
        print(f"wrote {args.plan}")
    if args.save:
        save(pruned, args.save)
        print(f"wrote {args.save} (plan + weights; fxprune.load(path, factory, inputs) rebuilds it)")
    return 0


def _inspect(args) -> int:
    graph = analyze(_model(args), _inputs(args), capture=args.capture, output=args.output, heads=args.heads,
                    groups=args.groups)
    if args.graph:
        render(graph_to_dot(graph, collapse=args.collapse, title=args.model), args.graph)
    if args.json:
        print(json.dumps(group_rows(graph), indent=1))
    else:
        print(repr(graph).splitlines()[0])
        print(group_table(graph))
    if args.graph:
        print(f"wrote {args.graph}", file=sys.stderr if args.json else sys.stdout)
    return 0


def _export(args) -> int:
    inputs = _inputs(args)
    if args.load:
        module = load(args.load, lambda: load_model(args.model), inputs)
    elif args.plan:
        module = apply(_model(args), inputs, args.plan, verify=not args.no_verify, onnx=False, capture=args.capture)
    else:
        module = _model(args)
    result = export_onnx(module, inputs, args.out, check=not args.no_verify)
    print(figures_table(result))
    return 0 if result["ok"] else 1


def _bench(args) -> int:
    if args.threads < 1 or args.repeats < 1 or args.rounds < 1 or min(args.batch) < 1:
        raise FxPruneError("--threads, --repeats, --rounds and every --batch must be at least 1")
    if args.repeats < args.rounds:
        raise FxPruneError(f"--repeats {args.repeats} must be at least --rounds {args.rounds}")
    inputs = _inputs(args)
    original = load_model(args.model)
    if args.load:
        pruned = load(args.load, lambda: load_model(args.model), inputs)
    else:
        pruned = apply(_model(args), inputs, args.plan, verify=False, onnx=False, capture=args.capture)
    torch.set_num_threads(args.threads)
    f0, f1 = count_flops(original, inputs), count_flops(pruned, inputs)
    p0, p1 = count_params(original), count_params(pruned)
    print(f"{args.model}: FLOPs kept {f1 / f0:.3f} ({f1:,} of {f0:,} at batch {inputs[0].shape[0]}), "
          f"parameters kept {p1 / p0:.3f} ({p1:,} of {p0:,})")
    rows = compare_latency(original, pruned, inputs, batches=args.batch, threads=args.threads,
                           repeats=args.repeats, rounds=args.rounds)
    print(f"ONNX Runtime CPU latency, {args.threads} intra-op thread(s), original and pruned timed in "
          f"{args.rounds} alternating rounds:")
    print(compare_table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
