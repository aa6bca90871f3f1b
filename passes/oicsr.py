"""OICSR: out-in-channel sparsity regularization (Li et al., CVPR 2019; docs/methods.md).

Removing channel ``i`` of a group removes its producers' out-slices *and* its
consumers' in-slices, so OICSR regularizes them as one block, the *out-in channel*
``G_i`` (every trainable member slice of channel ``i``: conv rows, biases, BN affine,
consumer columns; running statistics are buffers and are left out).

* :class:`Regularizer`: ``lam * sum_groups sum_i ||G_i||_2`` (group lasso), or with
  ``penalty="growl"`` the GrOWL form ``sum_i theta_i ||G_[i]||_2`` with the group's
  channels sorted by descending norm and ``theta_i = lam + lam2 * (n - i)``.
* ``flops=`` (an interpretation for short training budgets; the paper's constant
  strength is ``flops=None``): the regularizer is told the budget and, every ``every``
  training steps, schedules the out-in channels to remove with
  :func:`fxprune.make_plan` on their energy (within the regularized groups), and adds a
  growing penalty ``rho(t) * ||G_i||^2`` on exactly those, ``rho(t) = min(ceiling, grow
  * t)`` (growing regularisation, Wang et al., ICLR 2021). Their conv rows, BN gamma
  and beta and consumer columns reach ~0 within a few epochs, so the one-shot cut
  ``compile(method="oicsr", flops=...)`` takes exactly them at no cost.
* :func:`score` (``compile(method="oicsr")``): the out-in energy ``E_i = ||G_i||^2`` read
  from the trained weights. ``make_plan`` divides each group's scores by their mean
  before the global ranking, which is the cross-group normalisation ``E_i / mean_j E_j``.
* :func:`prune`: the global greedy loop. Each round removes about ``step`` of the
  original FLOPs by energy (through :func:`fxprune.make_plan` on the original model, each
  group's energies over the mean of its original channels, see :func:`_round_plan`, and
  :func:`fxprune.rewrite.rewrite`), never more than ``cap`` of any group's original
  channels, then calls the user's ``retrain`` to move features into the survivors,
  until the FLOPs target is met.
* :class:`LoopSchedule`: one learning-rate schedule over all the loop's rounds (gradual
  pruning), for a ``retrain`` that builds a fresh optimizer each round; without it a
  ``retrain`` that runs its own schedule restarts it at the full rate after every cut.
  :func:`planned_rounds` is the number of rounds the loop plans.

The paper pruned only the internal channels of ResNet bottlenecks; ``residual=False``
(the default of :class:`Regularizer` and :func:`prune`) leaves groups written by
several layers (residual streams, see :func:`residual_groups`) alone. The
criterion scores every group; pass ``ignore=residual_groups(graph)`` to
``compile`` for the paper's setting. The energy normalisation, the cap and GrOWL's
weights are interpretations (the paper's exact forms are not known).

Example::

    >>> import torch, fxprune
    >>> from fxprune.passes import oicsr
    >>> net = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 1, bias=False), torch.nn.Conv2d(2, 1, 1, bias=False))
    >>> with torch.no_grad():
    ...     _ = net[0].weight.copy_(torch.tensor([3.0, 0.0]).view(2, 1, 1, 1))
    ...     _ = net[1].weight.copy_(torch.tensor([4.0, 1.0]).view(1, 2, 1, 1))
    >>> graph = fxprune.analyze(net, (torch.randn(1, 1, 2, 2),))
    >>> oicsr.Regularizer(graph, lam=0.5)(net)      # 0.5 * (5 + 1)
    tensor(3., grad_fn=<MulBackward0>)
    >>> oicsr.score(graph)["0"]                     # energies 3**2 + 4**2 and 0**2 + 1**2
    tensor([25.,  1.])
    >>> reg = oicsr.Regularizer(graph, lam=0.5, flops=0.6)     # told the budget
    >>> float(reg(net).detach())                    # 3 + rho * E_1 on the scheduled channel 1
    4.0
    >>> reg.scheduled["0"].tolist()
    [False, True]
"""
from __future__ import annotations

import math
import warnings

import torch

from fxprune.cost import count_flops
from fxprune.errors import ConfigError
from fxprune.pipeline import Pipeline
from fxprune.plan import Plan, make_plan
from fxprune.plan.budget import DEFAULT
from fxprune.utils import as_tuple
from fxprune.view.report import report as fxprune_report

from .group_lasso import (GroupLasso, Growing, channel_sq_norms, graph_tensors, residual_groups, select_groups,
                          trainable_members)

__all__ = ["Regularizer", "score", "prune", "residual_groups", "LoopSchedule", "planned_rounds"]


class Regularizer(GroupLasso):
    """The OICSR loss term over the out-in channels of ``graph``'s prunable groups.

    ``residual`` includes residual-stream groups; ``groups`` restricts it to some group
    names; ``penalty`` is ``"gl"`` (group lasso) or ``"growl"`` (with ``lam2``).
    Pinned channels get coefficient 0. ``flops`` (fraction of the FLOPs kept) adds the
    budget schedule of the module docstring (``every``, ``grow``, ``ceiling``);
    ``reg.scheduled`` holds the channels it drives to zero.
    """

    def __init__(self, graph, lam: float = 1e-4, *, penalty: str = "gl", lam2: float = 0.0, residual: bool = False,
                 groups=None, eps: float = 1e-8, flops: float | None = None, every: int = 10, grow: float = 1.0,
                 ceiling: float = 1.0, round_to=DEFAULT):
        if penalty not in ("gl", "growl"):
            raise ConfigError(f"penalty='{penalty}' is unknown: choose 'gl' (group lasso) or 'growl'")
        if penalty == "growl" and not lam2 >= 0:
            raise ConfigError(f"lam2={lam2} must be non-negative (GrOWL's slope)")
        self.penalty, self.lam2 = penalty, float(lam2)
        selected = select_groups(graph, groups, skip=() if residual else residual_groups(graph))
        terms = [(g, trainable_members(graph, g), (~g.pinned).float()) for g in selected]
        growing = None
        if flops is not None:
            growing = Growing(graph, selected, lambda t: {g.name: energy(graph, g, t) for g in selected},
                              flops=flops, every=every, grow=grow, ceiling=ceiling, round_to=round_to)
        super().__init__(graph, lam, terms, eps, growing)

    def coefficients(self, norms: torch.Tensor, coef: torch.Tensor) -> torch.Tensor:
        if self.penalty == "gl":
            return coef
        # GrOWL: the k-th largest norm (k = 1..n) gets lam + lam2 * (n - k), relative to lam
        n = int(coef.gt(0).sum())
        ranks = torch.empty(norms.numel(), dtype=torch.long)
        masked = torch.where(coef > 0, norms.float().cpu(), torch.full_like(norms.float().cpu(), -1.0))
        ranks[torch.sort(masked, descending=True, stable=True).indices] = torch.arange(norms.numel())
        theta = 1 + (self.lam2 / max(self.lam, 1e-30)) * (n - 1 - ranks).clamp_min(0).float()
        return theta * coef


def energy(graph, group, tensors=None) -> torch.Tensor:
    """``E_i = ||G_i||^2``: the squared norm of every trainable member slice of channel ``i``."""
    tensors = graph_tensors(graph) if tensors is None else tensors
    return channel_sq_norms(tensors, group, trainable_members(graph, group)).detach().float().cpu()


def score(graph, data=None, seed=0):
    """The OICSR criterion: out-in energy of every prunable group's channels (see :func:`energy`)."""
    return {g.name: energy(graph, g) for g in graph.prunable_groups()}


# its cut takes what the schedule drove to zero: both on the relaxed fast counts (fxprune.pipeline.resolve_rounding)
score.relaxed_fast_counts = True


def prune(model, example_inputs, *, flops: float = 0.5, step: float = 0.1, cap: float = 0.5, retrain=None,
          residual: bool = False, ignore=(), max_rounds: int = 50, verify: bool = True, onnx: bool = True,
          progress: bool = False):
    """The global greedy loop; returns the pruned ``GraphModule``. ``model`` is not changed.

    Each round: analyse the current model, score by energy, and plan (:func:`_round_plan`, with
    :func:`fxprune.make_plan` on the original model) ``step`` fewer original FLOPs (never below
    ``flops``), no group cut beyond ``cap`` of its original channels; :func:`fxprune.rewrite.rewrite` cuts; then
    ``retrain(module)`` (your training loop with the OICSR term, for a few epochs; it may
    return a new module or train in place; :class:`LoopSchedule` gives its rounds one learning-rate
    schedule, from ``planned_rounds(flops, step)``). Stops at the target or when nothing more can
    go. With ``verify`` each cut is checked by mask-equivalence (:mod:`fxprune.verify`) and, with
    ``onnx``, the result in ONNX Runtime. Then fine-tune the result without the OICSR term (the
    paper's last step): the rounds leave the term acting, and the fine-tuning is what brings the
    loop level with a one-shot cut given as many epochs (``tools/results/claims.md``).
    ``result.meta["fxprune_oicsr"]`` holds ``"plan"`` (the kept original channels, a
    :class:`fxprune.Plan` on ``model``) and ``"rounds"`` (FLOPs fraction after each).

        >>> import torch
        >>> net = torch.nn.Sequential(torch.nn.Conv2d(1, 8, 3), torch.nn.ReLU(), torch.nn.Conv2d(8, 8, 3),
        ...                           torch.nn.ReLU(), torch.nn.Conv2d(8, 2, 1))
        >>> small = prune(net, (torch.randn(1, 1, 10, 10),), flops=0.7, step=0.2, cap=0.5)
        >>> small.meta["fxprune_oicsr"]["rounds"][-1] <= 0.7
        True
    """
    if not 0 < flops <= 1:
        raise ConfigError(f"flops={flops} is out of range: it is the fraction of the model's FLOPs kept, in (0, 1]")
    if not 0 < step <= 1:
        raise ConfigError(f"step={step} must be in (0, 1]: the fraction of the original FLOPs removed per round")
    if not 0 < cap < 1:
        raise ConfigError(f"cap={cap} must be in (0, 1): the largest fraction of a group's channels removed")
    if retrain is not None and not callable(retrain):
        raise ConfigError("retrain must be a callable retrain(module) -> module or None")
    example_inputs = as_tuple(example_inputs)
    base = count_flops(model, example_inputs)
    current, rounds, checks = model, [], []
    origin = Pipeline(model, example_inputs, verify=verify, onnx=onnx)  # the result is checked in ONNX Runtime
    first = origin.graph
    original = {g.name: torch.arange(g.size) for g in first.groups.values()}
    frozen = sorted(set(ignore) | (set() if residual else set(residual_groups(first))))
    bar = _progress(progress, max_rounds)
    for _ in range(max_rounds):
        now = count_flops(current, example_inputs) / base
        if now <= flops + 1e-9:
            break
        step_pipe = origin if current is model else Pipeline(current, example_inputs, verify=verify, onnx=False)
        graph = step_pipe.graph
        plan = _round_plan(first, graph, score(graph), original, max(flops, now - step), cap, frozen)
        if plan.removed == 0:
            warnings.warn(f"OICSR stopped at {now:.1%} of the FLOPs: no group can lose more channels under "
                          f"cap={cap}", stacklevel=2)
            break
        for name, kept in plan.keep.items():
            original[name] = original[name][torch.tensor(kept)]
        current = step_pipe.build(plan, method="oicsr (round)", onnx=False)  # mask-equivalence checked with verify
        checks.append(fxprune_report(current).mask)
        if retrain is not None:
            current = retrain(current) or current
        rounds.append(count_flops(current, example_inputs) / base)
        bar.update(1)
    bar.close()
    sizes = {n: g.size for n, g in first.groups.items()}
    keep = {n: idx.tolist() for n, idx in original.items() if len(idx) < sizes[n]}
    total = Plan(keep, {n: sizes[n] for n in keep}, {"method": "oicsr", "flops": flops})
    if current is model:
        current = origin.build(total, method="oicsr")
    else:
        current = origin.finish(current, total, method="oicsr", mask=_merged(checks))
    current.meta["fxprune_oicsr"] = {"plan": total, "rounds": rounds}
    return current


def planned_rounds(flops: float, step: float) -> int:
    """The rounds :func:`prune` plans from the whole model down to ``flops`` in steps of ``step``
    (each round's target is the FLOPs reached minus ``step``, the last one ``flops``): ``ceil((1 - flops) / step)``.
    A round that falls short of its target (a cap, a coarse group) can make the loop take one more.

        >>> planned_rounds(0.25, 0.1), planned_rounds(0.5, 0.1), planned_rounds(0.5, 0.5)
        (8, 5, 1)
    """
    if not 0 < flops <= 1 or not 0 < step <= 1:
        raise ConfigError(f"flops={flops} and step={step} must both be in (0, 1]")
    return max(1, math.ceil((1 - flops) / step - 1e-9)) if flops < 1 else 0


class LoopSchedule:
    """One cosine learning rate over all the rounds of :func:`prune`: the loop's cuts happen during a
    single schedule (gradual pruning), not each followed by a fresh schedule from the full rate.

    ``total_steps`` is the optimiser steps of the whole loop (e.g. ``planned_rounds(flops, step) *
    steps_per_round``). Each round, ``retrain`` builds its optimiser for the new module (at the peak
    rate) and takes its scheduler from :meth:`attach`: it goes on from the step where the last round's
    stopped. The factor is ``0.5 * (1 + cos(pi * k / total_steps))`` at global step ``k``, 0 past the end.
    The optimiser's state (momentum) is not carried from round to round: the parameters change shape.

        >>> import torch
        >>> sched = LoopSchedule(total_steps=4)
        >>> lrs = []
        >>> for _ in range(2):                          # two rounds of two steps each
        ...     opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)
        ...     lr_sched = sched.attach(opt)
        ...     for _ in range(2):
        ...         lrs.append(round(opt.param_groups[0]["lr"], 4))
        ...         opt.step(); lr_sched.step()
        >>> lrs, sched.done                             # one cosine 0.1 -> 0 over the 4 steps, not two
        ([0.1, 0.0854, 0.05, 0.0146], 4)
    """

    def __init__(self, total_steps: int):
        if not total_steps >= 1:
            raise ConfigError(f"total_steps={total_steps} must be at least 1")
        self.total, self.done = int(total_steps), 0

    def factor(self, k: int) -> float:
        """The learning-rate multiplier at global step ``k``."""
        return 0.5 * (1 + math.cos(math.pi * min(k, self.total) / self.total))

    def attach(self, optimizer) -> torch.optim.lr_scheduler.LambdaLR:
        """A scheduler for this round's ``optimizer`` that starts at the global step reached so far;
        each of its ``step()`` calls advances :attr:`done`."""
        start = self.done

        def at(s):
            self.done = start + s
            return self.factor(start + s)

        return torch.optim.lr_scheduler.LambdaLR(optimizer, at)


def _merged(checks: list) -> dict | None:
    """The mask-equivalence figures of every round's cut, as one: the worst round's, with all nodes counted."""
    checks = [c for c in checks if c is not None]
    if not checks:
        return None
    worst = max(checks, key=lambda c: (not c["ok"], c["max_rel_diff"]))
    return {**worst, "ok": all(c["ok"] for c in checks), "nodes_compared": sum(c["nodes_compared"] for c in checks),
            "rounds": len(checks)}


def _round_plan(first, graph, scores, original, target: float, cap: float, frozen) -> Plan:
    """One round's cut of the current model (``graph``): planned on the original model (``first``) for
    ``target`` of its FLOPs, each original channel scored by its energy now, a channel already removed
    by 0, and no group below ``1 - cap`` of its original channels. [I] On the original channels, each
    group's energies are divided by their mean over all its original channels (the removed ones count as
    0), not over the ones left: divided by the mean of what is left, a group that lost its weakest
    channels looks weaker each round and is cut round after round until the cap stops it."""
    on_first = {}
    for g in first.prunable_groups():
        s = torch.zeros(g.size)
        if g.name in scores and g.name in original:
            s[original[g.name]] = scores[g.name].float()
        on_first[g.name] = s
    with warnings.catch_warnings():  # a budget out of reach this round is fine: the loop goes on
        warnings.filterwarnings("ignore", message="the budget cannot be met")
        total = make_plan(first, on_first, flops=target, floor=1 - cap, ignore=frozen, meta={"method": "oicsr"})
    keep = {}
    for name, idx in original.items():
        if name not in graph.groups:
            continue
        kept_first = set(total.keep.get(name, range(first.groups[name].size)))
        kept = [i for i, o in enumerate(idx.tolist()) if o in kept_first]
        if not kept:  # only channels already gone (energy 0 ties) were kept: keep the strongest one left
            kept = [int(torch.argmax(scores[name]))] if name in scores else list(range(len(idx)))
        if len(kept) < graph.groups[name].size:
            keep[name] = kept
    return Plan(keep, {n: graph.groups[n].size for n in keep}, {"method": "oicsr"})


def _progress(enabled, total):
    from tqdm import tqdm

    return tqdm(total=total, desc="OICSR rounds", disable=not enabled)
