"""Budget-driven bundles: choose, per module, the representation, rank and clusters that minimise the error.

A shared basis is not always the best use of bytes: the private part of an adapter in a shared basis is its r×r Σ
(r² floats per module), while a per-adapter SVD of rank q costs q·(d_in + d_out). Which one wins depends on the
collection (related or unrelated adapters) and on the module's width, so `compress(..., budget=...)` decides per
module from measured error curves.

Cost model (floats; bytes = floats × the storage dtype's size). For a module of shape d_out×d_in and N adapters:

    shared bases, C clusters, rank r, full Σ      C·r·(d_out + d_in) + N·r²
    shared bases, C clusters, rank r, diag Σ      C·r·(d_out + d_in) + N·r
    per-adapter SVD of rank q (C = N, diag Σ)     N·q·(d_out + d_in) + N·q

which is exactly the number of elements of the module's stored tensors U [C, d_out, r], V [C, r, d_in] and
Σ [N, r, r] or [N, r] (the format stores one rank per module: every cluster of a module has the same rank, so the plan
space is one rank per module, and a per-adapter SVD module pads nothing because every adapter gets the same q).

Candidates per module (the "curves": error as a function of floats):

    svd      every rank q = 1 … max_i r_i: exact (Eckart–Young on the canonical form: error_i = 1 − Σ_{j≤q} s_ij²)
    jd<C>    JD-Full with the cluster assignment of a global C-cluster run (C = 1, and `cluster_counts`), fitted at
             every rank of a grid (all ranks to 16, then steps growing with the rank): each point is a real fit, so
             its error is the error of a bundle we can build (not a truncation estimate)

Objective: the report's mean error, Σ_m Σ_i w_i,m · error_i,m with w_i,m = 1 / (N · modules of adapter i), i.e.
the paper's squared relative error (weights 1/‖ΔW_i‖²), averaged over modules per adapter, then over adapters. Since
it is a sum over modules, choosing one option per module under a float budget is a multiple-choice knapsack:

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

The bundle is then built from exactly the fitted bases of the chosen options (kept in memory, or refitted with the
same seeded start when they did not fit the cache), with the cores fitted to the bases as stored (rounded to the
storage dtype), and the report gives the errors of the stored bundle, the plan per module and the baselines.
"""

from __future__ import annotations

import heapq
import json
import math
import re
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Optional, Union

import torch
from tqdm.auto import tqdm

from ..bundle import Bundle, ModuleFactors
from ..config import JDLoraConfig
from .engine import (
    DEFAULT_MAX_BATCH_BYTES,
    Engine,
    FactorSource,
    canonical_batches,
    dist_info,
    module_generator,
    plan_groups,
    target_rank,
)
from .joint import init_full, jd_full, solve_spd
from .metrics import (
    dtype_bytes,
    dtype_name,
    least_squares_sigma,
    relative_errors,
    sigma_for_storage,
    size_report,
    summarise,
)
from .svd import CanonicalBatch, canonicalize

BudgetLike = Union[int, float, str]
DEFAULT_CLUSTER_COUNTS = (2, 4)
DEFAULT_CACHE_BYTES = 512 * 2**20

_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9}
_UNITS.update({"kib": 2**10, "mib": 2**20, "gib": 2**30})


# ------------------------------------------------------------------------------------------------ cost model


def module_floats(d_out: int, d_in: int, num_adapters: int, rank: int, num_clusters: int, sigma: str) -> int:
    """Stored elements of one module: U [C, d_out, r] + V [C, r, d_in] + Σ [N, r, r] (full) or [N, r] (diag)."""
    core = rank * rank if sigma == "full" else rank
    return num_clusters * rank * (d_out + d_in) + num_adapters * core


def bundle_floats(bundle: Bundle) -> int:
    """Elements of all stored tensors of a bundle."""
    return sum(f.U.numel() + f.V.numel() + f.sigma.numel() for f in bundle.modules.values())


def parse_budget(budget: BudgetLike) -> tuple[str, float]:
    """("bytes", n) or ("ratio", x) from a budget: an int (bytes), "123456", "1.5MB", "2MiB", or a compression ratio
    "16x" (the bundle is 16 times smaller than the source adapters)."""
    if isinstance(budget, bool):
        raise ValueError(f"budget must be bytes or a ratio like '16x', got {budget!r}.")
    if isinstance(budget, (int, float)):
        if not budget > 0 or not math.isfinite(budget):
            raise ValueError(f"budget must be a positive number of bytes, got {budget!r}.")
        return "bytes", float(budget)
    text = str(budget).strip().lower().replace(" ", "")
    match = re.fullmatch(r"([0-9]*\.?[0-9]+(?:e[0-9]+)?)(x|[kmg]i?b|[kmg]|b)?", text)
    if not match:
        raise ValueError(
            f"budget must be a number of bytes (e.g. 4000000, 4MB, 4MiB) or a ratio like '16x', got {budget!r}."
        )
    value, unit = float(match.group(1)), match.group(2) or ""
    if not value > 0:
        raise ValueError(f"budget must be positive, got {budget!r}.")
    if unit == "x":
        return "ratio", value
    return "bytes", value * _UNITS[unit]


def budget_to_floats(budget: BudgetLike, original_bytes: int, storage_dtype: torch.dtype) -> int:
    """The budget as a number of stored elements in `storage_dtype` (a ratio divides the source's bytes)."""
    kind, value = parse_budget(budget)
    nbytes = original_bytes / value if kind == "ratio" else value
    return int(nbytes // dtype_bytes(storage_dtype))


# ------------------------------------------------------------------------------------------------ candidates


@dataclass(frozen=True)
class Option:
    """One way to store a module. `family`: "svd" or "jd<C>" (the assignment it uses); `error`: its contribution to
    the mean error (Σ_i w_i error_i); `errors`: the adapters' own squared relative errors (0 where absent)."""

    family: str
    rank: int
    num_clusters: int
    sigma: str
    floats: int
    error: float
    errors: tuple[float, ...] = field(repr=False, compare=False)

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


def rank_grid(cap: int) -> list[int]:
    """JD ranks to fit, up to `cap`: every rank to 16, then steps of 2 to 32, 4 to 64, 8 to 128, 16 beyond. Dense
    where budgets usually land; relative spacing at most 1/8 elsewhere."""
    ranks, r = [], 1
    while r <= cap:
        ranks.append(r)
        r += 1 if r < 16 else 2 if r < 32 else 4 if r < 64 else 8 if r < 128 else 16
    if ranks and ranks[-1] != cap:
        ranks.append(cap)
    return ranks


def _normalised(stored: torch.Tensor, norm: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Stored cores back in normalised units (0 for zero updates)."""
    shape = norm.shape + (1,) * (stored.dim() - norm.dim())
    inv = torch.where(norm > 0, 1.0 / norm.clamp_min(torch.finfo(norm.dtype).tiny), 0.0)
    return stored.to(dtype) * inv.view(shape)


class _Planner:
    """Computes the candidate curves of a `FactorSource`, then builds the bundle of a chosen plan."""

    def __init__(
        self,
        source: FactorSource,
        *,
        assignments: dict[str, list[int]],
        device: torch.device,
        compute_dtype: torch.dtype,
        storage_dtype: torch.dtype,
        seed: int,
        max_iter: int,
        tol: float,
        stall_tol: float,
        progress: bool,
        cache_bytes: int = DEFAULT_CACHE_BYTES,
        max_batch_bytes: int = DEFAULT_MAX_BATCH_BYTES,
    ):
        self.source = source
        self.assignments = assignments  # family -> cluster of each adapter (compact ids)
        self.device, self.compute_dtype, self.storage_dtype = device, compute_dtype, storage_dtype
        self.seed, self.max_iter, self.tol, self.stall_tol, self.progress = seed, max_iter, tol, stall_tol, progress
        self.shapes, self.ranks = source.shapes(), source.ranks()
        self.N = len(source.names)
        modules_per_adapter = [sum(r[i] > 0 for r in self.ranks.values()) for i in range(self.N)]
        # w_i = 1 / (N · modules of adapter i): Σ_m Σ_i w_i error_i,m is the report's mean error.
        self.weights = torch.tensor(
            [1.0 / (self.N * k) if k else 0.0 for k in modules_per_adapter], dtype=torch.float64
        )
        self.groups = plan_groups(self.shapes, self.ranks, "jd", 1, 1, dtype_bytes(compute_dtype), max_batch_bytes)
        self.cache: dict[tuple[str, str, int], tuple[torch.Tensor, torch.Tensor]] = {}
        self.cache_left = cache_bytes
        self.fits = 0

    def _canonical(self, modules: list[str], R: int) -> CanonicalBatch:
        A, B = self.source.load(modules, R, self.compute_dtype)
        return canonicalize(A.to(self.device), B.to(self.device))

    def _present(self, module: str) -> torch.Tensor:
        return torch.tensor([r > 0 for r in self.ranks[module]], dtype=torch.bool)

    def min_floats(self, module: str) -> int:
        """The cheapest option of a module (rank 1, one shared basis or per-adapter SVD)."""
        d_out, d_in = self.shapes[module]
        return min(module_floats(d_out, d_in, self.N, 1, max(a) + 1, "full") for a in self.assignments.values())

    def lossless_floats(self, module: str) -> int:
        """Floats of the per-adapter SVD at full rank, which is exact: no option needs more."""
        d_out, d_in = self.shapes[module]
        return module_floats(d_out, d_in, self.N, max(1, min(max(self.ranks[module]), d_out, d_in)), self.N, "diag")

    def _fit(
        self, batch: CanonicalBatch, modules: list[str], members: torch.Tensor, rank: int
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """JD-Full of the adapters `members` at `rank` for a batch of modules, from the engine's seeded start.
        Returns U [M, d_out, r], V [M, d_in, r] (orthonormal) and errors [M, n_members]."""
        sub = batch if members.numel() == batch.num_adapters else batch.adapters(members.to(self.device))
        generators = [module_generator(self.seed, m) for m in modules]
        U0, V0 = init_full(sub, rank, generators)
        result = jd_full(sub, U0, V0, max_iter=self.max_iter, tol=self.tol, stall_tol=self.stall_tol)
        errors = (sub.energy - result.sigma.square().sum((-1, -2))).clamp_min(0.0)
        self.fits += 1
        return result.U, result.V, errors

    def curves(self, limit: Optional[dict[str, int]] = None) -> dict[str, ModuleCurves]:
        """Candidate options of every module; options above `limit[module]` floats are not fitted."""
        out: dict[str, ModuleCurves] = {}
        for group in tqdm(self.groups, desc="budget curves", unit="batch", disable=not self.progress, leave=False):
            modules, d_out, d_in, R = group.modules, group.d_out, group.d_in, group.R
            batch = self._canonical(modules, R)
            M = len(modules)
            cap = {m: min(self.lossless_floats(m), (limit or {}).get(m, math.inf)) for m in modules}
            group_cap = max(cap.values())
            options: dict[str, list[Option]] = {m: [] for m in modules}
            w = self.weights.to(batch.s.device, batch.s.dtype)
            # Per-adapter SVD at every rank: exact from the canonical singular values.
            captured = batch.s.square().cumsum(-1)  # [M, N, R]
            for q in range(1, min(R, d_out, d_in) + 1):
                floats = module_floats(d_out, d_in, self.N, q, self.N, "diag")
                err = (batch.energy - captured[..., q - 1]).clamp_min(0.0)  # [M, N]
                for j, m in enumerate(modules):
                    if floats <= cap[m]:
                        options[m].append(self._option("svd", q, self.N, "diag", floats, err[j], w))
            # Shared bases: a real JD-Full fit per rank of the grid and per family.
            for family, assignment in self.assignments.items():
                C = max(assignment) + 1
                clusters = [torch.tensor([i for i, c in enumerate(assignment) if c == k]) for k in range(C)]
                # More columns than a cluster's total rank cannot help (the fit is lossless there).
                max_rank = max(min(d_out, d_in, R * len(members)) for members in clusters)
                for r in rank_grid(max_rank):
                    floats = module_floats(d_out, d_in, self.N, r, C, "full")
                    if floats > group_cap:
                        break
                    err = torch.zeros(M, self.N, dtype=batch.s.dtype, device=batch.s.device)
                    bases = []
                    for members in clusters:
                        U, V, e = self._fit(batch, modules, members, r)
                        err[:, members.to(err.device)] = e
                        bases.append((U, V))
                    for j, m in enumerate(modules):
                        if floats > cap[m]:
                            continue
                        options[m].append(self._option(family, r, C, "full", floats, err[j], w))
                        U = torch.stack([b[0][j] for b in bases]).cpu()  # [C, d_out, r]
                        V = torch.stack([b[1][j] for b in bases]).cpu()  # [C, d_in, r]
                        size = (U.numel() + V.numel()) * U.element_size()
                        if size <= self.cache_left:
                            self.cache[(m, family, r)] = (U, V)
                            self.cache_left -= size
                    if bool((err.amax() <= 1e-12).item()):
                        break  # lossless for every module of the batch: higher ranks only cost more
            for m in modules:
                out[m] = ModuleCurves(m, d_out, d_in, options[m])
        return out

    def _option(
        self, family: str, rank: int, C: int, sigma: str, floats: int, err: torch.Tensor, w: torch.Tensor
    ) -> Option:
        err = err.double()
        return Option(family, rank, C, sigma, floats, float((err * w.double()).sum()), tuple(err.cpu().tolist()))

    # ---------------------------------------------------------------- build

    def build(self, plan: dict[str, Option]) -> tuple[dict[str, ModuleFactors], dict[str, dict[str, float]]]:
        """The chosen plan's factors (storage dtype, CPU) and {adapter: {module: error}} of the stored bundle."""
        names = list(self.source.names)
        modules_out: dict[str, ModuleFactors] = {}
        errors: dict[str, dict[str, float]] = {n: {} for n in names}
        for group in tqdm(self.groups, desc="budget bundle", unit="batch", disable=not self.progress, leave=False):
            batch = self._canonical(group.modules, group.R)
            for j, module in enumerate(group.modules):
                sub = batch.modules(torch.tensor([j], device=self.device))
                option = plan[module]
                if option.kind == "svd":
                    factors, err = self._build_svd(sub, option.rank)
                else:
                    factors, err = self._build_jd(sub, module, option)
                modules_out[module] = factors
                present = self._present(module)
                for i, e in enumerate(err.tolist()):
                    if present[i]:
                        errors[names[i]][module] = float(e)
        return dict(sorted(modules_out.items())), errors

    def _build_svd(self, sub: CanonicalBatch, q: int) -> tuple[ModuleFactors, torch.Tensor]:
        """Singleton cluster per adapter: its top-q singular vectors (stored) and the least-squares diagonal core."""
        U = sub.left_vectors()[0, ..., :q].to(self.storage_dtype)  # [N, d_out, q]
        V = sub.right_vectors()[0, ..., :q].to(self.storage_dtype)  # [N, d_in, q]
        Uq, Vq = U.to(self.compute_dtype), V.to(self.compute_dtype)
        M, d_out, _ = sub.B.shape
        B = sub.B.view(M, d_out, self.N, -1).permute(0, 2, 1, 3)[0]  # [N, d_out, R]
        T = ((B.mT @ Uq).mT @ (sub.right_vectors()[0].mT @ Vq)).unsqueeze(0)  # [1, N, q, q]
        gram_u, gram_v = (Uq.mT @ Uq).unsqueeze(0), (Vq.mT @ Vq).unsqueeze(0)  # [1, N, q, q]
        d = T.diagonal(dim1=-2, dim2=-1)
        sigma = solve_spd(gram_u * gram_v, d.unsqueeze(-1)).squeeze(-1)  # [1, N, q]
        stored = sigma_for_storage(sigma, sub.norm, self.storage_dtype)
        err = relative_errors(sub, _normalised(stored, sub.norm, sigma.dtype), T, gram_u, gram_v)[0]
        return ModuleFactors(U.cpu(), V.mT.contiguous().cpu(), stored[0].cpu()), err.double().cpu()

    def _build_jd(self, sub: CanonicalBatch, module: str, option: Option) -> tuple[ModuleFactors, torch.Tensor]:
        """Shared bases per cluster (cached from the curves, or refitted from the same seeded start) and least-squares
        full cores fitted to the bases as stored."""
        assignment = self.assignments[option.family]
        C, r = option.num_clusters, option.rank
        cached = self.cache.get((module, option.family, r))
        d_out, d_in = self.shapes[module]
        U_out = torch.zeros(C, d_out, r, dtype=self.storage_dtype)
        V_out = torch.zeros(C, r, d_in, dtype=self.storage_dtype)
        sigma_out = torch.zeros(self.N, r, r, dtype=self.storage_dtype)
        err_out = torch.zeros(self.N, dtype=torch.float64)
        for c in range(C):
            members = torch.tensor([i for i, k in enumerate(assignment) if k == c])
            part = sub.adapters(members.to(self.device))
            if cached is not None:
                U, V = cached[0][c : c + 1].to(self.device), cached[1][c : c + 1].to(self.device)
            else:
                U, V, _ = self._fit(sub, [module], members, r)
            U_s, V_s = U.to(self.storage_dtype), V.to(self.storage_dtype)
            # Cores fitted to the bases as stored (rounded), so that the errors describe the stored bundle.
            sigma, T, gram_u, gram_v = least_squares_sigma(
                part, U_s.to(self.compute_dtype), V_s.to(self.compute_dtype), diag=False
            )
            stored = sigma_for_storage(sigma, part.norm, self.storage_dtype)
            err = relative_errors(part, _normalised(stored, part.norm, sigma.dtype), T, gram_u, gram_v)[0]
            U_out[c], V_out[c] = U_s[0].cpu(), V_s[0].mT.cpu()
            sigma_out[members] = stored[0].cpu()
            err_out[members] = err.double().cpu()
        return ModuleFactors(U_out, V_out.contiguous(), sigma_out), err_out


# ------------------------------------------------------------------------------------------------ optimiser


def _frontier(options: Sequence[Option]) -> list[Option]:
    """Options that no cheaper (or equally cheap) option beats: strictly decreasing error with floats."""
    out: list[Option] = []
    for o in sorted(options, key=lambda o: (o.floats, o.error)):
        if not out or o.error < out[-1].error:
            out.append(o)
    return out


def _lower_hull(points: list[Option]) -> list[Option]:
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


def _plan_error(plan: dict[str, Option]) -> float:
    return sum(o.error for o in plan.values())


def _plan_floats(plan: dict[str, Option]) -> int:
    return sum(o.floats for o in plan.values())


def _greedy_path(curves: dict[str, ModuleCurves], budget: float) -> tuple[dict[str, Option], list[tuple[str, Option]]]:
    """Steps 1–2 of the optimiser: the hull steps in order of decreasing gain per float while they fit. Returns the
    plan and the steps taken (module, new option), in order."""
    hulls = {m: _lower_hull(_frontier(c.options)) for m, c in curves.items()}
    plan = {m: h[0] for m, h in hulls.items()}
    spent = _plan_floats(plan)
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
    frontiers = {m: _frontier(c.options) for m, c in curves.items()}
    while True:
        left = budget - _plan_floats(plan)
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
    fitting = [p for p in uniform_plans(curves).get(family, []) if _plan_floats(p) <= floats]
    return min(fitting, key=_plan_error) if fitting else None


def optimise(curves: dict[str, ModuleCurves], budget_floats: float) -> dict[str, Option]:
    """The plan of least predicted mean error within `budget_floats` (steps 1–4 of the module docstring)."""
    plan, _ = _greedy_path(curves, budget_floats)
    plan = _fill(curves, plan, budget_floats)
    for plans in uniform_plans(curves).values():
        fitting = [p for p in plans if _plan_floats(p) <= budget_floats]
        if fitting:
            candidate = _fill(curves, min(fitting, key=_plan_error), budget_floats)
            if _plan_error(candidate) < _plan_error(plan):
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

    start, steps = _greedy_path(curves, math.inf)
    plan = {m: _frontier(c.options)[0] for m, c in curves.items()}
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
    return min(candidates, key=lambda p: (_plan_floats(p), _plan_error(p)))


# ------------------------------------------------------------------------------------------------ SVD baseline


def svd_baseline(
    source: FactorSource,
    floats: int,
    *,
    device: torch.device,
    compute_dtype: torch.dtype,
    max_batch_bytes: int = DEFAULT_MAX_BATCH_BYTES,
) -> dict[str, Optional[dict[str, Any]]]:
    """Per-adapter SVD around the size `floats`: {"same_floats": the largest uniform rank q whose SVD bundle (with
    `compress`'s per-module caps) stores at most `floats` elements, "next_rank": rank q + 1}, each {"rank", "floats",
    "mean_error"} or None (no rank fits / q is already lossless). Errors are exact from the canonical singular values
    (Eckart–Young: error_i = 1 − Σ_{j≤q} s_ij² in normalised units).

    One read of the adapters and a small SVD per adapter and module: cheap next to a joint fit, so a fixed-rank
    bundle can report whether a budget plan would have spent its bytes better. "next_rank" covers small bundles that
    even rank 1 does not fit (a budget plan can still mix rank-1 SVD modules with cheap shared ones)."""
    shapes, ranks = source.shapes(), source.ranks()
    N = len(source.names)
    max_rank = max(max(r) for r in ranks.values())

    def caps(q: int) -> dict[str, int]:
        return {m: target_rank("svd", q, d_out, d_in, ranks[m]) for m, (d_out, d_in) in shapes.items()}

    def size(q: int) -> int:
        return sum(module_floats(*shapes[m], N, k, N, "diag") for m, k in caps(q).items())

    q = 0
    while q < max_rank and size(q + 1) <= floats:
        q += 1
    rank_of = {k: caps(k) for k in (q, q + 1) if 1 <= k <= max_rank}  # {uniform rank: {module: capped rank}}
    if not rank_of:
        return {"same_floats": None, "next_rank": None}
    sums = {k: torch.zeros(N, dtype=torch.float64) for k in rank_of}
    counts = torch.zeros(N, dtype=torch.float64)
    for modules, batch in canonical_batches(source, device, compute_dtype, max_batch_bytes=max_batch_bytes):
        captured = batch.s.square().cumsum(-1)  # [M, N, R]
        for j, module in enumerate(modules):
            present = torch.tensor([r > 0 for r in ranks[module]])
            counts += present.double()
            for k, caps_k in rank_of.items():
                kept = min(caps_k[module], captured.shape[-1])
                err = (batch.energy[j] - captured[j, :, kept - 1]).clamp_min(0.0).double().cpu()  # [N]
                sums[k] += torch.where(present, err, 0.0)
    points = {
        k: {"rank": k, "floats": size(k), "mean_error": float((sums[k] / counts.clamp_min(1))[counts > 0].mean())}
        for k in rank_of
    }
    return {"same_floats": points.get(q), "next_rank": points.get(q + 1)}


# ------------------------------------------------------------------------------------------------ driver


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


def _most_common(values: list[Any]) -> Any:
    return Counter(values).most_common(1)[0][0]


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
    planner = _Planner(
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

    # Config: the most common rank / Σ type / assignment are the defaults, the rest per-module patterns.
    module_assignment = {m: list(range(N)) if o.kind == "svd" else list(assignments[o.family]) for m, o in plan.items()}
    r = _most_common([o.rank for o in plan.values()])
    sigma_type = _most_common([o.sigma for o in plan.values()])
    default_assignment = _most_common([tuple(a) for a in module_assignment.values()])
    config = JDLoraConfig(
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
    summary = summarise(errors, {n: int(default_assignment[i]) for i, n in enumerate(names)})
    for i, name in enumerate(names):
        summary["per_adapter"][name]["params"] = sum(
            ranks[m][i] * (d_out + d_in) for m, (d_out, d_in) in shapes.items()
        )
    floats = bundle_floats_of(modules)
    report = {
        "method": "budget",
        "rank": r,
        "sigma_type": sigma_type,
        "num_clusters": max(o.num_clusters for o in plan.values()),
        "num_adapters": N,
        "num_modules": len(modules),
        "budget": _budget_report(
            curves, plan, budget, budget_floats, target_error, every, storage_dtype, assignments, module_counts
        ),
        "plan": _plan_report(curves, plan),
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


def bundle_floats_of(modules: dict[str, ModuleFactors]) -> int:
    return sum(f.U.numel() + f.V.numel() + f.sigma.numel() for f in modules.values())


def _plan_report(curves: dict[str, ModuleCurves], plan: dict[str, Option]) -> dict[str, Any]:
    """Per module: the choice, its floats and predicted error, and the baselines' best error within the same floats."""
    out = {}
    for m, o in plan.items():
        entry = o.describe()
        for label, family in (("svd_same_floats", "svd"), ("jd1_same_floats", "jd1")):
            base = curves[m].best_within(o.floats, family)
            entry[label] = None if base is None else {"rank": base.rank, "floats": base.floats, "error": base.error}
        out[m] = entry
    return out


def _budget_report(
    curves: dict[str, ModuleCurves],
    plan: dict[str, Option],
    budget: Any,
    budget_floats: Optional[int],
    target_error: Optional[float],
    every: bool,
    storage_dtype: torch.dtype,
    assignments: dict[str, list[int]],
    module_counts: Sequence[int],
) -> dict[str, Any]:
    floats = _plan_floats(plan)
    itemsize = dtype_bytes(storage_dtype)
    baselines = {}
    for family in ("svd", "jd1"):
        base = best_uniform_within(curves, family, floats)
        baselines[family] = (
            None
            if base is None
            else {
                "rank": max(o.rank for o in base.values()),
                "floats": _plan_floats(base),
                "mean_error": _plan_error(base),
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
        "predicted_mean_error": _plan_error(plan),
        "predicted_worst_error": max(predicted, default=0.0),
        "modules_by_family": dict(sorted(kinds.items())),
        "assignments": {k: v for k, v in assignments.items() if k != "jd1"},
        # Uniform plans at the same floats, from the same curves (JD ranks on the fitted grid).
        "baselines_same_floats": baselines,
        "note": "per-adapter SVD errors are exact; JD errors are real fits at each rank of the grid; the bundle's "
        "reported errors are recomputed on the stored (rounded) factors.",
    }


__all__ = [
    "DEFAULT_CLUSTER_COUNTS",
    "ModuleCurves",
    "Option",
    "budget_to_floats",
    "bundle_floats",
    "compress_with_budget",
    "module_floats",
    "optimise",
    "parse_budget",
    "plan_for_target",
    "rank_grid",
    "svd_baseline",
]
