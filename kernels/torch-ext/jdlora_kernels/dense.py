"""One shared basis (C = 1): the whole batch through dense GEMMs instead of the gathered Triton tiles.

With a single cluster every LoRA token uses the same V_0 and U_0, so the shrink and the expand need no grouping:

    h = x · V_0ᵀ            [T, r]       one GEMM over every token (or handed in: see `shrunk`)
    z[t] = Σ_a(t) · h[t]    [T, r]       fp32, a gathered batched product (h ∘ σ_a for a diagonal Σ); 0 for base rows
    y += z · U_0ᵀ           [T, d_out]   one GEMM, added in place

The shrink can then fold into the base layer's own GEMM: with W' = [W; V_0] ([d_out + r, d_in]) one product
x · W'ᵀ gives the base output in its first d_out columns and h in the last r, and `shrunk=` takes that h. Whether
this beats the two Triton launches depends on the GPU and the batch (cuBLAS on a rank-16 GEMM, a handful of small
launches for the Σ part); `benchmarks/kernels.py` times both (`jd_dense_*`, `layer_fold_*`).

Pure PyTorch (no Triton launch), so it runs on any device, and it only reads device tensors of the metadata: no host
sync, CUDA-graph capturable.
"""

from __future__ import annotations

from typing import Optional

import torch

from .meta import JDLoraKernelMeta


def add_jd_lora_dense(
    y: torch.Tensor,
    x: torch.Tensor,
    meta: JDLoraKernelMeta,
    U: torch.Tensor,
    V: torch.Tensor,
    sigma: torch.Tensor,
    shrunk: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Add U_0 · Σ_a · V_0 · x[t] into `y` ([T, d_out], in place) for every LoRA token and return `y`.

    x: [T, d_in]; U: [1, d_out, r]; V: [1, r, d_in]; sigma: [N, r, r] or [N, r]; `meta` gives each token's slot
    (-1 = base: its row of `y` gets an exact zero added). `shrunk` ([T, r], e.g. the last r columns of the base
    GEMM x · [W; V_0]ᵀ) replaces the shrink GEMM.
    """
    _check_dense(y, x, meta, U, V, sigma, shrunk)
    slots = meta.token_lora_mapping  # [T] int32, on the device
    h = torch.mm(x, V[0].T) if shrunk is None else shrunk  # [T, r]
    core = sigma.index_select(0, slots.clamp(min=0)).float()  # [T, r, r] or [T, r]
    if sigma.dim() == 3:
        z = torch.bmm(core, h.float().unsqueeze(-1)).squeeze(-1)  # [T, r] fp32
    else:
        z = h.float() * core
    z = z * (slots >= 0).unsqueeze(-1)  # base rows: exact zeros
    return y.addmm_(z.to(U.dtype), U[0].T)


def _check_dense(
    y: torch.Tensor,
    x: torch.Tensor,
    meta: JDLoraKernelMeta,
    U: torch.Tensor,
    V: torch.Tensor,
    sigma: torch.Tensor,
    shrunk: Optional[torch.Tensor],
) -> None:
    """Host-side shape / device checks (no device reads)."""
    if U.dim() != 3 or V.dim() != 3 or U.shape[0] != 1 or V.shape[0] != 1:
        raise ValueError(
            f"add_jd_lora_dense needs one basis: U [1, d_out, r] and V [1, r, d_in], got U {tuple(U.shape)} and "
            f"V {tuple(V.shape)}; use add_jd_lora for several clusters."
        )
    _, d_out, rank = U.shape
    if V.shape[1] != rank or x.dim() != 2 or V.shape[2] != x.shape[1]:
        raise ValueError(f"V must be [1, r={rank}, d_in={x.shape[-1]}], got {tuple(V.shape)}.")
    if x.shape[0] != meta.num_tokens or tuple(y.shape) != (meta.num_tokens, d_out):
        raise ValueError(
            f"x must be [T={meta.num_tokens}, d_in] and y [T, d_out={d_out}] (the metadata's tokens), got "
            f"{tuple(x.shape)} and {tuple(y.shape)}."
        )
    expected = (meta.num_slots, rank, rank) if sigma.dim() == 3 else (meta.num_slots, rank)
    if tuple(sigma.shape) != expected:
        raise ValueError(f"sigma must be [N, r, r] or [N, r] with N={meta.num_slots}, got {tuple(sigma.shape)}.")
    if shrunk is not None and tuple(shrunk.shape) != (meta.num_tokens, rank):
        raise ValueError(f"shrunk must be [T={meta.num_tokens}, r={rank}], got {tuple(shrunk.shape)}.")
    devices = {t.device for t in (y, x, U, V, sigma, meta.buffer)}
    if len(devices) != 1:
        raise ValueError(f"y, x, U, V, sigma and the metadata must be on one device, got {sorted(map(str, devices))}.")
