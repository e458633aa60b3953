"""The cost model of a bundle: stored elements ("floats") per module, budgets, and rank caps. Imports no torch.

For a module of shape d_out×d_in and N adapters, the stored tensors are U [C, d_out, r], V [C, r, d_in] and
Σ [N, r, r] (full) or [N, r] (diag), so

    shared bases, C clusters, rank r, full Σ      C·r·(d_out + d_in) + N·r²
    shared bases, C clusters, rank r, diag Σ      C·r·(d_out + d_in) + N·r
    per-adapter SVD of rank q (C = N, diag Σ)     N·q·(d_out + d_in) + N·q

elements, and bytes = elements × the storage dtype's size. The command line parses `--budget` with this module
before it imports torch, so that a bad value fails at once.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Optional, Union

BudgetLike = Union[int, float, str]

# What `jdlora-convert` builds when given no size or shape option: a budget plan of the size of `compress(rank=16)`
# (one shared basis of rank 16, the fixed default before plans) that weighs per-adapter SVD against one shared basis
# on every module. No cluster search, so that it stays within about twice the time of that fixed-rank bundle.
DEFAULT_BUDGET = "r16"
DEFAULT_PLAN_CLUSTER_COUNTS: tuple[int, ...] = ()

_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9}
_UNITS.update({"kib": 2**10, "mib": 2**20, "gib": 2**30})
_BUDGET_RE = re.compile(r"([0-9]*\.?[0-9]+(?:e[0-9]+)?)(x|[kmg]i?b|[kmg]|b)?")
_RANK_BUDGET_RE = re.compile(r"r(?:ank)?([0-9]+)")
BUDGET_FORMS = (
    "a number of bytes (e.g. 4000000, 4MB, 4MiB), a ratio like '16x', or 'r16' (the size of one shared basis of "
    "rank 16)"
)


def module_floats(d_out: int, d_in: int, num_adapters: int, rank: int, num_clusters: int, sigma: str) -> int:
    """Stored elements of one module: U [C, d_out, r] + V [C, r, d_in] + Σ [N, r, r] (full) or [N, r] (diag)."""
    core = rank * rank if sigma == "full" else rank
    return num_clusters * rank * (d_out + d_in) + num_adapters * core


def target_rank(method: str, rank: int, d_out: int, d_in: int, ranks: Sequence[int]) -> int:
    """Rank stored for a module: the requested rank, capped where more columns cannot help (the rank of the
    matrices, and the collection's total rank for a shared basis or an adapter's own rank for per-adapter SVD)."""
    cap = max(ranks) if method == "svd" else sum(ranks)
    return max(1, min(rank, d_out, d_in, cap))


def uniform_floats(
    shapes: Mapping[str, tuple[int, int]], ranks: Mapping[str, Sequence[int]], method: str, rank: int, clusters: int = 1
) -> int:
    """Stored elements of the bundle `compress(method=..., rank=..., clusters=...)` builds (with its per-module rank
    caps): per-adapter SVD ("svd") or C shared bases with full Σ ("jd")."""
    total = 0
    for module, (d_out, d_in) in shapes.items():
        k = target_rank(method, rank, d_out, d_in, ranks[module])
        N = len(ranks[module])
        total += (
            module_floats(d_out, d_in, N, k, N, "diag")
            if method == "svd"
            else module_floats(d_out, d_in, N, k, clusters, "full")
        )
    return total


def per_adapter_params(shapes: Mapping[str, tuple[int, int]], ranks: Mapping[str, Sequence[int]]) -> list[int]:
    """Parameters of every source adapter, Σ_m r_i,m·(d_in + d_out) (0 for the modules it lacks)."""
    num_adapters = len(next(iter(ranks.values()))) if ranks else 0
    return [sum(ranks[m][i] * (d_out + d_in) for m, (d_out, d_in) in shapes.items()) for i in range(num_adapters)]


def stored_floats(modules: Iterable[Any]) -> int:
    """Elements of the stored tensors of modules (anything with U, V and sigma tensors, e.g. `ModuleFactors`)."""
    return sum(f.U.numel() + f.V.numel() + f.sigma.numel() for f in modules)


def bundle_floats(bundle: Any) -> int:
    """Elements of all stored tensors of a bundle."""
    return stored_floats(bundle.modules.values())


def parse_budget(budget: BudgetLike) -> tuple[str, float]:
    """("bytes", n), ("ratio", x) or ("rank", r) from a budget: an int (bytes), "123456", "1.5MB", "2MiB", a
    compression ratio "16x" (the bundle is 16 times smaller than the source adapters), or "r16" / "rank16" (the size
    of the bundle `compress(rank=16)` builds: one shared basis of rank 16 with full Σ, per-module caps included)."""
    if isinstance(budget, bool):
        raise ValueError(f"budget must be {BUDGET_FORMS}, got {budget!r}.")
    if isinstance(budget, (int, float)):
        if not budget > 0 or not math.isfinite(budget):
            raise ValueError(f"budget must be a positive number of bytes, got {budget!r}.")
        return "bytes", float(budget)
    text = str(budget).strip().lower().replace(" ", "")
    rank = _RANK_BUDGET_RE.fullmatch(text)
    if rank:
        if int(rank.group(1)) < 1:
            raise ValueError(f"a rank budget must be at least r1, got {budget!r}.")
        return "rank", float(rank.group(1))
    match = _BUDGET_RE.fullmatch(text)
    if not match:
        raise ValueError(f"budget must be {BUDGET_FORMS}, got {budget!r}.")
    value, unit = float(match.group(1)), match.group(2) or ""
    if not value > 0:
        raise ValueError(f"budget must be positive, got {budget!r}.")
    if unit == "x":
        return "ratio", value
    return "bytes", value * _UNITS[unit]


def budget_to_floats(
    budget: BudgetLike,
    original_bytes: int,
    storage_dtype: Any,
    shapes: Optional[Mapping[str, tuple[int, int]]] = None,
    ranks: Optional[Mapping[str, Sequence[int]]] = None,
) -> int:
    """The budget as a number of stored elements: a ratio divides the source's bytes, bytes are counted in
    `storage_dtype` (a torch dtype, or its size in bytes), and a rank budget ("r16") is the element count of that
    one-basis bundle, which needs the collection's `shapes` and `ranks` (see `uniform_floats`)."""
    kind, value = parse_budget(budget)
    if kind == "rank":
        if shapes is None or ranks is None:
            raise ValueError(f"a rank budget ({budget!r}) needs the collection's shapes and ranks.")
        return uniform_floats(shapes, ranks, "jd", int(value))
    itemsize = storage_dtype if isinstance(storage_dtype, int) else storage_dtype.itemsize
    nbytes = original_bytes / value if kind == "ratio" else value
    return int(nbytes // itemsize)


__all__ = [
    "BUDGET_FORMS",
    "DEFAULT_BUDGET",
    "DEFAULT_PLAN_CLUSTER_COUNTS",
    "BudgetLike",
    "budget_to_floats",
    "bundle_floats",
    "module_floats",
    "parse_budget",
    "per_adapter_params",
    "stored_floats",
    "target_rank",
    "uniform_floats",
]
