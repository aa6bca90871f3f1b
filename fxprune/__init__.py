"""fxprune: a structured-pruning compiler for PyTorch built on torch.fx.

The pipeline, one stage per sub-package: :mod:`~fxprune.capture` → :mod:`~fxprune.couple`
(with the op knowledge of :mod:`~fxprune.ops`) → scoring (:mod:`fxprune.passes`) →
:mod:`~fxprune.plan` → :mod:`~fxprune.rewrite` → :mod:`~fxprune.verify`, run by
:class:`~fxprune.pipeline.Pipeline`; costs in :mod:`~fxprune.cost`, files in
:mod:`~fxprune.io`, reports and pictures in :mod:`~fxprune.view`. See ``docs/design.md``.

    >>> import torch, torchvision, fxprune
    >>> model = torchvision.models.resnet18().eval()
    >>> pruned = fxprune.compile(model, (torch.randn(1, 3, 64, 64),), method="l2", ratio=0.25, onnx=False)
    >>> fxprune.report(pruned).mask["ok"]
    True
"""
from .api import analyze, apply, compile
from .errors import (ConfigError, DataError, ExportError, FxPruneError, PlanError, RewriteError, TraceError,
                     VerificationError)
from .io.onnx import export_onnx
from .io.save import load, save
from .ir import ChannelGraph, ChannelGroup, Member, Pin
from .pipeline import Pipeline
from .plan import Plan, make_plan
from .view.report import Report, report

__all__ = ["analyze", "apply", "compile", "report", "export_onnx", "save", "load", "make_plan", "Plan", "Report",
           "Pipeline", "ChannelGraph", "ChannelGroup", "Member", "Pin", "FxPruneError", "TraceError", "ConfigError",
           "PlanError", "DataError", "RewriteError", "VerificationError", "ExportError"]
__version__ = "0.1.0"
