"""One capture stage, several tracers: ``symbolic_trace`` first, ``torch.export`` when it fails.

:func:`capture_model` returns the annotated ``GraphModule``, the rule table of its dialect
(:data:`~fxprune.ops.FX_RULES` or :data:`~fxprune.ops.ATEN_RULES`) and what happened
(``{"tracer": "export", "why": "symbolic_trace failed: ...", "batch": "dynamic"}``; ``batch`` says
whether the exported graph takes any batch size or only the example's), which the report shows.

Example::

    >>> import torch
    >>> from fxprune.capture import capture_model
    >>> class Split(torch.nn.Module):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.conv = torch.nn.Conv2d(3, 8, 1)
    ...     def forward(self, x):
    ...         a, b = list(self.conv(x).chunk(2, 1))
    ...         return a * b
    >>> gm, table, info = capture_model(Split(), (torch.randn(1, 3, 4, 4),))
    >>> table.name, info["tracer"]
    ('fx', 'fx')
    >>> gm, table, info = capture_model(Split(), (torch.randn(1, 3, 4, 4),), how="export")
    >>> table.name, info["tracer"]
    ('aten', 'export')
"""
from __future__ import annotations

from ..errors import ConfigError, TraceError
from ..ops import ATEN_RULES, FX_RULES
from .export import export, first_line
from .fx import trace

TRACERS = ("auto", "fx", "export")


def capture_model(model, example_inputs, how: str = "auto", *, leaf_modules=(), concrete_args=None,
                  stack_traces: bool = False):
    """``(gm, table, info)``: ``model`` captured by ``how``, one of :data:`TRACERS`.

    ``"fx"`` is ``symbolic_trace`` (with ``leaf_modules``, ``concrete_args`` and ``stack_traces``), ``"export"`` is
    ``torch.export`` (non-strict), ``"auto"`` the first and, when it raises
    :class:`~fxprune.errors.TraceError`, the second. When both fail, the TraceError names both.
    """
    if how not in TRACERS:
        raise ConfigError(f"capture must be one of {', '.join(map(repr, TRACERS))}, not {how!r}")
    if how == "export":
        gm = export(model, example_inputs, ATEN_RULES)
        return gm, ATEN_RULES, {"tracer": "export", "why": "capture='export'", "batch": gm.meta["fxprune_batch"]}
    try:
        gm = trace(model, example_inputs, leaf_modules=leaf_modules, concrete_args=concrete_args, table=FX_RULES,
                   stack_traces=stack_traces)
        return gm, FX_RULES, {"tracer": "fx"}
    except TraceError as exc:
        if how == "fx":
            raise
        first = exc
    why = f"symbolic_trace failed: {_short(first_line(first))}"
    try:
        gm = export(model, example_inputs, ATEN_RULES)
    except TraceError as exc:
        raise TraceError(f"{why}\nand then {exc}") from exc
    return gm, ATEN_RULES, {"tracer": "export", "why": why, "batch": gm.meta["fxprune_batch"]}


def _short(message: str, limit: int = 240) -> str:
    """fx's explanation without its advice (which does not apply once export captured the model)."""
    message = message.split(" Fix: ")[0]
    return message if len(message) <= limit else message[:limit - 3] + "..."
