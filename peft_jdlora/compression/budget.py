"""Budget-driven bundles: choose, per module, the representation, rank and clusters that minimise the error.

A shared basis is not always the best use of bytes: the private part of an adapter in a shared basis is its r×r Σ
(r² floats per module), while a per-adapter SVD of rank q costs q·(d_in + d_out). Which one wins depends on the
collection (related or unrelated adapters) and on the module's width, so `compress(..., budget=...)` decides per
module from measured error curves. The parts:

    cost.py      stored floats per module, budgets ("4MB", "16x"), rank caps (no torch)
    curves.py    per module, the candidate options (per-adapter SVD, shared bases of each cluster assignment) with
                 their floats and errors; the bundle factors of the chosen options
    planner.py   the multiple-choice knapsack over modules (no torch)
    plan_io.py   the plan as a bundle config (per-module patterns) and as report sections
    budget.py    this driver: cluster assignments, curves, plan, bundle, report

The format stores one rank per module (every cluster of a module has the same rank), so the plan space is one rank
per module, and a per-adapter SVD module pads nothing because every adapter gets the same q.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Optional, Union

import torch

from ..bundle import Bundle
from .cost import BudgetLike, budget_to_floats, per_adapter_params, stored_floats
from .curves import DEFAULT_CACHE_BYTES, CurveFitter
from .engine import DEFAULT_MAX_BATCH_BYTES, Engine, FactorSource, dist_info
from .metrics import dtype_bytes, dtype_name, size_report, summarise
from .plan_io import budget_report, plan_config, plan_report
from .planner import optimise, plan_for_target

DEFAULT_CLUSTER_COUNTS = (2, 4)


def cluster_assignments(
    source: FactorSource,
    counts: Sequence[int],
    *,
    rank: int,
    device: torch.device,
    compute_dtype: torch.dtype,
    storage_dtype: torch.dtype,
    seed: int,
    max_iter: int,
    tol: float,
    stall_tol: float,
    progress: bool,
    max_batch_bytes: int = DEFAULT_MAX_BATCH_BYTES,
) -> tuple[dict[str, list[int]], dict[str, float]]:
    """{"jd1": all zeros, "jd<C>": the engine's C-cluster assignment at `rank`} (duplicates and runs that ended with
    one cluster dropped), and the seconds each took."""
    N = len(source.names)
    out: dict[str, list[int]] = {"jd1": [0] * N}
    seconds: dict[str, float] = {}
    for k in sorted({int(k) for k in counts if 1 < int(k) < N}):
        start = time.perf_counter()
        engine = Engine(
            source,
            rank=rank,
            method="jd",
            sigma="full",
            max_iter=max_iter,
            tol=tol,
            stall_tol=stall_tol,
            device=device,
            compute_dtype=compute_dtype,
            storage_dtype=storage_dtype,
            seed=seed,
            progress=progress,
            max_batch_bytes=max_batch_bytes,
        )
        result = engine.run(clusters=k)
        seconds[f"jd{k}"] = time.perf_counter() - start
        assignment = list(result.assignment)
        if result.num_clusters > 1 and assignment not in out.values():
            out[f"jd{result.num_clusters}"] = assignment
    return out, seconds


def compress_with_budget(
    source: FactorSource,
    *,
    budget: Union[BudgetLike, None],
    target_error: Optional[float] = None,
    every: bool = False,
    cluster_counts: Sequence[int] = DEFAULT_CLUSTER_COUNTS,
    cluster_rank: Optional[int] = None,
    device: torch.device,
    compute_dtype: torch.dtype,
    storage_dtype: torch.dtype,
    seed: int = 0,
    max_iter: int = 100,
    tol: float = 1e-3,
    stall_tol: float = 1e-5,
    progress: bool = True,
    max_batch_bytes: int = DEFAULT_MAX_BATCH_BYTES,
    cache_bytes: int = DEFAULT_CACHE_BYTES,
    max_share: float = 4.0,
) -> Bundle:
    """A bundle whose per-module representation, rank and clusters minimise the mean error within `budget` (bytes,
    or a ratio like "16x"), or (`budget="auto"`) the smallest one meeting `target_error`. See the module docstring;
    `compress(..., budget=...)` is the public entry point."""
    if dist_info()[1] > 1:
        raise NotImplementedError("budget plans run in one process; launch without torch.distributed.")
    auto = budget == "auto"
    if auto and (target_error is None or not target_error >= 0):
        raise ValueError("budget='auto' picks the smallest bundle meeting target_error: give target_error >= 0.")
    if not auto and target_error is not None:
        raise ValueError("give either a budget or budget='auto' with target_error, not both.")
    start = time.perf_counter()
    names = list(source.names)
    N = len(names)
    shapes, ranks = source.shapes(), source.ranks()
    original_params, original_bytes = source.original_size()
    budget_floats = None if auto else budget_to_floats(budget, original_bytes, storage_dtype)
    max_lora_rank = max(max(r) for r in ranks.values())
    assignments, cluster_seconds = cluster_assignments(
        source,
        cluster_counts,
        rank=cluster_rank or max_lora_rank,
        device=device,
        compute_dtype=compute_dtype,
        storage_dtype=storage_dtype,
        seed=seed,
        max_iter=max_iter,
        tol=tol,
        stall_tol=stall_tol,
        progress=progress,
        max_batch_bytes=max_batch_bytes,
    )
    planner = CurveFitter(
        source,
        assignments=assignments,
        device=device,
        compute_dtype=compute_dtype,
        storage_dtype=storage_dtype,
        seed=seed,
        max_iter=max_iter,
        tol=tol,
        stall_tol=stall_tol,
        progress=progress,
        cache_bytes=cache_bytes,
        max_batch_bytes=max_batch_bytes,
    )
    limit = None
    if budget_floats is not None:
        floor = sum(planner.min_floats(m) for m in shapes)
        if budget_floats < floor:
            raise ValueError(
                f"the budget ({budget_floats} floats = {budget_floats * dtype_bytes(storage_dtype)} bytes in "
                f"{dtype_name(storage_dtype)}) is below the smallest bundle of this collection ({floor} floats = "
                f"{floor * dtype_bytes(storage_dtype)} bytes: rank 1 everywhere)."
            )
        # No module can take more than the budget minus the others' cheapest options: larger fits are never used.
        # Fitting JD up to that bound costs a fit per grid rank; plans rarely give a module more than a few times its
        # share of the budget (its share of the lossless size), so curves stop at `max_share` times that share.
        lossless = {m: planner.lossless_floats(m) for m in shapes}
        total = sum(lossless.values())
        limit = {
            m: min(
                budget_floats - floor + planner.min_floats(m),
                max(planner.min_floats(m), max_share * budget_floats * lossless[m] / total),
            )
            for m in shapes
        }
    curve_start = time.perf_counter()
    curves = planner.curves(limit)
    curve_seconds = time.perf_counter() - curve_start
    module_counts = [sum(r[i] > 0 for r in ranks.values()) for i in range(N)]
    if auto:
        plan = plan_for_target(curves, float(target_error), module_counts, every=every)
    else:
        plan = optimise(curves, budget_floats)
    modules, errors = planner.build(plan)

    config = plan_config(plan, assignments, source, list(modules))
    default_assignment = config.adapter_clusters
    summary = summarise(errors, {n: int(default_assignment[i]) for i, n in enumerate(names)})
    for name, params in zip(names, per_adapter_params(shapes, ranks)):
        summary["per_adapter"][name]["params"] = params
    floats = stored_floats(modules.values())
    itemsize = dtype_bytes(storage_dtype)
    report = {
        "method": "budget",
        "rank": config.r,
        "sigma_type": config.sigma_type,
        "num_clusters": max(o.num_clusters for o in plan.values()),
        "num_adapters": N,
        "num_modules": len(modules),
        "budget": budget_report(
            curves, plan, budget, budget_floats, target_error, every, itemsize, assignments, module_counts
        ),
        "plan": plan_report(curves, plan),
        **summary,
        **size_report(original_params, original_bytes, floats, storage_dtype),
        "seconds": time.perf_counter() - start,
        "timings": {"clusters": cluster_seconds, "curves": curve_seconds, "fits": planner.fits},
        "max_share": max_share,
        "seed": seed,
        "tol": tol,
        "stall_tol": stall_tol,
        "max_iter": max_iter,
        "target_error": target_error,
    }
    return Bundle(config=config, modules=modules, report=report)


__all__ = ["DEFAULT_CLUSTER_COUNTS", "cluster_assignments", "compress_with_budget"]
