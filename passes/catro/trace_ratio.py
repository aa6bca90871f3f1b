"""CATRO's inner stage on per-channel scatter traces: the trace-ratio (Dinkelbach) iteration
and the energy curve of the best ``k``-sets.

Part of :mod:`fxprune.passes.catro`.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from fxprune.errors import ConfigError

class ScatterStats:
    """Running per-class sums of features ``[N, c, p]``: enough for ``b_j`` and ``w_j``.

        >>> s = ScatterStats(2, 1)
        >>> s.update(torch.tensor([[[0.0], [1.0]], [[2.0], [1.0]]]), torch.tensor([0, 1]))
        >>> s.update(torch.tensor([[[0.0], [3.0]], [[2.0], [3.0]]]), torch.tensor([0, 1]))
        >>> s.between(), s.within()     # channel 0 separates the classes; channel 1 does not
        (tensor([4., 0.], dtype=torch.float64), tensor([0., 4.], dtype=torch.float64))
    """

    def __init__(self, channels: int, p: int):
        self.c, self.p = channels, p
        self.n: dict[int, int] = {}
        self.sum: dict[int, torch.Tensor] = {}
        self.sq: dict[int, torch.Tensor] = {}

    def update(self, feats: torch.Tensor, y: torch.Tensor) -> None:
        feats = feats.detach().double().cpu()
        for k in torch.unique(y).tolist():
            f = feats[y.cpu() == k]
            if k not in self.n:
                self.n[k], self.sum[k], self.sq[k] = 0, torch.zeros(self.c, self.p, dtype=torch.float64), \
                    torch.zeros(self.c, dtype=torch.float64)
            self.n[k] += f.shape[0]
            self.sum[k] += f.sum(0)
            self.sq[k] += f.pow(2).sum((0, 2))

    def between(self) -> torch.Tensor:
        total = sum(self.n.values())
        mu = sum(self.sum.values()) / total
        return sum(n * (self.sum[k] / n - mu).pow(2).sum(1) for k, n in self.n.items())

    def within(self) -> torch.Tensor:
        w = sum(self.sq[k] - self.sum[k].pow(2).sum(1) / n for k, n in self.n.items())
        return w.clamp(min=0)


# --- inner stage --------------------------------------------------------------------------------

def dinkelbach(b: torch.Tensor, w: torch.Tensor, k: int, forced: torch.Tensor | None = None, eps: float = 1e-12,
               max_iter: int = 10, ridge: float = 0.0):
    """The ``k``-set maximising ``sum_S b / (sum_S w + eps)``: ``(indices, ratio, iterations)``.

    ``forced`` (bool) channels are always in the set. Dead channels (``b + w <= eps``)
    are chosen last. Starts from the top-``k`` of ``b / w``; stops when the set repeats.
    """
    b, w = b.double(), w.double()
    c = b.numel()
    if not 1 <= k <= c:
        raise ConfigError(f"keep count {k} out of range 1..{c}")
    forced = torch.zeros(c, dtype=torch.bool) if forced is None else forced.clone()
    if int(forced.sum()) > k:
        raise ConfigError(f"{int(forced.sum())} channels must stay but only {k} may be kept")
    dead = (b + w) <= eps
    w = w + ridge

    def top(key):
        key = key.clone()
        key[dead] = -math.inf
        key[forced] = math.inf
        order = torch.argsort(-key, stable=True)  # ties: the lower index first
        return torch.sort(order[:k]).values

    def ratio(sel):
        return float(b[sel].sum() / (w[sel].sum() + eps))

    sel = top(b / (w + eps))
    lam, it = ratio(sel), 0
    for it in range(1, max_iter + 1):
        new = top(b - lam * w)
        new_lam = ratio(new)
        if torch.equal(new, sel) or new_lam <= lam + 1e-15 * abs(lam):
            if new_lam > lam:
                sel, lam = new, new_lam
            break
        sel, lam = new, new_lam
    return sel, lam, it


OBJECTIVES = ("ratio", "between")


def choose(b, w, k, forced=None, objective: str = "ratio", eps: float = 1e-12, max_iter: int = 10,
           reg: float = 0.0) -> torch.Tensor:
    """The ``k`` channels kept: the trace-ratio optimum (``"ratio"``, :func:`dinkelbach`) or, with
    ``objective="between"``, the ``k`` largest ``b_j`` (the trace of the kept between-class scatter
    alone). [I] ``"between"`` is an fxprune option, not the paper's criterion.

        >>> choose(torch.tensor([4.0, 1.0, 3.0]), torch.tensor([1.0, 1.0, 4.0]), 2, objective="between").tolist()
        [0, 2]
    """
    if objective == "ratio":
        return dinkelbach(b, w, k, forced, eps, max_iter, ridge=reg * float(w.double().mean()))[0]
    key = b.double().clone()
    if forced is not None:
        key[forced] = math.inf
    return torch.sort(torch.argsort(-key, stable=True)[:k]).values


def energy_curve(b, w, forced=None, eps=1e-12, max_iter=10, objective: str = "ratio", reg: float = 0.0):
    """``R(k)`` for ``k = 0..c``: share of ``sum b`` kept by the best ``k``-set (``R(0) = 0``)."""
    c = b.numel()
    total = float(b.double().sum()) + eps
    n_forced = 0 if forced is None else int(forced.sum())
    out = np.zeros(c + 1)
    for k in range(max(1, n_forced), c + 1):
        sel = choose(b, w, k, forced, objective, eps, max_iter, reg)
        out[k] = float(b.double()[sel].sum()) / total
    return out


# --- statistics from the network ----------------------------------------------------------------
