"""CATRO's labelled sample set: class-balanced, a few samples per class.

Part of :mod:`fxprune.passes.catro`.
"""
from __future__ import annotations

import torch

from fxprune.errors import ConfigError, DataError
from fxprune.io.data import batches

def collect(data, samples_per_class: int = 16, classes=None):
    """A class-balanced labelled set ``(inputs_tuple, labels)``: at most ``samples_per_class`` per class.

    ``classes`` restricts it to those labels (sub-task mode). Raises :class:`DataError`
    without labels, when a class has fewer than two samples, or on inconsistent shapes.
    """
    if not isinstance(samples_per_class, int) or samples_per_class < 2:
        raise ConfigError(f"samples_per_class={samples_per_class} must be an integer >= 2 "
                          "(the within-class scatter needs two samples of each class)")
    wanted = None if classes is None else {int(c) for c in classes}
    counts: dict[int, int] = {}
    xs, ys = [], []
    for inputs, labels in batches(data, need_labels=True):
        if labels.dim() != 1:
            raise DataError(f"CATRO needs one class index per sample, got labels of shape {tuple(labels.shape)}")
        take = []
        for i, c in enumerate(labels.tolist()):
            if (wanted is None or c in wanted) and counts.get(c, 0) < samples_per_class:
                counts[c] = counts.get(c, 0) + 1
                take.append(i)
        if take:
            idx = torch.tensor(take)
            xs.append(tuple(x[idx] for x in inputs))
            ys.append(labels[idx])
        if wanted is not None and len(counts) == len(wanted) and min(counts.values()) >= samples_per_class:
            break
    if wanted is not None:
        missing = sorted(wanted - set(counts))
        if missing:
            raise DataError(f"the data holds no sample of class(es) {missing}; give samples of every sub-task class")
    few = sorted(c for c, n in counts.items() if n < 2)
    if few:
        raise DataError(f"class(es) {few} have fewer than two samples: the within-class scatter needs at least "
                        "two per class. Give more data or leave those classes out with classes=[...]")
    if len(counts) < 2:
        raise DataError("CATRO needs samples of at least two classes to measure class separation")
    try:
        inputs = tuple(torch.cat([x[i] for x in xs]) for i in range(len(xs[0])))
    except (RuntimeError, IndexError) as exc:
        raise DataError(f"batches of data= have inconsistent input shapes ({exc})") from exc
    return inputs, torch.cat(ys)


# --- scatter ------------------------------------------------------------------------------------
