"""The schema of the op-rules table: what a rule is, what it sees, and the table object.

A :class:`Rule` says how one kind of op moves, creates, consumes or ties channels. A
:class:`RuleTable` maps every spelling of an op (module type, function, method name,
ATen overload; a function of a package the table does not import by its qualified name,
``"timm.layers.attention.maybe_add_mask"``) to its rule, for one graph dialect; the analysis, the rewrite and shape
propagation are handed a table instead of reading a global (in the manner of
``torch/ao/quantization/backend_config``). A rule has up to four parts:

* ``couple(ctx, args, kwargs) -> label`` — at analysis time, given the inputs as
  :class:`T` (label, shape, parameter name) and plain values, return the output's label
  (see :mod:`fxprune.couple.labels`) and tell ``ctx`` (:class:`fxprune.couple.analysis.Context`)
  about new channels, members, unifications, costs and pins;
* ``fix(node, rw)`` — at rewrite time, update literal arguments that name channel
  counts (``view(-1, 512 * 7 * 7)``, ``split([32, 32])``, ``groups=``);
* ``resize(module, node, rw)`` — at rewrite time, update a module's attributes
  (``in_channels``, ``num_features``, ...) after its parameters were sliced;
* ``on_meta(module, x) -> (output, flops)`` — for a module, its output on the ``meta``
  device and its FLOPs without running it (:mod:`fxprune.capture.values`); None where the
  formula does not cover the call, which then runs on ``meta``.

An op with no entry gets the table's default rule, which pins every channel it touches
(:func:`pin_all`): it can make a model less prunable, never wrong.

Example::

    >>> import torch
    >>> table = RuleTable("demo")
    >>> relu = Rule(lambda ctx, args, kwargs: args[0].label)
    >>> table.register(relu, torch.nn.ReLU, torch.relu, "relu")
    >>> table[torch.relu] is table["relu"] is relu, torch.sigmoid in table
    (True, False)
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.fx as fx

from ..labels import varying


@dataclass
class Rule:
    """How one kind of op treats channels; see the module docstring."""

    couple: Callable
    fix: Callable | None = None
    resize: Callable | None = None
    on_meta: Callable | None = None
    spec: Callable | None = None  # spec(node, modules): a conv's geometry for the cost models (conv.Conv2dSpec)
    grids: bool | None = None  # ``couple`` takes grid labels (see one_axis); default: ``couple.takes_grids``
    #: weight_rows(node): the weight node whose rows (dim 0) are the op's output channels (a conv call's,
    #: F.linear's), or None; where that weight is computed from parameters alone, those parameters' rows of the
    #: same size are labelled with the output channels before the walk (:meth:`~fxprune.couple.analysis.Analysis.seed_rows`)
    weight_rows: Callable | None = None

    def __post_init__(self):
        if self.grids is None:
            self.grids = bool(getattr(self.couple, "takes_grids", False))


@dataclass
class T:
    """A tensor as the rules see it: its label, its shape, and its name if it is a parameter."""

    label: torch.Tensor | None
    shape: tuple
    param: str | None = None
    #: a parameter with its last two dims swapped (``weight.T``): its name (``param`` stays None: only rules
    #: that read this take it as that parameter, with those dims swapped)
    transposed: str | None = None


def describe(node: fx.Node, gm: fx.GraphModule) -> str:
    """A short name of ``node`` for pin reasons and errors."""
    if node.op == "call_module":
        return f"module '{node.target}' ({type(gm.get_submodule(node.target)).__name__})"
    if node.op == "call_method":
        return f"method '.{node.target}()' at node '{node.name}'"
    return f"'{getattr(node.target, '__name__', node.target)}' at node '{node.name}'"


def tensors(args, kwargs) -> list[T]:
    """Every tensor input (:class:`T`) in args and kwargs, nested containers included."""
    out = []

    def walk(a):
        if isinstance(a, T):
            out.append(a)
        elif isinstance(a, (tuple, list)):
            for x in a:
                walk(x)
        elif isinstance(a, dict):
            for x in a.values():
                walk(x)

    walk(args)
    walk(kwargs)
    return out


def arg(args, kwargs, i, name, default=None):
    """Argument ``i`` of a call, given by position or as ``name=``."""
    if len(args) > i:
        return args[i]
    return kwargs.get(name, default)


def pin_all(ctx, args, kwargs, reason):
    """Pin every channel of every tensor input, and fix every parameter input whole."""
    for t in tensors(args, kwargs):
        ctx.pin(t.label, reason)
        if t.param is not None or t.transposed is not None:
            ctx.fix_param(t.param or t.transposed, reason)
    return None


def broadcast_label(label, ndim):
    """Left-pad a label with size-1 dims, as broadcasting does."""
    while label.dim() < ndim:
        label = label.unsqueeze(0)
    return label


def one_axis(ctx, label):
    """Make a label vary along at most one dim, unifying across the others.

    A reshape can spread one channel dim over several (``view(n, g, c // g, h, w)`` in a
    channel shuffle, a pixel shuffle). A rewrite can only shrink such a value as a
    sub-grid, so one dim keeps the channels and the entries across the others are tied:
    the dim with the most distinct ids (the last one on a tie), which is ``c // g`` in a
    channel shuffle and the output channels of a pixel shuffle.

    The one exception is a *grid*: a reshape that splits a channel dim into blocks and positions
    (``view(b, n, heads, head_dim)``), where the blocks must keep equal counts (see
    :func:`fxprune.ops.shape.grid_label`). Rules declared with ``Rule(grids=True)`` (or whose couple function has
    ``takes_grids = True``) receive grids;
    every other rule receives its inputs tied here first, so it never sees one.
    """
    label = ctx.canonical(label)
    dims = varying(label)
    if len(dims) <= 1:
        return label

    def distinct(d):
        index = [0] * label.dim()
        index[d] = slice(None)
        return (int(torch.unique(label[tuple(index)]).numel()), d)

    last = max(dims, key=distinct)
    dims = [d for d in dims if d != last] + [last]
    moved = label.movedim(last, -1).reshape(-1, label.shape[last])
    # every column is one channel: tie each entry to the column's first
    ctx.unify(moved[:1], moved, f"reshape at '{ctx.node.name}' spreads channels over several dims")
    index = [slice(0, 1) if d in dims[:-1] else slice(None) for d in range(label.dim())]
    return ctx.canonical(label[tuple(index)])


def tied(ctx, t):
    """``t`` with a grid label tied to one axis (:func:`one_axis`), for an op that does not take grids;
    any other value as it is."""
    if isinstance(t, T) and t.label is not None and len(varying(t.label)) > 1:
        return T(one_axis(ctx, t.label), t.shape, t.param)
    return t


def default_rule(ctx, args, kwargs):
    return pin_all(ctx, args, kwargs, f"no rule for {describe(ctx.node, ctx.gm)}: its channels are kept")


def output_rule(ctx, args, kwargs):
    return pin_all(ctx, args, kwargs, "model output")


class RuleTable:
    """Every spelling of every op a graph dialect knows, mapped to its :class:`Rule`.

    ``default`` is the rule of an op with no entry (it pins); ``output`` the rule of the
    graph's output node (it pins: the model's outputs keep their channels).
    """

    def __init__(self, name: str, default: Rule | None = None, output: Rule | None = None):
        self.name = name
        self.default = default or Rule(default_rule)
        self.output = output or Rule(output_rule)
        self._rules: dict[object, Rule] = {}

    def register(self, rule: Rule, *spellings) -> None:
        """Make ``rule`` the rule of each of ``spellings``; a later registration replaces an earlier one."""
        for s in spellings:
            self._rules[s] = rule

    def extended(self, name: str) -> "RuleTable":
        """A new table holding this one's rows, for a dialect that adds spellings."""
        table = RuleTable(name, self.default, self.output)
        table._rules.update(self._rules)
        return table

    def rule_for(self, node: fx.Node, modules: dict) -> Rule:
        """The rule of ``node``; ``modules`` is ``dict(gm.named_modules())``."""
        if node.op == "output":
            return self.output
        key = type(modules[node.target]) if node.op == "call_module" else node.target
        rule = self._rules.get(key)
        if rule is None and isinstance(key, torch._ops.OpOverload):  # a custom op of a package, by its name
            rule = self._rules.get(key.name())
        elif rule is None and callable(key):  # a function of a package the table does not import, by its name
            rule = self._rules.get(f"{getattr(key, '__module__', '')}.{getattr(key, '__qualname__', '')}")
        return rule or self.default

    def meta_formula(self, module: torch.nn.Module) -> Callable | None:
        """The ``on_meta`` formula of ``module``'s rule, if it has one."""
        rule = self._rules.get(type(module))
        return rule.on_meta if rule is not None else None

    def __getitem__(self, spelling) -> Rule:
        return self._rules[spelling]

    def __contains__(self, spelling) -> bool:
        return spelling in self._rules

    def __len__(self) -> int:
        return len(self._rules)

    def __repr__(self) -> str:
        return f"RuleTable({self.name!r}, {len(self._rules)} spellings)"
