"""CATRO (Hu et al., TNNLS 2023): keep the channels whose features best separate the classes.

A reconstruction (see ``docs/methods.md``; the paper's formulation was not available:
everything here beyond the abstract is an interpretation [M/I]). On a few labelled
samples per class, every channel ``j`` of a group gets the traces of its blocks of the
between- and within-class scatter of its pooled features,

    b_j = sum_k n_k ||mu_kj - mu_j||^2        w_j = sum_k sum_{i in k} ||f_ij - mu_kj||^2

(running per-class sums; for a residual stream, the features of every tensor the
group's consumers read, i.e. every block output of the stage, are stacked). A set ``S``
of channels scores ``J(S) = sum_S b / sum_S w``.

* **Inner stage** (:func:`dinkelbach`): for a fixed keep count ``k``, the trace-ratio
  (Dinkelbach) iteration ``lambda = J(S); S = top-k(b - lambda w)`` reaches the best
  ``k``-set in a few steps. Dead channels (``b = w = 0``) are never chosen unless needed.
* **Outer stage** (:func:`allocate`): keep counts per group under the FLOPs (or
  parameter) budget. ``allocation="uniform"`` (default) [I]: the same fraction of every
  group, the fraction found by a binary search on the budget. ``allocation="greedy"`` [I]:
  repeatedly remove one channel from the group that loses the least discriminative
  energy per FLOP, a group's energy at ``k`` being ``R(k) = sum_{S*_k} b / sum_all b``
  (the share of its between-class scatter that its best ``k``-set keeps); the greedy
  order does not depend on the budget, and a binary search on its length meets it.
  An earlier reconstruction suggested pricing by ``J*(k) / J*(c)``, but ``J*`` grows as ``k``
  shrinks (a ratio favours fewer, better channels), so it cannot price a removal. On
  digits the greedy strips the residual stream (4 of 16 channels left) and does worse
  after fine-tuning than the uniform split, hence the default.
* **Sequential selection** [I]: the groups are then visited shallow to deep; each one's
  features are recomputed on the network whose earlier groups are already pruned to
  their chosen sets (:class:`fxprune.verify.masked.MaskedRunner`), and its ``k``-set is chosen
  by the inner stage. ``sequential=False`` uses the unpruned network's features throughout.
* **Sub-task mode** (:func:`subtask`): samples of the chosen classes only, and the
  classifier shrunk to those classes.
* **Feature space of the trace ratio** (``features``) [I]: ``"output"`` (default) scores a
  ``k``-set of a group by the trace ratio ``tr(S_b) / tr(S_w)`` of the network's *outputs*
  (the logits: the feature space the classifier separates) when only that set of the group
  is kept, earlier groups already pruned, and finds it by greedy backward elimination
  (:func:`backward_output`; one masked forward per candidate channel and round, with
  :class:`fxprune.verify.masked.MaskedRunner`); ``space="logits"`` (default) or ``"probs"`` (the
  softmax of the outputs) [I]. This reads "measures the joint impact of multiple
  channels by feature space discrimination" as the discrimination that the kept channels
  leave at the end of the network, and is the "greedy iterative" part of the inner stage.
  ``"own"`` is the reconstruction from the abstract: the traces of each channel's own pooled
  features and the Dinkelbach iteration above. Note that for a coordinate subspace the
  full-matrix trace ratio ``tr(S_b[K, K]) / tr(S_w[K, K])`` *is* ``sum_K b / sum_K w``
  (a trace only sees the diagonal), so the off-diagonal scatter cannot change that choice.
  On digits (SmallResNet, 50 % FLOPs, 10 CE steps on 320 samples) ``"own"`` does no better
  than ``random`` and ``"output"`` does: see the tests and the numbers in the docstring of
  :func:`plan`.

Options [I] with their defaults: ``samples_per_class=16`` (class-balanced: at most that
many of each class are used), ``pool_size=1`` (global average pooling; ``s`` gives
``s x s`` adaptive pooling; ``features="own"`` only), ``point="consumed"`` (where a channel's
features are read, ``features="own"`` only: ``"consumed"`` the values the next layers read, after
BN and the activation; ``"normalized"`` the BN outputs; ``"produced"`` the conv outputs before BN;
see :func:`fxprune.verify.masked.feature_nodes`), ``max_iter=10``, ``eps=1e-12``,
``sequential=True``, ``allocation="uniform"``, ``classes=None`` (all the classes the data
holds), ``features="output"``, ``space="logits"``, ``step=0.05`` (the fraction of a group
removed per round of the backward elimination, at least one channel: the cost control for
wide groups), and for ``features="own"``: ``objective="ratio"`` (the
trace ratio above) or ``"between"`` (keep the ``k`` largest ``b_j``: the between-class
trace alone, an fxprune variant that is not the paper's), and ``reg=0.0``: the
within-class scatter regularised as ``S_w + reg * tr(S_w) / c * I`` (``reg -> inf`` tends
to ``"between"``). Labels are required.

Example::

    >>> import torch, fxprune
    >>> from fxprune.passes import catro
    >>> b, w = torch.tensor([4.0, 1.0, 3.0, 0.0]), torch.tensor([1.0, 1.0, 4.0, 0.0])
    >>> catro.dinkelbach(b, w, 2)[0].tolist()     # the best pair by (b1 + b2) / (w1 + w2)
    [0, 1]
"""
from __future__ import annotations

from .data import collect
from .features import backward_output, group_stats, output_trace_ratio
from .method import ALLOCATIONS, FEATURES, SPACES, plan, score
from .subtask import subtask
from .trace_ratio import OBJECTIVES, ScatterStats, choose, dinkelbach, energy_curve

__all__ = ["ALLOCATIONS", "FEATURES", "OBJECTIVES", "SPACES", "ScatterStats", "backward_output", "choose", "collect",
           "dinkelbach", "energy_curve", "group_stats", "output_trace_ratio", "plan", "score", "subtask"]
