"""The rewrite stage: a new, physically smaller ``GraphModule`` from a channel graph and a plan
(:mod:`.graph`), or a pruned copy of the user's own model (:mod:`.module`)."""
from .graph import copy_modules, rewrite
from .module import pin_literals, rewrite_module

__all__ = ["copy_modules", "rewrite", "pin_literals", "rewrite_module"]
