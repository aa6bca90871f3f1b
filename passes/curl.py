"""CURL (Luo & Wu, CVPR 2020): a channel matters as much as the network's output moves without it.

For every channel ``j`` of every group ``g``, ``s(g, j)`` is the mean KL divergence,
over a small proxy set, between the softmax output with channel ``j`` zeroed at
*every* tensor of ``g`` and the unmasked softmax output (see ``docs/methods.md``).
Zeroing at every tensor of the group is what lets CURL score the channels of a
residual stream (which run through every block of a stage) as well as the channels
inside a block. Masking is done by :class:`fxprune.verify.masked.MaskedRunner`: many masks
per forward pass (the proxy batch is replicated) and the graph is recomputed only from
the first node that a mask touches. Under ``torchrun`` (an initialised ``torch.distributed``
group) the passes are dealt out to the ranks and the scores summed back: every rank gets the
scores of one process.

Selection (:func:`select`) is CURL's own: one global ranking of the *raw* KL scores,
lowest first, with a per-group floor (a removal is skipped once a group keeps less
than ``min_keep_frac`` = 30 % of its channels, as in the authors' ``generate_index.py``,
so a group can end just under 30 %), protected groups left whole, and the number of
removals found by a binary search on the FLOPs (or parameter) target instead of by
hand. ``fxprune.compile(method="curl")`` uses it (through ``score.plan``).

Options and where they come from:

* ``kl_direction="code"`` (default): ``KL(p_masked || p)``, as the authors' code;
  ``"paper"``: ``KL(p || p_masked)``, as the paper's Eq. 1 (Roll920/CURL#2).
* ``num_samples=256``: the proxy set, the first samples the data yields (the authors
  draw 256 random training images; shuffle your loader to do the same). Labels are
  not needed.
* ``min_keep_frac=0.3`` and ``protect=()`` (group or module names, e.g. the last
  residual stage, which the authors exclude on ImageNet).
* ``ranking="raw"`` (default, the authors' rule) or ``"normalized"``: fxprune's
  generic :func:`fxprune.make_plan` ranking by score over the group mean, with
  ``floor=min_keep_frac``. [I] an fxprune option, not in the paper.

Example::

    >>> import torch, fxprune
    >>> from fxprune.passes import curl
    >>> net = torch.nn.Sequential(torch.nn.Conv2d(1, 6, 3), torch.nn.ReLU(), torch.nn.Flatten(),
    ...                           torch.nn.Linear(6 * 36, 4)).eval()
    >>> x = torch.randn(32, 1, 8, 8)
    >>> graph = fxprune.analyze(net, (x[:1],))
    >>> s = curl.score(graph, data=x, progress=False)
    >>> s["0"].shape, bool((s["0"] >= 0).all())
    (torch.Size([6]), True)
    >>> plan = curl.select(graph, s, ratio=0.5)
    >>> len(plan.keep["0"])
    3
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from fxprune.io.data import batches
from fxprune.errors import ConfigError, DataError
from fxprune.verify.masked import MaskedRunner, sum_over_ranks
from fxprune.plan import Budget, Plan, ignored_groups, keep_mask, make_plan, plan_from_mask, search
from fxprune.plan.budget import checked_scores, ranked, ranked_steps, search_rounded

KL_DIRECTIONS = ("code", "paper")


def proxy_inputs(data, num_samples: int) -> tuple:
    """The first ``num_samples`` samples of ``data`` as one batch (a tuple of input tensors)."""
    if not isinstance(num_samples, int) or num_samples < 1:
        raise ConfigError(f"num_samples={num_samples} must be a positive integer")
    parts, count = [], 0
    for inputs, _ in batches(data):
        if not inputs or not isinstance(inputs[0], torch.Tensor) or inputs[0].dim() == 0:
            raise DataError("each batch must hold input tensors whose first dimension is the batch")
        parts.append(inputs)
        count += int(inputs[0].shape[0])
        if count >= num_samples:
            break
    if len({len(p) for p in parts}) != 1:
        raise DataError("batches of data= have different numbers of inputs")
    try:
        cat = tuple(torch.cat([p[i] for p in parts])[:num_samples] for i in range(len(parts[0])))
    except RuntimeError as exc:
        raise DataError(f"batches of data= have inconsistent shapes ({exc}); give same-shaped samples") from exc
    return cat


def check_like_examples(graph, inputs: tuple) -> None:
    """Raise :class:`DataError` unless ``inputs`` are shaped like the example inputs (any batch size)."""
    examples = tuple(graph.example_inputs)
    if len(inputs) != len(examples):
        raise DataError(f"data= gives {len(inputs)} input(s) per batch but the model was analysed with {len(examples)}")
    for i, (x, e) in enumerate(zip(inputs, examples)):
        if isinstance(e, torch.Tensor) and tuple(x.shape[1:]) != tuple(e.shape[1:]):
            raise DataError(f"input {i} of data= has samples of shape {tuple(x.shape[1:])} but the example input's "
                            f"are {tuple(e.shape[1:])}: give data shaped like example_inputs")


def kl_to_reference(out: torch.Tensor, ref_logp: torch.Tensor, direction: str) -> torch.Tensor:
    """Mean over samples of KL between softmax outputs: ``out`` is ``[M, N, ...]``, ``ref_logp`` ``[N, K]``.

    ``direction="code"`` gives ``KL(softmax(out) || p_ref)``; ``"paper"`` gives
    ``KL(p_ref || softmax(out))``. Returns ``[M]`` (float64). One mask at a time: the float64 copy of all ``M``
    (a detector's ``[128 masks, 8 samples, 84 x 2100]`` outputs: 1.4 GB) need not fit at once.
    """
    ref = ref_logp.double().unsqueeze(0)
    kls = []
    for one in out.split(1):
        logp = F.log_softmax(one.reshape(1, one.shape[1], -1).double(), dim=-1)
        if direction == "code":
            kls.append((logp.exp() * (logp - ref)).sum(-1))
        else:
            kls.append((ref.exp() * (ref - logp)).sum(-1))
    return torch.cat(kls).mean(1)


def score(graph, data=None, seed=0, *, num_samples: int = 256, kl_direction: str = "code",
          masks_per_forward: int | None = None, max_batch: int = 1024, progress: bool = True,
          device=None) -> dict[str, torch.Tensor]:
    """KL scores of every prunable channel (higher = the output moves more without it).

    ``masks_per_forward`` masks share one forward pass (default: as many as fit in
    ``max_batch`` samples). ``device`` runs the analysed copy there (e.g. ``"cuda"``).
    The runner's cost, in forward-equivalents over the proxy set, is left in
    ``score.last_forwards``.
    """
    if kl_direction not in KL_DIRECTIONS:
        raise ConfigError(f"kl_direction='{kl_direction}' is not one of {KL_DIRECTIONS}: 'code' is KL(masked || full) "
                          "as the authors' code, 'paper' is KL(full || masked) as the paper's Eq. 1")
    inputs = proxy_inputs(data, num_samples)
    check_like_examples(graph, inputs)
    if device is not None:
        graph.module.to(device)
        inputs = tuple(x.to(device) for x in inputs)
    n = int(inputs[0].shape[0])
    m = masks_per_forward or max(1, max_batch // n)
    groups = graph.prunable_groups()
    jobs = [(g, j) for g in groups for j in torch.nonzero(~g.pinned).flatten().tolist()]
    drops = [[graph.offsets[g.name] + j] for g, j in jobs]
    try:
        runner = MaskedRunner(graph, inputs, masks_per_forward=m)
        ref = runner.reference()
        ref_logp = F.log_softmax(ref.reshape(n, -1).double(), dim=-1)
        values = torch.zeros(len(jobs), dtype=torch.float64)
        bar = tqdm(total=len(jobs), desc="curl: scoring channels", unit="ch", disable=not progress, leave=False)
        with bar:
            for idx, out in runner.each(drops, progress=bar, shard=True):  # this rank's share under torchrun
                values[idx] = kl_to_reference(out, ref_logp, kl_direction).cpu()
        values = sum_over_ranks(values)
    finally:
        if device is not None:
            graph.module.to("cpu")
    score.last_forwards = runner.forwards
    out = {}
    for g in groups:
        out[g.name] = torch.zeros(g.size, dtype=torch.float64)
    for (g, j), v in zip(jobs, values.tolist()):
        out[g.name][j] = v
    for g in groups:
        s = out[g.name]
        if bool(g.pinned.any()):  # pinned channels stay anyway; give them the group's top score
            s[g.pinned] = s[~g.pinned].max()
        out[g.name] = s.float()
    return out


def curl_min_kept(size: int, frac: float) -> int:
    """Channels left when removals stop as soon as a group keeps less than ``frac`` of ``size``."""
    return max(1, math.ceil(frac * size - 1e-9) - 1)


def select(graph, scores, *, ratio=None, flops=None, params=None, min_keep_frac: float = 0.3, protect=(),
           ignore=(), min_keep: int = 1, floor: float = 0.0, round_to=None, ranking: str = "raw",
           meta=None) -> Plan:
    """CURL's selection: a global ranking of raw scores with a per-group floor, under one budget.

    Exactly one of ``ratio`` (fraction of each group removed), ``flops`` or ``params``
    (fraction of the model kept; met by :func:`fxprune.plan.search` on the number of removals).
    ``protect`` and ``ignore`` name groups (or modules) left whole. ``floor`` /
    ``min_keep`` / ``round_to`` as :func:`fxprune.make_plan`.
    """
    if not 0 <= min_keep_frac < 1:
        raise ConfigError(f"min_keep_frac={min_keep_frac} must be in [0, 1): the fraction of each group kept")
    info = {"ranking": ranking, "min_keep_frac": min_keep_frac, "protect": list(map(str, protect))}
    info.update(meta or {})
    if ranking == "normalized":
        return make_plan(graph, scores, ratio=ratio, flops=flops, params=params, round_to=round_to,
                         min_keep=min_keep, floor=max(floor, min_keep_frac), ignore=tuple(ignore) + tuple(protect),
                         meta=info)
    if ranking != "raw":
        raise ConfigError(f"ranking='{ranking}' must be 'raw' (CURL's global ranking) or 'normalized'")
    budget = Budget(ratio=ratio, flops=flops, params=params, round_to=round_to, floor=floor, min_keep=min_keep)
    skipped = ignored_groups(graph, tuple(ignore) + tuple(protect))
    groups = [g for g in graph.groups.values() if g.prunable > 0 and g.name not in skipped]
    checked_scores(groups, scores, ": pass curl.score's result")
    order = {g.name: ranked(g, scores[g.name]) for g in groups}
    kmin = {g.name: budget.min_kept(g, at_least=curl_min_kept(g.size, min_keep_frac)) for g in groups}

    steps = []
    if budget.ratio is None:
        keys = {g.name: scores[g.name].double().numpy() for g in groups}
        steps = ranked_steps(groups, keys, order, {g.name: g.size - kmin[g.name] for g in groups})

    def searched(budget):
        def kept(g, removed):
            return budget.rounded(g, max(g.size - removed, kmin[g.name]))
        return search(graph, groups, steps, lambda counts: keep_mask(graph, groups, order, counts), budget, kept)

    found, budget = search_rounded(budget, searched)
    if not found.met:
        raise ConfigError(f"the budget cannot be met with min_keep_frac={min_keep_frac}: removing every allowed "
                          "channel still exceeds it. Lower min_keep_frac or protect fewer groups.")
    if budget.ratio is None:
        info["removals"] = found.steps
    info.update(budget.info())
    return plan_from_mask(graph, groups, keep_mask(graph, groups, order, found.counts), info)


def plan(graph, data=None, seed=0, *, ratio=None, flops=None, params=None, round_to=None, min_keep: int = 1,
         floor: float = 0.0, ignore=(), meta=None, min_keep_frac: float = 0.3, protect=(), ranking: str = "raw",
         **score_options) -> Plan:
    """Score with :func:`score` and choose with :func:`select`: what ``compile(method="curl")`` runs."""
    scores = score(graph, data=data, seed=seed, **score_options)
    return select(graph, scores, ratio=ratio, flops=flops, params=params, min_keep_frac=min_keep_frac,
                  protect=protect, ignore=ignore, min_keep=min_keep, floor=floor, round_to=round_to,
                  ranking=ranking, meta={"method": "curl", **(meta or {})})


score.plan = plan
score.last_forwards = 0.0
