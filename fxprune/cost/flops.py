"""Costs: parameter counts, FLOPs (``torch.utils.flop_counter``) and their prediction for a plan.

FLOPs are counted once per node of the original graph with ``FlopCounterMode`` (while
tracing, see :class:`fxprune.capture.values.ValueProp`). A
plan's FLOPs then follow without any forward pass: a node's count scales with the kept
fraction of each channel label the coupling analysis recorded for it (a conv: its
output channels times its input channels; a depthwise conv: its output channels).

Example::

    >>> import torch, torchvision
    >>> from fxprune.cost import count_flops, count_params
    >>> net = torchvision.models.resnet18()
    >>> count_params(net), count_flops(net, (torch.randn(1, 3, 224, 224),))
    (11689512, 3628146688)
"""
from __future__ import annotations

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

from ..capture.values import propagate_on_meta
from ..ops.formulas import EXTRA_FLOP_FORMULAS
from ..utils import eval_mode


def count_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def count_flops(module: torch.nn.Module, example_inputs: tuple) -> int:
    """FLOPs of one forward pass in eval mode (a multiply-add counts 2), as ``FlopCounterMode`` counts them."""
    counting = FlopCounterMode(display=False, custom_mapping=EXTRA_FLOP_FORMULAS)
    with eval_mode(module), torch.no_grad(), counting as counter:
        module(*example_inputs)
    return int(counter.get_total_flops())


def graph_flops(gm: torch.nn.Module, example_inputs: tuple) -> int:
    """FLOPs of a ``GraphModule`` counted node by node on the ``meta`` device, as the analysis
    counts the original (:class:`fxprune.capture.values.ValueProp`): a pruned model's count is then
    comparable with its original's. (A real eval-mode run can take fused fast paths, such as
    ``nn.MultiheadAttention``'s, that ``FlopCounterMode`` has no formula for.)"""
    try:
        with eval_mode(gm), torch.no_grad():
            propagate_on_meta(gm, tuple(example_inputs))
    except Exception:  # an op with no meta kernel: count a real run instead
        return count_flops(gm, example_inputs)
    return sum(n.meta.get("flops", 0) for n in gm.graph.nodes)


class CostModel:
    """Predict params and FLOPs of the pruned model from a global channel keep-mask.

    ``graph`` is a :class:`fxprune.ir.ChannelGraph`; ``keep`` a bool array over its
    channels. Exact for conv and linear layers, which hold all the FLOPs that
    ``FlopCounterMode`` counts in CNNs.
    """

    def __init__(self, graph):
        self.flops_terms = []
        nodes = {n.name: n for n in graph.module.graph.nodes}
        for name, flops in graph.node_flops.items():
            terms = graph.costs.get(name)
            if terms is None:
                label = nodes[name].meta.get("fxprune")
                terms = [(1.0, [label.flatten()] if isinstance(label, torch.Tensor) else [])]
            for share, labels in terms:
                self.flops_terms.append((flops * share, [lab.numpy() for lab in labels]))
        self.param_terms = []
        slots: dict[str, list[np.ndarray]] = {}
        for (param, _dim), ch in graph.param_channels.items():
            slots.setdefault(param, []).append(ch.numpy())
        for (param, _dim), ch in getattr(graph, "grouped_params", {}).items():  # each group's kept share
            slots.setdefault(param, []).append(ch.numpy().reshape(-1))
        numel = {n: p.numel() for n, p in graph.module.named_parameters()}
        for param, chans in slots.items():
            if param in numel:
                self.param_terms.append((numel[param], chans))
        self.base_params = sum(numel.values())
        self.base_flops = sum(graph.node_flops.values())
        self.fixed_params = self.base_params - sum(n for n, _ in self.param_terms)

    @staticmethod
    def _frac(ids: np.ndarray, keep: np.ndarray) -> float:
        if ids.size == 0:
            return 1.0
        kept = np.where(ids < 0, True, keep[np.clip(ids, 0, None)])
        return float(kept.mean())

    def flops(self, keep: np.ndarray) -> float:
        total = 0.0
        for flops, labels in self.flops_terms:
            f = float(flops)
            for lab in labels:
                f *= self._frac(lab, keep)
            total += f
        return total

    def params(self, keep: np.ndarray) -> float:
        total = float(self.fixed_params)
        for numel, chans in self.param_terms:
            f = float(numel)
            for ch in chans:
                f *= self._frac(ch, keep)
            total += f
        return total

