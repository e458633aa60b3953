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


def plan_report(curves: dict[str, ModuleCurves], plan: dict[str, Option]) -> dict[str, Any]:
    """Per module: the choice, its floats and predicted error, and the baselines' best error within the same floats."""
    out = {}
    for m, o in plan.items():
        entry = o.describe()
        for family in BASELINE_FAMILIES:
            base = curves[m].best_within(o.floats, family)
            entry[f"{family}_same_floats"] = (
                None if base is None else {"rank": base.rank, "floats": base.floats, "error": base.error}
            )
        out[m] = entry
    return out


def budget_report(
    curves: dict[str, ModuleCurves],
    plan: dict[str, Option],
    budget: Any,
    budget_floats: Optional[int],
    target_error: Optional[float],
    every: bool,
    itemsize: int,
    assignments: dict[str, list[int]],
    module_counts: Sequence[int],
) -> dict[str, Any]:
    """The report's "budget" section: what was asked, what the plan spends and predicts, and the uniform baselines
    at the same floats."""
    floats = plan_floats(plan)
    baselines = {}
    for family in BASELINE_FAMILIES:
        base = best_uniform_within(curves, family, floats)
        baselines[family] = (
            None
            if base is None
            else {
                "rank": max(o.rank for o in base.values()),
                "floats": plan_floats(base),
                "mean_error": plan_error(base),
            }
        )
    predicted = adapter_errors(plan, module_counts)
    kinds = Counter(o.family for o in plan.values())
    return {
        "requested": budget if not isinstance(budget, float) else float(budget),
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
        # Uniform plans at the same floats, from the same curves (JD ranks on the fitted grid).
        "baselines_same_floats": baselines,
        "note": "per-adapter SVD errors are exact; JD errors are real fits at each rank of the grid; the bundle's "
        "reported errors are recomputed on the stored (rounded) factors.",
    }


__all__ = ["budget_report", "plan_config", "plan_report"]
