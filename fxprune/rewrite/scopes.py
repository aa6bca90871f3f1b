"""Which module of the user's model each node of a captured graph comes from, in either dialect.

A ``symbolic_trace`` graph calls a leaf module as one ``call_module`` node (and, captured with
stack traces, records the module whose code made every other node in ``meta["fxprune_scope"]``).
A ``torch.export`` graph has no ``call_module`` nodes: every ATen node carries
``meta["nn_module_stack"]``, the modules (outermost first) whose ``forward`` was running when it
was made. :func:`module_calls` turns either into the calls of each module: the nodes of one call
and the nodes whose values leave it (its outputs), which is what the module copy's rewrite
(a node to hand each module's ``resize`` rule) and its verification (module boundaries) need.

Example::

    >>> import torch
    >>> from fxprune.capture.export import export
    >>> net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 1), torch.nn.ReLU(), torch.nn.Conv2d(4, 2, 1))
    >>> gm = export(net, (torch.randn(1, 3, 4, 4),))
    >>> {path: [[n.name for n in c.outputs] for c in calls] for path, calls in module_calls(gm).items()}
    {'0': [['conv2d']], '1': [['relu']], '2': [['conv2d_1']]}
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch.fx as fx

# torch.export names a module reached through a sliced ModuleList (``self.layers[:n]``, Hugging Face
# decoders) ``layers.slice(None, 2, None).0``; a slice from the start keeps the indices
_SLICE = re.compile(r"\.slice\(None, (?:None|-?\d+), None\)")


def module_path(path: str) -> str:
    """``path`` of an ``nn_module_stack`` entry as the model's ``get_submodule`` spells it."""
    return _SLICE.sub("", path)


def stack_of(node: fx.Node) -> list[tuple[str, str]]:
    """``[(call key, module path)]`` of the modules running when ``node`` was made, outermost first
    (the root, path ``''``, left out); empty where the capture recorded none."""
    stack = node.meta.get("nn_module_stack") or {}
    return [(key, module_path(value[0])) for key, value in stack.items() if module_path(value[0])]


def scope_of(node: fx.Node) -> str | None:
    """The path of the module whose code made ``node`` (``''`` for the root), or None if unknown."""
    scope = node.meta.get("fxprune_scope")
    if scope is not None:
        return scope
    if node.meta.get("nn_module_stack") is None:
        return None
    stack = stack_of(node)
    return stack[-1][1] if stack else ""


@dataclass
class ModuleCall:
    """One call of a module in a graph: its nodes (in order) and those whose values leave it."""

    nodes: list = field(default_factory=list)
    outputs: list = field(default_factory=list)


def module_calls(gm: fx.GraphModule) -> dict[str, list[ModuleCall]]:
    """``{module path: [ModuleCall, ...]}`` in call order, for a graph of either dialect.

    A call is the run of consecutive nodes that share one ``nn_module_stack`` entry (both
    tracers key a module's second call ``path@1``); its outputs are the run's nodes used after
    it. A ``call_module`` node the capture recorded no stack for is a call of its own.
    """
    calls: dict[str, list[ModuleCall]] = {}
    open_runs: dict[tuple, ModuleCall] = {}
    for node in gm.graph.nodes:
        if node.op not in ("call_module", "call_function", "call_method"):
            continue
        if node.meta.get("nn_module_stack") is None:
            if node.op == "call_module":
                calls.setdefault(node.target, []).append(ModuleCall([node]))
            continue
        here = stack_of(node)
        for entry in [e for e in open_runs if e not in here]:
            del open_runs[entry]
        for entry in here:
            run = open_runs.get(entry)
            if run is None:
                run = open_runs[entry] = ModuleCall()
                calls.setdefault(entry[1], []).append(run)
            run.nodes.append(node)
    for runs in calls.values():
        for run in runs:
            inside = set(run.nodes)
            run.outputs = [n for n in run.nodes if any(u not in inside for u in n.users)]
    return calls
