"""DWGL: directed-weighting group lasso (Zhan et al., BMVC 2019; docs/methods.md).

Residual adds force every layer writing a stream to keep the same channel indices,
and a channel can be removed only when *every* such producer "votes" for it. Plain
group lasso zeroes different channels in different layers, so few votes agree. DWGL
weights channel ``i`` of every group by a coefficient ``d(i)`` that increases with
the index and is shared by all producers of the group, so that they all push the same
high indices to zero.

* :class:`Regularizer` is the loss term ``lam * sum_voters sum_i d(i) ||W_{p,i}||_2``.
  A *voter* is one producing node of a group (a conv's filters and bias, or a norm
  layer's affine weight and bias), taken from the group's members; running statistics
  are buffers and are not regularized. ``schedule`` picks ``d``: ``"linear"``
  (default) ``i/C``, ``"power"`` ``(i/C)**gamma``, ``"exp"`` ``exp(kappa*(i/C - 1))``,
  ``"affine"`` ``d_min + (1 - d_min)*i/C``, or ``"none"`` (plain group lasso, ``d = 1``),
  for ``i = 1..C`` over the group size ``C``; with ``normalize`` the mean of ``d`` is 1
  so that ``lam`` means the same as for plain group lasso. The exact ``d`` of the paper
  is not known: these schedules are interpretations.
* ``flops=`` (an interpretation for short training budgets; the paper's constant
  strength is ``flops=None``): the regularizer is told the budget and, every ``every``
  training steps, schedules the channels to remove with :func:`fxprune.make_plan` on
  the vote score below (so that every writer of a residual add agrees), and adds a
  growing penalty ``rho(t) * ||channel||^2`` on exactly those channels, over every
  trainable member slice (conv rows, BN gamma and beta, consumer columns), with
  ``rho(t) = min(ceiling, grow * t)`` (growing regularisation, Wang et al., ICLR 2021).
  They reach ~0 within a few epochs, so ``compile(method="dwgl", flops=...)`` cuts them
  at no cost. The directed group lasso itself is unchanged. On digits (3 epochs) a rise
  over 20 steps left the network less time to settle than the default immediate one.
* :meth:`Regularizer.removable` is the vote: channel ``i`` goes when, for every voter,
  ``||W_{p,i}|| <= tau * max_j ||W_{p,j}||``.
* :func:`score` (``compile(method="dwgl")``) is the budget mode: channels ranked by the
  max over voters of that relative norm, read from the trained weights.
* :func:`permute` reorders each group's channels by descending importance before
  training (every member, producers, consumers and BN statistics alike), so that the
  directed weights fall on the channels that already matter least; the result is
  checked to compute the same function.

Example::

    >>> import torch, fxprune
    >>> from fxprune.passes import dwgl
    >>> net = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.ReLU(),
    ...                           torch.nn.Conv2d(4, 2, 1))
    >>> graph = fxprune.analyze(net.eval(), (torch.randn(1, 1, 6, 6),))
    >>> reg = dwgl.Regularizer(graph, lam=1e-3)
    >>> reg.coefficients_of("0")
    tensor([0.4000, 0.8000, 1.2000, 1.6000])
    >>> loss = reg(net)                      # add to the task loss in the training loop
    >>> sorted(dwgl.score(graph)) == ["0"]
    True
    >>> reg = dwgl.Regularizer(graph, lam=1e-3, flops=0.5)  # told the budget: a growing penalty on the cut
    >>> loss = reg(net)
    >>> int(reg.scheduled["0"].sum()), reg.strength
    (2, 1.0)
"""
from __future__ import annotations

import copy

import torch

from fxprune.utils import eval_mode
from fxprune.errors import ConfigError, VerificationError
from fxprune.plan.budget import DEFAULT
from fxprune.verify.mask import random_inputs

from .group_lasso import (GroupLasso, Growing, channel_sq_norms, graph_tensors, model_tensors, select_groups,
                          trainable_members, voters)

SCHEDULES = ("linear", "power", "exp", "affine", "none")


def directed(size: int, schedule: str = "linear", *, gamma: float = 2.0, kappa: float = 3.0, d_min: float = 0.1,
             normalize: bool = True) -> torch.Tensor:
    """The directed coefficients ``d(1..size)`` (see the module docstring).

        >>> directed(4, normalize=False)
        tensor([0.2500, 0.5000, 0.7500, 1.0000])
    """
    if schedule not in SCHEDULES:
        raise ConfigError(f"schedule='{schedule}' is unknown: choose one of {', '.join(SCHEDULES)}")
    r = torch.arange(1, size + 1, dtype=torch.float32) / size
    d = {"linear": lambda: r, "power": lambda: r.pow(gamma), "exp": lambda: torch.exp(kappa * (r - 1)),
         "affine": lambda: d_min + (1 - d_min) * r, "none": lambda: torch.ones(size)}[schedule]()
    return d / d.mean() if normalize else d


class Regularizer(GroupLasso):
    """The DWGL loss term over every prunable group of ``graph``; call it on the user's model.

    ``groups`` restricts it to some group names. Pinned channels get coefficient 0.
    ``flops`` (fraction of the FLOPs kept) adds the budget schedule of the module
    docstring (``every``, ``grow``, ``ceiling``; its counts rounded by ``round_to`` as ``compile`` rounds
    them, the fast counts when not given); ``reg.scheduled`` holds the channels it
    drives to zero, ``reg.strength`` the current factor. :meth:`prox` applies both terms
    as a proximal step instead.
    """

    def __init__(self, graph, lam: float = 1e-4, schedule: str = "linear", *, normalize: bool = True,
                 groups=None, gamma: float = 2.0, kappa: float = 3.0, d_min: float = 0.1, eps: float = 1e-8,
                 flops: float | None = None, every: int = 10, grow: float = 1.0, ceiling: float = 1.0,
                 round_to=DEFAULT):
        terms = []
        self._coef = {}
        selected = select_groups(graph, groups)
        growing = None
        if flops is not None:
            growing = Growing(graph, selected, lambda t: {g.name: relative_importance(graph, g, t) for g in selected},
                              flops=flops, every=every, grow=grow, ceiling=ceiling, round_to=round_to)
        for g in selected:
            d = directed(g.size, schedule, gamma=gamma, kappa=kappa, d_min=d_min, normalize=normalize)
            d = d * (~g.pinned).float()
            self._coef[g.name] = d
            for members in voters(graph, g).values():
                terms.append((g, members, d))
        super().__init__(graph, lam, terms, eps, growing)
        self.schedule = schedule

    def coefficients_of(self, group: str) -> torch.Tensor:
        """The directed coefficients of group ``group``."""
        return self._coef[group]

    @torch.no_grad()
    def removable(self, model, tau: float = 1e-2) -> dict[str, torch.Tensor]:
        """The vote: per group, a bool tensor of the channels every voter agrees to remove."""
        tensors = model_tensors(model, self._needed)
        return {name: (relative_importance(self.graph, self.graph.groups[name], tensors) <= tau)
                & ~self.graph.groups[name].pinned for name in self._coef}


def relative_importance(graph, group, tensors=None) -> torch.Tensor:
    """Per channel, the max over voters of ``||W_{p,i}|| / max_j ||W_{p,j}||`` (in [0, 1]).

    ``tensors`` maps names to tensors (the user's parameters); default: the analysed copy's.
    A group without voters falls back to the relative L2 norm of all its trainable members.
    """
    tensors = graph_tensors(graph) if tensors is None else tensors
    groups_of_members = list(voters(graph, group).values()) or [trainable_members(graph, group)]
    rel = torch.zeros(group.size)
    for members in groups_of_members:
        norm = channel_sq_norms(tensors, group, members).detach().float().cpu().sqrt()
        rel = torch.maximum(rel, norm / norm.max().clamp_min(1e-30))
    return rel


def score(graph, data=None, seed=0):
    """Budget-mode DWGL criterion: :func:`relative_importance` of every prunable group's channels."""
    return {g.name: relative_importance(graph, g) for g in graph.prunable_groups()}


# its cut takes what the schedule drove to zero: both on the relaxed fast counts (fxprune.pipeline.resolve_rounding)
score.relaxed_fast_counts = True


def permute(model, graph, *, importance=None, rtol: float = 1e-4):
    """A copy of ``model`` whose group channels are sorted by descending importance; ``model`` is unchanged.

    Returns ``(copy, perms)``; ``perms[group][new] = old``. Every member of a group
    (producer rows, consumer columns, norm affine and running statistics) is permuted
    alike; groups with a pinned channel are left as they are. ``importance`` maps group
    name to a tensor (default: :func:`relative_importance` on ``model``'s weights). The
    copy is checked against ``model`` on random inputs; a difference raises
    :class:`~fxprune.errors.VerificationError`.

        >>> import torch, fxprune
        >>> net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
        >>> graph = fxprune.analyze(net, (torch.randn(1, 3),))
        >>> new, perms = permute(net, graph, importance={"0": torch.tensor([0.1, 0.4, 0.3, 0.2])})
        >>> perms["0"].tolist()
        [1, 2, 3, 0]
    """
    inner = model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model
    new = copy.deepcopy(inner)
    named = dict(new.named_parameters())
    named.update(dict(new.named_buffers()))
    user = model_tensors(inner)
    perms = {}
    with torch.no_grad():
        for g in graph.prunable_groups():
            if bool(g.pinned.any()):
                continue
            imp = importance[g.name] if importance is not None and g.name in importance else \
                relative_importance(graph, g, user)
            perm = torch.sort(torch.as_tensor(imp, dtype=torch.float64), descending=True, stable=True).indices
            for m in g.members:
                if m.param not in named:
                    raise ConfigError(f"the model has no parameter or buffer '{m.param}' named by group '{g.name}': "
                                      "pass the model that was analysed")
                t = named[m.param]
                t.copy_(t.index_select(m.dim, _source_positions(m.index, perm).to(t.device)))
            perms[g.name] = perm
    _check_same_function(inner, new, graph, rtol)
    return new, perms


def _source_positions(index: torch.Tensor, perm: torch.Tensor) -> torch.Tensor:
    """Position map so that the k-th position of new channel c reads the k-th position of old channel perm[c]."""
    src = torch.arange(index.numel())
    positions = [torch.nonzero(index == c).flatten() for c in range(perm.numel())]
    for c, old in enumerate(perm.tolist()):
        if positions[c].numel() != positions[old].numel():
            raise ConfigError("a member reads group channels a different number of times each; "
                              "its channels cannot be permuted")
        src[positions[c]] = positions[old]
    return src


def _check_same_function(original, permuted, graph, rtol):
    inputs = random_inputs(graph.example_inputs, seed=0, batch=4)
    with eval_mode(original), eval_mode(permuted), torch.no_grad():
        a, b = original(*inputs), permuted(*inputs)
    a = a[0] if isinstance(a, (tuple, list)) else a
    b = b[0] if isinstance(b, (tuple, list)) else b
    err = float((a - b).abs().max())
    if err > rtol * float(a.abs().max()) + 1e-6:
        raise VerificationError(f"the channel permutation changed the model's output (max difference {err:.3g}); "
                                "some op in the model does not follow channel order. Train without permute().")

