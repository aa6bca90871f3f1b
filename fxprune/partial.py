"""Pruning a model part by part, where its root cannot be captured as one graph.

:func:`compile_parts` is what :func:`fxprune.compile` falls back to when neither
``symbolic_trace`` nor ``torch.export`` captures the model (``capture="auto"``), or what it
does with ``capture="parts"``. It walks the module tree from the root's children down:

- a module with no parameters, not called on the example inputs, called more than once in
  one forward pass, or sharing a parameter with modules outside it is left whole (the report
  says which reason);
- any other module is wrapped as a flat call (:class:`fxprune.capture.partial.FlatCall`:
  its recorded tensors in, its output's tensors out) and handed to its own
  :class:`~fxprune.pipeline.Pipeline`: captured (``symbolic_trace``, else ``torch.export``),
  coupled with its inputs and outputs pinned, planned under the same budget, rewritten and
  checked by mask-equivalence and ONNX Runtime;
- a module that cannot be captured (or whose call passes objects other than tensors, lists,
  tuples and dicts, such as ``ImageList``) is opened: its children are tried in turn (the report
  lists it under ``opened``, with the reason); so is a ``ModuleList``/``ModuleDict`` (never called
  itself), and a part whose submodules or attributes the model's own code reads from outside it
  (FSMT's ``self.model.encoder.embed_tokens``), which its pruned graph does not keep.

The budget applies to each part on its own (``ratio=`` removes the same fraction of every
group, as for a whole model; ``flops=``/``params=`` keep that fraction of each part, so the
whole model, which also spends FLOPs outside the parts, keeps a little more). The result is a
deep copy of the model with each pruned part in its place (a
:class:`~fxprune.capture.partial.PrunedPart` running the pruned graph); it runs the model's own
``forward`` and is checked to return the same output structure as the model on the example
inputs. Its :class:`~fxprune.view.parts.PartsReport` (``fxprune.report(result)``) lists each part
with its tracer and figures, and each module left whole with the reason.

Example::

    >>> import torch, fxprune
    >>> class Net(torch.nn.Module):       # the root branches on a tensor's value: no tracer follows it
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.body = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU(), torch.nn.Conv2d(8, 4, 1))
    ...     def forward(self, x):
    ...         y = self.body(x)
    ...         return {"out": y if y.sum() > 0 else -y}
    >>> small = fxprune.compile(Net(), (torch.randn(1, 3, 8, 8),), ratio=0.5, onnx=False)
    >>> rep = fxprune.report(small)
    >>> [(p["name"], p["tracer"]) for p in rep.parts], small.body.graph.get_submodule("inner.0").out_channels
    ([('body', 'fx')], 4)
"""
from __future__ import annotations

import copy
import re
import time

import torch
from torch.utils._pytree import tree_flatten

from .capture.partial import FlatCall, PrunedPart, record_calls, unflattenable
from .cost import count_params
from .cost.flops import count_flops
from .errors import ConfigError, ExportError, FxPruneError, TraceError, VerificationError
from .io.onnx import export_onnx
from .pipeline import Pipeline
from .utils import as_tuple, eval_mode
from .view.parts import PartsReport


def compile_parts(model: torch.nn.Module, example_inputs, criterion, name: str, *, ratio=None, flops=None,
                  params=None, round_to=None, floor: float = 0.0, min_keep: int = 1, ignore=(), seed: int = 0,
                  method_options=None, verify: bool = True, onnx: bool = True, leaf_modules=(), heads: str = "dims",
                  groups: str = "balanced", why: str = "capture='parts'") -> torch.nn.Module:
    """``model`` with every part that captures pruned (see the module docstring); ``why`` says why the
    root was not captured whole. Arguments as in :func:`fxprune.compile` (data-free methods only)."""
    t0 = time.perf_counter()
    example_inputs = as_tuple(example_inputs)
    with eval_mode(model), torch.no_grad():
        try:
            expected = model(*example_inputs)
        except Exception as exc:
            raise TraceError(f"the model failed on the example inputs: {type(exc).__name__}: {exc}. Check that "
                             "example_inputs match what model.forward expects.") from exc
    shared = _shared_params(model)
    parts, whole, opened = [], [], []
    budget = dict(ratio=ratio, flops=flops, params=params)

    def walk(pending):
        while pending:
            calls = record_calls(model, example_inputs, dict(pending))
            below = []
            for qual, module in pending:
                if qual not in calls and isinstance(module, (torch.nn.ModuleList, torch.nn.ModuleDict)):
                    below += _open(qual, module, "a container, never called itself", whole, opened)
                    continue
                reason = _left_whole(qual, module, calls.get(qual), shared)
                if reason is not None:
                    whole.append({"name": qual, "reason": reason, "params": count_params(module)})
                    continue
                call = calls[qual]
                problem = unflattenable((call.args, call.kwargs)) or unflattenable(call.output)
                if problem is None:
                    part = _prune_part(qual, module, call, criterion, name, budget,
                                       dict(round_to=round_to, floor=floor, min_keep=min_keep, seed=seed,
                                            method_options=method_options, ignore=_local(ignore, qual)),
                                       verify=verify, onnx=onnx, leaf_modules=leaf_modules, heads=heads,
                                       groups=groups)
                    if "pruned" in part:
                        parts.append(part)
                        continue
                    problem = part["reason"]
                    if part.get("final"):  # captured, but nothing to prune or not verified: no child would do better
                        whole.append({"name": qual, "reason": problem, "params": count_params(module)})
                        continue
                below += _open(qual, module, problem, whole, opened)
            pending = below

    walk([(n, m) for n, m in model.named_children()])
    while parts:
        result = _assemble(model, parts)
        t1 = time.perf_counter()
        got, failure = _run(result, example_inputs)
        attr = _read_from_outside(failure)
        # the model's own code reads a submodule or attribute of a part that its pruned graph does not keep
        # (FSMT's `self.model.encoder.embed_tokens`): those parts are opened, their children tried
        held = [p for p in parts if hasattr(model.get_submodule(p["name"]), attr)] if attr else []
        if not held:
            break   # it ran, or failed otherwise: the check below says what failed
        below = []
        for part in held:
            parts.remove(part)
            below += _open(part["name"], model.get_submodule(part["name"]),
                           f"the model reads its '{attr}' from outside it, which its pruned graph does not keep",
                           whole, opened)
        walk(below)
    if not parts:
        raise TraceError(f"no part of the model could be captured and pruned ({why}); left whole: "
                         + "; ".join(f"'{w['name']}': {w['reason']}" for w in whole[:6]))
    for part in parts:
        del part["pruned"], part["flat"]
    check = _check_whole(got, failure, expected) if verify else None
    rep = PartsReport(method=name, why=why, parts=parts, whole=whole, opened=opened,
                      params_before=count_params(model), params_after=count_params(result),
                      flops_before=_flops(model, example_inputs), flops_after=_flops(result, example_inputs),
                      whole_check=check,
                      timings={"parts": t1 - t0, "verify: whole": time.perf_counter() - t1})
    result.fxprune_report = rep
    return result


def _left_whole(qual: str, module: torch.nn.Module, call, shared: dict) -> str | None:
    """Why ``module`` is neither a part nor opened, or None."""
    if count_params(module) == 0:
        return "no parameters"
    if call is None:
        return "not called when the model runs on the example inputs"
    if call.count > 1:
        return (f"called {call.count} times in one forward pass (a captured graph fits one call); its parent "
                "holds the loop")
    outside = [o for o in shared.get(qual, ()) if not (o == qual or o.startswith(qual + "."))]
    if outside:
        return f"shares parameters with '{outside[0]}', outside it"
    return None


def _shared_params(model: torch.nn.Module) -> dict:
    """``{module name: names of every module holding one of its parameters}``, for parameters held twice."""
    owners: dict[int, list[str]] = {}
    for pname, p in model.named_parameters(remove_duplicate=False):
        owners.setdefault(id(p), []).append(pname.rpartition(".")[0])
    out: dict[str, set] = {}
    for names in owners.values():
        if len(set(names)) < 2:
            continue
        for n in names:
            parts = n.split(".")
            for i in range(1, len(parts) + 1):
                out.setdefault(".".join(parts[:i]), set()).update(names)
    return out


def _local(ignore, qual: str):
    """``ignore=`` for the part ``qual``: module objects as given, names under ``qual`` renamed into the wrapper."""
    out = []
    for item in ignore:
        if isinstance(item, str):
            if item.startswith(qual + "."):
                out.append("inner." + item[len(qual) + 1:])
        else:
            out.append(item)
    return out


def _prune_part(qual, module, call, criterion, name, budget, options, *, verify, onnx, leaf_modules,
                heads="dims", groups="balanced") -> dict:
    """``{"name", "tracer", ..., "pruned", "flat"}`` for a pruned part; ``{"reason", "final"?}`` otherwise."""
    flat = FlatCall(module, call)
    pipe = Pipeline(flat, flat.example_inputs, leaf_modules=[m for m in leaf_modules if isinstance(m, type)],
                    verify=verify, onnx=False, heads=heads, groups=groups)
    try:
        graph = pipe.graph
    except TraceError as exc:
        return {"reason": f"not captured: {str(exc).splitlines()[0][:300]}"}
    except FxPruneError as exc:
        return {"reason": f"not analysed: {str(exc).splitlines()[0][:300]}", "final": True}
    info = {"name": qual, "tracer": graph.capture.get("tracer"), "why": graph.capture.get("why", "")}
    if not graph.prunable_groups():
        first = next((str(g.pins[0]) for g in graph.groups.values() if g.pins), "")
        return {"reason": f"captured by {info['tracer']}, but every channel is pinned ({first[:200]})", "final": True}
    try:
        plan = pipe.planner(criterion, name, **options)(**budget)
        pruned = pipe.build(plan, method=name, onnx=False)
    except ConfigError:
        raise  # the budget or options themselves: the same for every part
    except FxPruneError as exc:
        return {"reason": f"captured by {info['tracer']}, not pruned: {str(exc).splitlines()[0][:300]}",
                "final": True}
    rep = pruned.meta["fxprune_report"]
    info["onnx"] = None
    if verify and onnx:
        try:
            rep.onnx = info["onnx"] = export_onnx(pruned, flat.example_inputs)
        except VerificationError as exc:
            if not isinstance(exc, ExportError):  # ONNX Runtime disagrees: never keep it
                return {"reason": f"captured by {info['tracer']}, pruned, but ONNX Runtime disagrees: "
                                  f"{str(exc).splitlines()[0][:300]}", "final": True}
            info["onnx"] = {"ok": None, "skipped": str(exc).splitlines()[0][:300]}
    info.update(params_before=rep.params_before, params_after=rep.params_after, flops_before=rep.flops_before,
                flops_after=rep.flops_after, groups=rep.groups, prunable_groups=rep.prunable_groups,
                removed=plan.removed, mask=rep.mask, report=rep, pruned=pruned, flat=flat)
    return info


def _open(qual: str, module: torch.nn.Module, problem: str, whole: list, opened: list) -> list:
    """``module``'s children, to try as parts in its stead (it is listed as opened, with ``problem``); a
    module without children is left whole."""
    children = [(f"{qual}.{n}", m) for n, m in module.named_children()]
    if children:
        opened.append({"name": qual, "reason": problem})
    else:
        whole.append({"name": qual, "reason": problem, "params": count_params(module)})
    return children


def _assemble(model: torch.nn.Module, parts: list) -> torch.nn.Module:
    """A deep copy of ``model`` with each part's pruned graph in its place."""
    result = copy.deepcopy(model)
    for part in parts:
        result.set_submodule(part["name"], PrunedPart(part["pruned"], part["flat"], part["name"]))
    return result


def _run(result: torch.nn.Module, example_inputs) -> tuple:
    """``result`` on the example inputs: ``(its output, None)``, or ``(None, the exception it raised)``."""
    try:
        with eval_mode(result), torch.no_grad():
            return result(*example_inputs), None
    except Exception as exc:  # the check says what failed
        return None, exc


def _read_from_outside(failure: Exception | None) -> str | None:
    """The attribute a run missed on a pruned part (nn.Module's own message names the class and the attribute),
    or None."""
    found = re.search(rf"'{PrunedPart.__name__}' object has no attribute '(\w+)'", str(failure)) \
        if isinstance(failure, AttributeError) else None
    return found.group(1) if found else None


def _check_whole(got, failure: Exception | None, expected) -> dict:
    """The pruned model ran on the example inputs (:func:`_run`: ``got``, or ``failure``) and returns what the
    model returns, in structure: the same containers, keys and lengths, and tensors of the same dtype and rank
    (their sizes may differ: a detector keeps as many boxes as pass its thresholds)."""
    if failure is not None:
        raise VerificationError(f"the model with its pruned parts failed on the example inputs: "
                                f"{type(failure).__name__}: {failure}") from failure
    a, spec_a = tree_flatten(expected)
    b, spec_b = tree_flatten(got)
    if spec_a != spec_b:
        raise VerificationError(f"the model with its pruned parts returns {spec_b}, the model {spec_a}")
    for x, y in zip(a, b):
        if isinstance(x, torch.Tensor) != isinstance(y, torch.Tensor) or (
                isinstance(x, torch.Tensor) and (x.dtype != y.dtype or x.dim() != y.dim())):
            raise VerificationError(f"the model with its pruned parts returns a {_kind(y)} where the model returns "
                                    f"a {_kind(x)}")
    finite = all(bool(torch.isfinite(y).all()) for y in b if isinstance(y, torch.Tensor) and y.is_floating_point())
    if not finite:
        raise VerificationError("the model with its pruned parts returns non-finite values on the example inputs")
    return {"ok": True, "outputs": len(b), "structure": str(spec_b)[:200]}


def _kind(v) -> str:
    return f"tensor {v.dtype} of rank {v.dim()}" if isinstance(v, torch.Tensor) else type(v).__name__


def _flops(module, example_inputs) -> int | None:
    try:
        return count_flops(module, example_inputs)
    except Exception:  # an op FlopCounterMode cannot run: the report shows no figure
        return None
