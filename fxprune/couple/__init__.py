"""The coupling stage: channel labels per node and the analysis that turns them into channel groups."""
from .analysis import BLOCK, GROUPS, HEADS, Context, couple

__all__ = ["BLOCK", "GROUPS", "HEADS", "Context", "couple"]
