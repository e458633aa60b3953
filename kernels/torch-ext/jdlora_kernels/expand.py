"""Expand: out[t, off_s : off_s + d_out_s] += U_c · z[p(t)] for every LoRA token t, grouped by cluster.

    z:    [S, T, r]         fp32, sorted order (the shrink's output)
    U:    [C, d_out_s, r]   per slice; slices may differ in d_out (fused QKV: q wider than k and v)
    out:  [T, D]            the slices' columns start at `offsets` (default: one after the other)

Σ was applied by the shrink, so the expand only needs the cluster's basis: one program takes one BLOCK_M-row
cluster tile and one BLOCK_N column tile of one slice, a single tl.dot over the (padded) rank, and adds the result
into the gathered output rows. Every output element belongs to exactly one program, so no atomics; base rows are
never touched. z is rounded to U's dtype before the product (tensor cores for fp16/bf16, as vLLM's expand does).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Optional, Union

import torch
import triton
import triton.language as tl

from . import _utils
from .meta import JDLoraKernelMeta


@triton.jit
def _jd_expand_kernel(
    z_ptr,  # [S, T, r] fp32
    u_ptr,  # [C, d_out, r] (slice 0; the slice table holds every slice when SLICED)
    out_ptr,  # [T, D]
    sorted_token_ptr,  # [T] int32
    tiles_ptr,  # [max_tiles, 4] int32: (start, length, -, cluster)
    slice_table_ptr,  # [S, 6] int64: U pointer, U strides (c, n, r), d_out, column offset of each slice
    d_out,
    rank,
    col_offset,
    stride_zs,
    stride_zt,
    stride_uc,
    stride_un,
    stride_ur,
    stride_ot,
    stride_on,
    slice_table_stride,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_R: tl.constexpr,
    SLICED: tl.constexpr,
    UPCAST: tl.constexpr,  # interpreter: tl.dot on bf16 is wrong there, so dot in fp32
):
    tile = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_s = tl.program_id(2)
    length = tl.load(tiles_ptr + tile * 4 + 1)
    if length == 0:  # padding tile of the static grid
        return
    if SLICED:
        row = slice_table_ptr + pid_s * slice_table_stride
        u_base = tl.load(row).to(tl.pointer_type(u_ptr.dtype.element_ty))
        u_sc = tl.load(row + 1)
        u_sn = tl.load(row + 2)
        u_sr = tl.load(row + 3)
        n_cols = tl.load(row + 4)
        c_off = tl.load(row + 5)
    else:
        u_base = u_ptr
        u_sc = stride_uc
        u_sn = stride_un
        u_sr = stride_ur
        n_cols = d_out
        c_off = col_offset
    n0 = pid_n * BLOCK_N
    if n0 >= n_cols:  # this slice is narrower than the widest one
        return
    start = tl.load(tiles_ptr + tile * 4)
    cluster = tl.load(tiles_ptr + tile * 4 + 3).to(tl.int64)

    offs_m = tl.arange(0, BLOCK_M)
    mask_m = offs_m < length
    pos = (start + offs_m).to(tl.int64)
    token = tl.load(sorted_token_ptr + pos, mask=mask_m, other=0).to(tl.int64)
    offs_r = tl.arange(0, BLOCK_R)
    mask_r = offs_r < rank
    offs_n = n0 + tl.arange(0, BLOCK_N)
    mask_n = offs_n < n_cols

    z = tl.load(
        z_ptr + pid_s * stride_zs + pos[:, None] * stride_zt + offs_r[None, :],
        mask=mask_m[:, None] & mask_r[None, :],
        other=0.0,
    )  # [M, R] fp32
    u_t = tl.load(
        u_base + cluster * u_sc + offs_n[None, :] * u_sn + offs_r[:, None] * u_sr,
        mask=mask_r[:, None] & mask_n[None, :],
        other=0.0,
    )  # [R, N]: u_t[j, n] = U[c, n, j]
    z = z.to(u_t.dtype)
    if UPCAST:
        z = z.to(tl.float32)
        u_t = u_t.to(tl.float32)
    acc = tl.dot(z, u_t, input_precision="ieee")  # [M, N] fp32

    out_ptrs = out_ptr + token[:, None] * stride_ot + (c_off + offs_n)[None, :] * stride_on
    mask = mask_m[:, None] & mask_n[None, :]
    prev = tl.load(out_ptrs, mask=mask, other=0.0)
    tl.store(out_ptrs, (prev.to(tl.float32) + acc).to(prev.dtype), mask=mask)


INTERPRETED = _utils.is_interpreted(_jd_expand_kernel)


def jd_lora_expand(
    z: torch.Tensor,
    meta: JDLoraKernelMeta,
    U: Union[torch.Tensor, Sequence[torch.Tensor]],
    out: Optional[torch.Tensor] = None,
    offsets: Optional[Sequence[int]] = None,
    config: Optional[dict[str, int]] = None,
) -> torch.Tensor:
    """Add U_c · z into `out` ([T, D], allocated as zeros in U's dtype when None) and return it.

    `U` is a tensor or one per fused slice; slice s fills columns offsets[s] : offsets[s] + d_out_s (default: the
    slices side by side from column 0). `config` overrides BLOCK_N, num_warps, num_stages.
    """
    Us = _utils.as_slices(U, "U")
    num_slices = len(Us)
    widths = [u.shape[1] for u in Us]
    if offsets is None:
        offsets = [sum(widths[:s]) for s in range(num_slices)]
    if out is None:
        out = torch.zeros(meta.num_tokens, sum(widths), dtype=Us[0].dtype, device=z.device)
    _check_expand(z, meta, Us, out, list(offsets))
    rank = Us[0].shape[2]
    block_r = _utils.rank_block(rank)
    cfg = _utils.merge_config(
        _utils.expand_config(max(widths), meta.block_m, meta.max_cluster_tiles, num_slices, z.device, INTERPRETED),
        config,
    )
    _utils.check_launchable(z.device, INTERPRETED)
    if meta.max_cluster_tiles == 0:
        return out
    sliced = num_slices > 1
    table = (
        _utils.slice_table([(u.data_ptr(), *u.stride(), u.shape[1], off) for u, off in zip(Us, offsets)], z.device)
        if sliced
        else meta.buffer  # unused placeholder pointer
    )
    grid = (meta.max_cluster_tiles, triton.cdiv(max(widths), cfg["BLOCK_N"]), num_slices)
    _jd_expand_kernel[grid](
        z,
        Us[0],
        out,
        meta.token_indices_sorted_by_lora_ids,
        meta.cluster_tiles,
        table,
        widths[0],
        rank,
        offsets[0],
        z.stride(0),
        z.stride(1),
        Us[0].stride(0),
        Us[0].stride(1),
        Us[0].stride(2),
        out.stride(0),
        out.stride(1),
        table.stride(0) if sliced else 0,
        BLOCK_M=meta.block_m,
        BLOCK_N=cfg["BLOCK_N"],
        BLOCK_R=block_r,
        SLICED=sliced,
        UPCAST=INTERPRETED and Us[0].dtype == torch.bfloat16,
        num_warps=cfg["num_warps"],
        num_stages=cfg["num_stages"],
    )
    return out


def _check_expand(
    z: torch.Tensor, meta: JDLoraKernelMeta, Us: list[torch.Tensor], out: torch.Tensor, offsets: list[int]
) -> None:
    """Host-side shape / dtype / device checks (no device reads)."""
    num_clusters, _, rank = Us[0].shape
    if z.dtype != torch.float32 or z.dim() != 3 or tuple(z.shape) != (len(Us), meta.num_tokens, rank):
        raise ValueError(
            f"z must be fp32 [S={len(Us)}, T={meta.num_tokens}, r={rank}], got {z.dtype} {tuple(z.shape)}."
        )
    if z.stride(2) != 1:
        raise ValueError("z must be contiguous along the rank.")
    for u in Us:
        if u.dim() != 3 or u.shape[0] != num_clusters or u.shape[2] != rank or u.dtype != Us[0].dtype:
            raise ValueError("every U slice must be [C, d_out_s, r] with the C, r and dtype of the first.")
        if u.device != z.device:
            raise ValueError(f"z, U, out and the metadata must be on one device (z is on {z.device}).")
    if Us[0].dtype not in _utils.SUPPORTED_DTYPES:
        raise TypeError(f"U must be fp16, bf16 or fp32, got {Us[0].dtype}.")
    if num_clusters < meta.num_clusters:
        raise ValueError(f"the metadata uses {meta.num_clusters} clusters but U has {num_clusters}.")
    if out.dim() != 2 or out.shape[0] != meta.num_tokens or out.device != z.device or meta.device != z.device:
        raise ValueError(f"out must be [T={meta.num_tokens}, D] on {z.device}, got {tuple(out.shape)} on {out.device}.")
    if len(offsets) != len(Us):
        raise ValueError(f"got {len(offsets)} offsets for {len(Us)} slices.")
    for u, off in zip(Us, offsets):
        if off < 0 or off + u.shape[1] > out.shape[1]:
            raise ValueError(
                f"a slice of width {u.shape[1]} at column {off} does not fit out's {out.shape[1]} columns."
            )


def jd_lora_expand_ref(
    z: torch.Tensor,
    meta: JDLoraKernelMeta,
    U: Union[torch.Tensor, Sequence[torch.Tensor]],
    out: Optional[torch.Tensor] = None,
    offsets: Optional[Sequence[int]] = None,
) -> torch.Tensor:
    """PyTorch reference of `jd_lora_expand` (z rounded to U's dtype as the kernel does, fp32 products)."""
    Us = _utils.as_slices(U, "U")
    widths = [u.shape[1] for u in Us]
    if offsets is None:
        offsets = [sum(widths[:s]) for s in range(len(Us))]
    if out is None:
        out = torch.zeros(meta.num_tokens, sum(widths), dtype=Us[0].dtype, device=z.device)
    L = meta.num_lora_tokens
    token = meta.token_indices_sorted_by_lora_ids[:L].long()
    cluster = meta.slot_to_cluster.long()[meta.sorted_slots[:L].long()]
    for s, (u, off) in enumerate(zip(Us, offsets)):
        zs = z[s, :L].to(u.dtype).float().unsqueeze(-1)  # [L, r, 1]
        delta = torch.bmm(u[cluster].float(), zs).squeeze(-1)  # [L, d_out_s]
        cols = slice(off, off + u.shape[1])
        out[token, cols] = (out[token, cols].float() + delta).to(out.dtype)
    return out
