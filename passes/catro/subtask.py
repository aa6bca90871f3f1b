"""CATRO's sub-task mode: prune for some of the classes, the classifier shrunk to them.

Part of :mod:`fxprune.passes.catro`.
"""
from __future__ import annotations

import torch

from fxprune.errors import ConfigError
from fxprune.pipeline import Pipeline, warn_if_relaxed
from fxprune.plan import Plan
from fxprune.plan.budget import DEFAULT, is_default

from .method import score


def subtask(model, example_inputs, classes, data, *, flops=None, ratio=None, params=None, round_to=DEFAULT,
            latency_model=None, seed: int = 0, verify: bool = True, onnx: bool = True, **options):
    """Prune ``model`` for the classes ``classes`` only; the classifier's outputs shrink to them (in that order
    of ascending class index). Returns the pruned ``GraphModule``; its report's plan records the classes
    (checked by mask-equivalence with ``verify``, and in ONNX Runtime with ``onnx`` too). ``round_to`` as in
    :func:`fxprune.compile` (not given: the fast counts for a model with 2-d convolutions, from ``latency_model``, a
    :class:`~fxprune.cost.latency_table.LatencyModel` built when not given); ``options`` go to
    :func:`~fxprune.passes.catro.plan`.

        >>> import torch
        >>> net = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.ReLU(), torch.nn.Flatten(),
        ...                           torch.nn.Linear(4 * 36, 5)).eval()
        >>> x, y = torch.randn(40, 1, 8, 8), torch.arange(40) % 5
        >>> small = subtask(net, (x[:1],), [1, 3], (x, y), ratio=0.5, progress=False)
        >>> small(x[:2]).shape
        torch.Size([2, 2])
    """
    pipe = Pipeline(model, example_inputs, verify=verify, onnx=onnx)
    classes = sorted({int(c) for c in classes})
    graph = pipe.graph
    out_groups = [g for g in graph.groups.values() if any("output" in p.reason for p in g.pins)]
    if len(out_groups) != 1:
        raise ConfigError("sub-task mode needs a model with one classifier output (one output channel group)")
    head = out_groups[0]
    if not classes or classes[0] < 0 or classes[-1] >= head.size:
        raise ConfigError(f"classes={classes} must be indices of the model's {head.size} outputs")
    by_default = is_default(round_to)
    round_to, latency_model = pipe.rounding(round_to, latency_model)
    common = {k: options.pop(k) for k in ("ignore", "min_keep", "floor", "meta") if k in options}
    planner = pipe.planner(score, "catro", data=data, seed=seed, method_options=dict(options, classes=classes),
                           round_to=round_to, latency_model=latency_model, **common)
    base = planner(ratio=ratio, flops=flops, params=params)
    warn_if_relaxed(base, by_default)
    keep = dict(base.keep)
    keep[head.name] = classes
    sub = Plan(keep, {k: graph.groups[k].size for k in keep}, dict(base.meta, subtask=classes))
    pinned = head.pinned
    head.pinned = torch.zeros_like(pinned)  # the output may shrink: that is the point of a sub-task
    try:
        return pipe.build(sub, method="catro (sub-task)")
    finally:
        head.pinned = pinned
