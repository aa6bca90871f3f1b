"""The channel-group IR: what :func:`fxprune.analyze` produces and method passes read.

A :class:`ChannelGroup` is a set of channel positions that must be kept or removed
together. Index ``i`` of a group names one channel across all of its
:class:`Member` s: the parameter slices that produce it (conv ``weight[i]``, BN
``running_mean[i]``, ...) and those that consume it (conv ``weight[:, i]``,
a linear's columns after a flatten). A :class:`Pin` is a reason that some channels
of a group cannot be removed.

This module imports nothing else of fxprune: method passes depend on it alone.

Example::

    >>> import torch, fxprune
    >>> net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU(), torch.nn.Conv2d(8, 4, 1))
    >>> graph = fxprune.analyze(net, (torch.randn(1, 3, 8, 8),))
    >>> g = graph.groups["0"]
    >>> g.size, [(m.param, m.dim, m.kind) for m in g.members]
    (8, [('0.weight', 0, 'producer'), ('0.bias', 0, 'producer'), ('2.weight', 1, 'consumer')])
    >>> graph.groups["2"].pinned.all().item()   # the model output is pinned
    True
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch


@dataclass(frozen=True)
class Pin:
    """Why channels cannot be removed: ``node`` is the fx node name, ``reason`` a sentence."""

    node: str
    reason: str

    def __str__(self) -> str:
        return f"{self.node}: {self.reason}"


@dataclass
class Member:
    """One parameter (or buffer) dimension whose slices follow a group's channels.

    ``index[j]`` is the group channel that position ``j`` of ``param`` along ``dim``
    belongs to, or -1 where that position is not this group's (it belongs to another
    group, or is fixed). ``kind`` is ``"producer"`` for slices that create or ride along
    with the channel (conv/linear rows, biases, norm affine and running statistics,
    per-channel scales) and ``"consumer"`` for slices that read it (conv/linear input
    columns). ``node`` is the fx node that uses the slice; ``role`` says what the
    parameter is: ``"weight"``, ``"bias"``, ``"norm_weight"``, ``"norm_bias"``,
    ``"running_mean"``, ``"running_var"`` or ``"scale"`` (a per-channel multiplier).
    """

    param: str
    dim: int
    index: torch.Tensor
    kind: str
    node: str
    role: str = "weight"
    _covers: tuple | None = field(default=None, init=False, repr=False, compare=False)

    def positions(self) -> torch.Tensor:
        """Positions along ``dim`` that belong to this group."""
        return torch.nonzero(self.index >= 0).flatten()

    def covers(self, size: int) -> bool:
        """Whether position ``i`` holds channel ``i`` for every channel of a group of ``size``."""
        if self._covers is None or self._covers[0] != size:
            self._covers = (size, len(self.index) == size and bool(np.array_equal(self.index.numpy(), np.arange(size))))
        return self._covers[1]


@dataclass
class ChannelGroup:
    """Channels kept or removed together; see the module docstring."""

    name: str
    size: int
    members: list[Member] = field(default_factory=list)
    pins: list[Pin] = field(default_factory=list)
    pinned: torch.Tensor = None  # bool[size]: channels that must stay
    approximate: bool = False
    #: balanced blocks: None, or an int64 tensor ``[B, k]`` of this group's channel indices (every channel
    #: exactly once) whose rows must keep equal counts, at positions free within each row (the input
    #: channels of each group of a grouped convolution)
    blocks: torch.Tensor | None = None
    #: the kept count is a multiple of this, or the whole group: what a kernel needs of the widths it runs on
    #: (``grouped_mm``'s rows are 16-byte aligned: a multiple of 8 channels at 16 bits and up)
    multiple: int = 1
    #: slices of weights computed at run time (timm's standardised convs): ``Member``s whose ``param`` names the
    #: node computing the weight (:meth:`ChannelGraph.computed_value`); magnitude criteria score by them, the
    #: rewrite reads the weight at the kept positions instead of slicing it
    computed: list[Member] = field(default_factory=list)

    def balanced(self, keep) -> bool:
        """Whether a bool keep-mask over this group's channels keeps as many channels in every block.

        >>> g = ChannelGroup("g", 4, blocks=torch.tensor([[0, 1], [2, 3]]))
        >>> g.balanced(torch.tensor([True, False, False, True])), g.balanced(torch.tensor([True, True, False, True]))
        (True, False)
        """
        if self.blocks is None:
            return True
        counts = torch.as_tensor(keep)[self.blocks].sum(1)
        return bool((counts == counts[0]).all())

    @property
    def producers(self) -> list[str]:
        return _unique(m.node for m in self.members if m.kind == "producer")

    @property
    def consumers(self) -> list[str]:
        return _unique(m.node for m in self.members if m.kind == "consumer")

    @property
    def prunable(self) -> int:
        """How many channels may be removed (the unpinned ones)."""
        cached = self.__dict__.get("_prunable")
        if cached is None or cached[0] is not self.pinned:  # counted again when ``pinned`` is replaced
            cached = self.__dict__["_prunable"] = (self.pinned, int((~self.pinned).sum()))
        return cached[1]

    def reduce(self, per_position, member: Member, op: str = "sum") -> torch.Tensor:
        """Fold one value per position of ``member`` into one value per group channel.

        ``per_position`` is a 1-D tensor as long as the member's dimension; positions
        outside the group are skipped. A channel read at several positions (a flatten
        into a linear, ``cat([x, x])``) gets the sum (``op="sum"``) or max of them.
        """
        if member.covers(self.size):
            return per_position.clone()
        out = torch.zeros(self.size, dtype=per_position.dtype)
        keep = member.index >= 0
        idx, val = member.index[keep], per_position[keep]
        if op == "sum":
            return out.index_add_(0, idx, val)
        return out.index_reduce_(0, idx, val, "amax", include_self=False)

    def __repr__(self) -> str:
        state = "pinned" if self.prunable == 0 else f"{self.prunable} prunable"
        return f"ChannelGroup({self.name!r}, size={self.size}, {state}, members={len(self.members)})"


class ChannelGraph:
    """The result of the coupling analysis of one captured module.

    Fields:

    * ``module``: the analysed ``GraphModule``; it shares the user's submodules and
      parameters (fxprune never writes to them; the rewrite copies what it keeps);
    * ``groups``: group name -> :class:`ChannelGroup`, in graph order;
    * ``channel_of``: the analysis' internal channel ids -> global channel index; group
      ``g`` holds global indices ``offsets[g] ... offsets[g] + g.size - 1``; -1 means fixed;
    * ``offsets``: group name -> its first global channel index;
    * ``node_flops``: node name -> FLOPs of that node in the unpruned model;
    * ``example_inputs``: the inputs the model was captured with;
    * ``param_channels``: (parameter name, dim) -> global channel of each position (-1: fixed);
    * ``param_kinds``: (parameter name, dim) -> ``"producer"`` or ``"consumer"``;
    * ``grouped_params``: (parameter name, dim) -> int64 ``[groups, k]``: the global channel (-1: fixed)
      that input column ``j`` of each group of a grouped convolution reads (``weight[:, j]`` of that
      group's rows); the rewrite keeps each group's own columns (see :class:`ChannelGroup` ``blocks``);
    * ``costs``: node name -> ``[(share, [labels])]``: whose kept fractions scale the node's
      FLOPs (see :class:`fxprune.cost.flops.CostModel`);
    * ``table``: the op-rules table (:class:`fxprune.ops.RuleTable`) of the graph's dialect,
      which the rewrite asks how to resize modules and fix literal arguments;
    * ``source_names``: ``id(module)`` -> qualified name, for the user's original modules;
    * ``capture``: how the model was captured (``{"tracer": ..., ...}``);
    * ``timings``: stage name -> seconds.
    """

    def __init__(self, module, groups: dict[str, ChannelGroup], channel_of: torch.Tensor,
                 offsets: dict[str, int], node_flops: dict[str, int], example_inputs: tuple, *,
                 param_channels: dict | None = None, param_kinds: dict | None = None, costs: dict | None = None,
                 table=None, grouped_params: dict | None = None):
        self.module = module
        self.groups = groups
        self.channel_of = channel_of
        self.offsets = offsets
        self.node_flops = node_flops
        self.example_inputs = example_inputs
        self.param_channels: dict[tuple[str, int], torch.Tensor] = param_channels or {}
        self.param_kinds: dict[tuple[str, int], str] = param_kinds or {}
        self.costs: dict[str, list] = costs or {}
        self.grouped_params: dict[tuple[str, int], torch.Tensor] = grouped_params or {}
        self.table = table
        self.source_names: dict[int, str] = {}
        self.capture: dict = {}
        self.timings: dict[str, float] = {}
        self.value_channel_sets: list[np.ndarray] | None = None  # filled on first use by the planner
        self._modules: tuple | None = None

    @property
    def num_channels(self) -> int:
        return int(sum(g.size for g in self.groups.values()))

    def param(self, name: str) -> torch.Tensor:
        """The analysed module's parameter or buffer called ``name``."""
        mod_name, _, attr = name.rpartition(".")
        if self._modules is None or self._modules[0] is not self.module:
            self._modules = (self.module, dict(self.module.named_modules()))
        module = self._modules[1][mod_name]
        found = module._parameters.get(attr)  # what getattr finds first, without nn.Module.__getattr__
        return found if found is not None else getattr(module, attr)

    def computed_value(self, name: str) -> torch.Tensor | None:
        """The value of node ``name`` computed from the module's parameters and buffers alone (a weight the
        model standardises at each call), or None where it reads an input."""
        nodes = {n.name: n for n in self.module.graph.nodes}
        env: dict[str, object] = {}

        def value(n):
            if n.name not in env:
                if n.op == "placeholder":
                    raise LookupError(n.name)
                args = torch.fx.node.map_arg(n.args, value)
                kwargs = torch.fx.node.map_arg(n.kwargs, value)
                if n.op == "get_attr":
                    env[n.name] = self.param(n.target)
                elif n.op == "call_function":
                    env[n.name] = n.target(*args, **kwargs)
                elif n.op == "call_method":
                    env[n.name] = getattr(args[0], n.target)(*args[1:], **kwargs)
                else:
                    env[n.name] = self.module.get_submodule(n.target)(*args, **kwargs)
            return env[n.name]

        try:
            with torch.no_grad():
                return value(nodes[name])
        except LookupError:
            return None

    def prunable_groups(self) -> list[ChannelGroup]:
        return [g for g in self.groups.values() if g.prunable > 0]

    def __repr__(self) -> str:
        n = len(self.groups)
        p = len(self.prunable_groups())
        lines = [f"ChannelGraph({n} groups, {p} prunable, {self.num_channels} channels)"]
        for g in list(self.groups.values())[:12]:
            lines.append(f"  {g!r}")
        if n > 12:
            lines.append(f"  ... {n - 12} more")
        return "\n".join(lines)


def _unique(items) -> list:
    return list(dict.fromkeys(items))
