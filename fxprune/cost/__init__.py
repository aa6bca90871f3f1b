"""The cost stage: parameter counts and FLOPs of modules, and their prediction for a plan
(:class:`CostModel`); ONNX Runtime timing lives in :mod:`fxprune.cost.latency`."""
from .flops import CostModel, count_flops, count_params, graph_flops

__all__ = ["CostModel", "count_flops", "count_params", "graph_flops"]
