"""Op knowledge: how every op moves, creates, consumes or ties channels, as a table object.

:mod:`.schema` defines :class:`Rule` and :class:`RuleTable`; the rules live in one file
per op family; :data:`FX_RULES` (:mod:`.fx_table`) is the table of ``symbolic_trace``
graphs, handed to the analysis, the rewrite and shape propagation; :data:`ATEN_RULES`
(:mod:`.aten_table`) adds the ATen spellings of ``torch.export`` graphs.
"""
from .aten_table import ATEN_RULES
from .fx_table import FX_RULES
from .schema import Rule, RuleTable, T

__all__ = ["ATEN_RULES", "FX_RULES", "Rule", "RuleTable", "T"]
