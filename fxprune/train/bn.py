"""BatchNorm running statistics re-estimated after a cut, weights untouched.

A model trained with a regulariser that drives channels to zero (``dwgl``, ``oicsr``, ``gsm``)
is cut for free, but its BN running means and variances are exponential averages over the last
steps of a fast-changing network: they lag behind the weights. :func:`recalibrate_bn` resets
every BN layer's running statistics and recomputes them as the plain (cumulative) average over
the given batches, in one forward pass each, with everything else in eval mode (dropout off) and
no gradient. Weights, biases and BN's affine parameters are not touched.

Example::

    >>> import torch
    >>> from fxprune.train import recalibrate_bn
    >>> net = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.BatchNorm2d(4)).eval()
    >>> x = 3 + 2 * torch.randn(64, 1, 8, 8)
    >>> fixed = recalibrate_bn(net, x)                     # a copy; net keeps its statistics
    >>> bool(net[1].running_mean.eq(0).all()), bool(fixed[1].running_mean.ne(0).any())
    (True, True)
    >>> ref = net[0](x).mean((0, 2, 3))                    # the batch mean the BN now holds
    >>> torch.allclose(fixed[1].running_mean, ref, atol=1e-5)
    True
"""
from __future__ import annotations

import copy

import torch
import torch.nn as nn

from ..errors import ConfigError
from ..io.data import batches as as_batches


def bn_layers(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    """The BatchNorm layers of ``model`` that keep running statistics."""
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]


@torch.no_grad()
def recalibrate_bn(model: nn.Module, data, *, num_batches: int | None = None, inplace: bool = False,
                   device=None) -> nn.Module:
    """Reset and re-estimate the running mean and variance of every BN layer of ``model`` on ``data``.

    ``data``: an iterable of ``(inputs, labels)`` batches (a ``DataLoader``), of bare input
    tensors, or one input tensor or ``(inputs, labels)`` pair (labels are ignored); at most
    ``num_batches`` batches are used. The statistics are the cumulative average over the batches
    (BN ``momentum=None``), each batch weighted equally, as ``torch.optim.swa_utils.update_bn``
    does. Returns a recalibrated copy (``inplace=False``, the default; ``model`` is not changed)
    or ``model`` itself; its ``training`` flags are those ``model`` had. ``device`` moves each
    batch there (the model must be there already). Raises :class:`~fxprune.errors.ConfigError` if
    the model has no BN layer that tracks running statistics.
    """
    if num_batches is not None and (not isinstance(num_batches, int) or num_batches < 1):
        raise ConfigError(f"num_batches={num_batches} must be a positive integer or None (all batches)")
    if not bn_layers(model):
        raise ConfigError("recalibrate_bn: the model has no BatchNorm layer with running statistics to re-estimate")
    out = model if inplace else copy.deepcopy(model)
    layers = bn_layers(out)
    flags = {m: m.training for m in out.modules()}
    momenta = {m: m.momentum for m in layers}
    try:
        out.eval()
        for m in layers:
            m.reset_running_stats()
            m.momentum = None  # cumulative average over the batches
            m.train()
        for inputs, _ in as_batches(data, limit=num_batches):
            if device is not None:
                inputs = tuple(x.to(device) if isinstance(x, torch.Tensor) else x for x in inputs)
            out(*inputs)
    finally:
        for m in layers:
            m.momentum = momenta[m]
        for m, flag in flags.items():
            m.training = flag
    return out
