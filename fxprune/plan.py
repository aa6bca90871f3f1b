"""Plans: which channels of each group to keep, and the budgets that choose them.

A :class:`Plan` maps group name to the sorted indices kept. It is plain data: JSON in
and out, and enough to rebuild the pruned model from the original with
:func:`fxprune.apply`. :func:`make_plan` turns per-group scores into a plan under one
budget:

* ``ratio=r`` removes ``round(r * size)`` channels of every prunable group (as
  Torch-Pruning's ``pruning_ratio``);
* ``flops=f`` / ``params=p`` keep that fraction of the model's FLOPs / parameters,
  found by a binary search over one global ranking of all channels.

**Normalisation.** Before the global ranking, each group's scores are divided by
their mean over the group's prunable channels. A channel is then ranked by how it
compares with its own group, so groups whose raw scores live on different scales
(a wide residual stream summing many members, a narrow bottleneck) compete fairly.

Floors: every group keeps at least ``max(min_keep, ceil(floor * size))`` channels (at
least one), and ``round_to`` rounds each group's kept count up to a multiple.

Example::

    >>> import torch, fxprune
    >>> net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU(), torch.nn.Conv2d(8, 4, 1))
    >>> graph = fxprune.analyze(net, (torch.randn(1, 3, 8, 8),))
    >>> scores = {name: torch.arange(g.size, dtype=torch.float) for name, g in graph.groups.items()}
    >>> make_plan(graph, scores, ratio=0.5).keep
    {'0': [4, 5, 6, 7]}
"""
from __future__ import annotations

import json
import math
import warnings
from dataclasses import dataclass, field

import numpy as np
import torch

from .cost import CostModel
from .errors import ConfigError, PlanError
from .gcpause import paused_gc


@dataclass
class Plan:
    """Kept channel indices per group; groups not listed keep every channel."""

    keep: dict[str, list[int]]
    sizes: dict[str, int]
    meta: dict = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps({"format": "fxprune.plan/1", "keep": self.keep, "sizes": self.sizes, "meta": self.meta})

    @classmethod
    def from_json(cls, text: str) -> "Plan":
        try:
            data = json.loads(text)
            keep = {str(k): [int(i) for i in v] for k, v in data["keep"].items()}
            sizes = {str(k): int(v) for k, v in data["sizes"].items()}
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise PlanError(f"not an fxprune plan: {exc}. Write plans with Plan.to_json().") from exc
        return cls(keep, sizes, data.get("meta", {}))

    def save(self, path) -> None:
        with open(path, "w") as f:
            f.write(self.to_json())

    @classmethod
    def load(cls, path) -> "Plan":
        with open(path) as f:
            return cls.from_json(f.read())

    def mask(self, graph) -> torch.Tensor:
        """The global keep-mask over ``graph``'s channels; raises PlanError on any mismatch."""
        keep = np.ones(graph.num_channels, dtype=bool)
        for name, kept in self.keep.items():
            g = graph.groups.get(name)
            if g is None:
                raise PlanError(f"the plan names group '{name}', which this model does not have. "
                                "Apply a plan to the architecture (and example input shapes) it was made for.")
            if g.size != self.sizes.get(name):
                raise PlanError(f"group '{name}' has {g.size} channels in this model but {self.sizes.get(name)} "
                                "in the plan: the plan was made for another architecture.")
            idx = np.asarray(kept, dtype=np.int64)
            if idx.size == 0:
                raise PlanError(f"the plan keeps no channel of group '{name}': every group keeps at least one.")
            local = np.zeros(g.size, dtype=bool)
            if idx.min() >= 0 and idx.max() < g.size:
                local[idx] = True
            if idx.min() < 0 or idx.max() >= g.size or local.sum() != idx.size:
                raise PlanError(f"the plan's indices for group '{name}' are out of range or repeated.")
            if (g.pinned.numpy() & ~local).any():
                raise PlanError(f"the plan removes pinned channels of group '{name}' "
                                f"({'; '.join(str(p) for p in g.pins[:2])}).")
            off = graph.offsets[name]
            keep[off:off + g.size] = local
        return torch.from_numpy(keep)

    @property
    def removed(self) -> int:
        return sum(self.sizes[k] - len(v) for k, v in self.keep.items())


def normalized(scores: torch.Tensor, prunable: torch.Tensor) -> torch.Tensor:
    """Scores divided by their mean over the prunable channels (see the module docstring)."""
    s = scores.double()
    mean = s[prunable].mean() if bool(prunable.any()) else s.mean()
    return s / (mean.abs() + 1e-12)


@paused_gc
def make_plan(graph, scores: dict[str, torch.Tensor], *, ratio=None, flops=None, params=None,
              round_to=None, min_keep: int = 1, floor: float = 0.0, ignore=(), meta=None) -> Plan:
    """Choose the channels to keep under exactly one budget (see the module docstring).

    ``scores`` maps each prunable group's name to a tensor of its size (higher means
    more important). ``ignore`` lists group names, module names or modules whose
    groups stay whole.
    """
    check_budget(ratio=ratio, flops=flops, params=params, round_to=round_to, floor=floor)

    ignored = ignored_groups(graph, ignore)
    groups = [g for g in graph.groups.values() if g.prunable > 0 and g.name not in ignored]
    for g in groups:
        s = scores.get(g.name)
        if s is None or tuple(s.shape) != (g.size,):
            raise ConfigError(f"the criterion gave no scores of shape ({g.size},) for group '{g.name}'")
        if not bool(torch.isfinite(s).all()):
            raise ConfigError(f"the criterion gave non-finite scores for group '{g.name}'")

    min_kept = {g.name: max(1, min_keep, math.ceil(floor * g.size), int(g.pinned.sum())) for g in groups}
    order = {g.name: _ranked(g, scores[g.name]) for g in groups}

    def kept_count(g, removed):
        n = max(g.size - removed, min_kept[g.name])
        if round_to:
            n = min(g.size, math.ceil(n / round_to) * round_to)
        return n

    if ratio is not None:
        counts = {g.name: kept_count(g, min(g.prunable, int(round(ratio * g.size)))) for g in groups}
    else:
        counts = _search(graph, groups, scores, order, kept_count, flops, params)
    info = {"ratio": ratio, "flops": flops, "params": params, "round_to": round_to, "floor": floor}
    info.update(meta or {})
    return plan_from_mask(graph, groups, keep_mask(graph, groups, order, counts), info)


def check_budget(*, ratio=None, flops=None, params=None, round_to=None, floor: float = 0.0) -> None:
    """Raise :class:`ConfigError` unless exactly one budget is given and every value is in range."""
    if sum(b is not None for b in (ratio, flops, params)) != 1:
        raise ConfigError("give exactly one budget: ratio= (fraction of each group removed), "
                          "flops= or params= (fraction of the model kept)")
    if ratio is not None and not 0 <= ratio < 1:
        raise ConfigError(f"ratio={ratio} is out of range: it is the fraction of each group removed, in [0, 1)")
    for name, b in (("flops", flops), ("params", params)):
        if b is not None and not 0 < b <= 1:
            raise ConfigError(f"{name}={b} is out of range: it is the fraction of the model kept, in (0, 1]")
    if round_to is not None and (not isinstance(round_to, int) or round_to < 1):
        raise ConfigError(f"round_to={round_to} must be a positive integer")
    if not 0 <= floor < 1:
        raise ConfigError(f"floor={floor} must be in [0, 1): the fraction of each group always kept")


def plan_from_mask(graph, groups, mask: np.ndarray, meta: dict) -> Plan:
    """The :class:`Plan` that keeps the channels of ``groups`` set in the global ``mask``."""
    keep = {}
    for g in groups:
        local = np.nonzero(mask[graph.offsets[g.name]:graph.offsets[g.name] + g.size])[0]
        if len(local) < g.size:
            keep[g.name] = local.tolist()
    return Plan(keep, {k: graph.groups[k].size for k in keep}, meta)


def smallest_meeting(cost_after, n: int, target: float) -> int | None:
    """The smallest ``k`` in ``0..n`` with ``cost_after(k) <= target`` (``cost_after`` must not
    increase with ``k``), or None when even ``n`` misses the target. A binary search."""
    if cost_after(n) > target:
        return None
    lo, hi = 0, n
    while lo < hi:
        mid = (lo + hi) // 2
        if cost_after(mid) <= target:
            hi = mid
        else:
            lo = mid + 1
    return lo


def keep_mask(graph, groups, order, counts) -> np.ndarray:
    """Keep the top ``counts[g]`` channels of each group, then make sure no tensor is left empty.

    A value can hold a slice of a group (a ``chunk`` of a shuffled stream): the group
    keeps its floor, yet that slice could lose every channel. Such a slice gets back its
    best-ranked channel.
    """
    keep = np.ones(graph.num_channels, dtype=bool)
    rank = np.zeros(graph.num_channels)
    for g in groups:
        off = graph.offsets[g.name]
        keep[off + order[g.name][:g.size - counts[g.name]]] = False
        rank[off + order[g.name]] = np.arange(g.size)
    for channels in _value_channel_sets(graph):
        if not keep[channels].any():
            keep[channels[np.argmax(rank[channels])]] = True
    return keep


def _value_channel_sets(graph) -> list[np.ndarray]:
    """The distinct channel sets of every value whose positions are all prunable channels."""
    cached = getattr(graph, "_value_channel_sets", None)
    if cached is not None:
        return cached
    seen, out = set(), []
    for node in graph.module.graph.nodes:
        labels = node.meta.get("fxprune")
        for lab in labels if isinstance(labels, tuple) else (labels,):
            if isinstance(lab, torch.Tensor) and lab.numel():
                channels = lab.numpy()
                if channels.min() < 0:
                    continue
                channels = np.sort(channels, axis=None)  # np.unique's hashing is slow on small arrays
                channels = channels[np.concatenate(([True], channels[1:] != channels[:-1]))]
                key = channels.tobytes()
                if key not in seen:
                    seen.add(key)
                    out.append(channels)
    graph._value_channel_sets = out
    return out


def _ranked(g, s: torch.Tensor) -> np.ndarray:
    """Channel indices from least to most important; pinned channels last (always kept)."""
    key = s.double().clone()
    key[g.pinned] = float("inf")
    return np.lexsort((np.arange(g.size), key.numpy()))


def _search(graph, groups, scores, order, kept_count, flops, params):
    cost = CostModel(graph)
    measure, target = (cost.flops, flops * cost.base_flops) if flops is not None else (cost.params, params * cost.base_params)
    # one global ranking of every removable channel by normalised score
    cands = []
    for g in groups:
        norm = normalized(scores[g.name], ~g.pinned)
        for rank, i in enumerate(order[g.name][:max(0, g.size - kept_count(g, g.size))]):
            cands.append((float(norm[i]), g.name, rank))
    cands.sort()

    def counts_after(k):
        removed = {g.name: 0 for g in groups}
        for _, name, _ in cands[:k]:
            removed[name] += 1
        return {g.name: kept_count(g, removed[g.name]) for g in groups}

    def cost_after(k):
        return measure(keep_mask(graph, groups, order, counts_after(k)))

    k = smallest_meeting(cost_after, len(cands), target)
    if k is None:
        warnings.warn(f"the budget cannot be met: with every prunable channel removed the model keeps "
                      f"{cost_after(len(cands)) / (cost.base_flops if flops is not None else cost.base_params):.1%}",
                      stacklevel=3)
        return counts_after(len(cands))
    return counts_after(k)


def ignored_groups(graph, ignore) -> set[str]:
    """Names of the groups that ``ignore`` (group names, module names or modules) leaves whole."""
    names = set()
    prefixes = []
    for item in ignore or ():
        if isinstance(item, torch.nn.Module):
            found = getattr(graph, "source_names", {}).get(id(item))
            prefixes.append(found)
            if found is None:
                raise ConfigError(f"ignore= lists a {type(item).__name__} that is not part of the model; "
                                  "give module names (e.g. 'layer4.1.conv2') or group names")
        elif isinstance(item, str):
            if item in graph.groups:
                names.add(item)
            else:
                prefixes.append(item)
        else:
            raise ConfigError(f"ignore= takes group names, module names or modules, not {type(item).__name__}")
    for g in graph.groups.values():
        for m in g.members:
            if any(m.param == p or m.param.startswith(p + ".") for p in prefixes):
                names.add(g.name)
    return names

