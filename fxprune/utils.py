"""Small helpers every stage uses: :func:`paused_gc`, :func:`eval_mode`, :func:`attributes_kept`, :func:`as_tuple`,
:func:`primary_output`.

:func:`paused_gc` pauses Python's cyclic garbage collector while fxprune works. The analysis makes many short-lived Python objects (graph nodes, small label
arrays); reference counting frees them. In a process that holds a large model,
each full collection the allocations trigger walks every object of the process: on
a ResNet-50 one such pass costs 0.2 s, as much as the whole analysis. Collection is
re-enabled afterwards, so cycles left behind are still collected later.

Example::

    >>> import gc
    >>> from fxprune.utils import paused_gc
    >>> @paused_gc
    ... def work():
    ...     return gc.isenabled()
    >>> work(), gc.isenabled()
    (False, True)
"""
from __future__ import annotations

import functools
import gc
from contextlib import contextmanager

import torch
from torch.utils._pytree import tree_flatten

from .errors import DataError


def paused_gc(fn):
    """Decorate ``fn`` to run with the cyclic collector off (nested calls are fine)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        was_enabled = gc.isenabled()
        gc.disable()
        try:
            return fn(*args, **kwargs)
        finally:
            if was_enabled:
                gc.enable()

    return wrapper


@contextmanager
def eval_mode(module: torch.nn.Module):
    """Run ``module`` in eval mode, then restore every submodule's ``training`` flag."""
    training = [m for m in module.modules() if m.training]  # usually none: the model came in eval mode
    if training:
        module.eval()
    try:
        yield module
    finally:
        for m in training:
            m.training = True


@contextmanager
def attributes_kept(model: torch.nn.Module):
    """Capture runs ``forward`` on proxies (``symbolic_trace``) or fake tensors (``torch.export``): a module that
    caches a value in a plain attribute (ultralytics' RT-DETR decoder keeps its anchors and their shapes) would keep
    a proxy or a fake tensor, and the user's model would fail on its next call. Afterwards every module's
    attributes are as they were, and so are the contents of its plain dicts, lists and sets (timm's LeViT
    caches its attention biases in a dict keyed by device: the key became a proxy, the value a fake tensor).

        >>> class Cached(torch.nn.Module):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.cache = {}
        ...     def forward(self, x):
        ...         self.cache[str(x.device)] = x
        ...         return x
        >>> m = Cached()
        >>> with attributes_kept(m):
        ...     _ = m(torch.ones(1))
        >>> m.cache
        {}
    """
    saved = [(m, dict(vars(m))) for m in model.modules()] if isinstance(model, torch.nn.Module) else []
    contents = [(v, _contents(v)) for _, attrs in saved for v in attrs.values() if type(v) in (dict, list, set)]
    try:
        yield model
    finally:
        for m, attrs in saved:
            for key in [k for k in vars(m) if k not in attrs]:
                delattr(m, key)
            vars(m).update(attrs)
        for container, items in contents:
            if isinstance(container, list):
                container[:] = items
            else:
                container.clear()
                container.update(items)


def _contents(container):
    return dict(container) if isinstance(container, dict) else list(container) if isinstance(container, list) \
        else set(container)


def as_tuple(example_inputs) -> tuple:
    """``example_inputs`` as a tuple: a lone tensor becomes a 1-tuple."""
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,)
    return tuple(example_inputs)


def primary_output(out) -> torch.Tensor:
    """The output a data-driven criterion reads: the first floating-point tensor of a model's output, be it a
    tensor, a tuple or list (a detector's), a dict or a Hugging Face ``ModelOutput`` (its ``logits``).

    >>> primary_output({"ids": torch.zeros(2, dtype=torch.long), "logits": torch.ones(2, 3)}).shape
    torch.Size([2, 3])
    """
    leaves = [t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)]
    found = next((t for t in leaves if t.is_floating_point()), None)
    if found is None:
        raise DataError(f"the model's output holds no floating-point tensor (got {type(out).__name__}): a "
                        "data-driven criterion reads the first one")
    return found
