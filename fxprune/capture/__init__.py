"""The capture stage: a model and example inputs in, a ``GraphModule`` with shapes, plain values
and FLOPs in ``node.meta`` out (:func:`trace`, with ``torch.fx.symbolic_trace``)."""
from .fx import trace
from .values import ValueProp, meta_shapes, propagate_on_meta

__all__ = ["trace", "ValueProp", "meta_shapes", "propagate_on_meta"]
