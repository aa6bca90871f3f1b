"""Partial capture: the pieces of a model whose root neither ``symbolic_trace`` nor ``torch.export`` can follow.

A detection model's ``forward`` takes a list of images of any size, keeps Python lists of
boxes and runs NMS: no single graph holds it. Its backbone, FPN and heads are plain tensor
code, though. This module finds them and gives each one a flat, tensor-only signature:

- :func:`record_calls` runs the model once on the example inputs with forward hooks on the
  modules asked about and keeps, for each, its first call (arguments and output, cloned) and
  how often it was called;
- :class:`FlatCall` wraps a module and one recorded call as ``forward(*tensors) -> tuple of
  tensors``: the call's lists, dicts and plain values (``None``, ints) are rebuilt around the
  tensors, so a head that loops over a list of feature maps traces as one graph, and the
  pipeline pins its inputs and outputs as for any model;
- :class:`PrunedPart` puts a pruned flat graph back in the model's place: it flattens the
  call, checks that its structure and plain values are the recorded ones, and rebuilds the
  output structure (a dict of feature maps, a pair of lists).

Which pieces to capture and how to prune them is :func:`fxprune.partial.compile_parts`.

Example::

    >>> import torch
    >>> from fxprune.capture.partial import FlatCall, PrunedPart, record_calls
    >>> class Head(torch.nn.Module):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.conv = torch.nn.Conv2d(4, 2, 1)
    ...     def forward(self, feats):
    ...         return {"out": [self.conv(f) for f in feats]}
    >>> head, feats = Head(), [torch.randn(1, 4, 8, 8), torch.randn(1, 4, 4, 4)]
    >>> call = record_calls(head, (feats,), {"": head})[""]
    >>> flat = FlatCall(head, call)
    >>> [tuple(t.shape) for t in flat(*flat.example_inputs)]
    [(1, 2, 8, 8), (1, 2, 4, 4)]
    >>> back = PrunedPart(flat, flat, "head")
    >>> torch.equal(back(feats)["out"][1], head(feats)["out"][1])
    True
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.utils._pytree import tree_flatten, tree_map, tree_unflatten

from ..errors import TraceError
from ..utils import eval_mode

PLAIN = (int, float, bool, str, type(None), torch.dtype, torch.device)


@dataclass
class Call:
    """A module's first call during one forward pass of the model: its inputs and output
    (tensors cloned and detached), and how many times it was called in that pass."""
    args: tuple
    kwargs: dict
    output: object
    count: int = 1


def _cloned(value):
    return tree_map(lambda v: v.detach().clone() if isinstance(v, torch.Tensor) else v, value)


def record_calls(model: torch.nn.Module, example_inputs: tuple, modules: dict) -> dict[str, Call]:
    """``{name: Call}`` for each of ``modules`` (``{name: module}``) that ran when ``model`` ran on
    ``example_inputs`` once (in eval mode, without gradients; training flags restored)."""
    calls: dict[str, Call] = {}
    handles = []

    def hook(name):
        def record(module, args, kwargs, output):
            if name in calls:
                calls[name].count += 1
            else:
                calls[name] = Call(_cloned(args), _cloned(kwargs), _cloned(output))
        return record

    try:
        for name, module in modules.items():
            handles.append(module.register_forward_hook(hook(name), with_kwargs=True))
        with eval_mode(model), torch.no_grad():
            model(*example_inputs)
    except Exception as exc:
        raise TraceError(f"the model failed on the example inputs: {type(exc).__name__}: {exc}. Check that "
                         "example_inputs match what model.forward expects.") from exc
    finally:
        for h in handles:
            h.remove()
    return calls


def unflattenable(value) -> str | None:
    """Why ``value`` (a call's inputs or output) cannot be split into tensors and plain values,
    or None: an object pytree does not open (torchvision's ``ImageList``), which could hide tensors."""
    leaves, _ = tree_flatten(value)
    for leaf in leaves:
        if not isinstance(leaf, (torch.Tensor,) + PLAIN):
            return f"it passes a {type(leaf).__name__}, which is neither a tensor nor a list, tuple or dict of them"
    return None


class FlatCall(torch.nn.Module):
    """``module`` called as in ``call``, with only its tensors as arguments and results.

    ``forward(x0, x1, ...)``, one argument per tensor, rebuilds the call's arguments (lists, dicts, plain values as
    recorded) around ``tensors``, calls ``module`` (the user's own, shared: nothing is copied)
    and returns the output's tensors as a flat tuple. ``example_inputs`` are the recorded
    tensors. Parameter names gain the prefix ``inner.``.
    """

    def __init__(self, module: torch.nn.Module, call: Call):
        super().__init__()
        self.inner = module
        leaves, self.in_spec = tree_flatten((call.args, call.kwargs))
        self.in_slots = [i for i, v in enumerate(leaves) if isinstance(v, torch.Tensor)]
        self.in_plain = [None if isinstance(v, torch.Tensor) else v for v in leaves]
        out, self.out_spec = tree_flatten(call.output)
        self.out_slots = [i for i, v in enumerate(out) if isinstance(v, torch.Tensor)]
        self.out_plain = [None if isinstance(v, torch.Tensor) else v for v in out]
        self.example_inputs = tuple(leaves[i] for i in self.in_slots)

    def __new__(cls, module=None, call=None):
        if cls is not FlatCall:  # a copy (copy.deepcopy, the rewrite) of one already made
            return torch.nn.Module.__new__(cls)
        # symbolic_trace reads the argument names from forward's code: a class per arity with
        # named arguments (``*tensors`` would be one placeholder, which no code can iterate)
        n = sum(isinstance(v, torch.Tensor) for v in tree_flatten((call.args, call.kwargs))[0])
        sub = _ARITY.get(n)
        if sub is None:
            names = ", ".join(f"x{i}" for i in range(n))
            scope: dict = {}
            exec(f"def forward(self, {names}):\n    return self.run({names}{',' if n == 1 else ''})\n", scope)
            sub = _ARITY[n] = type(f"FlatCall{n}", (cls,), {"forward": scope["forward"], "__module__": __name__})
        return torch.nn.Module.__new__(sub)

    def run(self, *tensors):
        leaves = list(self.in_plain)
        for i, t in zip(self.in_slots, tensors):
            leaves[i] = t
        args, kwargs = tree_unflatten(leaves, self.in_spec)
        out, _ = tree_flatten(self.inner(*args, **kwargs))
        if len(out) != len(self.out_plain):  # symbolic_trace sees a container as one value: let export try
            raise TraceError(f"the output has {len(out)} leaves while tracing, {len(self.out_plain)} when run")
        return tuple(out[i] for i in self.out_slots)


_ARITY: dict[int, type] = {}


def _plain(value) -> bool:
    return isinstance(value, PLAIN) or (isinstance(value, (tuple, list)) and all(isinstance(v, PLAIN) for v in value))


class PrunedPart(torch.nn.Module):
    """A pruned flat graph of ``flat`` (a :class:`FlatCall`) in the place of ``flat.inner``.

    Called as the original module was, it checks that the call has the recorded structure and
    plain values (a graph is only valid for the call it was captured on), runs ``graph`` on the
    call's tensors and returns the output in the original structure. ``name`` is the module's
    qualified name in the model, for errors.
    """

    def __init__(self, graph: torch.nn.Module, flat: FlatCall, name: str):
        super().__init__()
        # the module's plain attributes (a backbone's ``out_channels``), which a parent may read: its
        # inputs and outputs keep their channels, so these still describe them
        for key, value in vars(flat.inner).items():
            if not key.startswith("_") and key != "training" and _plain(value):
                setattr(self, key, value)
        self.graph = graph
        self.part_name = name
        self.training = flat.inner.training
        self.in_spec, self.in_slots, self.in_plain = flat.in_spec, flat.in_slots, flat.in_plain
        self.out_spec, self.out_slots, self.out_plain = flat.out_spec, flat.out_slots, flat.out_plain

    def forward(self, *args, **kwargs):
        leaves, spec = tree_flatten((args, kwargs))
        slots = set(self.in_slots)
        if spec != self.in_spec or any(
                (i in slots) != isinstance(v, torch.Tensor) or (i not in slots and v != self.in_plain[i])
                for i, v in enumerate(leaves)):
            raise TraceError(f"the pruned part '{self.part_name}' was captured for calls like the example's, with "
                             f"arguments {self.in_spec} and plain values {[v for v in self.in_plain if v is not None]};"
                             f" it was called with {spec}. Prune with example inputs that call it as at run time.")
        result = self.graph(*[leaves[i] for i in self.in_slots])
        out = list(self.out_plain)
        for i, t in zip(self.out_slots, result):
            out[i] = t
        return tree_unflatten(out, self.out_spec)
