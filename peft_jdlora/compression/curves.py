"""Error curves of a budget plan: per module, the candidate ways to store it with their floats and errors, and the
bundle factors of the options a plan chooses.

Candidates per module (error as a function of floats):

    svd      every rank q = 1 … max_i r_i: exact (Eckart–Young on the canonical form: error_i = 1 − Σ_{j≤q} s_ij²)
    jd<C>    JD-Full with the cluster assignment of a global C-cluster run (C = 1, and `cluster_counts`), fitted at
             every rank of a grid (all ranks to 16, then steps growing with the rank): each point is a real fit, so
             its error is the error of a bundle we can build (not a truncation estimate)

The bundle is built from exactly the fitted bases of the chosen options (kept in memory, or refitted with the same
seeded start when they did not fit the cache), with the cores fitted to the bases as stored (rounded to the storage
dtype), so the report gives the errors of the stored bundle.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from tqdm.auto import tqdm

from ..bundle import ModuleFactors
from .cost import module_floats
from .engine import DEFAULT_MAX_BATCH_BYTES, FactorSource, module_generator, plan_groups
from .joint import init_full, jd_full
from .metrics import dtype_bytes, least_squares_sigma, own_basis_cores, sigma_for_storage, stored_errors
from .planner import ModuleCurves, Option
from .svd import CanonicalBatch, canonicalize, svd_errors, truncated_svd

DEFAULT_CACHE_BYTES = 512 * 2**20


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


class CurveFitter:
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
            svd_err = svd_errors(batch)  # [M, N, R]
            for q in range(1, min(R, d_out, d_in) + 1):
                floats = module_floats(d_out, d_in, self.N, q, self.N, "diag")
                for j, m in enumerate(modules):
                    if floats <= cap[m]:
                        options[m].append(self._option("svd", q, self.N, "diag", floats, svd_err[j, :, q - 1], w))
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
        U, V, _ = truncated_svd(sub, q)  # [1, N, d_out, q], [1, N, d_in, q]
        U, V = U.to(self.storage_dtype), V.to(self.storage_dtype)
        stored, err = own_basis_cores(sub, U.to(self.compute_dtype), V.to(self.compute_dtype), self.storage_dtype)
        return ModuleFactors(U[0].cpu(), V[0].mT.contiguous().cpu(), stored[0].cpu()), err[0].double().cpu()

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
            err = stored_errors(part, stored, T, gram_u, gram_v)[0]
            U_out[c], V_out[c] = U_s[0].cpu(), V_s[0].mT.cpu()
            sigma_out[members] = stored[0].cpu()
            err_out[members] = err.double().cpu()
        return ModuleFactors(U_out, V_out.contiguous(), sigma_out), err_out
