"""Op knowledge: how every op moves, creates, consumes or ties channels, as a table object.

:mod:`.schema` defines :class:`Rule` and :class:`RuleTable`; the rules live in one file
per op family; :data:`FX_RULES` (:mod:`.fx_table`) is the table of ``symbolic_trace``
graphs, handed to the analysis, the rewrite and shape propagation; :data:`ATEN_RULES`
(:mod:`.aten_table`) adds the ATen spellings of ``torch.export`` graphs.
"""
import torch

from .aten_table import ATEN_RULES
from .conv import Conv2dSpec, linear_function, linear_module
from .fx_table import FX_RULES
from .schema import Rule, RuleTable, T

__all__ = ["ATEN_RULES", "FX_RULES", "Conv2dSpec", "Rule", "RuleTable", "T", "conv2d_spec", "is_linear", "rule_of"]


def conv2d_spec(node, modules: dict) -> Conv2dSpec | None:
    """The :class:`~.conv.Conv2dSpec` of an fx node that runs a 2-d convolution (not transposed), read by its
    rule's ``spec`` in either table: an ``nn.Conv2d`` module, ``F.conv2d`` (timm's "same"-padded convs trace
    to it), ATen's ``conv2d`` / ``convolution`` (``torch.export``); else None. ``modules`` is the graph
    module's ``dict(named_modules())``.

        >>> import torch, torch.fx
        >>> class Grouped(torch.nn.Module):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.w = torch.nn.Parameter(torch.randn(8, 2, 3, 3))
        ...     def forward(self, x):
        ...         return torch.nn.functional.conv2d(x, self.w, None, 2, 1, 1, 2)
        >>> gm = torch.fx.symbolic_trace(Grouped())
        >>> _ = torch.fx.passes.shape_prop.ShapeProp(gm).propagate(torch.randn(1, 4, 8, 8))
        >>> spec = conv2d_spec([n for n in gm.graph.nodes if n.op == "call_function"][0], dict(gm.named_modules()))
        >>> spec.in_channels, spec.out_channels, spec.kernel_size, spec.stride, spec.groups
        (4, 8, (3, 3), (2, 2), 2)
    """
    rule = rule_of(node, modules)
    return rule.spec(node, modules) if rule is not None and rule.spec is not None else None


def is_linear(node, modules: dict) -> bool:
    """Whether an fx node runs a linear layer, ``x @ weight.T + bias`` over ``x``'s last dim, by its row in
    either table: an ``nn.Linear`` module (or a subclass), ``F.linear``, ATen's ``linear`` (``torch.export``).

        >>> import torch, torch.fx
        >>> class Proj(torch.nn.Module):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.fc, self.w = torch.nn.Linear(4, 4), torch.nn.Parameter(torch.randn(2, 4))
        ...     def forward(self, x):
        ...         return torch.nn.functional.linear(self.fc(x), self.w).relu()
        >>> gm = torch.fx.symbolic_trace(Proj())
        >>> [n.name for n in gm.graph.nodes if is_linear(n, dict(gm.named_modules()))]
        ['fc', 'linear']
    """
    if node.op == "call_module":
        return isinstance(modules.get(node.target), torch.nn.Linear)
    rule = rule_of(node, modules)
    return rule is not None and rule.couple in (linear_function, linear_module)


def rule_of(node, modules: dict) -> Rule | None:
    """The row of an fx node's op in the tables (the fx table's, else the ATen one's: ``torch.export``), or None
    for an op neither knows. Other stages (the cost models) tell ops apart by it, not by spellings of their own.
    ``modules`` is the graph module's ``dict(named_modules())``."""
    if node.op not in ("call_module", "call_function", "call_method"):
        return None
    for table in (FX_RULES, ATEN_RULES):
        rule = table.rule_for(node, modules)
        if rule is not table.default:
            return rule
    return None
