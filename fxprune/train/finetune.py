"""Fine-tuning a pruned model on limited data: CURL's distillation with mixup and label refinement.

Pieces a user calls from their own loop (``docs/methods.md``, CURL, "small data"):

* :func:`mixup` mixes a batch with a shuffled copy of itself (``lambda ~ Beta(alpha, alpha)``);
* :class:`KDMixupLoss`: ``0.7 T^2 KL(p_teacher^T || p_student^T) + 0.3 [lam CE(y) + (1-lam) CE(y_perm)]``
  with ``T = 2``, as the authors' ``2_mixup_kd`` stage;
* :class:`RefinedLabels`: one stored logit vector per training sample, initialised to the
  teacher's, used as the target ``0.7 KL(p_student || p_label) + 0.3 CE`` (``T = 1``) and
  itself moved by a plain gradient step (``lr = 1``) after each batch, so the labels drift
  towards the student (the authors' ``3_label_refine`` stage);
* :func:`expand` builds the expanded set for refinement: the originals, patch-shuffled copies
  on 2x2, 3x3 and 4x4 grids, a cutout copy and a randomly rotated copy (6x);
* :func:`fit`: a small trainer (SGD with momentum, cosine schedule with linear warm-up,
  a ``tqdm`` bar) that runs either stage on tensors; :func:`teacher_logits` computes the
  teacher's outputs in eval mode.

Example::

    >>> import torch, fxprune.train.finetune as ft
    >>> teacher = torch.nn.Linear(4, 3).eval()
    >>> student = torch.nn.Linear(4, 3)
    >>> x, y = torch.randn(64, 4), torch.randint(0, 3, (64,))
    >>> _ = ft.fit(student, x, y, teacher=teacher, stage="kd", epochs=2, progress=False)
    >>> labels = ft.RefinedLabels(ft.teacher_logits(teacher, x))
    >>> _ = ft.fit(student, x, y, labels=labels, stage="refine", epochs=1, progress=False)
    >>> bool((labels.logits != ft.teacher_logits(teacher, x)).any())   # the labels moved
    True
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..errors import ConfigError, DataError
from ..utils import eval_mode
from .bn import bn_layers


def mixup(x: torch.Tensor, y: torch.Tensor, alpha: float = 1.0, generator: torch.Generator | None = None):
    """``(x_mixed, y, y_perm, lam)``: ``x_mixed = lam x + (1 - lam) x[perm]``, ``lam ~ Beta(alpha, alpha)``."""
    if alpha <= 0:
        return x, y, y, 1.0
    seed = int(torch.randint(0, 2**31 - 1, (), generator=generator))
    lam = float(np.random.default_rng(seed).beta(alpha, alpha))
    perm = torch.randperm(x.shape[0], generator=generator)
    return lam * x + (1 - lam) * x[perm], y, y[perm], lam


class KDMixupLoss(nn.Module):
    """Distillation with mixup: ``alpha T^2 KL(teacher^T || student^T) + (1 - alpha) mixed CE``.

    ``forward(student_logits, teacher_logits, y, y_perm=None, lam=1.0)``; teacher and
    student both saw the mixed input. Defaults ``T = 2``, ``alpha = 0.7`` [V-code].

        >>> loss = KDMixupLoss()
        >>> s, y = torch.tensor([[2.0, 0.0]]), torch.tensor([0])
        >>> float(loss(s, s, y)) == float(0.3 * F.cross_entropy(s, y))   # no KL term when they agree
        True
    """

    def __init__(self, temperature: float = 2.0, alpha: float = 0.7):
        super().__init__()
        if temperature <= 0 or not 0 <= alpha <= 1:
            raise ConfigError(f"KDMixupLoss needs temperature > 0 and alpha in [0, 1], got {temperature}, {alpha}")
        self.t, self.alpha = temperature, alpha

    def forward(self, student, teacher, y, y_perm=None, lam: float = 1.0):
        t = self.t
        kd = F.kl_div(F.log_softmax(student / t, 1), F.log_softmax(teacher.detach() / t, 1),
                      reduction="batchmean", log_target=True) * t * t
        ce = lam * F.cross_entropy(student, y)
        if y_perm is not None and lam < 1:
            ce = ce + (1 - lam) * F.cross_entropy(student, y_perm)
        return self.alpha * kd + (1 - self.alpha) * ce


class RefinedLabels:
    """Per-sample soft labels (logits) refined by gradient steps during training.

    ``labels = RefinedLabels(teacher_logits, lr=1.0, alpha=0.7)``; in the loop:
    ``loss = labels.loss(student_logits, idx, y)``, ``loss.backward()``, ``opt.step()``,
    ``labels.step()``. The loss is ``alpha KL(softmax(s) || softmax(q[idx])) +
    (1 - alpha) CE(s, y)`` (``T = 1``); ``step`` does ``q[idx] -= lr * dL/dq[idx]``, which
    is ``lr * alpha / B * (softmax(q) - softmax(s))`` [V-code].
    """

    def __init__(self, logits: torch.Tensor, lr: float = 1.0, alpha: float = 0.7):
        if logits.dim() != 2:
            raise DataError(f"RefinedLabels needs logits of shape [samples, classes], got {tuple(logits.shape)}")
        self.logits = logits.detach().clone().float()
        self.lr, self.alpha = lr, alpha
        self._pending = None

    def __len__(self):
        return self.logits.shape[0]

    def loss(self, student: torch.Tensor, idx: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        q = self.logits[idx].clone().requires_grad_(True)
        self._pending = (idx, q)
        kl = F.kl_div(F.log_softmax(q, 1), F.log_softmax(student, 1), reduction="batchmean", log_target=True)
        return self.alpha * kl + (1 - self.alpha) * F.cross_entropy(student, y)

    @torch.no_grad()
    def step(self) -> None:
        """Apply the gradient step to the labels of the last :meth:`loss` (after ``backward``)."""
        if self._pending is None:
            return
        idx, q = self._pending
        if q.grad is not None:
            self.logits[idx] = q.detach() - self.lr * q.grad
        self._pending = None


@torch.no_grad()
def teacher_logits(teacher: nn.Module, x: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """The teacher's logits on ``x`` in eval mode (its training flags are restored)."""

    with eval_mode(teacher):
        return torch.cat([teacher(x[i:i + batch_size]) for i in range(0, len(x), batch_size)]).float()


def _patch_shuffle(x, grid, gen):
    h, w = x.shape[-2] // grid, x.shape[-1] // grid
    if h == 0 or w == 0:
        return x.clone()
    out = x.clone()
    cells = [(i, j) for i in range(grid) for j in range(grid)]
    for n in range(x.shape[0]):
        perm = torch.randperm(len(cells), generator=gen).tolist()
        for (i, j), k in zip(cells, perm):
            si, sj = cells[k]
            out[n, ..., i * h:(i + 1) * h, j * w:(j + 1) * w] = x[n, ..., si * h:(si + 1) * h, sj * w:(sj + 1) * w]
    return out


def _cutout(x, gen, lo=0.2, hi=0.5):
    out = x.clone()
    H, W = x.shape[-2:]
    for n in range(x.shape[0]):
        fh, fw = (lo + (hi - lo) * torch.rand(2, generator=gen)).tolist()
        h, w = max(1, int(round(fh * H))), max(1, int(round(fw * W)))
        i = int(torch.randint(0, H - h + 1, (), generator=gen))
        j = int(torch.randint(0, W - w + 1, (), generator=gen))
        out[n, ..., i:i + h, j:j + w] = 0
    return out


def _rotate(x, gen):
    from torchvision.transforms.functional import rotate

    angles = (torch.rand(x.shape[0], generator=gen) * 360).tolist()
    return torch.stack([rotate(img, a) for img, a in zip(x, angles)])


def expand(x: torch.Tensor, y: torch.Tensor, seed: int = 0, grids=(2, 3, 4), cutout: bool = True,
           rotation: bool = True):
    """The expanded set ``(x', y')`` for label refinement: originals first, then one copy per transform.

    Transforms [V-code]: patch shuffle on each grid of ``grids``, cutout (a rectangle of
    20-50 % of each side set to 0), rotation by a random angle in [0, 360). Every copy
    keeps its label. Images are ``[N, C, H, W]``.

        >>> xe, ye = expand(torch.randn(3, 1, 8, 8), torch.arange(3))
        >>> xe.shape, ye.tolist()[:6]
        (torch.Size([18, 1, 8, 8]), [0, 1, 2, 0, 1, 2])
    """
    if x.dim() != 4 or y.shape[0] != x.shape[0]:
        raise DataError(f"expand needs images [N, C, H, W] and N labels, got {tuple(x.shape)} and {tuple(y.shape)}")
    gen = torch.Generator().manual_seed(seed)
    parts = [x] + [_patch_shuffle(x, g, gen) for g in grids]
    if cutout:
        parts.append(_cutout(x, gen))
    if rotation:
        parts.append(_rotate(x, gen))
    return torch.cat(parts), y.repeat(len(parts))


def warmup_cosine(total_steps: int, warmup_steps: int = 0):
    """``LambdaLR`` factor: linear warm-up, then cosine decay to 0."""
    def factor(step):
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        t = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, t)))
    return factor


def fit(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, stage: str = "ce", teacher: nn.Module | None = None,
        labels: RefinedLabels | None = None, epochs: int = 1, lr: float | None = None, batch_size: int = 32,
        momentum: float = 0.9, weight_decay: float = 4e-5, warmup_epochs: float | None = None,
        mixup_alpha: float = 1.0, temperature: float = 2.0, alpha: float = 0.7, seed: int = 0,
        progress: bool = True, bn_stats: str | None = None) -> nn.Module:
    """Train ``model`` in place on tensors ``x, y`` and return it in eval mode.

    ``stage``: ``"ce"`` (plain cross-entropy), ``"kd"`` (:class:`KDMixupLoss` against
    ``teacher`` on mixup batches; defaults ``lr=0.01``, 5 warm-up epochs capped at a
    tenth of the run) or ``"refine"`` (:class:`RefinedLabels` ``labels``, one per row of
    ``x``; defaults ``lr=1e-4``, no warm-up). SGD with momentum and a cosine schedule;
    a ``tqdm`` bar shows the epoch and the running loss.

    ``bn_stats``: ``"update"`` trains batch norms as usual (batch statistics, running ones updated);
    ``"frozen"`` keeps every batch norm in eval mode (its running statistics used and kept; its affine
    parameters still trained). Default: ``"frozen"`` for ``"refine"``, ``"update"`` otherwise. [I] The
    authors' refinement trains in plain train mode; but 5 of every 6 images of the expanded set are
    distorted copies (shuffled patches, cutout, rotation), and at refinement's small learning rate what
    the stage changes most is the running statistics, re-estimated on those copies: on Fashion-MNIST
    (500 images, ResNet at 25 % of the FLOPs) that cost 1.2 points that the frozen statistics keep
    (``tools/results/claims.md``). ``bn_stats="update"`` is the authors' setting.
    """
    if stage not in ("ce", "kd", "refine"):
        raise ConfigError(f"stage='{stage}' must be 'ce', 'kd' or 'refine'")
    if stage == "kd" and teacher is None:
        raise ConfigError("stage='kd' needs teacher= (the unpruned model)")
    if stage == "refine" and (labels is None or len(labels) != len(x)):
        raise ConfigError("stage='refine' needs labels=RefinedLabels(teacher_logits(teacher, x)), one row per sample")
    if x.shape[0] != y.shape[0] or x.shape[0] == 0:
        raise DataError(f"fit needs as many labels as samples, got {x.shape[0]} and {y.shape[0]}")
    bn_stats = bn_stats or ("frozen" if stage == "refine" else "update")
    if bn_stats not in ("update", "frozen"):
        raise ConfigError(f"bn_stats='{bn_stats}' must be 'update' or 'frozen'")
    lr = lr if lr is not None else {"ce": 0.01, "kd": 0.01, "refine": 1e-4}[stage]
    if warmup_epochs is None:
        warmup_epochs = min(5.0, 0.1 * epochs) if stage == "kd" else 0.0
    gen = torch.Generator().manual_seed(seed)
    steps_per_epoch = math.ceil(len(x) / batch_size)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, warmup_cosine(epochs * steps_per_epoch, int(warmup_epochs * steps_per_epoch)))
    kd = KDMixupLoss(temperature, alpha)
    model.train()
    if bn_stats == "frozen":
        for m in bn_layers(model):
            m.eval()
    if teacher is not None:
        teacher_was = teacher.training
        teacher.eval()
    bar = tqdm(range(epochs), desc=f"fine-tune ({stage})", disable=not progress, leave=False)
    for epoch in bar:
        perm = torch.randperm(len(x), generator=gen)
        total, count = 0.0, 0
        for i in range(0, len(x), batch_size):
            idx = perm[i:i + batch_size]
            xb, yb = x[idx], y[idx]
            if stage == "kd":
                xb, yb, yp, lam = mixup(xb, yb, mixup_alpha, gen)
                with torch.no_grad():
                    t = teacher(xb)
                loss = kd(model(xb), t, yb, yp, lam)
            elif stage == "refine":
                loss = labels.loss(model(xb), idx, yb)
            else:
                loss = F.cross_entropy(model(xb), yb)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            if stage == "refine":
                labels.step()
            total, count = total + float(loss.detach()) * len(idx), count + len(idx)
        bar.set_postfix(loss=f"{total / count:.4f}")
    if teacher is not None:
        teacher.train(teacher_was)
    return model.eval()
