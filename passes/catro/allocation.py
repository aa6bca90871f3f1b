"""CATRO's outer stage: keep counts per group, spent by the one budget search.

Part of :mod:`fxprune.passes.catro`.
"""
from __future__ import annotations

import heapq

import numpy as np

from fxprune.errors import ConfigError
from fxprune.plan import Budget, keep_mask, search
from fxprune.plan.budget import budget_measure, search_rounded, slice_rounding

# --- outer stage --------------------------------------------------------------------------------

def allocate(graph, groups, curves, kmin, budget: Budget, *, sets, price: str = "flops"):
    """Keep counts per group, and the budget they meet: the greedy energy-per-FLOP removal order, cut
    where ``budget`` is met, each count rounded by its ``round_to`` (retried with the relaxed fast counts
    where the fast ones cannot meet it: the budget returned says which).

    ``curves[g]`` is :func:`~.trace_ratio.energy_curve`; ``kmin[g]`` the least each group keeps;
    ``sets(g, k)`` gives the chosen ``k``-set (for exact FLOPs of non-nested sets). The order
    goes to the one budget search (:func:`fxprune.plan.search`).
    """
    measure, _, _ = budget_measure(graph, budget)
    full = np.ones(graph.num_channels, dtype=bool)
    base = measure(full)
    delta = {}
    for g in groups:
        one = full.copy()
        one[graph.offsets[g.name]] = False
        delta[g.name] = max(base - measure(one), 1e-9)
    k = {g.name: g.size for g in groups}
    sizes = dict(k)
    heap = []

    def push(name):
        if k[name] > kmin[name]:
            loss = curves[name][k[name]] - curves[name][k[name] - 1]
            key = {"flops": loss / delta[name], "energy": loss, "uniform": -k[name] / sizes[name]}[price]
            heapq.heappush(heap, (key, name))

    for g in groups:
        push(g.name)
    steps = []
    while heap:
        _, name = heapq.heappop(heap)
        k[name] -= 1
        steps.append(name)
        push(name)

    slices = slice_rounding(budget)

    def mask(counts):   # as the plan will be: each value keeps a channel, slices rounded (keep_mask)
        kept = {g.name: sets(g, counts[g.name]).numpy() for g in groups if counts[g.name] < g.size}
        order = {g.name: keep_order(g.size, kept.get(g.name, range(g.size))) for g in groups}
        return keep_mask(graph, groups, order, counts, slices)

    found, budget = search_rounded(budget, lambda budget: search(
        graph, groups, steps, mask, budget, lambda g, removed: budget.rounded(g, g.size - removed)))
    if not found.met:
        raise ConfigError("the budget cannot be met: every group at its floor still exceeds it. "
                          "Lower floor= / min_keep= or ignore fewer groups.")
    return found.counts, budget


def keep_order(size: int, kept) -> np.ndarray:
    """Removal order for :func:`~fxprune.plan.keep_mask` that keeps exactly ``kept``: the others first."""
    kept = np.unique(np.asarray(kept, dtype=np.int64))
    return np.concatenate([np.setdiff1d(np.arange(size), kept), kept])
