"""Capture a model with ``torch.export`` (non-strict), for models ``symbolic_trace`` cannot trace.

:func:`export` runs ``torch.export.export(model, args, strict=False)`` in eval mode, takes
``ep.module()`` (a ``GraphModule`` of ATen ops whose parameters and buffers are ``get_attr``
nodes under the model's own dotted names, sharing its tensors), drops the nodes that only
check things at run time (the input guards, ``aten._assert_tensor_metadata``: they would
reject the pruned shapes), and annotates every node with shapes, values and FLOPs as
:func:`fxprune.capture.fx.trace` does. Its ops are spelled as ATen overloads
(``aten.conv2d.default``): analyse it with :data:`fxprune.ops.ATEN_RULES`.

Export runs the model's Python (control flow on shapes is fine: the example's shapes are
baked in, as literal sizes in ``view``/``reshape``, which the rewrite recomputes); it does not
capture code that branches on tensor *values*.

Example::

    >>> import torch
    >>> from fxprune.capture.export import export
    >>> class Odd(torch.nn.Module):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.conv = torch.nn.Conv2d(3, 4, 3)
    ...     def forward(self, x):
    ...         return self.conv(x) if x.shape[-1] % 2 else self.conv(x).relu()
    >>> gm = export(Odd(), (torch.randn(1, 3, 8, 8),))
    >>> [str(n.target) for n in gm.graph.nodes if n.op == "call_function"]
    ['aten.conv2d.default', 'aten.relu.default']
    >>> gm.conv.weight is not None, gm.meta["fxprune_training"]
    (True, False)
"""
from __future__ import annotations

import contextlib
import io
import logging
import operator
import re
import warnings

import torch
import torch.fx as fx
from torch.utils._pytree import tree_leaves

from ..errors import TraceError
from ..ops import ATEN_RULES, RuleTable
from ..utils import as_tuple, attributes_kept, eval_mode
from .values import annotate

# ops that check shapes, dtypes or symbolic ranges at run time and return nothing: the
# pruned model has other shapes, so they go
CHECKS = {torch.ops.aten._assert_tensor_metadata.default, torch.ops.aten._assert_scalar.default,
          torch.ops.aten.sym_constrain_range_for_size.default, torch.ops.aten.sym_constrain_range.default}


def export(model: torch.nn.Module, example_inputs: tuple, table: RuleTable = ATEN_RULES,
           attempts: int = 2) -> fx.GraphModule:
    """``model`` captured by ``torch.export`` (non-strict, eval mode) as an annotated ``GraphModule``.

    The batch dim is kept symbolic where the model allows it (exported at batch 2 with
    ``Dim.AUTO``, then checked to give the model's own outputs on the example): data-driven
    criteria run other batch sizes, and the ONNX file gets a dynamic batch. Otherwise the graph
    is exported at the example's shapes (``gm.meta["fxprune_batch"]`` says which).
    ``attempts``: a first export sometimes fails where a second succeeds (a warm-up effect,
    seen on YOLOv8), so the fixed-shape export is tried that many times. Raises
    :class:`~fxprune.errors.TraceError` with export's own first line when it cannot capture the model.
    """
    if not isinstance(model, torch.nn.Module):
        raise TraceError(f"expected a torch.nn.Module, got {type(model).__name__}")
    example_inputs = as_tuple(example_inputs)
    gm = _batch_generic(model, example_inputs)
    if gm is None:
        error = None
        for _ in range(max(1, attempts)):
            try:
                gm = _export(model, example_inputs)
                break
            except Exception as exc:  # export raises many kinds: UserError, GuardOnDataDependentSymNode, ...
                error = exc
        else:
            raise TraceError(f"torch.export could not capture the model: {_export_failure(error)}") from error
        gm.meta["fxprune_batch"] = "fixed"
    gm.meta["fxprune_training"] = False  # exported in eval mode: BN uses its running statistics, dropout is off
    with eval_mode(gm), torch.no_grad():
        try:
            annotate(gm, example_inputs, table)
        except Exception as exc:
            raise TraceError(f"the exported model failed on the example inputs: {type(exc).__name__}: "
                             f"{first_line(exc)}") from exc
    return gm


def _export_failure(error: Exception) -> str:
    """Why ``torch.export`` raised ``error``, and what to change."""
    unknown = re.search(r"Found <class '([\w.]+)'> in output, which is not a known type", str(error))
    if unknown:   # a Hugging Face causal LM returns its key/value cache (a DynamicCache) unless told not to
        return (f"the model returns a {unknown.group(1)}, which torch.export cannot flatten (no pytree "
                "registered for it). Fix: have the model return tensors only (a Hugging Face model: use_cache=False "
                "in its config or call), or register the type with torch.utils._pytree.register_pytree_node.")
    return (f"{type(error).__name__}: {first_line(error)}. Fix: make the shape-dependent Python in forward "
            "independent of tensor values, or prune the submodules that export separately.")


@contextlib.contextmanager
def _quiet():
    """Silence torch.export's own logging (a failed attempt logs its traceback; a fallback follows)."""
    loggers = [logging.getLogger(name) for name in QUIET]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.CRITICAL + 1)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


QUIET = ("torch._subclasses.fake_tensor", "torch._export", "torch.export", "torch.fx.experimental.symbolic_shapes",
         "torch._dynamo", "torch.utils._sympy")


def _export(model, inputs, dynamic_shapes=None) -> fx.GraphModule:
    with eval_mode(model), torch.no_grad(), warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), \
            _quiet(), attributes_kept(model):
        warnings.simplefilter("ignore")
        program = torch.export.export(model, inputs, dynamic_shapes=dynamic_shapes, strict=False)
    exported = program.module()
    _drop_checks(exported)
    _inline_wrappers(exported)
    _explicit_squeezes(exported)
    # a plain GraphModule (ep.module()'s class refuses eval() and train()) holding the same tensors
    return fx.GraphModule(exported, exported.graph, type(model).__name__)


def _batch_generic(model, example_inputs) -> fx.GraphModule | None:
    """The model exported with a symbolic batch dim, or None where it cannot be (inputs that are not
    batched tensors, code that fixes the batch) or the graph disagrees with the model on the example."""
    if not example_inputs or not all(isinstance(x, torch.Tensor) and x.dim() > 0 for x in example_inputs):
        return None
    # at batch 1 export would specialise the batch (0/1 specialisation): trace at batch 2
    wide = tuple(torch.cat([x, x]) if x.shape[0] == 1 else x for x in example_inputs)
    try:
        gm = _export(model, wide, tuple({0: torch.export.Dim.AUTO} for _ in wide))
        with eval_mode(model), eval_mode(gm), torch.no_grad():
            want, got = tree_leaves(model(*example_inputs)), tree_leaves(gm(*example_inputs))
    except Exception:
        return None
    if len(want) != len(got) or not all(_same(a, b) for a, b in zip(want, got)):
        return None
    gm.meta["fxprune_batch"] = "dynamic"
    return gm


def _same(a, b) -> bool:
    if not isinstance(a, torch.Tensor) or not isinstance(b, torch.Tensor):
        return type(a) is type(b)
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    if not a.is_floating_point():
        return bool(torch.equal(a, b))
    return bool(((a - b).abs().max() <= 1e-4 * a.abs().max() + 1e-5).item()) if a.numel() else True


def _drop_checks(gm: fx.GraphModule) -> None:
    graph = gm.graph
    for node in list(graph.nodes):
        if node.users:
            continue
        if node.op == "call_function" and node.target in CHECKS:
            graph.erase_node(node)
        elif node.op == "call_module" and node.target == "_guards_fn":
            graph.erase_node(node)
            delattr(gm, node.target)
        elif node.op == "get_attr":  # a buffer nothing reads (num_batches_tracked)
            graph.erase_node(node)
    graph.eliminate_dead_code()   # values nothing reads (Bart's inputs_embeds[:, :, -1], "needed for the shape only")
    gm.recompile()


def _explicit_squeezes(gm: fx.GraphModule) -> None:
    """``x.squeeze()`` becomes ``x.squeeze(dims)`` with the dims that were 1 on export. Export assumed a symbolic
    batch is not 1 (it would have specialised it), so at batch 1 a bare squeeze would also drop the batch dim
    that the graph goes on indexing (Bart's ``shift_tokens_right``: ONNX cannot convert that graph); and a
    channel dim pruned to one channel must not vanish either."""
    changed = False
    for node in gm.graph.nodes:
        if node.op != "call_function" or node.target is not torch.ops.aten.squeeze.default:
            continue
        shape = getattr(node.args[0].meta.get("val"), "shape", None)
        if shape is None:
            continue
        node.target = torch.ops.aten.squeeze.dims
        node.args = (node.args[0], [i for i, size in enumerate(shape) if isinstance(size, int) and size == 1])
        changed = True
    if changed:
        gm.recompile()


def _inline_wrappers(gm: fx.GraphModule) -> None:
    """Inline the sub-graphs that export wraps in a higher-order op for a region of ``autocast``
    (when disabled: timm's EfficientViT) or of grad mode, so that the rules see their ops."""
    wrappers = {getattr(torch.ops.higher_order, name, None): at for name, at in
                (("wrap_with_autocast", 4), ("wrap_with_set_grad_enabled", 1))}
    graph, changed = gm.graph, False
    for node in list(graph.nodes):
        at = wrappers.get(node.target) if node.op == "call_function" else None
        if at is None or (at == 4 and node.args[2]):  # autocast on: the region computes in another dtype
            continue
        holder, operands = node.args[at], node.args[at + 1:]
        sub = getattr(gm, holder.target, None) if isinstance(holder, fx.Node) and holder.op == "get_attr" else None
        if not isinstance(sub, fx.GraphModule) or any(n.op in ("get_attr", "call_module") for n in sub.graph.nodes) \
                or any(u.target is not operator.getitem for u in node.users):
            continue
        env = dict(zip([n for n in sub.graph.nodes if n.op == "placeholder"], operands))
        outputs = None
        with graph.inserting_before(node):
            for n in sub.graph.nodes:
                if n.op == "output":
                    outputs = fx.node.map_arg(n.args[0], env.__getitem__)
                elif n.op != "placeholder":
                    env[n] = graph.node_copy(n, env.__getitem__)
        outputs = outputs if isinstance(outputs, (tuple, list)) else (outputs,)
        for user in list(node.users):
            user.replace_all_uses_with(outputs[user.args[1]])
            graph.erase_node(user)
        graph.erase_node(node)
        if not holder.users:
            graph.erase_node(holder)
            delattr(gm, holder.target)
        changed = True
    if changed:
        gm.recompile()


def first_line(exc: BaseException) -> str:
    """The first non-empty line of an exception's message."""
    text = str(exc).strip()
    return text.splitlines()[0].strip() if text else type(exc).__name__
