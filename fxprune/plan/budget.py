"""The one budget search: from a removal order to kept counts per group under a budget.

Every planner in fxprune ends here — :func:`make_plan` (a global ranking of normalised
scores), CURL (a global ranking of raw scores) and CATRO (a greedy order) — so budgets,
floors and rounding mean the same everywhere:

* :class:`Budget` holds the user's budget and its options, checked once: ``ratio=r``
  removes ``round(r * size)`` channels of every prunable group (as Torch-Pruning's
  ``pruning_ratio``); ``flops=f`` / ``params=p`` keep that fraction of the model's FLOPs /
  parameters; ``round_to`` rounds each group's kept count up to a multiple; ``floor`` and
  ``min_keep`` bound it from below (:meth:`Budget.min_kept`, the floor written once);
* :func:`search` takes a removal order (one group name per step: "remove that group's next
  channel") and finds the fewest steps that meet the budget, by binary search on a cost
  measure of the global keep-mask (:func:`budget_measure`: :class:`fxprune.cost.CostModel`'s
  FLOPs or parameters);
* :func:`keep_mask` turns kept counts into the global keep-mask and makes sure no value
  of the graph loses all of its channels; :func:`plan_from_mask` writes the :class:`Plan`.

Example::

    >>> import torch, fxprune
    >>> net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU(), torch.nn.Conv2d(8, 4, 1))
    >>> graph = fxprune.analyze(net, (torch.randn(1, 3, 8, 8),))
    >>> scores = {name: torch.arange(g.size, dtype=torch.float) for name, g in graph.groups.items()}
    >>> make_plan(graph, scores, ratio=0.5).keep
    {'0': [4, 5, 6, 7]}
    >>> make_plan(graph, scores, flops=0.5).keep     # both convs scale with the kept share of group 0
    {'0': [4, 5, 6, 7]}
"""
from __future__ import annotations

import math
import os
import warnings
from dataclasses import dataclass, replace

import numpy as np
import torch

from ..cost import CostModel
from ..cost.latency_table import FastCounts, LatencyModel
from ..errors import ConfigError
from ..ops import conv2d_spec
from ..utils import paused_gc
from .plan import Plan


@dataclass(frozen=True)
class Budget:
    """One budget (exactly one of ``ratio``, ``flops``, ``params``) and the options every planner shares."""

    ratio: float | None = None
    flops: float | None = None
    params: float | None = None
    latency: float | None = None  # fraction of the predicted ONNX Runtime latency kept (a LatencyModel)
    round_to: object = None  # a multiple, "fast" (counts ONNX Runtime runs well) or (group name, n) -> n
    floor: float = 0.0
    min_keep: int = 1
    missed_fast: bool = False   # the fast counts could not meet it: searched again relaxed (search_rounded)

    def __post_init__(self):
        if sum(b is not None for b in (self.ratio, self.flops, self.params, self.latency)) != 1:
            raise ConfigError("give exactly one budget: ratio= (fraction of each group removed), "
                              "flops=, params= or latency= (fraction of the model kept)")
        if self.ratio is not None and not 0 <= self.ratio < 1:
            raise ConfigError(f"ratio={self.ratio} is out of range: it is the fraction of each group removed, in [0, 1)")
        for name, b in (("flops", self.flops), ("params", self.params), ("latency", self.latency)):
            if b is not None and not 0 < b <= 1:
                raise ConfigError(f"{name}={b} is out of range: it is the fraction of the model kept, in (0, 1]")
        if self.round_to is not None and self.round_to != "fast" and not callable(self.round_to) and (
                not isinstance(self.round_to, int) or self.round_to < 1):
            raise ConfigError(f"round_to={self.round_to!r} must be a positive integer, \"fast\" or a function "
                              "(group name, count) -> count")
        if not 0 <= self.floor < 1:
            raise ConfigError(f"floor={self.floor} must be in [0, 1): the fraction of each group always kept")

    def min_kept(self, g, at_least: int = 0) -> int:
        """The fewest channels group ``g`` keeps: its floor, its pinned channels, ``at_least``, and one."""
        return min(g.size, max(1, self.min_keep, math.ceil(self.floor * g.size), int(g.pinned.sum()), at_least))

    def rounded(self, g, n: int) -> int:
        """``n`` kept channels of ``g`` rounded up by ``round_to`` (at most the group's size): to a multiple,
        or by a function ``(group name, n) -> count`` (``"fast"`` is resolved to one by :func:`make_plan`).

        A group of balanced blocks (``g.blocks``, ``[B, k]``) keeps the same count in every block: ``n``
        is rounded up to ``B`` times a per-block count, and ``round_to`` applies to that count. A group whose
        kernels need a multiple (``g.multiple``) gets one, or keeps all its channels.
        """
        if self.round_to == "fast":
            raise ConfigError('round_to="fast" needs a latency model: plan with make_plan(..., round_to="fast")')
        multiple = getattr(g, "multiple", 1)
        if getattr(g, "blocks", None) is not None:
            b, k = g.blocks.shape
            per = math.ceil(max(n, 1) / b)
            if callable(self.round_to):
                per = math.ceil(int(self.round_to(g.name, b * per)) / b)
            elif self.round_to:
                per = math.ceil(per / self.round_to) * self.round_to
            step = multiple // math.gcd(multiple, b)   # b * per a multiple of ``multiple``
            return b * min(k, math.ceil(per / step) * step)
        if callable(self.round_to):
            n = int(self.round_to(g.name, n))
        elif self.round_to is not None:
            n = math.ceil(n / self.round_to) * self.round_to
        return min(g.size, math.ceil(n / multiple) * multiple)

    def info(self) -> dict:
        round_to = self.round_to if not callable(self.round_to) else getattr(self.round_to, "__name__", "custom")
        info = {"ratio": self.ratio, "flops": self.flops, "params": self.params, "round_to": round_to,
                "floor": self.floor}
        if self.latency is not None:
            info["latency"] = self.latency
        if self.missed_fast:
            info["missed_fast"] = True
        return info


def relaxed_rounding(round_to):
    """The relaxed form of ``round_to`` (:meth:`~fxprune.cost.latency_table.FastCounts.relaxed`: counts under a
    group's first fast count left as they are), or None for a rounding that has none (a multiple, None, a form
    already relaxed)."""
    relax = getattr(round_to, "relaxed", None)
    return relax() if callable(relax) else None


def search_rounded(budget: Budget, searched):
    """``searched(budget)`` (a :class:`SearchResult`), and where it misses a FLOPs, parameter or ratio budget
    rounded to the fast counts, ``searched`` again under their relaxed form
    (:meth:`~fxprune.cost.latency_table.FastCounts.relaxed`: counts under a group's first fast count left
    as they are). Returns the result and the budget it was searched under. A latency budget is not
    relaxed: those counts save FLOPs, not time (ORT pads them up to the step).
    """
    found = searched(budget)
    relaxed = relaxed_rounding(budget.round_to) if not found.met and budget.latency is None else None
    if relaxed is not None:
        budget = replace(budget, round_to=relaxed, missed_fast=True)
        found = searched(budget)
    return found, budget


ROUND_TO_ENV = "FXPRUNE_ROUND_TO"
DEFAULT = "default"   # round_to= not given: resolved by default_round_to


def is_default(round_to) -> bool:
    """Whether ``round_to`` was not given (:data:`DEFAULT`): the rounding then chosen is not the user's."""
    return isinstance(round_to, str) and round_to == DEFAULT


def default_round_to(graph):
    """The ``round_to`` that :func:`fxprune.compile` and the CLI use when none is given: ``"fast"``
    (counts ONNX Runtime runs well, from a measured :class:`~fxprune.cost.latency_table.LatencyModel`)
    for a model with 2-d convolutions, where ORT's blocked kernels make counts matter; else None.
    ``$FXPRUNE_ROUND_TO`` overrides it: ``fast``, ``none`` or a multiple (the test suite sets ``none``:
    a cold latency cache measures ORT kernels for every new model).

    >>> import os, torch, fxprune
    >>> graph = fxprune.analyze(torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 2)), (torch.randn(1, 4),))
    >>> old = os.environ.pop("FXPRUNE_ROUND_TO", None)
    >>> default_round_to(graph) is None     # no convolution
    True
    >>> os.environ["FXPRUNE_ROUND_TO"] = "8"; default_round_to(graph)
    8
    >>> _ = os.environ.pop("FXPRUNE_ROUND_TO") if old is None else os.environ.update(FXPRUNE_ROUND_TO=old)
    """
    text = os.environ.get(ROUND_TO_ENV, "").strip().lower()
    if text in ("none", "0"):
        return None
    if text and text != "fast":
        try:
            value = int(text)
        except ValueError:
            value = 0
        if value < 1:
            raise ConfigError(f"${ROUND_TO_ENV}={text!r}: use fast, none or a positive multiple")
        return value
    if text == "fast":
        return "fast"
    mods = dict(graph.module.named_modules())
    convs = any(conv2d_spec(n, mods) is not None for n in graph.module.graph.nodes)
    return "fast" if convs else None


def check_budget(*, ratio=None, flops=None, params=None, latency=None, round_to=None, floor: float = 0.0) -> Budget:
    """Raise :class:`ConfigError` unless exactly one budget is given and every value is in range."""
    return Budget(ratio=ratio, flops=flops, params=params, latency=latency, round_to=round_to, floor=floor)


def budget_measure(graph, budget: Budget, latency_model=None):
    """``(measure, target, base)``: the cost of a global keep-mask, the most it may be, and the unpruned cost:
    FLOPs or parameters (:class:`~fxprune.cost.CostModel`), or the latency ``latency_model`` predicts
    (:class:`~fxprune.cost.latency_table.LatencyModel`)."""
    if budget.latency is not None:
        if latency_model is None:
            raise ConfigError("a latency= budget needs a latency model (fxprune.cost.latency_table.LatencyModel)")
        return latency_model.latency, budget.latency * latency_model.base, latency_model.base
    cost = CostModel(graph)
    if budget.flops is not None:
        return cost.flops, budget.flops * cost.base_flops, cost.base_flops
    if budget.params is not None:
        return cost.params, budget.params * cost.base_params, cost.base_params
    raise ConfigError("a ratio budget needs no search")


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


@dataclass
class SearchResult:
    counts: dict[str, int]  # kept channels per group
    steps: int  # removal steps taken
    met: bool  # whether the budget was met (else: every step taken)
    cost: float  # the measure at the result, as a fraction of the unpruned model's


def search(graph, groups, steps: list[str], mask_of, budget: Budget, kept_count, latency_model=None) -> SearchResult:
    """The fewest of ``steps`` that meet ``budget``.

    ``steps`` names one group per removal, in the order channels go; ``kept_count(g, removed)``
    is a group's kept count after ``removed`` of its steps (floors and rounding applied);
    ``mask_of(counts)`` the global keep-mask of kept counts. A ratio budget takes no steps:
    every group loses ``round(ratio * size)`` channels. A latency budget measures with ``latency_model``.
    """
    if budget.ratio is not None:
        counts = {g.name: kept_count(g, min(g.prunable, int(round(budget.ratio * g.size)))) for g in groups}
        return SearchResult(counts, 0, True, float("nan"))
    measure, target, base = budget_measure(graph, budget, latency_model)

    def counts_after(k):
        removed = dict.fromkeys((g.name for g in groups), 0)
        for name in steps[:k]:
            removed[name] += 1
        return {g.name: kept_count(g, removed[g.name]) for g in groups}

    def cost_after(k):
        return measure(mask_of(counts_after(k)))

    k = smallest_meeting(cost_after, len(steps), target)
    met = k is not None
    k = len(steps) if k is None else k
    counts = counts_after(k)
    if met:
        counts = refilled(groups, steps[:k], counts, kept_count, lambda c: measure(mask_of(c)), target)
    return SearchResult(counts, k, met, measure(mask_of(counts)) / base if base else 1.0)


def refilled(groups, taken: list[str], counts: dict[str, int], kept_count, cost_of, target: float) -> dict[str, int]:
    """``counts`` with removed channels given back, the most important first, while ``cost_of`` stays
    within ``target``.

    The step that meets a budget can overshoot it by far when a group's rounded count moves in a large
    step (a stem of 32 channels whose next fast count is 16 took a MobileNet from 0.51 to 0.38 of its
    FLOPs under ``flops=0.5``). Walking back over the ``taken`` steps (latest, so most important, first),
    each group takes back its channels until one more would break the budget; the group is then closed
    (costs grow with counts, so none of its later steps could fit either).

    >>> from types import SimpleNamespace as NS
    >>> groups = [NS(name="a", size=4), NS(name="b", size=4)]
    >>> cost = lambda c: 3 * c["a"] + c["b"]          # a's channels cost 3, b's cost 1
    >>> kept = lambda g, removed: g.size - removed
    >>> refilled(groups, ["b", "a", "a", "b"], {"a": 2, "b": 2}, kept, cost, target=9)
    {'a': 2, 'b': 3}
    """
    by_name = {g.name: g for g in groups}
    removed = dict.fromkeys(by_name, 0)
    for name in taken:
        removed[name] += 1
    closed = set()
    for name in reversed(taken):
        if name in closed:
            continue
        n = kept_count(by_name[name], removed[name] - 1)
        if n != counts[name]:
            trial = {**counts, name: n}
            if cost_of(trial) > target:
                closed.add(name)
                continue
            counts = trial
        removed[name] -= 1
    return counts


def ranked_steps(groups, keys: dict[str, np.ndarray], order: dict[str, np.ndarray], removable: dict[str, int]):
    """One global ranking: each group's first ``removable[g]`` channels of ``order[g]``, sorted by
    ``keys[g]`` of the channel (ties by group name, then by rank in the group), as removal steps."""
    cands = [(float(keys[g.name][i]), g.name, rank) for g in groups
             for rank, i in enumerate(order[g.name][:max(0, removable[g.name])])]
    cands.sort()
    return [name for _, name, _ in cands]


def normalized(scores: torch.Tensor, prunable: torch.Tensor) -> torch.Tensor:
    """Scores divided by their mean over the prunable channels (see :func:`make_plan`)."""
    s = scores.double()
    mean = s[prunable].mean() if bool(prunable.any()) else s.mean()
    return s / (mean.abs() + 1e-12)


def checked_scores(groups, scores: dict, hint: str = "") -> None:
    """Raise :class:`ConfigError` unless every group has finite scores of its size."""
    for g in groups:
        s = scores.get(g.name)
        if s is None or tuple(s.shape) != (g.size,):
            raise ConfigError(f"the criterion gave no scores of shape ({g.size},) for group '{g.name}'{hint}")
        if not bool(torch.isfinite(s).all()):
            raise ConfigError(f"the criterion gave non-finite scores for group '{g.name}'{hint}")


def ranked(g, s: torch.Tensor) -> np.ndarray:
    """Channel indices of ``g`` from least to most important; pinned channels last (always kept)."""
    key = s.double().clone()
    key[g.pinned] = float("inf")
    return np.lexsort((np.arange(g.size), key.numpy()))


RANKINGS = ("importance", "per ms", "latency-weighted")   # how a FLOPs or latency budget ranks channels


def default_ranking(budget: Budget, latency_model) -> str:
    """The ranking of :func:`make_plan` when none is given: ``"latency-weighted"`` for a latency budget, and for
    a FLOPs budget rounded to fast counts (:class:`~fxprune.cost.latency_table.FastCounts` of ``latency_model``,
    the default for convolutional models); else ``"importance"``."""
    fast = isinstance(budget.round_to, FastCounts) and latency_model is not None
    return "latency-weighted" if budget.latency is not None or (budget.flops is not None and fast) else "importance"


INTENSITY_CLAMP = (0.1, 10.0)   # a group's latency per FLOP, against the model's, is taken within these
WEIGHTED_FLOOR = 0.25   # the latency-weighted ranking leaves every group this fraction, where the budget allows


def latency_intensity(graph, groups, latency_model) -> dict[str, float]:
    """Each group's predicted ORT milliseconds saved per FLOP saved, as a multiple of the model's (the share of
    the latency a channel saves over the share of the FLOPs it saves), within :data:`INTENSITY_CLAMP`: above 1
    where ORT spends more time than the FLOPs say (a depthwise conv, the activations, SE gates and layout
    reorders that scale with the channels, weights read once per image), under 1 where less."""
    cost = CostModel(graph)
    per_ms = ms_per_channel(graph, groups, latency_model)
    per_flop = cost_per_channel(graph, groups, cost.flops, cost.base_flops)
    lo, hi = INTENSITY_CLAMP
    return {name: min(hi, max(lo, (per_ms[name] / latency_model.base) / (per_flop[name] / cost.base_flops)))
            for name in per_ms}


@paused_gc
def make_plan(graph, scores: dict[str, torch.Tensor], *, ratio=None, flops=None, params=None, latency=None,
              round_to=None, min_keep: int = 1, floor: float = 0.0, ignore=(), meta=None, latency_model=None,
              ranking: str | None = None) -> Plan:
    """Choose the channels to keep under exactly one budget, from per-group scores.

    ``scores`` maps each prunable group's name to a tensor of its size (higher means
    more important). ``ignore`` lists group names, module names or modules whose
    groups stay whole. A ``flops`` or ``params`` budget ranks every removable channel
    globally by its *normalised* score (divided by the mean over its group's prunable
    channels, so that groups whose raw scores live on different scales compete fairly)
    and meets the budget with :func:`search`; when even every removable channel is not
    enough it warns and returns the smallest plan.

    Rounded to fast counts (``round_to="fast"``), a ``flops`` budget ranks by default
    ``"latency-weighted"``: each normalised score divided by the square root of its group's
    :func:`latency_intensity`, so that among channels of like importance those that cost ORT more time than
    their FLOPs say go first; every group then keeps at least :data:`WEIGHTED_FLOOR` of its channels (or
    ``floor``, if more) where the budget can be met so. ``ranking="importance"`` ranks by the normalised
    score alone.

    ``latency=`` keeps that fraction of the ONNX Runtime latency predicted by ``latency_model``
    (a :class:`~fxprune.cost.latency_table.LatencyModel`, built for ``graph`` when not given),
    channels ranked latency-weighted by default, by importance alone with ``ranking="importance"``, or with
    ``ranking="per ms"`` by importance per millisecond saved (HALP's ranking). ``round_to="fast"`` rounds each group up
    to a count ONNX Runtime runs well (:class:`~fxprune.cost.latency_table.FastCounts`); where those
    counts cannot meet a FLOPs, parameter or ratio budget, the plan is searched again with counts under
    each group's first fast count left as they are (``meta["round_to"]`` then says
    ``"fast, under the first step"``).
    """
    budget = Budget(ratio=ratio, flops=flops, params=params, latency=latency, round_to=round_to, floor=floor,
                    min_keep=min_keep)
    if ranking is not None and ranking not in RANKINGS:
        raise ConfigError(f"ranking={ranking!r}: give one of {', '.join(map(repr, RANKINGS))}")
    if latency_model is None and (latency is not None or round_to == "fast"):
        latency_model = LatencyModel(graph)
    if ranking not in (None, "importance") and latency_model is None:
        raise ConfigError(f"ranking={ranking!r} ranks on predicted latency: give a latency_model or round_to='fast'")
    if latency_model is not None and latency_model.graph.num_channels != graph.num_channels:
        raise ConfigError("latency_model was built for another model (its channel graph differs): build it "
                          "with LatencyModel(fxprune.analyze(model, example_inputs))")
    if round_to == "fast":
        budget = replace(budget, round_to=FastCounts(latency_model))
    ranking = ranking or default_ranking(budget, latency_model)
    slice_count = slice_rounding(budget)
    ignored = ignored_groups(graph, ignore)
    groups = [g for g in graph.groups.values() if g.prunable > 0 and g.name not in ignored]
    checked_scores(groups, scores)
    order = {g.name: ranked(g, scores[g.name]) for g in groups}

    keys = None
    if budget.ratio is None:
        keys = {g.name: normalized(scores[g.name], ~g.pinned).numpy() for g in groups}
        if ranking == "per ms":  # importance per millisecond saved
            per_ms = ms_per_channel(graph, groups, latency_model)
            keys = {name: k / per_ms[name] for name, k in keys.items()}
        elif ranking == "latency-weighted":
            intensity = latency_intensity(graph, groups, latency_model)
            weight = {name: math.sqrt(v) for name, v in intensity.items()}   # a negative score moves the other way
            keys = {name: np.where(k >= 0, k / weight[name], k * weight[name]) for name, k in keys.items()}

    def searched(budget):
        floors = {g.name: budget.min_kept(g) for g in groups}

        def kept_count(g, removed):
            return budget.rounded(g, max(g.size - removed, floors[g.name]))

        steps = [] if keys is None else \
            ranked_steps(groups, keys, order, {g.name: g.size - kept_count(g, g.size) for g in groups})
        return search(graph, groups, steps, lambda counts: keep_mask(graph, groups, order, counts, slice_count),
                      budget, kept_count, latency_model)

    tries = [budget]
    if ranking == "latency-weighted" and budget.floor < WEIGHTED_FLOOR:  # no group emptied for its latency
        tries.insert(0, replace(budget, floor=WEIGHTED_FLOOR))
    for tried in tries:
        found, budget = search_rounded(tried, searched)
        if found.met:
            break
    info = budget.info()
    if not found.met:
        rounded = f" (each group rounded to round_to={round_to!r})" if round_to is not None else ""
        warnings.warn(f"the budget cannot be met: with every prunable channel removed{rounded} the model keeps "
                      f"{found.cost:.1%}", stacklevel=2)
        info["met"] = False
    if budget.ratio is None:   # a ratio budget ranks nothing: every group loses its share
        info["ranking"] = ranking
    return plan_from_mask(graph, groups, keep_mask(graph, groups, order, found.counts, slice_count),
                          {**info, **(meta or {})})


def cost_per_channel(graph, groups, measure, base: float) -> dict[str, float]:
    """Each group's ``measure`` (of a global keep-mask; ``base`` unpruned) saved per channel when half of
    the group goes, the rest of the model kept; at least a millionth of ``base`` over the group's size."""
    full = np.ones(graph.num_channels, dtype=bool)
    out = {}
    for g in groups:
        keep = full.copy()
        off = graph.offsets[g.name]
        half = max(1, g.size // 2)
        keep[off + half:off + g.size] = False
        saved = base - measure(keep)
        out[g.name] = max(saved / max(1, g.size - half), 1e-6 * base / max(1, g.size))
    return out


def ms_per_channel(graph, groups, latency_model) -> dict[str, float]:
    """Each group's predicted latency saved per channel (:func:`cost_per_channel`)."""
    return cost_per_channel(graph, groups, latency_model.latency, latency_model.base)


def plan_from_mask(graph, groups, mask: np.ndarray, meta: dict) -> Plan:
    """The :class:`Plan` that keeps the channels of ``groups`` set in the global ``mask``."""
    keep = {}
    for g in groups:
        local = np.nonzero(mask[graph.offsets[g.name]:graph.offsets[g.name] + g.size])[0]
        if len(local) < g.size:
            keep[g.name] = local.tolist()
    return Plan(keep, {k: graph.groups[k].size for k in keep}, meta)


def slice_rounding(budget: Budget):
    """The ``slice_count`` of :func:`keep_mask` that ``budget``'s rounding brings: fast counts' (given as
    ``"fast"`` or in their relaxed form), else None."""
    return budget.round_to.model.slice_count if isinstance(budget.round_to, FastCounts) else None


def keep_mask(graph, groups, order, counts, slice_count=None) -> np.ndarray:
    """Keep the top ``counts[g]`` channels of each group, then make sure no tensor is left empty.

    A value can hold a slice of a group (a ``chunk`` of a shuffled stream): the group
    keeps its floor, yet that slice could lose every channel. Such a slice gets back its
    best-ranked channel. With ``slice_count(channels, n)`` (fast counts:
    :meth:`~fxprune.cost.latency_table.LatencyModel.slice_count`), a slice keeping ``n`` gets back its
    best-ranked channels up to the count returned.
    """
    keep = np.ones(graph.num_channels, dtype=bool)
    rank = np.zeros(graph.num_channels)
    blocked = []
    for g in groups:
        off = graph.offsets[g.name]
        rank[off + order[g.name]] = np.arange(g.size)
        if getattr(g, "blocks", None) is not None:  # the best ceil(count / B) of every block
            blocks = off + g.blocks.numpy()
            per = max(-(-counts[g.name] // blocks.shape[0]), int(g.pinned.numpy()[g.blocks.numpy()].sum(1).max()), 1)
            by_rank = np.take_along_axis(blocks, np.argsort(rank[blocks], axis=1, kind="stable"), 1)
            keep[by_rank[:, :blocks.shape[1] - per].reshape(-1)] = False
            blocked.append(blocks)
        else:
            keep[off + order[g.name][:g.size - counts[g.name]]] = False
    sets = value_channel_sets(graph)
    for channels in sets:
        if not keep[channels].any():
            keep[channels[np.argmax(rank[channels])]] = True
    # after every value has a channel (a concat read by a conv counts them): a channel given back to one
    # slice can put a set that holds it off its count, so again until none changes
    for _ in range(3 if slice_count is not None else 0):
        changed = False
        for channels in sets:
            n = int(keep[channels].sum())   # positions: a channel the value holds twice counts twice
            want = slice_count(channels, n)
            if want > n:
                give_back(keep, rank, channels, want - n)
                changed = True
        if not changed:
            break
    for blocks in blocked:  # a channel given back above: every other block gets back its best one too
        per = keep[blocks].sum(1).max()
        for row in blocks:
            missing = row[~keep[row]]
            keep[missing[np.argsort(-rank[missing], kind="stable")][:per - keep[row].sum()]] = True
    return keep


def give_back(keep: np.ndarray, rank: np.ndarray, channels: np.ndarray, positions: int) -> None:
    """Set in ``keep`` the best-ranked removed channels of ``channels`` until ``positions`` more positions are
    kept. A channel that ``channels`` holds several times (an EdgeNeXt split whose first two chunks are tied by
    an add) brings as many positions: channels that fit the count are taken first, and when none fits, the best
    one left (the next rounding pass goes on from there)."""
    ids, times = np.unique(channels[~keep[channels]], return_counts=True)
    by_rank = np.argsort(-rank[ids], kind="stable")
    for i in by_rank:
        if times[i] <= positions:
            keep[ids[i]] = True
            positions -= int(times[i])
    left = next((ids[i] for i in by_rank if not keep[ids[i]]), None)
    if positions > 0 and left is not None:
        keep[left] = True


def value_channel_sets(graph) -> list[np.ndarray]:
    """The distinct channel sets of every value whose positions are all prunable channels, sorted, a channel
    held at several positions as often (the count a conv reading the value sees)."""
    if graph.value_channel_sets is not None:
        return graph.value_channel_sets
    seen, seen_labels, out = set(), set(), []
    for node in graph.module.graph.nodes:
        labels = node.meta.get("fxprune")
        for lab in labels if isinstance(labels, tuple) else (labels,):
            if isinstance(lab, torch.Tensor) and lab.numel() and id(lab) not in seen_labels:
                seen_labels.add(id(lab))  # a label passed through several nodes is one tensor: read once
                channels = lab.numpy()
                if channels.min() < 0:
                    continue
                channels = np.sort(channels, axis=None)
                key = channels.tobytes()
                if key not in seen:
                    seen.add(key)
                    out.append(channels)
    graph.value_channel_sets = out
    return out


def ignored_groups(graph, ignore) -> set[str]:
    """Names of the groups that ``ignore`` (group names, module names or modules) leaves whole."""
    names = set()
    prefixes = []
    for item in ignore or ():
        if isinstance(item, torch.nn.Module):
            found = graph.source_names.get(id(item))
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
