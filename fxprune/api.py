"""The public entry points: :func:`analyze`, :func:`compile`, :func:`apply`.

``compile`` runs the whole pipeline (:class:`fxprune.pipeline.Pipeline`), the way
``torch.compile`` runs a backend: capture → couple → score → plan → rewrite → verify, and
returns the pruned ``GraphModule``; :func:`fxprune.report` reads what happened from it.

Example::

    >>> import torch, torchvision, fxprune
    >>> model = torchvision.models.resnet18().eval()
    >>> x = torch.randn(1, 3, 64, 64)
    >>> pruned = fxprune.compile(model, (x,), method="l2", flops=0.5, onnx=False)
    >>> rep = fxprune.report(pruned)
    >>> 0.45 < rep.flops_after / rep.flops_before <= 0.5, rep.mask["ok"]
    (True, True)
    >>> again = fxprune.apply(model, (x,), rep.plan, onnx=False)
    >>> torch.equal(again(x), pruned(x))
    True
"""
from __future__ import annotations

import torch

from . import passes
from .cost.latency import search_latency
from .cost.latency_table import LatencyModel
from .errors import ConfigError, TraceError
from .ir import ChannelGraph
from .partial import compile_parts
from .pipeline import Pipeline
from .plan import Plan


def analyze(model: torch.nn.Module, example_inputs, *, leaf_modules=(), concrete_args=None,
            capture: str = "auto", output: str = "graph") -> ChannelGraph:
    """Capture ``model`` and find its channel groups (see :mod:`fxprune.ir`); with ``output="module"``,
    with the pins of that output (literals in the model's code, see :func:`compile`)."""
    return Pipeline(model, example_inputs, leaf_modules=leaf_modules, concrete_args=concrete_args,
                    capture=capture, output=output).analyze()


def compile(model: torch.nn.Module, example_inputs, method="l2", *, ratio=None, flops=None, params=None,
            latency=None, round_to=None, floor: float = 0.0, min_keep: int = 1, ignore=(), data=None,
            verify: bool = True, onnx: bool = True, leaf_modules=(), concrete_args=None, seed: int = 0,
            method_options: dict | None = None, latency_options: dict | None = None,
            latency_model=None, capture: str = "auto", output: str = "graph") -> torch.nn.Module:
    """Prune ``model`` and return a new, smaller ``GraphModule``; ``model`` is not changed.

    With ``output="module"`` it returns a pruned deep copy of ``model`` instead, of the same
    class, running the model's own ``forward`` (:mod:`fxprune.rewrite.module`): channels that
    literals in that code count (``x.view(n, 512 * 7 * 7)``) are then kept, each pin naming
    the line, and the copy is checked against the pruned ``GraphModule`` module by module.

    ``method`` names a criterion of :data:`fxprune.passes.REGISTRY` (or is a callable
    ``score(graph, data=..., seed=...)``; see :meth:`fxprune.pipeline.Pipeline.planner`).
    Give one budget: ``ratio`` (fraction of each group removed), ``flops`` or ``params``
    (fraction of the model kept), or ``latency`` (fraction of the original's ONNX Runtime
    CPU latency allowed). With ``latency_model`` (a :class:`~fxprune.cost.latency_table.LatencyModel`,
    or True to build one) the plan spends the latency that model predicts, ranking channels by
    importance per millisecond; without it, the largest FLOPs budget whose exported model meets
    the target, measured (options of :func:`fxprune.cost.latency.search_latency` in
    ``latency_options``). ``round_to="fast"`` rounds every group to a count ONNX Runtime runs
    well (from a latency model). ``data`` feeds
    data-driven criteria. With ``verify`` (the default) the result is checked by
    mask-equivalence and, with ``onnx``, in ONNX Runtime; a mismatch raises
    :class:`~fxprune.errors.VerificationError`. ``capture`` picks the tracer: ``"auto"`` (the
    default: ``torch.fx.symbolic_trace``, and ``torch.export`` when that fails), ``"fx"`` or
    ``"export"``; the report says which captured the model and why. When neither captures the
    model, ``"auto"`` prunes it part by part (``"parts"`` does so directly): each child module that
    captures is pruned on its own, its inputs and outputs kept, and a copy of ``model`` with those
    parts replaced is returned (:mod:`fxprune.partial`; its report lists the parts and the modules left whole).
    """
    if isinstance(method, str):
        criterion, name = passes.get(method), method
    elif callable(method):
        criterion, name = method, getattr(method, "__name__", "custom")
    else:
        raise ConfigError(f"method must be a registered name or a callable, not {type(method).__name__}")
    parts = dict(ratio=ratio, flops=flops, params=params, round_to=round_to, floor=floor, min_keep=min_keep,
                 ignore=ignore, seed=seed, method_options=method_options, verify=verify, onnx=onnx,
                 leaf_modules=leaf_modules)
    if capture == "parts":
        _check_parts(data, latency, latency_model, output, "capture='parts'")
        return compile_parts(model, example_inputs, criterion, name, **parts)
    pipe = Pipeline(model, example_inputs, leaf_modules=leaf_modules, concrete_args=concrete_args, verify=verify,
                    onnx=onnx, capture=capture, output=output)
    if capture == "auto":
        try:
            pipe.analyze()
        except TraceError as exc:  # neither tracer follows the root: prune the parts that they follow
            why = f"the root was not captured: {str(exc).splitlines()[0][:300]}"
            _check_parts(data, latency, latency_model, output, why)
            return compile_parts(model, example_inputs, criterion, name, why=why, **parts)
    if latency_model is True:
        latency_model = LatencyModel(pipe.graph)
    planner = pipe.planner(criterion, name, data=data, seed=seed, method_options=method_options, ignore=ignore,
                           min_keep=min_keep, floor=floor, round_to=round_to, latency_model=latency_model)
    if latency is None or latency_model is not None:
        return pipe.build(planner(ratio=ratio, flops=flops, params=params, latency=latency), method=name)
    if any(b is not None for b in (ratio, flops, params)):
        raise ConfigError("give exactly one budget: latency= cannot be combined with ratio=, flops= or params=")
    plan, history = search_latency(model, pipe.graph, latency, planner=lambda f: planner(flops=f),
                                   **(latency_options or {}))
    return pipe.build(plan, method=name, search=history)


def _check_parts(data, latency, latency_model, output, why: str) -> None:
    """What part-by-part pruning (:mod:`fxprune.partial`) does not do yet."""
    if data is not None or latency is not None or latency_model not in (None, False) or output != "graph":
        raise ConfigError(f"the model is pruned part by part ({why}), which takes data-free methods and a ratio=, "
                          "flops= or params= budget only (no data=, latency=, latency_model= or output='module')")


def apply(model: torch.nn.Module, example_inputs, plan, *, verify: bool = True, onnx: bool = True,
          leaf_modules=(), concrete_args=None, capture: str = "auto", output: str = "graph") -> torch.nn.Module:
    """Re-create a pruned model from the original and a :class:`Plan` (or its JSON, or a path to it);
    ``output`` as in :func:`compile`."""
    if isinstance(plan, str):
        plan = Plan.from_json(plan) if plan.lstrip().startswith("{") else Plan.load(plan)
    if not isinstance(plan, Plan):
        raise ConfigError(f"plan must be a Plan, its JSON text or a path to it, not {type(plan).__name__}")
    return Pipeline(model, example_inputs, leaf_modules=leaf_modules, concrete_args=concrete_args, verify=verify,
                    onnx=onnx, capture=capture, output=output).apply(plan)
