"""The features CATRO scores: per-channel scatter of pooled features, and the trace ratio of the
network's outputs under masked forwards (greedy backward elimination).

Part of :mod:`fxprune.passes.catro`.
"""
from __future__ import annotations

import torch

from fxprune.errors import ConfigError
from fxprune.verify.masked import MaskedRunner, feature_nodes, pooled_features

from .trace_ratio import ScatterStats

def group_stats(graph, groups, inputs, labels, base_drop=None, pool_size=1, batch_size=256, point="consumed"):
    """``{group: (b, w)}`` from the features of each group's tensors, on ``graph`` with ``base_drop`` zeroed;
    ``point`` picks the tensors (:func:`fxprune.verify.masked.feature_nodes`)."""
    names = {g.name: feature_nodes(graph, g, point) for g in groups}
    wanted = sorted({n for v in names.values() for n in v})
    stats = {g.name: None for g in groups}
    if not wanted:
        raise ConfigError("none of the groups has a tensor to take features from")
    for i in range(0, int(labels.shape[0]), batch_size):
        xb = tuple(x[i:i + batch_size] for x in inputs)
        yb = labels[i:i + batch_size]
        vals = MaskedRunner(graph, xb, base_drop=base_drop).run([[]], capture=wanted)
        for g in groups:
            feats = [pooled_features(graph, g, n, vals[n][0], pool_size) for n in names[g.name]]
            if not feats:
                continue
            f = torch.cat(feats, dim=2)
            if stats[g.name] is None:
                stats[g.name] = ScatterStats(g.size, f.shape[2])
            stats[g.name].update(f, yb)
    out = {}
    for g in groups:
        s = stats[g.name]
        if s is None:
            out[g.name] = (torch.zeros(g.size, dtype=torch.float64), torch.zeros(g.size, dtype=torch.float64))
        else:
            out[g.name] = (s.between(), s.within())
    return out


def output_trace_ratio(out: torch.Tensor, labels: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """``J = tr(S_b) / tr(S_w)`` of the network outputs ``out`` ``[masks, N, d]``, one value per mask.

        >>> out = torch.tensor([[[0.0], [0.2], [4.0], [4.2]], [[0.0], [4.0], [0.2], [4.2]]])
        >>> [round(v, 4) for v in output_trace_ratio(out, torch.tensor([0, 0, 1, 1])).tolist()]  # mask 0 separates
        [400.0004, 0.0025]
    """
    out = out.double().flatten(2)
    mu = out.mean(1, keepdim=True)
    between = torch.zeros(out.shape[0], dtype=torch.float64)
    within = torch.zeros(out.shape[0], dtype=torch.float64)
    for k in torch.unique(labels).tolist():
        f = out[:, labels == k]
        mk = f.mean(1, keepdim=True)
        between += f.shape[1] * (mk - mu).pow(2).sum((1, 2))
        within += (f - mk).pow(2).sum((1, 2))
    return between / (within + eps)


def backward_output(graph, g, k, inputs, labels, base_drop=None, eps: float = 1e-12, masks_per_forward: int = 16,
                    space: str = "logits", step: float = 0.05):
    """[I] The ``k``-set of group ``g`` by greedy backward elimination on the trace ratio of the network's
    *outputs* (:func:`output_trace_ratio`), with ``base_drop`` (earlier groups' pruned channels) zeroed:
    each round removes the channels whose removal keeps ``J`` highest. Pinned channels stay.
    ``space="probs"`` [I] takes the trace ratio of the softmax probabilities instead of the logits.
    Each round removes ``max(1, int(step * g.size))`` channels (the best-scoring removals of that
    round; one at a time for groups under 40 channels at the default), so a group costs about
    ``g.size / max(1, int(step * g.size))`` rounds of ``g.size`` masked forwards [I].

        >>> import torch, fxprune
        >>> net = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 1), torch.nn.Flatten(), torch.nn.Linear(4 * 16, 2)).eval()
        >>> x, y = torch.randn(20, 1, 4, 4), torch.arange(20) % 2
        >>> graph = fxprune.analyze(net, (x[:1],))
        >>> len(backward_output(graph, graph.prunable_groups()[0], 2, (x,), y))
        2
    """
    off = graph.offsets[g.name]
    runner = MaskedRunner(graph, inputs, masks_per_forward=masks_per_forward, base_drop=base_drop)
    alive = [j for j in range(g.size)]
    pinned = set(torch.nonzero(g.pinned).flatten().tolist())
    dropped: list[int] = []
    per_round = max(1, int(step * g.size))
    while len(alive) > k:
        cands = [j for j in alive if j not in pinned]
        outs = runner.run([[off + j for j in dropped + [c]] for c in cands])
        if space == "probs":
            outs = outs.softmax(-1)
        ratio = output_trace_ratio(outs, labels, eps)
        for i in torch.argsort(-ratio, stable=True)[:min(per_round, len(alive) - k)].tolist():
            alive.remove(cands[i])
            dropped.append(cands[i])
    return torch.tensor(sorted(alive))


def order_by_depth(graph, groups):
    runner = MaskedRunner(graph, tuple(t[:1] for t in graph.example_inputs))
    return sorted(groups, key=lambda g: runner.first_node(range(graph.offsets[g.name], graph.offsets[g.name] + g.size)))
