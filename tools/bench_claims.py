"""Each training-time paper's own claim, measured at small scale (mean ± std over seeds).

* ``dwgl``: DWGL removes more channels than plain group lasso at equal accuracy on a residual net.
  Digits, the small residual CNN of ``tests/digits.py``; proximal training (4 epochs) with the
  directed coefficients (``schedule="linear"``) or without them (``"none"``, plain group lasso), at
  several ``lam``; the channels every voter agrees on (``removable(tau=0.05)``) are cut and the cut
  model is evaluated without fine-tuning.
* ``oicsr``: the global greedy loop with retraining beats a one-shot cut at equal FLOPs. Digits;
  2 epochs with the OICSR term, then either ``oicsr.prune`` (steps of 10 % of the FLOPs, 1 epoch of
  OICSR retraining after each) or one ``compile(method="oicsr")`` cut followed by as many epochs of
  fine-tuning as the loop retrained.
  ``oicsr_fmnist``: the same on Fashion-MNIST ResNet-20 at 25 % of the FLOPs (``--targets``' smallest), at an
  equal budget, by the paper's procedure: the loop, then fine-tuning without the term; the one-shot arm
  fine-tunes for the same total epochs; the loop's floor on the one-shot cut too (``--oicsr-protocol``).
* ``gsm``: unstructured GSM (global top-Q by ``|w * g|``, momentum 0.99, Nesterov) reaches 10x fewer
  non-zero weights on a LeNet-5-style net on Fashion-MNIST within 0.5 point of the dense net,
  without fine-tuning; against global magnitude pruning of the dense net. GSM runs twice from the same
  dense net: with its defaults (the passive shrink) and with the paper's rule (``grow=0``).
* ``catro_subtask`` (``catro_subtask_fmnist``): CATRO's sub-task mode (``catro.subtask``, 3 of the 10
  classes, the classifier shrunk to them) keeps the 3-class accuracy better than ``l2`` at equal FLOPs.
  A net trained on all 10 classes (digits SmallResNet, 8 epochs; or the Fashion-MNIST teacher below) is
  cut to 50 % and 25 % of the FLOPs by the sub-task mode, by CATRO on all classes and by ``l2`` (the
  last two read only the 3 classes' logits); 3-class test accuracy right after the cut, with the BN
  statistics re-estimated on the 3 classes' training images, and after the same short fine-tuning.
* ``curl_few``: CURL with 500 labelled images (50 per class) beats fine-tuning the ``l2``-pruned model
  on them, and training the same small architecture from scratch on them. Teacher: SmallResNet
  trained on 20 000 Fashion-MNIST images (4 epochs); the 500 come from the other 40 000. CURL scores
  on 256 of the 500 and cuts; recovery as the authors' code (``fxprune.train.finetune``): KD with
  mixup against the teacher, then label refinement on the 6x expanded set. Baselines get the same
  number of SGD steps of cross-entropy; ``l2`` + the same KD and refinement separates the criterion
  from the recovery.

    python tools/bench_claims.py                       # dwgl, oicsr, gsm, 3 seeds (~15 min on 2 CPU cores)
    python tools/bench_claims.py --claims gsm --seeds 0 --gsm-epochs 2
    python tools/bench_claims.py --only catro_subtask  # ~5 min on 2 busy cores
    python tools/bench_claims.py --only oicsr_fmnist   # ~12 min a seed on a busy core
    python tools/bench_claims.py --only curl_few --cache /tmp/teachers        # ~50 min on 2 busy cores
    python tools/bench_claims.py --only catro_subtask_fmnist --targets 0.5 --cache /tmp/teachers  # ~10 min a seed

``--cache`` keeps the Fashion-MNIST teachers (one per seed, ~2 min each) for the next run.
"""
from __future__ import annotations

import argparse
import copy
import math
import os
import statistics
import sys
import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))

import fxprune  # noqa: E402
from fxprune.passes import catro, dwgl, gsm, oicsr  # noqa: E402
from fxprune.train import recalibrate_bn  # noqa: E402
from digits import SmallResNet, accuracy, load, train  # noqa: E402


def ms(v):
    return f"{statistics.mean(v):.3f} ± {statistics.stdev(v):.3f}" if len(v) > 1 else f"{v[0]:.3f}"


def digits_bases(seeds):
    (xtr, ytr), (xte, yte) = load()
    bases = {}
    for s in seeds:
        torch.manual_seed(s)
        bases[s] = train(SmallResNet(), xtr, ytr, epochs=8, seed=s)
    return ((xtr, ytr), (xte, yte)), bases


# ----------------------------------------------------------------------------- DWGL

def train_prox(model, reg, x, y, epochs, seed, lr=0.05, batch=64):
    """Proximal training: plain SGD, then the regularizer's proximal step after every step."""
    return train(model, x, y, epochs=epochs, lr=lr, batch=batch, seed=seed, after_step=lambda m: reg.prox(m, lr))


def voted_cut(model, reg, graph, x1, tau):
    """Cut exactly the channels every voter agrees on (each group keeps at least its best channel)."""
    votes = reg.removable(model, tau=tau)
    keep, sizes = {}, {}
    imp = dwgl.score(fxprune.analyze(model, (x1,)))
    for name, gone in votes.items():
        if not bool(gone.any()):
            continue
        kept = torch.nonzero(~gone).flatten().tolist() or [int(imp[name].argmax())]
        keep[name], sizes[name] = kept, graph.groups[name].size
    plan = fxprune.Plan(keep, sizes, {"method": "dwgl-vote"})
    return fxprune.apply(model, (x1,), plan, onnx=False), sum(sizes[n] - len(k) for n, k in keep.items())


def claim_dwgl(seeds, lams=(0.1, 0.3, 1.0), epochs=4, tau=0.05):
    ((xtr, ytr), (xte, yte)), bases = digits_bases(seeds)
    x1 = xtr[:1]
    graph = fxprune.analyze(bases[seeds[0]], (x1,))
    total = sum(g.size for g in graph.prunable_groups() if g.name != "fc")
    print(f"\n### DWGL against plain group lasso (digits, {epochs} proximal epochs, vote tau={tau}, "
          f"{total} prunable channels; no fine-tuning)\n")
    print("| lam | coefficients | channels removed by the vote | FLOPs kept | accuracy before the cut | after the cut |")
    print("|---|---|---|---|---|---|")
    for lam in lams:
        for schedule in ("linear", "none"):
            removed, flops, acc, before = [], [], [], []
            for s in seeds:
                reg = dwgl.Regularizer(graph, lam=lam, schedule=schedule)
                model = train_prox(copy.deepcopy(bases[s]), reg, xtr, ytr, epochs, s)
                before.append(accuracy(model, xte, yte))
                cut, n = voted_cut(model, reg, graph, x1, tau)
                rep = fxprune.report(cut)
                removed.append(n)
                flops.append(rep.flops_after / rep.flops_before)
                acc.append(accuracy(cut, xte, yte))
            label = "directed (DWGL)" if schedule == "linear" else "plain group lasso"
            print(f"| {lam} | {label} | {ms(removed)} | {ms(flops)} | {ms(before)} | {ms(acc)} |", flush=True)


# ----------------------------------------------------------------------------- OICSR

def claim_oicsr(seeds, flops=0.5, step=0.1, lam=3e-3):
    ((xtr, ytr), (xte, yte)), bases = digits_bases(seeds)
    x1 = xtr[:1]
    rows = {"greedy loop (retrain 1 epoch per step)": [], "one-shot, no fine-tuning": [],
            "one-shot + the same epochs of fine-tuning": [], "one-shot + the same epochs with the OICSR term": []}
    epochs_used, kept = [], []
    for s in seeds:
        base = bases[s]
        graph = fxprune.analyze(base, (x1,))
        model = train(copy.deepcopy(base), xtr, ytr, epochs=2, seed=s,
                      extra_loss=oicsr.Regularizer(graph, lam=lam, residual=True))
        rounds = []

        def retrain(module):
            rounds.append(1)
            g = fxprune.analyze(module, (x1,))
            train(module, xtr, ytr, epochs=1, lr=0.02, seed=s + len(rounds),
                  extra_loss=oicsr.Regularizer(g, lam=lam, residual=True))

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            greedy = oicsr.prune(model, (x1,), flops=flops, step=step, cap=0.6, residual=True, retrain=retrain)
        rows["greedy loop (retrain 1 epoch per step)"].append(accuracy(greedy, xte, yte))
        n = len(rounds)
        epochs_used.append(n)
        target = fxprune.cost.count_flops(greedy, (x1,)) / fxprune.cost.count_flops(base, (x1,))
        kept.append(target)
        one = fxprune.compile(model, (x1,), method="oicsr", flops=target, round_to=None, onnx=False)
        rows["one-shot, no fine-tuning"].append(accuracy(one, xte, yte))
        ft = copy.deepcopy(one)
        train(ft, xtr, ytr, epochs=n, lr=0.02, seed=s)
        rows["one-shot + the same epochs of fine-tuning"].append(accuracy(ft, xte, yte))
        reg_ft = copy.deepcopy(one)
        train(reg_ft, xtr, ytr, epochs=n, lr=0.02, seed=s,
              extra_loss=oicsr.Regularizer(fxprune.analyze(reg_ft, (x1,)), lam=lam, residual=True))
        rows["one-shot + the same epochs with the OICSR term"].append(accuracy(reg_ft, xte, yte))
    print_accuracies(f"OICSR: greedy loop against one-shot at equal FLOPs (digits, {ms(kept)} of the FLOPs kept, "
                     f"{ms(epochs_used)} retraining epochs)", rows)


def print_accuracies(title: str, rows: dict) -> None:
    """A titled markdown table of ``rows`` (``{pruning: [accuracy per seed]}``), mean ± std."""
    print(f"\n### {title}\n")
    print("| pruning | accuracy |")
    print("|---|---|")
    for name, acc in rows.items():
        print(f"| {name} | {ms(acc)} |", flush=True)


OICSR_PROTOCOLS = {
    "paper": "the paper's procedure at an equal budget: a fresh 1-epoch schedule per round, then fine-tuning "
             "without the OICSR term for as many epochs as the rounds took; the one-shot arm fine-tunes for the "
             "same total; floor 0.2 in both",
    "equal": "one cosine schedule over all epochs in both arms, no final fine-tuning, floor 0.2 in both",
    "first": "first protocol: a fresh 1-epoch schedule per round, no final fine-tuning, no floor on the one-shot cut",
}


def claim_oicsr_fmnist(seeds, flops=0.25, step=0.1, lam=5e-4, samples=8000, cap=0.8, protocol="paper"):
    """The OICSR claim on Fashion-MNIST ResNet-20 (``bench_accuracy``'s), at a deeper cut than on digits,
    where retraining between steps has more to recover: base 3 epochs of ``samples`` (lr 0.1), 2 epochs
    with the OICSR term, then the greedy loop (1 epoch of OICSR retraining per step, no group below
    ``1 - cap`` of its channels) against one cut at the FLOPs the loop reached followed by fine-tuning
    for the same number of epochs in all. 5000 test images.

    ``protocol`` (:data:`OICSR_PROTOCOLS`):

    * ``"paper"`` (the default): the paper's three steps, train with the term, the greedy loop with
      retraining, then fine-tuning without the term. Each round's epoch is a fresh cosine from 0.02;
      after the loop, as many epochs of fine-tuning (one cosine from 0.02) as the loop took rounds. The
      one-shot arm fine-tunes for the loop's rounds plus that tail, under one cosine from 0.02. Both
      keep every group at ``1 - cap`` of its channels or more.
    * ``"equal"``: the loop's rounds run under one cosine over all its epochs (:class:`oicsr.LoopSchedule`,
      the cuts happen during it as in gradual pruning), the same schedule as the one-shot arm's
      fine-tuning, the one-shot cut keeps the loop's floor; no final fine-tuning.
    * ``"first"``: the protocol as first written, each round's epoch a fresh cosine, no final
      fine-tuning and no floor on the one-shot cut."""
    from bench_accuracy import ResNet20, accuracy as acc_of, train as train_of
    from fxprune.io.datasets import fashion_mnist

    if protocol not in OICSR_PROTOCOLS:
        raise ValueError(f"protocol={protocol!r}: choose from {sorted(OICSR_PROTOCOLS)}")
    (xtr, ytr), (xte, yte) = fashion_mnist()
    data, test = (xtr, ytr), (xte[:5000], yte[:5000])
    x1 = xtr[:1]
    loop_row = ("greedy loop (1 epoch per step) + fine-tuning without the term" if protocol == "paper" else
                "greedy loop (retrain 1 epoch per step)")
    names = ["base", "greedy loop (retrain 1 epoch per step)", loop_row, "one-shot, no fine-tuning",
             "one-shot + the same epochs of fine-tuning"]
    if protocol != "paper":
        names.append("one-shot + the same epochs with the OICSR term")
    rows = {name: [] for name in names}  # the loop's row is named once unless a fine-tuning follows it
    epochs_used, kept = [], []
    per_epoch = math.ceil(samples / 128)
    planned = oicsr.planned_rounds(flops, step)

    def fit(model, epochs, lr, seed, reg=False, scheduler=None):
        extra = oicsr.Regularizer(fxprune.analyze(model, (x1,)), lam=lam, residual=True) if reg else None
        return train_of(model, data, epochs=epochs, lr=lr, samples=samples, seed=seed, device="cpu", extra_loss=extra,
                        desc="oicsr", scheduler=scheduler)

    for s in seeds:
        torch.manual_seed(s)
        base = train_of(ResNet20(), data, epochs=3, lr=0.1, samples=samples, seed=s, device="cpu", desc="base")
        rows["base"].append(acc_of(base, test, "cpu"))
        model = fit(copy.deepcopy(base), 2, 0.05, s, reg=True)
        rounds = []
        loop_lr = oicsr.LoopSchedule(planned * per_epoch) if protocol == "equal" else None

        def retrain(module):
            rounds.append(1)
            fit(module, 1, 0.02, s + len(rounds), reg=True, scheduler=loop_lr.attach if loop_lr else None)

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            greedy = oicsr.prune(model, (x1,), flops=flops, step=step, cap=cap, residual=True, retrain=retrain,
                                 onnx=False)
        n = len(rounds)
        rows["greedy loop (retrain 1 epoch per step)"].append(acc_of(greedy, test, "cpu"))
        total = n
        if protocol == "paper":  # step 3 of the paper: fine-tune without the term
            rows[loop_row].append(acc_of(fit(greedy, n, 0.02, s + 100), test, "cpu"))
            total = 2 * n
        epochs_used.append(total)
        if n != planned:
            print(f"seed {s}: the loop took {n} rounds, {planned} planned", file=sys.stderr, flush=True)
        target = fxprune.cost.count_flops(greedy, (x1,)) / fxprune.cost.count_flops(base, (x1,))
        kept.append(target)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            one = fxprune.compile(model, (x1,), method="oicsr", flops=target, onnx=False, round_to=None,
                                  floor=0.0 if protocol == "first" else 1 - cap)
        rows["one-shot, no fine-tuning"].append(acc_of(one, test, "cpu"))
        rows["one-shot + the same epochs of fine-tuning"].append(
            acc_of(fit(copy.deepcopy(one), total, 0.02, s), test, "cpu"))
        if protocol != "paper":
            rows["one-shot + the same epochs with the OICSR term"].append(
                acc_of(fit(copy.deepcopy(one), total, 0.02, s, reg=True), test, "cpu"))
        print(f"seed {s}: " + ", ".join(f"{k} {v[-1]:.4f}" for k, v in rows.items()) + f", {n} rounds, "
              f"{total} epochs after the pre-loop model, FLOPs {target:.3f}", file=sys.stderr, flush=True)
    print_accuracies(f"OICSR: greedy loop against one-shot at equal FLOPs (Fashion-MNIST ResNet-20, {ms(kept)} of the "
                     f"FLOPs kept, {ms(epochs_used)} epochs of {samples} samples after the pre-loop model; "
                     f"{OICSR_PROTOCOLS[protocol]})", rows)
    diff = [100 * (a - b) for a, b in zip(rows[loop_row], rows["one-shot + the same epochs of fine-tuning"])]
    print(f"\nloop minus one-shot + fine-tuning, points, per seed {seeds}: " + ", ".join(f"{d:+.2f}" for d in diff)
          + f"; {ms(diff)}", flush=True)


# ----------------------------------------------------------------------------- GSM

class LeNet5(nn.Module):
    """LeNet-5 for 28x28x1 (conv 20, conv 50, fc 500 as in Caffe's / GSM's LeNet-5: 431k weights)."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 20, 5)
        self.conv2 = nn.Conv2d(20, 50, 5)
        self.fc1 = nn.Linear(50 * 4 * 4, 500)
        self.fc2 = nn.Linear(500, 10)

    def forward(self, x):
        x = F.max_pool2d(self.conv1(x), 2)
        x = F.max_pool2d(self.conv2(x), 2)
        return self.fc2(F.relu(self.fc1(x.flatten(1))))


def train_fm(model, data, epochs, lr, seed, optimizer=None, batch=256):
    x, y = data
    torch.manual_seed(seed)
    model.train()
    opt = optimizer or torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4, nesterov=True)
    steps = epochs * math.ceil(len(y) / batch)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: 0.5 * (1 + math.cos(math.pi * min(k, steps) / steps)))
    gen = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        perm = torch.randperm(len(y), generator=gen)
        for i in range(0, len(y), batch):
            idx = perm[i:i + batch]
            loss = F.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    return model.eval()


@torch.no_grad()
def acc_fm(model, data):
    x, y = data
    model.eval()
    return sum((model(x[i:i + 2000]).argmax(1) == y[i:i + 2000]).sum().item() for i in range(0, len(y), 2000)) / len(y)


def claim_gsm(seeds, epochs=4, base_epochs=4, keep=0.1):
    """The defaults (the passive shrink, ``grow=0.05``) and the paper's rule (``grow=0``), same epochs."""
    from fxprune.io.datasets import fashion_mnist

    train_data, test_data = fashion_mnist()
    rows = {"dense": [], "magnitude top-10 % of the dense net": [],
            "GSM (defaults: passive shrink), before the cut": [], "GSM (defaults), then magnitude top-10 %": [],
            "GSM (the paper's rule, grow=0), then magnitude top-10 %": [], "GSM nonzero fraction": []}
    for s in seeds:
        torch.manual_seed(s)
        base = train_fm(LeNet5(), train_data, base_epochs, 0.05, s)
        rows["dense"].append(acc_fm(base, test_data))
        rows["magnitude top-10 % of the dense net"].append(
            acc_fm(gsm.masked_copy(base, gsm.magnitude_masks(base, keep)), test_data))
        for grow, name in ((None, "GSM (defaults), then magnitude top-10 %"),
                           (0.0, "GSM (the paper's rule, grow=0), then magnitude top-10 %")):
            model = copy.deepcopy(base)
            opt = gsm.GSM(model.named_parameters(), keep=keep, lr=3e-2, momentum=0.99, weight_decay=5e-4,
                          nesterov=True, grow=grow)
            train_fm(model, train_data, epochs, 3e-2, s, optimizer=opt)
            masked = gsm.masked_copy(model, gsm.magnitude_masks(model, keep))
            if grow is None:
                rows["GSM (defaults: passive shrink), before the cut"].append(acc_fm(model, test_data))
                rows["GSM nonzero fraction"].append(gsm.sparsity(masked)[1])
            rows[name].append(acc_fm(masked, test_data))
        print(f"seed {s}: " + ", ".join(f"{k} {v[-1]:.4f}" for k, v in rows.items()), file=sys.stderr, flush=True)
    print(f"\n### GSM unstructured: LeNet-5 on Fashion-MNIST, {keep:.0%} of the kernel weights kept "
          f"({base_epochs} dense epochs, {epochs} GSM epochs, no fine-tuning)\n")
    print("| model | test accuracy |")
    print("|---|---|")
    for name, v in rows.items():
        print(f"| {name} | {ms(v)} |", flush=True)
    gap = [100 * (d - g) for d, g in zip(rows["dense"], rows["GSM (defaults), then magnitude top-10 %"])]
    print(f"\nDense minus GSM (defaults) after the cut: {ms(gap)} points (largest {max(gap):.2f}).", flush=True)


# ----------------------------------------------------------------------------- shared: Fashion-MNIST teachers

FM_TEACHER = 20000  # the teachers see the first 20 000 training images; few-data sets come from the rest
_FM: dict = {}


def fm_data():
    if "data" not in _FM:
        from fxprune.io.datasets import fashion_mnist
        _FM["data"] = fashion_mnist()
    return _FM["data"]


def fm_teacher(seed):
    """SmallResNet (width 16) on 20 000 Fashion-MNIST images, 4 epochs, batch 128, lr 0.1 cosine (one per seed)."""
    if seed not in _FM:
        path = os.path.join(_FM["cache"], f"fm_teacher_{seed}.pt") if _FM.get("cache") else None
        if path and os.path.exists(path):
            _FM[seed] = SmallResNet()
            _FM[seed].load_state_dict(torch.load(path, weights_only=True))
            _FM[seed].eval()
        else:
            (xtr, ytr), _ = fm_data()
            torch.manual_seed(seed)
            _FM[seed] = train_fm(SmallResNet(), (xtr[:FM_TEACHER], ytr[:FM_TEACHER]), 4, 0.1, seed, batch=128)
            if path:
                os.makedirs(_FM["cache"], exist_ok=True)
                torch.save(_FM[seed].state_dict(), path)
    return _FM[seed]


def balanced(y, per_class, seed, start=0):
    """Indices of ``per_class`` samples of every class among ``y[start:]``, drawn with ``seed``, shuffled."""
    gen = torch.Generator().manual_seed(seed)
    idx = []
    for c in range(int(y.max()) + 1):
        pool = torch.nonzero(y[start:] == c).flatten() + start
        idx.append(pool[torch.randperm(len(pool), generator=gen)[:per_class]])
    idx = torch.cat(idx)
    return idx[torch.randperm(len(idx), generator=gen)]


def flops_kept(model, x1):
    rep = fxprune.report(model)
    return rep.flops_after / rep.flops_before


# ----------------------------------------------------------------------------- CURL, 500 labelled images

def reinitialised(model, seed):
    """A copy of ``model`` with every parameter and BN statistic drawn afresh (``reset_parameters``)."""
    torch.manual_seed(seed)
    fresh = copy.deepcopy(model)
    for m in fresh.modules():
        if hasattr(m, "reset_parameters"):
            m.reset_parameters()
    return fresh


def claim_curl_few(seeds, targets=(0.5, 0.25), n_few=500, kd_epochs=30, refine_epochs=5, test_size=5000):
    import fxprune.train.finetune as ft

    (xtr, ytr), (xte, yte) = fm_data()
    test = (xte[:test_size], yte[:test_size])
    batch = 32  # fxprune.train.finetune.fit's default, every row
    steps = kd_epochs * math.ceil(n_few / batch) + refine_epochs * math.ceil(6 * n_few / batch)
    ce_epochs = round(steps / math.ceil(n_few / batch))
    names = ["CURL cut, no training", "l2 cut, no training",
             f"CURL + KD with mixup ({kd_epochs} epochs)", "CURL + KD, then label refinement (the paper's recipe)",
             "l2 + fine-tuning (cross-entropy)", "l2 + KD, then label refinement",
             "CURL's pruned architecture from scratch (cross-entropy)"]
    rows = {(t, n): [] for t in targets for n in names}
    teacher_acc, kept = [], {t: [] for t in targets}
    for s in seeds:
        teacher = fm_teacher(s)
        teacher_acc.append(acc_fm(teacher, test))
        idx = balanced(ytr, n_few // 10, s, start=FM_TEACHER)
        x, y = xtr[idx], ytr[idx]
        x1 = x[:1]
        xe, ye = ft.expand(x, y, seed=s)

        def recover(cut):
            """CURL's small-data recovery: KD with mixup against the teacher, then label refinement on 6x."""
            m = copy.deepcopy(cut)
            ft.fit(m, x, y, stage="kd", teacher=teacher, epochs=kd_epochs, seed=s, progress=False)
            kd = acc_fm(m, test)
            labels = ft.RefinedLabels(ft.teacher_logits(teacher, xe))
            ft.fit(m, xe, ye, stage="refine", labels=labels, epochs=refine_epochs, seed=s, progress=False)
            return kd, acc_fm(m, test)

        def cross_entropy(model):
            m = copy.deepcopy(model)
            ft.fit(m, x, y, stage="ce", epochs=ce_epochs, seed=s, progress=False)
            return acc_fm(m, test)

        for t in targets:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                cut = fxprune.compile(teacher, (x1,), method="curl", data=x[:256], flops=t, round_to=None,
                                      onnx=False, seed=s, method_options={"progress": False})
                l2 = fxprune.compile(teacher, (x1,), method="l2", flops=t, round_to=None, onnx=False)
            kept[t] += [flops_kept(cut, x1), flops_kept(l2, x1)]
            kd, refined = recover(cut)
            l2_kd, l2_refined = recover(l2)
            got = [acc_fm(cut, test), acc_fm(l2, test), kd, refined, cross_entropy(l2), l2_refined,
                   cross_entropy(reinitialised(cut, s))]
            for n, v in zip(names, got):
                rows[(t, n)].append(v)
            print(f"seed {s} flops {t}: " + ", ".join(f"{v:.4f}" for v in got), file=sys.stderr, flush=True)
    print(f"\n### CURL with {n_few} labelled images (Fashion-MNIST, SmallResNet teacher trained on "
          f"{FM_TEACHER} images: {ms(teacher_acc)}; {test_size} test images)\n")
    print(f"Every row that trains takes the same {steps} SGD steps of batch {batch} on the same {n_few} images "
          f"(KD: {kd_epochs} epochs of the {n_few}, refinement: {refine_epochs} epochs of the 6x expanded set; "
          f"cross-entropy: {ce_epochs} epochs of the {n_few}).\n")
    print("| FLOPs kept | recovery | test accuracy |")
    print("|---|---|---|")
    for t in targets:
        for n in names:
            print(f"| {ms(kept[t])} | {n} | {ms(rows[(t, n)])} |", flush=True)


# ----------------------------------------------------------------------------- CATRO, sub-task

class Sliced(nn.Module):
    """The outputs ``classes`` of ``model`` (what a pruned 10-class model offers a 3-class sub-task)."""

    def __init__(self, model, classes):
        super().__init__()
        self.model = model
        self.register_buffer("idx", torch.tensor(classes))

    def forward(self, x):
        return self.model(x)[:, self.idx]


def claim_catro_subtask(seeds, dataset="digits", classes=(0, 1, 2), targets=(0.5, 0.25), ft_epochs=2,
                        samples_per_class=16):
    if dataset == "digits":
        ((xtr, ytr), (xte, yte)), bases = digits_bases(seeds)
    else:
        (xtr, ytr), (xte, yte) = fm_data()
        xtr, ytr = xtr[:FM_TEACHER], ytr[:FM_TEACHER]
        bases = {s: fm_teacher(s) for s in seeds}
    classes = sorted(classes)
    remap = torch.full((int(ytr.max()) + 1,), -1, dtype=torch.long)
    remap[torch.tensor(classes)] = torch.arange(len(classes))
    sub_tr, sub_te = torch.isin(ytr, torch.tensor(classes)), torch.isin(yte, torch.tensor(classes))
    x3, y3 = xtr[sub_tr], remap[ytr[sub_tr]]
    x3te, y3te = xte[sub_te], remap[yte[sub_te]]
    x1 = xtr[:1]
    names = ["unpruned, its 3 outputs", "CATRO sub-task mode", "CATRO on all 10 classes, its 3 outputs",
             "l2, its 3 outputs"]
    rows = {(t, n, f): [] for t in targets for n in names for f in (0, 1, 2)}
    kept = {(t, n): [] for t in targets for n in names}
    for s in seeds:
        base = bases[s]
        for t in targets:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                models = {
                    names[0]: Sliced(copy.deepcopy(base), classes),
                    names[1]: catro.subtask(base, (x1,), classes, (xtr, ytr), flops=t, round_to=None, onnx=False,
                                            progress=False,
                                            samples_per_class=samples_per_class),
                    names[2]: Sliced(fxprune.compile(base, (x1,), method="catro", data=(xtr, ytr), flops=t,
                                                     round_to=None, onnx=False, method_options={"progress": False,
                                                                                 "samples_per_class": samples_per_class}),
                                     classes),
                    names[3]: Sliced(fxprune.compile(base, (x1,), method="l2", flops=t, round_to=None, onnx=False),
                                     classes),
                }
            for n, m in models.items():
                inner = m.model if isinstance(m, Sliced) else m
                kept[(t, n)].append(flops_kept(inner, x1) if n != names[0] else 1.0)
                rows[(t, n, 0)].append(accuracy(m, x3te, y3te))
                rows[(t, n, 1)].append(accuracy(recalibrate_bn(m, [x3[i:i + 64] for i in range(0, len(x3), 64)]),
                                                x3te, y3te))
                train(m, x3, y3, epochs=ft_epochs, lr=0.01, seed=s)
                rows[(t, n, 2)].append(accuracy(m, x3te, y3te))
            print(f"seed {s} flops {t}: " + ", ".join("/".join(f"{rows[(t, n, f)][-1]:.3f}" for f in (0, 1, 2))
                                                      for n in names), file=sys.stderr, flush=True)
    what = "digits, SmallResNet trained 8 epochs" if dataset == "digits" else \
        f"Fashion-MNIST, SmallResNet trained on {FM_TEACHER} images"
    print(f"\n### CATRO sub-task mode against l2, classes {classes} ({what} on all 10 classes; "
          f"{len(y3)} training and {len(y3te)} test images of the 3 classes; CATRO sees {samples_per_class} per class; "
          f"BN re-estimation: one pass over the 3 classes' training images; fine-tuning: {ft_epochs} epochs of "
          "them, batch 64, SGD lr 0.01, from the cut)\n")
    print("| FLOPs kept | model | 3-class accuracy right after the cut | + BN re-estimation | after fine-tuning |")
    print("|---|---|---|---|---|")
    for t in targets:
        for n in names:
            print(f"| {ms(kept[(t, n)])} | {n} | " + " | ".join(ms(rows[(t, n, f)]) for f in (0, 1, 2)) + " |",
                  flush=True)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--claims", default="dwgl,oicsr,gsm")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--gsm-epochs", type=int, default=4)
    p.add_argument("--targets", default="0.5,0.25", help="FLOPs kept, for the CATRO and CURL claims")
    p.add_argument("--cache", help="a folder to keep the Fashion-MNIST teachers in, shared between runs")
    p.add_argument("--only", nargs="+", help="these claims only (e.g. --only catro_subtask curl_few)")
    p.add_argument("--oicsr-protocol", choices=sorted(OICSR_PROTOCOLS), default="paper",
                   help="oicsr_fmnist's protocol: " + "; ".join(f"{k}: {v}" for k, v in OICSR_PROTOCOLS.items()))
    cfg = p.parse_args(argv)
    torch.set_num_threads(1)
    seeds = [int(s) for s in cfg.seeds.split(",")]
    targets = tuple(float(t) for t in cfg.targets.split(","))
    _FM["cache"] = cfg.cache
    claims = {"dwgl": lambda: claim_dwgl(seeds), "oicsr": lambda: claim_oicsr(seeds),
              "gsm": lambda: claim_gsm(seeds, epochs=cfg.gsm_epochs),
              "oicsr_fmnist": lambda: claim_oicsr_fmnist(seeds, flops=min(targets), protocol=cfg.oicsr_protocol),
              "catro_subtask": lambda: claim_catro_subtask(seeds, "digits", targets=targets),
              "catro_subtask_fmnist": lambda: claim_catro_subtask(seeds, "fmnist", targets=targets, ft_epochs=1),
              "curl_few": lambda: claim_curl_few(seeds, targets=targets)}
    chosen = cfg.only or cfg.claims.split(",")
    unknown = [c for c in chosen if c not in claims]
    if unknown:
        p.error(f"unknown claim(s) {unknown}; choose from {sorted(claims)}")
    for claim in chosen:
        claims[claim]()


if __name__ == "__main__":
    main()
