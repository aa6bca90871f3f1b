"""Looking at a :class:`~fxprune.ir.ChannelGraph`: a table of its groups and their cost share.

The *share* of a group is the fraction of the model's FLOPs (and parameters) that
would go if every prunable channel of that group were removed: what the group controls.

Example::

    >>> import torch, torchvision, fxprune
    >>> from fxprune.inspect import group_rows
    >>> graph = fxprune.analyze(torchvision.models.resnet18(), (torch.randn(1, 3, 64, 64),))
    >>> top = group_rows(graph)[0]
    >>> top["name"], top["size"]
    ('layer4.0.conv1', 512)
"""
from __future__ import annotations

import numpy as np
from tabulate import tabulate

from .cost import CostModel


def group_rows(graph) -> list[dict]:
    """One dict per group, sorted by FLOPs share (largest first)."""
    cost = CostModel(graph)
    all_kept = np.ones(graph.num_channels, dtype=bool)
    rows = []
    for g in graph.groups.values():
        keep = all_kept.copy()
        off = graph.offsets[g.name]
        keep[off:off + g.size] = g.pinned.numpy()
        rows.append({
            "name": g.name, "size": g.size, "prunable": g.prunable,
            "producers": g.producers, "consumers": g.consumers,
            "pins": [str(p) for p in g.pins], "exact": not g.approximate,
            "flops_share": 1 - cost.flops(keep) / cost.base_flops if cost.base_flops else 0.0,
            "params_share": 1 - cost.params(keep) / cost.base_params if cost.base_params else 0.0,
        })
    rows.sort(key=lambda r: (-r["flops_share"], r["name"]))
    return rows


def group_table(graph) -> str:
    def short(items, n=3):
        return ", ".join(items[:n]) + (f" +{len(items) - n}" if len(items) > n else "")

    rows = [(r["name"], r["size"], r["prunable"], short(r["producers"]), short(r["consumers"]),
             short(r["pins"], 1) or "-", "exact" if r["exact"] else "approx",
             f"{r['flops_share']:.1%}", f"{r['params_share']:.1%}") for r in group_rows(graph)]
    head = ["group", "size", "prunable", "producers", "consumers", "pins", "kind", "FLOPs share", "params share"]
    return tabulate(rows, headers=head, tablefmt="github")


def graph_to_dot(graph) -> str:
    """Graphviz source of the traced graph, nodes coloured by channel group (pinned: red border)."""
    lines = ["digraph fxprune {", "  rankdir=TB; node [shape=box, style=filled, fontsize=10];"]
    names = list(graph.groups)
    palette = ["#8dd3c7", "#ffffb3", "#bebada", "#fb8072", "#80b1d3", "#fdb462", "#b3de69", "#fccde5",
               "#d9d9d9", "#bc80bd", "#ccebc5", "#ffed6f"]
    starts = sorted((off, name) for name, off in graph.offsets.items())
    offs = np.array([o for o, _ in starts])
    for node in graph.module.graph.nodes:
        label = node.meta.get("fxprune")
        color = "#ffffff"
        if hasattr(label, "numel") and label.numel() and int(label.max()) >= 0:
            ch = int(label[label >= 0].flatten()[0])
            gname = starts[int(np.searchsorted(offs, ch, side="right")) - 1][1]
            color = palette[names.index(gname) % len(palette)]
        lines.append(f'  "{node.name}" [label="{node.name}", fillcolor="{color}"];')
        for user in node.users:
            lines.append(f'  "{node.name}" -> "{user.name}";')
    lines.append("}")
    return "\n".join(lines)
