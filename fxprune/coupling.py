"""The coupling analysis: which channels of a traced model must be kept or removed together.

:func:`couple` walks the graph once in order. Each node's rule (looked up in
:mod:`fxprune.rules`) computes the channel label of its output from its inputs'
labels (see :mod:`fxprune.labels`), allocates fresh channel ids where a conv or linear
makes new channels, records the parameter slices that follow them (members), and
*unifies* ids that must be removed together (a residual add, a shared parameter).
A union-find over ids then yields the channel groups of :mod:`fxprune.ir`.

Example::

    >>> import torch, torchvision
    >>> from fxprune.trace import trace
    >>> from fxprune.coupling import couple
    >>> net = torchvision.models.resnet18()
    >>> x = torch.randn(1, 3, 64, 64)
    >>> graph = couple(trace(net, (x,)), (x,))
    >>> g = graph.groups["conv1"]       # the stem conv writes the layer1 residual stream
    >>> g.size, g.prunable
    (64, 64)
    >>> sorted(m.param for m in g.members if m.kind == "producer" and m.role == "weight")
    ['conv1.weight', 'layer1.0.conv2.weight', 'layer1.1.conv2.weight']
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.fx as fx
from torch.fx.node import map_aggregate

from . import rules
from .ir import ChannelGraph, ChannelGroup, Member, Pin
from .labels import FIXED, collapse
from .trace import meta_shapes


@dataclass
class T:
    """A tensor as the rules see it: its label, its shape, and its name if it is a parameter."""

    label: torch.Tensor | None
    shape: tuple
    param: str | None = None


class _UnionFind:
    def __init__(self):
        self.parent: list[int] = []

    def new(self, n: int) -> torch.Tensor:
        start = len(self.parent)
        self.parent.extend(range(start, start + n))
        return torch.arange(start, start + n, dtype=torch.long)

    def find(self, x: int) -> int:
        parent = self.parent
        root = x
        while parent[root] != root:
            root = parent[root]
        while parent[x] != root:
            parent[x], x = root, parent[x]
        return root

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            if ra < rb:
                self.parent[rb] = ra
            else:
                self.parent[ra] = rb

    def roots(self, ids: torch.Tensor) -> torch.Tensor:
        uniq, inverse = torch.unique(ids, return_inverse=True)
        found = torch.tensor([self.find(i) if i >= 0 else FIXED for i in uniq.tolist()], dtype=torch.long)
        return found[inverse]


class Context:
    """What a rule may do while the analysis visits ``node``; see :mod:`fxprune.rules`."""

    def __init__(self, analysis: "_Analysis", node: fx.Node):
        self._a = analysis
        self.node = node
        self.gm = analysis.gm

    # -- facts about the node
    def module(self) -> torch.nn.Module:
        return self.gm.get_submodule(self.node.target)

    @property
    def out_shape(self):
        """The output's shape (a list of shapes for a node with several outputs)."""
        return meta_shapes(self.node)

    def has_param(self, name: str) -> bool:
        mod, _, attr = name.rpartition(".")
        return getattr(self.gm.get_submodule(mod), attr, None) is not None

    # -- actions
    def fresh(self, n: int) -> torch.Tensor:
        """New channel ids made by this node (a conv's or linear's output channels)."""
        ids = self._a.uf.new(n)
        self._a.blocks.append((self.node, ids))
        return ids

    def roots(self, label):
        return None if label is None else self._a.uf.roots(label)

    def unify(self, a: torch.Tensor, b: torch.Tensor, reason: str) -> torch.Tensor:
        """Make the ids of ``a`` and ``b`` (broadcast together) the same channels.

        Where one side is FIXED the other side's id is pinned with ``reason``. Returns
        the combined label.
        """
        a, b = torch.broadcast_tensors(a, b)
        pairs = torch.unique(torch.stack([a.flatten(), b.flatten()], 1), dim=0).tolist()
        pinned = []
        for x, y in pairs:
            if x >= 0 and y >= 0:
                self._a.uf.union(x, y)
            elif x >= 0 or y >= 0:
                pinned.append(max(x, y))
        if pinned:
            self.pin(torch.tensor(pinned), reason)
        return torch.where(a >= 0, a, b)

    def unify_within(self, ids: torch.Tensor, reason: str) -> None:
        """Make all ids in ``ids`` one channel."""
        flat = ids.flatten()
        self.unify(flat[:1], flat, reason)

    def pin(self, label, reason: str) -> None:
        if label is None:
            return
        ids = torch.unique(label[label >= 0])
        if ids.numel():
            self._a.pins.append((ids, Pin(self.node.name, reason)))

    def member(self, param: str, dim: int, ids: torch.Tensor, kind: str, role: str) -> None:
        """Record that ``param``'s slices along ``dim`` follow ``ids`` (one per position)."""
        self._a.members.append((param, dim, ids.flatten().clone(), kind, role, self.node.name))

    def fix_param(self, param: str, reason: str) -> None:
        """``param`` is used whole somewhere: every slice of it must stay."""
        self._a.fixed_params.append((param, Pin(self.node.name, reason)))

    def cost(self, *labels) -> None:
        """Say whose kept fraction scales this node's FLOPs (default: its output label)."""
        self._a.costs[self.node.name] = [lab.flatten().clone() for lab in labels if lab is not None]


class _Analysis:
    def __init__(self, gm: fx.GraphModule):
        self.gm = gm
        self.uf = _UnionFind()
        self.blocks: list[tuple[fx.Node, torch.Tensor]] = []
        self.pins: list[tuple[torch.Tensor, Pin]] = []
        self.members: list[tuple] = []
        self.fixed_params: list[tuple[str, Pin]] = []
        self.costs: dict[str, list[torch.Tensor]] = {}
        self.env: dict[fx.Node, object] = {}
        self.params = dict(gm.named_parameters())
        self.params.update(gm.named_buffers())

    def run(self) -> None:
        for node in self.gm.graph.nodes:
            self.env[node] = self.visit(node)

    def visit(self, node: fx.Node):
        if node.op == "placeholder":
            return self.as_t(node, None)
        if node.op == "get_attr":
            value = self.params.get(node.target)
            if isinstance(value, torch.Tensor):
                return T(None, tuple(value.shape), node.target)
            return node.meta.get("value")
        if meta_shapes(node) is None and node.op != "output":
            return node.meta.get("value", _OPAQUE)  # sizes, ints: plain values, no channels
        args = map_aggregate(node.args, self.lookup)
        kwargs = map_aggregate(node.kwargs, self.lookup)
        ctx = Context(self, node)
        rule = rules.rule_for(node, self.gm)
        try:
            label = rule.couple(ctx, args, kwargs)
        except Exception as exc:  # a rule that cannot handle an odd call pins instead of crashing
            label = rules.pin_all(ctx, args, kwargs, f"{rules.describe(node, self.gm)} could not be analysed ({exc})")
        if node.op == "output":
            return None
        return self.as_t(node, label)

    def lookup(self, a):
        return self.env[a] if isinstance(a, fx.Node) else a

    def as_t(self, node: fx.Node, label):
        shapes = meta_shapes(node)

        def build(shape, lab):
            if shape is None:
                return None
            lab = collapse(self.uf.roots(lab)) if isinstance(lab, torch.Tensor) else None
            if lab is not None and (lab.dim() != len(shape) or any(
                    s != 1 and s != t for s, t in zip(lab.shape, shape))):
                raise RuntimeError(f"fxprune internal error: label {tuple(lab.shape)} does not fit "
                                   f"{shape} at node {node.name}")
            return T(lab, shape)

        if isinstance(shapes, list):
            labels = label if isinstance(label, (tuple, list)) else [None] * len(shapes)
            out = tuple(build(s, lab) for s, lab in zip(shapes, labels))
            node.meta["fxprune"] = tuple(t.label if t is not None else None for t in out)
            return out
        out = build(shapes, label)
        node.meta["fxprune"] = out.label if out is not None else None
        return out


_OPAQUE = object()


def couple(gm: fx.GraphModule, example_inputs: tuple) -> ChannelGraph:
    """Analyse a traced, shape-annotated module (see :func:`fxprune.trace.trace`)."""
    a = _Analysis(gm)
    a.run()
    _consolidate_members(a)
    graph = _build_graph(a, example_inputs)
    _mark_approximate(graph)
    return graph


def _mark_approximate(graph: ChannelGraph) -> None:
    """Groups whose channels reach a channel-normalising op (rules set ``meta["fxprune_approx"]``)."""
    starts = sorted((off, name) for name, off in graph.offsets.items())
    bounds = torch.tensor([o for o, _ in starts], dtype=torch.long)
    for node in graph.module.graph.nodes:
        if node.meta.get("fxprune_approx") is None or not isinstance(node.meta.get("fxprune"), torch.Tensor):
            continue
        ch = torch.unique(node.meta["fxprune"])
        ch = ch[ch >= 0]
        for gi in torch.unique(torch.searchsorted(bounds, ch, right=True) - 1).tolist():
            graph.groups[starts[gi][1]].approximate = True


def _consolidate_members(a: _Analysis) -> None:
    """A parameter has one shape: every use of the same (param, dim) must agree on its ids."""
    by_slot: dict[tuple[str, int], torch.Tensor] = {}
    node_of = {n.name: n for n in a.gm.graph.nodes}
    for param, dim, ids, kind, role, node in a.members:
        key = (param, dim)
        if key in by_slot:
            Context(a, node_of[node]).unify(by_slot[key], ids, f"'{param}' is shared with a use whose channels are fixed")
        else:
            by_slot[key] = ids
    for param, pin in a.fixed_params:
        for (p, _), ids in by_slot.items():
            if p == param:
                a.pins.append((torch.unique(ids[ids >= 0]), pin))


def _build_graph(a: _Analysis, example_inputs) -> ChannelGraph:
    uf = a.uf
    n_ids = len(uf.parent)
    root_list = [uf.find(i) for i in range(n_ids)]
    root = torch.tensor(root_list, dtype=torch.long)

    # Blocks (fresh allocations) that share a channel belong to one group.
    block_parent = list(range(len(a.blocks)))

    def bfind(b):
        while block_parent[b] != b:
            block_parent[b] = block_parent[block_parent[b]]
            b = block_parent[b]
        return b

    first_block_of_root: dict[int, int] = {}
    for b, (_, ids) in enumerate(a.blocks):
        for r in (root_list[i] for i in ids.tolist()):
            other = first_block_of_root.setdefault(r, b)
            if other != b:
                ra, rb = bfind(other), bfind(b)
                if ra != rb:
                    block_parent[max(ra, rb)] = min(ra, rb)

    # Name each group after its first producer; number channels group by group, in the
    # order their roots first appear among the group's blocks.
    groups: dict[str, ChannelGroup] = {}
    blocks_of: dict[str, list[torch.Tensor]] = {}
    name_of_top: dict[int, str] = {}
    for b, (node, ids) in enumerate(a.blocks):
        top = bfind(b)
        if top not in name_of_top:
            name_of_top[top] = _unique_name(_producer_name(node), groups)
            groups[name_of_top[top]] = ChannelGroup(name=name_of_top[top], size=0)
        blocks_of.setdefault(name_of_top[top], []).append(ids)
    channel_of_root = [FIXED] * n_ids
    offsets: dict[str, int] = {}
    group_of_channel: list[int] = []
    next_channel = 0
    for gi, (name, g) in enumerate(groups.items()):
        offsets[name] = next_channel
        for ids in blocks_of[name]:
            for r in (root_list[i] for i in ids.tolist()):
                if channel_of_root[r] < 0:
                    channel_of_root[r] = next_channel
                    next_channel += 1
        g.size = next_channel - offsets[name]
        group_of_channel.extend([gi] * g.size)
    channel_of = torch.tensor(channel_of_root, dtype=torch.long)[root]
    group_of_channel = torch.tensor(group_of_channel, dtype=torch.long)
    names = list(groups)

    pinned = torch.zeros(next_channel, dtype=torch.bool)
    pins_of: dict[str, list[Pin]] = {name: [] for name in groups}
    for ids, pin in a.pins:
        ch = channel_of[ids]
        ch = ch[ch >= 0]
        if not ch.numel():
            continue
        pinned[ch] = True
        for gi in torch.unique(group_of_channel[ch]).tolist():
            if pin not in pins_of[names[gi]]:
                pins_of[names[gi]].append(pin)

    param_channels: dict[tuple[str, int], torch.Tensor] = {}
    param_kinds: dict[tuple[str, int], str] = {}
    for param, dim, ids, kind, role, node in a.members:
        ch = torch.where(ids >= 0, channel_of[ids.clamp(min=0)], FIXED)
        param_channels.setdefault((param, dim), ch)
        param_kinds.setdefault((param, dim), kind)
        inside = ch >= 0
        if not bool(inside.any()):
            continue
        owner = torch.where(inside, group_of_channel[ch.clamp(min=0)], -1)
        for gi in torch.unique(owner[inside]).tolist():
            name = names[gi]
            index = torch.where(owner == gi, ch - offsets[name], FIXED)
            groups[name].members.append(Member(param, dim, index, kind, node, role))
    for name, g in groups.items():
        off = offsets[name]
        g.pinned = pinned[off:off + g.size].clone()
        g.pins = pins_of[name]

    for node in a.gm.graph.nodes:
        if "fxprune" in node.meta:
            node.meta["fxprune"] = map_aggregate(node.meta["fxprune"], lambda lab: _to_channels(lab, channel_of))
    costs = {k: [_to_channels(v, channel_of) for v in vs] for k, vs in a.costs.items()}
    graph = ChannelGraph(a.gm, groups, channel_of, offsets, {}, example_inputs)
    graph.param_channels = param_channels
    graph.param_kinds = param_kinds
    graph.costs = costs
    graph.node_flops = {n.name: n.meta["flops"] for n in a.gm.graph.nodes if n.meta.get("flops")}
    return graph


def _to_channels(label, channel_of):
    if not isinstance(label, torch.Tensor):
        return label
    return torch.where(label >= 0, channel_of[label.clamp(min=0)], FIXED)


def _producer_name(node: fx.Node) -> str:
    return str(node.target) if node.op == "call_module" else node.name


def _unique_name(name: str, taken) -> str:
    out, i = name, 1
    while out in taken:
        i += 1
        out = f"{name}#{i}"
    return out
