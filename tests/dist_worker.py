"""Worker for tests/test_distributed.py: DWGL + structured GSM training, single process or DDP under torchrun;
then CURL's scores and CATRO's plan on a fixed network, their masked forwards split across the ranks.

    torchrun --standalone --nproc_per_node=2 tests/dist_worker.py OUT_DIR     # each rank writes OUT_DIR/rank{r}.pt

``run(world=1, rank=0)`` is the same training in one process, on the same global
batches (rank ``r`` of ``w`` takes samples ``r, r + w, ...`` of each batch).
"""
from __future__ import annotations

import os
import sys

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import fxprune  # noqa: E402
from fxprune.passes import catro, curl, dwgl, gsm  # noqa: E402

STEPS, BATCH = 6, 32


class TinyRes(nn.Module):
    """A residual CNN without BatchNorm (per-rank batch statistics would differ from one process)."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(1, 8, 3, padding=1)
        self.a = nn.Conv2d(8, 8, 3, padding=1)
        self.b = nn.Conv2d(8, 8, 3, padding=1)
        self.down = nn.Conv2d(8, 12, 3, stride=2, padding=1)
        self.fc = nn.Linear(12, 10)

    def forward(self, x):
        x = F.relu(self.stem(x))
        x = F.relu(x + self.b(F.relu(self.a(x))))
        x = F.relu(self.down(x))
        return self.fc(x.mean((2, 3)))


def run(world: int = 1, rank: int = 0) -> dict:
    """Train a few steps; returns the per-step GSM channel masks, the final weights and the DWGL plan."""
    from digits import load

    torch.manual_seed(0)
    torch.set_num_threads(1)
    (xtr, ytr), _ = load()
    model = TinyRes()
    graph = fxprune.analyze(model, (xtr[:1],))
    reg = dwgl.Regularizer(graph, lam=1e-2, flops=0.5, every=2)          # told the budget, as in the README
    opt = gsm.GSM(model.named_parameters(), graph=graph, flops=0.6, every=2, lr=0.05, momentum=0.98, weight_decay=1e-3)
    net = torch.nn.parallel.DistributedDataParallel(model) if world > 1 else model
    masks = []
    for step in range(STEPS):
        idx = torch.arange(step * BATCH, (step + 1) * BATCH)[rank::world]
        loss = F.cross_entropy(net(xtr[idx]), ytr[idx]) + reg(net)
        opt.zero_grad()
        loss.backward()
        opt.step()
        masks.append({k: v.clone() for k, v in opt.active.items()})
    trained = fxprune.analyze(model.eval(), (xtr[:1],))
    plan = fxprune.make_plan(trained, dwgl.score(trained), flops=0.5)
    torch.manual_seed(1)
    fixed = TinyRes().eval()
    graph = fxprune.analyze(fixed, (xtr[:1],))
    curl_scores = curl.score(graph, (xtr[:48], ytr[:48]), num_samples=24, masks_per_forward=3, progress=False)
    catro_plan = catro.plan(graph, (xtr[:200], ytr[:200]), flops=0.5, samples_per_class=4, progress=False)
    return {"masks": masks, "state": {k: v.detach().clone() for k, v in model.state_dict().items()},
            "plan": plan.keep, "votes": {k: v.clone() for k, v in reg.removable(model, tau=0.5).items()},
            "scheduled": reg.scheduled, "curl": curl_scores, "curl_forwards": curl.score.last_forwards,
            "catro": catro_plan.keep}


def main(out_dir: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    result = run(world, rank)
    torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
