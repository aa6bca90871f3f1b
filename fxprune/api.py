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
from .cost.latency import fit_latency, search_latency
from .cost.flops import CostModel
from .cost.latency_table import LatencyModel
from .couple import GROUPS
from .couple.analysis import widths_on_block
from .errors import ConfigError, TraceError
from .ir import ChannelGraph
from .partial import compile_parts
from .pipeline import Pipeline, warn_if_relaxed
from .plan import Plan
from .plan.budget import DEFAULT, RANKINGS, is_default


def analyze(model: torch.nn.Module, example_inputs, *, leaf_modules=(), concrete_args=None,
            capture: str = "auto", output: str = "graph", heads: str = "dims",
            groups: str = "balanced") -> ChannelGraph:
    """Capture ``model`` and find its channel groups (see :mod:`fxprune.ir`); with ``output="module"``,
    with the pins of that output (literals in the model's code, see :func:`compile`); ``heads`` as in
    :func:`compile`, ``groups`` as in :func:`fxprune.couple.couple` (``"balanced"``, ``"blocked"``, ``"whole"``)."""
    return Pipeline(model, example_inputs, leaf_modules=leaf_modules, concrete_args=concrete_args,
                    capture=capture, output=output, heads=heads, groups=groups).analyze()


def compile(model: torch.nn.Module, example_inputs, method="l2", *, ratio=None, flops=None, params=None,
            latency=None, round_to=DEFAULT, floor: float = 0.0, min_keep: int = 1, ignore=(), data=None,
            verify: bool = True, onnx: bool = True, leaf_modules=(), concrete_args=None, seed: int = 0,
            method_options: dict | None = None, latency_options: dict | None = None,
            latency_model=None, capture: str = "auto", output: str = "graph", heads: str = "dims",
            groups: str = "auto") -> torch.nn.Module:
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
    ORT kernel times cached per machine, unless given as ``latency_model``): channels ranked
    latency-weighted (as ``flops=`` on fast counts, below), removed until the model predicts ``t`` of the
    original's latency,
    at its fast counts; the plan is exported, timed against the original and re-planned from the
    measured misses until one measures within ``[0.9, 0.96] × latency``
    (:func:`fxprune.cost.latency.fit_latency`). ``latency_options={"ranking": "importance"}`` ranks
    channels by importance alone, ``{"ranking": "per ms"}`` by importance per predicted millisecond (HALP's
    ranking), measured and corrected the same way; ``report.plan.meta["ranking"]`` says which. At equal
    measured latency on Fashion-MNIST (``tools/results/equal_latency.md``) the per-ms ranking never
    fine-tuned better than importance alone (it empties the groups that cost most per channel, often the
    early, full-resolution ones); the latency-weighted ranking fine-tuned a MobileNet-style net 4.5 points
    better than importance alone and tied on ResNet-20. ``latency_model=False``, and methods that
    plan themselves (CURL, CATRO), fit the FLOPs budget instead, each candidate timed
    (:func:`fxprune.cost.latency.search_latency`).
    ``latency_options`` go to the search (``steps``, ``repeats``, ``threads``, ``progress``).
    ``round_to`` rounds each group's kept count up: to a multiple, or with ``"fast"`` to a count ORT
    runs well (from the latency model). When not given, a model with 2-d convolutions gets ``"fast"``
    (:func:`fxprune.plan.budget.default_round_to`; ``$FXPRUNE_ROUND_TO`` overrides it), whichever
    method plans; where the fast counts cannot reach the budget (a small model whose groups are one
    block wide), counts below a group's first fast count stay as the budget needs, the others still
    rounded (:meth:`~fxprune.cost.latency_table.FastCounts.relaxed`, with a warning). On fast counts a
    ``flops=`` budget ranks channels ``"latency-weighted"`` (:func:`fxprune.plan.make_plan`: importance over
    the square root of the group's predicted latency per FLOP, every group keeping a quarter where the budget
    allows), so the FLOPs it removes are those ORT spends most time on; ``latency_options={"ranking":
    "importance"}`` ranks by importance alone (training-time methods' cuts always do).
    ``round_to=None`` does not round. ``data`` feeds data-driven
    criteria. With ``verify`` (the default) the result is checked by
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
    ``groups`` says what a grouped (not depthwise) conv loses: ``"balanced"`` the same number of channels
    from each group; ``"whole"`` whole groups (``groups`` shrinks, each group keeps its width); ``"blocked"``
    whole groups where their widths are multiples of ORT's NCHWc block on this machine (16 on AVX-512, 8 on
    AVX2: ORT runs such a conv in its blocked layout only while they stay so; the plan records the block),
    balanced counts elsewhere. ``"auto"`` (the default) is ``"blocked"`` or
    ``"balanced"``, whichever the latency model predicts faster for an ``l2`` plan at this budget (for
    ``latency=``: the one whose plan meets it, then the one that keeps more FLOPs), where the model has
    such groups and counts are rounded to fast counts; else ``"balanced"`` (and always for the methods
    that train towards a cut, which schedule it on the graph ``analyze`` gives). ``report.plan.meta["groups"]`` says which was taken.
    """
    if isinstance(method, str):
        criterion, name = passes.get(method), method
    elif callable(method):
        criterion, name = method, getattr(method, "__name__", "custom")
    else:
        raise ConfigError(f"method must be a registered name or a callable, not {type(method).__name__}")
    parts = dict(ratio=ratio, flops=flops, params=params, round_to=None if is_default(round_to) else round_to,
                 floor=floor, min_keep=min_keep,
                 ignore=ignore, seed=seed, method_options=method_options, verify=verify, onnx=onnx,
                 leaf_modules=leaf_modules, heads=heads, groups="balanced" if groups == "auto" else groups)
    if groups not in ("auto",) + GROUPS:
        raise ConfigError(f"groups must be one of {('auto',) + GROUPS}, not {groups!r}")
    if capture == "parts":
        _check_parts(data, latency, latency_model, output, "capture='parts'")
        return compile_parts(model, example_inputs, criterion, name, **parts)
    pipe = Pipeline(model, example_inputs, leaf_modules=leaf_modules, concrete_args=concrete_args, verify=verify,
                    onnx=onnx, capture=capture, output=output, heads=heads,
                    groups="balanced" if groups == "auto" else groups)
    if capture == "auto":
        try:
            pipe.analyze()
        except TraceError as exc:  # neither tracer follows the root: prune the parts that they follow
            why = "the root was not captured: " + " ".join(line[:400] for line in str(exc).splitlines()[:2])
            _check_parts(data, latency, latency_model, output, why)
            return compile_parts(model, example_inputs, criterion, name, why=why, **parts)
    if latency is not None and any(b is not None for b in (ratio, flops, params)):
        raise ConfigError("give exactly one budget: latency= cannot be combined with ratio=, flops= or params=")
    own_plan = callable(getattr(criterion, "plan", None))   # CURL, CATRO: the latency model only rounds their counts
    options = dict(latency_options or {})
    ranking = options.pop("ranking", None)
    _check_ranking(ranking, own_plan, name, latency_model)
    if latency is not None:
        if latency_model is None and not own_plan:
            latency_model = True
    by_default = is_default(round_to)
    round_to, latency_model = pipe.rounding(round_to, latency_model, strict=latency is not None)
    if groups == "auto" and round_to == "fast" and isinstance(latency_model, LatencyModel) and \
            not getattr(criterion, "relaxed_fast_counts", False):
        pipe, latency_model = _choose_groups(pipe, latency_model, dict(ratio=ratio, flops=flops, params=params,
                                                                       latency=latency),
                                             dict(min_keep=min_keep, floor=floor, ignore=ignore))
    planner = pipe.planner(criterion, name, data=data, seed=seed, method_options=method_options, ignore=ignore,
                           min_keep=min_keep, floor=floor, round_to=round_to, latency_model=latency_model or None,
                           ranking=ranking)
    if latency is None:
        plan = planner(ratio=ratio, flops=flops, params=params)
        warn_if_relaxed(plan, by_default)
        return pipe.build(plan, method=name)
    if latency_model and not own_plan:
        plan, history = fit_latency(model, pipe.graph, latency, planner=lambda t: planner(latency=t), **options)
    else:   # no latency model (CURL, CATRO, latency_model=False): fit the FLOPs budget
        plan, history = search_latency(model, pipe.graph, latency, planner=lambda f: planner(flops=f), **options)
    plan.meta.setdefault("ranking", ranking or "importance")
    return pipe.build(plan, method=name, search=history)


def _choose_groups(pipe: Pipeline, latency_model: LatencyModel, budget: dict, options: dict):
    """``groups="auto"``: ``(pipeline, latency model)`` of the coupling that runs faster, ``"blocked"`` or
    ``pipe``'s ``"balanced"``, judged by an ``l2`` plan at ``budget`` on each: its predicted latency (for a
    latency budget: whether it meets it, then the FLOPs it keeps). Measured side by side, the two orderings
    agreed with ORT on every model tried: whole groups ran timm's regnetz_b16 at 0.58x against 0.69x, balanced counts dpn68 at 0.47x
    against 0.62x (``tools/results/latency.md``)."""
    block = latency_model.block   # ORT's NCHWc block, as the latency model knows it
    widths = [node.meta["fxprune_widths_per_group"] for node in pipe.graph.module.graph.nodes
              if "fxprune_widths_per_group" in node.meta]
    if not any(widths_on_block(k_in, k_out, block) for k_in, k_out in widths):
        return pipe, latency_model
    blocked = Pipeline(pipe.model, pipe.example_inputs, leaf_modules=pipe.leaf_modules, concrete_args=pipe.concrete_args,
                       verify=pipe.verify, onnx=pipe.onnx, capture=pipe.capture, output=pipe.output, heads=pipe.heads,
                       groups="blocked", block=block)
    if not any("fxprune_group_width" in node.meta for node in blocked.graph.module.graph.nodes):
        return pipe, latency_model
    target = budget["latency"]
    figures = []
    for p, lm in ((pipe, latency_model), (blocked, LatencyModel(blocked.graph, batch=latency_model.batch,
                                                                 table=latency_model.table))):
        keep = p.planner(passes.get("l2"), "l2", round_to="fast", latency_model=lm, **options)(**budget).mask(p.graph)
        ratio = lm.latency(keep.numpy()) / lm.base
        if target is None:
            figures.append((ratio,))
        else:   # a plan that meets the target (within its steps) and keeps more FLOPs
            cost = CostModel(p.graph)
            figures.append((0.0 if ratio <= 1.02 * target else ratio, -cost.flops(keep.numpy()) / cost.base_flops))
    return (blocked, lm) if figures[1] < figures[0] else (pipe, latency_model)


def _check_ranking(ranking, own_plan: bool, name: str, latency_model) -> None:
    """Raise :class:`ConfigError` unless ``latency_options["ranking"]`` (None: the default) names a ranking this
    method can use."""
    if ranking is None or ranking == "importance":
        return
    if ranking not in RANKINGS:
        raise ConfigError(f"latency_options ranking={ranking!r}: give one of {', '.join(map(repr, RANKINGS))}")
    if own_plan:
        raise ConfigError(f"method '{name}' chooses its channels itself, so it cannot rank them by latency: "
                          f"drop latency_options ranking={ranking!r} (its latency= fits the FLOPs budget)")
    if latency_model is False:
        raise ConfigError(f"the {ranking!r} ranking needs a latency model: drop latency_model=False, or the ranking")


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
