"""The coupling stage: channel labels per node and the analysis that turns them into channel groups."""
from .analysis import HEADS, Context, couple

__all__ = ["HEADS", "Context", "couple"]
