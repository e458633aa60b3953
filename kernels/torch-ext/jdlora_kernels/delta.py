"""The whole mixed-adapter JD-LoRA update: shrink (with Σ) then expand, for one module or fused slices.

For token t of adapter slot a (-1 = base model) in cluster c(a), and every slice s (q, k, v of a fused QKV):

    y[t, off_s : off_s + d_out_s] += U_s[c] · Σ_s[a] · V_s[c] · x[t]

    x:      [T, d_in]
    U_s:    [C, d_out_s, r]     V_s: [C, r, d_in]     Σ_s: [N, r, r] or [N, r]
    y:      [T, D]
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Optional, Union

import torch

from .expand import jd_lora_expand, jd_lora_expand_ref
from .meta import JDLoraKernelMeta
from .shrink import jd_lora_shrink, jd_lora_shrink_ref

Tensors = Union[torch.Tensor, Sequence[torch.Tensor]]


def add_jd_lora(
    y: torch.Tensor,
    x: torch.Tensor,
    meta: JDLoraKernelMeta,
    U: Tensors,
    V: Tensors,
    sigma: Tensors,
    output_offsets: Optional[Sequence[int]] = None,
    sigma_mode: Optional[int] = None,
    shrink_config: Optional[dict[str, int]] = None,
    expand_config: Optional[dict[str, int]] = None,
) -> torch.Tensor:
    """Add the update of every slice into `y` ([T, D], in place) and return it: two kernel launches in all.

    Launches only: no host sync, shapes-only grids, so it can be captured in a CUDA graph once `meta` is built.
    """
    z = jd_lora_shrink(x, meta, V, sigma, sigma_mode=sigma_mode, config=shrink_config)
    return jd_lora_expand(z, meta, U, out=y, offsets=output_offsets, config=expand_config)


def jd_lora_delta(
    x: torch.Tensor,
    token_slots: torch.Tensor,
    U: torch.Tensor,
    V: torch.Tensor,
    sigma: torch.Tensor,
    adapter_cluster: torch.Tensor,
    metadata: Optional[JDLoraKernelMeta] = None,
    out: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """delta [T, d_out] = U[c]·Σ[a]·V[c]·x[t] per token (0 for base tokens), in x's dtype; added into `out` if given.

    x: [T, d_in]; token_slots: [T] (-1 = base); U: [C, d_out, r]; V: [C, r, d_in]; sigma: [N, r, r] or [N, r];
    adapter_cluster: [N]. Pass the batch's `metadata` (built once per batch, shared by all layers); without it the
    metadata is built here from `token_slots` and `adapter_cluster`, which reads them back to the host.
    """
    if metadata is None:
        metadata = JDLoraKernelMeta.from_token_slots(token_slots, adapter_cluster, device=x.device)
    elif metadata.num_tokens != x.shape[0] or metadata.num_slots != sigma.shape[0]:
        raise ValueError(
            f"the metadata is for {metadata.num_tokens} tokens and {metadata.num_slots} slots, but x has "
            f"{x.shape[0]} tokens and sigma {sigma.shape[0]} adapters."
        )
    if out is None:
        out = torch.zeros(x.shape[0], U.shape[1], dtype=x.dtype, device=x.device)
    return add_jd_lora(out, x, metadata, U, V, sigma)


def add_jd_lora_ref(
    y: torch.Tensor,
    x: torch.Tensor,
    meta: JDLoraKernelMeta,
    U: Tensors,
    V: Tensors,
    sigma: Tensors,
    output_offsets: Optional[Sequence[int]] = None,
) -> torch.Tensor:
    """PyTorch reference of `add_jd_lora`, through the same metadata."""
    return jd_lora_expand_ref(jd_lora_shrink_ref(x, meta, V, sigma), meta, U, out=y, offsets=output_offsets)


def jd_lora_delta_ref(
    x: torch.Tensor,
    token_slots: torch.Tensor,
    U: torch.Tensor,
    V: torch.Tensor,
    sigma: torch.Tensor,
    adapter_cluster: torch.Tensor,
) -> torch.Tensor:
    """PyTorch reference of `jd_lora_delta` that needs no metadata: per-token gather + bmm in fp32 (or fp64 for
    fp64 inputs, which makes it the high-precision reference of the tests). `token_slots` and `adapter_cluster` may
    be on the host, as for `jd_lora_delta`."""
    compute = torch.float64 if x.dtype == torch.float64 else torch.float32
    slots = token_slots.to(x.device, torch.int64)
    lora = slots >= 0
    slot = slots.clamp(min=0)
    cluster = adapter_cluster.to(x.device, torch.int64)[slot]
    h = torch.bmm(V[cluster].to(compute), x.to(compute).unsqueeze(-1))  # [T, r, 1]
    core = sigma[slot].to(compute)
    z = torch.bmm(core, h) if sigma.dim() == 3 else h * core.unsqueeze(-1)
    delta = torch.bmm(U[cluster].to(compute), z).squeeze(-1)  # [T, d_out]
    return (delta * lora.unsqueeze(-1).to(compute)).to(x.dtype)
