"""GSM: global sparse momentum SGD (Ding et al., NeurIPS 2019; docs/methods.md).

:class:`GSM` is a ``torch.optim.SGD`` that, at every step, lets only the ``Q`` most
important parameters follow the gradient; all the others receive only weight decay,
which the (high) momentum turns into a steady drift to zero:

    B = [T >= Q-th largest T],   T = |w * dL/dw|          (first-order Taylor, this batch)
    Z <- momentum * Z + weight_decay * W + B * dL/dW
    W <- W - lr * Z

``Q = keep * N`` (``keep = 1 / compression``). Two modes:

* **unstructured** (the paper; no ``graph``): ``N`` counts the entries of the kernels
  (tensors of 2 or more dims); biases and norm parameters train normally. The final
  cut keeps the ``Q`` largest ``|w|`` globally: :func:`magnitude_masks`,
  :func:`masked_copy` (a copy masked with ``torch.nn.utils.prune``) and
  :func:`sparsity` (a table).
* **structured** (``graph=``, an interpretation): the units are the channels of the
  graph's prunable groups, ``T_i = |sum over every trainable member slice of channel i
  of w * g|``, ``N`` counts the unpinned channels. A passive channel's gradient is masked
  in *every* member (conv rows and columns, biases, BN affine), so the whole channel
  decays and can be removed losslessly; ``fxprune.compile(model, x, method="gsm",
  flops=...)`` then removes it (:func:`score` is the L2 norm of the channel's
  parameters). The budget is ``keep`` (fraction of channels active) or ``flops``
  (fraction of the FLOPs kept, the budget ``compile`` is given): every ``every`` steps
  the saliency summed since the last choice goes to :func:`fxprune.make_plan`, and the
  channels it removes are passive until the next choice.

**Passive shrink** (both modes, an interpretation for short budgets): with the paper's
rule a passive unit only decays by ``lr * weight_decay`` through the momentum, far from
zero after a few epochs, so the final cut still costs accuracy. After each step the
passive entries (and their momentum) are also multiplied by ``1 - min(ceiling, grow * step)``
(default ``grow=0.05``, ``ceiling=0.2``), so that they reach ~0 and the final cut is free.
``grow=0`` is the paper's rule. (LeNet-5 on Fashion-MNIST, 10 % of the kernel weights, 4
epochs: the cut costs 0.0 points with the shrink, 1.6 with the paper's rule;
``tools/bench_claims.py``.)

Masks are computed from the gradients present at ``step()``; under DDP those are
already averaged over ranks, so every rank computes the same mask. Give parameters with
their names (``model.named_parameters()``, or ``model.parameters()`` together with
``model=``) so that the structured mode can find the group members.

Example::

    >>> import torch, fxprune
    >>> from fxprune.passes.gsm import GSM
    >>> net = torch.nn.Sequential(torch.nn.Linear(4, 4, bias=False))
    >>> opt = GSM(net.named_parameters(), lr=0.1, momentum=0.0, weight_decay=0.0, keep=0.25)
    >>> net(torch.randn(8, 4)).pow(2).sum().backward()
    >>> opt.step()
    >>> int(opt.masks["0.weight"].sum())        # 4 of 16 entries got their gradient
    4
"""
from __future__ import annotations

import copy
import warnings

import torch

from fxprune.errors import ConfigError
from fxprune.pipeline import resolve_rounding
from fxprune.plan import make_plan
from fxprune.plan.budget import DEFAULT

from .group_lasso import channel_sq_norms, graph_tensors, trainable_members


class GSM(torch.optim.SGD):
    """Global sparse momentum SGD (see the module docstring).

    ``keep`` (fraction of units that get gradients) or ``compression`` (``1/keep``);
    ``graph`` switches to structured mode; ``saliency`` is ``"taylor"`` (``|sum w*g|`` per
    unit, the paper) or ``"abs"`` (``sum |w*g|``); ``kernels_only`` (unstructured) restricts
    the competition to tensors of 2+ dims; ``passive_weight_decay`` (default
    ``weight_decay``) is the decay of passive units, a knob for short runs. ``flops``
    (structured mode) is a FLOPs budget instead of ``keep``; ``every`` the steps between
    two choices of the active set in that mode, each rounded by ``round_to`` as ``compile`` will
    round the cut (not given: the fast counts for a model with 2-d convolutions, as ``compile``'s
    default, so that the cut takes the passive channels); ``grow`` and ``ceiling`` the passive
    shrink (``grow=0``: the paper). The masks of the last step are in ``self.masks``
    (parameter name -> bool tensor) and, in structured mode, ``self.active`` (group name
    -> bool tensor).
    """

    def __init__(self, params, lr: float = 5e-3, momentum: float = 0.98, weight_decay: float = 1e-4, *,
                 keep: float | None = None, compression: float | None = None, flops: float | None = None, graph=None,
                 model=None, saliency: str = "taylor", kernels_only: bool = True,
                 passive_weight_decay: float | None = None, nesterov: bool = False, every: int = 10,
                 grow: float | None = None, ceiling: float = 0.2, round_to=DEFAULT):
        if sum(b is not None for b in (keep, compression, flops)) != 1:
            raise ConfigError("give exactly one of keep= (fraction of weights kept), compression= (1 / keep) "
                              "or flops= (fraction of the FLOPs kept, with graph=)")
        if flops is not None:
            if graph is None:
                raise ConfigError("flops= needs graph= (structured GSM): the FLOPs budget is over channel groups")
            if not 0 < flops <= 1:
                raise ConfigError(f"flops={flops} is out of range: the fraction of the model's FLOPs kept, in (0, 1]")
        else:
            keep = 1.0 / compression if compression is not None else keep
            if not 0 < keep <= 1:
                raise ConfigError(f"keep={keep} is out of range: the fraction of units that stay, in (0, 1]")
        if saliency not in ("taylor", "abs"):
            raise ConfigError(f"saliency='{saliency}' is unknown: choose 'taylor' (|sum w*g|) or 'abs' (sum |w*g|)")
        if not (isinstance(every, int) and every >= 1):
            raise ConfigError(f"every={every} must be a positive integer (steps between two choices of the active set)")
        grow = 0.05 if grow is None else grow
        if not (grow >= 0 and 0 <= ceiling < 1):
            raise ConfigError(f"grow={grow} must be >= 0 and ceiling={ceiling} in [0, 1): the passive shrink's "
                              "rise per step and its cap")
        super().__init__(params, lr=lr, momentum=momentum, weight_decay=weight_decay, nesterov=nesterov)
        self.keep, self.flops, self.graph, self.saliency, self.kernels_only = keep, flops, graph, saliency, kernels_only
        self.passive_weight_decay = passive_weight_decay
        self.every, self.grow, self.ceiling = every, float(grow), float(ceiling)
        self.steps = 0
        self._acc: dict[str, torch.Tensor] = {}
        self.named = self._names(model)
        # the flops= schedule rounds as compile(flops=...) will round the cut (fxprune.pipeline.resolve_rounding)
        self.round_to, self.latency_model = resolve_rounding(graph, round_to, relaxed=True) if flops is not None \
            else (None, None)
        self.masks: dict[str, torch.Tensor] = {}
        self.active: dict[str, torch.Tensor] = {}
        if graph is not None:
            self._members = {g.name: [m for m in trainable_members(graph, g) if m.param in self.named]
                             for g in graph.prunable_groups()}
            if not any(self._members.values()):
                raise ConfigError("none of the optimizer's parameters is a member of the graph's prunable groups: "
                                  "pass model.named_parameters() of the model that was analysed (or model=)")

    def _names(self, model) -> dict[str, torch.Tensor]:
        if model is not None:
            inner = model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model
            by_id = {id(p): n for n, p in inner.named_parameters()}
            named = {}
            for group in self.param_groups:
                for p in group["params"]:
                    if id(p) not in by_id:
                        raise ConfigError("a parameter given to GSM is not one of model='s parameters")
                    named[by_id[id(p)]] = p
            return named
        named = {}
        for group in self.param_groups:
            names = group.get("param_names")
            if names is None:
                if self.graph is None:
                    return {f"param{i}": p for i, p in enumerate(p for g in self.param_groups for p in g["params"])}
                raise ConfigError("structured GSM needs parameter names: pass model.named_parameters() "
                                  "(or model.parameters() together with model=model)")
            for n, p in zip(names, group["params"]):
                named[n[len("module."):] if n.startswith("module.") else n] = p
        return named

    @torch.no_grad()
    def compute_masks(self) -> dict[str, torch.Tensor]:
        """The gradient masks ``B`` for the gradients now in ``.grad`` (also stored in ``self.masks``)."""
        self.masks = self._structured() if self.graph is not None else self._unstructured()
        return self.masks

    def _unstructured(self):
        units = {n: p for n, p in self.named.items() if p.grad is not None and (p.dim() >= 2 or not self.kernels_only)}
        if not units:
            return {}
        sal = {n: (p * p.grad).abs() for n, p in units.items()}
        flat = torch.cat([s.flatten() for s in sal.values()])
        q = max(1, int(flat.numel() * self.keep))
        threshold = torch.topk(flat, q, sorted=False).values.min()
        return {n: s >= threshold for n, s in sal.items()}

    def _structured(self):
        tensors = {n: p.detach() for n, p in self.named.items()}
        sal, unpinned = {}, []
        for name, members in self._members.items():
            g = self.graph.groups[name]
            s = torch.zeros(g.size, dtype=torch.float64)
            for m in members:
                p = self.named[m.param]
                if p.grad is None:
                    continue
                prod = (tensors[m.param] * p.grad).movedim(m.dim, 0).reshape(p.shape[m.dim], -1)
                per_pos = prod.abs().sum(1) if self.saliency == "abs" else prod.sum(1)
                s += g.reduce(per_pos.double().cpu(), m)
            sal[name] = s.abs()
            unpinned.append(sal[name][~g.pinned])
        if self.flops is not None:
            self._schedule(sal)
        else:
            flat = torch.cat(unpinned)
            q = max(1, int(flat.numel() * self.keep))
            threshold = torch.topk(flat, q, sorted=False).values.min()
            self.active = {n: (s >= threshold) | self.graph.groups[n].pinned for n, s in sal.items()}
        masks = {}
        for name, members in self._members.items():
            act = self.active[name]
            for m in members:
                p = self.named[m.param]
                along = torch.ones(p.shape[m.dim], dtype=torch.bool)
                inside = m.index >= 0
                along[inside] = act[m.index[inside]]
                shape = [1] * p.dim()
                shape[m.dim] = -1
                prev = masks.get(m.param, torch.ones(p.shape, dtype=torch.bool))
                masks[m.param] = prev & along.view(shape).to(prev.device)
        return masks

    def _schedule(self, sal):
        """FLOPs mode: every ``every`` steps, the saliency summed since the last choice goes to
        :func:`fxprune.make_plan`; the channels it removes are passive until the next choice."""
        for name, s in sal.items():
            self._acc[name] = self._acc[name] + s if name in self._acc else s.clone()
        if self.active and self.steps % self.every != 0:
            return
        scores = {n: s.float() for n, s in self._acc.items()}
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="the budget cannot be met")
            plan = make_plan(self.graph, scores, flops=self.flops, round_to=self.round_to,
                             latency_model=self.latency_model, ranking="importance", meta={"method": "gsm"})
        self.active = {}
        for name in sal:
            act = torch.ones(self.graph.groups[name].size, dtype=torch.bool)
            if name in plan.keep:
                act[:] = False
                act[torch.tensor(plan.keep[name], dtype=torch.long)] = True
            self.active[name] = act
        self._acc = {}

    @property
    def shrink(self) -> float:
        """The passive shrink factor of the current step: ``min(ceiling, grow * step)``."""
        return min(self.ceiling, self.grow * self.steps)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        masks = self.compute_masks()
        wd_of = {id(p): g["weight_decay"] for g in self.param_groups for p in g["params"]}
        for name, mask in masks.items():
            p = self.named[name]
            if p.grad is None:
                continue
            mask = mask.to(p.device)
            p.grad.mul_(mask)
            if self.passive_weight_decay is not None:
                extra = self.passive_weight_decay - wd_of[id(p)]
                p.grad.add_(p.detach() * (~mask) * extra)
        super().step()
        self.steps += 1
        shrink = self.shrink
        if shrink > 0:        # the passive units' faster decay (an interpretation, see the module docstring)
            for name, mask in masks.items():
                p = self.named[name]
                factor = torch.where(mask.to(p.device), 1.0, 1.0 - shrink).to(p.dtype)
                p.mul_(factor)
                buf = self.state[p].get("momentum_buffer")
                if buf is not None:
                    buf.mul_(factor)
        return loss


def magnitude_masks(model, keep: float, kernels_only: bool = True) -> dict[str, torch.Tensor]:
    """The final unstructured cut: keep the ``keep`` fraction of kernel entries with the largest ``|w|``, globally.

        >>> net = torch.nn.Linear(2, 2, bias=False)
        >>> with torch.no_grad():
        ...     _ = net.weight.copy_(torch.tensor([[1.0, -4.0], [0.5, 3.0]]))
        >>> magnitude_masks(net, 0.5)["weight"].tolist()
        [[False, True], [False, True]]
    """
    if not 0 < keep <= 1:
        raise ConfigError(f"keep={keep} is out of range: the fraction of weights kept, in (0, 1]")
    named = {n: p.detach() for n, p in model.named_parameters() if p.dim() >= 2 or not kernels_only}
    flat = torch.cat([p.abs().flatten() for p in named.values()])
    q = max(1, int(flat.numel() * keep))
    threshold = torch.topk(flat, q, sorted=False).values.min()
    return {n: p.abs() >= threshold for n, p in named.items()}


def masked_copy(model, masks: dict[str, torch.Tensor]):
    """A copy of ``model`` with ``torch.nn.utils.prune`` masks applied (masked entries are 0 and stay 0 in training)."""
    from torch.nn.utils import prune as torch_prune

    new = copy.deepcopy(model)
    for name, mask in masks.items():
        owner, _, attr = name.rpartition(".")
        try:
            module = new.get_submodule(owner)
        except AttributeError:
            raise ConfigError(f"the masks name '{name}', which the model does not have") from None
        torch_prune.custom_from_mask(module, attr, mask.to(getattr(module, attr).device))
    return new


def sparsity(model, kernels_only: bool = True):
    """Per tensor and in total, how many entries are non-zero; returns ``(table text, kept fraction)``."""
    from tabulate import tabulate

    rows, total, nonzero = [], 0, 0
    for name, module in model.named_modules():
        for attr, p in list(module.named_parameters(recurse=False)) + list(module.named_buffers(recurse=False)):
            if attr.endswith("_mask"):
                continue
            attr = attr[:-len("_orig")] if attr.endswith("_orig") else attr
            value = getattr(module, attr)
            if value.dim() < 2 and kernels_only:
                continue
            n, nz = value.numel(), int((value != 0).sum())
            rows.append([f"{name}.{attr}" if name else attr, n, nz, f"{nz / n:.1%}"])
            total, nonzero = total + n, nonzero + nz
    rows.append(["total", total, nonzero, f"{nonzero / max(total, 1):.1%}"])
    return tabulate(rows, headers=["tensor", "entries", "non-zero", "kept"]), nonzero / max(total, 1)


def score(graph, data=None, seed=0):
    """Structured GSM's final cut: the L2 norm of every trainable member slice of a channel (passive ones are ~0)."""
    tensors = graph_tensors(graph)
    return {g.name: channel_sq_norms(tensors, g, trainable_members(graph, g)).float().sqrt()
            for g in graph.prunable_groups()}


# its cut takes what the schedule drove to zero: both on the relaxed fast counts (fxprune.pipeline.resolve_rounding)
score.relaxed_fast_counts = True
