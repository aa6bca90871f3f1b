"""The coupling stage: channel labels per node and the analysis that turns them into channel groups."""
from .analysis import GROUPS, HEADS, Context, couple

__all__ = ["GROUPS", "HEADS", "Context", "couple"]
