"""BN-scale criterion (network slimming): |gamma| of the channel's normalisation layers.

A channel's score is the sum of ``|weight|`` over its members with role
``"norm_weight"`` (BatchNorm / InstanceNorm affine scales). A group without any is
scored by the L2 magnitude of its members instead, rescaled so that its mean matches
the mean BN score of the other groups.

Example::

    >>> import torch, fxprune
    >>> from fxprune.passes import bn_scale
    >>> net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 1), torch.nn.BatchNorm2d(4), torch.nn.Conv2d(4, 2, 1))
    >>> with torch.no_grad():
    ...     _ = net[1].weight.copy_(torch.tensor([0.5, -2.0, 0.1, 1.0]))
    >>> graph = fxprune.analyze(net, (torch.randn(1, 3, 4, 4),))
    >>> bn_scale.score(graph)["0"]
    tensor([0.5000, 2.0000, 0.1000, 1.0000])
"""
from __future__ import annotations

import torch

from .magnitude import group_power_sums


def score(graph, data=None, seed=0):
    out, fallback = {}, []
    for g in graph.prunable_groups():
        scales = [m for m in g.members if m.role == "norm_weight"]
        if scales:
            out[g.name] = group_power_sums(graph, g, 1.0, scales)
        else:
            fallback.append(g)
    reference = torch.cat(list(out.values())).mean() if out else torch.tensor(1.0)
    for g in fallback:
        s = group_power_sums(graph, g, 2.0).sqrt()
        out[g.name] = s * (reference / (s.mean() + 1e-12))
    return out
