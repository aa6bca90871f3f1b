"""The rewrite stage: a new, physically smaller ``GraphModule`` from a channel graph and a plan."""
from .graph import copy_modules, rewrite

__all__ = ["copy_modules", "rewrite"]
