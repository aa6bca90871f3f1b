"""The report of a model pruned part by part (:func:`fxprune.partial.compile_parts`).

Example::

    >>> rep = PartsReport(method="l2", why="capture='parts'", params_before=100, params_after=60,
    ...                   parts=[{"name": "backbone", "tracer": "fx", "params_before": 80, "params_after": 40,
    ...                           "flops_before": 1000, "flops_after": 400,
    ...                           "mask": {"ok": True, "max_rel_diff": 0.0}, "onnx": None}],
    ...                   whole=[{"name": "head", "reason": "no parameters", "params": 0}])
    >>> rep.rows()[2]
    ('part backbone', 'fx', '80 -> 40 params', 'mask ok, ONNX not run')
    >>> rep.parts_flops
    (1000, 400)
"""
from __future__ import annotations

from dataclasses import dataclass, field

from tabulate import tabulate


@dataclass
class PartsReport:
    method: str
    why: str  # why the model was not captured whole
    params_before: int
    params_after: int
    # {"name", "tracer", "why", params/FLOPs before/after, "mask", "onnx", "report"}
    parts: list = field(default_factory=list)
    whole: list = field(default_factory=list)  # {"name", "reason", "params"}
    opened: list = field(default_factory=list)  # {"name", "reason"}: not captured whole, its children tried
    # the whole model on the example inputs (FlopCounterMode): a detector's later stages run once per
    # box that passes its thresholds, so this moves with the scores, not only with the channels
    flops_before: int | None = None
    flops_after: int | None = None
    whole_check: dict | None = None  # the pruned model ran and returned the model's output structure
    timings: dict = field(default_factory=dict)
    output: str = "parts"

    @property
    def parts_flops(self) -> tuple[int, int]:
        """FLOPs of the pruned parts on their recorded calls, before and after (counted on their graphs)."""
        return sum(p["flops_before"] for p in self.parts), sum(p["flops_after"] for p in self.parts)

    @property
    def verified(self) -> bool:
        return bool(self.whole_check and self.whole_check["ok"] and self.parts and all(
            p["mask"] and p["mask"]["ok"] and (p["onnx"] is None or p["onnx"]["ok"] is not False) for p in self.parts))

    def rows(self):
        rows = [("method", self.method, "", ""),
                ("captured part by part", self.why[:120], "", "")]
        for p in self.parts:
            mask = "mask ok" if p["mask"] and p["mask"]["ok"] else "mask not run"
            onnx = p.get("onnx")
            onnx = ("ONNX not run" if onnx is None else "ONNX ok" if onnx.get("ok")
                    else f"ONNX skipped: {onnx.get('skipped', '')[:60]}")
            rows.append((f"part {p['name']}", p["tracer"], f"{p['params_before']:,} -> {p['params_after']:,} params",
                         f"{mask}, {onnx}"))
        for w in self.whole:
            rows.append((f"whole {w['name']}", f"{w['params']:,} params", w["reason"][:100], ""))
        for o in self.opened:
            rows.append((f"opened {o['name']}", "its children tried", o["reason"][:100], ""))
        rows.append(("params", f"{self.params_before:,}", f"{self.params_after:,}",
                     f"{self.params_after / self.params_before:.1%}" if self.params_before else "-"))
        before, after = self.parts_flops
        if before:
            rows.append(("FLOPs of the pruned parts", f"{before:,}", f"{after:,}", f"{after / before:.1%}"))
        if self.flops_before and self.flops_after is not None:
            rows.append(("FLOPs, whole model on the example", f"{self.flops_before:,}", f"{self.flops_after:,}",
                         f"{self.flops_after / self.flops_before:.1%}"))
        rows.append(("whole model", "runs, same output structure" if self.whole_check else "not checked", "", ""))
        for stage, seconds in self.timings.items():
            rows.append((f"time: {stage}", f"{seconds:.3f} s", "", ""))
        return rows

    def __str__(self) -> str:
        return tabulate(self.rows(), headers=["", "", "", ""], tablefmt="github")

    def to_dict(self) -> dict:
        return {"method": self.method, "why": self.why, "output": self.output,
                "params_before": self.params_before, "params_after": self.params_after,
                "flops_before": self.flops_before, "flops_after": self.flops_after, "parts_flops": self.parts_flops,
                "parts": [{k: v for k, v in p.items() if k != "report"} for p in self.parts],
                "whole": self.whole, "opened": self.opened, "whole_check": self.whole_check, "timings": self.timings}
