"""The coupling analysis: which channels of a traced model must be kept or removed together.

:func:`couple` walks the graph once in order. Each node's rule (looked up in
:class:`fxprune.ops.RuleTable` handed in) computes the channel label of its output from its inputs'
labels (see :mod:`fxprune.labels`), allocates fresh channel ids where a conv or linear
makes new channels, records the parameter slices that follow them (members), and
*unifies* ids that must be removed together (a residual add, a shared parameter).
A union-find over ids then yields the channel groups of :mod:`fxprune.ir`.

Example::

    >>> import torch, torchvision
    >>> from fxprune.capture import trace
    >>> from fxprune.couple import couple
    >>> from fxprune.ops import FX_RULES
    >>> net = torchvision.models.resnet18()
    >>> x = torch.randn(1, 3, 64, 64)
    >>> graph = couple(trace(net, (x,)), (x,), FX_RULES)
    >>> g = graph.groups["conv1"]       # the stem conv writes the layer1 residual stream
    >>> g.size, g.prunable
    (64, 64)
    >>> sorted(m.param for m in g.members if m.kind == "producer" and m.role == "weight")
    ['conv1.weight', 'layer1.0.conv2.weight', 'layer1.1.conv2.weight']
"""
from __future__ import annotations

import math
import operator

import numpy as np
import torch
import torch.fx as fx
from torch.fx.node import map_aggregate

from ..capture.values import meta_shapes, values_at_batch
from ..errors import ConfigError
from ..ir import ChannelGraph, ChannelGroup, Member, Pin
from ..labels import FIXED, along, collapse, collapse_array, varying
from ..ops.elementwise import elementwise, first_input
from ..ops.schema import RuleTable, T, describe, pin_all, tied

# ORT's CPU kernels run a grouped conv in their blocked layout (NCHWc: 16 channels on AVX-512, 8 on AVX2) only
# while its widths per group are multiples of the block: cut the same number from each group and it runs in
# NCHW between two reorders; ``groups="blocked"`` removes such groups whole instead. The default block when
# none is given (the pipeline asks ORT for its own: fxprune.cost.latency_table.nchwc_block)
BLOCK = 16


def widths_on_block(k_in: int, k_out: int, block: int | None) -> bool:
    """Whether a grouped conv with ``k_in`` input and ``k_out`` output channels per group runs in ORT's blocked
    layout at ``block`` (both multiples of it; None or 0: ORT blocks no grouped conv).

    >>> widths_on_block(16, 32, 16), widths_on_block(8, 8, 16), widths_on_block(8, 8, 8), widths_on_block(8, 8, None)
    (True, False, True, False)
    """
    return bool(block) and k_in % block == 0 and k_out % block == 0


class UnionFind:
    """Union-find over channel ids, vectorised with numpy; a root is always the smallest id
    of its set (so the result does not depend on the order of unions)."""

    def __init__(self, n: int = 0):
        self.parent = np.arange(max(n, 1024), dtype=np.int64)
        self.size = n
        self.version = 0  # counts the unions that merged something

    def new(self, n: int) -> torch.Tensor:
        start = self.size
        if start + n > len(self.parent):
            grown = np.arange(max(2 * len(self.parent), start + n), dtype=np.int64)
            grown[:start] = self.parent[:start]
            self.parent = grown
        self.size = start + n
        return torch.arange(start, start + n, dtype=torch.long)

    def copy(self) -> "UnionFind":
        """An independent copy (ties made on it leave this one as it is)."""
        other = UnionFind()
        other.parent, other.size, other.version = self.parent.copy(), self.size, self.version
        return other

    def find(self, ids: np.ndarray) -> np.ndarray:
        """Roots of ``ids`` (all >= 0), compressing their paths."""
        parent = self.parent
        r = parent[ids]
        while True:
            up = parent[r]
            if np.array_equal(up, r):
                break
            r = up
        parent[ids] = r
        return r

    def union(self, a: np.ndarray, b: np.ndarray) -> None:
        """Merge the sets of ``a[i]`` and ``b[i]`` for every i (all ids >= 0)."""
        while a.size:
            ra, rb = self.find(a), self.find(b)
            apart = ra != rb
            if not apart.any():
                return
            ra, rb = ra[apart], rb[apart]
            self.version += 1
            # hooking every larger root under the smallest root it meets keeps parent[i] <= i:
            # no cycles, and the next round merges what one round could not
            np.minimum.at(self.parent, np.maximum(ra, rb), np.minimum(ra, rb))
            a, b = a[apart], b[apart]

    def roots(self, ids: torch.Tensor) -> torch.Tensor:
        """Roots of a label (FIXED stays FIXED), same shape."""
        return torch.from_numpy(self.roots_array(ids.numpy()))

    def roots_array(self, ids: np.ndarray) -> np.ndarray:
        out = np.full(ids.shape, FIXED, dtype=np.int64)
        live = ids >= 0
        out[live] = self.find(ids[live])
        return out

    def all_roots(self) -> np.ndarray:
        return self.find(np.arange(self.size, dtype=np.int64))


class Context:
    """What a rule may do while the analysis visits ``node``; see :mod:`fxprune.ops`."""

    def __init__(self, analysis: "Analysis", node: fx.Node):
        self._a = analysis
        self.node = node
        self.gm = analysis.gm

    # -- facts about the node
    def module(self) -> torch.nn.Module:
        return self._a.modules[self.node.target]

    @property
    def out_shape(self):
        """The output's shape (a list of shapes for a node with several outputs)."""
        return meta_shapes(self.node)

    @staticmethod
    def shape_of(node: fx.Node):
        """A node's output shape (as :attr:`out_shape` is this node's)."""
        return meta_shapes(node)

    def rule_of(self, node: fx.Node):
        """The rule the analysis applies at ``node`` (the table's default for an op it lacks)."""
        return self._a.table.rule_for(node, self._a.modules)

    def has_param(self, name: str) -> bool:
        mod, _, attr = name.rpartition(".")
        return getattr(self._a.modules[mod], attr, None) is not None

    # -- actions
    def same_param(self, name: str) -> None:
        """The node's value is parameter ``name`` position for position (``1 + weight``,
        ``weight.float()``): its users see that parameter, so it is sliced where they make it
        a member, and the node recomputes from the slice."""
        self._a.derived[self.node] = {"param": name}

    def seeded_rows(self) -> torch.Tensor | None:
        """The ids seeded on the rows of the parameters this node's weight is computed from
        (:meth:`Analysis.seed_rows`), or None: the rule either takes them (:meth:`take_rows`) or pins them."""
        seed = self._a.row_seeds.get(self.node)
        return None if seed is None else seed[0]

    def take_rows(self) -> torch.Tensor:
        """The seeded ids (:meth:`seeded_rows`) are channels this node makes; the parameters' rows follow them."""
        ids, params = self._a.row_seeds.pop(self.node)
        self._a.blocks.append((self.node, ids))
        for param in params:
            self.member(param, 0, ids, "producer", "weight source")
        return ids

    def transposed_param(self, name: str) -> None:
        """The node's value is parameter ``name`` with its last two dims swapped (Falcon's ``x @ weight.T``, a
        mixture of experts' ``weight.transpose(-2, -1)``): a rule that takes it
        (:func:`fxprune.ops.attention.matmul_rule`) makes that parameter a member, dims swapped."""
        self._a.derived[self.node] = {"transposed": name}

    def fresh(self, n: int) -> torch.Tensor:
        """New channel ids made by this node (a conv's or linear's output channels)."""
        ids = self._a.uf.new(n)
        self._a.blocks.append((self.node, ids))
        return ids

    def roots(self, label):
        return None if label is None else self._a.uf.roots(label)

    def canonical(self, label):
        """``collapse(self.roots(label))``: the label in its smallest form, with current roots."""
        return None if label is None else self._a.collapsed_roots(label)

    def unify(self, a: torch.Tensor, b: torch.Tensor, reason: str) -> torch.Tensor:
        """Make the ids of ``a`` and ``b`` (broadcast together) the same channels.

        Where one side is FIXED the other side's id is pinned with ``reason``. Returns
        the combined label.
        """
        a, b = torch.broadcast_tensors(a, b)
        x, y = a.reshape(-1).numpy(), b.reshape(-1).numpy()
        both = (x >= 0) & (y >= 0)
        self._a.uf.union(x[both], y[both])
        one = (x >= 0) ^ (y >= 0)
        if one.any():
            self.pin(torch.from_numpy(np.maximum(x[one], y[one])), reason)
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
        # not copied: labels are never written in place, and members sharing one label (a conv's
        # output ids: its weight rows, bias, the norm after it) are then mapped once (_build_graph)
        self._a.members.append((param, dim, ids.reshape(-1), kind, role, self.node.name))

    def computed(self, node: fx.Node, dim: int, ids: torch.Tensor, kind: str) -> None:
        """Record that the value of ``node`` (a weight computed from parameters at run time) has slices along
        ``dim`` that follow ``ids``: not a parameter to slice, but what magnitude criteria score the channels by
        (:attr:`fxprune.ir.ChannelGroup.computed`)."""
        self._a.computed.append((node.name, dim, ids.reshape(-1), kind))

    def balance(self, blocks: torch.Tensor, whole: bool = True) -> None:
        """The rows of ``blocks`` (ids ``[B, k]``) must keep equal counts, at free positions in each row.

        Resolved once the walk is done (:func:`_resolve_balances`): where the rows are not exactly the
        channels of one group, or a group gets two different partitions, each row's ``j``-th channel is
        tied to the others' instead (exact, but it gives up the choice of positions). Rows that other ties
        made whole channels go whole (heads), unless ``whole`` is False (a grouped conv, whose rewrite keeps
        its groups): their columns are then tied too.
        """
        self._a.balances.append((blocks.clone(), self.node.name, whole))

    def count_multiple(self, ids: torch.Tensor, multiple: int) -> None:
        """The groups of ``ids`` keep a multiple of ``multiple`` channels, or all of them (a kernel's alignment:
        :attr:`fxprune.ir.ChannelGroup.multiple`)."""
        self._a.multiples.append((ids.reshape(-1), multiple))

    def heads(self, blocks: torch.Tensor) -> bool:
        """A reshape split one channel dim into ``blocks`` (ids ``[..., heads, dims]``: attention heads
        ahead of the dims of each, maybe after a packing dim such as q/k/v's ``3``). By default
        (``heads="dims"``) every head keeps the same number of dims at its own positions (:meth:`balance`;
        a 2-d ``blocks`` only, else False: not taken). With ``heads="whole"`` each head is one channel,
        kept or removed whole with its ``head_dim``, the same head of every packed part with it."""
        if self._a.heads == "whole":
            rows = blocks.reshape(-1, *blocks.shape[-2:])
            self.unify(rows[:1, :, :1], rows, f"'{self.node.name}' splits channels into heads, pruned whole")
            return True
        if blocks.dim() != 2:
            return False
        self.balance(blocks)
        return True

    def grouped_conv(self, ins: torch.Tensor, outs: torch.Tensor, whole, balanced) -> None:
        """A grouped conv's channels (ids ``[groups, k]`` of its input and output), coupled one of two ways:
        ``whole()`` (each group is one channel, kept or removed whole) or ``balanced()`` (each group keeps
        the same count). Whole groups (``groups="whole"``, or ``"blocked"`` for groups whose widths are
        multiples of the analysis' ``block``, see :func:`couple`) wait for the walk's end
        (:meth:`Analysis.choose_groups`): they stay whole unless other ties put channels of two groups
        together (a channel shuffle), where whole groups would tie every group into one."""
        mode = self._a.groups
        self.node.meta["fxprune_widths_per_group"] = (ins.shape[1], outs.shape[1])   # for groups="auto"
        on_block = widths_on_block(ins.shape[1], outs.shape[1], self._a.block)
        if mode == "whole" or mode == "blocked" and on_block:
            self._a.grouped_convs.append((ins.clone(), outs.clone(), whole, balanced))
        else:
            balanced()

    def grouped_member(self, param: str, dim: int, blocks: torch.Tensor) -> None:
        """``param``'s positions along ``dim`` are read per group: column ``j`` of group ``b`` (rows
        ``b * rows // B ...``) reads id ``blocks[b, j]`` (a grouped convolution's weight)."""
        self._a.grouped.append((param, dim, blocks.clone()))

    def known(self, node):
        """What the analysis holds for an earlier ``node`` (a :class:`T`, a plain value); ``None`` if not visited."""
        return self._a.env.get(node)

    def later_label(self, node: fx.Node, label: torch.Tensor) -> None:
        """The label of a later ``node``, decided here (a channel permutation spread over several ops)."""
        self._a.later[node] = label

    def fix_param(self, param: str, reason: str) -> None:
        """``param`` is used whole somewhere: every slice of it must stay."""
        self._a.fixed_params.append((param, Pin(self.node.name, reason)))

    def cost(self, *labels, share: float | None = None) -> None:
        """Say whose kept fractions scale this node's FLOPs (default: its output label): the
        count is multiplied by the kept fraction of each label. With ``share``, only that
        share of the count scales so; calls with shares add up (attention: projections
        scale with the width squared, ``q @ k^T`` with the width)."""
        term = (1.0 if share is None else share, [lab.flatten().clone() for lab in labels if lab is not None])
        if share is None:
            self._a.costs[self.node.name] = [term]
        else:
            self._a.costs.setdefault(self.node.name, []).append(term)


class Analysis:
    def __init__(self, gm: fx.GraphModule, table: RuleTable, heads: str = "dims", example_inputs: tuple = (),
                 groups: str = "balanced", block: int = BLOCK):
        self.table = table
        self.block = block
        self.example_inputs = example_inputs
        self._at_batch: dict | None = None
        self.heads = heads
        self.groups = groups
        self.gm = gm
        self.uf = UnionFind()
        self.blocks: list[tuple[fx.Node, torch.Tensor]] = []
        self.pins: list[tuple[torch.Tensor, Pin]] = []
        self.members: list[tuple] = []
        self.fixed_params: list[tuple[str, Pin]] = []
        self.balances: list[tuple[torch.Tensor, str, bool]] = []
        self.multiples: list[tuple[torch.Tensor, int]] = []   # (ids, count multiple): see Context.count_multiple
        self.later: dict[fx.Node, torch.Tensor] = {}
        self.grouped: list[tuple[str, int, torch.Tensor]] = []
        self.grouped_convs: list[tuple] = []  # (input ids, output ids, whole, balanced): see Context.grouped_conv
        self.computed: list[tuple[str, int, torch.Tensor, str]] = []
        self.costs: dict[str, list[tuple[float, list[torch.Tensor]]]] = {}
        self.env: dict[fx.Node, object] = {}
        self.recomputed_sizes: list[tuple] = []  # (node, its value, dim, size node): see sizes_on_dims_left_whole
        self._canonical: dict[int, tuple[torch.Tensor, int]] = {}  # id -> (label, union-find version)
        self.modules = dict(gm.named_modules())
        self.params = {f"{prefix}.{name}" if prefix else name: tensor  # every name, shared ones too
                       for prefix, module in self.modules.items()
                       for tensors in (module._parameters, module._buffers)
                       for name, tensor in tensors.items() if tensor is not None}
        self.sources: dict[fx.Node, object] = {}
        self.derived: dict[fx.Node, dict] = {}  # nodes that stand for a parameter: their T's fields (same_param, ...)
        self.row_seeds: dict[fx.Node, tuple[torch.Tensor, list[str]]] = {}  # conv node -> (ids, parameters)
        self.row_labels: dict[fx.Node, torch.Tensor] = {}  # get_attr node -> ids of its rows

    def run(self) -> None:
        self.seed_rows()
        for node in self.gm.graph.nodes:
            self.env[node] = self.visit(node)
        self.choose_groups()
        self.sizes_on_dims_left_whole()
        self.sizes_checked_by_asserts()
        for node in list(self.row_seeds):  # a rule that never took its seed (it pinned the node): kept whole
            ctx = Context(self, node)
            ctx.pin(ctx.take_rows(), f"{describe(node, self.gm)} could not take the rows of its computed weight")

    def choose_groups(self) -> None:
        """Couple each grouped conv (:meth:`Context.grouped_conv`) by whole groups where that keeps its groups
        apart, else by balanced counts. Tried on a copy of the ties, all whole at once: where that puts two
        groups of one conv together (a channel shuffle between two grouped convs), every conv whose channels
        meet those is balanced (whole groups there would tie all of them into one channel)."""
        trial = self.uf.copy()
        rows = [torch.cat([ins, outs], 1).numpy() for ins, outs, _, _ in self.grouped_convs]
        for ids in rows:
            if (ids >= 0).all():
                trial.union(np.broadcast_to(ids[:, :1], ids.shape).ravel(), ids.ravel())
        roots = [np.where(ids >= 0, trial.find(np.maximum(ids, 0).ravel()).reshape(ids.shape), FIXED) for ids in rows]
        clashed = [ids.min() < 0 or len(np.unique(r[:, 0])) < len(r) for ids, r in zip(rows, roots)]
        mixed = np.concatenate([r[r >= 0] for r, c in zip(roots, clashed) if c] or [np.zeros(0, dtype=np.int64)])
        for (ins, outs, whole, balanced), r, c in zip(self.grouped_convs, roots, clashed):
            (balanced if c or np.isin(r, mixed).any() else whole)()

    def seed_rows(self) -> None:
        """Label the rows of parameters a conv's weight is computed from (timm's ``StdConv2d``: the weight
        standardised at every call) with the conv's output channels, before the walk, so that the rules
        on the way from the parameters to the weight carry them: where they arrive as the weight's rows,
        the parameters are sliced by rows like any conv weight (:meth:`Context.seeded_rows`).

        A parameter is seeded when its first dim is the weight's row count, the weight depends on
        parameters and buffers alone (never on the model's inputs) and nothing else reads the parameter."""
        for node in self.gm.graph.nodes:
            if node.op != "call_function":
                continue
            rows = self.table.rule_for(node, self.modules).weight_rows
            weight = rows(node) if rows is not None else None
            shape = meta_shapes(weight) if isinstance(weight, fx.Node) else None
            if weight is None or self.stands_for_parameter(weight) or not isinstance(shape, tuple) or len(shape) < 2:
                continue
            within: set = set()
            sources = _parameter_sources(weight, self.params, within)
            seeded = [s for s in sources or () if s not in self.row_labels and all(u in within for u in s.users)
                      and self.params[s.target].dim() >= 1 and self.params[s.target].shape[0] == shape[0]]
            if seeded:
                ids = self.uf.new(shape[0])
                self.row_seeds[node] = (ids, sorted({s.target for s in seeded}))
                self.row_labels.update(dict.fromkeys(seeded, ids))

    def stands_for_parameter(self, node: fx.Node) -> bool:
        """Whether ``node`` is a parameter, or one parameter through same-position ops that keep its shape
        (``weight.float()``): the rules take it as that parameter (:func:`~fxprune.ops.elementwise.derives_param`),
        sliced along every dim, so it needs no seed."""
        while node.op != "get_attr":
            inputs = node.all_input_nodes
            if len(inputs) != 1 or meta_shapes(node) != meta_shapes(inputs[0]) or \
                    self.table.rule_for(node, self.modules).couple not in (elementwise, first_input):
                return False
            node = inputs[0]
        return True

    def visit(self, node: fx.Node):
        if node.op == "placeholder":
            return self.as_t(node, None)
        if node.op == "get_attr":
            value = self.params.get(node.target)
            if node in self.row_labels:  # rows seeded with a conv's output channels (seed_rows)
                return self.as_t(node, self.row_labels[node].reshape((-1,) + (1,) * (value.dim() - 1)))
            if isinstance(value, torch.Tensor):
                return T(None, tuple(value.shape), node.target)
            return node.meta.get("value")
        if meta_shapes(node) is None and node.op != "output":
            return node.meta.get("value", _OPAQUE)  # sizes, ints: plain values, no channels
        args = map_aggregate(node.args, self.lookup)
        kwargs = map_aggregate(node.kwargs, self.lookup)
        ctx = Context(self, node)
        rule = self.table.rule_for(node, self.modules)
        if self.balances and not rule.grids:  # a grid label is only made with a balance: none yet, no grid to tie
            args, kwargs = map_aggregate((args, kwargs), lambda a: tied(ctx, a))
        try:
            label = rule.couple(ctx, args, kwargs)
            if node in self.later:
                label = self.later.pop(node)
            out = None if node.op == "output" else self.as_t(node, label)
            if node in self.derived:
                out = T(None, out.shape, **self.derived.pop(node))
        except Exception as exc:  # a rule that cannot handle an odd call (or returns a label that does not
            # fit the value) pins what the node touches instead of crashing
            pin_all(ctx, args, kwargs, f"{describe(node, self.gm)} could not be analysed ({type(exc).__name__}: {exc})")
            out = None if node.op == "output" else self.as_t(node, None)
        if out is not None:
            self.pin_sizes_read_from_channels(ctx, node, out)
        return out

    def size_sources(self, n: fx.Node):
        """Where a plain value of the graph was read from: ``("shape", t)`` for the shape of tensor node
        ``t``, else a set of ``(t, dim)`` (``x.size(1)``, ``c // 2``, ``h * w`` from ``n, c, h, w = x.shape``)."""
        if n in self.sources:
            return self.sources[n]
        found: object = set()
        tensor_arg = n.args[0] if n.args and isinstance(n.args[0], fx.Node) else None
        is_tensor = tensor_arg is not None and meta_shapes(tensor_arg) is not None
        if n.op == "call_function" and n.target is getattr and is_tensor and n.args[1] == "shape":
            found = ("shape", tensor_arg)
        elif n.op == "call_method" and n.target == "size" and is_tensor:
            found = ("shape", tensor_arg) if len(n.args) == 1 else {(tensor_arg, n.args[1])}
        elif n.op == "call_function" and getattr(n.target, "__name__", "") == "sym_size.int" and is_tensor:
            found = {(tensor_arg, n.args[1])}
        elif n.op == "call_function" and n.target is operator.getitem and tensor_arg is not None \
                and isinstance(self.size_sources(tensor_arg), tuple) and isinstance(n.args[1], int):
            found = {(self.size_sources(tensor_arg)[1], n.args[1])}
        elif n.op == "call_function" and n.target is operator.getitem and tensor_arg is not None \
                and isinstance(self.size_sources(tensor_arg), tuple) and isinstance(n.args[1], slice):
            t = self.size_sources(tensor_arg)[1]   # h, w = x.shape[1:3]: those dims only
            found = {(t, d) for d in range(*n.args[1].indices(len(meta_shapes(t) or ())))}
        else:
            for a in n.all_input_nodes:
                if meta_shapes(a) is None:
                    src = self.size_sources(a)
                    found |= set((src[1], d) for d in range(len(meta_shapes(src[1]) or ()))) \
                        if isinstance(src, tuple) else src
        if not isinstance(found, tuple):
            found = {(t, d % max(len(meta_shapes(t) or ()), 1)) for t, d in found if isinstance(d, int)}
        self.sources[n] = found
        return found

    def pin_sizes_read_from_channels(self, ctx: "Context", node: fx.Node, out) -> None:
        """A size read from a dim that carries channels, used by another op, ties that op to the channel
        count: where the rewrite does not recompute the size (view/reshape/expand recompute it on dims whose
        output carries channels), those channels are pinned, unless the size is a model constant
        (:meth:`folds_to_literal`)."""
        node.meta.pop("fxprune_fold", None)
        if node.op not in ("call_function", "call_method") or "fxprune_perm" in node.meta \
                or node.meta.get("fxprune_perm_inner"):
            return  # a channel permutation: the rewrite replaces it with an index_select
        recomputed = set()
        if node.target in ("view", "reshape", "expand") or node.target is torch.reshape or getattr(
                node.target, "__name__", "") in ("view.default", "reshape.default", "expand.default", "_unsafe_view.default"):
            sizes = list(node.args[1:])
            if len(sizes) == 1 and isinstance(sizes[0], (tuple, list)):
                sizes = list(sizes[0])
            label = out.label if isinstance(out, T) else None
            vary = varying(label) if label is not None else []
            recomputed = {id(a) for d, a in enumerate(sizes) if d in vary}
            self.recomputed_sizes += [(node, out, d, a) for d, a in enumerate(sizes)
                                      if d in vary and isinstance(a, fx.Node)]
            expand = node.target == "expand" or getattr(node.target, "__name__", "") == "expand.default"
            if len(sizes) == 1 and isinstance(sizes[0], fx.Node) and (
                    self.expanded_like(sizes[0], out) if expand else self.shaped_like(ctx, node, sizes[0], out)):
                recomputed.add(id(sizes[0]))
        plain = []
        map_aggregate((node.args, node.kwargs), lambda a: plain.append(a) if isinstance(a, fx.Node)
                      and meta_shapes(a) is None and a.op != "get_attr" else None)
        for a in plain:
            if id(a) not in recomputed:
                self.size_read(ctx, node, a)

    def size_read(self, ctx: "Context", node: fx.Node, a: fx.Node) -> None:
        """``node`` uses the number ``a`` as it is: a model constant (:meth:`folds_to_literal`), or read from
        dims that keep their size; the channels of a dim it is read from are pinned."""
        src = self.size_sources(a)
        pairs = [(src[1], d) for d in range(len(meta_shapes(src[1]) or ()))] if isinstance(src, tuple) else src
        if self.folds_to_literal(node, a, pairs):
            return
        for t, d in pairs:
            tt = self.env.get(t)
            if isinstance(tt, T) and tt.label is not None and d in varying(self.collapsed_roots(tt.label)):
                grid = len(varying(tt.label)) > 1
                ctx.pin(tt.label if grid else along(tt.label, d, tt.shape[d]),
                        f"{describe(node, self.gm)} uses a size read from dim {d} of '{t.name}', which carries these "
                        "channels")

    def sizes_on_dims_left_whole(self) -> None:
        """A size the rewrite would recompute (its dim carried channels when the walk met the op) on a dim that
        carries none in the end (tied later into whole blocks: EvoNorm's ``reshape(b, groups, c // groups, h,
        w)`` once a variance takes each group whole) is used as it is: :meth:`size_read`."""
        for node, out, d, a in self.recomputed_sizes:
            if d not in varying(self.collapsed_roots(out.label)):
                self.size_read(Context(self, node), node, a)

    def sizes_checked_by_asserts(self) -> None:
        """``torch._assert(c % groups == 0)`` (timm's EvoNorm, on ``b, c, h, w = x.shape``) checks the original's
        numbers: a number read from channel dims that only such a check uses is the original's (:meth:`size_read`:
        folded, else those channels pinned), so the pruned model passes the check where the original does."""
        for node in self.gm.graph.nodes:
            if node.op != "call_function" or node.target not in (torch._assert, torch._assert_async):
                continue
            condition, todo = {node}, [a for a in node.all_input_nodes if meta_shapes(a) is None]
            while todo:   # the plain numbers the condition is computed from
                n = todo.pop()
                if n not in condition and n.op == "call_function":
                    condition.add(n)
                    todo += [a for a in n.all_input_nodes if meta_shapes(a) is None]
            for n in condition - {node}:
                if all(u in condition for u in n.users):   # a number only the check reads
                    for a in n.all_input_nodes:
                        value = a.meta.get("value", a.meta.get("val"))
                        if meta_shapes(a) is None and isinstance(value, (int, float)) and not isinstance(value, bool):
                            self.size_read(Context(self, n), n, a)

    def shaped_like(self, ctx: "Context", node: fx.Node, size: fx.Node, out) -> bool:
        """``x.reshape(t.shape)`` (EVA's rotary) is ``x.reshape_as(t)``: the pruned model reads the pruned
        ``t``'s shape, so the result's channels are tied to ``t``'s, position by position."""
        t = self._shape_of_value(size, out)
        if t is None:
            return False
        fixed = torch.full((1,) * len(out.shape), FIXED, dtype=torch.long)
        ctx.unify(fixed if out.label is None else out.label, fixed if t.label is None else t.label,
                  f"{describe(node, self.gm)} takes its shape from a tensor whose channels differ")
        return True

    def expanded_like(self, size: fx.Node, out) -> bool:
        """``x.expand(t.shape)`` whose result carries ``t``'s channels wherever ``t`` does, and no others
        (EvoNorm's ``std.expand(x.shape)``, the std of each whole group): the pruned model reads the pruned
        ``t``'s shape, which is then the result's."""
        t = self._shape_of_value(size, out)
        if t is None or t.label is None or out.label is None:
            return False
        shape = tuple(out.shape)
        mine, theirs = self.collapsed_roots(out.label), self.collapsed_roots(t.label)
        return varying(mine) == varying(theirs) and torch.equal(mine.expand(shape), theirs.expand(shape))

    def _shape_of_value(self, size: fx.Node, out) -> T | None:
        """The value whose whole shape ``size`` is (``t.shape``), where it is ``out``'s shape too; else None."""
        src = self.size_sources(size)
        t = self.env.get(src[1]) if isinstance(src, tuple) else None
        if not isinstance(t, T) or not isinstance(out, T) or tuple(t.shape) != tuple(out.shape):
            return None
        return t

    def folds_to_literal(self, node: fx.Node, a: fx.Node, pairs) -> bool:
        """Whether ``a``, a number ``node`` reads, is computed from channel counts alone (``C // heads``,
        ``head_dim ** -0.5``): those are constants of the model, so the rewrite passes ``node`` the number the
        original computed (``node.meta["fxprune_fold"]``), which is what the masked original reads there.
        A number that also reads a size the inputs set (tokens, positions, a dim where each channel repeats over
        positions, as ``flatten`` makes it, a batch merged with heads: the number changes with the batch,
        :func:`~fxprune.capture.values.values_at_batch`) is not folded: the pruned model must still follow
        the input."""
        value = a.meta.get("value", a.meta.get("val"))
        if not pairs or isinstance(value, bool) or not isinstance(value, (int, float)):
            return False
        for t, d in pairs:
            tt = self.env.get(t)
            if not (isinstance(tt, T) and tt.label is not None and d in varying(tt.label)):
                return False
            ids = along(tt.label, d, tt.shape[d])  # channels repeated over positions come in runs (flatten)
            if bool((ids < 0).any()) or bool((ids[1:] == ids[:-1]).any()):
                return False
        if self._at_batch is None:   # a dim that merges the batch with channels (heads folded into it): one pass
            self._at_batch = values_at_batch(self.gm, self.example_inputs, self.table) or {}
        if a.name in self._at_batch and self._at_batch[a.name] != value:
            return False
        node.meta.setdefault("fxprune_fold", {})[a.name] = (value, tuple((t.name, d) for t, d in pairs))
        return True

    def lookup(self, a):
        return self.env[a] if isinstance(a, fx.Node) else a

    def collapsed_roots(self, label: torch.Tensor) -> torch.Tensor | None:
        """``collapse(self.uf.roots(label))``, collapsing first so that fewer ids are looked up.

        A label this returned is returned as it is while no union has happened since
        (most ops pass their input's label through)."""
        seen = self._canonical.get(id(label))
        if seen is not None and seen[0] is label and seen[1] == self.uf.version:
            return label
        small = collapse_array(label.numpy())
        if small is None:
            return None
        small = collapse_array(self.uf.roots_array(small))
        if small is None:
            return None
        out = torch.from_numpy(small)
        self._canonical[id(out)] = (out, self.uf.version)
        return out

    def as_t(self, node: fx.Node, label):
        shapes = meta_shapes(node)

        def build(shape, lab):
            if shape is None:
                return None
            lab = self.collapsed_roots(lab) if isinstance(lab, torch.Tensor) else None
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


def _parameter_sources(node: fx.Node, params: dict, seen: set) -> list[fx.Node] | None:
    """The ``get_attr`` nodes of tensors that ``node`` is computed from, or None where it depends on
    anything else (an input of the model); ``seen`` collects ``node`` and the nodes it is computed by."""
    found, todo = [], [node]
    while todo:
        n = todo.pop()
        if n in seen:
            continue
        seen.add(n)
        if n.op == "get_attr":
            if isinstance(params.get(n.target), torch.Tensor):
                found.append(n)
            continue
        if n.op not in ("call_function", "call_method"):
            return None
        todo.extend(n.all_input_nodes)
    return found


HEADS = ("dims", "whole")
GROUPS = ("balanced", "blocked", "whole")


def couple(gm: fx.GraphModule, example_inputs: tuple, table: RuleTable, heads: str = "dims",
           groups: str = "balanced", block: int = BLOCK) -> ChannelGraph:
    """Analyse a traced, shape-annotated module (see :func:`fxprune.capture.trace`).

    ``heads`` says what a reshape into attention heads (``view(b, n, heads, head_dim)``) prunes:
    ``"dims"`` each head's dims, equal counts per head (:meth:`Context.balance`), or ``"whole"``
    heads (:meth:`Context.heads`). ``groups`` says what a grouped conv loses: ``"balanced"`` the same
    number of channels from each group, ``"whole"`` whole groups (``groups`` shrinks, each group keeps its
    width), ``"blocked"`` whole groups where their widths are multiples of ``block`` (ORT's NCHWc block),
    balanced counts elsewhere (:meth:`Context.grouped_conv`)."""
    if heads not in HEADS:
        raise ConfigError(f"heads must be one of {HEADS}, not {heads!r}")
    if groups not in GROUPS:
        raise ConfigError(f"groups must be one of {GROUPS}, not {groups!r}")
    if not isinstance(block, int) or block < 1:
        raise ConfigError(f"block must be a positive int (ORT's NCHWc block, e.g. 16 or 8), not {block!r}")
    a = Analysis(gm, table, heads, example_inputs, groups, block)
    a.run()
    _consolidate_members(a)
    balanced = _resolve_balances(a)
    graph = _build_graph(a, example_inputs, balanced)
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


def _consolidate_members(a: Analysis) -> None:
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


def _group_tops(a: Analysis, root: np.ndarray):
    """``(top, block_of_id, roots_in_blocks)``: each fresh block's group (its first block), each id's
    block, and each id's root (ids in allocation order)."""
    n_ids = a.uf.size
    n_blocks = len(a.blocks)
    block_of_id = np.concatenate([np.full(ids.numel(), b, dtype=np.int64) for b, (_, ids) in enumerate(a.blocks)]
                                 or [np.zeros(0, dtype=np.int64)])
    roots_in_blocks = root[np.concatenate([ids.numpy() for _, ids in a.blocks] or [np.zeros(0, dtype=np.int64)])]
    first_block = np.full(n_ids, n_blocks, dtype=np.int64)
    np.minimum.at(first_block, roots_in_blocks, block_of_id)
    blocks_uf = UnionFind(n_blocks)
    blocks_uf.union(block_of_id, first_block[roots_in_blocks])
    return blocks_uf.find(np.arange(n_blocks, dtype=np.int64)), block_of_id, roots_in_blocks


def _resolve_balances(a: Analysis) -> list[np.ndarray]:
    """The balance constraints (:meth:`Context.balance`) that stand, as root ids ``[B, k]``, one per group.

    A group's constraints stand where each holds distinct live channels, different constraints hold
    disjoint ones with blocks of one length, and together they are exactly the group's channels (the
    heads of q/k and of v split from one packed projection); their blocks then make one partition.
    Every other constraint is made exact by tying column ``j`` of its rows together (as a channel
    shuffle does), and the check runs again, as ties merge groups.
    """
    pending, not_whole = [], set()
    for c, node, whole in a.balances:
        c = c.numpy()
        if (c < 0).any() and (c >= 0).any():  # fixed and live ids in one constraint: keep all of them
            a.pins.append((torch.from_numpy(np.unique(c[c >= 0])), Pin(node, "a grouped layer reads them with fixed channels")))
        elif c.size and (c >= 0).all() and c.shape[0] > 1:
            if not whole:
                not_whole.add(id(c))
            pending.append(c)
    while pending:
        root = a.uf.all_roots()
        top, block_of_id, roots_in_blocks = _group_tops(a, root)
        group_of_root = np.full(a.uf.size, -1, dtype=np.int64)
        group_of_root[roots_in_blocks] = top[block_of_id]
        is_root = (root == np.arange(a.uf.size)) & (group_of_root >= 0)
        channels_of_group = np.bincount(group_of_root[is_root], minlength=max(len(a.blocks), 1))
        by_group: dict[int, dict] = {}
        bad: list[int] = []
        for i, c in enumerate(pending):
            r = root[c]
            if np.array_equal(r, np.broadcast_to(r[:1], r.shape)):  # already tied column by column
                continue
            if np.array_equal(r, np.broadcast_to(r[:, :1], r.shape)):  # each block tied whole: blocks go whole
                if id(c) in not_whole:
                    bad.append(i)
                continue
            g = np.unique(group_of_root[r])
            if len(g) != 1 or len(np.unique(r)) != r.size:
                bad.append(i)
                continue
            key = tuple(sorted(tuple(sorted(row)) for row in r.tolist()))
            by_group.setdefault(int(g[0]), {}).setdefault(key, []).append(i)
        standing: dict[int, np.ndarray] = {}
        for g, by_key in by_group.items():
            rows = [root[pending[found[0]]] for found in by_key.values()]
            ids = np.concatenate([r.reshape(-1) for r in rows])
            if len({r.shape[1] for r in rows}) != 1 or len(np.unique(ids)) != ids.size or \
                    ids.size != channels_of_group[g]:
                bad += [i for found in by_key.values() for i in found]
            else:
                standing[g] = np.concatenate(rows)
        if not bad:
            return list(standing.values())
        for i in bad:
            c = pending[i]
            a.uf.union(np.broadcast_to(c[:1], c.shape).reshape(-1).copy(), c.reshape(-1).copy())
        pending = [c for i, c in enumerate(pending) if i not in set(bad)]
    return []


def _build_graph(a: Analysis, example_inputs, balanced=()) -> ChannelGraph:
    n_ids = a.uf.size
    root = a.uf.all_roots()

    # Blocks (fresh allocations) that share a channel belong to one group: link each block
    # to the first block that holds each of its roots; a group's top is its first block.
    n_blocks = len(a.blocks)
    top, block_of_id, roots_in_blocks = _group_tops(a, root)

    # Name each group after its first producer; number channels group by group, in the
    # order their roots first appear among the group's blocks.
    groups: dict[str, ChannelGroup] = {}
    name_of_top: dict[int, str] = {}
    for (node, _), t in zip(a.blocks, top.tolist()):
        if t not in name_of_top:
            name_of_top[t] = _unique_name(_producer_name(node), groups)
            groups[name_of_top[t]] = ChannelGroup(name=name_of_top[t], size=0)
    rank_of_top = np.zeros(max(n_blocks, 1), dtype=np.int64)
    rank_of_top[list(name_of_top)] = np.arange(len(name_of_top))
    order = np.argsort(rank_of_top[top[block_of_id]], kind="stable")
    uniq, first_seen = np.unique(roots_in_blocks[order], return_index=True)
    by_appearance = np.argsort(first_seen)
    channel_of_root = np.full(n_ids, FIXED, dtype=np.int64)
    channel_of_root[uniq[by_appearance]] = np.arange(len(uniq))
    group_of_channel_np = rank_of_top[top[block_of_id[order][np.sort(first_seen)]]]
    sizes = np.bincount(group_of_channel_np, minlength=len(groups))
    offsets: dict[str, int] = {}
    next_channel = 0
    for name, size in zip(groups, sizes.tolist()):
        offsets[name] = next_channel
        groups[name].size = size
        next_channel += size
    channel_of = torch.from_numpy(channel_of_root[root])
    group_of_channel = torch.from_numpy(group_of_channel_np)
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

    # every member's ids -> global channels -> owning group, in one pass over all members
    param_channels: dict[tuple[str, int], torch.Tensor] = {}
    param_kinds: dict[tuple[str, int], str] = {}
    channel_np = channel_of.numpy()
    slots: list[int] = []  # each member's index among the distinct labels
    if a.members:
        # each distinct label once (many members share one: a conv's rows, its bias, the norm after it)
        slot_of: dict[tuple, int] = {}
        distinct: list[torch.Tensor] = []
        for m in a.members:
            key = (m[2].data_ptr(), m[2].numel(), m[2].stride(0))  # 1-D and alive: one key, one content
            slots.append(slot_of.setdefault(key, len(distinct)))
            if len(distinct) == slots[-1]:
                distinct.append(m[2])
        sizes = np.array([d.numel() for d in distinct])
        starts = np.concatenate([[0], np.cumsum(sizes)])
        ids = np.concatenate([d.numpy() for d in distinct] + [np.full(1, FIXED)])  # a sentinel:
        # reduceat needs every start inside the array
        ch_all = np.where(ids >= 0, channel_np[np.maximum(ids, 0)], FIXED)
        owner_all = np.where(ch_all >= 0, group_of_channel_np[np.maximum(ch_all, 0)], -1)
        offset_of_group = np.array([offsets[n] for n in names] or [0], dtype=np.int64)
        index_all = np.where(owner_all >= 0, ch_all - offset_of_group[np.maximum(owner_all, 0)], FIXED)
        lo = np.minimum.reduceat(np.where(owner_all >= 0, owner_all, np.iinfo(np.int64).max), starts[:-1])
        hi = np.maximum.reduceat(owner_all, starts[:-1])
        hi[sizes == 0] = -1  # reduceat gives an empty label its neighbour's value
        channels = [torch.from_numpy(ch_all[s:e]) for s, e in zip(starts[:-1].tolist(), starts[1:].tolist())]
    for (param, dim, _, kind, role, node), j in zip(a.members, slots):
        param_channels.setdefault((param, dim), channels[j])
        if kind == "consumer" or (param, dim) not in param_kinds:  # a tied table that is read too: the masked
            param_kinds[(param, dim)] = kind  # reference zeroes its removed slices (what the pruned model lacks)
        if hi[j] < 0:  # no position of this member is a channel
            continue
        owner, index = owner_all[starts[j]:starts[j + 1]], index_all[starts[j]:starts[j + 1]]
        for gi in ([int(hi[j])] if lo[j] == hi[j] else np.unique(owner[owner >= 0]).tolist()):
            mine = index if lo[j] == hi[j] else np.where(owner == gi, index, FIXED)
            groups[names[gi]].members.append(Member(param, dim, torch.from_numpy(mine), kind, node, role))
    for value, dim, ids, kind in a.computed:  # computed weights' slices: scored, not sliced
        ids = ids.numpy()
        ch = np.where(ids >= 0, channel_np[np.maximum(ids, 0)], FIXED)
        owner = np.where(ch >= 0, group_of_channel_np[np.maximum(ch, 0)], -1)
        for gi in np.unique(owner[owner >= 0]).tolist():
            index = np.where(owner == gi, ch - offsets[names[gi]], FIXED)
            groups[names[gi]].computed.append(Member(value, dim, torch.from_numpy(index), kind, value))
    for name, g in groups.items():
        off = offsets[name]
        g.pinned = pinned[off:off + g.size].clone()
        g.pins = pins_of[name]
    for r in balanced:
        ch = torch.from_numpy(channel_of_root[r])
        name = names[int(group_of_channel[ch[0, 0]])]
        groups[name].blocks = ch - offsets[name]
    for ids, multiple in a.multiples:
        ch = channel_of[ids[ids >= 0]]
        for gi in torch.unique(group_of_channel[ch[ch >= 0]]).tolist():
            g = groups[names[gi]]
            g.multiple = math.lcm(g.multiple, multiple)
    grouped_params = {}
    for param, dim, ids in a.grouped:
        grouped_params.setdefault((param, dim), torch.where(ids >= 0, channel_of[ids.clamp(min=0)], FIXED))

    labeled = [n for n in a.gm.graph.nodes if "fxprune" in n.meta]
    relabel = _Relabel(channel_np, [n.meta["fxprune"] for n in labeled] + list(a.costs.values()))
    for node in labeled:  # collapsed again: ties made after a node was visited can make its label constant along a dim
        node.meta["fxprune"] = relabel(node.meta["fxprune"], collapsed=True)
    costs = {k: [(share, [relabel(v) for v in vs]) for share, vs in terms] for k, terms in a.costs.items()}
    node_flops = {n.name: n.meta["flops"] for n in a.gm.graph.nodes if n.meta.get("flops")}
    return ChannelGraph(a.gm, groups, channel_of, offsets, node_flops, example_inputs,
                        param_channels=param_channels, param_kinds=param_kinds, costs=costs, table=a.table,
                        grouped_params=grouped_params)


class _Relabel:
    """Maps every label tensor inside some nested values from union-find ids to global
    channels, all in one numpy lookup (hundreds of small labels, many of them one tensor
    passed through several nodes: each is mapped once); calling it on one of those values
    returns it with its labels replaced, same structure, each also collapsed with
    ``collapsed=True`` (:func:`~fxprune.labels.collapse`, once per label)."""

    def __init__(self, channel_of: np.ndarray, values: list):
        labels: dict[int, torch.Tensor] = {}
        map_aggregate(values, lambda v: labels.setdefault(id(v), v) if isinstance(v, torch.Tensor) else None)
        self.mapped: dict[int, torch.Tensor] = {}
        self._collapsed: dict[int, torch.Tensor | None] = {}
        if labels:
            ids = np.concatenate([lab.numpy().reshape(-1) for lab in labels.values()])
            channels = np.where(ids >= 0, channel_of[np.maximum(ids, 0)], FIXED)
            ends = np.cumsum([lab.numel() for lab in labels.values()]).tolist()
            for (key, lab), start, end in zip(labels.items(), [0] + ends, ends):
                self.mapped[key] = torch.from_numpy(channels[start:end].reshape(lab.shape))
        self._labels = labels  # keeps the ids above from being reused while ``mapped`` is keyed on them

    def __call__(self, value, collapsed: bool = False):
        return map_aggregate(value, lambda v: (self._collapse(v) if collapsed else self.mapped[id(v)])
                             if isinstance(v, torch.Tensor) else v)

    def _collapse(self, label: torch.Tensor) -> torch.Tensor | None:
        key = id(label)
        if key not in self._collapsed:
            self._collapsed[key] = collapse(self.mapped[key])
        return self._collapsed[key]


def _producer_name(node: fx.Node) -> str:
    """The module that makes a group's channels: the called module, or (an exported ATen graph, whose
    nodes carry ``nn_module_stack``) the module that owns the parameter the op reads; else the node's name."""
    if node.op == "call_module":
        return str(node.target)
    if node.meta.get("nn_module_stack"):  # the module that owns the weight the op reads
        owner = next((str(a.target).rpartition(".")[0] for a in node.all_input_nodes if a.op == "get_attr"), "")
        if owner:
            return owner
    return node.name


def _unique_name(name: str, taken) -> str:
    out, i = name, 1
    while out in taken:
        i += 1
        out = f"{name}#{i}"
    return out
