"""The coupling stage: channel labels per node and the analysis that turns them into channel groups."""
from .analysis import Context, couple

__all__ = ["Context", "couple"]
