"""torchvision models pruned to half their FLOPs, verified by mask-equivalence and ONNX Runtime."""
from __future__ import annotations

import pytest
import torch
import torchvision

import fxprune
from fxprune.cost import count_flops
from helpers import assert_state_equal, state_copy

MODELS = ["resnet18", "resnet50", "mobilenet_v2", "densenet121", "shufflenet_v2_x1_0"]


@pytest.mark.parametrize("name", MODELS)
def test_torchvision_half_flops(name):
    torch.manual_seed(0)
    model = torchvision.models.get_model(name, weights=None).eval()
    x = torch.randn(1, 3, 96, 96)
    before = state_copy(model)
    pruned = fxprune.compile(model, (x,), method="l2", flops=0.5)
    assert_state_equal(model, before)
    rep = fxprune.report(pruned)
    assert rep.mask["ok"] and rep.onnx["ok"]
    assert rep.mask["nodes_compared"] >= 50
    assert rep.onnx["max_rel_diff"] < 1e-4
    # the FLOPs counted on the pruned model meet the target to within 2 %, and match the prediction
    measured = count_flops(pruned, (x,)) / count_flops(model, (x,))
    assert 0.48 <= measured <= 0.5 + 1e-9, measured
    assert rep.flops_after == pytest.approx(rep.flops_predicted, rel=1e-6)
    assert rep.params_after < rep.params_before
    assert pruned(x).shape == (1, 1000)


def test_resnet50_residual_stream_is_one_group():
    graph = fxprune.analyze(torchvision.models.resnet50(), (torch.randn(1, 3, 64, 64),))
    stream = graph.groups["layer1.0.conv3"]
    producers = {m.param for m in stream.members if m.kind == "producer" and m.role == "weight"}
    assert producers == {"layer1.0.conv3.weight", "layer1.0.downsample.0.weight",
                         "layer1.1.conv3.weight", "layer1.2.conv3.weight"}
    consumers = {m.param for m in stream.members if m.kind == "consumer"}
    assert consumers == {"layer1.1.conv1.weight", "layer1.2.conv1.weight", "layer2.0.conv1.weight",
                         "layer2.0.downsample.0.weight"}
    assert stream.size == 256 and stream.prunable == 256


def test_densenet_layer_offsets():
    graph = fxprune.analyze(torchvision.models.densenet121(), (torch.randn(1, 3, 64, 64),))
    # the first dense layer's 32 new channels sit at offset 64 of the next layer's input,
    # and are read by every later layer of the block and by the transition
    g = graph.groups["features.denseblock1.denselayer1.conv2"]
    nxt = [m for m in g.members if m.param == "features.denseblock1.denselayer2.norm1.weight"][0]
    assert torch.nonzero(nxt.index >= 0).flatten().tolist() == list(range(64, 96))
    readers = {m.param for m in g.members if m.kind == "consumer"}
    assert "features.transition1.conv.weight" in readers and len(readers) == 6


class Attention(torch.nn.Module):
    def __init__(self, scale=None):
        super().__init__()
        self.scale = scale

    def forward(self, q):
        return torch.nn.functional.scaled_dot_product_attention(q, q, q, scale=self.scale)


def test_attention_flops_do_not_depend_on_which_cpu_kernel_runs():
    """With and without ``scale=`` (two CPU kernels, one of which flop_counter had no formula for), the
    attention counts its two products: 2 x 2 x heads x tokens^2 x dims."""
    q = torch.randn(1, 2, 16, 8)
    assert count_flops(Attention(), (q,)) == count_flops(Attention(0.125), (q,)) == 4 * 2 * 16 * 16 * 8
