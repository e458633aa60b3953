"""A budget plan written down: the bundle config that serves it and the report that explains it.

The config stores one rank, Σ type and cluster assignment per module: the most common ones become `r`,
`sigma_type` and `adapter_clusters`, the others `rank_pattern`, `sigma_pattern` and `cluster_pattern` entries. The
report gives, per module, the choice, its floats and predicted error, and the best error of per-adapter SVD and of
one shared basis within the same floats; for the whole bundle, the uniform plans of both at the same floats.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Sequence
from typing import Any, Optional

from ..config import JDLoraConfig
from .planner import ModuleCurves, Option, adapter_errors, best_uniform_within, plan_error, plan_floats

BASELINE_FAMILIES = ("svd", "jd1")


def _most_common(values: list[Any]) -> Any:
    return Counter(values).most_common(1)[0][0]


def plan_config(
    plan: dict[str, Option], assignments: dict[str, list[int]], source: Any, modules: Sequence[str]
) -> JDLoraConfig:
    """The bundle config of a plan (`assignments`: family -> cluster of each adapter; `source`: the collection's
    names and provenance, a `FactorSource`)."""
    names = list(source.names)
    N = len(names)
    module_assignment = {m: list(range(N)) if o.kind == "svd" else list(assignments[o.family]) for m, o in plan.items()}
    r = _most_common([o.rank for o in plan.values()])
    sigma_type = _most_common([o.sigma for o in plan.values()])
    default_assignment = _most_common([tuple(a) for a in module_assignment.values()])
    return JDLoraConfig(
        target_modules=list(modules),
        r=r,
        rank_pattern={m: o.rank for m, o in plan.items() if o.rank != r},
        sigma_type=sigma_type,
        sigma_pattern={m: o.sigma for m, o in plan.items() if o.sigma != sigma_type},
        num_clusters=max(default_assignment) + 1,
        adapter_clusters=list(default_assignment),
        cluster_pattern={m: a for m, a in module_assignment.items() if tuple(a) != default_assignment},
        adapter_names=names,
        adapter_sources=json.loads(json.dumps(list(source.sources), default=str)) if source.sources else [],
        base_model_name_or_path=source.base_model,
        task_type=source.task_type,
        fan_in_fan_out=source.fan_in_fan_out,
        inference_mode=True,
    )


def _module_mean(option: Option, present: int) -> float:
    """The option's error at its module, mean over the adapters that have the module."""
    return sum(option.errors) / max(present, 1)


def _baseline(option: Optional[Option], present: int) -> Optional[dict[str, Any]]:
    if option is None:
        return None
    return {
        "rank": option.rank,
        "floats": option.floats,
        "error": option.error,
        "mean_error": _module_mean(option, present),
        "exact": option.exact,
    }


def plan_report(
    curves: dict[str, ModuleCurves],
    plan: dict[str, Option],
    errors: dict[str, dict[str, float]],
    module_counts: Sequence[int],
    refine_iterations: dict[str, int],
) -> dict[str, Any]:
    """Per module: the choice with its floats, its predicted contribution to the mean error (`error`) and whether that
    is exact; the stored factors' error at the module (`mean_error`, over the adapters that have it) and contribution
    (`stored_error`; `errors`: {adapter: {module: error}}); the JD-Full iterations spent refining it; and the best
    option of per-adapter SVD and of one shared basis within the same floats."""
    names = list(errors)
    N = len(names)
    out = {}
    for m, o in plan.items():
        stored = {i: errors[name][m] for i, name in enumerate(names) if m in errors[name]}
        entry = o.describe()
        entry["predicted_mean_error"] = _module_mean(o, len(stored))
        entry["mean_error"] = sum(stored.values()) / max(len(stored), 1)
        entry["stored_error"] = sum(e / (N * module_counts[i]) for i, e in stored.items())
        entry["refine_iterations"] = refine_iterations.get(m, 0)
        for family in BASELINE_FAMILIES:
            entry[f"{family}_same_floats"] = _baseline(curves[m].best_within(o.floats, family), len(stored))
        out[m] = entry
    return out


def _uniform_summary(plan: Optional[dict[str, Option]]) -> Optional[dict[str, Any]]:
    if plan is None:
        return None
    return {
        "rank": max(o.rank for o in plan.values()),
        "floats": plan_floats(plan),
        "mean_error": plan_error(plan),
        "exact": all(o.exact for o in plan.values()),
    }


def budget_report(
    curves: dict[str, ModuleCurves],
    plan: dict[str, Option],
    *,
    requested: Any,
    budget_floats: Optional[int],
    target_error: Optional[float],
    every: bool,
    itemsize: int,
    assignments: dict[str, list[int]],
    module_counts: Sequence[int],
    fit_rank: int,
    cluster_counts: Sequence[int],
    pruned: Sequence[str],
    sample: int,
) -> dict[str, Any]:
    """The report's "budget" section: what was asked, what the plan spends and predicts, the uniform baselines
    (per-adapter SVD and one shared basis, one rank everywhere) within the budget (exact: what `compress(rank=…)` and
    `compress(method="svd", rank=…)` build) and within the plan's floats (from the curves), and how the plan was
    searched (the fitted rank of one basis, the cluster families, those pruned on the sample)."""
    floats = plan_floats(plan)
    bound = floats if budget_floats is None else budget_floats
    predicted = adapter_errors(plan, module_counts)
    kinds = Counter(o.family for o in plan.values())
    return {
        "requested": requested if not isinstance(requested, float) else float(requested),
        "floats": budget_floats,
        "bytes": None if budget_floats is None else budget_floats * itemsize,
        "target_error": target_error,
        "target": None if target_error is None else ("every adapter" if every else "mean"),
        "plan_floats": floats,
        "plan_bytes": floats * itemsize,
        "predicted_mean_error": plan_error(plan),
        "predicted_worst_error": max(predicted, default=0.0),
        "modules_by_family": dict(sorted(kinds.items())),
        "assignments": {k: v for k, v in assignments.items() if k != "jd1"},
        "fit_rank": fit_rank,
        "cluster_counts": [int(c) for c in cluster_counts],
        "families_pruned": list(pruned),
        "cluster_sample_modules": sample,
        "baselines_within_budget": {
            f: _uniform_summary(best_uniform_within(curves, f, bound)) for f in BASELINE_FAMILIES
        },
        "baselines_same_floats": {
            f: _uniform_summary(best_uniform_within(curves, f, floats)) for f in BASELINE_FAMILIES
        },
        "note": "predicted errors: per-adapter SVD exact, shared bases at the fitted rank exact, other ranks upper "
        "bounds from nested bases (the stored bundle refines them); the bundle's reported errors are those of the "
        "stored (rounded) factors.",
    }


__all__ = ["budget_report", "plan_config", "plan_report"]
