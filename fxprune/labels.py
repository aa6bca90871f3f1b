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


# -- balanced grids: a label that varies along two dims (attention heads x dims per head)
#
# A reshape that splits one channel dim into blocks (``view(b, n, heads, head_dim)``) gives a label
# that varies along two dims, the first indexing the blocks. The coupling keeps such a *grid* when
# the blocks must keep equal counts at free positions (a balance constraint); each block then keeps
# its own positions, so a pruned value is the original gathered row by row, not a sub-grid.


def kept_mask(label: torch.Tensor | None, keep: torch.Tensor) -> torch.Tensor | None:
    """Bool tensor of ``label``'s shape: True where the position survives (FIXED positions always do)."""
    if label is None:
        return None
    return (label < 0) | keep[label.clamp(min=0)]


def grid_of(label: torch.Tensor | None):
    """``(d1, d2, matrix)`` of a label that varies along exactly two dims ``d1 < d2``: ``matrix[i, j]`` is the id
    at index ``i`` of ``d1`` and ``j`` of ``d2`` (blocks by positions); None for any other label.

    >>> import torch
    >>> grid_of(torch.arange(6).view(1, 2, 1, 3))
    (1, 3, tensor([[0, 1, 2],
            [3, 4, 5]]))
    """
    dims = varying(label)
    if len(dims) != 2:
        return None
    index = [0] * label.dim()
    index[dims[0]] = index[dims[1]] = slice(None)
    return dims[0], dims[1], label[tuple(index)]


def _grid(label: torch.Tensor, keep: torch.Tensor):
    """``(d1, d2, kept)`` for a label that varies along two dims ``d1 < d2`` once collapsed (``d1`` indexes
    the blocks), with the kept mask ``[blocks, positions]``; None for any other label. Every block keeps
    the same count, or (blocks tied whole, each one channel) keeps all or nothing."""
    grid = grid_of(collapse(label))
    if grid is None:
        return None
    d1, d2, ids = grid
    kept = kept_mask(ids, keep)
    per_block = kept.sum(1)
    if not bool((per_block == per_block[0]).all()) and not bool(((per_block == 0) | kept.all(1)).all()):
        raise ValueError(f"fxprune internal error: a grid label keeps unequal counts per block ({per_block.tolist()})")
    return d1, d2, kept


def kept_shape(shape, label: torch.Tensor | None, keep: torch.Tensor) -> tuple:
    """The shape of a value of ``shape`` whose positions carry ``label``, once the channels not in ``keep`` are gone.

    >>> import torch
    >>> lab = torch.arange(6).view(1, 2, 3)      # 2 blocks of 3 channels
    >>> keep = torch.tensor([True, False, True, False, True, True])
    >>> kept_shape((4, 2, 3), lab, keep)
    (4, 2, 2)
    """
    out = list(shape)
    if label is None:
        return tuple(out)
    grid = _grid(label, keep) if len(varying(label)) > 1 else None
    if grid is not None:
        d1, d2, kept = grid
        blocks = kept.any(1)
        out[d1], out[d2] = int(blocks.sum()), int(kept[blocks][0].sum()) if bool(blocks.any()) else 0
        return tuple(out)
    for d in varying(label):
        out[d] = int(kept_along(label, d, shape[d], keep).sum())
    return tuple(out)


def select_kept(value: torch.Tensor, label: torch.Tensor | None, keep: torch.Tensor) -> torch.Tensor:
    """``value`` with the positions of removed channels taken out: what the pruned model computes there.

    >>> import torch
    >>> lab = torch.arange(4).view(2, 2)         # block 0: channels 0, 1; block 1: channels 2, 3
    >>> select_kept(torch.tensor([[10., 11.], [12., 13.]]), lab, torch.tensor([False, True, True, False]))
    tensor([[11.],
            [12.]])
    """
    if label is None or label.dim() != value.dim():
        return value
    grid = _grid(label, keep) if len(varying(label)) > 1 else None
    if grid is None:
        for d in varying(label):
            value = value.index_select(d, torch.nonzero(kept_along(label, d, value.shape[d], keep)).flatten())
        return value
    d1, d2, kept = grid
    blocks = torch.nonzero(kept.any(1)).flatten()
    value = value.index_select(d1, blocks)  # blocks tied whole and removed
    kept = kept[blocks]
    count = int(kept[0].sum()) if blocks.numel() else 0
    idx = torch.nonzero(kept)[:, 1].view(kept.shape[0], count)  # each block's kept positions, in order
    shape = [1] * value.dim()
    shape[d1], shape[d2] = idx.shape
    size = list(value.shape)
    size[d2] = count
    return value.gather(d2, idx.reshape(shape).expand(size))
