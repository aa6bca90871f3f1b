"""The public entry points: :func:`analyze`, :func:`compile`, :func:`apply`.

``compile`` runs the whole pipeline, the way ``torch.compile`` runs a backend:
trace → couple → score → plan → rewrite → verify, and returns the pruned
``GraphModule``; :func:`fxprune.report` reads what happened from it.

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

import time

import torch
import torch.fx as fx

from .cost import CostModel, count_params, graph_flops
from .coupling import couple
from .errors import ConfigError
from .export import export_onnx
from .gcpause import paused_gc
from .ir import ChannelGraph
from .plan import Plan, make_plan
from .report import Report
from .rewrite import rewrite
from .trace import _as_tuple, trace
from .verify import check_mask, mask_equivalence, random_inputs


@paused_gc
def analyze(model: torch.nn.Module, example_inputs, *, leaf_modules=(), concrete_args=None) -> ChannelGraph:
    """Trace a copy of ``model`` and find its channel groups (see :mod:`fxprune.ir`)."""
    example_inputs = _as_tuple(example_inputs)
    t0 = time.perf_counter()
    gm = trace(model, example_inputs, leaf_modules=leaf_modules, concrete_args=concrete_args)
    t1 = time.perf_counter()
    graph = couple(gm, example_inputs)
    graph.source_names = {id(m): name for name, m in model.named_modules()}
    graph.timings = {"trace": t1 - t0, "couple": time.perf_counter() - t1}
    return graph


def compile(model: torch.nn.Module, example_inputs, method="l2", *, ratio=None, flops=None, params=None,
            round_to=None, floor: float = 0.0, min_keep: int = 1, ignore=(), data=None, verify: bool = True,
            onnx: bool = True, leaf_modules=(), concrete_args=None, seed: int = 0,
            method_options: dict | None = None) -> fx.GraphModule:
    """Prune ``model`` and return a new, smaller ``GraphModule``; ``model`` is not changed.

    ``method`` names a criterion of :data:`fxprune.passes.REGISTRY` (or is a callable
    ``score(graph, data=..., seed=...)``). A criterion with a ``plan`` attribute chooses
    its own channels under the budget (CURL, CATRO): ``criterion.plan(graph, data=, seed=,
    ratio=, flops=, params=, round_to=, min_keep=, floor=, ignore=, meta=, **method_options)``
    returns the :class:`Plan`. Give one budget: ``ratio`` (fraction of each group removed),
    ``flops`` or ``params`` (fraction of the model kept). ``data`` feeds data-driven criteria.
    With ``verify`` (the default) the result is checked by mask-equivalence and, with
    ``onnx``, in ONNX Runtime; a mismatch raises
    :class:`~fxprune.errors.VerificationError`.
    """
    from . import passes

    example_inputs = _as_tuple(example_inputs)
    graph = analyze(model, example_inputs, leaf_modules=leaf_modules, concrete_args=concrete_args)
    if isinstance(method, str):
        criterion, name = passes.get(method), method
    elif callable(method):
        criterion, name = method, getattr(method, "__name__", "custom")
    else:
        raise ConfigError(f"method must be a registered name or a callable, not {type(method).__name__}")
    t0 = time.perf_counter()
    planner = getattr(criterion, "plan", None)
    if callable(planner):  # a method that chooses its own channels under the budget (CURL, CATRO)
        plan = planner(graph, data=data, seed=seed, ratio=ratio, flops=flops, params=params, round_to=round_to,
                       min_keep=min_keep, floor=floor, ignore=ignore, meta={"method": name}, **(method_options or {}))
        t1 = time.perf_counter()
    else:
        scores = criterion(graph, data=data, seed=seed, **(method_options or {}))
        t1 = time.perf_counter()
        plan = make_plan(graph, scores, ratio=ratio, flops=flops, params=params, round_to=round_to,
                         min_keep=min_keep, floor=floor, ignore=ignore, meta={"method": name})
    graph.timings.update({"score": t1 - t0, "plan": time.perf_counter() - t1})
    return _build(model, graph, plan, name, verify, onnx)


def apply(model: torch.nn.Module, example_inputs, plan, *, verify: bool = True, onnx: bool = True,
          leaf_modules=(), concrete_args=None) -> fx.GraphModule:
    """Re-create a pruned model from the original and a :class:`Plan` (or its JSON, or a path to it)."""
    if isinstance(plan, str):
        plan = Plan.from_json(plan) if plan.lstrip().startswith("{") else Plan.load(plan)
    if not isinstance(plan, Plan):
        raise ConfigError(f"plan must be a Plan, its JSON text or a path to it, not {type(plan).__name__}")
    example_inputs = _as_tuple(example_inputs)
    graph = analyze(model, example_inputs, leaf_modules=leaf_modules, concrete_args=concrete_args)
    return _build(model, graph, plan, plan.meta.get("method", "plan"), verify, onnx)


def _build(model, graph, plan, method, verify, onnx) -> fx.GraphModule:
    keep = plan.mask(graph)
    timings = dict(graph.timings)
    t0 = time.perf_counter()
    pruned = rewrite(graph, plan)
    timings["rewrite"] = time.perf_counter() - t0
    inputs = graph.example_inputs
    mask_result = onnx_result = None
    if verify:
        t0 = time.perf_counter()
        mask_result = mask_equivalence(graph, keep, pruned, random_inputs(inputs, seed=0))
        timings["verify: mask"] = time.perf_counter() - t0
        check_mask(mask_result)
        if onnx:
            t0 = time.perf_counter()
            onnx_result = export_onnx(pruned, inputs)
            timings["verify: onnx"] = time.perf_counter() - t0
    cost = CostModel(graph)
    groups = list(graph.groups.values())
    pinned = [g for g in groups if g.prunable == 0]
    first_pin = next((str(g.pins[0]) for g in pinned if g.pins), None)
    pruned.meta["fxprune_report"] = Report(
        method=method, plan=plan, params_before=count_params(model), params_after=count_params(pruned),
        flops_before=int(cost.base_flops), flops_after=graph_flops(pruned, inputs),
        flops_predicted=cost.flops(keep.numpy()), groups=len(groups), prunable_groups=len(groups) - len(pinned),
        pinned_groups=len(pinned), first_pin=first_pin, mask=mask_result, onnx=onnx_result, timings=timings)
    return pruned
