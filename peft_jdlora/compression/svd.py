"""Exact SVD of low-rank products from their factors, and the per-adapter SVD baseline.

For ΔW = B·A (B: d_out×R, A: R×d_in) the SVD costs O((d_out + d_in)·R²) without forming ΔW:

    B = Q_B R_B,  Aᵀ = Q_A R_A          thin QR
    R_B R_Aᵀ = W S Zᵀ                    SVD of the R×R core
    ΔW = (Q_B W) S (Q_A Z)ᵀ              P = Q_B W and Q = Q_A Z have orthonormal columns

Every algorithm of the engine starts from this canonical form, batched over M modules of one shape and N adapters,
with each update normalised to unit Frobenius norm (the paper's weights w_i = 1/‖ΔW_i‖²; the norm is restored in Σ):

    ΔW_i / ‖ΔW_i‖ = B̃_i Q_iᵀ,   B̃_i = P_i diag(s_i),  ‖s_i‖ = 1
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Optional

import torch

from .cost import target_rank, uniform_floats

if TYPE_CHECKING:
    from .engine import FactorSource


@dataclass
class CanonicalBatch:
    """M modules × N adapters in normalised canonical form, laid out so that sums over adapters are single GEMMs.

    B:    [M, d_out, N·R]  columns i·R … i·R+R-1 hold B̃_i = P_i·diag(s_i) (orthogonal columns, norms s_i)
    Q:    [M, d_in, N·R]   columns of adapter i are orthonormal (Q_i)
    s:    [M, N, R]        normalised singular values, descending; all 0 for an absent or zero update
    norm: [M, N]           ‖ΔW_i‖_F (0: absent or zero)
    """

    B: torch.Tensor
    Q: torch.Tensor
    s: torch.Tensor
    norm: torch.Tensor

    @property
    def num_modules(self) -> int:
        return self.B.shape[0]

    @property
    def num_adapters(self) -> int:
        return self.s.shape[1]

    @property
    def rank(self) -> int:
        return self.s.shape[2]

    @property
    def energy(self) -> torch.Tensor:
        """[M, N] ‖ΔW_i‖² after normalisation: 1 for nonzero updates, 0 otherwise."""
        return (self.norm > 0).to(self.s.dtype)

    def adapters(self, index: torch.Tensor) -> CanonicalBatch:
        """The same modules restricted to the adapters in `index` (1-D int64), as a copy."""
        M, d_out, _ = self.B.shape
        d_in, R = self.Q.shape[1], self.rank
        B = self.B.view(M, d_out, -1, R).index_select(2, index).reshape(M, d_out, -1)
        Q = self.Q.view(M, d_in, -1, R).index_select(2, index).reshape(M, d_in, -1)
        return CanonicalBatch(B, Q, self.s.index_select(1, index), self.norm.index_select(1, index))

    def modules(self, index: torch.Tensor) -> CanonicalBatch:
        """The modules in `index` (1-D int64), as a copy."""
        return CanonicalBatch(self.B[index], self.Q[index], self.s[index], self.norm[index])

    def left_vectors(self) -> torch.Tensor:
        """[M, N, d_out, R] P_i (columns with s = 0 are returned as zeros)."""
        M, d_out, _ = self.B.shape
        P = self.B.view(M, d_out, self.num_adapters, self.rank).permute(0, 2, 1, 3)
        inv = torch.where(self.s > 0, 1.0 / self.s.clamp_min(torch.finfo(self.s.dtype).tiny), 0.0)
        return P * inv.unsqueeze(2)

    def right_vectors(self) -> torch.Tensor:
        """[M, N, d_in, R] Q_i."""
        M, d_in, _ = self.Q.shape
        return self.Q.view(M, d_in, self.num_adapters, self.rank).permute(0, 2, 1, 3)


def canonicalize(A: torch.Tensor, B: torch.Tensor) -> CanonicalBatch:
    """Canonical form of ΔW_i = B_i·A_i for a batch.  A: [M, N, R, d_in], B: [M, N, d_out, R] (zero-padded ranks
    and absent adapters as zeros are exact: they only add zero singular values)."""
    M, N, d_out, R = B.shape
    d_in = A.shape[-1]
    QB, RB = torch.linalg.qr(B)  # [M, N, d_out, k_B], [M, N, k_B, R]
    QA, RA = torch.linalg.qr(A.mT)  # [M, N, d_in, k_A], [M, N, k_A, R]
    core = RB @ RA.mT  # [M, N, k_B, k_A]: ΔW = QB · core · QAᵀ
    W, S, Zh = torch.linalg.svd(core, full_matrices=False)  # [.., k_B, k], [.., k], [.., k, k_A]
    k = S.shape[-1]
    P = QB @ W  # [M, N, d_out, k]
    Qf = QA @ Zh.mT  # [M, N, d_in, k]
    norm = S.norm(dim=-1)  # [M, N]
    s = torch.where(norm.unsqueeze(-1) > 0, S / norm.clamp_min(torch.finfo(S.dtype).tiny).unsqueeze(-1), 0.0)
    if k < R:  # rank above min(d_out, d_in): pad with zero singular values so that every adapter has R columns
        pad = R - k
        P = torch.nn.functional.pad(P, (0, pad))
        Qf = torch.nn.functional.pad(Qf, (0, pad))
        s = torch.nn.functional.pad(s, (0, pad))
    Bn = P * s.unsqueeze(-2)  # [M, N, d_out, R]
    # One copy into the [M, d, N·R] layout: every later sum over adapters is then a single batched GEMM.
    B_cat = Bn.permute(0, 2, 1, 3).reshape(M, d_out, N * R)
    Q_cat = Qf.permute(0, 2, 1, 3).reshape(M, d_in, N * R)
    return CanonicalBatch(B_cat, Q_cat, s, norm)


def truncated_svd(batch: CanonicalBatch, rank: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Best rank-`rank` approximation of every update (Eckart–Young), as a singleton basis per adapter.

    Returns U [M, N, d_out, r], V [M, N, d_in, r], sigma [M, N, r] (normalised units: multiply by `batch.norm`).
    """
    r = min(rank, batch.rank)
    U = batch.left_vectors()[..., :r]
    V = batch.right_vectors()[..., :r]
    return U, V, batch.s[..., :r]


def svd_errors(batch: CanonicalBatch) -> torch.Tensor:
    """[M, N, R] exact error of every adapter's rank-q truncation, q = 1 … R (Eckart–Young on the canonical form:
    error_i(q) = 1 − Σ_{j≤q} s_ij² in normalised units; 0 for absent or zero updates)."""
    return (batch.energy.unsqueeze(-1) - batch.s.square().cumsum(-1)).clamp_min(0.0)


# ------------------------------------------------------------------------------------------------ SVD baseline


def svd_baseline(
    source: FactorSource, floats: int, batches: Iterable[tuple[list[str], CanonicalBatch]]
) -> dict[str, Optional[dict[str, Any]]]:
    """Per-adapter SVD around the size `floats`: {"same_floats": the largest uniform rank q whose SVD bundle (with
    `compress`'s per-module caps) stores at most `floats` elements, "next_rank": rank q + 1}, each {"rank", "floats",
    "mean_error"} or None (no rank fits / q is already lossless). Errors are exact from the canonical singular values
    (`svd_errors`) of `batches`, the (modules, CanonicalBatch) of `source` (e.g. `engine.canonical_batches`); they
    are not read when no rank qualifies.

    One read of the adapters and a small SVD per adapter and module: cheap next to a joint fit, so a fixed-rank
    bundle can report whether a budget plan would have spent its bytes better. "next_rank" covers small bundles that
    even rank 1 does not fit (a budget plan can still mix rank-1 SVD modules with cheap shared ones)."""
    shapes, ranks = source.shapes(), source.ranks()
    N = len(source.names)
    max_rank = max(max(r) for r in ranks.values())

    def caps(q: int) -> dict[str, int]:
        return {m: target_rank("svd", q, d_out, d_in, ranks[m]) for m, (d_out, d_in) in shapes.items()}

    q = 0
    while q < max_rank and uniform_floats(shapes, ranks, "svd", q + 1) <= floats:
        q += 1
    rank_of = {k: caps(k) for k in (q, q + 1) if 1 <= k <= max_rank}  # {uniform rank: {module: capped rank}}
    if not rank_of:
        return {"same_floats": None, "next_rank": None}
    sums = {k: torch.zeros(N, dtype=torch.float64) for k in rank_of}
    counts = torch.zeros(N, dtype=torch.float64)
    for modules, batch in batches:
        errors = svd_errors(batch)  # [M, N, R]
        for j, module in enumerate(modules):
            present = torch.tensor([r > 0 for r in ranks[module]])
            counts += present.double()
            for k, caps_k in rank_of.items():
                kept = min(caps_k[module], errors.shape[-1])
                sums[k] += torch.where(present, errors[j, :, kept - 1].double().cpu(), 0.0)
    points = {
        k: {
            "rank": k,
            "floats": uniform_floats(shapes, ranks, "svd", k),
            "mean_error": float((sums[k] / counts.clamp_min(1))[counts > 0].mean()),
        }
        for k in rank_of
    }
    return {"same_floats": points.get(q), "next_rank": points.get(q + 1)}
