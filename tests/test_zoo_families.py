"""The families sweep (``tools/zoo_families.py``): a small CI subset by default; the whole sweep behind ``-m slow``.

One or two small models per framework (ultralytics, Hugging Face transformers, timm, smp), built
from ``tools/families.py`` at small inputs, and what is true of them today:

* every one is asserted verified (mask-equivalence, and ONNX Runtime where cheap) with the default
  ``capture="auto"``; the report names the tracer: ``symbolic_trace`` for the first two, ``torch.export``
  for the rest, which ``symbolic_trace`` cannot trace (the reason is in each case's id comment);
* ``torch.export`` is asserted to capture every one of them.

A framework that is not installed is skipped (``pytest.importorskip``).
"""
from __future__ import annotations

import os
import sys

import pytest
import torch

import fxprune

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tools"))
import families  # noqa: E402
import zoo_families  # noqa: E402

FRAMEWORK = {"ultralytics": "ultralytics", "hf": "transformers", "timm": "timm", "smp": "segmentation_models_pytorch"}


def _build(name, size=None):
    pytest.importorskip(FRAMEWORK[name.partition(":")[0]])
    model, args, kwargs = families.build(name)
    if size is not None:  # a smaller image than the sweep's, for CI time
        args = (torch.randn(1, args[0].shape[1], size, size),) + args[1:]
    return model, args, kwargs


CASES = [
    pytest.param("timm:resnet10t", 64, True, "fx", id="timm-resnet10t"),
    pytest.param("smp:Unet-resnet18", 64, False, "fx", id="smp-Unet"),
    pytest.param("hf:ResNetForImageClassification", None, False, "export", id="hf-ResNet"),  # HF kwargs plumbing
    pytest.param("hf:BertModel", None, False, "export", id="hf-Bert"),  # HF kwargs plumbing
    pytest.param("ultralytics:yolov8n", 64, False, "export", id="yolov8n"),  # forward(x, *args) iterates a Proxy
    pytest.param("smp:FPN-resnet18", 64, False, "export", id="smp-FPN"),  # if h % output_stride
    pytest.param("timm:mobilevit_xxs", 64, False, "export", id="timm-mobilevit"),  # shape-dependent if
]


@pytest.mark.parametrize("name,size,onnx,tracer", CASES)
def test_fxprune_verifies(name, size, onnx, tracer, one_thread):
    model, args, kwargs = _build(name, size)
    assert not kwargs
    ref = zoo_families.call(model, args, kwargs)
    pruned = fxprune.compile(model, args, method="l2", ratio=0.5, onnx=onnx)
    rep = fxprune.report(pruned)
    assert rep.capture["tracer"] == tracer, rep.capture
    assert rep.mask["ok"] and (rep.onnx["ok"] if onnx else True), (rep.mask, rep.onnx)
    assert rep.plan.removed > 0 and rep.params_after < rep.params_before
    out = zoo_families.call(pruned, args, {})
    assert zoo_families.structure(out) == zoo_families.structure(ref) and zoo_families.finite(out)


@pytest.mark.parametrize("name,size", [("ultralytics:yolov8n", 64), ("hf:BertModel", None),
                                       ("hf:LlamaForCausalLM", None), ("smp:FPN-resnet18", 64)])
def test_torch_export_captures(name, size, one_thread):
    """What ``torch.export`` captures today (retried once, as the sweep does: a first call on
    YOLO has been seen to fail), and that its module reproduces the eager outputs."""
    model, args, kwargs = _build(name, size)
    ref = zoo_families.call(model, args, kwargs)  # first: export leaves YOLO's anchors, set in forward, symbolic
    try:
        ep = torch.export.export(model, args, kwargs, strict=False)
    except Exception:
        ep = torch.export.export(model, args, kwargs, strict=False)
    same, shapes, diff = zoo_families.compare(ref, zoo_families.call(ep.module(), args, kwargs))
    assert same and shapes and diff == 0.0


def test_catalogue():
    pytest.importorskip("timm")
    pytest.importorskip("ultralytics")
    pytest.importorskip("transformers")
    timm_models = families.model_names("timm")
    assert len(timm_models) >= 80 and len(set(timm_models)) == len(timm_models)
    yolo = families.model_names("ultralytics")
    assert {"ultralytics:yolov8n", "ultralytics:yolo11n", "ultralytics:yolov8n-seg", "ultralytics:yolo11n-pose",
            "ultralytics:yolov8n-obb", "ultralytics:yolov8n-cls"} <= set(yolo)
    llama = families.HF["LlamaForCausalLM"][2]
    assert llama["num_key_value_heads"] < llama["num_attention_heads"] and llama["use_cache"] is False
    assert {"hf:BertModel", "hf:ViTForImageClassification", "hf:GPT2LMHeadModel"} <= set(families.model_names("hf"))


def test_table_and_counts():
    rows = {("fxprune", "hf:A"): {"tool": "fxprune", "model": "hf:A", "status": "verified", "params": 10,
                                  "groups": 3, "pinned_groups": 1, "params_after": 5},
            ("fxprune", "hf:B"): {"tool": "fxprune", "model": "hf:B", "status": "TraceError",
                                  "error": "TraceError: could not trace module '<root>' at /x/y.py:12 (for a in x): "
                                           "TraceError: Proxy object cannot be iterated. Fix: pass leaf_modules"},
            ("export", "hf:A"): {"tool": "export", "model": "hf:A", "status": "captured", "export_s": 1.0},
            ("export", "hf:B"): {"tool": "export", "model": "hf:B", "status": "captured on retry"},
            ("torch-pruning", "hf:A"): {"tool": "torch-pruning", "model": "hf:A", "status": zoo_families.TP_OK,
                                        "version": "1.6"},
            ("torch-pruning", "hf:B"): {"tool": "torch-pruning", "model": "hf:B", "status": "timeout (120 s)"}}
    c = zoo_families.counts(rows, ["hf:A", "hf:B"])
    assert c["hf"] == c["total"]
    assert (c["hf"]["verified"], c["hf"]["failed"], c["hf"]["TraceError"], c["hf"]["export captured"],
            c["hf"]["TP pruned and runs"]) == (1, 1, 1, 2, 1)
    text = zoo_families.table(rows, ["hf:A", "hf:B"])
    assert "## Summary" in text and "## hf" in text and "1 / 2" in text
    assert "Proxy object cannot be iterated" in text and "y.py:12 `for a in x`: B" in text


@pytest.mark.slow
def test_full_families_sweep(tmp_path):
    """Every catalogue model through fxprune and torch.export, each in its own subprocess (hours)."""
    import zoo

    names = families.all_names()
    rows = {}
    for tool in ("fxprune", "export"):
        rows = zoo.sweep(names, [tool], timeout=300, mem_mb=8000, threads=2, onnx=True,
                         cache=str(tmp_path / "families.jsonl"), script=zoo_families.__file__)
    c = zoo_families.counts(rows, names)["total"]
    assert c["fxprune run"] == c["export run"] == len(names)
    assert c["export captured"] == len(names)  # true on 2026-11-30: torch.export captured all 206
    crashed = {n for (t, n), r in rows.items() if t == "fxprune" and r["status"] == "crash"}
    # known today: the pruned model's reshape keeps stale sizes (mask-equivalence raises); shrink as fixed
    assert crashed <= {"timm:coat_tiny", "timm:edgenext_xx_small", "timm:volo_d1_224"}, crashed


def test_bert_flops_budget_is_met_as_the_report_counts(one_thread):
    """A pruned BERT keeps its attention's original scale (``scale=`` given to ``scaled_dot_product_attention``),
    which runs on CPU as two ``bmm`` that ``flop_counter`` counts, while the original's call ran a CPU kernel it
    had no formula for: the report read 0.52 of the FLOPs after ``flops=0.5``. Both now count the attention."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.BertConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128,
                                  vocab_size=100)
    model = transformers.BertModel(cfg).eval()   # 128 tokens: the attention holds a third of the FLOPs
    args = (torch.randint(0, 100, (1, 128)),)
    rep = fxprune.report(fxprune.compile(model, args, method="l2", flops=0.5, onnx=False, verify=False))
    assert rep.capture["tracer"] == "export"
    assert 0.45 * rep.flops_before <= rep.flops_after <= 0.5 * rep.flops_before
