"""First-order Taylor criterion: the loss change predicted when a channel is zeroed.

For channel ``i`` of a group, with ``w`` all of its member slices and ``g`` their
gradients, the score is ``|sum(w * g)|``, the first-order estimate of how much the loss
moves if those parameters are set to zero, averaged over batches. The loss is the
cross-entropy with the batch labels, or, when the data has no labels, the mean square of
the outputs; of a model with several outputs (a tuple, a dict, a Hugging Face ``ModelOutput``) it
reads the first floating-point one (:func:`fxprune.utils.primary_output`). Runs the analysed copy
in eval mode; the user's model is not touched.

Example::

    >>> import torch, fxprune
    >>> from fxprune.passes import taylor
    >>> net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 1), torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.Linear(64, 2))
    >>> x = torch.randn(8, 3, 4, 4)
    >>> graph = fxprune.analyze(net, (x[:1],))
    >>> taylor.score(graph, data=(x, torch.randint(0, 2, (8,))))["0"].shape
    torch.Size([4])
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from fxprune.utils import eval_mode, primary_output
from fxprune.io.data import batches

from .magnitude import STATISTICS, per_position


def score(graph, data=None, seed=0, max_batches: int = 8):
    groups = graph.prunable_groups()
    names = sorted({m.param for g in groups for m in g.members if m.role not in STATISTICS})
    params = [graph.param(n) for n in names]
    total = {g.name: torch.zeros(g.size) for g in groups}
    count = 0
    with eval_mode(graph.module):
        for inputs, labels in batches(data, max_batches):
            leaves = [p.detach().requires_grad_(True) for p in params]
            out = torch.func.functional_call(graph.module, dict(zip(names, leaves)), inputs)
            out = primary_output(out)
            if labels is not None:
                loss = F.cross_entropy(out.flatten(1) if out.dim() > 2 else out, labels)
            else:
                loss = out.float().pow(2).mean()
            grads = dict(zip(names, torch.autograd.grad(loss, leaves, allow_unused=True)))
            values = dict(zip(names, leaves))
            for g in groups:
                s = torch.zeros(g.size)
                for m in g.members:
                    grad = grads.get(m.param)
                    if grad is None:
                        continue
                    prod = values[m.param].detach() * grad
                    s += g.reduce(per_position(prod, m.dim, lambda f: f.sum(1)), m)
                total[g.name] += s.abs()
            count += 1
    return {k: v / count for k, v in total.items()}
