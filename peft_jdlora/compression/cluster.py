"""Clusters of adapters, each with its own basis per module: k-subspace alternation, seeding, assignment.

The objective is the total relative error L = Σ_i Σ_m error_{i,m}(U_{c_i,m}, V_{c_i,m}) with one cluster c_i per
adapter for all modules (serving needs one). The engine alternates, over all modules:

    fit        every cluster's bases on its members, warm-started from the current bases (JD-Full never increases
               Σ_{i∈c} error_i from its start, so L does not increase)
    reassign   every adapter to the cluster whose bases reconstruct it best (Σ by projection): L does not increase

until no assignment changes. New clusters are seeded k-means++ style from the current solution: an adapter drawn with
probability ∝ its current error gets a cluster whose bases start with its own singular vectors (filled up with those
of its current cluster). Since the C-cluster run starts from the (C−1)-cluster solution plus seeds, and every step is
monotone, C clusters are never worse than one basis of the same rank.
"""

from __future__ import annotations

from typing import Optional

import torch

from .svd import CanonicalBatch


def seed_basis(batch: CanonicalBatch, adapter: int, parent_U: torch.Tensor, parent_V: torch.Tensor) -> tuple:
    """Bases [M, d, r] for a new cluster seeded by `adapter`: its own leading singular vectors first, then the
    parent cluster's directions, orthonormalised. With rank ≥ the adapter's rank the seed is reconstructed exactly;
    where the seed lacks a module, the parent's bases are kept.

    parent_U: [M, d_out, r], parent_V: [M, d_in, r] -> (U [M, d_out, r], V [M, d_in, r]).
    """
    r = parent_U.shape[-1]
    idx = torch.tensor([adapter], device=batch.B.device)
    seed = batch.adapters(idx)
    # Singular values are ≤ 1 after normalisation; the factor puts the seed's directions ahead of the parent's
    # (unit columns) in the SVD below without letting tiny ones override the parent's.
    boost = 1e3
    left = torch.cat([boost * seed.B, parent_U], dim=-1)  # [M, d_out, R + r]
    right = torch.cat([boost * seed.Q * seed.s.reshape(seed.s.shape[0], 1, -1), parent_V], dim=-1)
    U = torch.linalg.svd(left, full_matrices=False).U[..., :r]
    V = torch.linalg.svd(right, full_matrices=False).U[..., :r]
    return U, V


def kmeanspp_pick(
    best_error: torch.Tensor, generator: torch.Generator, exclude: Optional[set[int]] = None
) -> Optional[int]:
    """Draw an adapter with probability ∝ its current error (best_error [N], float64, on CPU); None if every
    adapter is already reconstructed exactly."""
    weights = best_error.clamp_min(0.0).clone()
    for i in exclude or ():
        weights[i] = 0.0
    if not bool((weights > 0).any()):
        return None
    return int(torch.multinomial(weights / weights.sum(), 1, generator=generator))


def reassign(errors: torch.Tensor, current: torch.Tensor) -> torch.Tensor:
    """Cluster of each adapter minimising its summed error (errors [N, C]); ties keep the current cluster, so that an
    alternation that cannot improve stops."""
    best = errors.argmin(dim=1)
    keep = errors.gather(1, current.view(-1, 1)).squeeze(1) <= errors.gather(1, best.view(-1, 1)).squeeze(1)
    return torch.where(keep, current, best)


def compact(assignment: torch.Tensor, num_clusters: int) -> tuple[torch.Tensor, list[int]]:
    """Drop empty clusters: (assignment renumbered 0…C'−1, kept old cluster ids in new order)."""
    used = sorted(set(assignment.tolist()))
    remap = torch.full((num_clusters,), -1, dtype=torch.int64)
    for new, old in enumerate(used):
        remap[old] = new
    return remap[assignment], used
