"""Fidelity of a compressed collection, from factors: the paper's squared relative error, and sizes.

For an adapter with normalised update ΔW̃ (‖ΔW̃‖ = 1, or 0) and stored factors U [d_out, r], Σ [r, r], V [d_in, r]:

    ‖ΔW̃ − U Σ Vᵀ‖² = ‖ΔW̃‖² − 2⟨Σ, T⟩ + ⟨Σ, (UᵀU) Σ (VᵀV)⟩,     T = Uᵀ ΔW̃ V

which holds for any U, V (orthonormal or not, e.g. after rounding to bf16), so the report describes the bundle as
stored. The least-squares Σ for given bases is Σ = (UᵀU)⁻¹ T (VᵀV)⁻¹, or σ = ((UᵀU)∘(VᵀV))⁻¹ diag(T) for a diagonal
core: the same formula fits a bundle's adapters and projects a new adapter into it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, Optional

import torch

from .joint import core_products, diagonal_cores, full_cores
from .svd import CanonicalBatch


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


def summarise(
    errors: Mapping[str, Mapping[str, float]], clusters: Optional[Mapping[str, int]] = None
) -> dict[str, Any]:
    """Per-adapter and overall summary from {adapter: {module: error}} (modules an adapter lacks are not listed).

    Returns {"per_adapter": {name: {"mean_error", "max_error", "cluster", "modules"}}, "overall": {"mean_error",
    "worst_adapter", "worst_error", "max_module_error"}}; "worst" is the adapter with the largest mean error.
    """
    per_adapter: dict[str, Any] = {}
    for name, modules in errors.items():
        values = list(modules.values())
        per_adapter[name] = {
            "mean_error": float(sum(values) / len(values)) if values else 0.0,
            "max_error": float(max(values)) if values else 0.0,
            "cluster": int(clusters[name]) if clusters is not None else 0,
            "modules": {m: float(e) for m, e in sorted(modules.items())},
        }
    return {"per_adapter": per_adapter, "overall": overall(per_adapter)}


def overall(per_adapter: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    if not per_adapter:
        return {"mean_error": 0.0, "worst_adapter": None, "worst_error": 0.0, "max_module_error": 0.0}
    worst = max(per_adapter, key=lambda n: per_adapter[n]["mean_error"])
    return {
        "mean_error": float(sum(a["mean_error"] for a in per_adapter.values()) / len(per_adapter)),
        "worst_adapter": worst,
        "worst_error": float(per_adapter[worst]["mean_error"]),
        "max_module_error": float(max(a["max_error"] for a in per_adapter.values())),
    }


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def dtype_bytes(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def size_report(
    original_params: int, original_bytes: int, bundle_params: int, storage_dtype: torch.dtype
) -> dict[str, dict[str, Any]]:
    """{"params": {"original", "bundle", "ratio"}, "bytes": {"original", "bundle", "dtype"}}; ratio = original /
    bundle (the compression factor: above 1 means the bundle is smaller)."""
    return {
        "params": {
            "original": int(original_params),
            "bundle": int(bundle_params),
            "ratio": float(original_params / bundle_params) if bundle_params else math.inf,
        },
        "bytes": {
            "original": int(original_bytes),
            "bundle": int(bundle_params * dtype_bytes(storage_dtype)),
            "dtype": dtype_name(storage_dtype),
        },
    }
