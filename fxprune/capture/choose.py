"""One capture stage, several tracers: ``symbolic_trace`` first, ``torch.export`` when it fails.

:func:`capture_model` returns the annotated ``GraphModule``, the rule table of its dialect
(:data:`~fxprune.ops.FX_RULES` or :data:`~fxprune.ops.ATEN_RULES`) and what happened
(``{"tracer": "export", "why": "symbolic_trace failed: ...", "batch": "dynamic"}``; ``batch`` says
whether the exported graph takes any batch size or only the example's), which the report shows.

Example::

    >>> import torch
    >>> from fxprune.capture import capture_model
    >>> class Split(torch.nn.Module):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.conv = torch.nn.Conv2d(3, 8, 1)
    ...     def forward(self, x):
    ...         a, b = list(self.conv(x).chunk(2, 1))
    ...         return a * b
    >>> gm, table, info = capture_model(Split(), (torch.randn(1, 3, 4, 4),))
    >>> table.name, info["tracer"]
    ('fx', 'fx')
    >>> gm, table, info = capture_model(Split(), (torch.randn(1, 3, 4, 4),), how="export")
    >>> table.name, info["tracer"]
    ('aten', 'export')
"""
from __future__ import annotations

import contextlib
import copy

import torch

from ..errors import ConfigError, TraceError
from ..ops import ATEN_RULES, FX_RULES
from ..utils import attributes_kept
from .export import export, first_line
from .fx import trace

TRACERS = ("auto", "fx", "export")


def capture_model(model, example_inputs, how: str = "auto", *, leaf_modules=(), concrete_args=None,
                  stack_traces: bool = False):
    """``(gm, table, info)``: ``model`` captured by ``how``, one of :data:`TRACERS`.

    ``"fx"`` is ``symbolic_trace`` (with ``leaf_modules``, ``concrete_args`` and ``stack_traces``), ``"export"`` is
    ``torch.export`` (non-strict), ``"auto"`` the first and, when it raises
    :class:`~fxprune.errors.TraceError`, the second. When both fail, the TraceError names both.
    """
    if how not in TRACERS:
        raise ConfigError(f"capture must be one of {', '.join(map(repr, TRACERS))}, not {how!r}")
    # capture runs the model (and checks the graph against an eager run): its max_norm tables would be
    # renormalised in place, and what it caches in plain attributes and dicts kept
    with tables_kept(model), attributes_kept(model):
        return _capture(model, example_inputs, how, leaf_modules=leaf_modules, concrete_args=concrete_args,
                        stack_traces=stack_traces)


def _capture(model, example_inputs, how, *, leaf_modules, concrete_args, stack_traces):
    if how == "export":
        gm = own_written_tables(export(model, example_inputs, ATEN_RULES))
        return gm, ATEN_RULES, {"tracer": "export", "why": "capture='export'", "batch": gm.meta["fxprune_batch"]}
    try:
        gm = trace(model, example_inputs, leaf_modules=leaf_modules, concrete_args=concrete_args, table=FX_RULES,
                   stack_traces=stack_traces)
        return own_written_tables(gm), FX_RULES, {"tracer": "fx"}
    except TraceError as exc:
        if how == "fx":
            raise
        first = exc
    why = f"symbolic_trace failed: {_short(first_line(first))}"
    try:
        gm = own_written_tables(export(model, example_inputs, ATEN_RULES))
    except TraceError as exc:
        raise TraceError(f"{why}\nand then {exc}") from exc
    return gm, ATEN_RULES, {"tracer": "export", "why": why, "batch": gm.meta["fxprune_batch"]}


@contextlib.contextmanager
def tables_kept(model):
    """The model's embedding tables that its own ``forward`` renormalises in place (``max_norm``) are put back
    afterwards: capture runs ``forward`` (``torch.export`` and its batch check), and fxprune never changes the
    user's model."""
    modules = model.modules() if isinstance(model, torch.nn.Module) else ()
    saved = [(m.weight, m.weight.detach().clone()) for m in modules
             if isinstance(m, (torch.nn.Embedding, torch.nn.EmbeddingBag)) and m.max_norm is not None]
    try:
        yield model
    finally:
        with torch.no_grad():
            for weight, copy in saved:
                weight.copy_(copy)


def own_written_tables(gm):
    """``gm`` with its own copy of every embedding table that running it rewrites in place (``max_norm``:
    ``nn.Embedding`` renormalises the rows it looks up; ``torch.export`` spells it ``aten.embedding_renorm_``).
    A captured graph shares the model's parameters, and fxprune runs it to check and score: the user's
    table must not change. (A captured graph's containers of submodules are its own; only leaves are shared.)"""
    def written_table(node):   # the node holding the table ``node`` renormalises in place, or None
        if node.op != "call_function":
            return None
        if node.target is torch.ops.aten.embedding_renorm_.default:
            return node.args[0]
        if node.target is torch.nn.functional.embedding:
            max_norm = node.kwargs.get("max_norm", node.args[3] if len(node.args) > 3 else None)
            return node.kwargs.get("weight", node.args[1] if len(node.args) > 1 else None) if max_norm else None
        return None

    for node in gm.graph.nodes:
        if node.op == "call_module":
            mod = gm.get_submodule(node.target)
            if isinstance(mod, (torch.nn.Embedding, torch.nn.EmbeddingBag)) and mod.max_norm is not None:
                parent, _, attr = node.target.rpartition(".")
                setattr(gm.get_submodule(parent), attr, copy.deepcopy(mod))
            continue
        table = written_table(node)
        while isinstance(table, torch.fx.Node) and table.target in (torch.ops.aten.detach.default,
                                                                    torch.ops.aten.alias.default):
            table = table.args[0]
        if isinstance(table, torch.fx.Node) and table.op == "get_attr":
            parent, _, attr = table.target.rpartition(".")
            p = gm.get_parameter(table.target)
            setattr(gm.get_submodule(parent), attr, torch.nn.Parameter(p.detach().clone(), p.requires_grad))
    return gm


def _short(message: str, limit: int = 240) -> str:
    """fx's explanation without its advice (which does not apply once export captured the model)."""
    message = message.split(" Fix: ")[0]
    return message if len(message) <= limit else message[:limit - 3] + "..."
