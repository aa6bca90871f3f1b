"""fxprune: a structured-pruning compiler for PyTorch built on torch.fx.

    >>> import torch, torchvision, fxprune
    >>> model = torchvision.models.resnet18().eval()
    >>> pruned = fxprune.compile(model, (torch.randn(1, 3, 64, 64),), method="l2", ratio=0.25, onnx=False)
    >>> fxprune.report(pruned).mask["ok"]
    True
"""
from .api import analyze, apply, compile
from .errors import ConfigError, DataError, FxPruneError, PlanError, TraceError, VerificationError
from .export import export_onnx
from .ir import ChannelGraph, ChannelGroup, Member, Pin
from .plan import Plan, make_plan
from .report import Report, report
from .save import load, save

__all__ = ["analyze", "apply", "compile", "report", "export_onnx", "save", "load", "make_plan", "Plan", "Report",
           "ChannelGraph", "ChannelGroup", "Member", "Pin", "FxPruneError", "TraceError", "ConfigError",
           "PlanError", "DataError", "VerificationError"]
__version__ = "0.1.0"
