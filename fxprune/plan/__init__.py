"""The plan stage: :class:`Plan` (which channels each group keeps; JSON in and out) and the one
budget search that chooses it (:mod:`.budget`: :func:`make_plan` for per-group scores)."""
from .budget import Budget, check_budget, ignored_groups, keep_mask, make_plan, plan_from_mask, search
from .plan import Plan

__all__ = ["Budget", "Plan", "check_budget", "ignored_groups", "keep_mask", "make_plan", "plan_from_mask", "search"]
