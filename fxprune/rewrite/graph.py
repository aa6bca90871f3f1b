"""The rewrite: a new, physically smaller ``GraphModule`` from a graph and a plan.

:func:`rewrite` deep-copies the analysed module, slices every parameter and buffer
that is a member of a pruned group, lets each rule update its module's attributes
(``in_channels``, ``num_features``, ``groups``, ...) and its node's literal arguments
(``view(-1, 512 * 7 * 7)``, ``split([32, 32])``), and recompiles. The analysed module
and the user's model are left as they were.

Example::

    >>> import torch, fxprune
    >>> from fxprune.rewrite import rewrite
    >>> net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU(), torch.nn.Conv2d(8, 4, 1))
    >>> graph = fxprune.analyze(net, (torch.randn(1, 3, 8, 8),))
    >>> small = rewrite(graph, fxprune.Plan({"0": [0, 2, 5]}, {"0": 8}))
    >>> small.get_submodule("0").out_channels, small.get_submodule("2").in_channels
    (3, 3)
"""
from __future__ import annotations

import copy
import math

import numpy as np
import torch
import torch.fx as fx
from torch.fx.node import map_arg

from ..capture.values import meta_shapes
from ..errors import RewriteError
from ..labels import kept_along, kept_mask, kept_shape, varying
from ..ops.schema import describe
from ..utils import paused_gc


class Resizer:
    """What ``fix`` and ``resize`` rules may ask about a node at rewrite time."""

    def __init__(self, keep: torch.Tensor):
        self.keep = keep

    def old_shape(self, node: fx.Node):
        return meta_shapes(node)

    def varying_dims(self, node: fx.Node) -> list[int]:
        label = node.meta.get("fxprune")
        return varying(label) if isinstance(label, torch.Tensor) else []

    def kept_along(self, node: fx.Node, dim: int) -> torch.Tensor:
        label = node.meta.get("fxprune")
        return kept_along(label, dim, self.old_shape(node)[dim], self.keep)

    def new_shape(self, node: fx.Node):
        """The shape of ``node``'s output in the pruned model (a list for multi-output nodes)."""
        shapes, labels = meta_shapes(node), node.meta.get("fxprune")
        if isinstance(shapes, list):
            return [self._shape(s, lab) if s is not None else None for s, lab in zip(shapes, labels)]
        return self._shape(shapes, labels)

    def _shape(self, shape, label):
        return kept_shape(shape, label if isinstance(label, torch.Tensor) else None, self.keep)

    @staticmethod
    def set_arg(node: fx.Node, index: int, name: str, value) -> None:
        if len(node.args) > index:
            args = list(node.args)
            args[index] = value
            node.args = tuple(args)
        else:
            node.kwargs = {**node.kwargs, name: value}


def kept_positions(param_channels: dict, keep: torch.Tensor) -> dict[str, dict[int, torch.Tensor]]:
    """``{param: {dim: positions}}``: the positions that survive (fixed ones and kept
    channels) of every parameter dimension in ``param_channels`` that loses some; a
    parameter that loses nothing is left out. One vectorised pass over all of them."""
    items = list(param_channels.items())
    if not items:
        return {}
    slot_of: dict[int, int] = {}  # many dims share one tensor of channels (a conv's rows, its bias): once each
    arrays, slots = [], []
    for _, c in items:
        slots.append(slot_of.setdefault(id(c), len(arrays)))
        if slots[-1] == len(arrays):
            arrays.append(c.numpy())
    ch = np.concatenate(arrays)
    survives = (ch < 0) | keep.numpy()[np.maximum(ch, 0)]
    lengths = np.array([a.shape[0] for a in arrays])
    starts = np.concatenate([[0], np.cumsum(lengths)])
    losing = ~np.logical_and.reduceat(np.append(survives, True), starts[:-1]) & (lengths > 0)
    positions = np.flatnonzero(survives)
    bounds = np.searchsorted(positions, starts)
    kept: dict[int, torch.Tensor] = {}
    out: dict[str, dict[int, torch.Tensor]] = {}
    for ((param, dim), _), j in zip(items, slots):
        if losing[j]:
            if j not in kept:
                kept[j] = torch.from_numpy(positions[bounds[j]:bounds[j + 1]] - starts[j])
            out.setdefault(param, {})[dim] = kept[j]
    return out


_ATOMIC = (int, float, bool, str, bytes, type(None), type, torch.dtype, torch.device, torch.Size, range,
           type(len), type(lambda: 0))


def copy_modules(root: torch.nn.Module, memo: dict) -> torch.nn.Module:
    """``copy.deepcopy(root, memo)``, faster: a new object per module, a copy of every
    tensor (or its replacement in ``memo``, keyed by ``id``), and plain attributes
    (numbers, strings, tuples of them, empty hook dicts) copied without recursion.

    Anything else in a module's ``__dict__`` goes through ``copy.deepcopy`` with the same
    memo, so tensors held outside ``_parameters``/``_buffers`` (a list of weights) are
    still the new ones. Shared submodules and tensors stay shared in the copy.
    """
    def tensor(t):
        new = memo.get(id(t))
        if new is None:
            if type(t) is torch.Tensor and t.dim() == 0 and not t.requires_grad and t._base is None:
                new = memo[id(t)] = t.clone()  # a counter such as num_batches_tracked: 8x faster than deepcopy
            else:
                new = copy.deepcopy(t, memo)  # Parameter keeps its type and requires_grad
        return new

    def module(m):
        new = memo.get(id(m))
        if new is not None:
            return new
        new = m.__class__.__new__(m.__class__)
        memo[id(m)] = new
        state = {}
        for key, value in m.__dict__.items():
            if key == "_modules":
                value = {k: None if v is None else module(v) for k, v in value.items()}
            elif key in ("_parameters", "_buffers"):
                value = {k: None if v is None else tensor(v) for k, v in value.items()}
            elif isinstance(value, _ATOMIC) or (type(value) is tuple and all(isinstance(v, _ATOMIC) for v in value)):
                pass
            elif isinstance(value, (dict, set)) and not value:  # hooks, _non_persistent_buffers_set
                value = type(value)()
            else:
                value = copy.deepcopy(value, memo)
            state[key] = value
        new.__dict__.update(state)
        return new

    return module(root)


def _gather(tensor: torch.Tensor, index_of_dim: dict[int, torch.Tensor], scratch: dict | None = None) -> torch.Tensor:
    """``tensor`` keeping positions ``index_of_dim[d]`` along each dim ``d`` (dim 0 first:
    whole rows, the cheapest copy, and it shrinks what the next dims gather).

    With ``scratch`` (a dict shared by the calls of one rewrite), the first of several gathers
    writes into a reused buffer rather than fresh memory: a fresh intermediate per weight costs
    its page faults, about a fifth of a ResNet-50 rewrite. The result never shares it.

    >>> w = torch.arange(12.).view(3, 4)
    >>> _gather(w, {1: torch.tensor([0, 3]), 0: torch.tensor([2])}, {}).tolist()
    [[8.0, 11.0]]
    """
    steps = sorted(index_of_dim.items())
    if scratch is not None and len(steps) > 1:
        (dim, index), steps = steps[0], steps[1:]
        shape = list(tensor.shape)
        shape[dim] = index.numel()
        n = math.prod(shape)
        key = (tensor.dtype, tensor.device)
        if key not in scratch or scratch[key].numel() < n:
            scratch[key] = torch.empty(n, dtype=tensor.dtype, device=tensor.device)
        tensor = torch.index_select(tensor, dim, index, out=scratch[key][:n].view(shape))
    for dim, index in steps:
        tensor = tensor.index_select(dim, index)
    return tensor


def sliced_memo(graph, keep: torch.Tensor) -> dict:
    """``{id(original tensor): its sliced copy}`` for every parameter and buffer that loses
    positions under ``keep`` (a ``Parameter`` stays a ``Parameter``; a grouped layer's weight keeps
    each group's own columns): the memo that :func:`copy_modules` copies a module with, so that
    only what is kept is copied."""
    kept = kept_positions(graph.param_channels, keep)
    scratch: dict = {}
    sliced = {param: _gather(graph.param(param).detach(), dims, scratch) for param, dims in kept.items()}
    del scratch
    for (param, dim), channels in graph.grouped_params.items():
        cols = (channels < 0) | keep[channels.clamp(min=0)]
        if not bool(cols.all()):
            sliced[param] = gather_grouped(sliced.get(param, graph.param(param).detach()), dim, cols)
    memo = {}
    for name, new in sliced.items():
        old = graph.param(name)
        memo[id(old)] = torch.nn.Parameter(new, requires_grad=old.requires_grad) if isinstance(
            old, torch.nn.Parameter) else new
    return memo


def gather_grouped(tensor: torch.Tensor, dim: int, cols: torch.Tensor) -> torch.Tensor:
    """A grouped layer's weight keeping, in each group's rows, that group's own columns along ``dim``.

    ``cols`` is a bool ``[groups, k]`` (every row keeping as many); the rows are the other one of dims 0
    and 1, split evenly among the groups.

    >>> w = torch.arange(8.).view(4, 2)          # 2 groups of 2 rows, 2 input columns each
    >>> gather_grouped(w, 1, torch.tensor([[True, False], [False, True]])).flatten().tolist()
    [0.0, 2.0, 5.0, 7.0]
    """
    row_dim = 1 if dim == 0 else 0
    parts = tensor.chunk(cols.shape[0], row_dim)
    return torch.cat([p.index_select(dim, torch.nonzero(c).flatten()) for p, c in zip(parts, cols)], row_dim)


def replace_permutation(node: fx.Node, rw, root: torch.nn.Module) -> bool:
    """At rewrite time: ``node`` ends a channel permutation (see :func:`fxprune.ops.shape.permutation`) that loses
    channels: make it ``index_select(source, d, kept order)``; the ops before it are left unused.
    Returns whether it did."""
    d, perm, back = node.meta["fxprune_perm"]
    src = node
    for _ in range(back + 1):
        src = src.args[0]
    size = len(perm)
    kept_in = torch.nonzero(kept_along(src.meta.get("fxprune"), d, size, rw.keep)).flatten()
    if kept_in.numel() == size:
        return False
    kept_out = torch.nonzero(kept_along(node.meta.get("fxprune"), d, size, rw.keep)).flatten()
    order = torch.searchsorted(kept_in, perm[kept_out])
    name = f"_fxprune_perm_{node.name}"
    root.register_buffer(name, order, persistent=False)
    with node.graph.inserting_before(node):
        index = node.graph.get_attr(name)
    node.op, node.target, node.args, node.kwargs = "call_function", torch.index_select, (src, d, index), {}
    return True


def run_full_width(node: fx.Node, rw, root: torch.nn.Module) -> bool:
    """At rewrite time: ``node`` mixes neighbouring positions of a dim that carries channels
    (``node.meta["fxprune_full_width"]``, see :func:`fxprune.ops.conv._full_width`): a copy of it runs at the
    original width, on its input spread back there with zeros at the removed positions (a zero padded on and
    one ``index_select``), and ``node`` becomes the ``index_select`` of that copy's kept positions. Returns
    whether it did (not when every position stays).

    >>> import torch.nn.functional as F
    >>> x, spread = torch.tensor([[1., 2.]]), torch.tensor([0, 2, 1])   # positions 0 and 2 of 3 kept
    >>> F.pad(x, [0, 1]).index_select(1, spread).tolist()
    [[1.0, 0.0, 2.0]]
    """
    dim, src = node.meta["fxprune_full_width"], node.args[0]
    old = rw.old_shape(src)
    kept = kept_along(src.meta.get("fxprune"), dim, old[dim], rw.keep)
    if bool(kept.all()):
        return False
    spread = torch.full((old[dim],), int(kept.sum()), dtype=torch.long)
    spread[kept] = torch.arange(int(kept.sum()))
    root.register_buffer(f"_fxprune_spread_{node.name}", spread, persistent=False)
    root.register_buffer(f"_fxprune_kept_{node.name}", torch.nonzero(kept).flatten(), persistent=False)
    g = node.graph
    with g.inserting_before(node):
        padded = g.call_function(torch.nn.functional.pad, (src, [0, 0] * (len(old) - 1 - dim) + [0, 1]))
        wide = g.call_function(torch.index_select, (padded, dim, g.get_attr(f"_fxprune_spread_{node.name}")))
        full = g.node_copy(node, lambda a: wide if a is src else a)
        index = g.get_attr(f"_fxprune_kept_{node.name}")
    full.meta = {}
    node.op, node.target, node.args, node.kwargs = "call_function", torch.index_select, (full, dim, index), {}
    return True


def gather_kept(node: fx.Node, rw, root: torch.nn.Module) -> None:
    """At rewrite time: the operands of elementwise ``node`` that carry no channels but vary along
    its channel dims (``node.meta["fxprune_gather"]``, see :func:`fxprune.ops.elementwise.elementwise`)
    are read at the kept positions only: ``index_select`` along one dim; over a grid (blocks x
    positions, each block keeping its own), the operand broadcast over both dims, flattened there,
    selected and unflattened to the kept sizes."""
    dims, operands = node.meta["fxprune_gather"]
    label, old, new = node.meta["fxprune"], rw.old_shape(node), rw.new_shape(node)
    mask = kept_mask(label, rw.keep).expand(*[old[d] if d in dims else 1 for d in range(len(old))])
    flat = torch.nonzero(mask.reshape([old[d] for d in dims]).flatten()).flatten()
    if flat.numel() == math.prod(old[d] for d in dims):
        return
    name = f"_fxprune_gather_{node.name}"
    root.register_buffer(name, flat, persistent=False)
    g = node.graph
    with g.inserting_before(node):
        index = g.get_attr(name)
        for where, cdims in operands:
            src = node.args[where] if isinstance(where, int) else node.kwargs[where]
            if len(cdims) == 1:
                picked = g.call_function(torch.index_select, (src, cdims[0], index))
            else:
                sizes, offset = meta_shapes(src), len(old) - len(meta_shapes(src))
                wide = g.call_method("expand", (src, *[old[c + offset] if c in cdims and sizes[c] == 1 else -1
                                                        for c in range(len(sizes))]))
                last = g.call_function(torch.flatten, (g.call_function(torch.movedim, (wide, cdims, [-2, -1])), -2))
                picked = g.call_function(torch.index_select, (last, -1, index))
                picked = g.call_function(torch.unflatten, (picked, -1, [new[d] for d in dims]))
                picked = g.call_function(torch.movedim, (picked, [-2, -1], cdims))
            if isinstance(where, int):
                node.update_arg(where, picked)
            else:
                node.update_kwarg(where, picked)


def gather_contracted(node: fx.Node, rw, root: torch.nn.Module) -> None:
    """At rewrite time: the operands of contraction ``node`` that carry no channels along a summed dim where
    another operand carries them (``node.meta["fxprune_contract_gather"]``, see :func:`fxprune.ops.attention._contract`)
    are read at that operand's kept positions there (``index_select``)."""
    inputs = {a.name: a for a in node.all_input_nodes}
    g = node.graph
    for i, (fixed, dim, carrier, carrier_dim) in enumerate(node.meta["fxprune_contract_gather"]):
        src, by = inputs[fixed], inputs[carrier]
        kept = kept_along(by.meta.get("fxprune"), carrier_dim, rw.old_shape(by)[carrier_dim], rw.keep)
        if bool(kept.all()):
            continue
        name = f"_fxprune_contract_{node.name}_{i}"
        root.register_buffer(name, torch.nonzero(kept).flatten(), persistent=False)
        with g.inserting_before(node):
            picked = g.call_function(torch.index_select, (src, dim, g.get_attr(name)))
        node.args = map_arg(node.args, lambda a: picked if a is src else a)


def gather_weight(node: fx.Node, rw, root: torch.nn.Module) -> None:
    """At rewrite time: a conv's weight computed at run time (``node.meta["fxprune_weight_gather"]``, see
    :func:`fxprune.ops.conv._conv_call`) read at the kept output channels (its rows, unless the parameters
    were sliced by rows already) and kept input channels (its columns: by ``index_select``; a grouped
    conv's, each group its own, by one ``gather``; a depthwise conv's, one per group, and those of a grouped
    conv that loses whole groups stay). A linear layer's weight or bias computed at run time (the meta's third
    field, the channels' axis: -1) is read at the kept outputs and inputs the same way."""
    where, (out_dim, in_dim), axis = node.meta["fxprune_weight_gather"]
    weight = picked = node.args[where] if isinstance(where, int) else node.kwargs[where]
    x, graph = node.args[0], node.graph
    out_shape, in_shape = rw.old_shape(node), rw.old_shape(x)
    kept_out = torch.nonzero(kept_along(node.meta.get("fxprune"), axis % len(out_shape), out_shape[axis],
                                        rw.keep)).flatten()
    kept_in = kept_along(x.meta.get("fxprune"), axis % len(in_shape), in_shape[axis], rw.keep)
    out_size = out_shape[axis]
    prefix = "_fxprune_bias" if where in (2, "bias") else "_fxprune_weight"

    def constant(side, value):
        name = f"{prefix}_{side}_{node.name}"
        root.register_buffer(name, value, persistent=False)
        return graph.get_attr(name)

    with graph.inserting_before(node):
        if out_dim is not None and kept_out.numel() < out_size:
            picked = graph.call_function(torch.index_select, (picked, out_dim, constant("out", kept_out)))
        groups = node.meta.get("fxprune_grouped", 1)
        if in_dim is not None and not bool(kept_in.all()) and groups == 1:
            picked = graph.call_function(torch.index_select,
                                         (picked, in_dim, constant("in", torch.nonzero(kept_in).flatten())))
        elif in_dim is not None and not bool(kept_in.all()):   # each group's own kept columns (as many in each)
            cols = torch.stack([torch.nonzero(c).flatten() for c in kept_in.view(groups, -1)])
            index = cols[kept_out // (out_size // groups)]
            kernel = rw.old_shape(weight)[2:]
            index = index.view(*index.shape, *(1,) * len(kernel)).expand(*index.shape, *kernel).contiguous()
            picked = graph.call_function(torch.gather, (picked, in_dim, constant("in", index)))
    if isinstance(where, int):
        node.update_arg(where, picked)
    else:
        node.update_kwarg(where, picked)


def fold_sizes(node: fx.Node) -> None:
    """Pass ``node`` the numbers the original computed from channel counts where the analysis folded them
    (``node.meta["fxprune_fold"]``, see :meth:`fxprune.couple.analysis.Analysis.folds_to_literal`)."""
    fold = node.meta["fxprune_fold"]
    missing = set(fold) - {a.name for a in node.all_input_nodes}
    if missing:
        raise RuntimeError(f"the sizes {sorted(missing)} to fold are not read by node '{node.name}'")
    node.args, node.kwargs = map_arg((node.args, node.kwargs), lambda a: fold[a.name][0] if a.name in fold else a)


def weight_gathers(gm: fx.GraphModule) -> list[str]:
    """The convs of a rewritten graph that read a computed weight at kept positions (:func:`gather_weight`)."""
    prefixes = ("_fxprune_weight_out_", "_fxprune_weight_in_")
    return sorted({n.target.removeprefix(p) for n in gm.graph.nodes if n.op == "get_attr"
                   for p in prefixes if n.target.startswith(p)})


def _holder(gm: fx.GraphModule) -> torch.nn.Module:
    """A plain module with ``gm``'s submodules, parameters, buffers and tensor attributes
    (what the graph's targets name), without its graph and generated code."""
    holder = torch.nn.Module()
    holder.training = gm.training
    for key in ("_modules", "_parameters", "_buffers", "_non_persistent_buffers_set"):
        holder.__dict__[key] = gm.__dict__[key]
    for node in gm.graph.nodes:
        if node.op == "get_attr":
            top = node.target.split(".")[0]
            value = gm.__dict__.get(top)
            if isinstance(value, torch.Tensor):
                holder.__dict__[top] = value
    return holder


def _may_act_in_place(node: fx.Node, table, modules: dict) -> bool:
    """Whether a call whose result nothing reads may still change its inputs: an in-place method or function
    (``x.add_(y)``), or one no rule knows (torchvision MViT's ``_add_shortcut(x, q)``, traced as one call,
    adds to ``x``; its result is dropped)."""
    if node.op not in ("call_function", "call_method", "call_module"):
        return False
    name = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", "")
    return (name.endswith("_") and not name.endswith("__")) or table.rule_for(node, modules) is table.default


@paused_gc
def rewrite(graph, plan) -> fx.GraphModule:
    """Return a new ``GraphModule`` with the channels that ``plan`` removes cut out."""
    keep = plan.mask(graph)
    # Slice first, then deep-copy with the sliced tensors standing in for the originals:
    # only what is kept is copied, once.
    root = copy_modules(_holder(graph.module), sliced_memo(graph, keep))
    new_graph = fx.Graph(owning_module=root)
    new_graph.set_codegen(copy.copy(graph.module.graph._codegen))  # torch.export's flattens pytree inputs/outputs
    new_graph.output(new_graph.graph_copy(graph.module.graph, {}))
    rw = Resizer(keep)
    resized = set()
    modules = dict(root.named_modules())
    for node in new_graph.nodes:
        if node.op not in ("call_module", "call_function", "call_method"):
            continue
        if "fxprune_perm" in node.meta and replace_permutation(node, rw, root):  # a channel shuffle
            continue
        if "fxprune_full_width" in node.meta and run_full_width(node, rw, root):  # ECA's conv over channels
            continue
        if "fxprune_fold" in node.meta:
            fold_sizes(node)
        if "fxprune_gather" in node.meta:
            gather_kept(node, rw, root)
        if "fxprune_contract_gather" in node.meta:
            gather_contracted(node, rw, root)
        if "fxprune_weight_gather" in node.meta:
            gather_weight(node, rw, root)
        rule = graph.table.rule_for(node, modules)
        try:
            if rule.resize is not None and node.target not in resized:
                rule.resize(modules[node.target], node, rw)
                resized.add(node.target)
            if rule.fix is not None:
                rule.fix(node, rw)
        except Exception as exc:
            raise RewriteError(f"could not rewrite {describe(node, root)} for this plan: {type(exc).__name__}: {exc}. "
                               f"This is a bug in fxprune: please report it with the model; meanwhile pass ignore=[...] "
                               f"with the groups of the channels that reach node '{node.name}'.") from exc
    if any(not n.users for n in new_graph.nodes if n.op not in ("output", "placeholder")):
        # a size that fed a now-literal argument goes; a call nothing reads that may act in place stays
        mods = dict(graph.module.named_modules())
        in_place = {n.name for n in graph.module.graph.nodes if not n.users and _may_act_in_place(n, graph.table, mods)}
        new_graph.eliminate_dead_code(lambda n: n.is_impure() or n.name in in_place)  # costly: only where needed
    try:
        gm = fx.GraphModule(root, new_graph, graph.module.__class__.__name__)
    except Exception as exc:
        raise RewriteError(f"the rewritten graph does not compile: {type(exc).__name__}: {exc}") from exc
    gm.meta = {k: v for k, v in graph.module.meta.items() if k != "fxprune_report"} if hasattr(graph.module, "meta") else {}
    return gm

