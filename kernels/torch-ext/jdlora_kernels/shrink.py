"""Shrink: z = Σ_a · (V_c · x) for every LoRA token, in the sorted token order of the batch metadata.

    x:      [T, d_in]              fp16 / bf16 / fp32
    V:      [C, r, d_in]           per slice (fused QKV / gate-up: one V per slice, all sharing x)
    sigma:  [N, r, r] or [N, r]    per slice
    z:      [S, T, r]              fp32; row p holds sorted position p (rows >= num_lora_tokens are not written)

One program computes one BLOCK_M-row tile of the metadata (rows gathered through the sorted token index) against
the whole rank, looping over d_in in BLOCK_K steps (SPLIT_K programs share a tile's K range and combine with fp32
atomics). Σ is applied in the epilogue, which is exact under split-K because it is linear:

    SIGMA_MODE 0  diagonal Σ: z = h ∘ σ_a per row (works for tiles that mix adapters)
    SIGMA_MODE 1  full Σ, tiles of one adapter (adapter tiles): z = h · Σ_aᵀ as one tl.dot
    SIGMA_MODE 2  full Σ, tiles of one cluster (cluster tiles): z[m] = Σ_a(m) · h[m] per row, in BLOCK_I chunks

Mode 1 is best when adapters have many tokens (prefill); mode 2 when most adapters have a token or two (decode with
many distinct adapters), where adapter tiles would each re-read V_c for one row.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Optional, Union

import torch
import triton
import triton.language as tl

from . import _utils
from .meta import JDLoraKernelMeta

SIGMA_DIAG, SIGMA_TILE, SIGMA_ROW = 0, 1, 2


@triton.jit
def _jd_shrink_kernel(
    x_ptr,  # [T, d_in]
    v_ptr,  # [C, r, d_in] (slice 0; the slice table holds every slice's pointer when SLICED)
    sigma_ptr,  # [N, r, r] or [N, r]
    z_ptr,  # [S, T, r] fp32
    sorted_token_ptr,  # [T] int32: token at each sorted position
    sorted_slot_ptr,  # [T] int32: slot at each sorted position
    tiles_ptr,  # [max_tiles, 4] int32: (start, length, slot, cluster)
    slice_table_ptr,  # [S, 2] int64: V and Σ pointers of each slice
    d_in,
    rank,
    stride_xt,
    stride_xk,
    stride_vc,
    stride_vr,
    stride_vk,
    stride_sn,
    stride_si,
    stride_sj,
    stride_zs,
    stride_zt,
    slice_table_stride,
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_I: tl.constexpr,
    SPLIT_K: tl.constexpr,
    SIGMA_MODE: tl.constexpr,
    SLICED: tl.constexpr,
    UPCAST: tl.constexpr,  # interpreter: tl.dot on bf16 is wrong there, so dot in fp32
):
    tile = tl.program_id(0)
    pid_k = tl.program_id(1)
    pid_s = tl.program_id(2)
    length = tl.load(tiles_ptr + tile * 4 + 1)
    if length == 0:  # padding tile of the static grid
        return
    start = tl.load(tiles_ptr + tile * 4)
    cluster = tl.load(tiles_ptr + tile * 4 + 3).to(tl.int64)
    if SLICED:
        v_base = tl.load(slice_table_ptr + pid_s * slice_table_stride + 0).to(tl.pointer_type(v_ptr.dtype.element_ty))
        s_base = tl.load(slice_table_ptr + pid_s * slice_table_stride + 1).to(
            tl.pointer_type(sigma_ptr.dtype.element_ty)
        )
    else:
        v_base = v_ptr
        s_base = sigma_ptr

    offs_m = tl.arange(0, BLOCK_M)
    mask_m = offs_m < length
    pos = (start + offs_m).to(tl.int64)
    token = tl.load(sorted_token_ptr + pos, mask=mask_m, other=0).to(tl.int64)
    offs_r = tl.arange(0, BLOCK_R)
    mask_r = offs_r < rank
    offs_k = tl.arange(0, BLOCK_K)

    x_rows = x_ptr + token[:, None] * stride_xt  # [M, 1]
    v_cols = v_base + cluster * stride_vc + offs_r[None, :] * stride_vr  # [1, R]
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for k0 in range(pid_k * BLOCK_K, d_in, SPLIT_K * BLOCK_K):
        k = k0 + offs_k
        mask_k = k < d_in
        x = tl.load(x_rows + k[None, :] * stride_xk, mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        v = tl.load(v_cols + k[:, None] * stride_vk, mask=mask_k[:, None] & mask_r[None, :], other=0.0)  # [K, R]
        if UPCAST:
            x = x.to(tl.float32)
            v = v.to(tl.float32)
        # "ieee": fp32 operands get exact fp32 products, like torch's fp32 matmul (and tf32 is missing on most AMD
        # GPUs); 16-bit operands run on tensor cores whatever the setting.
        acc += tl.dot(x, v, input_precision="ieee")

    z_rows = z_ptr + pid_s * stride_zs + pos[:, None] * stride_zt  # [M, 1]
    if SIGMA_MODE == 0:
        slot = tl.load(sorted_slot_ptr + pos, mask=mask_m, other=0).to(tl.int64)
        sig = tl.load(
            s_base + slot[:, None] * stride_sn + offs_r[None, :] * stride_si,
            mask=mask_m[:, None] & mask_r[None, :],
            other=0.0,
        ).to(tl.float32)
        _store_rows(z_rows + offs_r[None, :], acc * sig, mask_m[:, None] & mask_r[None, :], SPLIT_K)
    elif SIGMA_MODE == 1:
        slot = tl.load(tiles_ptr + tile * 4 + 2).to(tl.int64)
        # sigma_t[j, i] = Σ[slot, i, j], so z = h · Σᵀ.
        sigma_t = tl.load(
            s_base + slot * stride_sn + offs_r[None, :] * stride_si + offs_r[:, None] * stride_sj,
            mask=mask_r[:, None] & mask_r[None, :],
            other=0.0,
        ).to(tl.float32)
        z = tl.dot(acc, sigma_t, input_precision="ieee")
        _store_rows(z_rows + offs_r[None, :], z, mask_m[:, None] & mask_r[None, :], SPLIT_K)
    else:
        slot = tl.load(sorted_slot_ptr + pos, mask=mask_m, other=0).to(tl.int64)
        s_rows = s_base + slot[:, None, None] * stride_sn  # [M, 1, 1]
        for i0 in range(0, rank, BLOCK_I):
            offs_i = i0 + tl.arange(0, BLOCK_I)
            mask_i = offs_i < rank
            sig = tl.load(
                s_rows + offs_i[None, :, None] * stride_si + offs_r[None, None, :] * stride_sj,
                mask=mask_m[:, None, None] & mask_i[None, :, None] & mask_r[None, None, :],
                other=0.0,
            ).to(tl.float32)  # [M, I, R]
            z = tl.sum(sig * acc[:, None, :], axis=2)  # [M, I]
            _store_rows(z_rows + offs_i[None, :], z, mask_m[:, None] & mask_i[None, :], SPLIT_K)


@triton.jit
def _store_rows(ptrs, values, mask, SPLIT_K: tl.constexpr):
    if SPLIT_K == 1:
        tl.store(ptrs, values, mask=mask)
    else:
        tl.atomic_add(ptrs, values, mask=mask)


INTERPRETED = _utils.is_interpreted(_jd_shrink_kernel)


def choose_sigma_mode(meta: JDLoraKernelMeta, diagonal: bool) -> int:
    """Diagonal Σ: per-row scaling on cluster tiles. Full Σ: adapter tiles (one Σ per tile, a tensor-core product)
    unless splitting the clusters by adapter would add more than a quarter more tiles; then per-row Σ on cluster
    tiles. Decided on host-side counts: no device sync."""
    if diagonal:
        return SIGMA_DIAG
    if meta.num_adapter_tiles * 4 <= meta.num_cluster_tiles * 5:
        return SIGMA_TILE
    return SIGMA_ROW


def jd_lora_shrink(
    x: torch.Tensor,
    meta: JDLoraKernelMeta,
    V: Union[torch.Tensor, Sequence[torch.Tensor]],
    sigma: Union[torch.Tensor, Sequence[torch.Tensor]],
    sigma_mode: Optional[int] = None,
    config: Optional[dict[str, int]] = None,
) -> torch.Tensor:
    """z [S, T, r] fp32 = Σ_a · V_c · x[t] at each sorted position (shapes in the module docstring).

    `V` and `sigma` are a tensor each, or one per fused slice. `sigma_mode` forces an epilogue (SIGMA_DIAG needs a
    diagonal Σ; SIGMA_TILE / SIGMA_ROW a full one); `config` overrides launch parameters (BLOCK_K, SPLIT_K, BLOCK_I,
    num_warps, num_stages).
    """
    Vs, sigmas = _utils.as_slices(V, "V"), _utils.as_slices(sigma, "sigma")
    _check_shrink(x, meta, Vs, sigmas)
    num_slices, (_, rank, d_in) = len(Vs), Vs[0].shape
    diagonal = sigmas[0].dim() == 2
    mode = choose_sigma_mode(meta, diagonal) if sigma_mode is None else sigma_mode
    if (mode == SIGMA_DIAG) != diagonal:
        raise ValueError(f"sigma_mode {mode} does not fit a {'diagonal' if diagonal else 'full'} Σ.")
    tiles, max_tiles = (
        (meta.adapter_tiles, meta.max_adapter_tiles)
        if mode == SIGMA_TILE
        else (meta.cluster_tiles, meta.max_cluster_tiles)
    )
    block_r = _utils.rank_block(rank)
    sigma_elements = {SIGMA_DIAG: meta.block_m * rank, SIGMA_TILE: rank * rank}.get(mode, meta.block_m * rank * rank)
    cfg = _utils.merge_config(
        _utils.shrink_config(d_in, rank, block_r, meta.block_m, max_tiles, sigma_elements, x.device, INTERPRETED),
        config,
    )
    _utils.check_launchable(x.device, INTERPRETED)
    zeros = cfg["SPLIT_K"] > 1  # split-K programs accumulate with atomics
    z = (torch.zeros if zeros else torch.empty)(num_slices, meta.num_tokens, rank, dtype=torch.float32, device=x.device)
    if max_tiles == 0:
        return z
    sliced = num_slices > 1
    table = (
        _utils.slice_table([(v.data_ptr(), s.data_ptr()) for v, s in zip(Vs, sigmas)], x.device)
        if sliced
        else meta.buffer  # unused placeholder pointer
    )
    stride_sj = sigmas[0].stride(2) if not diagonal else 0
    grid = (max_tiles, cfg["SPLIT_K"], num_slices)
    _jd_shrink_kernel[grid](
        x,
        Vs[0],
        sigmas[0],
        z,
        meta.token_indices_sorted_by_lora_ids,
        meta.sorted_slots,
        tiles,
        table,
        d_in,
        rank,
        x.stride(0),
        x.stride(1),
        Vs[0].stride(0),
        Vs[0].stride(1),
        Vs[0].stride(2),
        sigmas[0].stride(0),
        sigmas[0].stride(1),
        stride_sj,
        z.stride(0),
        z.stride(1),
        table.stride(0) if sliced else 0,
        BLOCK_M=meta.block_m,
        BLOCK_K=cfg["BLOCK_K"],
        BLOCK_R=block_r,
        BLOCK_I=cfg["BLOCK_I"],
        SPLIT_K=cfg["SPLIT_K"],
        SIGMA_MODE=mode,
        SLICED=sliced,
        UPCAST=INTERPRETED and x.dtype == torch.bfloat16,
        num_warps=cfg["num_warps"],
        num_stages=cfg["num_stages"],
    )
    return z


def _check_shrink(x: torch.Tensor, meta: JDLoraKernelMeta, Vs: list[torch.Tensor], sigmas: list[torch.Tensor]) -> None:
    """Host-side shape / dtype / device checks (no device reads)."""
    if len(Vs) != len(sigmas):
        raise ValueError(f"got {len(Vs)} V slices but {len(sigmas)} sigma slices.")
    if x.dim() != 2 or x.shape[0] != meta.num_tokens:
        raise ValueError(f"x must be [T={meta.num_tokens}, d_in] (the metadata's tokens), got {tuple(x.shape)}.")
    if x.dtype not in _utils.SUPPORTED_DTYPES:
        raise TypeError(f"x must be fp16, bf16 or fp32, got {x.dtype}.")
    for V, sigma in zip(Vs, sigmas):
        if V.shape != Vs[0].shape or V.stride() != Vs[0].stride() or V.dtype != x.dtype:
            raise ValueError("every V slice must have the shape, strides and dtype of the first, and x's dtype.")
        if sigma.shape != sigmas[0].shape or sigma.stride() != sigmas[0].stride() or sigma.dtype != sigmas[0].dtype:
            raise ValueError("every sigma slice must have the shape, strides and dtype of the first.")
        if V.device != x.device or sigma.device != x.device or meta.device != x.device:
            raise ValueError(f"x, V, sigma and the metadata must be on one device (x is on {x.device}).")
    num_clusters, rank, d_in = Vs[0].shape
    if d_in != x.shape[1]:
        raise ValueError(f"V is [C, r, {d_in}] but x has d_in={x.shape[1]}.")
    if num_clusters < meta.num_clusters:
        raise ValueError(f"the metadata uses {meta.num_clusters} clusters but V has {num_clusters}.")
    sigma = sigmas[0]
    expected = (meta.num_slots, rank, rank) if sigma.dim() == 3 else (meta.num_slots, rank)
    if tuple(sigma.shape) != expected or not sigma.dtype.is_floating_point:
        raise ValueError(
            f"sigma must be a float [N, r, r] or [N, r] with N={meta.num_slots}, got {tuple(sigma.shape)}."
        )


def jd_lora_shrink_ref(
    x: torch.Tensor,
    meta: JDLoraKernelMeta,
    V: Union[torch.Tensor, Sequence[torch.Tensor]],
    sigma: Union[torch.Tensor, Sequence[torch.Tensor]],
) -> torch.Tensor:
    """PyTorch reference of `jd_lora_shrink` (fp32, gather + bmm); rows past the LoRA tokens are zero."""
    Vs, sigmas = _utils.as_slices(V, "V"), _utils.as_slices(sigma, "sigma")
    L, rank = meta.num_lora_tokens, Vs[0].shape[1]
    token = meta.token_indices_sorted_by_lora_ids[:L].long()
    slot = meta.sorted_slots[:L].long()
    cluster = meta.slot_to_cluster.long()[slot]
    z = torch.zeros(len(Vs), meta.num_tokens, rank, dtype=torch.float32, device=x.device)
    xs = x[token].float().unsqueeze(-1)  # [L, d_in, 1]
    for s, (Vi, sig) in enumerate(zip(Vs, sigmas)):
        h = torch.bmm(Vi[cluster].float(), xs)  # [L, r, 1]
        core = sig[slot].float()
        z[s, :L] = torch.bmm(core, h).squeeze(-1) if sig.dim() == 3 else h.squeeze(-1) * core
    return z
