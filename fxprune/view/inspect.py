"""Looking at a :class:`~fxprune.ir.ChannelGraph`: a table of its groups, and a picture of its graph.

The *share* of a group is the fraction of the model's FLOPs (and parameters) that
would go if every prunable channel of that group were removed: what the group controls.

:func:`graph_to_dot` draws the traced graph in Graphviz: each value is filled with the
colour of its channel group (stripes where a value spans several groups, a ``cat``),
values with pinned channels get a red border (bold: all pinned; dashed: some), and
nodes are clustered by the module that ran them. A readable picture needs fewer boxes
than ops: chains of ops that carry the same group (conv → bn → relu) become one box,
and when that is still too many, whole modules at the deepest level become one box each
(a DenseNet layer, say). :func:`render` writes ``.dot``, ``.svg``, ``.png`` or ``.pdf``.

Example::

    >>> import torch, torchvision, fxprune
    >>> from fxprune.view.inspect import group_rows, graph_to_dot
    >>> graph = fxprune.analyze(torchvision.models.resnet18(), (torch.randn(1, 3, 64, 64),))
    >>> top = group_rows(graph)[0]
    >>> top["name"], top["size"]
    ('conv1', 64)
    >>> dot = graph_to_dot(graph)
    >>> dot.startswith("digraph"), "cluster" in dot
    (True, True)
"""
from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass, field

import numpy as np
import torch
from tabulate import tabulate

from ..cost import CostModel
from ..errors import ConfigError


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
            "blocks": None if g.blocks is None else tuple(g.blocks.shape),
            "producers": g.producers, "consumers": g.consumers,
            "pins": [str(p) for p in g.pins], "exact": not g.approximate,
            "flops_share": 1 - cost.flops(keep) / cost.base_flops if cost.base_flops else 0.0,
            "params_share": 1 - cost.params(keep) / cost.base_params if cost.base_params else 0.0,
        })
    rows.sort(key=lambda r: (-r["flops_share"], r["name"]))
    return rows


def group_table(graph) -> str:
    """:func:`group_rows` as a GitHub-style table (one pin reason shown; ``--json`` has them all). A group of
    balanced blocks shows its size as ``size (blocks x per block)``: each block keeps the same count."""
    def short(items, n=3):
        return ", ".join(items[:n]) + (f" +{len(items) - n}" if len(items) > n else "")

    rows = [(r["name"], r["size"] if r["blocks"] is None else f"{r['size']} ({r['blocks'][0]} x {r['blocks'][1]})",
             r["prunable"], short(r["producers"]), short(r["consumers"]),
             short(r["pins"], 1) or "-", "exact" if r["exact"] else "approx",
             f"{r['flops_share']:.1%}", f"{r['params_share']:.1%}") for r in group_rows(graph)]
    head = ["group", "size", "prunable", "producers", "consumers", "pins", "kind", "FLOPs share", "params share"]
    return tabulate(rows, headers=head, tablefmt="github")


# --------------------------------------------------------------------------- the picture

PALETTE = ["#8dd3c7", "#ffffb3", "#bebada", "#fb8072", "#80b1d3", "#fdb462", "#b3de69", "#fccde5",
           "#bc80bd", "#ccebc5", "#ffed6f", "#a6cee3", "#b2df8a", "#fdbf6f", "#cab2d6", "#e5d8bd",
           "#9ecae1", "#c7e9c0", "#fdd0a2", "#dadaeb"]
FIXED_FILL = "#ffffff"
PIN_COLOR = "#d62728"
MAX_STRIPES = 8
FAN_IN = 3


@dataclass
class _Item:
    """One box of the picture: a single op, a chain of ops, or a whole module."""

    key: str
    nodes: list = field(default_factory=list)       # fx nodes it stands for, in graph order
    cluster: tuple = ()                              # module scopes ((qualname, type name), ...) it sits in
    module: tuple | None = None                      # (qualname, type name) when it stands for a module
    groups: tuple = ()                               # groups of the values leaving it
    pinned: str = "none"                             # "none" | "some" | "all"
    edges_out: list = field(default_factory=list)    # keys of the boxes it feeds
    hidden_in: int = 0                               # in-edges left out by _thin_fan_in


def graph_to_dot(graph, *, collapse="auto", max_boxes: int = 130, title: str | None = None) -> str:
    """Graphviz source of ``graph``'s traced module (see the module docstring).

    ``collapse`` is ``"auto"`` (chains of ops of one group become one box; then, while
    there are more than ``max_boxes`` boxes, modules at the deepest level become one box
    each), ``"chains"`` (only the first step), ``"none"`` (one box per op), or an int
    ``d``: modules nested deeper than ``d`` levels become one box each (then chains).
    """
    info = _NodeInfo(graph)
    nodes = [n for n in graph.module.graph.nodes if info.drawn(n)]
    if collapse == "none":
        items = _items(nodes, info, depth=None, chains=False)
    elif collapse == "chains":
        items = _items(nodes, info, depth=None, chains=True)
    elif collapse == "auto":
        depth = max((len(info.scope(n)) for n in nodes), default=0)
        items = _items(nodes, info, depth=None, chains=True)
        while len(items) > max_boxes and depth > 0:
            depth -= 1
            items = _items(nodes, info, depth=depth, chains=True)
    elif isinstance(collapse, int) and not isinstance(collapse, bool) and collapse >= 0:
        items = _items(nodes, info, depth=collapse, chains=True)
    else:
        raise ConfigError(f"collapse={collapse!r}: use 'auto', 'chains', 'none' or a module depth (int >= 0)")
    return _emit(items, info, graph, title)


def render(dot: str, path: str) -> str:
    """Write ``dot`` source to ``path``: ``.dot``/``.gv`` as text, else through Graphviz ``dot -T<ext>``."""
    ext = os.path.splitext(path)[1].lower().lstrip(".")
    if ext in ("dot", "gv"):
        with open(path, "w") as f:
            f.write(dot)
        return path
    if ext not in ("svg", "png", "pdf"):
        raise ConfigError(f"cannot draw to '{path}': use a .svg, .png, .pdf or .dot file name")
    exe = shutil.which("dot")
    if exe is None:
        raise ConfigError("Graphviz is not installed (no 'dot' on PATH): install it (Debian: apt-get install "
                          f"graphviz) or write a .dot file and render it elsewhere, instead of '{path}'")
    proc = subprocess.run([exe, f"-T{ext}", "-o", path], input=dot.encode(), capture_output=True)
    if proc.returncode != 0:
        raise ConfigError(f"Graphviz failed to draw '{path}': {proc.stderr.decode(errors='replace')[:500]}")
    return path


class _NodeInfo:
    """Per-node facts the picture needs: scope, groups of the output, pin state, a short label."""

    def __init__(self, graph):
        self.gm = graph.module
        bounds = sorted((off, name) for name, off in graph.offsets.items())
        self.starts = np.array([o for o, _ in bounds], dtype=np.int64)
        self.names = [name for _, name in bounds]
        sizes = {name: g.size for name, g in graph.groups.items()}
        self.ends = np.array([o + sizes[n] for o, n in bounds], dtype=np.int64)
        self.pinned = torch.cat([graph.groups[n].pinned for n in self.names]).numpy() if bounds else np.zeros(0, bool)
        self.order = {name: i for i, name in enumerate(graph.groups)}
        self.pin_reasons = {name: [str(p) for p in g.pins] for name, g in graph.groups.items()}

    @staticmethod
    def drawn(node) -> bool:
        """Tensor-valued nodes (and the output) only: sizes, shapes and get_attr parameters are left out."""
        if node.op == "output":
            return True
        if node.op == "get_attr":
            return False
        return node.meta.get("tensor_meta") is not None

    def scope(self, node) -> tuple:
        """The container modules ``node`` runs in, outermost first (its own module excluded)."""
        stack = node.meta.get("nn_module_stack") or {}
        out = []
        for qualname, typ in stack.values():
            tname = typ if isinstance(typ, str) else getattr(typ, "__name__", str(typ))
            entry = (qualname, tname.rsplit(".", 1)[-1])
            if not out or out[-1][0] != qualname:
                out.append(entry)
        if node.op == "call_module" and out and out[-1][0] == node.target:
            out.pop()
        return tuple(out)

    def channels(self, node) -> np.ndarray:
        labels = node.meta.get("fxprune")
        labels = labels if isinstance(labels, (tuple, list)) else (labels,)
        ids = [lab.flatten().numpy() for lab in labels if isinstance(lab, torch.Tensor)]
        ids = np.unique(np.concatenate(ids)) if ids else np.zeros(0, np.int64)
        return ids[ids >= 0]

    def groups(self, node) -> tuple:
        ch = self.channels(node)
        if not ch.size:
            return ()
        gi = np.unique(np.searchsorted(self.starts, ch, side="right") - 1)
        return tuple(sorted((self.names[i] for i in gi), key=self.order.get))

    def pin_state(self, node) -> str:
        ch = self.channels(node)
        if not ch.size:
            return "none"
        p = self.pinned[ch]
        return "all" if p.all() else "some" if p.any() else "none"

    def op(self, node) -> str:
        if node.op == "call_module":
            return f"{node.target.rsplit('.', 1)[-1]}: {type(self.gm.get_submodule(node.target)).__name__}"
        if node.op == "call_function":
            return getattr(node.target, "__name__", str(node.target))
        if node.op == "call_method":
            return f".{node.target}()"
        return node.name

    @staticmethod
    def shape(node) -> str:
        meta = node.meta.get("tensor_meta")
        shape = getattr(meta, "shape", None)
        if shape is None:
            return ""
        dims = list(shape)[1:] if len(shape) > 1 else list(shape)
        return "×".join(str(d) for d in dims)


def _items(nodes, info: _NodeInfo, depth, chains: bool) -> list[_Item]:
    items: dict[str, _Item] = {}
    owner: dict[str, str] = {}
    for n in nodes:
        scope = info.scope(n)
        if depth is not None and len(scope) > depth:
            mod = scope[depth]
            key = "m:" + mod[0]
            it = items.setdefault(key, _Item(key, cluster=scope[:depth], module=mod))
        else:
            key = "n:" + n.name
            it = items.setdefault(key, _Item(key, cluster=scope))
        it.nodes.append(n)
        owner[n.name] = key
    drawn = {n.name for n in nodes}
    for it in items.values():
        exits = [n for n in it.nodes if n.op == "output" or any(owner.get(u.name) != it.key for u in n.users
                                                                 if u.name in drawn)] or it.nodes[-1:]
        groups = []
        for n in exits:
            groups.extend(g for g in info.groups(n) if g not in groups)
        it.groups = tuple(sorted(groups, key=info.order.get))
        states = {info.pin_state(n) for n in it.nodes}
        exit_states = {info.pin_state(n) for n in exits}
        it.pinned = "all" if exit_states == {"all"} else "some" if states - {"none"} else "none"
    edges = _edges(nodes, owner)
    if chains:
        items, edges = _merge_chains(items, edges)
    order = {k: i for i, k in enumerate(items)}
    edges, hidden = _thin_fan_in(edges, order)
    for it in items.values():
        it.edges_out = sorted(edges.get(it.key, ()), key=order.get)
        it.hidden_in = hidden.get(it.key, 0)
    return list(items.values())


def _thin_fan_in(edges: dict, order: dict, limit: int = FAN_IN):
    """Hide the in-edges of a box that reads more than ``limit`` boxes (a DenseNet layer reads every
    earlier layer) from sources that another kept in-edge already reaches: its ancestors.
    Boxes with few inputs (a residual add) keep every edge."""
    preds: dict[str, list[str]] = {}
    for a, bs in edges.items():
        for b in bs:
            preds.setdefault(b, []).append(a)
    ancestors: dict[str, set] = {}
    for key in sorted(order, key=order.get):
        anc = set()
        for p in preds.get(key, []):
            anc.add(p)
            anc |= ancestors.get(p, set())
        ancestors[key] = anc
    hidden: dict[str, int] = {}
    for b, ps in preds.items():
        if len(ps) <= limit:
            continue
        covered = set()
        for p in ps:
            covered |= ancestors.get(p, set())
        drop = [p for p in ps if p in covered]
        for p in drop:
            edges[p].remove(b)
        hidden[b] = len(drop)
    return edges, hidden


def _edges(nodes, owner) -> dict[str, list[str]]:
    edges: dict[str, list[str]] = {}
    for n in nodes:
        for u in n.users:
            a, b = owner.get(n.name), owner.get(u.name)
            if a and b and a != b and b not in edges.setdefault(a, []):
                edges[a].append(b)
    return edges


def _merge_chains(items: dict, edges: dict):
    """Merge a box into its only successor when that successor has no other predecessor and
    both sit in the same cluster, carry the same groups and pin state, and are single ops."""
    preds: dict[str, list[str]] = {}
    for a, bs in edges.items():
        for b in bs:
            preds.setdefault(b, []).append(a)

    def mergeable(a: _Item, b: _Item) -> bool:
        ends = {"placeholder", "output"}
        return (a.module is None and b.module is None and a.cluster == b.cluster and a.groups == b.groups
                and a.pinned == b.pinned and a.groups != () and a.nodes[-1].op not in ends
                and b.nodes[0].op not in ends)

    for key in list(items):
        if key not in items:
            continue
        it = items[key]
        while True:
            succ = edges.get(it.key, [])
            if len(succ) != 1 or len(preds.get(succ[0], [])) != 1 or not mergeable(it, items[succ[0]]):
                break
            nxt = items.pop(succ[0])
            it.nodes.extend(nxt.nodes)
            edges[it.key] = edges.pop(nxt.key, [])
            for b in edges[it.key]:
                preds[b] = [it.key if p == nxt.key else p for p in preds[b]]
    return items, edges


def _emit(items: list[_Item], info: _NodeInfo, graph, title) -> str:
    colour = {name: PALETTE[i % len(PALETTE)] for i, name in enumerate(graph.groups)}
    lines = ["digraph fxprune {",
             '  graph [rankdir=TB, ranksep=0.22, nodesep=0.18, fontname="Helvetica", fontsize=11, '
             'newrank=true, compound=true' + (f', label="{_esc(title)}", labelloc=t' if title else "") + "];",
             '  node [shape=box, style="rounded,filled", fontname="Helvetica", fontsize=9, margin="0.06,0.03", '
             'height=0.3, penwidth=0.8];',
             '  edge [arrowsize=0.5, color="#555555", penwidth=0.7];']
    # nested clusters: a tree keyed by scope prefixes
    tree: dict[tuple, list] = {}
    for it in items:
        tree.setdefault(it.cluster, []).append(it)
    prefixes = set()
    for c in tree:
        for i in range(1, len(c) + 1):
            prefixes.add(c[:i])
    ids = {it.key: f"b{i}" for i, it in enumerate(items)}

    def emit_cluster(prefix: tuple, indent: str):
        for it in tree.get(prefix, []):
            lines.append(indent + _box(it, ids[it.key], info, colour))
        children = sorted((p for p in prefixes if len(p) == len(prefix) + 1 and p[:len(prefix)] == prefix),
                          key=lambda p: _first_index(p, items))
        for child in children:
            qual, tname = child[-1]
            under = [it for it in items if it.cluster[:len(child)] == child]
            if len(under) == 1:      # a module drawn as one box needs no frame: its name goes in the box
                short = qual[len(prefix[-1][0]) + 1:] if prefix and qual.startswith(prefix[-1][0] + ".") else qual
                lines.append(indent + _box(under[0], ids[under[0].key], info, colour, title=f"{short} · {tname}"))
                continue
            lines.append(f'{indent}subgraph "cluster_{_esc(qual)}" {{')
            lines.append(f'{indent}  label="{_esc(qual)} · {_esc(tname)}"; style="rounded,dashed"; color="#9a9a9a"; '
                         'fontsize=10; fontcolor="#444444"; labeljust=l;')
            emit_cluster(child, indent + "  ")
            lines.append(f"{indent}}}")

    emit_cluster((), "  ")
    for it in items:
        for b in it.edges_out:
            lines.append(f"  {ids[it.key]} -> {ids[b]};")
    lines.extend(_legend())
    lines.append("}")
    return "\n".join(lines)


def _first_index(prefix, items) -> int:
    return next((i for i, it in enumerate(items) if it.cluster[:len(prefix)] == prefix), len(items))


def _box(it: _Item, bid: str, info: _NodeInfo, colour, title: str | None = None) -> str:
    first, last = it.nodes[0], it.nodes[-1]
    if it.module is not None:
        head = f"{it.module[0].rsplit('.', 1)[-1]} · {it.module[1]}"
        body = [f"{len(it.nodes)} ops"]
    elif first.op in ("placeholder", "output"):
        head, body = ("input " if first.op == "placeholder" else "") + first.name, []
    else:
        ops = [info.op(n) for n in it.nodes]
        head, body = ops[0], ops[1:]
        if len(body) > 5:
            body = body[:4] + [f"… +{len(body) - 4} more"]
    shape = info.shape(last)
    if it.groups:
        g = [_relative(name, it.cluster) for name in it.groups]
        body.append(f"group {g[0]}" if len(g) == 1 else f"{len(g)} groups: {g[0]} … {g[-1]}")
    if shape:
        body.append(shape)
    if it.hidden_in:
        body.append(f"(+ reads {it.hidden_in} earlier values)")
    label = "\\n".join(_esc(s) for s in ([title] if title else []) + [head] + body)
    style = ["striped"] if len(it.groups) > 1 else ["rounded", "filled"]
    attrs = [f'label="{label}"']
    if not it.groups:
        attrs.append(f'fillcolor="{FIXED_FILL}"')
    else:
        attrs.append('fillcolor="' + ":".join(colour[g] for g in it.groups[:MAX_STRIPES]) + '"')
    if it.module is not None and len(it.groups) <= 1:
        attrs.append("shape=box3d")
    if it.pinned != "none":
        attrs.append(f'color="{PIN_COLOR}", penwidth={2.2 if it.pinned == "all" else 1.6}')
        if it.pinned == "some":
            style.append("dashed")
        reasons = []
        for gname in it.groups:
            reasons.extend(r for r in info.pin_reasons.get(gname, []) if r not in reasons)
        if reasons:
            attrs.append(f'tooltip="{_esc("pinned: " + "; ".join(reasons[:4]))}"')
    else:
        attrs.append(f'tooltip="{_esc(", ".join(n.name for n in it.nodes[:20]))}"')
    attrs.append(f'style="{",".join(style)}"')
    return f"{bid} [{', '.join(a for a in attrs if a)}];"


def _relative(name: str, cluster: tuple) -> str:
    """A group name shortened by the innermost enclosing module's path (``…denselayer3.conv2``)."""
    for qual, _ in reversed(cluster):
        if name.startswith(qual + "."):
            return "…" + name[len(qual) + 1:]
    return name


def _legend() -> list[str]:
    cell = '<td bgcolor="{}" border="{}" color="{}" style="rounded">{}</td>'
    rows = [cell.format(PALETTE[0], 1, "#555555", "fill: the channel group of a value"),
            cell.format(PALETTE[1], 1, "#555555", "stripes: a value spanning several groups (cat)"),
            cell.format(PALETTE[4], 3, PIN_COLOR, "red border: channels pinned (dashed: some)"),
            cell.format(FIXED_FILL, 1, "#555555", "white: no prunable channel"),
            cell.format("#eeeeee", 1, "#555555", "3-D box: a whole module")]
    table = '<table border="0" cellspacing="3" cellpadding="3">' + "".join(f"<tr>{r}</tr>" for r in rows) + "</table>"
    return [f'  legend [shape=plaintext, style="", fontsize=9, label=<{table}>];']


def _esc(text: str) -> str:
    return str(text).replace("\\", "\\\\").replace('"', '\\"')


__all__ = ["group_rows", "group_table", "graph_to_dot", "render"]
