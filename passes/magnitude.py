"""Magnitude criteria: the L1 or L2 norm of every parameter slice of a channel.

A channel's score is the norm over all its parameter members, producers and consumers
alike (conv rows and columns, biases, norm affine parameters; not the running statistics,
which are not weights): a group-lasso view of the channel as one block of weights, as
Torch-Pruning's group magnitude importance.

Example::

    >>> import torch, fxprune
    >>> from fxprune.passes import magnitude
    >>> net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 1, bias=False), torch.nn.Conv2d(4, 2, 1, bias=False))
    >>> with torch.no_grad():
    ...     _ = net[0].weight.fill_(1.0); _ = net[1].weight.fill_(1.0); net[0].weight[2] = 0.0
    >>> graph = fxprune.analyze(net, (torch.randn(1, 3, 4, 4),))
    >>> magnitude.l1(graph)["0"]
    tensor([5., 5., 2., 5.])
"""
from __future__ import annotations

import torch


STATISTICS = ("running_mean", "running_var")


def per_position(tensor: torch.Tensor, dim: int, fn) -> torch.Tensor:
    """``fn`` applied to each slice of ``tensor`` along ``dim`` (reduced over the other dims)."""
    flat = tensor.detach().movedim(dim, 0).reshape(tensor.shape[dim], -1).float()
    return fn(flat)


def group_power_sums(graph, group, p: float, members=None, cache=None) -> torch.Tensor:
    """Sum over members (default: every weight member) of ``sum |w|^p`` per channel of ``group``.

    ``cache`` (a dict shared across groups) keeps each parameter's table of ``sum |w|^p``
    over its dims past the first two, so a conv weight read as rows by one group and as
    columns by another is reduced once.
    """
    total = torch.zeros(group.size)
    if members is None:
        members = [m for m in group.members if m.role not in STATISTICS]
    cache = {} if cache is None else cache
    for m in members:
        table = cache.get((m.param, p))
        if table is None:
            w = graph.param(m.param).detach().float()
            table = w.abs().pow(p) if w.dim() < 2 else torch.linalg.vector_norm(
                w.flatten(2) if w.dim() > 2 else w.unsqueeze(-1), ord=p, dim=-1).pow(p)
            cache[(m.param, p)] = table
        values = table if table.dim() == 1 else table.sum(1 - m.dim) if m.dim < 2 else None
        if values is None:  # a member along a dim past the second: reduce from the weight itself
            w = graph.param(m.param).detach().float()
            values = torch.linalg.vector_norm(w.movedim(m.dim, 0).flatten(1), ord=p, dim=1).pow(p)
        total += group.reduce(values, m)
    return total


def l1(graph, data=None, seed=0):
    cache = {}
    return {g.name: group_power_sums(graph, g, 1.0, cache=cache) for g in graph.prunable_groups()}


def l2(graph, data=None, seed=0):
    cache = {}
    return {g.name: group_power_sums(graph, g, 2.0, cache=cache).sqrt() for g in graph.prunable_groups()}
