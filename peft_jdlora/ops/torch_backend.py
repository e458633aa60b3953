"""The "torch" backend of the mixed-adapter JD-LoRA forward, in plain PyTorch.

For tokens t with adapter slot a(t) (-1 = base model) of cluster c(a):

    out[t] += U[c] · Σ[a] · (V[c] · x[t])          (unchanged for base tokens)

Shapes (T tokens, N adapters, C clusters, rank r):
    x:               [T, d_in]
    token_slots:     [T]           int64, -1 = base model
    U:               [C, d_out, r]
    V:               [C, r, d_in]
    sigma:           [N, r, r] (full) or [N, r] (diagonal)
    adapter_cluster: [N]           int64, the cluster table

Batched over adapters (no Python loop over adapters), it never syncs with the device and it is differentiable: it is
the CPU serving path and the training path. `peft_jdlora.ops` dispatches to it (`backend="torch"`); the Triton
kernels are tested against it.
"""

from __future__ import annotations

from typing import Optional

import torch

# Above this many stacked basis columns (C·r), one wide GEMM against every cluster's basis costs more than
# gathering each token's own basis.
WIDE_GEMM_MAX_COLUMNS = 256
# Tokens per chunk on the gathered-basis path: bounds the [chunk, r, d] gathered copies.
GATHER_CHUNK_TOKENS = 256


def shrink(x: torch.Tensor, V: torch.Tensor, token_cluster: Optional[torch.Tensor]) -> torch.Tensor:
    """h[t] = V[c(t)] · x[t].  x: [T, d_in], V: [C, r, d_in], token_cluster: [T] (None when C = 1) -> h: [T, r]."""
    num_clusters, rank, d_in = V.shape
    if num_clusters == 1:
        return x @ V[0].T
    if num_clusters * rank <= WIDE_GEMM_MAX_COLUMNS:
        h_all = (x @ V.reshape(num_clusters * rank, d_in).T).view(-1, num_clusters, rank)  # [T, C, r]
        index = token_cluster.view(-1, 1, 1).expand(-1, 1, rank)
        return h_all.gather(1, index).squeeze(1)
    chunks = []
    for start in range(0, x.shape[0], GATHER_CHUNK_TOKENS):
        xs, cs = x[start : start + GATHER_CHUNK_TOKENS], token_cluster[start : start + GATHER_CHUNK_TOKENS]
        chunks.append(torch.bmm(V[cs], xs.unsqueeze(-1)).squeeze(-1))  # [t, r, d_in] @ [t, d_in, 1]
    return torch.cat(chunks) if chunks else x.new_zeros(0, rank)


def expand(
    z: torch.Tensor, U: torch.Tensor, token_cluster: Optional[torch.Tensor], out: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """y[t] = U[c(t)] · z[t].  z: [T, r], U: [C, d_out, r], token_cluster: [T] (None when C = 1) -> y: [T, d_out].

    With `out` ([T, d_out], z's dtype) the products are added into it in place (addmm_: no [T, d_out] temporary)."""
    num_clusters, d_out, rank = U.shape
    if num_clusters == 1:
        return z @ U[0].T if out is None else out.addmm_(z, U[0].T)
    if num_clusters * rank <= WIDE_GEMM_MAX_COLUMNS:
        z_wide = z.new_zeros(z.shape[0], num_clusters, rank)
        z_wide.scatter_(1, token_cluster.view(-1, 1, 1).expand(-1, 1, rank), z.unsqueeze(1))
        U_wide = U.permute(1, 0, 2).reshape(d_out, num_clusters * rank)  # [d_out, C·r]
        z_wide = z_wide.view(z.shape[0], -1)  # [T, C·r]
        return z_wide @ U_wide.T if out is None else out.addmm_(z_wide, U_wide.T)
    if out is None:
        out = z.new_zeros(z.shape[0], d_out)
    for start in range(0, z.shape[0], GATHER_CHUNK_TOKENS):
        zs, cs = z[start : start + GATHER_CHUNK_TOKENS], token_cluster[start : start + GATHER_CHUNK_TOKENS]
        out[start : start + zs.shape[0]] += torch.bmm(U[cs], zs.unsqueeze(-1)).squeeze(-1)
    return out


def apply_sigma(
    h: torch.Tensor, sigma: torch.Tensor, token_slots: torch.Tensor, slots: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """z[t] = Σ[a(t)] · h[t], and 0 for base tokens.  h: [T, r], sigma: [N, r, r] or [N, r] -> z: [T, r].
    `slots` is token_slots.clamp(min=0) when the caller has it."""
    sigma_t = sigma[token_slots.clamp(min=0) if slots is None else slots]  # [T, r, r] or [T, r]
    if sigma.dim() == 3:
        z = torch.bmm(sigma_t, h.unsqueeze(-1)).squeeze(-1)
    else:
        z = h * sigma_t
    return torch.where((token_slots >= 0).unsqueeze(-1), z, 0.0)


def add_jd_lora_delta_torch_(
    out: torch.Tensor,
    x: torch.Tensor,
    token_slots: torch.Tensor,
    U: torch.Tensor,
    V: torch.Tensor,
    sigma: torch.Tensor,
    adapter_cluster: torch.Tensor,
) -> torch.Tensor:
    """out [T, d_out] += the update of every token, in place (into out directly when out, z and U share a dtype);
    returns out. Differentiable when `out` itself needs no gradient (a fresh tensor: `ops.jd_lora_delta`)."""
    slots = token_slots.clamp(min=0)  # [T]
    token_cluster = adapter_cluster[slots] if V.shape[0] > 1 else None  # [T]
    z = apply_sigma(shrink(x, V, token_cluster), sigma, token_slots, slots)  # [T, r], 0 for base tokens
    if out.dtype == z.dtype == U.dtype:
        return expand(z, U, token_cluster, out=out)
    # Under torch.autocast, z comes out in the autocast dtype while U keeps its own, and in-place ops are not cast.
    return out.add_(expand(z, U, token_cluster).to(out.dtype))
