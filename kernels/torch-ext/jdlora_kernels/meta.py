"""Batch metadata of the mixed-adapter kernels, built once per batch on the host and shared by every layer.

Follows vLLM's `LoRAKernelMeta` (same field names and meaning) and adds what a shared basis needs:

    token_lora_mapping               [T]       slot of each token, -1 = base model
    token_indices_sorted_by_lora_ids [T]       tokens in a stable order by (cluster, slot), base tokens last
    sorted_slots                     [T]       slot at each sorted position (-1 for the base tail)
    active_lora_ids                  [A]       slots present, in sorted order, padded with -1     (A = min(T, N))
    num_tokens_per_lora              [A]       tokens of each active slot, padded with 0
    lora_token_start_loc             [A + 1]   start of each active slot in the sorted order
    active_cluster_ids, num_tokens_per_cluster, cluster_token_start_loc   the same per cluster  (min(T, C) entries)
    slot_to_cluster                  [N]       cluster of every slot
    adapter_tiles                    [MA, 4]   (start, length, slot, cluster) of BLOCK_M-row tiles of one adapter
    cluster_tiles                    [MC, 4]   (start, length, -1, cluster) of BLOCK_M-row tiles of one cluster

Sorting by (cluster, slot) numbers the slots cluster-contiguously, so a single sort groups the tokens by adapter
(for the shrink and its Σ) and by cluster (for the expand, which only needs U_c) at once.

The tile lists have a size fixed by the shapes alone (MA = cdiv(T, BLOCK_M) + A; MC likewise), padded with
zero-length tiles, so kernel grids depend on shapes only and programs past the last tile exit at once: a launch is
CUDA-graph capturable, and `copy_` refreshes a captured metadata in place for the next batch of the same shape.
All int32, packed into one buffer so a batch costs one host-to-device copy. Every slot is checked here, on the host:
an invalid slot never reaches a kernel.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Optional, Union

import torch
import triton

TILE_FIELDS = 4  # (start position in the sorted order, number of rows, slot or -1, cluster)
_ALIGN = 4  # int32 elements: every field starts 16-byte aligned (Triton specialises on 16-byte alignment)


def default_block_m(num_tokens: int) -> int:
    """Rows per tile: small for decode (few tokens per adapter), larger for prefill (reuse of each basis tile)."""
    if num_tokens <= 64:
        return 16
    if num_tokens <= 512:
        return 32
    return 64


def _round_up(n: int) -> int:
    return (n + _ALIGN - 1) // _ALIGN * _ALIGN


class _Layout:
    """Field offsets inside the packed int32 buffer; a function of (T, N, C, BLOCK_M) only."""

    def __init__(self, num_tokens: int, num_slots: int, num_clusters: int, block_m: int) -> None:
        T, N, C = num_tokens, num_slots, num_clusters
        A, Cm = min(T, N), min(T, C)
        self.max_adapter_tiles = triton.cdiv(T, block_m) + A if T else 0
        self.max_cluster_tiles = triton.cdiv(T, block_m) + Cm if T else 0
        sizes = {
            "token_lora_mapping": T,
            "token_indices_sorted_by_lora_ids": T,
            "sorted_slots": T,
            "active_lora_ids": A,
            "num_tokens_per_lora": A,
            "lora_token_start_loc": A + 1,
            "active_cluster_ids": Cm,
            "num_tokens_per_cluster": Cm,
            "cluster_token_start_loc": Cm + 1,
            "slot_to_cluster": N,
            "adapter_tiles": self.max_adapter_tiles * TILE_FIELDS,
            "cluster_tiles": self.max_cluster_tiles * TILE_FIELDS,
        }
        self.fields: dict[str, tuple[int, int]] = {}
        offset = 0
        for name, size in sizes.items():
            self.fields[name] = (offset, size)
            offset += _round_up(size)
        self.numel = offset
        self.key = (T, N, C, block_m)


class JDLoraKernelMeta:
    """Metadata of one batch (see the module docstring). Build it with `from_token_slots`, `from_vllm` or
    `from_tgi`; every field is an int32 tensor on `device`. Host-side counts (`num_lora_tokens`, ...) are plain ints,
    so launch decisions never read device memory."""

    token_lora_mapping: torch.Tensor
    token_indices_sorted_by_lora_ids: torch.Tensor
    sorted_slots: torch.Tensor
    active_lora_ids: torch.Tensor
    num_tokens_per_lora: torch.Tensor
    lora_token_start_loc: torch.Tensor
    active_cluster_ids: torch.Tensor
    num_tokens_per_cluster: torch.Tensor
    cluster_token_start_loc: torch.Tensor
    slot_to_cluster: torch.Tensor
    adapter_tiles: torch.Tensor
    cluster_tiles: torch.Tensor

    def __init__(self, buffer: torch.Tensor, layout: _Layout, counts: dict[str, int]) -> None:
        self.buffer = buffer
        self._layout = layout
        self.num_tokens, self.num_slots, self.num_clusters, self.block_m = layout.key
        self.max_adapter_tiles = layout.max_adapter_tiles
        self.max_cluster_tiles = layout.max_cluster_tiles
        self._set_counts(counts)
        for name, (offset, size) in layout.fields.items():
            view = buffer[offset : offset + size]
            if name.endswith("_tiles"):
                view = view.view(-1, TILE_FIELDS)
            setattr(self, name, view)

    def _set_counts(self, counts: dict[str, int]) -> None:
        self.num_lora_tokens: int = counts["num_lora_tokens"]
        self.num_active_loras: int = counts["num_active_loras"]
        self.num_active_clusters: int = counts["num_active_clusters"]
        self.num_adapter_tiles: int = counts["num_adapter_tiles"]
        self.num_cluster_tiles: int = counts["num_cluster_tiles"]

    @property
    def device(self) -> torch.device:
        return self.buffer.device

    @property
    def layout_key(self) -> tuple[int, int, int, int]:
        """(T, N, C, BLOCK_M): metadata with equal keys have equal buffer layouts and kernel grids."""
        return self._layout.key

    def _counts(self) -> dict[str, int]:
        return {
            "num_lora_tokens": self.num_lora_tokens,
            "num_active_loras": self.num_active_loras,
            "num_active_clusters": self.num_active_clusters,
            "num_adapter_tiles": self.num_adapter_tiles,
            "num_cluster_tiles": self.num_cluster_tiles,
        }

    def copy_(self, other: JDLoraKernelMeta) -> JDLoraKernelMeta:
        """Overwrite this metadata in place with `other`'s batch (same layout): refreshes a CUDA-graph capture."""
        if other.layout_key != self.layout_key:
            raise ValueError(
                f"cannot copy metadata of layout (T, N, C, BLOCK_M)={other.layout_key} into {self.layout_key}."
            )
        self.buffer.copy_(other.buffer, non_blocking=True)
        self._set_counts(other._counts())
        return self

    def to(self, device: Union[torch.device, str]) -> JDLoraKernelMeta:
        return JDLoraKernelMeta(self.buffer.to(device), self._layout, self._counts())

    def __repr__(self) -> str:
        return (
            f"JDLoraKernelMeta(tokens={self.num_tokens}, lora_tokens={self.num_lora_tokens}, slots={self.num_slots}, "
            f"clusters={self.num_clusters}, active_loras={self.num_active_loras}, "
            f"active_clusters={self.num_active_clusters}, block_m={self.block_m}, device={self.device})"
        )

    # ------------------------------------------------------------------ constructors

    @classmethod
    def from_token_slots(
        cls,
        token_slots: Union[torch.Tensor, Sequence[int]],
        slot_to_cluster: Union[torch.Tensor, Sequence[int]],
        device: Union[torch.device, str, None] = None,
        block_m: Optional[int] = None,
    ) -> JDLoraKernelMeta:
        """Metadata for per-token slots ([T], -1 = base model) and each slot's cluster ([N]).

        Pass CPU tensors (or lists): device tensors are read back to the host, which waits for the device.
        `device` defaults to the device of `token_slots`.
        """
        if device is None:
            device = token_slots.device if isinstance(token_slots, torch.Tensor) else torch.device("cpu")
        device = torch.device(device)
        slots = _host_int64(token_slots, "token_slots")
        clusters = _host_int64(slot_to_cluster, "slot_to_cluster")
        num_slots = clusters.numel()
        if num_slots == 0:
            raise ValueError("slot_to_cluster is empty: the bundle needs at least one adapter slot.")
        if bool((clusters < 0).any()):
            bad = clusters[clusters < 0].unique()[:5].tolist()
            raise ValueError(f"slot_to_cluster holds negative cluster ids {bad}.")
        invalid = (slots < -1) | (slots >= num_slots)
        if bool(invalid.any()):
            where = invalid.nonzero().flatten()[:5].tolist()
            raise IndexError(
                f"token slots {slots[invalid].unique()[:5].tolist()} (at tokens {where}) are outside [-1, {num_slots}):"
                f" the bundle has {num_slots} adapter slots and -1 means the base model."
            )
        num_clusters = int(clusters.max()) + 1
        block_m = block_m or default_block_m(slots.numel())
        if block_m < 16 or block_m & (block_m - 1):
            raise ValueError(f"block_m must be a power of two >= 16 (tl.dot tiles), got {block_m}.")
        return _build(slots, clusters, num_clusters, block_m, device)

    @classmethod
    def from_vllm(
        cls,
        token_lora_mapping: Union[torch.Tensor, Sequence[int]],
        slot_to_cluster: Union[torch.Tensor, Sequence[int]],
        device: Union[torch.device, str, None] = None,
        block_m: Optional[int] = None,
    ) -> JDLoraKernelMeta:
        """From vLLM's per-token LoRA slot mapping (`token_lora_mapping`, -1 = no LoRA), as its punica wrapper has."""
        return cls.from_token_slots(token_lora_mapping, slot_to_cluster, device=device, block_m=block_m)

    @classmethod
    def from_tgi(
        cls,
        adapter_meta: Any,
        slot_to_cluster: Union[torch.Tensor, Sequence[int]],
        device: Union[torch.device, str, None] = None,
        block_m: Optional[int] = None,
    ) -> JDLoraKernelMeta:
        """From TGI's `AdapterBatchMetadata` (or any object with its fields): adapter index 0 is the base model, so
        slot = adapter index - 1.

        `adapter_segments` [S + 1] (token boundaries) with `segment_indices` [S] (adapter index of each segment)
        give the slot of every token; `adapter_indices`, when it has one entry per token, must agree with them.
        Without segments, `adapter_indices` must be per token.
        """
        indices = getattr(adapter_meta, "adapter_indices", None)
        segments = getattr(adapter_meta, "adapter_segments", None)
        segment_indices = getattr(adapter_meta, "segment_indices", None)
        if device is None:
            device = next((t.device for t in (indices, segments) if isinstance(t, torch.Tensor)), None)
        if segments is not None and segment_indices is not None:
            bounds = _host_int64(segments, "adapter_segments")
            seg_adapters = _host_int64(segment_indices, "segment_indices")
            lengths = bounds[1:] - bounds[:-1]
            if bounds.numel() != seg_adapters.numel() + 1 or (bounds.numel() and int(bounds[0]) != 0):
                raise ValueError(
                    f"adapter_segments must hold len(segment_indices) + 1 = {seg_adapters.numel() + 1} boundaries "
                    f"starting at 0, got {bounds.tolist()[:8]}."
                )
            if bool((lengths < 0).any()):
                raise ValueError(f"adapter_segments must be non-decreasing, got {bounds.tolist()[:8]}.")
            per_token = seg_adapters.repeat_interleave(lengths)
            if indices is not None:
                given = _host_int64(indices, "adapter_indices")
                if given.numel() == per_token.numel() and not torch.equal(given, per_token):
                    raise ValueError("adapter_indices disagrees with adapter_segments / segment_indices.")
        elif indices is not None:
            per_token = _host_int64(indices, "adapter_indices")
        else:
            raise ValueError("adapter_meta needs adapter_indices, or adapter_segments with segment_indices.")
        if bool((per_token < 0).any()):
            bad = per_token[per_token < 0].unique()[:5].tolist()
            raise IndexError(f"TGI adapter indices must be >= 0 (0 = base model), got {bad}.")
        return cls.from_token_slots(per_token - 1, slot_to_cluster, device=device, block_m=block_m)


def _host_int64(value: Union[torch.Tensor, Sequence[int]], what: str) -> torch.Tensor:
    tensor = value if isinstance(value, torch.Tensor) else torch.as_tensor(list(value), dtype=torch.int64)
    if tensor.dim() != 1 or tensor.dtype.is_floating_point or tensor.dtype.is_complex or tensor.dtype == torch.bool:
        raise TypeError(
            f"{what} must be a 1-D integer tensor or list, got {tensor.dtype} of shape {tuple(tensor.shape)}."
        )
    return tensor.detach().to("cpu", torch.int64)


def _tiles(starts: torch.Tensor, counts: torch.Tensor, slots: torch.Tensor, clusters: torch.Tensor, block_m: int):
    """[num_tiles, 4] (start, length, slot, cluster): each group cut into BLOCK_M-row tiles, without a Python loop."""
    per_group = (counts + block_m - 1) // block_m  # [G]
    group = torch.repeat_interleave(torch.arange(counts.numel()), per_group)  # [tiles]
    first_tile = torch.cumsum(per_group, 0) - per_group  # [G]
    offset = (torch.arange(group.numel()) - first_tile[group]) * block_m
    length = torch.clamp(counts[group] - offset, max=block_m)
    return torch.stack([starts[group] + offset, length, slots[group], clusters[group]], dim=1)


def _build(
    slots: torch.Tensor, clusters: torch.Tensor, num_clusters: int, block_m: int, device: torch.device
) -> JDLoraKernelMeta:
    T, N = slots.numel(), clusters.numel()
    layout = _Layout(T, N, num_clusters, block_m)
    is_lora = slots >= 0
    token_cluster = clusters[slots.clamp(min=0)]
    # Base tokens sort last; the key orders by cluster first, so slot groups are cluster-contiguous.
    key = torch.where(is_lora, token_cluster * N + slots, num_clusters * N)
    order = torch.sort(key, stable=True).indices
    sorted_slots = slots[order]
    num_lora_tokens = int(is_lora.sum())
    lora_slots = sorted_slots[:num_lora_tokens]
    lora_clusters = token_cluster[order][:num_lora_tokens]
    active, per_lora = torch.unique_consecutive(lora_slots, return_counts=True)
    active_clusters, per_cluster = torch.unique_consecutive(lora_clusters, return_counts=True)
    lora_start = torch.cumsum(per_lora, 0) - per_lora
    cluster_start = torch.cumsum(per_cluster, 0) - per_cluster
    adapter_tiles = _tiles(lora_start, per_lora, active, clusters[active], block_m)
    cluster_tiles = _tiles(cluster_start, per_cluster, torch.full_like(active_clusters, -1), active_clusters, block_m)

    values = {
        "token_lora_mapping": slots,
        "token_indices_sorted_by_lora_ids": order,
        "sorted_slots": sorted_slots,
        "active_lora_ids": active,
        "num_tokens_per_lora": per_lora,
        "lora_token_start_loc": torch.cat([lora_start, per_lora.sum().view(1)]),
        "active_cluster_ids": active_clusters,
        "num_tokens_per_cluster": per_cluster,
        "cluster_token_start_loc": torch.cat([cluster_start, per_cluster.sum().view(1)]),
        "slot_to_cluster": clusters,
        "adapter_tiles": adapter_tiles.flatten(),
        "cluster_tiles": cluster_tiles.flatten(),
    }
    pad = {"active_lora_ids": -1, "active_cluster_ids": -1, "lora_token_start_loc": num_lora_tokens}
    pad["cluster_token_start_loc"] = num_lora_tokens
    # Pinned staging memory lets the copy run asynchronously (PyTorch's caching host allocator recycles the block
    # only after the copy has finished).
    host = torch.zeros(layout.numel, dtype=torch.int32, pin_memory=device.type == "cuda")
    for name, (offset, size) in layout.fields.items():
        value = values[name]
        field = host[offset : offset + size]
        field.fill_(pad.get(name, 0))
        field[: value.numel()] = value.to(torch.int32)
    counts = {
        "num_lora_tokens": num_lora_tokens,
        "num_active_loras": active.numel(),
        "num_active_clusters": active_clusters.numel(),
        "num_adapter_tiles": adapter_tiles.shape[0],
        "num_cluster_tiles": cluster_tiles.shape[0],
    }
    buffer = host if device.type == "cpu" else host.to(device, non_blocking=True)
    return JDLoraKernelMeta(buffer, layout, counts)
