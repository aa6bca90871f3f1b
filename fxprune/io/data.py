"""Data for data-driven criteria: any iterable of ``(inputs, labels)`` batches.

:func:`batches` accepts a ``DataLoader`` (or any iterable) of ``(inputs, labels)``
pairs or of bare inputs (a tensor, or a tuple of the model's input tensors; ``(inputs, None)``
too), a single ``(inputs, labels)`` pair, or a single input tensor, and yields
``(inputs_tuple, labels_or_None)``. Labels are a 1-d integer tensor (one class per sample).

Example::

    >>> import torch
    >>> from fxprune.io.data import batches
    >>> [(x[0].shape, y.shape) for x, y in batches((torch.randn(4, 3), torch.arange(4)))]
    [(torch.Size([4, 3]), torch.Size([4]))]
    >>> ids, mask = torch.zeros(4, 16, dtype=torch.long), torch.ones(4, 16, dtype=torch.long)
    >>> [(len(x), y) for x, y in batches([(ids, mask)])]     # a batch of a two-input model, unlabelled
    [(2, None)]
"""
from __future__ import annotations

import itertools

import torch

from ..errors import DataError


def batches(data, limit: int | None = None, need_labels: bool = False):
    """Yield ``(inputs_tuple, labels)`` from ``data``; at most ``limit`` batches."""
    if data is None:
        raise DataError("this criterion needs data: pass data= an iterable of (inputs, labels) batches, "
                        "such as a torch.utils.data.DataLoader")
    if isinstance(data, torch.Tensor) or _is_pair(data):
        data = [data]
    count = 0
    for item in itertools.islice(data, limit):
        if isinstance(item, torch.Tensor):
            inputs, labels = (item,), None
        elif _is_pair(item):
            inputs, labels = item
            inputs = (inputs,) if isinstance(inputs, torch.Tensor) else tuple(inputs)
        elif isinstance(item, (tuple, list)) and item and all(isinstance(x, torch.Tensor) for x in item):
            inputs, labels = tuple(item), None
        else:
            raise DataError(f"a batch must be a tensor, a tuple of input tensors or an (inputs, labels) pair, "
                            f"got {type(item).__name__}")
        if need_labels and labels is None:
            raise DataError("this criterion needs labels: give batches as (inputs, labels) pairs")
        if labels is not None and labels.shape[0] != inputs[0].shape[0]:
            raise DataError(f"a batch has {inputs[0].shape[0]} inputs but {labels.shape[0]} labels")
        count += 1
        yield inputs, labels
    if count == 0:
        raise DataError("data= yielded no batches")


def _is_pair(item) -> bool:
    """``(inputs, labels)``: labels a 1-d integer tensor (or None), inputs a tensor or a tuple of them."""
    if not (isinstance(item, (tuple, list)) and len(item) == 2
            and (isinstance(item[0], torch.Tensor) or isinstance(item[0], (tuple, list)))):
        return False
    labels = item[1]
    if labels is None:
        return True
    return isinstance(labels, torch.Tensor) and labels.dim() <= 1 and not labels.is_floating_point()
