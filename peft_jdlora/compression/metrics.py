"""Fidelity of a compressed collection, from factors: the paper's squared relative error, and sizes.

For an adapter with normalised update ΔW̃ (‖ΔW̃‖ = 1, or 0) and stored factors U [d_out, r], Σ [r, r], V [d_in, r]:

    ‖ΔW̃ − U Σ Vᵀ‖² = ‖ΔW̃‖² − 2⟨Σ, T⟩ + ⟨Σ, (UᵀU) Σ (VᵀV)⟩,     T = Uᵀ ΔW̃ V

which holds for any U, V (orthonormal or not, e.g. after rounding to bf16), so the report describes the bundle as
stored. The least-squares Σ for given bases is Σ = (UᵀU)⁻¹ T (VᵀV)⁻¹, or σ = ((UᵀU)∘(VᵀV))⁻¹ diag(T) for a diagonal
core: the same formula fits a bundle's adapters and projects a new adapter into it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, Optional

import torch

from ..report import AdapterReport, BundleReport, BundleSize, OverallFidelity
from .cost import per_adapter_params, stored_floats
from .joint import core_products, diagonal_cores, full_cores
from .svd import CanonicalBatch

if TYPE_CHECKING:
    from .engine import FactorSource, Placement
    from .settings import CompressionSettings


def least_squares_sigma(
    batch: CanonicalBatch, U: torch.Tensor, V: torch.Tensor, diag: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Optimal core of every adapter for bases U [M, d_out, r], V [M, d_in, r].

    Returns (sigma [M, N, r, r] or [M, N, r] in normalised units, T [M, N, r, r], UᵀU [M, r, r], VᵀV [M, r, r]).
    """
    G, H = core_products(batch, U, V)
    T = G.mT @ H  # [M, N, r, r]
    gram_u, gram_v = U.mT @ U, V.mT @ V
    cores = diagonal_cores if diag else full_cores
    sigma = cores(gram_u.unsqueeze(1), gram_v.unsqueeze(1), T.diagonal(dim1=-2, dim2=-1) if diag else T)
    return sigma, T, gram_u, gram_v


def relative_errors(
    batch: CanonicalBatch, sigma: torch.Tensor, T: torch.Tensor, gram_u: torch.Tensor, gram_v: torch.Tensor
) -> torch.Tensor:
    """‖ΔW_i − U Σ_i Vᵀ‖² / ‖ΔW_i‖² -> [M, N] (0 for a zero update), with sigma in normalised units.
    The Gram matrices are [M, r, r] for bases shared by the N adapters, or [M, N, r, r] for a basis per adapter."""
    if gram_u.dim() == 3:
        gram_u, gram_v = gram_u.unsqueeze(1), gram_v.unsqueeze(1)
    if sigma.dim() == 3:
        cross = (sigma * T.diagonal(dim1=-2, dim2=-1)).sum(-1)
        quad = (sigma.unsqueeze(-1) * (gram_u * gram_v) * sigma.unsqueeze(-2)).sum((-1, -2))
    else:
        cross = (sigma * T).sum((-1, -2))
        quad = (sigma * (gram_u @ sigma @ gram_v)).sum((-1, -2))
    return (batch.energy - 2 * cross + quad).clamp_min(0.0)


def sigma_for_storage(sigma: torch.Tensor, norm: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Restore each adapter's norm (and with it its LoRA scaling) in its core, in the storage dtype."""
    shape = norm.shape + (1,) * (sigma.dim() - norm.dim())
    return (sigma * norm.view(shape)).to(dtype)


def normalised_cores(stored: torch.Tensor, norm: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The inverse of `sigma_for_storage`: stored cores back in normalised units, in `dtype` (0 for zero updates)."""
    shape = norm.shape + (1,) * (stored.dim() - norm.dim())
    inv = torch.where(norm > 0, 1.0 / norm.clamp_min(torch.finfo(norm.dtype).tiny), 0.0)
    return stored.to(dtype) * inv.view(shape)


def stored_errors(
    batch: CanonicalBatch,
    stored: torch.Tensor,
    T: torch.Tensor,
    gram_u: torch.Tensor,
    gram_v: torch.Tensor,
) -> torch.Tensor:
    """[M, N] errors of the cores as stored (storage dtype, norms restored) for bases with cross products T and Gram
    matrices gram_u, gram_v (see `relative_errors`)."""
    return relative_errors(batch, normalised_cores(stored, batch.norm, T.dtype), T, gram_u, gram_v)


def own_basis_cores(
    batch: CanonicalBatch, U: torch.Tensor, V: torch.Tensor, storage_dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """Diagonal least-squares cores of adapters stored in bases of their own (per-adapter SVD), and their errors.

    U: [M, N, d_out, r], V: [M, N, d_in, r] (as stored, in the compute dtype). Returns the stored cores [M, N, r]
    (storage dtype, norms restored) and the errors of those stored cores [M, N]."""
    M, d_out, _ = batch.B.shape
    N = batch.num_adapters
    B = batch.B.view(M, d_out, N, -1).permute(0, 2, 1, 3)  # [M, N, d_out, R]
    G = B.mT @ U  # [M, N, R, r]
    H = batch.right_vectors().mT @ V  # [M, N, R, r]
    T = G.mT @ H  # [M, N, r, r]
    gram_u, gram_v = U.mT @ U, V.mT @ V  # [M, N, r, r]
    sigma = diagonal_cores(gram_u, gram_v, T.diagonal(dim1=-2, dim2=-1))  # [M, N, r]
    stored = sigma_for_storage(sigma, batch.norm, storage_dtype)
    return stored, stored_errors(batch, stored, T, gram_u, gram_v)


# ------------------------------------------------------------------------------------------------ report


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def dtype_bytes(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def adapter_reports(
    errors: Mapping[str, Mapping[str, float]],
    clusters: Mapping[str, int],
    params: Optional[Mapping[str, int]] = None,
) -> dict[str, AdapterReport]:
    """{adapter: its report} from {adapter: {module: error}} (the modules it has), its cluster and its source
    parameters."""
    return {
        name: AdapterReport.of_errors(modules, clusters[name], None if params is None else int(params[name]))
        for name, modules in errors.items()
    }


def compression_report(
    source: FactorSource,
    modules: Mapping[str, Any],
    errors: Mapping[str, Mapping[str, float]],
    clusters: Sequence[int],
    settings: CompressionSettings,
    placement: Placement,
    *,
    method: str,
    rank: int,
    sigma_type: str,
    num_clusters: int,
    seconds: float,
    world_size: int,
    **sections: Any,
) -> BundleReport:
    """The report of a compression, fixed shape or budget plan alike (the one place it is assembled): per adapter
    its errors (`errors`: {adapter: {module: error}} of the stored factors), cluster (`clusters`: the default
    assignment) and source parameters; the overall numbers; the sizes of the source and of `modules` (the bundle's
    factors, in the storage dtype); the settings and the run; and the method's `sections` (`BundleReport` fields:
    iterations, cluster_search, svd_baseline, clusters_requested; budget, plan, timings, max_share)."""
    names = list(source.names)
    params = dict(zip(names, per_adapter_params(source.shapes(), source.ranks())))
    per_adapter = adapter_reports(errors, {n: int(clusters[i]) for i, n in enumerate(names)}, params)
    original_params, original_bytes = source.original_size()
    storage = placement.storage_dtype
    report = BundleReport(
        method=method,
        rank=rank,
        sigma_type=sigma_type,
        num_clusters=num_clusters,
        num_adapters=len(names),
        num_modules=len(modules),
        per_adapter=per_adapter,
        overall=OverallFidelity.of(per_adapter),
        size=BundleSize.of(
            original_params, original_bytes, stored_floats(modules.values()), dtype_bytes(storage), dtype_name(storage)
        ),
        seconds=seconds,
        device=str(placement.device),
        world_size=world_size,
        compute_dtype=dtype_name(placement.compute_dtype),
        seed=settings.seed,
        tol=settings.tol,
        stall_tol=settings.stall_tol,
        max_iter=settings.max_iter,
        target_error=settings.target_error,
        **sections,
    )
    return report
