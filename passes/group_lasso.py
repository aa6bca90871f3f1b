"""Group-lasso machinery shared by the training-time regularizers (DWGL, OICSR).

A regularizer here is a list of *terms*. A term is a set of parameter members of one
channel group plus one coefficient per group channel; its penalty is

    sum_i  coef[i] * || all slices of the term's members at channel i ||_2

:class:`GroupLasso` holds the terms, adds them up on the *user's* model (members are
found by name, ``dict(model.named_parameters())[member.param]``; the analysed copy's
parameter names are the user's qualified names), and offers the matching proximal
step (group soft-threshold) as an alternative to the subgradient. Only parameters are
regularized: buffers (BN running statistics) cannot be trained and are left out.

Example::

    >>> import torch, fxprune
    >>> from fxprune.passes.group_lasso import GroupLasso, trainable_members
    >>> net = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 1, bias=False), torch.nn.Conv2d(2, 1, 1, bias=False))
    >>> with torch.no_grad():
    ...     _ = net[0].weight.copy_(torch.tensor([3.0, 0.0]).view(2, 1, 1, 1))
    ...     _ = net[1].weight.copy_(torch.tensor([4.0, 1.0]).view(1, 2, 1, 1))
    >>> graph = fxprune.analyze(net, (torch.randn(1, 1, 2, 2),))
    >>> g = graph.groups["0"]
    >>> reg = GroupLasso(graph, lam=0.5, terms=[(g, trainable_members(graph, g), torch.ones(2))])
    >>> reg(net)            # 0.5 * (sqrt(3**2 + 4**2) + sqrt(0**2 + 1**2))
    tensor(3., grad_fn=<MulBackward0>)
"""
from __future__ import annotations

import warnings

import torch

from fxprune.errors import ConfigError
from fxprune.pipeline import resolve_rounding
from fxprune.plan import make_plan
from fxprune.plan.budget import DEFAULT


def trainable_members(graph, group, kinds=("producer", "consumer")) -> list:
    """The members of ``group`` of the given kinds that are parameters (buffers left out)."""
    params = dict(graph.module.named_parameters())
    return [m for m in group.members if m.kind in kinds and m.param in params]


def voters(graph, group) -> dict[str, list]:
    """The group's trainable producer members, one list per producing node (a conv, its BN, ...).

    Each node that writes the group's channels "votes" on them (DWGL's voting): a
    channel can go only when every voter's slices of it are (near) zero.
    """
    out: dict[str, list] = {}
    for m in trainable_members(graph, group, ("producer",)):
        out.setdefault(m.node, []).append(m)
    return out


def residual_groups(graph) -> list[str]:
    """Names of the groups written by more than one weight-carrying producer (residual streams)."""
    out = []
    for g in graph.groups.values():
        writers = {m.node for m in g.members if m.kind == "producer" and m.role == "weight"}
        if len(writers) > 1:
            out.append(g.name)
    return out


def select_groups(graph, groups=None, skip=()) -> list:
    """The prunable groups named in ``groups`` (default: all prunable groups but those in ``skip``)."""
    if groups is None:
        return [g for g in graph.prunable_groups() if g.name not in set(skip)]
    unknown = [n for n in groups if n not in graph.groups]
    if unknown:
        raise ConfigError(f"groups= names '{unknown[0]}', which the graph does not have; "
                          f"choose among {', '.join(graph.groups)}")
    return [graph.groups[n] for n in groups if graph.groups[n].prunable > 0]


def channel_sq_norms(tensors: dict, group, members) -> torch.Tensor:
    """Per channel of ``group``, the sum of squares of ``members``' slices (differentiable).

    ``tensors`` maps parameter name to tensor (the user's ``named_parameters()`` or the
    analysed copy's). A channel read at several positions (a flatten) sums them all.
    """
    total = None
    for m in members:
        t = tensors[m.param]
        per_pos = t.movedim(m.dim, 0).reshape(t.shape[m.dim], -1).pow(2).sum(1)
        keep = m.index >= 0
        idx = m.index[keep].to(per_pos.device)
        part = torch.zeros(group.size, dtype=per_pos.dtype, device=per_pos.device).index_add(0, idx, per_pos[keep.to(per_pos.device)])
        total = part if total is None else total + part
    if total is None:
        return torch.zeros(group.size)
    return total


def graph_tensors(graph) -> dict:
    """The analysed copy's parameters and buffers by qualified name (detached)."""
    named = dict(graph.module.named_parameters())
    named.update(dict(graph.module.named_buffers()))
    return {k: v.detach() for k, v in named.items()}


def model_tensors(model, needed=()) -> dict:
    """The user's parameters by name; raises ConfigError naming any parameter the graph needs but ``model`` lacks."""
    if isinstance(model, torch.nn.parallel.DistributedDataParallel):
        model = model.module
    named = dict(model.named_parameters())
    missing = [n for n in needed if n not in named]
    if missing:
        raise ConfigError(f"the model has no parameter '{missing[0]}' that the channel graph names: pass the "
                          "model that was analysed (for DDP, the wrapper or its .module both work)")
    return named


class GroupLasso:
    """``lam * sum over terms and channels of coef[i] * ||slices at channel i||_2`` (see the module docstring).

    ``terms`` is a list of ``(group, members, coef)``; ``eps`` keeps the gradient finite
    (a norm below ``eps`` counts as ``eps`` and gets no gradient). Call it on the user's
    model to get the loss term; :meth:`prox` is the proximal alternative.
    """

    def __init__(self, graph, lam: float, terms, eps: float = 1e-8, growing=None):
        if not lam >= 0:
            raise ConfigError(f"lam={lam} must be a non-negative number (the regularization strength)")
        self.graph, self.lam, self.eps = graph, float(lam), eps
        self.growing = growing
        self.terms = [(g, list(ms), torch.as_tensor(c, dtype=torch.float32)) for g, ms, c in terms if ms]
        for g, _, c in self.terms:
            if tuple(c.shape) != (g.size,):
                raise ConfigError(f"a coefficient vector for group '{g.name}' has shape {tuple(c.shape)}, not ({g.size},)")
        needed = {m.param for _, ms, _ in self.terms for m in ms}
        if growing is not None:
            needed |= {m.param for ms in growing.members.values() for m in ms}
        self._needed = sorted(needed)

    @property
    def scheduled(self) -> dict[str, torch.Tensor]:
        """Per group, the channels the budget schedule is driving to zero (empty without ``flops=``)."""
        return dict(self.growing.scheduled) if self.growing is not None else {}

    @property
    def strength(self) -> float:
        """The growing penalty's current factor (0 without ``flops=``)."""
        return self.growing.strength if self.growing is not None else 0.0

    def norms(self, model) -> list[torch.Tensor]:
        """The per-channel norm of each term on ``model`` (differentiable)."""
        tensors = model_tensors(model, self._needed)
        return [channel_sq_norms(tensors, g, ms).clamp_min(self.eps ** 2).sqrt() for g, ms, _ in self.terms]

    def weighted(self, norms: torch.Tensor, coef: torch.Tensor) -> torch.Tensor:
        """One term's penalty from its per-channel norms."""
        return (self.coefficients(norms.detach(), coef).to(norms.device) * norms).sum()

    def __call__(self, model) -> torch.Tensor:
        norms = self.norms(model)
        total = self.lam * sum(self.weighted(n, c) for n, (_, _, c) in zip(norms, self.terms)) if norms \
            else torch.zeros(())
        if self.growing is not None:
            total = total + self.growing(model_tensors(model, self._needed))
        return total

    @torch.no_grad()
    def prox(self, model, lr: float) -> None:
        """Group soft-threshold in place: scale channel ``i`` of each term by ``max(0, 1 - lr*lam*coef[i]/norm_i)``.

        Call it after ``optimizer.step()`` instead of adding the loss term (proximal
        gradient descent); it zeroes weak channels exactly.
        """
        tensors = model_tensors(model, self._needed)
        for (g, ms, c), norm in zip(self.terms, self.norms(model)):
            coef = self.coefficients(norm, c)
            scale = (1 - lr * self.lam * coef.to(norm.device) / norm).clamp_min(0.0)
            for m in ms:
                t = tensors[m.param]
                per_pos = torch.ones(t.shape[m.dim], dtype=t.dtype, device=t.device)
                keep = (m.index >= 0).to(t.device)
                per_pos[keep] = scale[m.index[m.index >= 0].to(t.device)].to(t.dtype)
                shape = [1] * t.dim()
                shape[m.dim] = -1
                t.mul_(per_pos.view(shape))
        if self.growing is not None:
            self.growing.prox(tensors, lr)

    def coefficients(self, norms: torch.Tensor, coef: torch.Tensor) -> torch.Tensor:
        """The per-channel coefficient of one term; subclasses may make it depend on the norms (GrOWL)."""
        return coef


class Growing:
    """A penalty that grows on the channels a budget removes (growing regularisation, Wang et al., ICLR 2021).

    An interpretation for short training budgets, shared by the regularizers (the papers
    keep a constant strength). Every ``every`` training steps (calls with gradients
    enabled) the channels to remove are chosen again: ``criterion(tensors)`` scores the
    groups in ``groups`` on the current weights and :func:`fxprune.make_plan` picks the
    lowest under ``flops`` (the other prunable groups are left whole), its counts rounded by ``round_to``
    as ``compile`` rounds them (:func:`fxprune.pipeline.resolve_rounding`; not given: the fast counts
    for a model with 2-d convolutions). The penalty is

        rho(t) * sum over scheduled channels i of ||every trainable slice of channel i||^2

    with ``rho(t) = min(ceiling, grow * t)``: producer rows, norm affine (BN gamma and
    beta, so that no constant output is left) and consumer columns all decay to zero,
    and the cut of those channels is then nearly free.

        >>> import torch, fxprune
        >>> net = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 1, bias=False), torch.nn.Conv2d(4, 1, 1, bias=False))
        >>> graph = fxprune.analyze(net, (torch.randn(1, 1, 2, 2),))
        >>> with torch.no_grad():
        ...     _ = net[0].weight.copy_(torch.tensor([1.0, 2.0, 3.0, 4.0]).view(4, 1, 1, 1))
        ...     _ = net[1].weight.fill_(1.0)
        >>> g = graph.groups["0"]
        >>> energy = lambda t: {"0": channel_sq_norms(t, g, trainable_members(graph, g)).detach()}
        >>> grow = Growing(graph, [g], energy, flops=0.5, every=10, grow=0.5, ceiling=1.0)
        >>> penalty = grow(dict(net.named_parameters()))     # step 1: half of the FLOPs is channels 0 and 1
        >>> grow.scheduled["0"].tolist(), grow.strength, float(penalty.detach())   # 0.5 * ((1 + 1) + (4 + 1))
        ([True, True, False, False], 0.5, 3.5)
    """

    def __init__(self, graph, groups, criterion, *, flops: float, every: int = 10, grow: float = 1.0,
                 ceiling: float = 1.0, round_to=DEFAULT):
        if not 0 < flops <= 1:
            raise ConfigError(f"flops={flops} is out of range: it is the fraction of the model's FLOPs kept, in (0, 1]")
        if not (isinstance(every, int) and every >= 1):
            raise ConfigError(f"every={every} must be a positive integer (training steps between two schedules)")
        if not (grow >= 0 and ceiling >= 0):
            raise ConfigError(f"grow={grow} and ceiling={ceiling} must be non-negative (the penalty's rise and cap)")
        self.graph, self.criterion, self.flops = graph, criterion, float(flops)
        self.every, self.grow, self.ceiling = every, float(grow), float(ceiling)
        self.members = {g.name: trainable_members(graph, g) for g in groups}
        self.ignore = sorted(g.name for g in graph.prunable_groups() if g.name not in self.members)
        self.steps = 0
        self.scheduled: dict[str, torch.Tensor] = {}
        # rounded as compile(flops=...) will round the cut, so that it takes the channels driven to zero
        self.round_to, self.latency_model = resolve_rounding(graph, round_to, relaxed=True)

    @property
    def strength(self) -> float:
        """``rho`` at the current step."""
        return min(self.ceiling, self.grow * self.steps)

    @torch.no_grad()
    def schedule(self, tensors) -> dict[str, torch.Tensor]:
        """Choose the channels to remove on the current weights (stored in ``self.scheduled``)."""
        scores = {n: torch.as_tensor(s).detach().float().cpu() for n, s in self.criterion(tensors).items()
                  if n in self.members}
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="the budget cannot be met")
            plan = make_plan(self.graph, scores, flops=self.flops, ignore=self.ignore, round_to=self.round_to,
                             latency_model=self.latency_model, ranking="importance", meta={"method": "schedule"})
        self.scheduled = {}
        for name, kept in plan.keep.items():
            if name in self.members:
                mask = torch.ones(self.graph.groups[name].size, dtype=torch.bool)
                mask[torch.tensor(kept, dtype=torch.long)] = False
                self.scheduled[name] = mask
        return self.scheduled

    def tick(self, tensors) -> None:
        """Count one training step; schedule again every ``every`` steps."""
        if self.steps % self.every == 0:
            self.schedule(tensors)
        self.steps += 1

    def __call__(self, tensors) -> torch.Tensor:
        if torch.is_grad_enabled():              # a training step (not a logging call under no_grad)
            self.tick(tensors)
        rho = self.strength
        total = 0.0
        for name, mask in self.scheduled.items():
            if rho == 0:
                break
            sq = channel_sq_norms(tensors, self.graph.groups[name], self.members[name])
            total = total + sq[mask.to(sq.device)].sum()
        return rho * total if torch.is_tensor(total) else torch.zeros(())

    @torch.no_grad()
    def prox(self, tensors, lr: float) -> None:
        """Count a step, then the penalty's proximal step: scale scheduled channels by ``1 / (1 + 2 * lr * rho)``."""
        self.tick(tensors)
        rho = self.strength
        if rho == 0:
            return
        for name, mask in self.scheduled.items():
            for m in self.members[name]:
                t = tensors[m.param]
                per_pos = torch.ones(t.shape[m.dim], dtype=t.dtype, device=t.device)
                inside = m.index >= 0
                hit = torch.zeros_like(inside)
                hit[inside] = mask[m.index[inside]]
                per_pos[hit.to(t.device)] = 1.0 / (1.0 + 2.0 * lr * rho)
                shape = [1] * t.dim()
                shape[m.dim] = -1
                t.mul_(per_pos.view(shape))
