"""The capture stage: a model and example inputs in, a ``GraphModule`` with shapes, plain values
and FLOPs in ``node.meta`` out: :func:`trace` (``torch.fx.symbolic_trace``), :func:`export`
(``torch.export``, ATen ops), and :func:`capture_model`, which picks one (``"auto"``: fx first)."""
from .choose import TRACERS, capture_model
from .export import export
from .fx import trace
from .values import ValueProp, annotate, meta_shapes, propagate_on_meta

__all__ = ["trace", "export", "capture_model", "TRACERS", "ValueProp", "annotate", "meta_shapes",
           "propagate_on_meta"]
