"""The plan: which channels of each group to keep. Plain data: JSON in and out.

A :class:`Plan` maps group name to the sorted indices kept; groups not listed keep every
channel. It is enough to rebuild the pruned model from the original with
:func:`fxprune.apply`.

Example::

    >>> p = Plan({"conv1": [0, 2]}, {"conv1": 4}, {"method": "l2"})
    >>> Plan.from_json(p.to_json()) == p, p.removed
    (True, 2)
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field

import numpy as np
import torch

from ..errors import PlanError


@dataclass
class Plan:
    """Kept channel indices per group; groups not listed keep every channel."""

    keep: dict[str, list[int]]
    sizes: dict[str, int]
    meta: dict = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps({"format": "fxprune.plan/1", "keep": self.keep, "sizes": self.sizes, "meta": self.meta})

    @classmethod
    def from_json(cls, text: str) -> "Plan":
        try:
            data = json.loads(text)
            keep = {str(k): [int(i) for i in v] for k, v in data["keep"].items()}
            sizes = {str(k): int(v) for k, v in data["sizes"].items()}
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise PlanError(f"not an fxprune plan: {exc}. Write plans with Plan.to_json().") from exc
        return cls(keep, sizes, data.get("meta", {}))

    def save(self, path) -> None:
        with open(path, "w") as f:
            f.write(self.to_json())

    @classmethod
    def load(cls, path) -> "Plan":
        with open(path) as f:
            return cls.from_json(f.read())

    def mask(self, graph) -> torch.Tensor:
        """The global keep-mask over ``graph``'s channels; raises PlanError on any mismatch."""
        keep = np.ones(graph.num_channels, dtype=bool)
        for name, kept in self.keep.items():
            g = graph.groups.get(name)
            if g is None:
                raise PlanError(f"the plan names group '{name}', which this model does not have. "
                                "Apply a plan to the architecture (and example input shapes) it was made for.")
            if g.size != self.sizes.get(name):
                raise PlanError(f"group '{name}' has {g.size} channels in this model but {self.sizes.get(name)} "
                                "in the plan: the plan was made for another architecture.")
            idx = np.asarray(kept, dtype=np.int64)
            if idx.size == 0:
                raise PlanError(f"the plan keeps no channel of group '{name}': every group keeps at least one.")
            local = np.zeros(g.size, dtype=bool)
            if idx.min() >= 0 and idx.max() < g.size:
                local[idx] = True
            if idx.min() < 0 or idx.max() >= g.size or local.sum() != idx.size:
                raise PlanError(f"the plan's indices for group '{name}' are out of range or repeated.")
            if (g.pinned.numpy() & ~local).any():
                raise PlanError(f"the plan removes pinned channels of group '{name}' "
                                f"({'; '.join(str(p) for p in g.pins[:2])}).")
            if not g.balanced(torch.from_numpy(local)):
                raise PlanError(f"the plan keeps unequal counts in the blocks of group '{name}' (the input "
                                "channels of each group of a grouped convolution): every block keeps as many.")
            off = graph.offsets[name]
            keep[off:off + g.size] = local
        return torch.from_numpy(keep)

    @property
    def removed(self) -> int:
        return sum(self.sizes[k] - len(v) for k, v in self.keep.items())
