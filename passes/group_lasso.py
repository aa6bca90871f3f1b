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

import torch

from fxprune.errors import ConfigError


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

    def __init__(self, graph, lam: float, terms, eps: float = 1e-8):
        if not lam >= 0:
            raise ConfigError(f"lam={lam} must be a non-negative number (the regularization strength)")
        self.graph, self.lam, self.eps = graph, float(lam), eps
        self.terms = [(g, list(ms), torch.as_tensor(c, dtype=torch.float32)) for g, ms, c in terms if ms]
        for g, _, c in self.terms:
            if tuple(c.shape) != (g.size,):
                raise ConfigError(f"a coefficient vector for group '{g.name}' has shape {tuple(c.shape)}, not ({g.size},)")
        self._needed = sorted({m.param for _, ms, _ in self.terms for m in ms})

    def norms(self, model) -> list[torch.Tensor]:
        """The per-channel norm of each term on ``model`` (differentiable)."""
        tensors = model_tensors(model, self._needed)
        return [channel_sq_norms(tensors, g, ms).clamp_min(self.eps ** 2).sqrt() for g, ms, _ in self.terms]

    def weighted(self, norms: torch.Tensor, coef: torch.Tensor) -> torch.Tensor:
        """One term's penalty from its per-channel norms."""
        return (self.coefficients(norms.detach(), coef).to(norms.device) * norms).sum()

    def __call__(self, model) -> torch.Tensor:
        norms = self.norms(model)
        if not norms:
            return torch.zeros(())
        total = sum(self.weighted(n, c) for n, (_, _, c) in zip(norms, self.terms))
        return self.lam * total

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

    def coefficients(self, norms: torch.Tensor, coef: torch.Tensor) -> torch.Tensor:
        """The per-channel coefficient of one term; subclasses may make it depend on the norms (GrOWL)."""
        return coef
