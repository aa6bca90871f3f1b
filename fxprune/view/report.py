"""The report attached to every pruned module: costs, plan, verification figures, timings.

Example::

    >>> import torch, fxprune
    >>> net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU(), torch.nn.Conv2d(8, 4, 1))
    >>> small = fxprune.compile(net, (torch.randn(1, 3, 8, 8),), ratio=0.5, onnx=False, round_to=None)
    >>> rep = fxprune.report(small)
    >>> rep.params_before, rep.params_after
    (260, 132)
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from tabulate import tabulate

from ..errors import ConfigError
from ..plan import Plan


@dataclass
class Report:
    method: str
    plan: Plan
    params_before: int
    params_after: int
    flops_before: int
    flops_after: int
    flops_predicted: float
    groups: int
    prunable_groups: int
    pinned_groups: int
    first_pin: str | None
    mask: dict | None = None
    onnx: dict | None = None
    timings: dict = field(default_factory=dict)
    capture: dict = field(default_factory=dict)  # how the model was captured: {"tracer": "fx", ...}
    search: list | None = None  # the steps of a latency search (fxprune.cost.latency.search_latency)
    output: str = "graph"  # "module": a pruned copy of the user's model (fxprune.rewrite.module)
    signature: dict | None = None  # output="module": example input shapes/dtypes and traced mode, for save

    @property
    def verified(self) -> bool:
        return bool(self.mask and self.mask["ok"] and self.mask.get("module", {"ok": True})["ok"]
                    and self.onnx and self.onnx["ok"])

    def rows(self):
        def pct(a, b):
            return f"{a / b:.1%}" if b else "-"

        rows = [
            ("method", self.method, "", ""),
            ("captured by", self.capture.get("tracer", "-"), self.capture.get("why", ""), ""),
            ("params", f"{self.params_before:,}", f"{self.params_after:,}", pct(self.params_after, self.params_before)),
            ("FLOPs", f"{self.flops_before:,}", f"{self.flops_after:,}", pct(self.flops_after, self.flops_before)),
            ("FLOPs predicted by the plan", "", f"{self.flops_predicted:,.0f}", pct(self.flops_predicted, self.flops_before)),
            ("channel groups (prunable / pinned)", f"{self.groups}", f"{self.prunable_groups} / {self.pinned_groups}", ""),
            ("channels removed", "", f"{self.plan.removed:,}", ""),
        ]
        if self.output != "graph":
            rows.insert(1, ("output", f"a pruned copy of the model ({self.output})", "", ""))
        ranking = self.plan.meta.get("ranking")
        if ranking in ("latency-weighted", "per ms"):   # ranked on the ORT latency model (fxprune.plan.make_plan)
            why = ("importance over the square root of the group's latency per FLOP" if ranking == "latency-weighted"
                   else "importance per millisecond saved")
            rows.insert(1, ("channels ranked", ranking, why, ""))
        if self.plan.meta.get("groups"):   # grouped convs coupled by whole groups (fxprune.couple.couple)
            lose = {"whole": "whole groups", "blocked": "whole groups where 16-wide, else balanced counts"}.get(
                self.plan.meta["groups"], self.plan.meta["groups"])
            rows.insert(1, ("grouped convs lose", lose, "", ""))
        if self.mask:
            diff = f"max rel diff {self.mask['max_rel_diff']:.1e}"
            if self.mask.get("checked_in"):  # float32 rounding past the tolerance, re-checked in float64
                diff += f" in {self.mask['checked_in']} ({self.mask['float32_max_rel_diff']:.1e} in float32)"
            rows.append(("mask-equivalence", f"{self.mask['nodes_compared']} tensors", diff,
                         "ok" if self.mask["ok"] else "FAILED"))
        else:
            rows.append(("mask-equivalence", "not run", "", ""))
        if self.mask and self.mask.get("module"):
            m = self.mask["module"]
            rows.append(("module copy vs pruned graph", f"{m['modules_compared']} tensors",
                         f"max rel diff {m['max_rel_diff']:.1e}", "ok" if m["ok"] else "FAILED"))
        if self.onnx and self.onnx["ok"] is None:
            rows.append(("ONNX Runtime vs torch", "not checkable", "the unpruned model's ONNX file fails too", "-"))
        elif self.onnx:
            rows.append(("ONNX Runtime vs torch", f"batches {self.onnx['batches']}",
                         f"max abs diff {self.onnx['max_abs_diff']:.1e}", "ok" if self.onnx["ok"] else "FAILED"))
        else:
            rows.append(("ONNX Runtime vs torch", "not run", "", ""))
        for stage, seconds in self.timings.items():
            rows.append((f"time: {stage}", f"{seconds:.3f} s", "", ""))
        return rows

    def __str__(self) -> str:
        return tabulate(self.rows(), headers=["", "before", "after", "kept"], tablefmt="github")

    def to_dict(self) -> dict:
        return {"method": self.method, "params_before": self.params_before, "params_after": self.params_after,
                "flops_before": self.flops_before, "flops_after": self.flops_after,
                "flops_predicted": self.flops_predicted, "groups": self.groups,
                "prunable_groups": self.prunable_groups, "pinned_groups": self.pinned_groups,
                "first_pin": self.first_pin, "mask": self.mask, "output": self.output, "capture": self.capture,
                "onnx": {k: v for k, v in (self.onnx or {}).items()}, "timings": self.timings,
                "plan": {"keep": self.plan.keep, "sizes": self.plan.sizes}}


def report(pruned) -> Report:
    """The :class:`Report` of a module returned by :func:`fxprune.compile` or :func:`fxprune.apply`
    (a ``GraphModule``'s ``meta["fxprune_report"]``, or a pruned copy's ``fxprune_report``)."""
    meta = getattr(pruned, "meta", None)
    rep = meta.get("fxprune_report") if isinstance(meta, dict) else None
    if rep is None and isinstance(pruned, torch.nn.Module):
        rep = getattr(pruned, "fxprune_report", None)
    if rep is None:
        raise ConfigError("this module carries no fxprune report: pass a module returned by fxprune.compile or apply")
    return rep
