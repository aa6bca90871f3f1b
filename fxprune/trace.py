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
from torch.fx.passes.shape_prop import ShapeProp, TensorMetadata
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import flop_registry

from .cost import eval_mode
from .errors import TraceError


class ValueProp(ShapeProp):
    """``ShapeProp`` that also records non-tensor results in ``node.meta["value"]`` and the
    FLOPs of each op, by ``torch.utils.flop_counter``'s formulas, in ``node.meta["flops"]``:
    one forward pass gives shapes, values and costs.

    With ``on_meta=True`` (every tensor on the ``meta`` device), a module whose rule
    says it keeps its input's shape (:attr:`fxprune.rules.Rule.same_shape`: norms,
    activations, dropout) is not run: its output is ``empty_like`` its input. Those ops
    count no FLOPs, and on ``meta`` some of them (batch norm) run slow Python
    decompositions.
    """

    def __init__(self, gm: fx.GraphModule, on_meta: bool = False):
        super().__init__(gm)
        self.on_meta = on_meta
        self.flops = _FlopsByNode()

    def propagate(self, *args):
        with self.flops:
            return super().propagate(*args)

    def run_node(self, n: fx.Node):
        self.flops.count = 0
        result = super().run_node(n)
        if n.op in ("call_module", "call_function", "call_method"):
            n.meta["flops"] = self.flops.count
        if not isinstance(result, torch.Tensor) and _is_plain(result):
            n.meta["value"] = result
        return result

    def call_module(self, target, args, kwargs):
        if self.on_meta and args and isinstance(args[0], torch.Tensor):
            from .rules import keeps_shape

            module = self.fetch_attr(target)
            if keeps_shape(module):
                return torch.empty_like(args[0])
        return super().call_module(target, args, kwargs)


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
    gm = fx.GraphModule(tracer.root, graph, type(model).__name__)
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


class _Propagator(torch.nn.Module):
    def __init__(self, gm):
        super().__init__()
        self.gm = gm

    def forward(self, *inputs):
        return ValueProp(self.gm, on_meta=True).propagate(*inputs)


def propagate_on_meta(gm: fx.GraphModule, example_inputs: tuple) -> None:
    """Run :class:`ValueProp` with every parameter, buffer and input on the ``meta`` device.

    Shapes, sizes and FLOPs come out the same as with real tensors, without computing
    anything: about 10x faster than a real forward pass on a 224x224 ResNet-50. The
    module's own tensors are swapped only for the call (``torch.func.functional_call``).
    """
    state = dict(gm.named_parameters())
    state.update(gm.named_buffers())
    meta = {f"gm.{k}": torch.empty_like(v, device="meta") for k, v in state.items()}
    inputs = tuple(x.to("meta") if isinstance(x, torch.Tensor) else x for x in example_inputs)
    torch.func.functional_call(_Propagator(gm), meta, inputs, strict=False)


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
