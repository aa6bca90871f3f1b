"""The model zoo: a small fixed subset by default; the whole sweep behind ``-m slow``.

The default run prunes five models of the zoo's families at small inputs (a ResNet, a
MobileNetV3 with squeeze-excitation, a ShuffleNetV2 with channel shuffle, a ViT and a
Swin built small from torchvision's own classes), with verification on, and checks the
numbers: channels removed, FLOPs down, mask-equivalence and ONNX Runtime agreement.
"""
from __future__ import annotations

import math
import os
import sys

import pytest
import torch
import torchvision

import fxprune

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tools"))
import zoo  # noqa: E402


def tiny_vit():
    return torchvision.models.VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=4,
                                                hidden_dim=32, mlp_dim=64, num_classes=10)


def tiny_swin():
    return torchvision.models.SwinTransformer(patch_size=[4, 4], embed_dim=16, depths=[1, 1], num_heads=[2, 4],
                                              window_size=[2, 2], num_classes=10)


def _compile(model, size, onnx=True):
    torch.manual_seed(0)
    model = model.eval()
    x = torch.randn(1, 3, size, size)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    pruned = fxprune.compile(model, (x,), method="l2", ratio=0.5, onnx=onnx)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before), "the user's model was changed"
    return pruned, fxprune.report(pruned), x


@pytest.mark.parametrize("name,size,onnx", [("resnet18", 64, True), ("mobilenet_v3_small", 64, False),
                                            ("shufflenet_v2_x0_5", 64, False)])
def test_cnn_subset_verified(name, size, onnx):
    torch.manual_seed(0)
    pruned, rep, x = _compile(torchvision.models.get_model(name, weights=None), size, onnx=onnx)
    assert rep.verified if onnx else rep.mask["ok"], (rep.mask, rep.onnx)
    assert rep.plan.removed > 0 and rep.prunable_groups > 0
    assert rep.flops_after < 0.6 * rep.flops_before
    assert rep.params_after < rep.params_before
    assert pruned(x).shape == (1, 1000)


def test_vit_prunes_mlp_and_head_width():
    pruned, rep, x = _compile(tiny_vit(), 32)
    assert rep.verified, (rep.mask, rep.onnx)
    mha = pruned.get_submodule("encoder.layers.encoder_layer_0.self_attention")
    # the stream (hidden_dim 32) lost channels, every head keeps the same head_dim
    assert mha.embed_dim < 32 and mha.embed_dim % mha.num_heads == 0
    assert mha.head_dim == mha.embed_dim // mha.num_heads == mha.in_proj_weight.shape[0] // (3 * mha.num_heads)
    assert pruned.get_submodule("encoder.layers.encoder_layer_0.mlp.0").out_features < 64
    # LayerNorm over channels makes the stream group approximate, and the report says so
    assert rep.mask["approximate_groups"] >= 1
    y = pruned(x)
    assert y.shape == (1, 10) and bool(torch.isfinite(y).all())


def test_swin_prunes_stream_with_exact_reference():
    pruned, rep, x = _compile(tiny_swin(), 16, onnx=False)
    assert rep.mask["ok"] and rep.mask["max_rel_diff"] < 1e-4
    assert rep.plan.removed > 0 and rep.flops_after < 0.6 * rep.flops_before
    assert rep.mask["approximate_groups"] >= 1
    assert pruned(x).shape == (1, 10)


def test_layer_norm_group_is_approximate_and_pruned():
    """A LayerNorm over a linear's features: its weight follows the kept channels."""
    net = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.LayerNorm(8), torch.nn.Linear(8, 3)).eval()
    graph = fxprune.analyze(net, (torch.randn(2, 6),))
    g = graph.groups["0"]
    assert g.approximate and g.prunable == 8
    assert {(m.param, m.role) for m in g.members} >= {("1.weight", "norm_weight"), ("1.bias", "norm_bias")}
    pruned, rep, _ = _compile_plain(net, torch.randn(2, 6))
    assert pruned.get_submodule("1").normalized_shape == (4,)
    assert rep.mask["ok"]


def _compile_plain(net, x):
    pruned = fxprune.compile(net, (x,), method="l2", ratio=0.5, onnx=False)
    return pruned, fxprune.report(pruned), x


def test_status_needs_every_check():
    row = {"mask_ok": True, "removed": 10, "prunable_groups": 3, "finite": True, "ort_ok": True}
    assert zoo.status_of(row) == "verified"
    assert zoo.status_of({**row, "ort_ok": False}) == "ORT mismatch"
    assert zoo.status_of({**row, "mask_ok": False}) == "mask mismatch"
    assert zoo.status_of({**row, "removed": 0, "prunable_groups": 0}) == "all pinned"
    assert zoo.status_of({**row, "finite": False}) == "non-finite output"


def test_table_and_geomean():
    assert math.isclose(zoo.geomean([2.0, 8.0]), 4.0)
    verified = {"model": "a", "status": "verified", "params_before": 2e6, "params_after": 1e6,
                "flops_before": 4e9, "flops_after": 2e9, "cold_s": 0.2, "warm_s": 0.1, "mem_analysis_mb": 50,
                "verify_s": 1.0, "ort_abs": 1e-6, "groups": 3, "pinned_groups": 1, "approximate_groups": 0,
                "first_pin": "output: model output", "model_sha": "abc"}
    rows = {("fxprune", "a"): verified,
            ("torch-pruning", "a"): {"model": "a", "status": "ran", "cold_s": 1.0, "total_s": 0.5, "version": "1.6"}}
    text = zoo.table(rows)
    assert "**1 of 1 verified**" in text and "5.0×" in text  # cold 1.0 / 0.2; warm 0.5 / 0.1
    assert "**5.00×** (fxprune faster on 1)" in text
    assert "1 of 1 models under 5 s" in text
    for column in ("params before → after", "FLOPs before → after", "analysis+rewrite s (cold)", "analysis MB",
                   "verify s", "max ORT diff", "pinned groups", "first pin reason"):
        assert column in text
    # a later timing run that pruned identically replaces the times; a different model is not verified
    rows[(zoo.TIMING, "a")] = {"model": "a", "tool": zoo.TIMING, "cold_s": 0.1, "warm_s": 0.05, "model_sha": "abc"}
    assert "**10.00×**" in zoo.table(rows)
    rows[(zoo.TIMING, "a")]["model_sha"] = "def"
    text = zoo.table(rows)
    assert "changed since verified" in text and "**0 of 1 verified**" in text


def test_native_sizes():
    assert zoo.native_size("inception_v3", torchvision.models.inception_v3(weights=None, init_weights=False)) == 299
    assert zoo.native_size("vit_h_14", torchvision.models.VisionTransformer(224, 14, 1, 2, 8, 8)) == 224
    assert len(zoo.model_names()) == 80


@pytest.mark.slow
def test_full_zoo_sweep(tmp_path):
    """Every torchvision classification model, each in its own subprocess (long: about an hour)."""
    rows = zoo.sweep(zoo.model_names(), ["fxprune"], timeout=900, mem_mb=16000, threads=2, onnx=True,
                     cache=str(tmp_path / "zoo.jsonl"))
    failed = {m: r["status"] for (_, m), r in rows.items() if r["status"] != "verified"}
    assert not failed, failed
