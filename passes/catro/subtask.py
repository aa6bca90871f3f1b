"""CATRO's sub-task mode: prune for some of the classes, the classifier shrunk to them.

Part of :mod:`fxprune.passes.catro`.
"""
from __future__ import annotations

import torch

from fxprune.errors import ConfigError
from fxprune.pipeline import Pipeline
from fxprune.plan import Plan

from .method import plan


def subtask(model, example_inputs, classes, data, *, flops=None, ratio=None, params=None, verify: bool = True,
            onnx: bool = True, **options):
    """Prune ``model`` for the classes ``classes`` only; the classifier's outputs shrink to them (in that order
    of ascending class index). Returns the pruned ``GraphModule``; its report's plan records the classes
    (checked by mask-equivalence with ``verify``, and in ONNX Runtime with ``onnx`` too).

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
    base = plan(graph, data=data, ratio=ratio, flops=flops, params=params, classes=classes, **options)
    keep = dict(base.keep)
    keep[head.name] = classes
    sub = Plan(keep, {k: graph.groups[k].size for k in keep}, dict(base.meta, subtask=classes))
    pinned = head.pinned
    head.pinned = torch.zeros_like(pinned)  # the output may shrink: that is the point of a sub-task
    try:
        return pipe.build(sub, method="catro (sub-task)")
    finally:
        head.pinned = pinned
