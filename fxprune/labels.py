"""Channel labels: small integer tensors that say which channel sits where in a value.

During coupling every tensor value of the traced graph gets a *label*: an int64 tensor
with the value's number of dimensions, broadcastable to its shape, whose entries are
channel ids (``>= 0``) or :data:`FIXED` (``-1``, a position that can never be
removed: it comes from a model input, a constant, or an op no rule understands).
A dimension of size 1 in the label means the ids do not vary along it. ``None``
stands for a value whose positions are all fixed.

A conv output of shape ``[N, 64, H, W]`` has a label of shape ``[1, 64, 1, 1]``;
after ``flatten(1)`` it becomes ``[1, 64 * H * W]`` with each id repeated ``H * W`` times.
Shape ops (view, permute, cat, split, pixel shuffle, ...) are applied to labels exactly
as to values, so channel positions follow any reshuffle the model does.

Example::

    >>> import torch
    >>> from fxprune.labels import collapse, varying
    >>> lab = torch.arange(4).view(1, 4, 1, 1).expand(1, 4, 3, 3)
    >>> collapse(lab).shape, varying(collapse(lab))
    (torch.Size([1, 4, 1, 1]), [1])
"""
from __future__ import annotations

import numpy as np
import torch

FIXED = -1


def collapse(label: torch.Tensor | None) -> torch.Tensor | None:
    """Shrink every dimension along which ``label`` is constant to size 1; all-fixed gives None."""
    if label is None:
        return None
    out = collapse_array(label.numpy())
    return None if out is None else torch.from_numpy(out)


def collapse_array(label: np.ndarray) -> np.ndarray | None:
    """:func:`collapse` on a numpy array (labels are small: numpy's per-call cost is torch's tenth)."""
    # the longest dims first: each one found constant shrinks what the next checks read
    for d in sorted(range(label.ndim), key=lambda d: -label.shape[d]):
        if label.shape[d] > 1:
            first = label[(slice(None),) * d + (slice(0, 1),)]
            if label.strides[d] == 0 or (label == first).all():
                label = first
    if (label == FIXED).all():
        return None
    return np.ascontiguousarray(label)


def varying(label: torch.Tensor | None) -> list[int]:
    """The dimensions along which a collapsed label varies."""
    if label is None:
        return []
    return [d for d in range(label.dim()) if label.shape[d] > 1]


def expand_to(label: torch.Tensor | None, shape) -> torch.Tensor:
    """The label materialised at the value's full shape (FIXED everywhere for None)."""
    shape = tuple(shape)
    if label is None:
        return torch.full(shape, FIXED, dtype=torch.long)
    return label.expand(shape).contiguous()


def along(label: torch.Tensor | None, dim: int, size: int) -> torch.Tensor:
    """The 1-D ids along ``dim`` (``size`` long) of a label that varies along ``dim`` only."""
    if label is None:
        return torch.full((size,), FIXED, dtype=torch.long)
    index = [0] * label.dim()
    index[dim] = slice(None)
    ids = label.numpy()[tuple(index)]  # numpy: a tenth of torch's cost per index on small labels
    return torch.from_numpy(np.array(np.broadcast_to(ids, (size,))))  # a writable copy


def kept_along(label: torch.Tensor | None, dim: int, size: int, keep: torch.Tensor) -> torch.Tensor:
    """Bool mask of the positions along ``dim`` that survive, given a global channel ``keep`` mask."""
    ids = along(label, dim, size) if dim in varying(label) else torch.full((size,), FIXED, dtype=torch.long)
    return (ids < 0) | keep[ids.clamp(min=0)]
