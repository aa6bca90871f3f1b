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

import warnings

import torch

from . import passes
from .cost.latency import budget_at, fit_latency, quiet, search_latency
from .cost.latency_table import LatencyError, LatencyModel
from .errors import ConfigError, TraceError
from .ir import ChannelGraph
from .partial import compile_parts
from .pipeline import Pipeline
from .plan import Plan
from .plan.budget import default_round_to, kept_importance

DEFAULT = "default"   # round_to= not given: see fxprune.plan.budget.default_round_to


def analyze(model: torch.nn.Module, example_inputs, *, leaf_modules=(), concrete_args=None,
            capture: str = "auto", output: str = "graph", heads: str = "dims") -> ChannelGraph:
    """Capture ``model`` and find its channel groups (see :mod:`fxprune.ir`); with ``output="module"``,
    with the pins of that output (literals in the model's code, see :func:`compile`); ``heads`` as in
    :func:`compile`."""
    return Pipeline(model, example_inputs, leaf_modules=leaf_modules, concrete_args=concrete_args,
                    capture=capture, output=output, heads=heads).analyze()


def compile(model: torch.nn.Module, example_inputs, method="l2", *, ratio=None, flops=None, params=None,
            latency=None, round_to=DEFAULT, floor: float = 0.0, min_keep: int = 1, ignore=(), data=None,
            verify: bool = True, onnx: bool = True, leaf_modules=(), concrete_args=None, seed: int = 0,
            method_options: dict | None = None, latency_options: dict | None = None,
            latency_model=None, capture: str = "auto", output: str = "graph", heads: str = "dims") -> torch.nn.Module:
    """Prune ``model`` and return a new, smaller ``GraphModule``; ``model`` is not changed.

    With ``output="module"`` it returns a pruned deep copy of ``model`` instead, of the same
    class, running the model's own ``forward`` (:mod:`fxprune.rewrite.module`): channels that
    literals in that code count (``x.view(n, 512 * 7 * 7)``) are then kept, each pin naming
    the line, and the copy is checked against the pruned ``GraphModule`` module by module.

    ``method`` names a criterion of :data:`fxprune.passes.REGISTRY` (or is a callable
    ``score(graph, data=..., seed=...)``; see :meth:`fxprune.pipeline.Pipeline.planner`).
    Give one budget: ``ratio`` (fraction of each group removed), ``flops`` or ``params``
    (fraction of the model kept), or ``latency`` (fraction of the original's ONNX Runtime
    CPU latency allowed).

    ``latency=t`` plans with a :class:`~fxprune.cost.latency_table.LatencyModel` (built here, its
    ORT kernel times cached per machine, unless given as ``latency_model``): channels ranked by
    importance per millisecond, then
    the plan is exported, timed against the original and corrected until it measures within
    ``[0.9, 0.96] × latency`` (:func:`fxprune.cost.latency.fit_latency`); then the importance-ranked
    plan is found the same way (the FLOPs budget fitted to the same band, each candidate timed) and, of
    the two that meet the target, the one that keeps more of the importance
    (:func:`fxprune.plan.budget.kept_importance`) at equal measured latency is returned: the one that
    landed higher is re-planned (not timed) at the other's ratio from its own search's readings
    (``report.plan.meta["ranking"]``: ``"per ms"`` or ``"importance"``, with each one's
    ``importance_kept`` and ``latency_ratios``, and ``compared_at`` and ``importance_at``; see
    ``_more_important``; ``latency_options={"compare": False}`` skips it).
    ``latency_model=False`` fits the FLOPs budget only, timing each candidate
    (:func:`fxprune.cost.latency.search_latency`); ``latency_options`` go to either. ``round_to`` rounds each group's kept count up: to a
    multiple, or with ``"fast"`` to a count ORT runs well (from the latency model). When not
    given, a model with 2-d convolutions planned from scores gets ``"fast"``
    (:func:`fxprune.plan.budget.default_round_to`; ``$FXPRUNE_ROUND_TO`` overrides it; methods that
    plan themselves, CURL and CATRO, round only when asked, and their ``latency=`` fits the FLOPs
    budget); ``round_to=None`` does not round. ``data`` feeds data-driven criteria. With ``verify`` (the default) the result is checked by
    mask-equivalence and, with ``onnx``, in ONNX Runtime; a mismatch raises
    :class:`~fxprune.errors.VerificationError`. ``capture`` picks the tracer: ``"auto"`` (the
    default: ``torch.fx.symbolic_trace``, and ``torch.export`` when that fails), ``"fx"`` or
    ``"export"``; the report says which captured the model and why. When neither captures the
    model, ``"auto"`` prunes it part by part (``"parts"`` does so directly): each child module that
    captures is pruned on its own, its inputs and outputs kept, and a copy of ``model`` with those
    parts replaced is returned (:mod:`fxprune.partial`; its report lists the parts and the modules left whole).
    ``heads`` says what attention heads lose (a reshape into heads, ``view(b, n, heads, head_dim)``):
    ``"dims"`` (the default) each head's dims, every head keeping the same number at its own
    positions; ``"whole"`` whole heads, ``head_dim`` unchanged (Llama-style rotary embeddings and
    grouped-query attention prune this way: a key/value head goes with its group of query heads).
    ``nn.MultiheadAttention`` and Swin's attention prune dims either way (their width is the stream's).
    """
    if isinstance(method, str):
        criterion, name = passes.get(method), method
    elif callable(method):
        criterion, name = method, getattr(method, "__name__", "custom")
    else:
        raise ConfigError(f"method must be a registered name or a callable, not {type(method).__name__}")
    parts = dict(ratio=ratio, flops=flops, params=params, round_to=None if round_to is DEFAULT else round_to,
                 floor=floor, min_keep=min_keep,
                 ignore=ignore, seed=seed, method_options=method_options, verify=verify, onnx=onnx,
                 leaf_modules=leaf_modules, heads=heads)
    if capture == "parts":
        _check_parts(data, latency, latency_model, output, "capture='parts'")
        return compile_parts(model, example_inputs, criterion, name, **parts)
    pipe = Pipeline(model, example_inputs, leaf_modules=leaf_modules, concrete_args=concrete_args, verify=verify,
                    onnx=onnx, capture=capture, output=output, heads=heads)
    if capture == "auto":
        try:
            pipe.analyze()
        except TraceError as exc:  # neither tracer follows the root: prune the parts that they follow
            why = f"the root was not captured: {str(exc).splitlines()[0][:300]}"
            _check_parts(data, latency, latency_model, output, why)
            return compile_parts(model, example_inputs, criterion, name, why=why, **parts)
    if latency is not None and any(b is not None for b in (ratio, flops, params)):
        raise ConfigError("give exactly one budget: latency= cannot be combined with ratio=, flops= or params=")
    own_plan = callable(getattr(criterion, "plan", None))   # CURL, CATRO: no latency model in their planning
    if latency is not None and latency_model is None:
        latency_model = False if own_plan else True
    by_default = round_to is DEFAULT
    if by_default:
        round_to = None if own_plan else default_round_to(pipe.graph)
    if latency_model is True or (round_to == "fast" and latency_model is None):
        try:
            latency_model = LatencyModel(pipe.graph)
        except LatencyError as exc:
            if not (by_default and latency is None):
                raise
            warnings.warn(f"channel counts not rounded for ONNX Runtime (no latency model: {exc}); "
                          "pass round_to= to choose", stacklevel=2)
            latency_model, round_to = None, None
    def planner_for(round_to):
        return pipe.planner(criterion, name, data=data, seed=seed, method_options=method_options, ignore=ignore,
                            min_keep=min_keep, floor=floor, round_to=round_to, latency_model=latency_model or None)

    planner = planner_for(round_to)
    if latency is None:
        if not (by_default and round_to == "fast"):
            return pipe.build(planner(ratio=ratio, flops=flops, params=params), method=name)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            plan = planner(ratio=ratio, flops=flops, params=params)
        if plan.meta.get("met", True):
            for w in caught:
                warnings.warn(w.message, w.category, stacklevel=2)
            return pipe.build(plan, method=name)
        # the default's fast counts are too coarse for a model this small: unrounded counts meet the budget
        warnings.warn("channel counts not rounded for ONNX Runtime: the fast counts (round_to=\"fast\", the "
                      "default) cannot reach this budget on this model; pass round_to= to choose", stacklevel=2)
        return pipe.build(planner_for(None)(ratio=ratio, flops=flops, params=params), method=name)
    if latency_model is False:
        plan, history = search_latency(model, pipe.graph, latency, planner=lambda f: planner(flops=f),
                                       **(latency_options or {}))
    else:
        options = dict(latency_options or {})
        compare = options.pop("compare", True)
        plan, history = fit_latency(model, pipe.graph, latency, planner=lambda t: planner(latency=t), **options)
        if compare:
            plan, history = _more_important(model, pipe.graph, latency, planner, plan, history, options)
    return pipe.build(plan, method=name, search=history)


_SEARCH_OPTIONS = ("repeats", "warmup", "rounds", "threads", "progress", "min_seconds", "margin")


def _more_important(model, graph, latency, planner, plan, history, options):
    """The latency model's plan against the importance-ranked one (the FLOPs budget fitted on measured
    latency, :func:`search_latency`), compared at equal measured latency: of the two that meet the target,
    the one keeping more of the importance (:func:`~fxprune.plan.budget.kept_importance`: normalised scores
    weighted by FLOPs per channel and by parameters per channel, the smaller share; unweighted, the share of
    channels kept would favour the per-ms ranking, which maximises it per millisecond). A latency model's
    per-channel costs can be wrong for a model (small ones especially), and then its ranking removes more
    than the latency needs.

    Why at equal latency, and how. Either ranking keeps more importance the more latency it is allowed, so
    two plans that landed at different measured ratios compare their latencies as much as their rankings
    (per ms 0.568 kept at 0.662 against importance 0.469 at 0.607, ResNet-20 at a target of 0.7: the plan
    that landed higher won). Both searches aim at the same band, but land anywhere in it (and outside it
    when a search runs out of steps). Two ways to remove the difference were set aside:

    - importance per unit of measured latency (kept / ratio) assumes importance falls in proportion to
      latency. It does not: a ranking removes its least important channels first, so the importance kept
      is concave in the latency allowed and kept / ratio grows as the plan shrinks; the rule would favour
      whichever plan landed lower, by an amount that depends on the model, not on the rankings;
    - re-planning the lower one up to the other's latency and timing it costs more timings, each read
      with a noise of a few per cent, about the size of the gap it means to close.

    Instead, each ranking is compared at the lower of the two measured ratios, ``r``, a latency both are
    known to reach. The ranking that landed lower keeps its plan; for the one that landed higher, the
    budget at which it would measure ``r`` is read off its own search's measurements the way the search
    reads them (:func:`~fxprune.cost.latency.budget_at`: the secant within the bracket of ``r``, else the
    median miss), no larger than the budget of its plan, and planned; the importance that plan keeps is
    exact (scores, no timing). The larger of the two at ``r`` wins (the per-ms plan on a tie, as before),
    and the winner's own searched plan is returned: if the higher ranking wins, its plan keeps still more
    at its own (measured, passing) latency. Only the latency comparison moves; nothing is tuned on
    accuracy after fine-tuning.

    ``plan.meta`` gets ``ranking``, ``importance_kept`` (each plan's own), ``latency_ratios`` (each plan's
    measured ratio), ``compared_at`` (``r``) and ``importance_at`` (each ranking's importance kept at ``r``)."""
    other, other_history = search_latency(model, graph, latency, planner=lambda f: planner(flops=f),
                                          **{k: v for k, v in options.items() if k in _SEARCH_OPTIONS})
    scores = planner.scores()
    found = {"per ms": (plan, history, "predicted", lambda t: planner(latency=t)),
             "importance": (other, other_history, "flops", lambda f: planner(flops=f))}
    kept = {k: kept_importance(graph, scores, p) for k, (p, *_) in found.items()}
    ratios = {k: p.meta["latency_ratio"] for k, (p, *_) in found.items()}
    met = {k: r <= latency for k, r in ratios.items()}
    at = min(ratios.values())
    kept_at = dict(kept)
    if all(met.values()) and ratios["per ms"] != ratios["importance"]:
        higher = max(ratios, key=ratios.get)
        p, rows, key, plan_budget = found[higher]
        budget = min(p.meta["latency_budget" if key == "predicted" else "flops_budget"],
                     budget_at([(r[key], r["ratio"]) for r in rows], at))
        kept_at[higher] = min(kept[higher], kept_importance(graph, scores, quiet(plan_budget)(budget)))
    ranking = "importance" if met["importance"] and (not met["per ms"] or kept_at["importance"] > kept_at["per ms"]) \
        else "per ms"
    best = found[ranking][0]
    best.meta.update({"ranking": ranking, "importance_kept": {k: round(v, 4) for k, v in kept.items()},
                      "latency_ratios": ratios, "compared_at": at,
                      "importance_at": {k: round(v, 4) for k, v in kept_at.items()}})
    history = [{**r, "ranking": "per ms"} for r in history] + [{**r, "ranking": "importance"} for r in other_history]
    return best, history


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
