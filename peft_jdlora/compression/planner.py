"""The budget planner: one option per module that minimises the predicted mean error within a float budget.

Pure Python on the candidate curves (no torch), so it can be tested on hand-made curves. The objective is the
report's mean error, Σ_m Σ_i w_i,m · error_i,m with w_i,m = 1 / (N · modules of adapter i): the paper's squared
relative error, averaged over modules per adapter, then over adapters. Since it is a sum over modules, choosing one
option per module under a float budget is a multiple-choice knapsack:

1. Per module, drop dominated options (more floats, no lower error) and keep the lower convex hull.
2. Start every module at its cheapest option; repeatedly apply the hull step with the largest error decrease per
   float that still fits the budget (the Lagrangian / LP-relaxation optimum, exact up to the last step).
3. Spend what is left: upgrade any module to any non-dominated option that fits, largest decrease first.
4. Compare with the uniform plans of each family (the same rank everywhere, as `compress(rank=...)` would give) that
   fit the budget, and keep the best. So the predicted error is never above one-cluster JD's or per-adapter SVD's at
   the same floats, and per module the chosen option is never worse than a cheaper option of any family.

`target_error` plans walk the same greedy path without a budget and stop at the first plan that meets the target
(mean over adapters, or every adapter with `every=True`), then keep the smallest of that and the uniform plans that
meet it.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Optional


@dataclass(frozen=True)
class Option:
    """One way to store a module. `family`: "svd" or "jd<C>" (the assignment it uses); `error`: its contribution to
    the mean error (Σ_i w_i error_i); `errors`: the adapters' own squared relative errors (0 where absent; a compact
    `array("d")` for large collections); `exact`: the errors are those of a finished fit, not an upper bound that
    building the option can only improve."""

    family: str
    rank: int
    num_clusters: int
    sigma: str
    floats: int
    error: float
    errors: Sequence[float] = field(repr=False, compare=False)
    exact: bool = field(default=True, compare=False)

    @property
    def kind(self) -> str:
        return "svd" if self.family == "svd" else "jd"

    def describe(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "family": self.family,
            "rank": self.rank,
            "num_clusters": self.num_clusters,
            "sigma_type": self.sigma,
            "floats": self.floats,
            "error": self.error,
            "exact": self.exact,
        }


@dataclass
class ModuleCurves:
    """Candidate options of one module (all families)."""

    module: str
    d_out: int
    d_in: int
    options: list[Option]

    def best_within(self, floats: int, family: Optional[str] = None) -> Optional[Option]:
        """Lowest-error option of `family` (any if None) with at most `floats` floats."""
        fitting = [o for o in self.options if o.floats <= floats and (family is None or o.family == family)]
        return min(fitting, key=lambda o: (o.error, o.floats)) if fitting else None


def frontier_of(options: Sequence[Option]) -> list[Option]:
    """Options that no cheaper (or equally cheap) option beats: strictly decreasing error with floats."""
    out: list[Option] = []
    for o in sorted(options, key=lambda o: (o.floats, o.error)):
        if not out or o.error < out[-1].error:
            out.append(o)
    return out


def lower_hull(points: list[Option]) -> list[Option]:
    """Lower convex hull of a frontier (floats ascending, error descending): the steps with decreasing gain."""
    hull: list[Option] = []
    for p in points:
        while len(hull) >= 2:
            a, b = hull[-2], hull[-1]
            # b is not on the hull if a→p is at least as steep a decrease per float as a→b.
            if (b.error - a.error) * (p.floats - a.floats) >= (p.error - a.error) * (b.floats - a.floats):
                hull.pop()
            else:
                break
        hull.append(p)
    return hull


def plan_error(plan: dict[str, Option]) -> float:
    return sum(o.error for o in plan.values())


def plan_floats(plan: dict[str, Option]) -> int:
    return sum(o.floats for o in plan.values())


def greedy_path(curves: dict[str, ModuleCurves], budget: float) -> tuple[dict[str, Option], list[tuple[str, Option]]]:
    """Steps 1–2 of the optimiser: the hull steps in order of decreasing gain per float while they fit. Returns the
    plan and the steps taken (module, new option), in order."""
    hulls = {m: lower_hull(frontier_of(c.options)) for m, c in curves.items()}
    plan = {m: h[0] for m, h in hulls.items()}
    spent = plan_floats(plan)
    if spent > budget:
        raise ValueError(
            f"the budget ({int(budget)} floats) is below the smallest bundle this collection can have ({spent} floats: "
            "rank 1 everywhere)."
        )
    heap: list[tuple[float, str, int]] = []

    def push(module: str, index: int) -> None:
        hull = hulls[module]
        if index + 1 < len(hull):
            a, b = hull[index], hull[index + 1]
            heapq.heappush(heap, (-(a.error - b.error) / (b.floats - a.floats), module, index + 1))

    for m in hulls:
        push(m, 0)
    steps = []
    while heap:
        _, module, index = heapq.heappop(heap)
        new = hulls[module][index]
        extra = new.floats - plan[module].floats
        if spent + extra > budget:
            continue  # later steps of this module need this one: the module stays where it is
        plan[module] = new
        spent += extra
        steps.append((module, new))
        push(module, index)
    return plan, steps


def _fill(curves: dict[str, ModuleCurves], plan: dict[str, Option], budget: float) -> dict[str, Option]:
    """Step 3: spend the floats left on the upgrades with the largest error decrease that fit."""
    plan = dict(plan)
    frontiers = {m: frontier_of(c.options) for m, c in curves.items()}
    while True:
        left = budget - plan_floats(plan)
        best: Optional[tuple[float, str, Option]] = None
        for m, frontier in frontiers.items():
            current = plan[m]
            for o in frontier:
                if o.floats - current.floats <= left and o.error < current.error:
                    gain = current.error - o.error
                    if best is None or gain > best[0]:
                        best = (gain, m, o)
        if best is None:
            return plan
        plan[best[1]] = best[2]


def uniform_plan(curves: dict[str, ModuleCurves], family: str, rank: int) -> Optional[dict[str, Option]]:
    """Every module stored as `family` at `rank` (capped at the module's largest option of that family, as
    `compress(rank=...)` caps it); None if a module has no option of that family."""
    plan = {}
    for m, c in curves.items():
        fam = [o for o in c.options if o.family == family]
        if not fam:
            return None
        at = [o for o in fam if o.rank <= rank]
        if not at:
            return None
        plan[m] = max(at, key=lambda o: o.rank)
    return plan


def uniform_plans(curves: dict[str, ModuleCurves]) -> dict[str, list[dict[str, Option]]]:
    """{family: [uniform plans by increasing rank]} over the ranks every module of the family was fitted at."""
    families = sorted({o.family for c in curves.values() for o in c.options})
    out = {}
    for family in families:
        ranks = sorted({o.rank for c in curves.values() for o in c.options if o.family == family})
        plans = [p for p in (uniform_plan(curves, family, r) for r in ranks) if p is not None]
        unique, seen = [], set()
        for p in plans:
            key = tuple(o.rank for o in p.values())
            if key not in seen:
                seen.add(key)
                unique.append(p)
        out[family] = unique
    return out


def best_uniform_within(curves: dict[str, ModuleCurves], family: str, floats: float) -> Optional[dict[str, Option]]:
    """The uniform plan of `family` with the lowest error within `floats` (None if none fits)."""
    fitting = [p for p in uniform_plans(curves).get(family, []) if plan_floats(p) <= floats]
    return min(fitting, key=plan_error) if fitting else None


def optimise(curves: dict[str, ModuleCurves], budget_floats: float) -> dict[str, Option]:
    """The plan of least predicted mean error within `budget_floats` (steps 1–4 of the module docstring)."""
    plan, _ = greedy_path(curves, budget_floats)
    plan = _fill(curves, plan, budget_floats)
    for plans in uniform_plans(curves).values():
        fitting = [p for p in plans if plan_floats(p) <= budget_floats]
        if fitting:
            candidate = _fill(curves, min(fitting, key=plan_error), budget_floats)
            if plan_error(candidate) < plan_error(plan):
                plan = candidate
    return plan


def adapter_errors(plan: dict[str, Option], module_counts: Sequence[int]) -> list[float]:
    """Predicted mean error over modules of every adapter."""
    N = len(module_counts)
    sums = [0.0] * N
    for o in plan.values():
        for i, e in enumerate(o.errors):
            sums[i] += e
    return [s / k if k else 0.0 for s, k in zip(sums, module_counts)]


def plan_for_target(
    curves: dict[str, ModuleCurves], target: float, module_counts: Sequence[int], every: bool = False
) -> dict[str, Option]:
    """The smallest plan found whose predicted error meets `target`: the mean over adapters, or every adapter's
    (mean over its modules) with `every`. Walks the greedy path (no budget) and compares with the uniform plans."""

    def meets(plan: dict[str, Option]) -> bool:
        errors = adapter_errors(plan, module_counts)
        value = max(errors) if every else sum(errors) / max(len(errors), 1)
        return value <= target

    start, steps = greedy_path(curves, math.inf)
    plan = {m: frontier_of(c.options)[0] for m, c in curves.items()}
    found: Optional[dict[str, Option]] = dict(plan) if meets(plan) else None
    for module, option in steps:
        if found is not None:
            break
        plan[module] = option
        if meets(plan):
            found = dict(plan)
    candidates = [found] if found is not None else []
    for plans in uniform_plans(curves).values():
        candidates += [p for p in plans if meets(p)]
    if not candidates:
        # Only reachable when the lossless options were pruned; the full greedy path is the best we have.
        return start
    return min(candidates, key=lambda p: (plan_floats(p), plan_error(p)))


__all__ = [
    "ModuleCurves",
    "Option",
    "adapter_errors",
    "best_uniform_within",
    "frontier_of",
    "optimise",
    "plan_error",
    "plan_floats",
    "plan_for_target",
    "uniform_plan",
    "uniform_plans",
]
