"""Error curves of a budget plan: per module, the candidate ways to store it with their floats and errors, and the
bundle factors of the options a plan chooses.

One fit per module and family gives the error of every rank:

    svd      per-adapter SVD at every rank q = 1 … max_i r_i: exact (Eckart–Young on the canonical form,
             error_i = 1 − Σ_{j≤q} s_ij²)
    jd<C>    JD-Full with the family's cluster assignment (jd1: one shared basis), fitted once per cluster at the
             family's anchor rank r_fit from the engine's seeded start, then nested bases for every rank k ≤ r_ext:
               k ≤ r_fit   the fitted subspaces rotated to the principal axes of their cores (`joint.principal_axes`),
                           so that the first k columns keep as much of every core as one rotation can;
               k > r_fit   the fitted bases followed by the leading directions of what they leave out
                           (`joint.extend_bases`), up to r_ext = 2·r_fit or the module's float limit.
             The rank-k error is that of the first k columns with cores by projection: a bundle that can be built, so
             an upper bound on the option's error. At k = r_fit it is the fit itself; for jd1, r_fit is the rank of
             the uniform one-basis plan of the budget and the fit is `compress(rank=r_fit)`'s (same seeded start, same
             iterations), so that baseline is exact.

Building (`build`): an option at its family's fitted rank uses the fit; any other JD option is refined by JD-Full from
its nested start inside the span of the module's nested bases (`joint.subspace_batch`: the updates there are
r_ext×r_ext cores, so the refinement costs a fraction of a fit; JD-Full never gets worse than its start, and the start
is kept if rounding made it so), so the stored error is at most the curve's. Cores are fitted to the bases as stored
(rounded to the storage dtype).

Cost per module: one JD-Full fit per cluster of each family (one per family's worth of adapters), one range finder
for the extension, and the cores of the nested bases; the plan's chosen options then cost one JD-Full fit each in
the r_ext-dimensional span of their nested bases.
Under torch.distributed every process computes the curves of its own batches and the curves (small: floats and
errors) are shared with all, so every process takes the same plan; each builds its own batches.
"""

from __future__ import annotations

from array import array
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Optional

import torch
from tqdm.auto import tqdm

from ..bundle import ModuleFactors
from .cost import module_floats
from .engine import FactorSource, Group, Placement, all_gather_objects, dist_info, module_generator, plan_groups
from .joint import extend_bases, init_full, jd_full, prefix_energy, principal_axes, subspace_batch
from .metrics import dtype_bytes, least_squares_sigma, own_basis_cores, sigma_for_storage, stored_errors
from .planner import ModuleCurves, Option
from .settings import CompressionSettings
from .svd import CanonicalBatch, canonicalize, svd_errors, truncated_svd


@dataclass(frozen=True)
class Family:
    """Shared bases with one cluster assignment: `name` ("jd<C>"), `assignment` (cluster of every adapter, 0 … C−1)."""

    name: str
    assignment: tuple[int, ...]

    @property
    def num_clusters(self) -> int:
        return max(self.assignment) + 1

    def members(self) -> list[torch.Tensor]:
        """[C] 1-D int64 indices of each cluster's adapters."""
        return [
            torch.tensor([i for i, c in enumerate(self.assignment) if c == k], dtype=torch.int64)
            for k in range(self.num_clusters)
        ]


@dataclass
class NestedBases:
    """One module's nested bases for one family: U [C, d_out, r_ext], V [C, d_in, r_ext] (orthonormal, compute dtype,
    CPU; the first k columns start the rank-k option) and `fitted`, the rank whose bases are a finished fit."""

    U: torch.Tensor
    V: torch.Tensor
    fitted: int


class CurveFitter:
    """Computes the candidate curves of a `FactorSource` (`curves`), then builds the factors of a chosen plan
    (`build`).

    Args:
        settings: the fit's tolerances, seed and batch memory (`CompressionSettings`); placement: device and dtypes.
        families: the shared-bases families to consider (jd1 first), see `Family`.
        fit_rank: the anchor rank r* of one shared basis (the uniform jd1 plan of the budget): jd1 is fitted at
            `target_rank("jd", r*, ...)` per module, and every other family at the largest rank whose floats do not
            exceed that.
        limit: {module: most floats an option may take} (None: no limit); bounds the extension above the fit.
    """

    def __init__(
        self,
        source: FactorSource,
        settings: CompressionSettings,
        placement: Placement,
        *,
        families: Sequence[Family],
        fit_rank: int,
        limit: Optional[dict[str, float]],
        progress: bool = False,
    ):
        self.source = source
        self.families = {f.name: f for f in families}
        self.device, self.compute_dtype, self.storage_dtype = (
            placement.device,
            placement.compute_dtype,
            placement.storage_dtype,
        )
        self.seed, self.max_iter = settings.seed, settings.max_iter
        self.tol, self.stall_tol = settings.tol, settings.stall_tol
        self.rank_id, self.world = dist_info()
        self.progress = progress and self.rank_id == 0
        self.shapes, self.ranks = source.shapes(), source.ranks()
        self.N = len(source.names)
        self.limit = limit
        modules_per_adapter = [sum(r[i] > 0 for r in self.ranks.values()) for i in range(self.N)]
        # w_i = 1 / (N · modules of adapter i): Σ_m Σ_i w_i error_i,m is the report's mean error.
        self.weights = torch.tensor(
            [1.0 / (self.N * k) if k else 0.0 for k in modules_per_adapter], dtype=torch.float64
        )
        itemsize = dtype_bytes(self.compute_dtype)
        # Batches share (shape, padded rank, jd1's fitted rank), so one batched fit serves all their modules.
        self.groups = plan_groups(
            self.shapes, self.ranks, "jd", fit_rank, self.world, itemsize, settings.max_batch_bytes
        )
        self.bases: dict[tuple[str, str], NestedBases] = {}
        self.fits = 0

    # ---------------------------------------------------------------- helpers

    def _own(self, modules: Optional[Iterable[str]]) -> list[Group]:
        """This process's batches, restricted to `modules` (all if None)."""
        wanted = None if modules is None else set(modules)
        out = []
        for g in self.groups:
            if g.owner != self.rank_id:
                continue
            kept = g.modules if wanted is None else [m for m in g.modules if m in wanted]
            if kept:
                out.append(Group(kept, g.d_out, g.d_in, g.R, g.r, g.owner))
        return out

    def _canonical(self, group: Group) -> CanonicalBatch:
        A, B = self.source.load(group.modules, group.R, self.compute_dtype)
        return canonicalize(A.to(self.device), B.to(self.device))

    def _present(self, module: str) -> torch.Tensor:
        return torch.tensor([r > 0 for r in self.ranks[module]], dtype=torch.bool)

    def _cap(self, family: Family, module: str) -> int:
        """More columns than a cluster's total rank (or the matrices' rank) cannot help."""
        d_out, d_in = self.shapes[module]
        ranks = self.ranks[module]
        totals = [sum(ranks[i] for i in members.tolist()) for members in family.members()]
        return max(1, min(d_out, d_in, max(totals)))

    def _ranks(self, family: Family, group: Group) -> tuple[int, int]:
        """(r_fit, r_ext) of a family for a batch: jd1 at the batch's anchor rank; other families at the largest rank
        with at most jd1's floats there; the extension to twice that, within the cap and the float limit."""
        d_out, d_in, C = group.d_out, group.d_in, family.num_clusters
        cap = max(self._cap(family, m) for m in group.modules)
        if family.num_clusters == 1:
            r_fit = group.r
        else:
            anchor = module_floats(d_out, d_in, self.N, group.r, 1, "full")
            r_fit = 1
            while r_fit < cap and module_floats(d_out, d_in, self.N, r_fit + 1, C, "full") <= anchor:
                r_fit += 1
        limit = None if self.limit is None else max(self.limit[m] for m in group.modules)
        r_ext = r_fit
        while r_ext < min(cap, 2 * r_fit) and (
            limit is None or module_floats(d_out, d_in, self.N, r_ext + 1, C, "full") <= limit
        ):
            r_ext += 1
        return r_fit, r_ext

    def _option(
        self, family: str, rank: int, C: int, sigma: str, floats: int, err: torch.Tensor, exact: bool
    ) -> Option:
        err = err.double().cpu()
        return Option(
            family, rank, C, sigma, floats, float((err * self.weights).sum()), array("d", err.tolist()), exact
        )

    # ---------------------------------------------------------------- curves

    def curves(
        self, modules: Optional[Iterable[str]] = None, families: Optional[Iterable[str]] = None
    ) -> dict[str, ModuleCurves]:
        """Candidate options of `modules` (all if None) for per-adapter SVD and the `families` (all if None); the
        nested bases are kept for `build`. Under torch.distributed, every process returns every module's curves."""
        families = [self.families[f] for f in (self.families if families is None else families)]
        out: dict[str, ModuleCurves] = {}
        for group in tqdm(
            self._own(modules), desc="budget curves", unit="batch", disable=not self.progress, leave=False
        ):
            batch = self._canonical(group)
            d_out, d_in, R = group.d_out, group.d_in, group.R
            options: dict[str, list[Option]] = {m: [] for m in group.modules}
            svd_err = svd_errors(batch)  # [M, N, R]
            for q in range(1, min(R, d_out, d_in) + 1):
                floats = module_floats(d_out, d_in, self.N, q, self.N, "diag")
                for j, m in enumerate(group.modules):
                    options[m].append(self._option("svd", q, self.N, "diag", floats, svd_err[j, :, q - 1], True))
            for family in families:
                self._family_options(batch, group, family, options)
            for m in group.modules:
                out[m] = ModuleCurves(m, d_out, d_in, options[m])
        if self.world > 1:
            merged: dict[str, ModuleCurves] = {}
            for part in all_gather_objects(out):
                merged.update(part)
            out = merged
        return dict(sorted(out.items()))

    def _family_options(
        self, batch: CanonicalBatch, group: Group, family: Family, options: dict[str, list[Option]]
    ) -> None:
        M, C = batch.num_modules, family.num_clusters
        r_fit, r_ext = self._ranks(family, group)
        U_all = torch.zeros(M, C, group.d_out, r_ext, dtype=self.compute_dtype, device=self.device)
        V_all = torch.zeros(M, C, group.d_in, r_ext, dtype=self.compute_dtype, device=self.device)
        err = torch.zeros(M, self.N, r_ext, dtype=self.compute_dtype, device=self.device)
        for c, members in enumerate(family.members()):
            sub = batch if members.numel() == self.N else batch.adapters(members.to(self.device))
            # The engine's seeded start (fresh generators: a fit does not depend on the other fits of the module).
            generators = [module_generator(self.seed, m) for m in group.modules]
            U0, V0 = init_full(sub, r_fit, generators)
            fit = jd_full(sub, U0, V0, max_iter=self.max_iter, tol=self.tol, stall_tol=self.stall_tol)
            self.fits += 1
            P, Q = principal_axes(fit.sigma)
            U, V = fit.U @ P, fit.V @ Q
            if r_ext > r_fit:
                U, V = extend_bases(sub, U, V, r_ext - r_fit, generators)
            kept = prefix_energy(sub, U, V)  # [M, n_c, r_ext]
            err[:, members.to(self.device)] = (sub.energy.unsqueeze(-1) - kept).clamp_min(0.0)
            U_all[:, c], V_all[:, c] = U, V
        for j, m in enumerate(group.modules):
            cap = self._cap(family, m)
            for k in range(1, min(r_ext, cap) + 1):
                floats = module_floats(group.d_out, group.d_in, self.N, k, C, "full")
                options[m].append(self._option(family.name, k, C, "full", floats, err[j, :, k - 1], k == r_fit))
            self.bases[(m, family.name)] = NestedBases(U_all[j].cpu(), V_all[j].cpu(), r_fit)

    # ---------------------------------------------------------------- build

    def build(
        self, plan: dict[str, Option]
    ) -> tuple[dict[str, ModuleFactors], dict[str, dict[str, float]], dict[str, int]]:
        """This process's modules of the chosen plan: ({module: factors} in the storage dtype on the CPU,
        {adapter: {module: error}} of the stored factors, {module: JD-Full iterations of the refinement})."""
        names = list(self.source.names)
        modules_out: dict[str, ModuleFactors] = {}
        errors: dict[str, dict[str, float]] = {n: {} for n in names}
        iterations: dict[str, int] = {}
        for group in tqdm(self._own(None), desc="budget bundle", unit="batch", disable=not self.progress, leave=False):
            batch = self._canonical(group)
            by_option: dict[tuple[str, int], list[int]] = {}
            for j, m in enumerate(group.modules):
                by_option.setdefault((plan[m].family, plan[m].rank), []).append(j)
            for (family, rank), rows in sorted(by_option.items()):
                sub = batch.modules(torch.tensor(rows, device=self.device))
                modules = [group.modules[j] for j in rows]
                if family == "svd":
                    factors, err = self._build_svd(sub, rank)
                else:
                    factors, err, iters = self._build_jd(sub, modules, self.families[family], rank)
                    iterations.update(zip(modules, iters))
                for k, m in enumerate(modules):
                    modules_out[m] = factors[k]
                    present = self._present(m)
                    for i, e in enumerate(err[k].tolist()):
                        if present[i]:
                            errors[names[i]][m] = float(e)
        return dict(sorted(modules_out.items())), errors, iterations

    def _build_svd(self, sub: CanonicalBatch, q: int) -> tuple[list[ModuleFactors], torch.Tensor]:
        """Singleton cluster per adapter: its top-q singular vectors (stored) and the least-squares diagonal core."""
        U, V, _ = truncated_svd(sub, q)  # [m, N, d_out, q], [m, N, d_in, q]
        U, V = U.to(self.storage_dtype), V.to(self.storage_dtype)
        stored, err = own_basis_cores(sub, U.to(self.compute_dtype), V.to(self.compute_dtype), self.storage_dtype)
        factors = [
            ModuleFactors(U[k].cpu(), V[k].mT.contiguous().cpu(), stored[k].cpu()) for k in range(sub.num_modules)
        ]
        return factors, err.double().cpu()

    def _build_jd(
        self, sub: CanonicalBatch, modules: list[str], family: Family, rank: int
    ) -> tuple[list[ModuleFactors], torch.Tensor, list[int]]:
        """Shared bases per cluster at `rank` (the fit, or refined from the nested start) and least-squares full cores
        fitted to the bases as stored."""
        m, C = len(modules), family.num_clusters
        d_out, d_in = self.shapes[modules[0]]
        U_out = torch.zeros(m, C, d_out, rank, dtype=self.storage_dtype)
        V_out = torch.zeros(m, C, rank, d_in, dtype=self.storage_dtype)
        sigma_out = torch.zeros(m, self.N, rank, rank, dtype=self.storage_dtype)
        err_out = torch.zeros(m, self.N, dtype=torch.float64)
        iterations = torch.zeros(m, dtype=torch.int64)
        nested = [self.bases[(module, family.name)] for module in modules]
        for c, members in enumerate(family.members()):
            part = sub if members.numel() == self.N else sub.adapters(members.to(self.device))
            W_U = torch.stack([b.U[c] for b in nested]).to(self.device)  # [m, d_out, r_ext]
            W_V = torch.stack([b.V[c] for b in nested]).to(self.device)  # [m, d_in, r_ext]
            U, V = W_U[..., :rank], W_V[..., :rank]
            if rank != nested[0].fitted:
                # JD-Full at `rank` inside the nested bases' span, from their first columns (the curve's point):
                # the updates there are r_ext×r_ext cores, so this costs a fraction of a fit in the full space.
                inner = subspace_batch(part, W_U, W_V)
                eye = torch.eye(W_U.shape[-1], rank, dtype=W_U.dtype, device=W_U.device).expand(m, -1, -1)
                refined = jd_full(inner, eye, eye, max_iter=self.max_iter, tol=self.tol, stall_tol=self.stall_tol)
                start = (inner.energy - prefix_energy(inner, eye, eye)[..., -1]).sum(1)  # [m] the curve's error sums
                better = (inner.energy.sum(1) - refined.sigma.square().sum((1, 2, 3)) <= start).view(m, 1, 1)
                U = torch.where(better, W_U @ refined.U, U)
                V = torch.where(better, W_V @ refined.V, V)
                iterations = torch.maximum(iterations, refined.iterations)
            U_s, V_s = U.to(self.storage_dtype), V.to(self.storage_dtype)
            # Cores fitted to the bases as stored (rounded), so that the errors describe the stored bundle.
            sigma, T, gram_u, gram_v = least_squares_sigma(
                part, U_s.to(self.compute_dtype), V_s.to(self.compute_dtype), diag=False
            )
            stored = sigma_for_storage(sigma, part.norm, self.storage_dtype)
            U_out[:, c], V_out[:, c] = U_s.cpu(), V_s.mT.cpu()
            sigma_out[:, members] = stored.cpu()
            err_out[:, members] = stored_errors(part, stored, T, gram_u, gram_v).double().cpu()
        factors = [ModuleFactors(U_out[k], V_out[k].contiguous(), sigma_out[k]) for k in range(m)]
        return factors, err_out, iterations.tolist()


__all__ = ["CurveFitter", "Family", "NestedBases"]
