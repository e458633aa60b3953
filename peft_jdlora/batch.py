"""Which adapter each row of a batch uses: resolving `adapter_ids` and handing per-token slots to the layers.

One `AdapterBatch` is shared by all JD-LoRA layers of a model. The model fills it for the duration of a forward or
generate call; every layer asks it for the slots of its own tokens, which are built once per batch shape and reused by
all layers (and, on CUDA, the kernel metadata with them).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Optional, Union

import torch
from torch.utils.weak import WeakIdKeyDictionary

from . import ops
from .config import JDLoraConfig

AdapterId = Union[str, int, None]
AdapterIds = Union[Sequence[AdapterId], torch.Tensor]
_MAX_CACHED_SHAPES = 64


def resolve_adapter_ids(config: JDLoraConfig, adapter_ids: AdapterIds) -> torch.Tensor:
    """Per-row bundle slots [B] (int64, on CPU; -1 = base model) for names, indices, None, or an integer tensor."""
    if isinstance(adapter_ids, torch.Tensor):
        if adapter_ids.dim() != 1 or adapter_ids.dtype.is_floating_point or adapter_ids.dtype == torch.bool:
            raise TypeError(
                f"adapter_ids as a tensor must be a 1-D integer tensor (one id per row), got {adapter_ids.dtype} "
                f"with shape {tuple(adapter_ids.shape)}."
            )
        slots = adapter_ids.detach().to("cpu", torch.int64)
        bad = slots[(slots < -1) | (slots >= config.num_adapters)]
        if bad.numel():
            raise IndexError(
                f"adapter_ids holds indices {bad.unique()[:5].tolist()} outside [-1, {config.num_adapters}): "
                f"the bundle has {config.num_adapters} adapters (-1 = base model)."
            )
        return slots
    if isinstance(adapter_ids, (str, bytes)) or not isinstance(adapter_ids, Sequence):
        raise TypeError(
            "adapter_ids must be a list with one adapter name, index or None per row, or a 1-D integer tensor; "
            f"got {type(adapter_ids).__name__}."
        )
    slots = []
    for row, adapter in enumerate(adapter_ids):
        if hasattr(adapter, "item") and not isinstance(adapter, (str, int)):  # numpy / 0-d tensor scalars
            adapter = adapter.item()
        try:
            slots.append(config.resolve_adapter(adapter))
        except (KeyError, IndexError, TypeError) as err:
            raise type(err)(f"adapter_ids[{row}]: {err.args[0]}") from None
    return torch.tensor(slots, dtype=torch.int64)


def check_batch_size(slots: torch.Tensor, batch_size: Optional[int], where: str) -> None:
    if batch_size is not None and batch_size != slots.numel():
        raise ValueError(
            f"adapter_ids has {slots.numel()} entries but {where} has {batch_size} rows: give one adapter id per row."
        )


class AdapterBatch:
    """The adapter slot of every row for the call in progress, per PEFT adapter (bundle) name."""

    def __init__(self) -> None:
        self.default_slots: dict[str, int] = {}
        self._row_slots: dict[str, torch.Tensor] = {}
        self._cache: dict[tuple, Any] = {}
        # Builds the kernel metadata of a batch from host token slots [T] and a host cluster table [N] for a device;
        # returns None when that device runs the PyTorch reference. None here disables kernel metadata altogether.
        self.metadata_builder: Optional[Callable[[torch.Tensor, torch.Tensor, torch.device], Any]] = ops.kernel_metadata
        # Host copy of each layer's cluster table (read back once per table, not per forward) and an interned id of
        # its contents: layers with equal tables share one metadata.
        self._cluster_tables: WeakIdKeyDictionary = WeakIdKeyDictionary()
        self._cluster_ids: dict[tuple[int, ...], int] = {}

    @property
    def active(self) -> bool:
        return bool(self._row_slots)

    def set_rows(self, adapter_name: str, slots: torch.Tensor) -> None:
        self._row_slots[adapter_name] = slots
        self._cache.clear()

    def set_default(self, adapter_name: str, slot: int) -> None:
        self.default_slots[adapter_name] = slot
        self._cache.clear()

    def clear(self) -> None:
        self._row_slots.clear()
        self._cache.clear()

    def has_rows(self, adapter_name: str) -> bool:
        return adapter_name in self._row_slots

    def token_slots(self, adapter_name: str, x: torch.Tensor) -> Optional[torch.Tensor]:
        """Slot of each token of x ([rows, ..., d_in]) flattened to [T], on x's device; None if all rows are base.

        When generation expands the batch (beam search, num_return_sequences), x has k·B rows for B ids: row j uses
        the id of row j // k, which is how transformers orders expanded rows.
        """
        rows = x.shape[0] if x.dim() > 1 else 1
        tokens_per_row = x.numel() // (x.shape[-1] * rows)
        key = (adapter_name, rows, tokens_per_row, x.device)
        if key in self._cache:
            return self._cache[key]
        if len(self._cache) > _MAX_CACHED_SHAPES:  # many shapes without a call context (plain forwards)
            self._cache.clear()
        row_slots = self._row_slots.get(adapter_name)
        if row_slots is None:
            slot = self.default_slots.get(adapter_name, -1)
            token_slots = None if slot < 0 else torch.full((rows * tokens_per_row,), slot, dtype=torch.int64)
        else:
            if rows % row_slots.numel():
                raise ValueError(
                    f"adapter_ids has {row_slots.numel()} entries but the layer input has {rows} rows, which is not "
                    "a multiple: give one adapter id per row of the batch."
                )
            expanded = row_slots.repeat_interleave(rows // row_slots.numel())
            token_slots = None if bool((expanded < 0).all()) else expanded.repeat_interleave(tokens_per_row)
        if token_slots is not None:
            host_slots = token_slots
            token_slots = token_slots.to(x.device, non_blocking=True)
            # The kernel metadata is built from the host copy: no read-back from the device.
            self._cache[("host", id(token_slots))] = (token_slots, host_slots)
        self._cache[key] = token_slots
        return token_slots

    def metadata(self, adapter_name: str, token_slots: torch.Tensor, adapter_cluster: torch.Tensor) -> Any:
        """Kernel metadata for `token_slots` (as `token_slots()` returned them) and a layer's cluster table [N],
        built on the host once per batch shape and cluster table, and shared by all layers; None on the PyTorch path.

        Each layer's answer (None included) is memoised under its own tensors, so after the first layer of a batch
        a layer pays one dict lookup here.
        """
        if self.metadata_builder is None:
            return None
        layer_key = ("layer-meta", adapter_name, id(token_slots), id(adapter_cluster))
        memo = self._cache.get(layer_key)
        if memo is not None and memo[0] is token_slots and memo[1] is adapter_cluster:
            return memo[2]
        host = self._cache.get(("host", id(token_slots)))
        host_slots = host[1] if host is not None and host[0] is token_slots else token_slots.cpu()
        clusters, cluster_id = self._cluster_table(adapter_cluster)
        shared_key = ("meta", adapter_name, id(token_slots), cluster_id)
        entry = self._cache.get(shared_key)
        if entry is None or entry[0] is not token_slots:
            entry = (token_slots, self.metadata_builder(host_slots, clusters, token_slots.device))
            self._cache[shared_key] = entry
        self._cache[layer_key] = (token_slots, adapter_cluster, entry[1])
        return entry[1]

    def __getstate__(self) -> dict[str, Any]:
        # The caches hold per-call tensors and weak references (not picklable): a copy starts without them.
        state = self.__dict__.copy()
        state["_cache"], state["_cluster_tables"] = {}, None
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._cluster_tables = WeakIdKeyDictionary()

    def _cluster_table(self, adapter_cluster: torch.Tensor) -> tuple[torch.Tensor, int]:
        entry = self._cluster_tables.get(adapter_cluster)
        if entry is None:
            host = adapter_cluster.detach().to("cpu", torch.int64)
            cluster_id = self._cluster_ids.setdefault(tuple(host.tolist()), len(self._cluster_ids))
            entry = self._cluster_tables[adapter_cluster] = (host, cluster_id)
        return entry
