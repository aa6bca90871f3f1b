"""Partial capture (fxprune.partial): a model whose root no tracer follows is pruned part by part,
each part's boundaries kept, and the copy runs the model's own forward with the same outputs."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fxprune
from fxprune.errors import ConfigError, TraceError

from helpers import assert_state_equal, state_copy


class Images:
    """An object a tracer cannot flatten (as torchvision's ImageList)."""

    def __init__(self, tensors):
        self.tensors = tensors


class Head(nn.Module):
    """Loops over a list of feature maps: fx cannot iterate a list placeholder; the flat call makes it real."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(8, 16, 3, padding=1)
        self.bn = nn.BatchNorm2d(16)
        self.out = nn.Conv2d(16, 4, 1)

    def forward(self, feats):
        return [self.out(F.relu(self.bn(self.conv(f)))) for f in feats]


class Box(nn.Module):
    """Takes an ``Images``: not flattened, so it is opened and its ``mlp`` captured."""

    def __init__(self):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(4, 32), nn.ReLU(), nn.Linear(32, 2))

    def forward(self, images):
        return self.mlp(images.tensors.mean((2, 3)))


class Detector(nn.Module):
    """A list of images in, a list of dicts out, a branch on a tensor's value: neither fx nor export
    captures the root."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.Conv2d(16, 8, 1))
        self.twice = nn.Conv2d(8, 8, 1)
        self.head = Head()
        self.box = Box()
        self.pool = nn.AdaptiveAvgPool2d(4)

    def forward(self, images):
        x = torch.stack(list(images))
        f = self.twice(self.twice(self.body(x)))
        outs = self.head([f, F.avg_pool2d(f, 2)])
        score = self.box(Images(self.pool(outs[0])))
        keep = score[:, 0] > 0
        if bool(keep.any()):
            score = score * 2
        return [{"scores": score[i], "maps": [o[i] for o in outs]} for i in range(len(images))]


def dead_half(net: Detector) -> Detector:
    """Zero the second half of every prunable channel everywhere it is read or written, so that L2
    at ratio 0.5 removes exactly those and the pruned model computes what the model computes."""
    torch.manual_seed(0)
    with torch.no_grad():
        for bn in (net.body[1], net.head.bn):
            bn.running_mean.uniform_(-1, 1)
            bn.running_var.uniform_(0.5, 2)
        for producer, bn, consumer in ((net.body[0], net.body[1], net.body[3]),
                                       (net.head.conv, net.head.bn, net.head.out)):
            producer.weight[8:] = 0
            producer.bias[8:] = 0
            bn.weight[8:] = 0
            bn.bias[8:] = 0
            consumer.weight[:, 8:] = 0
        net.box.mlp[0].weight[16:] = 0
        net.box.mlp[0].bias[16:] = 0
        net.box.mlp[2].weight[:, 16:] = 0
    return net.eval()


IMAGES = [torch.randn(3, 16, 16), torch.randn(3, 16, 16)]


def test_a_root_no_tracer_follows_is_pruned_part_by_part():
    net = dead_half(Detector())
    with pytest.raises(TraceError):
        fxprune.analyze(net, (IMAGES,))
    before = state_copy(net)
    small = fxprune.compile(net, (IMAGES,), method="l2", ratio=0.5)
    assert_state_equal(net, before)
    rep = fxprune.report(small)
    assert rep.why.startswith("the root was not captured")
    assert {p["name"]: p["tracer"] for p in rep.parts} == {"body": "fx", "head": "fx", "box.mlp": "fx"}
    assert {w["name"]: w["reason"].split(" (")[0].split(";")[0] for w in rep.whole} == {
        "twice": "called 2 times in one forward pass", "pool": "no parameters"}
    assert all(p["mask"]["ok"] and p["onnx"]["ok"] for p in rep.parts) and rep.verified
    assert [o["name"] for o in rep.opened] == ["box"] and "Images" in rep.opened[0]["reason"]
    # the boundaries stay: body's 8 outputs (read by `twice`), the head's 4, the mlp's 2; inside, half goes
    assert small.body.graph.get_submodule("inner.0").out_channels == 8
    assert small.body.graph.get_submodule("inner.3").out_channels == 8
    assert small.head.graph.get_submodule("inner.conv").out_channels == 8
    assert small.box.mlp.graph.get_submodule("inner.0").out_features == 16
    body, head, mlp = 8 * 27 + 8 + 16 + 8 * 8, 8 * 72 + 8 + 16 + 4 * 8, 16 * 5 + 2 * 16  # rows, bias, BN, columns
    assert rep.params_before - rep.params_after == body + head + mlp
    assert rep.params_after == sum(p.numel() for p in small.parameters())
    before, after = rep.parts_flops
    assert before == sum(p["report"].flops_before for p in rep.parts) and 0 < after < before
    # only dead channels went: the pruned model returns what the model returns, in the same structure
    want, got = net(IMAGES), small(IMAGES)
    assert [sorted(d) for d in got] == [sorted(d) for d in want] and len(got[0]["maps"]) == 2
    for w, g in zip(want, got):
        assert torch.allclose(g["scores"], w["scores"], atol=1e-5)
        for a, b in zip(w["maps"], g["maps"]):
            assert a.shape == b.shape and torch.allclose(a, b, atol=1e-5)
    assert "part head" in str(rep) and "whole twice" in str(rep)


def test_parts_options_and_refusals():
    net = dead_half(Detector())
    small = fxprune.compile(net, (IMAGES,), method="l2", ratio=0.5, ignore=["head.conv"], onnx=False)
    rep = fxprune.report(small)
    assert small.head.graph.get_submodule("inner.conv").out_channels == 16  # ignored, by its name in the model
    assert all(p["onnx"] is None for p in rep.parts)
    with pytest.raises(ConfigError, match="part by part"):
        fxprune.compile(net, (IMAGES,), method="l2", ratio=0.5, data=[(IMAGES,)])
    with pytest.raises(TraceError, match="captured for calls like the example's"):
        small.head([torch.randn(1, 8, 4, 4)])  # one feature map where the example had two
    # a model that captures whole can still be pruned part by part: its children are the parts
    seq = nn.Sequential(nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 1)), nn.Conv2d(4, 2, 1)).eval()
    rep = fxprune.report(fxprune.compile(seq, (torch.randn(1, 3, 8, 8),), ratio=0.5, capture="parts", onnx=False))
    assert [p["name"] for p in rep.parts] == ["0"] and rep.parts[0]["removed"] == 4
    assert rep.whole[0]["name"] == "1" and "every channel is pinned" in rep.whole[0]["reason"]
    with pytest.raises(TraceError, match="no part of the model"):
        fxprune.compile(seq[1], (torch.randn(1, 4, 8, 8),), ratio=0.5, capture="parts")


@pytest.mark.slow
def test_fasterrcnn_mobilenet_320_is_pruned_part_by_part():
    import torchvision

    torch.manual_seed(0)
    net = torchvision.models.get_model("fasterrcnn_mobilenet_v3_large_320_fpn", weights=None,
                                       weights_backbone=None).eval()
    x = [torch.rand(3, 320, 320)]
    before = state_copy(net)
    small = fxprune.compile(net, (x,), method="l2", ratio=0.5)
    assert_state_equal(net, before)
    rep = fxprune.report(small)
    assert {p["name"]: p["tracer"] for p in rep.parts} == {"backbone": "fx", "rpn.head": "fx",
                                                           "roi_heads.box_head": "fx"}
    whole = {w["name"]: w["reason"] for w in rep.whole}
    assert whole["transform"] == "no parameters" and "pinned" in whole["roi_heads.box_predictor"]
    opened = {o["name"]: o["reason"] for o in rep.opened}
    assert set(opened) == {"rpn", "roi_heads"} and "ImageList" in opened["rpn"]
    assert rep.verified and all(p["onnx"]["ok"] for p in rep.parts)
    assert 0.45 < rep.params_after / rep.params_before < 0.55
    out = small(x)
    assert sorted(out[0]) == ["boxes", "labels", "scores"] and out[0]["boxes"].shape[-1] == 4


def test_a_pruned_part_keeps_the_modules_plain_attributes():
    net = dead_half(Detector())
    net.body.out_channels = 8  # as torchvision's backbones: read by the model around it
    small = fxprune.compile(net, (IMAGES,), method="l2", ratio=0.5, onnx=False)
    assert small.body.out_channels == 8 and small.body.training is False
    assert not hasattr(net.body, "graph")  # the model is not changed
    with pytest.raises(ConfigError, match="part by part"):
        fxprune.save(small, "/nonexistent/p.pt")


def dead_detector():
    return dead_half(Detector())


def test_cli_prunes_part_by_part(capsys):
    from fxprune.cli import main

    assert main(["prune", "test_partial:dead_detector", "--input-shape", "2,3,16,16", "--ratio", "0.5"]) == 0
    out = capsys.readouterr().out
    assert "part body" in out and "whole twice" in out
    assert main(["prune", "test_partial:dead_detector", "--input-shape", "2,3,16,16", "--ratio", "0.5",
                 "--save", "/tmp/never.pt"]) == 2
    assert "part by part" in capsys.readouterr().err


class Encoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(50, 16)
        self.layers = nn.ModuleList(nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 16)) for _ in range(2))

    def forward(self, x):
        for layer in self.layers:
            x = x + layer(x)
        return x


class ReadsInside(nn.Module):
    """FSMT's pattern: the root reads a submodule of a part (``self.encoder.embed``) and branches on a value."""

    def __init__(self):
        super().__init__()
        self.encoder, self.head = Encoder(), nn.Linear(16, 5)

    def forward(self, ids):
        x = self.encoder.embed(ids) * 4.0
        h = self.encoder(x)
        return self.head(h if h.sum() > 0 else -h)


def test_a_part_read_from_outside_is_opened_and_its_layers_pruned():
    torch.manual_seed(0)
    model, ids = ReadsInside().eval(), torch.randint(0, 50, (2, 6))
    before = state_copy(model)
    pruned = fxprune.compile(model, (ids,), method="l2", ratio=0.5, round_to=None)
    assert_state_equal(model, before)
    rep = fxprune.report(pruned)
    opened = {o["name"]: o["reason"] for o in rep.opened}
    assert "reads its 'embed' from outside it" in opened["encoder"] and "encoder.layers" in opened
    assert sorted(p["name"] for p in rep.parts) == ["encoder.layers.0", "encoder.layers.1"]
    assert pruned.encoder.embed.weight.shape == (50, 16)     # the original's, read by the root
    with torch.no_grad():
        assert pruned(ids).shape == model(ids).shape
    assert sum(p.numel() for p in pruned.parameters()) < sum(p.numel() for p in model.parameters())
