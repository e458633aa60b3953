"""Budget-driven bundles: choose, per module, the representation, rank and clusters that minimise the error.

A shared basis is not always the best use of bytes: the private part of an adapter in a shared basis is its r×r Σ
(r² floats per module), while a per-adapter SVD of rank q costs q·(d_in + d_out). Which one wins depends on the
collection (related or unrelated adapters) and on the module's width, so `compress(..., budget=...)` decides per
module from measured error curves. The parts:

    cost.py      stored floats per module, budgets ("4MB", "16x", "r16"), rank caps (no torch)
    curves.py    per module, the candidate options (per-adapter SVD; shared bases of each cluster assignment) with
                 their floats and errors, from one fit per family; the bundle factors of the chosen options
    planner.py   the multiple-choice knapsack over modules (no torch)
    plan_io.py   the plan as a bundle config (per-module patterns) and as report sections
    budget.py    this driver

The driver:

1. Anchor rank r*: the largest rank whose uniform one-basis bundle (`compress(rank=r*)`) fits the budget. One basis is
   fitted at r* on every module, exactly as `compress(rank=r*)` fits it, so that baseline is exact on the curves.
2. Cluster assignments (`cluster_counts`): one engine run with the most clusters on a sample of modules
   (`cluster_sample`, spread over layers and module kinds) gives the assignment of every smaller count on the way.
3. Pruning: the curves of the sampled modules are computed first, with every family; a family the best plan of the
   sample (its share of the budget) does not use is not fitted on the other modules.
4. Curves of the remaining modules; the plan (`planner.optimise`, or `plan_for_target`); the bundle, with the chosen
   options refined from their nested starts (`CurveFitter.build`).

Since the planner compares with every uniform plan of the curves, and the curves of per-adapter SVD and of one basis
at r* are exact, the plan's predicted error is never above the better of per-adapter SVD and one shared basis within
the budget; the stored error is at most the predicted one. Every step is seeded (module names, `seed`), so the
bundle is deterministic. Under torch.distributed the batches are split over the processes (the cluster run, the
curves and the build), the curves are shared so that every process takes the same plan, and rank 0 returns the
bundle. The format stores one rank per module (every cluster of a module has the same rank), so the plan space is one
rank per module.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any, Optional

from ..bundle import Bundle, ModuleFactors
from .cost import budget_to_floats, module_floats, uniform_floats
from .curves import CurveFitter, Family
from .engine import Engine, FactorSource, ModuleSubset, Placement, dist_info, gather_to_rank0
from .metrics import compression_report, dtype_bytes, dtype_name
from .plan_io import budget_report, plan_config, plan_report
from .planner import ModuleCurves, optimise, plan_for_target
from .settings import DEFAULT_CLUSTER_COUNTS, DEFAULT_CLUSTER_SAMPLE, CompressionSettings, CompressionSettingsError


def anchor_rank(shapes: dict[str, tuple[int, int]], ranks: dict[str, list[int]], budget_floats: float) -> int:
    """The largest rank r whose one-basis bundle `compress(rank=r)` stores at most `budget_floats` (0 if none)."""
    cap = max(min(d_out, d_in, sum(ranks[m])) for m, (d_out, d_in) in shapes.items())
    r = 0
    while r < cap and uniform_floats(shapes, ranks, "jd", r + 1) <= budget_floats:
        r += 1
    return r


def sample_modules(shapes: dict[str, tuple[int, int]], count: int) -> list[str]:
    """Up to `count` modules spread evenly over every module kind (the name's last part: q_proj, v_proj, ...) and,
    within a kind, over the layers (the source's order). Deterministic; all modules if there are at most `count`."""
    if len(shapes) <= count:
        return list(shapes)
    kinds: dict[str, list[str]] = {}
    for module in shapes:
        kinds.setdefault(module.rsplit(".", 1)[-1], []).append(module)
    quota = max(1, count // len(kinds))
    picked = []
    for members in kinds.values():
        k = min(quota, len(members))
        picked += [members[round(i * (len(members) - 1) / max(k - 1, 1))] for i in range(k)] if k > 1 else members[:1]
    return [m for m in shapes if m in set(picked)]


def cluster_assignments(
    source: FactorSource,
    settings: CompressionSettings,
    placement: Placement,
    *,
    modules: Sequence[str],
    rank: int,
    progress: bool = False,
) -> dict[str, list[int]]:
    """{"jd1": all zeros, "jd<C>": the engine's C-cluster assignment at `rank` on `modules`} for the settings'
    `cluster_counts`, from one engine run with the largest count (the smaller ones are on its way); duplicates and
    counts that found one cluster dropped."""
    N = len(source.names)
    out: dict[str, list[int]] = {"jd1": [0] * N}
    wanted = sorted({int(k) for k in settings.cluster_counts if 1 < int(k) < N})
    if not wanted:
        return out
    engine = Engine(
        ModuleSubset(source, modules),
        settings.fixed_shape(rank=rank, clusters=wanted[-1]),
        placement,
        progress=progress,
    )
    found = engine.run(assignments_only=True).assignments_by_count
    for k in wanted:
        if k not in found:  # seeding stopped early: every adapter was exact with fewer clusters
            continue
        assignment = found[k]
        C = max(assignment) + 1
        if C > 1 and assignment not in out.values():
            out[f"jd{C}"] = assignment
    return out


def _limits(cheapest: dict[str, int], lossless: dict[str, int], budget_floats: int, max_share: float) -> dict:
    """Most floats an option of each module may take: no module can take more than the budget minus the others'
    cheapest options, and plans rarely give a module more than `max_share` times its share of the budget (its share of
    the lossless size); only the extension above the fitted rank is bounded by it (the rest costs no fit)."""
    floor = sum(cheapest.values())
    total = sum(lossless.values())
    return {
        m: min(
            budget_floats - floor + cheapest[m],
            max(cheapest[m], max_share * budget_floats * lossless[m] / total),
        )
        for m in cheapest
    }


def compress_with_budget(
    source: FactorSource,
    settings: CompressionSettings,
    placement: Placement,
    *,
    progress: bool = True,
    cluster_rank: Optional[int] = None,
    max_share: float = 4.0,
) -> Optional[Bundle]:
    """The bundle of a budget plan (`settings.budget`: bytes, a ratio like "16x", or "r16": the size of
    `compress(rank=16)`; or "auto": the smallest plan meeting `settings.target_error`) whose per-module representation,
    rank and clusters minimise the mean error. See the module docstring; `compress(..., budget=...)` is the public
    entry point. Returns None on processes other than rank 0 under torch.distributed."""
    if not settings.is_plan:
        raise ValueError("compress_with_budget needs settings with a budget; compress() runs fixed shapes.")
    budget, target_error, every = settings.budget, settings.target_error, settings.target_error_every
    auto = budget == "auto"
    storage_dtype = placement.storage_dtype
    start = time.perf_counter()
    names = list(source.names)
    N = len(names)
    shapes, ranks = source.shapes(), source.ranks()
    _, original_bytes = source.original_size()
    itemsize = dtype_bytes(storage_dtype)
    budget_floats = None if auto else budget_to_floats(budget, original_bytes, storage_dtype, shapes, ranks)
    max_lora_rank = max(max(r) for r in ranks.values())
    cheapest = {m: module_floats(d_out, d_in, N, 1, 1, "full") for m, (d_out, d_in) in shapes.items()}
    lossless = {
        m: module_floats(d_out, d_in, N, max(1, min(max(ranks[m]), d_out, d_in)), N, "diag")
        for m, (d_out, d_in) in shapes.items()
    }
    limit = None
    if budget_floats is not None:
        floor = sum(cheapest.values())
        if budget_floats < floor:
            raise CompressionSettingsError(
                f"the «budget» ({budget_floats} floats = {budget_floats * itemsize} bytes in "
                f"{dtype_name(storage_dtype)}) is below the smallest bundle of this collection ({floor} floats = "
                f"{floor * itemsize} bytes: rank 1 everywhere)."
            )
        limit = _limits(cheapest, lossless, budget_floats, max_share)
        fit_rank = max(1, anchor_rank(shapes, ranks, budget_floats))
    else:
        fit_rank = 2 * max_lora_rank  # no budget: fit where a target is usually met; SVD reaches lossless anyway

    timings: dict[str, Any] = {}
    clock = time.perf_counter()
    sample = sample_modules(shapes, settings.cluster_sample)
    assignments = cluster_assignments(
        source, settings, placement, modules=sample, rank=cluster_rank or max_lora_rank, progress=progress
    )
    timings["clusters"] = time.perf_counter() - clock
    families = [Family(name, tuple(a)) for name, a in assignments.items()]
    fitter = CurveFitter(
        source, settings, placement, families=families, fit_rank=fit_rank, limit=limit, progress=progress
    )

    clock = time.perf_counter()
    pruned: list[str] = []
    if len(families) > 1 and len(sample) < len(shapes):
        curves = fitter.curves(sample)
        share = sum(lossless[m] for m in sample) / sum(lossless.values())
        kept = _families_used(curves, None if auto else budget_floats * share, target_error, ranks, every)
        pruned = [f.name for f in families if f.name not in kept]
        curves = {
            m: ModuleCurves(c.module, c.d_out, c.d_in, [o for o in c.options if o.family not in pruned])
            for m, c in curves.items()
        }
        rest = [m for m in shapes if m not in curves]
        curves.update(fitter.curves(rest, [f.name for f in families if f.name in kept]))
        curves = {m: curves[m] for m in sorted(curves)}
    else:
        curves = fitter.curves()
    timings["curves"] = time.perf_counter() - clock

    module_counts = [sum(r[i] > 0 for r in ranks.values()) for i in range(N)]
    if auto:
        plan = plan_for_target(curves, float(target_error), module_counts, every=every)
    else:
        plan = optimise(curves, budget_floats)
    clock = time.perf_counter()
    built = gather_to_rank0(fitter.build(plan))
    timings["build"] = time.perf_counter() - clock
    timings["fits"] = fitter.fits
    if built is None:
        return None
    modules: dict[str, ModuleFactors] = {}
    errors: dict[str, dict[str, float]] = {n: {} for n in names}
    refine_iterations: dict[str, int] = {}
    for part_modules, part_errors, part_iterations in built:
        modules.update(part_modules)
        for name, values in part_errors.items():
            errors[name].update(values)
        refine_iterations.update(part_iterations)
    modules = dict(sorted(modules.items()))

    config = plan_config(plan, assignments, source, list(modules))
    budget_section = budget_report(
        curves,
        plan,
        requested=budget,
        budget_floats=budget_floats,
        target_error=target_error,
        every=every,
        itemsize=itemsize,
        assignments=assignments,
        module_counts=module_counts,
        fit_rank=fit_rank,
        cluster_counts=settings.cluster_counts,
        pruned=pruned,
        sample=len(sample),
    )
    report = compression_report(
        source,
        modules,
        errors,
        config.adapter_clusters,
        settings,
        placement,
        method="budget",
        rank=config.r,
        sigma_type=config.sigma_type,
        num_clusters=max(o.num_clusters for o in plan.values()),
        seconds=time.perf_counter() - start,
        world_size=dist_info()[1],
        budget=budget_section,
        plan=plan_report(curves, plan, errors, module_counts, refine_iterations),
        timings=timings,
        max_share=max_share,
    )
    return Bundle(config=config, modules=modules, report=report)


def _families_used(
    curves: dict[str, ModuleCurves],
    budget_floats: Optional[float],
    target_error: Optional[float],
    ranks: dict[str, list[int]],
    every: bool,
) -> set[str]:
    """The families the plan of these (sampled) modules uses, at their share of the budget or for the target; one
    shared basis is always kept (it carries the exact baseline)."""
    if budget_floats is None:
        N = len(next(iter(ranks.values())))
        counts = [sum(ranks[m][i] > 0 for m in curves) for i in range(N)]  # per adapter, over the sampled modules
        plan = plan_for_target(curves, float(target_error), counts, every=every)
    else:
        floor = sum(min(o.floats for o in c.options) for c in curves.values())
        plan = optimise(curves, max(budget_floats, floor))
    return {o.family for o in plan.values()} | {"jd1"}


__all__ = [
    "DEFAULT_CLUSTER_COUNTS",
    "DEFAULT_CLUSTER_SAMPLE",
    "anchor_rank",
    "cluster_assignments",
    "compress_with_budget",
    "sample_modules",
]
