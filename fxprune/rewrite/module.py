"""Module output: the user's own model back, pruned — a deep copy of the same class.

:func:`rewrite_module` copies the user's model with every parameter and buffer sliced by
the plan (the same kept positions and the same gather as the ``GraphModule`` rewrite:
:func:`fxprune.rewrite.graph.sliced_memo`), then hands each module of the copy that the graph
calls to its rule's ``resize`` (``in_channels``, ``num_features``, ``embed_dim`` with the
query-scale fold, ...). The copy runs the user's own ``forward``. Both captures work: a
``symbolic_trace`` graph names modules in ``call_module`` nodes; a ``torch.export`` graph
(ATen ops, the model's own parameter names) is read through its nodes' ``nn_module_stack``
(:mod:`fxprune.rewrite.scopes`), and the literals export bakes into the ops inside a module
whose row resizes it (``nn.LayerNorm``'s ``normalized_shape``) are left to that resize.

What a copy cannot change is a number written in that ``forward``: ``x.view(n, 512 * 7 * 7)``,
``split([32, 32])``, ``F.conv2d(..., groups=4)``, ``reshape(n, self.hidden_dim, -1)`` (an
attribute read at trace time is a literal in the graph too). The ``GraphModule`` rewrite
rewrites such literals (the rules' ``fix``); for a module copy, :func:`pin_literals` pins
the channels they count before planning, naming the node and the user's file and line.
Sizes read at run time (``x.size(1)``, ``x.shape``) follow the pruning and pin nothing.
Whether a rule's ``fix`` would change a literal is asked of the fix itself, on a scratch
copy of the graph, so every dialect's table is covered without a list of ops here.

Example::

    >>> import torch, fxprune
    >>> net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU(), torch.nn.Conv2d(8, 4, 1))
    >>> small = fxprune.compile(net, (torch.randn(1, 3, 8, 8),), ratio=0.5, onnx=False, output="module", round_to=None)
    >>> type(small).__name__, small[0].out_channels, small[2].in_channels, net[0].out_channels
    ('Sequential', 4, 4, 8)
    >>> fxprune.report(small).mask["module"]["ok"]
    True
"""
from __future__ import annotations

import copy
import operator
import os
import re

import torch
import torch.fx as fx

from ..capture.values import meta_shapes
from ..errors import PlanError
from ..ir import Pin
from ..labels import along, varying
from ..ops.schema import describe
from ..utils import paused_gc
from .graph import Resizer, copy_modules, sliced_memo
from .scopes import module_calls, scope_of, stack_of

_PACKAGE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_TORCH = os.path.dirname(os.path.abspath(torch.__file__))
_FRAME = re.compile(r'File "([^"]+)", line (\d+), in ([^\n]+)\n[ \t]+([^\n]*)')


def _user_frame(node: fx.Node):
    """(file, line, function, code) of the innermost frame of the user's code that made ``node``, or None."""
    trace = node.stack_trace or node.meta.get("stack_trace")
    if not trace:
        return None
    frames = [f for f in _FRAME.findall(trace)
              if not os.path.abspath(f[0]).startswith((_TORCH + os.sep, _PACKAGE + os.sep))]
    return frames[-1] if frames else None


def source_of(node: fx.Node) -> str:
    """Where ``node`` comes from in the user's code: ``file:line: `code` `` when the capture
    recorded stack traces, else the module path (``nn_module_stack``), else the node name."""
    frame = _user_frame(node)
    if frame:
        path, line, _, code = frame
        return f"{path}:{line}: `{code.strip()}`"
    stack = node.meta.get("nn_module_stack")
    if stack:
        return f"in module '{list(stack.values())[-1][0]}', node '{node.name}'"
    return f"node '{node.name}'"


class _ScratchOwner(torch.nn.Module):
    """The owner of a scratch graph: hands out copies of the real module's tensors and
    submodules, so that a ``fix`` that writes weights (Swin's query-scale fold) writes nothing real."""

    def __init__(self, real: torch.nn.Module):
        super().__init__()
        object.__setattr__(self, "_real", real)

    def get_parameter(self, target):
        return torch.nn.Parameter(self._real.get_parameter(target).detach().clone())

    def get_buffer(self, target):
        return self._real.get_buffer(target).clone()

    def get_submodule(self, target):
        return copy.deepcopy(self._real.get_submodule(target))


def _scratch(gm: fx.GraphModule, owner: torch.nn.Module) -> tuple[fx.Graph, dict]:
    """A copy of ``gm``'s graph (meta included) owned by ``owner``; and new node -> original node."""
    graph = fx.Graph(owning_module=owner)
    val_map: dict = {}
    graph.output(graph.graph_copy(gm.graph, val_map))
    return graph, {new: old for old, new in val_map.items()}


def _literal_change(before, after, rw=None):
    """The first literal of ``before`` (a node's target, args, kwargs) that ``after`` changes,
    as ``(old value, new value)``; values ``before`` computes at run time (nodes) may change,
    except (given ``rw``) a size the code reads at run time that a module copy would read as
    another number than the pruned graph passes (:class:`_RunTimeSize`).
    A list or tuple of plain numbers is one literal (``split([32, 32])``); an index is looked into
    (``x[:, :20]`` changes the literal 20)."""
    if isinstance(before, fx.Node):
        if rw is None or isinstance(after, fx.Node):
            return None
        value, sources = _copy_value(before, rw)
        return None if value is not _UNKNOWN and _same(value, after) else (_RunTimeSize(before, value, sources), after)
    if isinstance(before, slice) and isinstance(after, slice):  # x[:, :self.width]: the bound that changes
        def bounds(sl):  # start None and 0 read alike, step None and 1
            return (0 if sl.start is None else sl.start), sl.stop, (1 if sl.step is None else sl.step)

        for b, a in zip(bounds(before), bounds(after)):
            found = _literal_change(b, a, rw)
            if found is not None:
                return found
        return None
    if isinstance(before, (tuple, list)) and (_has_node(before) or any(isinstance(b, slice) for b in before)):
        pairs = list(zip(before, after)) if isinstance(after, (tuple, list)) else []
    elif isinstance(before, dict):
        pairs = [(before[k], after[k]) for k in before if k in after] if isinstance(after, dict) else []
    else:
        pairs = None
    if pairs is not None:
        for b, a in pairs:
            found = _literal_change(b, a, rw)
            if found is not None:
                return found
        if type(before) is type(after) and len(before) == len(after) and (
                not isinstance(before, dict) or before.keys() == after.keys()):
            return None
        return (before, after)
    if isinstance(after, fx.Node) or type(before) is not type(after) or before != after:
        return (before, after)
    return None


_UNKNOWN = object()
_ARITHMETIC = {operator.add: 2, operator.sub: 2, operator.mul: 2, operator.floordiv: 2, operator.truediv: 2,
               operator.mod: 2, operator.neg: 1}


class _RunTimeSize:
    """A size the model's code computes at run time (``C`` of ``B, N, C = x.shape``) where the pruned
    graph passes another number: what a module copy reads there (``value``, or ``_UNKNOWN``), and the
    ``(tensor node, dim)`` shapes it reads it from (``dim`` None: the whole shape)."""

    def __init__(self, node: fx.Node, value, sources: list):
        self.node, self.value, self.sources = node, value, sources


def _copy_value(value, rw: Resizer):
    """``(what a module copy computes for value, [(tensor node, dim)] read)``: ``value`` evaluated on the
    pruned shapes (``x.shape``, ``x.size(d)``, ``aten.sym_size``, indexing and arithmetic on those);
    ``_UNKNOWN`` for anything else."""
    sources: list = []

    def shape_of(x, dim=None):
        shape = rw.new_shape(x) if isinstance(x, fx.Node) else None
        if not isinstance(shape, (tuple, list, torch.Size)) or not all(isinstance(d, int) for d in shape):
            return _UNKNOWN
        sources.append((x, None if dim is None else dim % len(shape)))
        return tuple(shape) if dim is None else shape[dim]

    def ev(v):
        if isinstance(v, (tuple, list)):
            vals = [ev(a) for a in v]
            return _UNKNOWN if any(a is _UNKNOWN for a in vals) else type(v)(vals)
        if not isinstance(v, fx.Node):
            return v
        args = v.args
        if v.op == "call_method" and v.target == "size":
            dim = args[1] if len(args) > 1 else v.kwargs.get("dim")
            return shape_of(args[0], dim) if dim is None or isinstance(dim, int) else _UNKNOWN
        if v.op == "call_function" and v.target is getattr and args[1:] == ("shape",):
            return shape_of(args[0])
        if v.op == "call_function" and v.target is torch.ops.aten.sym_size.int:
            return shape_of(args[0], args[1])
        if v.op == "call_function" and v.target is operator.getitem:
            seq, index = ev(args[0]), ev(args[1])
            if isinstance(seq, tuple) and isinstance(index, (int, slice)):
                return seq[index]
            return _UNKNOWN
        if v.op == "call_function" and _ARITHMETIC.get(v.target) == len(args):
            vals = [ev(a) for a in args]
            return _UNKNOWN if any(not isinstance(a, (int, float)) for a in vals) else v.target(*vals)
        return _UNKNOWN

    return ev(value), sources


def _source_channels(sources: list) -> torch.Tensor:
    """The global channels along the dims of the shapes a run-time size reads."""
    found = [torch.zeros(0, dtype=torch.long)]
    for x, dim in sources:
        label, shape = x.meta.get("fxprune"), meta_shapes(x)
        if not isinstance(label, torch.Tensor):
            continue
        for d in varying(label) if dim is None else [dim]:
            if d in varying(label):
                found.append(along(label, d, shape[d]))
    ch = torch.unique(torch.cat(found))
    return ch[ch >= 0]


def _replaces_node(before, after) -> bool:
    """Whether ``after`` passes a number where ``before`` passed a value computed at run time."""
    if isinstance(before, fx.Node):
        return not isinstance(after, fx.Node)
    if isinstance(before, (tuple, list)) and isinstance(after, (tuple, list)) and len(before) == len(after):
        return any(_replaces_node(b, a) for b, a in zip(before, after))
    if isinstance(before, dict) and isinstance(after, dict):
        return any(_replaces_node(before[k], after[k]) for k in before if k in after)
    return False


def _probe_masks(n: int) -> list[torch.Tensor]:
    """Keep-masks unlike one another (every third channel out, the first half, a random half): a size the
    code reads at run time that equals what the pruned graph passes under each of them reads the same
    channels (with every unpinned channel removed, two different sets of channels both count 0)."""
    idx = torch.arange(n)
    return [idx % 3 != 0, idx < n // 2, torch.rand(n, generator=torch.Generator().manual_seed(0)) < 0.5]


def _run_time_change(node: fx.Node, rule, before, probes: list):
    """The first :class:`_RunTimeSize` change of ``node``'s ``fix`` under the ``probes``' plans, else None;
    ``node`` is left as the fix made it before."""
    fixed = _snapshot(node)
    try:
        for rw in probes:
            node.target, node.args, node.kwargs = before
            try:
                rule.fix(node, rw)
            except Exception:  # a plan the fix cannot take (unequal heads): it says nothing of the sizes
                continue
            change = _literal_change(before, _snapshot(node), rw)
            if change is not None and isinstance(change[0], _RunTimeSize):
                return change
        return None
    finally:
        node.target, node.args, node.kwargs = fixed


def _has_node(value) -> bool:
    found = []
    fx.node.map_arg(value, found.append)
    return bool(found)


def _snapshot(node: fx.Node):
    return (node.target, node.args, dict(node.kwargs))


def _channels(node: fx.Node) -> torch.Tensor:
    """Every global channel in the labels of ``node``'s output and tensor inputs."""
    found = []

    def add(label):
        if isinstance(label, torch.Tensor):
            found.append(label.flatten())
        elif isinstance(label, (tuple, list)):
            for lab in label:
                add(lab)

    add(node.meta.get("fxprune"))
    for a in node.all_input_nodes:
        add(a.meta.get("fxprune"))
    if not found:
        return torch.zeros(0, dtype=torch.long)
    ch = torch.unique(torch.cat(found))
    return ch[ch >= 0]


_UNCHECKED = object()
_SHUFFLE = object()
_GATHER = object()
_FOLD = object()
_FULL = object()
_ADDED = object()
# what the graph rewrite does at a node that a module copy, running the model's code, cannot: its reason
_GRAPH_ONLY = (("fxprune_fold", _FOLD), ("fxprune_full_width", _FULL), ("fxprune_perm", _SHUFFLE),
               ("fxprune_gather", _GATHER), ("fxprune_weight_gather", _GATHER), ("fxprune_contract_gather", _GATHER))


def _folded_channels(node: fx.Node, by_name: dict) -> torch.Tensor:
    """The global channels along the dims whose sizes ``node`` reads as folded numbers."""
    found = [torch.zeros(0, dtype=torch.long)]
    for _, sources in node.meta["fxprune_fold"].values():
        for name, d in sources:
            t = by_name[name]
            label, shape = t.meta.get("fxprune"), meta_shapes(t)
            if isinstance(label, torch.Tensor) and d in varying(label):
                found.append(along(label, d, shape[d]))
    ch = torch.unique(torch.cat(found))
    return ch[ch >= 0]


def _reason(node, gm, change, plan=False) -> str:
    old, new = change
    if old is _UNCHECKED:
        return (f"{describe(node, gm)} ({source_of(node)}) could not be checked for literal sizes ({new}): "
                "its channels are kept for a module copy")
    if old is _SHUFFLE:
        return (f"{describe(node, gm)} ({source_of(node)}) ends a channel shuffle, which the pruned graph replaces "
                "by a gather of the kept channels in the shuffled order; a module copy runs the shuffle unchanged, "
                "so its channels are kept (output='graph' prunes them)")
    if old is _FOLD:
        return (f"{describe(node, gm)} ({source_of(node)}) reads a channel count at run time, where the pruned graph "
                "passes the original's number (what the masked original reads); a module copy runs that code on the "
                "pruned tensors, so those channels are kept (output='graph' prunes them)")
    if old is _ADDED:
        return (f"{describe(node, gm)} ({source_of(node)}) reads them where the pruned graph adds an op before it "
                "(a zero joined to a maximum over the channels, a removed channel's value in the masked original); a "
                "module copy runs that code unchanged, so its channels are kept (output='graph' prunes them)")
    if old is _FULL:
        return (f"{describe(node, gm)} ({source_of(node)}) mixes neighbouring channels; the pruned graph runs it at "
                "the original width with zeros at the removed ones, a module copy runs that code unchanged, so its "
                "channels are kept (output='graph' prunes them)")
    if old is _GATHER:
        return (f"{describe(node, gm)} ({source_of(node)}) combines them with a tensor that has no channels of its own "
                "but varies along theirs (a reshaped parameter, a computed embedding, a weight computed at run time): "
                "the pruned graph reads it at the "
                "kept positions, a module copy runs that code unchanged, so its channels are kept (output='graph' "
                "prunes them)")
    if isinstance(old, _RunTimeSize):
        reads = "a number it cannot tell" if old.value is _UNKNOWN else repr(old.value)
        when = "under this plan" if plan else "under a plan that cuts them"
        return (f"{describe(node, gm)} ({source_of(node)}) reads the size '{old.node.name}' at run time: {when}, the "
                f"pruned graph passes {new!r} there, where a module copy, running that code, would read {reads}"
                + ("" if plan else "; so its channels, and those it reads the size of, are kept (output='graph' "
                   "passes the number)"))
    if isinstance(old, dict):  # keyword arguments the graph rewrite adds (sdpa's scale when head_dim shrinks)
        what = f"the keyword arguments {old!r} (the pruned graph passes {new!r})"
    elif isinstance(old, (int, float, tuple, list)):
        what = f"the literal {old!r}"
    elif callable(old) or isinstance(old, str):  # the op itself changes (a mean becomes sum / original count)
        what = (f"'{getattr(old, '__name__', old)}' over a fixed count of channels (the pruned graph runs "
                f"'{getattr(new, '__name__', new)}' there)")
    else:
        what = f"'{getattr(old, '__name__', old)}' with sizes fixed"
    where = f"{describe(node, gm)} writes {what} in the model's code ({source_of(node)}), and its channels"
    if plan:
        return (f"{where} lose some under this plan: the pruned graph needs {new!r} there, which a module copy, "
                "running that code unchanged, cannot have")
    return f"{where} would lose some: a module copy runs that code unchanged, so they are kept " \
           "(output='graph' rewrites the literal)"


def _same(a, b) -> bool:
    """``a == b`` for plain values; a list and a tuple of the same numbers are the same sizes
    (``torch.export`` writes ``nn.LayerNorm``'s ``normalized_shape`` tuple as a list)."""
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return type(a) is type(b) and a == b


def _attribute(node: fx.Node, value, model) -> tuple | None:
    """``(module path, name)`` when ``value`` is read from an attribute ``self.name`` of the module
    whose code made ``node`` (its line says ``self.name`` and the attribute holds ``value``)."""
    frame, path = _user_frame(node), scope_of(node)
    if model is None or frame is None or path is None or not isinstance(value, (int, tuple, list)) \
            or isinstance(value, bool):
        return None
    try:
        owner = model.get_submodule(path)
    except AttributeError:
        return None
    for name in dict.fromkeys(re.findall(r"\bself\.(\w+)\b(?!\s*\()", frame[3])):
        held = owner.__dict__.get(name)
        if _same(held, value):
            return (path, name)
    return None


def _reads(node: fx.Node, path: str, name: str, value) -> bool:
    """Whether ``node``'s line reads ``self.name`` of module ``path`` and ``value`` is among its arguments."""
    frame = _user_frame(node)
    if frame is None or scope_of(node) != path or not re.search(rf"\bself\.{name}\b", frame[3]):
        return False
    found = []

    def walk(a):
        if _same(a, value):
            found.append(a)
        elif isinstance(a, (tuple, list)):
            for b in a:
                walk(b)
        elif isinstance(a, dict):
            for b in a.values():
                walk(b)

    walk((node.args, node.kwargs))
    return bool(found)


def _resize_of(table, module: torch.nn.Module):
    """The ``resize`` of ``module``'s row in ``table`` (the rule table's one place for it), or None; a row
    may name the type by its qualified name (a package the table does not import)."""
    kind = type(module)
    for key in (kind, f"{kind.__module__}.{kind.__qualname__}"):
        if key in table:
            return table[key].resize
    return None


def _resized_by(node: fx.Node, table, model: torch.nn.Module | None) -> str | None:
    """In a ``torch.export`` graph: the path of a module around ``node`` whose rule resizes it, else None.

    Such a module's own ``forward`` reads the attributes its resize sets (``nn.LayerNorm``'s
    ``normalized_shape``, a depthwise ``nn.Conv2d``'s ``groups``, ``nn.Unflatten``'s sizes), so the
    literals export baked into ``node`` follow the copy: they are the resize's, not the user's.
    (A ``symbolic_trace`` graph calls such a module as one ``call_module`` node instead.)
    """
    if model is None or node.op != "call_function":
        return None
    for _, path in stack_of(node):
        module = _submodule(model, path)
        if module is not None and _resize_of(table, module) is not None:
            return path
    return None


def _submodule(model: torch.nn.Module, path: str) -> torch.nn.Module | None:
    try:
        return model.get_submodule(path)
    except AttributeError:
        return None


def _module_nodes(gm: fx.GraphModule) -> dict[str, fx.Node]:
    """``{module path: the node its resize rule is handed}``: the ``call_module`` node, or in a
    ``torch.export`` graph the first node of the module's first call made by its own code."""
    out = {}
    for path, calls in module_calls(gm).items():
        nodes = calls[0].nodes
        out[path] = next((n for n in nodes if scope_of(n) == path), nodes[0])
    return out


@paused_gc
def pin_literals(graph, model: torch.nn.Module | None = None) -> list[Pin]:
    """Pin, in ``graph``'s groups, the channels that literals in the model's code count.

    For every node whose rule has a ``fix``, the fix runs on a scratch copy of the node
    with every unpinned channel removed; a literal argument it changes (not a size the
    code reads at run time) pins every channel of the node's inputs and output, with a
    :class:`~fxprune.ir.Pin` naming the node, the line and the reason. Returns the new pins.

    A literal that the line reads from an attribute of ``model``'s module (``self.hidden_dim``)
    is not pinned when no other node reads that attribute: :func:`rewrite_module` sets the
    copy's attribute instead (``node.meta["fxprune_attribute"]``).
    """
    gm, table = graph.module, graph.table
    keep = torch.zeros(graph.num_channels, dtype=torch.bool)
    for name, g in graph.groups.items():
        keep[graph.offsets[name]:graph.offsets[name] + g.size] = g.pinned
    scratch, original = _scratch(gm, _ScratchOwner(gm))
    modules = dict(gm.named_modules())
    rw = Resizer(keep)
    starts = sorted((off, name) for name, off in graph.offsets.items())
    bounds = torch.tensor([o for o, _ in starts], dtype=torch.long)
    probes = [Resizer(keep | m) for m in _probe_masks(graph.num_channels)]
    added: list[Pin] = []
    found: list[tuple] = []
    by_name = {n.name: n for n in gm.graph.nodes}
    for node in scratch.nodes:
        graph_only = [(kind, _folded_channels(node, by_name) if key == "fxprune_fold" else _channels(node))
                      for key, kind in _GRAPH_ONLY if key in node.meta]
        for kind, ch in graph_only:
            if ch.numel() and not bool(keep[ch].all()):
                found.append((original[node], ch, (kind, None), None))
        if node.op not in ("call_function", "call_method") or any(kind is not _FOLD for kind, _ in graph_only):
            continue
        rule = table.rule_for(node, modules)
        if rule.fix is None or _resized_by(original[node], table, model) is not None:
            continue
        ch = _channels(node)
        if not ch.numel() or bool(keep[ch].all()):
            continue
        before, count = _snapshot(node), len(scratch.nodes)
        try:
            rule.fix(node, rw)
            change = _literal_change(before, _snapshot(node), rw)
            if change is None and len(scratch.nodes) != count:   # an op added before it (a zero joined to a max)
                change = (_ADDED, None)
            elif change is None and _replaces_node(before, _snapshot(node)):
                change = _run_time_change(node, rule, before, probes)
            if change is not None and isinstance(change[0], _RunTimeSize):  # the sizes it reads are kept too
                ch = torch.unique(torch.cat([ch, _source_channels(change[0].sources)]))
        except Exception as exc:  # a fix that cannot be asked: keep its channels, say why
            change = (_UNCHECKED, f"{type(exc).__name__}: {exc}")
        if change is not None:
            found.append((original[node], ch, change, _attribute(original[node], change[0], model)))
    # an attribute read by one node only (as far as the graph shows) is set on the copy instead
    users: dict[tuple, list] = {}
    for node, _, change, attr in found:
        if attr is not None:
            users.setdefault(attr, []).append((node, change[0]))
    settable = {attr for attr, uses in users.items() if len(uses) == 1 and not any(
        _reads(n, *attr, uses[0][1]) for n in gm.graph.nodes if n is not uses[0][0])}
    for node, ch, change, attr in found:
        if attr in settable:
            node.meta["fxprune_attribute"] = (*attr, change[0])
            continue
        if keep[ch].all():
            continue
        pin = Pin(node.name, _reason(node, gm, change))
        added.append(pin)
        keep[ch] = True
        for gi in torch.unique(torch.searchsorted(bounds, ch, right=True) - 1).tolist():
            g = graph.groups[starts[gi][1]]
            off = graph.offsets[g.name]
            local = ch[(ch >= off) & (ch < off + g.size)] - off
            pinned = g.pinned.clone()
            pinned[local] = True
            g.pinned = pinned
            if pin not in g.pins:
                g.pins.append(pin)
    graph.value_channel_sets = None
    return added


@paused_gc
def rewrite_module(graph, plan, model: torch.nn.Module) -> torch.nn.Module:
    """A pruned deep copy of ``model`` (the module ``graph`` was captured from), same class.

    Parameters and buffers are sliced as :func:`fxprune.rewrite.rewrite` slices them, and
    every module the graph calls (a ``call_module`` node, or in a ``torch.export`` graph the
    first node its code made) is resized by its module type's row; a rule's ``fix`` runs
    on a scratch graph owned by the copy (so a fix that folds a scale into weights folds it
    into the copy's); a literal read from an attribute (``self.hidden_dim``, marked by
    :func:`pin_literals`) is changed in the copy's attribute. ``model`` is left as it was.
    Raises :class:`PlanError` where the plan removes channels that a literal of the model's
    code counts (pin them with :func:`pin_literals` before planning).
    """
    keep = plan.mask(graph)
    new = copy_modules(model, sliced_memo(graph, keep))
    scratch, original = _scratch(graph.module, new)
    analysed = dict(graph.module.named_modules())
    rw = Resizer(keep)
    resized, set_attrs = set(), {}
    for path, node in _module_nodes(graph.module).items():
        if node.op != "call_function":
            continue  # a call_module node: resized below, by its own rule
        module = _submodule(new, path)
        resize = None if module is None else _resize_of(graph.table, module)
        if resize is not None:  # a torch.export graph: the module's own row, handed its first node
            resize(module, node, rw)
    for node in scratch.nodes:
        if node.op not in ("call_module", "call_function", "call_method"):
            continue
        rule = graph.table.rule_for(node, analysed)
        if rule.resize is not None and node.target not in resized:
            rule.resize(new.get_submodule(node.target), node, rw)
            resized.add(node.target)
        if rule.fix is not None and _resized_by(original[node], graph.table, model) is None:
            ch = _channels(node)
            if not ch.numel() or bool(keep[ch].all()):
                continue  # nothing of it is removed: the fix has nothing to change
            before = _snapshot(node)
            rule.fix(node, rw)
            change = _literal_change(before, _snapshot(node), rw)
            attr = node.meta.get("fxprune_attribute")
            owner = new.get_submodule(attr[0]) if change is not None and attr is not None else None
            held = getattr(owner, attr[1], None) if owner is not None else None
            if owner is not None and _same(change[0], attr[2]) and isinstance(change[1], (int, tuple, list)) \
                    and isinstance(held, (tuple, list)) == isinstance(change[1], (tuple, list)):
                value = type(held)(change[1])  # the attribute's own type: a tuple stays a tuple
                if set_attrs.setdefault(attr[:2], value) != value:
                    raise PlanError(f"output='module': attribute '{attr[1]}' of module '{attr[0] or '<root>'}' "
                                    f"would need two values ({set_attrs[attr[:2]]!r} and {value!r})")
                setattr(owner, attr[1], value)  # the line reads it: the copy's code now writes the new size
                continue
            if change is not None:
                raise PlanError(_reason(original[node], graph.module, change, plan=True) +
                                ". Make the plan with output='module' (it pins them), or use output='graph'.")
    return new
