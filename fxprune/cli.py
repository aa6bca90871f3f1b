"""The ``fxprune`` command line: ``prune`` and ``inspect`` a model.

A model is named ``torchvision:<name>`` (built with ``weights=None``) or
``module.path:factory`` (a callable returning an ``nn.Module``). The input shape
defaults to the model's native one for torchvision models, else ``1,3,224,224``.

Example::

    $ fxprune prune torchvision:resnet18 --method l2 --flops 0.5 --out resnet18_pruned.onnx
    $ fxprune inspect torchvision:resnet18
"""
from __future__ import annotations

import argparse
import importlib
import json
import sys
import warnings

import torch

from .errors import FxPruneError


def load_model(spec: str) -> torch.nn.Module:
    """Build the model named by ``spec`` (see the module docstring), in eval mode."""
    if ":" not in spec:
        raise FxPruneError(f"model '{spec}' is not of the form torchvision:<name> or module.path:factory")
    source, name = spec.split(":", 1)
    if source == "torchvision":
        import torchvision

        if name not in torchvision.models.list_models():
            raise FxPruneError(f"torchvision has no model '{name}'; see torchvision.models.list_models()")
        return torchvision.models.get_model(name, weights=None).eval()
    try:
        factory = getattr(importlib.import_module(source), name)
    except (ImportError, AttributeError) as exc:
        raise FxPruneError(f"cannot load '{spec}': {exc}") from exc
    model = factory()
    if not isinstance(model, torch.nn.Module):
        raise FxPruneError(f"'{spec}' returned a {type(model).__name__}, not a torch.nn.Module")
    return model.eval()


def native_input_shape(spec: str) -> tuple:
    """The input shape a model expects: torchvision's weights metadata, else 1x3x224x224."""
    if spec.startswith("torchvision:"):
        import torchvision

        try:
            weights = torchvision.models.get_model_weights(spec.split(":", 1)[1]).DEFAULT
            crop = weights.transforms().crop_size
            crop = crop[0] if isinstance(crop, (list, tuple)) else crop
            return (1, 3, int(crop), int(crop))
        except Exception:  # models without registered weights
            pass
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fxprune", description="Structured pruning of PyTorch models, verified.")
    sub = parser.add_subparsers(dest="command", required=True)

    prune = sub.add_parser("prune", help="prune a model and export it to ONNX")
    prune.add_argument("model", help="torchvision:<name> or module.path:factory")
    prune.add_argument("--method", default="l2", help="criterion (l1, l2, bn, taylor, random, ...)")
    budget = prune.add_mutually_exclusive_group(required=True)
    budget.add_argument("--ratio", type=_fraction, help="fraction of each group's channels removed")
    budget.add_argument("--flops", type=_fraction, help="fraction of the model's FLOPs kept")
    budget.add_argument("--params", type=_fraction, help="fraction of the model's parameters kept")
    prune.add_argument("--round-to", type=int, default=None, help="keep channel counts a multiple of this")
    prune.add_argument("--input-shape", type=_shape, default=None, help="e.g. 1,3,224,224")
    prune.add_argument("--out", default=None, help="write the pruned model as ONNX to this path")
    prune.add_argument("--plan", default=None, help="write the plan as JSON to this path")
    prune.add_argument("--no-verify", action="store_true", help="skip mask-equivalence and ONNX checks")

    inspect = sub.add_parser("inspect", help="print the channel groups of a model")
    inspect.add_argument("model", help="torchvision:<name> or module.path:factory")
    inspect.add_argument("--input-shape", type=_shape, default=None, help="e.g. 1,3,224,224")
    inspect.add_argument("--json", action="store_true", help="print JSON instead of a table")
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return {"prune": _prune, "inspect": _inspect}[args.command](args)
    except FxPruneError as exc:
        print(f"fxprune: error: {exc}", file=sys.stderr)
        return 2


def _inputs(args):
    shape = args.input_shape or native_input_shape(args.model)
    return (torch.randn(shape),)


def _prune(args) -> int:
    from .api import compile
    from .export import export_onnx
    from .report import report

    model = load_model(args.model)
    inputs = _inputs(args)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pruned = compile(model, inputs, method=args.method, ratio=args.ratio, flops=args.flops, params=args.params,
                         round_to=args.round_to, verify=not args.no_verify, onnx=False)
    for w in caught:
        if issubclass(w.category, UserWarning) and "fxprune" in str(w.filename):
            print(f"fxprune: warning: {w.message}", file=sys.stderr)
    rep = report(pruned)
    if args.out:
        result = export_onnx(pruned, inputs, args.out, check=not args.no_verify)
        rep.onnx = result
    print(rep)
    if args.out:
        print(f"\nwrote {args.out} ({rep.onnx['bytes'] / 1e6:.1f} MB)")
    if args.plan:
        rep.plan.save(args.plan)
        print(f"wrote {args.plan}")
    return 0


def _inspect(args) -> int:
    from .api import analyze
    from .inspect import group_table, group_rows

    graph = analyze(load_model(args.model), _inputs(args))
    if args.json:
        print(json.dumps(group_rows(graph), indent=1))
    else:
        print(group_table(graph))
    return 0


if __name__ == "__main__":
    sys.exit(main())
