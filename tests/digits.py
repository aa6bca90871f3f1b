"""scikit-learn's 8x8 digits as tensors, a small residual CNN, and a seconds-long trainer.

Shared by the method tests (real data that ships offline).

    >>> (xtr, ytr), (xte, yte) = load()
    >>> xtr.shape, xte.shape
    (torch.Size([1437, 1, 8, 8]), torch.Size([360, 1, 8, 8]))
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


def load(seed: int = 0):
    """(train, test) pairs of (images [N, 1, 8, 8] scaled to [0, 1] then standardised, labels)."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0
    x = (x - 0.3) / 0.35
    y = torch.tensor(d.target, dtype=torch.long)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    x, y = x[perm], y[perm]
    n = int(0.8 * len(y))
    return (x[:n], y[:n]), (x[n:], y[n:])


class Block(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv1 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c)

    def forward(self, x):
        return F.relu(x + self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x))))))


class SmallResNet(nn.Module):
    """stem conv → 2 residual blocks (width ``c``) → stride-2 conv → 1 block (``2c``) → pool → fc."""

    def __init__(self, c: int = 16, classes: int = 10):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, c, 3, padding=1, bias=False), nn.BatchNorm2d(c), nn.ReLU())
        self.stage1 = nn.Sequential(Block(c), Block(c))
        self.down = nn.Sequential(nn.Conv2d(c, 2 * c, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(2 * c), nn.ReLU())
        self.stage2 = Block(2 * c)
        self.fc = nn.Linear(2 * c, classes)

    def forward(self, x):
        x = self.stage2(self.down(self.stage1(self.stem(x))))
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


def train(model, x, y, epochs: int = 8, lr: float = 0.05, batch: int = 64, seed: int = 0, extra_loss=None,
          optimizer=None, after_step=None):
    """Plain SGD training; ``extra_loss(model)`` is added to the loss (a regularizer), and
    ``after_step(model)`` runs after every optimizer step (a proximal update)."""
    torch.manual_seed(seed)
    model.train()
    opt = optimizer or torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=1e-4)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        perm = torch.randperm(len(y), generator=gen)
        for i in range(0, len(y), batch):
            idx = perm[i:i + batch]
            loss = F.cross_entropy(model(x[idx]), y[idx])
            if extra_loss is not None:
                loss = loss + extra_loss(model)
            opt.zero_grad()
            loss.backward()
            opt.step()
            if after_step is not None:
                after_step(model)
    return model.eval()


@torch.no_grad()
def accuracy(model, x, y) -> float:
    was = model.training
    model.eval()
    acc = (model(x).argmax(1) == y).float().mean().item()
    model.train(was)
    return acc
