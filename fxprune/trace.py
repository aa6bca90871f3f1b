"""Capture a model as a ``torch.fx.GraphModule`` with shapes and concrete values in ``node.meta``.

:func:`trace` runs ``torch.fx.symbolic_trace`` with the user's leaf modules and ``concrete_args``, then
propagates the example inputs with :class:`ValueProp`, a ``ShapeProp`` that also keeps
the concrete value of every non-tensor node (``x.size(1)``, ``c // 2``), which the
coupling analysis needs to evaluate reshapes.

Example::

    >>> import torch, torchvision
    >>> from fxprune.trace import trace
    >>> gm = trace(torchvision.models.resnet18(), (torch.randn(1, 3, 64, 64),))
    >>> [n.meta["tensor_meta"].shape for n in gm.graph.nodes if n.op == "output"]
    [torch.Size([1, 1000])]
"""
from __future__ import annotations

import os
import traceback

import torch
import torch.fx as fx
from torch.fx._lazy_graph_module import _LazyGraphModule
from torch.fx.passes.shape_prop import TensorMetadata, _extract_tensor_metadata
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import flop_registry

from .cost import eval_mode
from .errors import TraceError


class ValueProp:
    """Shapes, non-tensor values and FLOPs of every node, from one pass over the graph:
    ``ShapeProp``'s ``node.meta["tensor_meta"]`` (a :class:`TensorMetadata`; its
    ``memory_format`` is left None), the concrete value of every plain non-tensor result
    (``x.size(1)``, ``c // 2``) in ``node.meta["value"]``, and the FLOPs of each op by
    ``torch.utils.flop_counter``'s formulas in ``node.meta["flops"]``.

    With ``on_meta=True`` every tensor lives on the ``meta`` device and nothing is
    computed; a module whose rule has an ``on_meta`` formula
    (:attr:`fxprune.rules.Rule.on_meta`: convolutions, linears, norms, activations) is
    not run at all: the formula gives its output and FLOPs. Other modules run with
    their parameters swapped for meta copies (``torch.func.functional_call``).

    It is ``ShapeProp``'s job done with less per-node work (no ``Interpreter``
    dispatch, no memory-format checks): shape propagation is a third of the analysis.

    Example::

        >>> import torch, torchvision
        >>> gm = torch.fx.symbolic_trace(torchvision.models.resnet18())
        >>> ValueProp(gm, on_meta=True).propagate(torch.randn(1, 3, 64, 64)).shape
        torch.Size([1, 1000])
        >>> conv1 = next(n for n in gm.graph.nodes if n.target == "conv1")
        >>> tuple(conv1.meta["tensor_meta"].shape), conv1.meta["flops"]
        ((1, 64, 32, 32), 19267584)
    """

    def __init__(self, gm: fx.GraphModule, on_meta: bool = False):
        self.gm = gm
        self.on_meta = on_meta
        self.flops = _FlopsByNode()
        self.modules = dict(gm.named_modules())
        self._meta_of: dict[int, torch.Tensor] = {}  # id(real tensor) -> its meta copy

    def propagate(self, *args):
        env: dict[fx.Node, object] = {}
        inputs = iter(self._meta(a) for a in args)
        with self.flops:
            for node in self.gm.graph.nodes:
                if node.op == "placeholder":
                    value = _placeholder(node, inputs)
                elif node.op == "get_attr":
                    value = self._meta(_fetch(self.gm, node.target))
                else:
                    a = fx.node.map_arg(node.args, env.__getitem__)
                    k = fx.node.map_arg(node.kwargs, env.__getitem__)
                    if node.op == "output":
                        value = a[0]
                    else:
                        self.flops.count = 0
                        value = self._call(node, a, k)
                        node.meta["flops"] = self.flops.count
                _record(node, value)
                env[node] = value
                if node.op == "output":
                    return value

    def _call(self, node, args, kwargs):
        if node.op == "call_function":
            return node.target(*args, **kwargs)
        if node.op == "call_method":
            return getattr(args[0], node.target)(*args[1:], **kwargs)
        module = self.modules[node.target]
        if not self.on_meta:
            return module(*args, **kwargs)
        from .rules import meta_formula

        formula = meta_formula(module)
        if formula is not None and len(args) == 1 and not kwargs and isinstance(args[0], torch.Tensor):
            result = formula(module, args[0])
            if result is not None:
                self.flops.count += int(result[1])
                return result[0]
        state = {k: self._meta(v) for k, v in _state(module)}
        if not state:
            return module(*args, **kwargs)
        return torch.func.functional_call(module, state, args, kwargs, strict=False)

    def _meta(self, value):
        if not self.on_meta or not isinstance(value, torch.Tensor):
            return value
        meta = self._meta_of.get(id(value))
        if meta is None:
            meta = self._meta_of[id(value)] = torch.empty_like(value, device="meta")
        return meta


def _placeholder(node: fx.Node, inputs):
    if node.target.startswith("*"):
        return tuple(inputs)
    try:
        return next(inputs)
    except StopIteration:
        if node.args:  # a default value (concrete_args)
            return node.args[0]
        raise TypeError(f"no example input for the model's argument '{node.target}'") from None


def _fetch(gm: fx.GraphModule, target: str):
    value = gm
    for part in target.split("."):
        value = getattr(value, part)
    return value


def _state(module: torch.nn.Module):
    yield from module.named_parameters()
    yield from module.named_buffers()


def _record(node: fx.Node, value) -> None:
    """``ShapeProp``'s ``tensor_meta`` for ``value`` (nested containers included), and the
    value itself when it is a plain Python value."""
    if isinstance(value, torch.Tensor):
        node.meta["tensor_meta"] = _tensor_meta(value)
    elif isinstance(value, (tuple, list, dict)):
        found = False

        def one(v):
            nonlocal found
            if isinstance(v, torch.Tensor):
                found = True
                return _tensor_meta(v)
            return v

        meta = fx.node.map_aggregate(value, one)
        if found:
            node.meta["tensor_meta"] = meta
    node.meta["type"] = type(value)
    if not isinstance(value, torch.Tensor) and _is_plain(value):
        node.meta["value"] = value


def _tensor_meta(t: torch.Tensor) -> TensorMetadata:
    if t.is_quantized:
        return _extract_tensor_metadata(t)
    return TensorMetadata(t.shape, t.dtype, t.requires_grad, t.stride(), None, False, {})


class _FlopsByNode(TorchDispatchMode):
    """Counts FLOPs with ``torch.utils.flop_counter.flop_registry`` into ``self.count``.

    ``FlopCounterMode`` does the same per module; entering it once per node costs more
    than the whole meta-device forward pass.
    """

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        formula = flop_registry.get(func._overloadpacket)
        if formula is not None:
            self.count += int(formula(*args, **kwargs, out_val=out))
        return out


def _is_plain(value) -> bool:
    if isinstance(value, (int, float, bool, str, type(None), torch.Size, torch.dtype, torch.device, slice)):
        return True
    if isinstance(value, (tuple, list)):
        return all(_is_plain(v) for v in value)
    return False


class _Tracer(fx.Tracer):
    """A tracer that honours user leaf modules and remembers where it is, for errors."""

    def __init__(self, leaf_modules=()):
        super().__init__()
        self.leaf_types = tuple(m for m in leaf_modules if isinstance(m, type))
        self.leaf_names = {m for m in leaf_modules if isinstance(m, str)}
        self.stack: list[str] = []
        self.failed_in: str | None = None  # innermost module being traced when tracing failed

    def is_leaf_module(self, m: torch.nn.Module, qualname: str) -> bool:
        if qualname in self.leaf_names or (self.leaf_types and isinstance(m, self.leaf_types)):
            return True
        return super().is_leaf_module(m, qualname)

    def call_module(self, m, forward, args, kwargs):
        self.stack.append(self.path_of_module(m) or type(m).__name__)
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception:
            self.failed_in = self.failed_in or self.stack[-1]
            raise
        finally:
            self.stack.pop()


def trace(model: torch.nn.Module, example_inputs: tuple, leaf_modules=(), concrete_args=None) -> fx.GraphModule:
    """Trace ``model`` and annotate every node with shapes and values.

    The ``GraphModule`` shares ``model``'s submodules and parameters, as
    ``symbolic_trace``'s does: nothing in fxprune writes to them (shapes come from a
    run on the ``meta`` device, with the training flags restored afterwards), and the
    rewrite copies what it keeps, so the user's model stays as it was.

    ``leaf_modules`` lists module types or qualified names to keep as single nodes
    (what to do with code fx cannot trace); ``concrete_args`` is passed to
    ``symbolic_trace``. Raises :class:`~fxprune.errors.TraceError` naming the module
    and the line that could not be traced.
    """
    if not isinstance(model, torch.nn.Module):
        raise TraceError(f"expected a torch.nn.Module, got {type(model).__name__}")
    example_inputs = _as_tuple(example_inputs)
    tracer = _Tracer(leaf_modules)
    try:
        graph = tracer.trace(model, concrete_args=concrete_args)
    except Exception as exc:  # fx raises TraceError, TypeError, RuntimeError... on dynamic code
        raise TraceError(_explain(exc, tracer.failed_in)) from exc
    # lazy: its Python code is generated on first call; the analysis only reads the graph
    gm = _LazyGraphModule(tracer.root, graph, type(model).__name__)
    gm.meta["fxprune_training"] = bool(model.training)  # the mode baked into the graph (FX_NOTES.md)
    # shapes never come from a train-mode run: it would update BN statistics
    with eval_mode(gm), torch.no_grad():
        try:
            propagate_on_meta(gm, example_inputs)
        except Exception:  # an op without a meta kernel, a tensor made on the CPU in forward, ...
            try:
                ValueProp(gm).propagate(*example_inputs)  # real tensors: every op runs
            except Exception as exc:
                raise TraceError(f"the traced model failed on the example inputs: {type(exc).__name__}: {exc}. "
                                 "Check that example_inputs match what model.forward expects.") from exc
    return gm


def propagate_on_meta(gm: fx.GraphModule, example_inputs: tuple) -> None:
    """Run :class:`ValueProp` with every parameter, buffer and input on the ``meta`` device.

    Shapes, sizes and FLOPs come out the same as with real tensors, without computing
    anything: about 10x faster than a real forward pass on a 224x224 ResNet-50.
    """
    ValueProp(gm, on_meta=True).propagate(*example_inputs)


def meta_shapes(node: fx.Node):
    """The output shape of ``node`` as a tuple, or a list of shapes (None for non-tensors)
    when it returns several values; None when it returns no tensor."""
    meta = node.meta.get("tensor_meta")
    if isinstance(meta, TensorMetadata):
        return tuple(meta.shape)
    if isinstance(meta, (tuple, list)):
        return [tuple(m.shape) if isinstance(m, TensorMetadata) else None for m in meta]
    return None


def _as_tuple(example_inputs) -> tuple:
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,)
    return tuple(example_inputs)


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
