"""Capture a model as a ``torch.fx.GraphModule`` with shapes and concrete values in ``node.meta``.

:func:`trace` runs ``torch.fx.symbolic_trace`` with the user's leaf modules and ``concrete_args``, then
propagates the example inputs with :class:`ValueProp`, a ``ShapeProp`` that also keeps
the concrete value of every non-tensor node (``x.size(1)``, ``c // 2``), which the
coupling analysis needs to evaluate reshapes.

Example::

    >>> import torch, torchvision
    >>> from fxprune.capture import trace
    >>> gm = trace(torchvision.models.resnet18(), (torch.randn(1, 3, 64, 64),))
    >>> [n.meta["tensor_meta"].shape for n in gm.graph.nodes if n.op == "output"]
    [torch.Size([1, 1000])]
"""
from __future__ import annotations

import collections
import os
import traceback
import types

import torch
import torch.fx as fx
from torch.nn.utils.parametrize import is_parametrized
from torch.fx._lazy_graph_module import _LazyGraphModule

from ..errors import TraceError
from ..ops import FX_RULES, RuleTable
from ..utils import as_tuple, attributes_kept, eval_mode
from .values import annotate


PARAMETRIZATION_MODULES = ("torch.nn.utils.parametrize", "torch.nn.utils.parametrizations")


class _Tracer(fx.Tracer):
    """A tracer that honours user leaf modules and remembers where it is, for errors."""

    def __init__(self, leaf_modules=()):
        super().__init__()
        self.leaf_types = tuple(m for m in leaf_modules if isinstance(m, type))
        self.leaf_names = {m for m in leaf_modules if isinstance(m, str)}
        self.stack: list[str] = []
        self.failed_in: str | None = None  # innermost module being traced when tracing failed
        self.ordered_dicts: list = []  # what fx recorded for OrderedDicts (it records every dict as a plain one)
        self.ordered_output = False  # the model returns an OrderedDict (torchvision's segmentation models)

    def is_leaf_module(self, m: torch.nn.Module, qualname: str) -> bool:
        if qualname in self.leaf_names or (self.leaf_types and isinstance(m, self.leaf_types)):
            return True
        if is_parametrized(m) or type(m).__module__ in PARAMETRIZATION_MODULES:
            return False   # a weight computed at every call (weight_norm): traced, so that the rules see how
        return super().is_leaf_module(m, qualname)

    def proxy(self, node: fx.Node) -> fx.Proxy:
        count = _piece_count(node)
        return _Pieces(node, self, count) if count is not None else _Proxy(node, self)

    def create_arg(self, a):
        out = super().create_arg(a)
        if isinstance(a, collections.OrderedDict):
            self.ordered_dicts.append(out)
        return out

    def create_node(self, kind, target, args, kwargs, name=None, type_expr=None):
        if kind == "output" and args and any(args[0] is d for d in self.ordered_dicts):
            self.ordered_output = True
        if kind == "call_function" and not args and "input" in kwargs and _plain_function(target):
            # F.conv2d(input=x, weight=w): the rules read a torch function's input at position 0, as it
            # is almost always given; the call is the same with it there
            kwargs = dict(kwargs)
            args = (kwargs.pop("input"),)
        return super().create_node(kind, target, args, kwargs, name, type_expr)

    def call_module(self, m, forward, args, kwargs):
        self.stack.append(self.path_of_module(m) or type(m).__name__)
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception:
            self.failed_in = self.failed_in or self.stack[-1]
            raise
        finally:
            self.stack.pop()


class _OrderedDictOutput(fx.graph.CodeGen):
    """A ``forward`` that returns an ``OrderedDict``, as the traced model's did (fx records every dict as a plain
    one), so that the pruned model gives back what the user's gave."""

    def generate_output(self, output_args, **kwargs):
        plain = super().generate_output(output_args, **kwargs)
        return f"return __import__('collections').OrderedDict({plain[len('return '):]})"


def _plain_function(fn) -> bool:
    """``torch.flatten``, ``F.relu``: a function of torch's namespace or ``torch.nn.functional``, not a
    ``torch.Tensor`` method (those trace as ``call_method``)."""
    if isinstance(fn, types.BuiltinFunctionType):
        plain = fn.__module__ == "torch"
    elif isinstance(fn, types.FunctionType):
        plain = fn.__module__ == "torch.nn.functional"
    else:
        return False
    return plain and getattr(torch.Tensor, fn.__name__, None) is not fn


class _Proxy(fx.Proxy):
    """``torch.fx.Proxy`` that records a plain torch function (:func:`_plain_function`) as ``call_function``
    without asking ``torch.overrides.is_tensor_method_or_property``, whose first call builds torch's table of
    every overridable function (a fifth of tracing a ResNet-50 in a fresh process); any other call as
    ``Proxy`` does."""

    @classmethod
    def __torch_function__(cls, orig_method, types, args=None, kwargs=None):
        if not _plain_function(orig_method):
            return super().__torch_function__(orig_method, types, args, kwargs)
        args, kwargs = args or (), kwargs or {}
        tracers = {}
        torch.fx.node.map_aggregate((args, kwargs), lambda a: tracers.setdefault(a.tracer) if isinstance(
            a, fx.Proxy) else None)
        if len(tracers) != 1:
            return super().__torch_function__(orig_method, types, args, kwargs)
        tracer = next(iter(tracers))
        return tracer.create_proxy("call_function", orig_method, args, kwargs,
                                   name=tracer.graph._target_to_str(orig_method.__name__))


class _Pieces(_Proxy):
    """The result of ``chunk``/``split``/``tensor_split`` with a literal count: it can be iterated
    (``list(x.chunk(2, 1))`` in YOLO's C2f), each piece a ``getitem`` node."""

    def __init__(self, node: fx.Node, tracer, count: int):
        super().__init__(node, tracer)
        self.count = count

    def __iter__(self):
        return iter([self[i] for i in range(self.count)])

    def __len__(self) -> int:
        return self.count


_SPLITTERS = {"chunk": ("chunks", "chunk"), "split": ("split_size_or_sections", "split_size"),
              "tensor_split": ("indices_or_sections", "sections")}


def _piece_count(node: fx.Node) -> int | None:
    """How many pieces a chunk/split node makes, when its arguments say so without the tensor's
    size: ``chunk(n)`` (torch returns fewer for a short dim: then the example run fails and the
    capture says so), ``split([sizes])``, ``tensor_split(n)``; else None."""
    if node.op == "call_method":
        name = node.target
    elif node.op == "call_function" and node.target in (torch.chunk, torch.split, torch.tensor_split):
        name = node.target.__name__
    else:
        return None
    if name not in _SPLITTERS:
        return None
    how = node.args[1] if len(node.args) > 1 else next((node.kwargs[k] for k in _SPLITTERS[name] if k in node.kwargs),
                                                       None)
    if name in ("chunk", "tensor_split") and isinstance(how, int) and not isinstance(how, bool):
        return how
    if name in ("split", "tensor_split") and isinstance(how, (list, tuple)) and all(isinstance(v, int) for v in how):
        return len(how) + (name == "tensor_split")
    return None


def trace(model: torch.nn.Module, example_inputs: tuple, leaf_modules=(), concrete_args=None,
          table: RuleTable = FX_RULES, stack_traces: bool = False) -> fx.GraphModule:
    """Trace ``model`` and annotate every node with shapes and values.

    The ``GraphModule`` shares ``model``'s submodules and parameters, as
    ``symbolic_trace``'s does: nothing in fxprune writes to them (shapes come from a
    run on the ``meta`` device, with the training flags restored afterwards), and the
    rewrite copies what it keeps, so the user's model stays as it was.

    ``leaf_modules`` lists module types or qualified names to keep as single nodes
    (what to do with code fx cannot trace); ``concrete_args`` is passed to
    ``symbolic_trace``; ``stack_traces`` records each node's Python line in ``node.stack_trace``
    and the module whose code it is in ``node.meta["fxprune_scope"]`` (slower; module output
    names the user's lines with them). Raises :class:`~fxprune.errors.TraceError` naming the module
    and the line that could not be traced.
    """
    if not isinstance(model, torch.nn.Module):
        raise TraceError(f"expected a torch.nn.Module, got {type(model).__name__}")
    example_inputs = as_tuple(example_inputs)
    tracer = _Tracer(leaf_modules)
    tracer.record_stack_traces = stack_traces
    with attributes_kept(model):  # the tracer also puts the tensor constants it meets on the model
        try:
            graph = tracer.trace(model, concrete_args=concrete_args)
        except Exception as exc:  # fx raises TraceError, TypeError, RuntimeError... on dynamic code
            raise TraceError(_explain(exc, tracer.failed_in)) from exc
        if tracer.ordered_output:
            graph.set_codegen(_OrderedDictOutput())
        if stack_traces:  # and the module whose code made each node (``self`` on that line)
            for node in graph.nodes:
                node.meta["fxprune_scope"] = tracer.node_name_to_scope.get(node.name, ("", None))[0]
        # lazy: its Python code is generated on first call; the analysis only reads the graph. It takes what
        # the graph reads from the model (those constants too) before the model's attributes are put back.
        gm = _LazyGraphModule(tracer.root, graph, type(model).__name__)
    gm.meta["fxprune_training"] = bool(model.training)  # the mode baked into the graph (docs/design.md)
    # shapes never come from a train-mode run: it would update BN statistics
    with eval_mode(gm), torch.no_grad():
        try:
            annotate(gm, example_inputs, table)  # on meta, else (no meta kernel, ...) with real tensors
        except Exception as exc:
            raise TraceError(f"the traced model failed on the example inputs: {type(exc).__name__}: {exc}. "
                             "Check that example_inputs match what model.forward expects.") from exc
    return gm


def _explain(exc: Exception, where: str | None) -> str:
    where = where or "<root>"
    frame = _user_frame(exc)
    line = f" at {frame.filename}:{frame.lineno} ({frame.line.strip() if frame.line else '?'})" if frame else ""
    return (f"could not trace module '{where}'{line}: {type(exc).__name__}: {exc}. "
            f"Fix: pass leaf_modules=['{where}'] (or its type) to keep it as one opaque node, "
            "or concrete_args={...} to fix the Python values that steer its control flow.")


def _user_frame(exc: Exception):
    torch_dir = os.path.dirname(torch.__file__)
    frames = [f for f in traceback.extract_tb(exc.__traceback__) if not f.filename.startswith(torch_dir)
              and os.sep + "fxprune" + os.sep not in f.filename]
    return frames[-1] if frames else None
