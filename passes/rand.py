"""Random criterion: uniform scores from a seeded generator (the baseline every method must beat).

Example::

    >>> import torch, fxprune
    >>> from fxprune.passes import rand
    >>> net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 1), torch.nn.Conv2d(4, 2, 1))
    >>> graph = fxprune.analyze(net, (torch.randn(1, 3, 4, 4),))
    >>> torch.equal(rand.score(graph, seed=1)["0"], rand.score(graph, seed=1)["0"])
    True
"""
from __future__ import annotations

import torch


def score(graph, data=None, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return {g.name: torch.rand(g.size, generator=gen) for g in graph.prunable_groups()}
