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

from fxprune.gcpause import paused_gc

STATISTICS = ("running_mean", "running_var")


def per_position(tensor: torch.Tensor, dim: int, fn) -> torch.Tensor:
    """``fn`` applied to each slice of ``tensor`` along ``dim`` (reduced over the other dims)."""
    flat = tensor.detach().movedim(dim, 0).reshape(tensor.shape[dim], -1).float()
    return fn(flat)


def group_power_sums(graph, group, p: float, members=None, cache=None) -> torch.Tensor:
    """Sum over members (default: every weight member) of ``sum |w|^p`` per channel of ``group``.

    ``cache`` (a dict shared across groups) keeps each parameter's per-slice sums along
    its first two dims, so a conv weight read as rows by one group and as columns by
    another is read once.
    """
    total = torch.zeros(group.size)
    if members is None:
        members = [m for m in group.members if m.role not in STATISTICS]
    cache = {} if cache is None else cache
    for m in members:
        if (m.param, 0, p) not in cache:
            for dim, sums in _slice_sums(graph.param(m.param).detach().float(), p).items():
                cache[(m.param, dim, p)] = sums
        values = cache.get((m.param, m.dim, p))
        if values is None:  # a member along a dim past the second: reduce from the weight itself
            values = _power(graph.param(m.param).detach().float(), p).movedim(m.dim, 0).flatten(1).sum(1)
        total += group.reduce(values, m)
    return total


_BLOCK = 1 << 18  # elements of a 2-D weight raised to the power at a time (stays in cache)


def _slice_sums(w: torch.Tensor, p: float) -> dict[int, torch.Tensor]:
    """``sum |w|^p`` over all dims but one, for dim 0 and (if any) dim 1.

    One pass over ``w`` and no temporary as large as it: a norm over the kernel dims of a
    conv, or a 2-D weight (a linear, a 1x1 conv) taken in blocks of rows.
    """
    if w.dim() == 1:
        return {0: _power(w, p)}
    if w.dim() > 2 and w.shape[2:].numel() > 1:
        k = w.flatten(2)  # [out, in, kernel]: squares summed by a batched product, a third faster than a norm
        table = torch.einsum("oik,oik->oi", k, k) if p == 2 else torch.linalg.vector_norm(k, ord=p, dim=-1).pow(p)
        return {0: table.sum(1), 1: table.sum(0)}
    w = w.reshape(w.shape[0], w.shape[1])
    rows, cols = torch.empty(w.shape[0]), torch.zeros(w.shape[1])
    step = max(1, _BLOCK // max(1, w.shape[1]))
    for i in range(0, w.shape[0], step):
        block = _power(w[i:i + step], p)
        rows[i:i + step] = block.sum(1)
        cols += block.sum(0)
    return {0: rows, 1: cols}


def _power(w: torch.Tensor, p: float) -> torch.Tensor:
    return w.abs() if p == 1 else w.square() if p == 2 else w.abs().pow(p)


@paused_gc
def l1(graph, data=None, seed=0):
    cache = {}
    return {g.name: group_power_sums(graph, g, 1.0, cache=cache) for g in graph.prunable_groups()}


@paused_gc
def l2(graph, data=None, seed=0):
    cache = {}
    return {g.name: group_power_sums(graph, g, 2.0, cache=cache).sqrt() for g in graph.prunable_groups()}
