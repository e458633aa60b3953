"""Which bundle adapter, or ordinary-LoRA pool entry, every token of a vLLM step uses.

vLLM keeps `max_loras` slots; its punica wrapper knows the slot of every token (-1 = no LoRA). For a bundle
adapter a slot holds no weights, only the adapter's index in its bundle; an ordinary LoRA in a module patched by a
bundle lives in one of `plain_lora_slots` pool entries. Both tables are written when vLLM activates an adapter in a
slot, and the per-token indices are built from them once per step (when vLLM sets the step's mapping), outside the
forward, into persistent buffers that every JD layer reads:

    slot_adapter   [B, S]  int64, host     index in bundle b of the adapter in slot s, -1 if none
    slot_pool      [S]     int64, host     pool entry of the ordinary LoRA in slot s, -1 if none
    token_adapter  [B, M]  int64, device   index in bundle b of each token's adapter, -1 = not this bundle
    token_pool     [M]     int64, device   pool entry of each token's ordinary LoRA, -1 = none

(B bundles, S = max_loras slots, M = max_num_batched_tokens.) Entries past the step's token count stay -1, so a
forward padded to a larger token count (CUDA-graph capture sizes) reads base-model rows there.

On CUDA the Triton kernels also need each step's batch metadata per cluster table (`JDLoraKernelMeta`). It is built
here, on the host, once per step and distinct table, for the step's token count and for the CUDA-graph capture size
vLLM pads it to, refreshed in place (`copy_`) when its layout repeats so a captured graph reads the new step, and
handed to `torch.ops.peft_jdlora.jd_lora_delta` through `peft_jdlora.ops.custom_ops.set_step_metadata`.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Sequence
from typing import Any, Optional

import torch

from peft_jdlora import ops
from peft_jdlora.ops import custom_ops

POOL = -1  # the "bundle" index of the ordinary-LoRA pool in cluster tables


class PlainLoRAPool:
    """Pool entries of ordinary LoRAs in modules patched by a bundle, one per LoRA while it holds a vLLM slot."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._entry_of: dict[int, int] = {}

    def entry_of(self, lora_id: int) -> Optional[int]:
        return self._entry_of.get(lora_id)

    def assign(self, lora_id: int) -> int:
        if lora_id in self._entry_of:
            return self._entry_of[lora_id]
        used = set(self._entry_of.values())
        free = next((e for e in range(self.size) if e not in used), None)
        if free is None:
            raise RuntimeError(
                f"ordinary LoRA {lora_id} needs one of the jdlora.plain_lora_slots={self.size} entries of the modules "
                f"patched by a bundle, and all are held by LoRAs {sorted(self._entry_of)}: start the engine with a "
                'larger "plain_lora_slots" in additional_config["jdlora"].'
            )
        self._entry_of[lora_id] = free
        return free

    def release(self, lora_id: int) -> None:
        self._entry_of.pop(lora_id, None)

    def clear(self) -> None:
        self._entry_of.clear()


class StepRouting:
    """Slot tables and per-token adapter indices of the step in progress (see the module docstring)."""

    def __init__(
        self,
        num_bundles: int,
        num_slots: int,
        pool_size: int,
        max_tokens: int,
        device: torch.device,
        capture_sizes: Sequence[int] = (),
    ) -> None:
        self.num_bundles = num_bundles
        self.capture_sizes = sorted(capture_sizes)
        self.device = torch.device(device)
        self.pool = PlainLoRAPool(pool_size)
        # The vLLM LoRA id in a slot (the manager's `lora_index_to_id`), for the layers' set_lora / reset_lora.
        self.slot_owner: Callable[[int], Optional[int]] = lambda slot: None
        self.slot_adapter = torch.full((num_bundles, num_slots), -1, dtype=torch.int64)  # [B, S]
        self.slot_pool = torch.full((num_slots,), -1, dtype=torch.int64)  # [S]
        self.token_adapter = torch.full((num_bundles, max_tokens), -1, dtype=torch.int64, device=self.device)
        self.token_pool = torch.full((max_tokens,), -1, dtype=torch.int64, device=self.device)
        self.num_tokens = 0
        self.bundle_has_tokens = [False] * num_bundles
        self.pool_has_tokens = False
        # Distinct cluster tables of the JD layers: (bundle or POOL, table) -> (host table [N], shared device table)
        self._tables: dict[tuple[int, tuple[int, ...]], tuple[torch.Tensor, torch.Tensor]] = {}
        self._kernel_metadata: dict[tuple[Any, int], Any] = {}

    def cluster_table(self, bundle: int, cluster: torch.Tensor) -> torch.Tensor:
        """The device copy of a layer's cluster table [N], shared by every layer with the same table (their kernel
        metadata is one per step)."""
        host = cluster.detach().to("cpu", torch.int64)
        key = (bundle, tuple(host.tolist()))
        if key not in self._tables:
            self._tables[key] = (host, host.to(self.device))
        return self._tables[key][1]

    # ------------------------------------------------------------------ slot tables (on activation)

    def pool_entry_of_slot(self, slot: int) -> Optional[int]:
        """Pool entry of the ordinary LoRA that vLLM is putting into `slot`, or None (no entry, or no LoRA)."""
        lora_id = self.slot_owner(slot)
        return None if lora_id is None else self.pool.entry_of(lora_id)

    def point_slot_at_adapter(self, slot: int, bundle: int, adapter: int) -> None:
        self.clear_slot(slot)
        self.slot_adapter[bundle, slot] = adapter

    def point_slot_at_pool(self, slot: int, entry: int) -> None:
        self.clear_slot(slot)
        self.slot_pool[slot] = entry

    def clear_slot(self, slot: int) -> None:
        self.slot_adapter[:, slot] = -1
        self.slot_pool[slot] = -1

    def clear(self) -> None:
        self.slot_adapter.fill_(-1)
        self.slot_pool.fill_(-1)
        self.pool.clear()
        self.set_token_slots(torch.empty(0, dtype=torch.int64))

    # ------------------------------------------------------------------ per step

    def set_token_slots(self, token_slots: torch.Tensor) -> None:
        """Per-token indices of the step from vLLM's per-token slots (host int64 [T], -1 = no LoRA)."""
        num_tokens = token_slots.numel()
        max_tokens = self.token_pool.numel()
        if num_tokens > max_tokens:
            raise ValueError(f"a step of {num_tokens} tokens exceeds max_num_batched_tokens={max_tokens}.")
        is_lora = token_slots >= 0  # [T]
        slot = token_slots.clamp(min=0)
        adapters = torch.where(is_lora, self.slot_adapter[:, slot], -1)  # [B, T]
        pool = torch.where(is_lora, self.slot_pool[slot], -1)  # [T]
        stale = max(self.num_tokens, num_tokens)
        self.token_adapter[:, num_tokens:stale].fill_(-1)
        self.token_pool[num_tokens:stale].fill_(-1)
        self.token_adapter[:, :num_tokens].copy_(adapters, non_blocking=True)
        self.token_pool[:num_tokens].copy_(pool, non_blocking=True)
        self.num_tokens = num_tokens
        self.bundle_has_tokens = (adapters >= 0).any(dim=1).tolist() if num_tokens else [False] * self.num_bundles
        self.pool_has_tokens = bool((pool >= 0).any())
        if self.device.type == "cuda" or ops.get_backend() == "triton":  # else: the PyTorch path, no metadata
            self._refresh_kernel_metadata(adapters, pool)

    def _refresh_kernel_metadata(self, adapters: torch.Tensor, pool: torch.Tensor) -> None:
        num_tokens = pool.numel()
        sizes = {num_tokens}
        padded = bisect.bisect_left(self.capture_sizes, num_tokens)
        if num_tokens and padded < len(self.capture_sizes):
            sizes.add(self.capture_sizes[padded])
        for key, (host_table, device_table) in self._tables.items():
            bundle = key[0]
            tokens = pool if bundle == POOL else adapters[bundle]
            device_tokens = self.token_pool if bundle == POOL else self.token_adapter[bundle]
            for size in sizes:
                slots = torch.full((size,), -1, dtype=torch.int64)
                slots[:num_tokens] = tokens
                metadata = ops.kernel_metadata(slots, host_table, self.device)
                if metadata is None:  # the PyTorch backend runs on this device
                    return
                previous = self._kernel_metadata.get((key, size))
                if previous is not None and previous.layout_key == metadata.layout_key:
                    metadata = previous.copy_(metadata)  # same buffers: a captured CUDA graph reads this step
                self._kernel_metadata[(key, size)] = metadata
                custom_ops.set_step_metadata(device_tokens[:size], device_table, metadata)

    # ------------------------------------------------------------------ read by the layers

    def adapter_tokens(self, bundle: int, num_tokens: int) -> Optional[torch.Tensor]:
        """[num_tokens] adapter index of each token in `bundle` (-1 = not this bundle), or None when no token of
        the step uses the bundle and the layer may skip it (never on CUDA: a CUDA graph replays the launches)."""
        if self.device.type != "cuda" and not self.bundle_has_tokens[bundle]:
            return None
        return self.token_adapter[bundle, :num_tokens]

    def pool_tokens(self, num_tokens: int) -> Optional[torch.Tensor]:
        if self.device.type != "cuda" and not self.pool_has_tokens:
            return None
        return self.token_pool[:num_tokens]


def token_slots_from_mapping(index_mapping: Sequence[int], lora_index_to_id: Sequence[Optional[int]]) -> torch.Tensor:
    """vLLM's per-token LoRA ids (0 = none) to slots (-1 = none): host int64 [T]."""
    ids = torch.as_tensor(list(index_mapping), dtype=torch.int64)
    slot_of_id = {lora_id: slot for slot, lora_id in enumerate(lora_index_to_id) if lora_id is not None}
    if not slot_of_id or not ids.numel():
        if bool((ids > 0).any()):
            raise RuntimeError(f"tokens use LoRA ids {ids[ids > 0].unique()[:5].tolist()} that hold no slot.")
        return torch.full_like(ids, -1)
    keys = torch.tensor(sorted(slot_of_id), dtype=torch.int64)
    values = torch.tensor([slot_of_id[k] for k in keys.tolist()], dtype=torch.int64)
    position = torch.searchsorted(keys, ids).clamp(max=keys.numel() - 1)
    found = keys[position] == ids
    missing = (ids > 0) & ~found
    if bool(missing.any()):
        raise RuntimeError(f"tokens use LoRA ids {ids[missing].unique()[:5].tolist()} that hold no slot.")
    return torch.where(found & (ids > 0), values[position], -1)
