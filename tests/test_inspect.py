"""Inspection: the group table (shares computed by hand), the Graphviz picture and its rendering."""
from __future__ import annotations

import re
import shutil

import pytest
import torch
import torch.nn as nn
import torchvision

import fxprune
from fxprune.errors import ConfigError
from fxprune.view.inspect import PIN_COLOR, graph_to_dot, group_rows, group_table, render

HAVE_DOT = shutil.which("dot") is not None
needs_dot = pytest.mark.skipif(not HAVE_DOT, reason="Graphviz 'dot' is not installed (apt-get install graphviz)")


def boxes_and_edges(dot: str):
    boxes = dict(re.findall(r'^\s*(b\d+) \[label="(.*?)"', dot, flags=re.M))
    attrs = dict(re.findall(r'^\s*(b\d+) \[(.*)\];$', dot, flags=re.M))
    edges = re.findall(r'^\s*(b\d+) -> (b\d+);', dot, flags=re.M)
    return boxes, attrs, edges


@pytest.fixture(scope="module")
def resnet18_graph():
    return fxprune.analyze(torchvision.models.resnet18().eval(), (torch.randn(1, 3, 64, 64),))


class Cat(nn.Module):
    """Two convs concatenated, a 1x1 conv reading the concat, a linear head."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 4, 3, padding=1)
        self.b = nn.Conv2d(3, 6, 3, padding=1)
        self.mix = nn.Conv2d(10, 5, 1)
        self.fc = nn.Linear(5, 2)

    def forward(self, x):
        y = torch.relu(self.mix(torch.cat([self.a(x), self.b(x)], 1)))
        return self.fc(y.mean((2, 3)))


def test_shares_match_a_hand_count():
    net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 1)).eval()
    graph = fxprune.analyze(net, (torch.randn(1, 3, 8, 8),))
    rows = {r["name"]: r for r in group_rows(graph)}
    # removing all 8 channels of group "0" removes both convs' FLOPs, and its params:
    # conv0 weight 8*3*3*3 + bias 8, conv2 weight 4*8; conv2's bias (4) stays.
    assert rows["0"]["flops_share"] == pytest.approx(1.0)
    assert rows["0"]["params_share"] == pytest.approx((216 + 8 + 32) / (216 + 8 + 32 + 4))
    assert rows["2"]["prunable"] == 0 and rows["2"]["flops_share"] == 0.0
    assert any("output" in p for p in rows["2"]["pins"])
    assert rows["0"]["producers"] == ["_0"] and rows["0"]["consumers"] == ["_2"]


def test_rows_are_sorted_by_share_and_table_lists_every_group(resnet18_graph):
    rows = group_rows(resnet18_graph)
    shares = [r["flops_share"] for r in rows]
    assert shares == sorted(shares, reverse=True)
    assert all(0.0 <= s <= 1.0 for s in shares)
    assert len(rows) == len(resnet18_graph.groups) == 13
    table = group_table(resnet18_graph).splitlines()
    assert len(table) == 2 + 13
    assert table[2].split("|")[1].strip() == rows[0]["name"]
    fc = next(r for r in rows if r["name"] == "fc")
    assert fc["prunable"] == 0 and fc["pins"] and fc["exact"]


def test_repr_and_to_dot(resnet18_graph):
    first = repr(resnet18_graph).splitlines()[0]
    assert first == "ChannelGraph(13 groups, 12 prunable, 3880 channels)"


def test_resnet18_picture_clusters_and_colours(resnet18_graph):
    dot = graph_to_dot(resnet18_graph)
    boxes, attrs, edges = boxes_and_edges(dot)
    tensor_nodes = [n for n in resnet18_graph.module.graph.nodes if n.meta.get("tensor_meta") is not None]
    # conv -> bn -> relu chains become one box each: far fewer boxes than ops
    assert len(boxes) < len(tensor_nodes) / 1.8
    for block in ("layer1.0", "layer2.0", "layer4.1"):
        assert f'subgraph "cluster_{block}"' in dot
    # a module that is one box (conv + bn of a downsample) is named in the box, not framed
    assert 'subgraph "cluster_layer2.0.downsample"' not in dot
    down = [lab for lab in boxes.values() if lab.startswith("downsample · Sequential\\n0: Conv2d\\n1: BatchNorm2d")]
    assert len(down) == 3
    chain = next(b for b, lab in boxes.items() if lab.startswith("conv1: Conv2d\\nbn1: BatchNorm2d\\nrelu: ReLU"))
    assert "group conv1" in boxes[chain]
    # the classifier is pinned by the model output: red, bold border
    fc = next(b for b, lab in boxes.items() if lab.startswith("fc: Linear"))
    assert f'color="{PIN_COLOR}", penwidth=2.2' in attrs[fc]
    # every residual add keeps both of its inputs
    adds = [b for b, lab in boxes.items() if lab.startswith("add")]
    assert len(adds) == 8
    for b in adds:
        assert sum(1 for _, dst in edges if dst == b) == 2
    # one box per op when asked
    none_boxes, _, _ = boxes_and_edges(graph_to_dot(resnet18_graph, collapse="none"))
    assert len(none_boxes) == len(tensor_nodes)  # the output node included


def test_cat_is_striped_with_its_groups_colours():
    graph = fxprune.analyze(Cat().eval(), (torch.randn(1, 3, 8, 8),))
    dot = graph_to_dot(graph, collapse="none")
    boxes, attrs, _ = boxes_and_edges(dot)
    cat = next(b for b, lab in boxes.items() if lab.startswith("cat"))
    a = next(b for b, lab in boxes.items() if lab.startswith("a: Conv2d"))
    b = next(b for b, lab in boxes.items() if lab.startswith("b: Conv2d"))
    col = lambda box: re.search(r'fillcolor="([^"]*)"', attrs[box]).group(1)
    assert 'style="striped"' in attrs[cat]
    assert col(cat) == f"{col(a)}:{col(b)}" and col(a) != col(b)
    assert "2 groups" in boxes[cat]


def test_densenet_collapses_to_modules_and_thins_dense_edges():
    graph = fxprune.analyze(torchvision.models.densenet121().eval(), (torch.randn(1, 3, 64, 64),))
    dot = graph_to_dot(graph)
    boxes, attrs, edges = boxes_and_edges(dot)
    assert len(boxes) <= 130 and len(boxes) < len(list(graph.module.graph.nodes)) / 5
    layers = [b for b, lab in boxes.items() if "· _DenseLayer" in lab]
    assert len(layers) == 6 + 12 + 24 + 16
    fifth = [b for b in layers if boxes[b].startswith("denselayer5 ·")]
    assert len(fifth) == 4 and all("reads 4 earlier values" in boxes[b] for b in fifth)
    assert len(edges) < 2 * len(boxes)
    # modules kept whole when asked for a shallower depth
    shallow, _, _ = boxes_and_edges(graph_to_dot(graph, collapse=1))
    assert len(shallow) < len(boxes)


def test_bad_collapse_and_bad_file_name(resnet18_graph, tmp_path):
    with pytest.raises(ConfigError, match="collapse"):
        graph_to_dot(resnet18_graph, collapse="pretty")
    with pytest.raises(ConfigError, match=r"\.svg, \.png"):
        render("digraph {}", str(tmp_path / "x.jpg"))


def test_missing_graphviz_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setattr(shutil, "which", lambda name: None)
    with pytest.raises(ConfigError, match="apt-get install graphviz"):
        render("digraph { a -> b }", str(tmp_path / "x.svg"))
    render("digraph { a -> b }", str(tmp_path / "x.dot"))  # .dot needs no Graphviz
    assert (tmp_path / "x.dot").read_text() == "digraph { a -> b }"


@needs_dot
def test_render_svg_and_png(resnet18_graph, tmp_path):
    dot = graph_to_dot(resnet18_graph, title="resnet18")
    svg = render(dot, str(tmp_path / "r18.svg"))
    text = open(svg).read()
    assert "<svg" in text and "layer4.0 · BasicBlock" in text
    png = render(dot, str(tmp_path / "r18.png"))
    assert open(png, "rb").read(8) == b"\x89PNG\r\n\x1a\n"
