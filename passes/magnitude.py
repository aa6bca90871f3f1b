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

from fxprune.utils import paused_gc

STATISTICS = ("running_mean", "running_var")
#: not scored: a weight standardised at run time is scored on its computed value (group.computed), not its source
UNSCORED = STATISTICS + ("weight source",)


def per_position(tensor: torch.Tensor, dim: int, fn) -> torch.Tensor:
    """``fn`` applied to each slice of ``tensor`` along ``dim`` (reduced over the other dims)."""
    flat = tensor.detach().movedim(dim, 0).reshape(tensor.shape[dim], -1).float()
    return fn(flat)


def group_power_sums(graph, group, p: float, members=None, cache=None) -> torch.Tensor:
    """Sum over members (default: every weight member) of ``sum |w|^p`` per channel of ``group``.

    ``cache`` (a dict shared across groups) keeps each parameter (or computed weight) and its
    per-slice sums along its first two dims, so a conv weight read as rows by one group and as
    columns by another is read once.
    """
    total = torch.zeros(group.size)
    if members is None:  # with the slices of weights computed at run time (group.computed)
        members = [m for m in group.members if m.role not in UNSCORED] + list(group.computed)
    cache = {} if cache is None else cache
    computed = {m.param for m in group.computed}
    for m in members:
        if m.param not in cache:
            cache[m.param] = graph.computed_value(m.param) if m.param in computed else graph.param(m.param)
        w = cache[m.param]
        if w is None:   # a weight computed from the model's inputs: no magnitude of its own
            continue
        if (m.param, 0, p) not in cache:
            for dim, sums in _slice_sums(w.detach().float(), p).items():
                cache[(m.param, dim, p)] = sums
        values = cache.get((m.param, m.dim, p))
        if values is None:  # a member along a dim past the second: reduce from the weight itself
            values = _power(w.detach().float(), p).movedim(m.dim, 0).flatten(1).sum(1)
        total += values if m.covers(group.size) else group.reduce(values, m)
    return total


_BLOCK = 1 << 17  # elements raised to the power at a time: a block stays in the L2 cache


def _slice_sums(w: torch.Tensor, p: float) -> dict[int, torch.Tensor]:
    """``sum |w|^p`` over all dims but one, for dim 0 and (if any) dim 1.

    The weight is read once, as a 2-D ``[out, in * kernel]`` matrix in blocks of rows:
    each block's powers are summed along the rows and down the columns while it is in
    cache (a kernel's columns are folded into their input channel at the end).
    """
    if w.dim() == 1:
        return {0: _power(w, p)}
    flat = w.reshape(w.shape[0], -1)
    n_rows, n_cols = flat.shape
    rows, cols = torch.empty(n_rows), torch.zeros(n_cols)
    step = max(1, _BLOCK // max(1, n_cols))
    scratch = torch.empty(min(step, n_rows) * n_cols)
    for i in range(0, n_rows, step):
        block = flat[i:i + step]
        powered = _power(block, p, out=scratch[:block.numel()].view(block.shape))
        torch.sum(powered, 1, out=rows[i:i + step])
        cols += powered.sum(0)
    return {0: rows, 1: cols.view(w.shape[1], -1).sum(1) if w.dim() > 2 else cols}


def _power(w: torch.Tensor, p: float, out=None) -> torch.Tensor:
    if p == 2:
        return torch.mul(w, w, out=out) if out is not None else w.square()
    if p == 1:
        return torch.abs(w, out=out) if out is not None else w.abs()
    return torch.pow(w.abs(), p, out=out) if out is not None else w.abs().pow(p)


@paused_gc
def l1(graph, data=None, seed=0):
    cache = {}
    return {g.name: group_power_sums(graph, g, 1.0, cache=cache) for g in graph.prunable_groups()}


@paused_gc
def l2(graph, data=None, seed=0):
    cache = {}
    return {g.name: group_power_sums(graph, g, 2.0, cache=cache).sqrt() for g in graph.prunable_groups()}
