"""CATRO as a method: :func:`score` (the starting ranking) and :func:`plan` (the two stages).

Part of :mod:`fxprune.passes.catro`.
"""
from __future__ import annotations

import warnings
from dataclasses import replace

import numpy as np
import torch
from tqdm.auto import tqdm

from fxprune.errors import ConfigError
from fxprune.plan import Budget, Plan, ignored_groups, keep_mask
from fxprune.plan.budget import budget_measure, relaxed_rounding, slice_rounding
from fxprune.verify.masked import FEATURE_POINTS

from ..curl import check_like_examples
from .allocation import allocate, keep_order
from .data import collect
from .features import backward_output, group_stats, order_by_depth
from .trace_ratio import OBJECTIVES, choose, energy_curve

ALLOCATIONS = ("uniform", "greedy")
FEATURES = ("output", "own")
SPACES = ("logits", "probs")


def score(graph, data=None, seed=0, *, samples_per_class: int = 16, classes=None, pool_size: int = 1,
          eps: float = 1e-12, point: str = "consumed") -> dict[str, torch.Tensor]:
    """Per-channel ``b_j / (w_j + eps)`` on the unpruned network (dead channels score 0).

    This is the inner stage's starting ranking, for use with :func:`fxprune.make_plan`;
    ``compile(method="catro")`` runs the full two-stage method (:func:`plan`) instead.
    """
    inputs, labels = collect(data, samples_per_class, classes)
    check_like_examples(graph, inputs)
    groups = graph.prunable_groups()
    stats = group_stats(graph, groups, inputs, labels, pool_size=pool_size, point=_checked_point(point))
    out = {}
    for g in groups:
        b, w = stats[g.name]
        s = b / (w + eps)
        s[(b + w) <= eps] = 0.0
        out[g.name] = s.float()
    return out


def plan(graph, data=None, seed=0, *, ratio=None, flops=None, params=None, round_to=None, min_keep: int = 1,
         floor: float = 0.0, ignore=(), meta=None, samples_per_class: int = 16, classes=None, pool_size: int = 1,
         max_iter: int = 10, eps: float = 1e-12, sequential: bool = True, allocation: str = "uniform",
         objective: str = "ratio", reg: float = 0.0, features: str = "output", space: str = "logits",
         step: float = 0.05, point: str = "consumed", progress: bool = True) -> Plan:
    """CATRO's two-stage selection under one budget (``ratio``, ``flops`` or ``params``); see the module docstring.

    Measured on digits (``tests/digits.py`` SmallResNet trained with seeds 0-2, ``flops=0.5``,
    test accuracy right after the cut / after 10 cross-entropy steps on 320 samples, mean +- std
    over the models): ``features="output"`` (the default, 16 per class) 0.35 +- 0.04 / 0.82 +- 0.01;
    the same with 32 per class 0.28 +- 0.11 / 0.68 +- 0.14 and with ``space="probs"`` 0.51 +- 0.07 /
    0.77 +- 0.02; ``features="own"`` (the Dinkelbach reconstruction, 32 per class) 0.21 +- 0.06 /
    0.54 +- 0.17, with ``objective="between"`` 0.27 +- 0.03 / 0.69 +- 0.13; ``random`` (3 runs per
    model) 0.13 +- 0.03 / 0.65 +- 0.18; ``l2`` 0.40 +- 0.09 / 0.78 +- 0.10. The short fine-tune is
    noisy (one ``random`` run reaches 0.92): the default beats ``random``'s mean on every model
    tried (6), by 0.04 to 0.24, not every single ``random`` draw.

        >>> import torch, fxprune
        >>> net = torch.nn.Sequential(torch.nn.Conv2d(1, 8, 3), torch.nn.ReLU(), torch.nn.Flatten(),
        ...                           torch.nn.Linear(8 * 36, 3)).eval()
        >>> x, y = torch.randn(30, 1, 8, 8), torch.arange(30) % 3
        >>> p = plan(fxprune.analyze(net, (x[:1],)), data=(x, y), ratio=0.5, progress=False)
        >>> [len(v) for v in p.keep.values()]
        [4]
    """
    budget = Budget(ratio=ratio, flops=flops, params=params, floor=floor, min_keep=min_keep, round_to=round_to)
    if allocation == "uniform" or ratio is not None:
        budget = _uniform_rounding(budget)
    if not isinstance(pool_size, int) or pool_size < 1:
        raise ConfigError(f"pool_size={pool_size} must be a positive integer")
    if allocation not in ALLOCATIONS:
        raise ConfigError(f"allocation='{allocation}' must be one of {ALLOCATIONS}")
    if objective not in OBJECTIVES:
        raise ConfigError(f"objective='{objective}' must be one of {OBJECTIVES}")
    if features not in FEATURES:
        raise ConfigError(f"features='{features}' must be one of {FEATURES}")
    if space not in SPACES:
        raise ConfigError(f"space='{space}' must be one of {SPACES}")
    if not 0 <= step < 1:
        raise ConfigError(f"step={step} must be in [0, 1): the fraction of a group removed per elimination round")
    _checked_point(point)
    if not reg >= 0:
        raise ConfigError(f"reg={reg} must be >= 0 (the ridge added to the within-class scatter, times its mean trace)")
    inputs, labels = collect(data, samples_per_class, classes)
    check_like_examples(graph, inputs)
    skipped = ignored_groups(graph, ignore)
    groups = [g for g in graph.prunable_groups() if g.name not in skipped]
    groups = order_by_depth(graph, groups)
    kmin = {g.name: budget.min_kept(g) for g in groups}
    bar = tqdm(total=2 * len(groups), desc="catro", unit="group", disable=not progress, leave=False)
    with bar:
        bar.set_postfix(stage="scatter")
        stats = group_stats(graph, groups, inputs, labels, pool_size=pool_size, point=point)
        cache: dict = {}

        def best(g, k):
            key = (g.name, k)
            if key not in cache:
                b, w = stats[g.name]
                cache[key] = choose(b, w, k, g.pinned, objective, eps, max_iter, reg)
            return cache[key]

        if ratio is not None:
            counts = {g.name: budget.rounded(g, max(g.size - int(round(ratio * g.size)), kmin[g.name]))
                      for g in groups}
            bar.update(len(groups))
        else:
            curves = {}
            for g in groups:
                b, w = stats[g.name]
                curves[g.name] = energy_curve(b, w, g.pinned, eps, max_iter, objective, reg)
                bar.update(1)
            bar.set_postfix(stage="allocate")
            counts, budget = allocate(graph, groups, curves, kmin, budget, sets=best,
                                      price={"greedy": "flops", "uniform": "uniform"}[allocation])
        bar.set_postfix(stage="select")
        drop = torch.zeros(graph.num_channels, dtype=torch.bool)
        keep: dict[str, list[int]] = {}
        for g in groups:
            k = counts[g.name]
            if k < g.size:
                if features == "output":
                    sel = backward_output(graph, g, k, inputs, labels, base_drop=drop if sequential else None, eps=eps,
                                          space=space, step=step)
                elif sequential and bool(drop.any()):
                    b, w = group_stats(graph, [g], inputs, labels, base_drop=drop, pool_size=pool_size,
                                       point=point)[g.name]
                    sel = choose(b, w, k, g.pinned, objective, eps, max_iter, reg)
                else:
                    sel = best(g, k)
                keep[g.name] = sel.tolist()
                local = torch.ones(g.size, dtype=torch.bool)
                local[sel] = False
                drop[graph.offsets[g.name]:graph.offsets[g.name] + g.size] = local
            bar.update(1)
    # a value holding only a slice of a group must not lose all of it (as make_plan does)
    order = {g.name: keep_order(g.size, keep.get(g.name, range(g.size))) for g in groups}
    final = keep_mask(graph, groups, order, {g.name: len(keep.get(g.name, range(g.size))) for g in groups},
                      slice_rounding(budget))
    if ratio is None:   # the channels chosen in sequence are not the ones the allocation counted with
        measure, target, base = budget_measure(graph, budget)
        cost = measure(final)
        if cost > target * 1.01:
            what = "FLOPs" if budget.flops is not None else "parameters"
            warnings.warn(f"CATRO's channels keep {cost / base:.1%} of the {what} where the budget allows "
                          f"{target / base:.1%}: a value its channel choice left empty (a chunk of a group) keeps "
                          "its best channel; give a lower budget to meet this one", stacklevel=2)
    keep = {}
    for g in groups:
        local = np.nonzero(final[graph.offsets[g.name]:graph.offsets[g.name] + g.size])[0]
        if len(local) < g.size:
            keep[g.name] = local.tolist()
    info = {**budget.info(), "samples_per_class": samples_per_class,
            "classes": None if classes is None else sorted(int(c) for c in classes), "pool_size": pool_size,
            "sequential": sequential, "allocation": allocation, "objective": objective, "features": features,
            "space": space, "step": step, "reg": reg, "point": point}
    info.update(meta or {})
    info.setdefault("method", "catro")
    return Plan(keep, {k: graph.groups[k].size for k in keep}, info)


def _uniform_rounding(budget: Budget) -> Budget:
    """[I] A uniform split rounds with the relaxed fast counts from the start (counts under a group's first
    fast count stay as they are, :meth:`~fxprune.cost.latency_table.FastCounts.relaxed`). On the strict steps
    a group one block wide cannot follow the split at all, and the groups that can are cut further to meet
    the budget: on the Fashion-MNIST ResNet-20 of ``tools/bench_accuracy.py`` (seed-0 base, ``flops=0.5``, the
    benchmark's fine-tuning with 2 seeds) the strict steps left stage 1's groups of 16 whole and stage 3's
    residual stream at 16 of 64 (0.48 of the FLOPs): 0.830 and 0.833 accuracy at 0.55x the original's ORT
    latency at batch 1 and 0.62x at batch 64; relaxed, every group follows the split (0.40 of the FLOPs,
    stage 1 at 8 of 16, which ORT pads back to 16): 0.868 and 0.870 at 0.58-0.62x and 0.66x (busy
    machine, side by side with the original). Other roundings are kept."""
    relaxed = relaxed_rounding(budget.round_to)
    return replace(budget, round_to=relaxed) if relaxed is not None else budget


def _checked_point(point):
    if point not in FEATURE_POINTS:
        raise ConfigError(f"point='{point}' must be one of {FEATURE_POINTS}: the values the next layers read "
                          "(after BN and the activation), the BN outputs, or the conv outputs before BN")
    return point


score.plan = plan


# --- sub-task mode ----------------------------------------------------------------------------------
