"""Which adapter each row of a call uses, and the token slots every JD-LoRA layer of the model reads.

From long-lived to per layer:

- `AdapterRouter`: one per model, shared by its JD-LoRA layers. It holds what lasts between calls (the default
  adapter of each bundle) and, in a context variable, the routing of the call in progress: every thread and asyncio
  task sees its own call only, so concurrent calls on one model never see each other's adapters.
- `CallRouting`: one per forward or generate call: the bundle slot of every row [B] (resolved and checked once, at
  entry), how many rows generate makes of each input row (beams, num_return_sequences), and the token slots built
  for the call.
- `TokenSlots`: the slot of every token [T] of one layer-input shape, on the input's device, built by the first layer
  that sees the shape and reused by the others, with the backend decided once for it and the kernel metadata built on
  first use, once per cluster table.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Optional, Union

import torch

from . import ops
from .config import JDLoraConfig

AdapterId = Union[str, int, None]
AdapterIds = Union[Sequence[AdapterId], torch.Tensor]
# Arguments of forward / generate whose first dimension is the batch, in the order they are looked for.
BATCH_INPUTS = ("input_ids", "inputs_embeds", "decoder_input_ids", "input_features", "pixel_values")


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


def batch_rows(args: tuple, kwargs: dict[str, Any], positional: str = "input_ids") -> Optional[tuple[str, int]]:
    """(name, rows) of the first batch input among a call's arguments (the first positional one is `positional`)."""
    for name in BATCH_INPUTS:
        value = kwargs.get(name)
        if value is None and name == BATCH_INPUTS[0] and args and isinstance(args[0], torch.Tensor):
            name, value = positional, args[0]
        if isinstance(value, torch.Tensor) and value.dim() > 1:
            return name, value.shape[0]
    return None


@dataclass(frozen=True)
class ClusterTable:
    """A layer's cluster of every adapter slot: [N] int64 on the host, and its bytes, the key under which layers with
    equal tables share one kernel metadata per batch."""

    host: torch.Tensor
    key: bytes

    @classmethod
    def of(cls, clusters: Sequence[int]) -> ClusterTable:
        host = torch.tensor(list(clusters), dtype=torch.int64)
        return cls(host, host.numpy().tobytes())


class TokenSlots:
    """The slot of every token of one layer-input shape ([T] int64, -1 = base model) on the input's device, the
    backend the call runs on, and the kernel metadata of each cluster table, built the first time a layer asks."""

    def __init__(self, host_slots: torch.Tensor, device: torch.device, backend: str) -> None:
        self.host = host_slots  # [T] int64 CPU: the kernel metadata is built from it, with no device read-back
        self.slots = host_slots if device.type == "cpu" else host_slots.to(device, non_blocking=True)  # [T]
        self.backend = backend
        self._metadata: dict[bytes, Any] = {}

    def metadata(self, clusters: ClusterTable) -> Optional[Any]:
        """Kernel batch metadata for a layer's cluster table; None on the PyTorch backend."""
        if self.backend != "triton":
            return None
        meta = self._metadata.get(clusters.key)
        if meta is None:
            meta = self._metadata[clusters.key] = ops.kernel_metadata(self.host, clusters.host, self.slots.device)
        return meta


class CallRouting:
    """The adapter of every row of one forward or generate call (see the module docstring).

    `row_slots` [B] (int64, CPU, -1 = base) are the call's adapter ids resolved; None means every row uses
    `default_slot`. Inside generate, `expansion` is the number of rows generate makes of each input row
    (max(num_beams, num_return_sequences)); transformers orders them so that row j comes from input row j // k.
    """

    def __init__(
        self,
        bundle: str,
        row_slots: Optional[torch.Tensor],
        default_slot: int = -1,
        expansion: Optional[int] = None,
    ) -> None:
        self.bundle = bundle
        self.row_slots = row_slots
        self.default_slot = default_slot
        self.expansion = expansion
        self._token_slots: dict[tuple[int, int, torch.device], Optional[TokenSlots]] = {}

    @property
    def generating(self) -> bool:
        return self.expansion is not None

    def for_generation(self, expansion: int) -> CallRouting:
        """This call's routing inside generate, which runs the model on `expansion` rows per input row."""
        return CallRouting(self.bundle, self.row_slots, self.default_slot, expansion=max(int(expansion), 1))

    def check_rows(self, rows: int, what: str) -> None:
        """Refuse an input whose rows are not one per adapter id (or generate's expansion of them)."""
        if self.row_slots is None:
            return
        ids = self.row_slots.numel()
        if rows == ids or (self.generating and rows == ids * self.expansion):
            return
        if what == "the layer input":
            raise ValueError(
                f"adapter_ids has {ids} entries but the layer input has {rows} rows: that is not one id per row, and "
                "not a multiple that generate's num_beams / num_return_sequences made."
            )
        raise ValueError(f"adapter_ids has {ids} entries but {what} has {rows} rows: give one adapter id per row.")

    def token_slots(self, x: torch.Tensor, needs_grad: bool) -> Optional[TokenSlots]:
        """Slots of x's tokens (x: [rows, ..., d_in]), or None when every row uses the base model."""
        if x.numel() == 0:
            return None
        rows = x.shape[0] if x.dim() > 1 else 1
        tokens_per_row = x.numel() // (x.shape[-1] * rows)
        key = (rows, tokens_per_row, x.device)
        if key in self._token_slots:
            return self._token_slots[key]
        if self.row_slots is None:
            slots = None if self.default_slot < 0 else torch.full((rows * tokens_per_row,), self.default_slot)
        else:
            self.check_rows(rows, "the layer input")
            per_row = self.row_slots.repeat_interleave(rows // self.row_slots.numel())  # [rows]
            slots = None if bool((per_row < 0).all()) else per_row.repeat_interleave(tokens_per_row)  # [T]
        token_slots = None
        if slots is not None:
            token_slots = TokenSlots(slots, x.device, ops.choose_backend(x.device, needs_grad))
        self._token_slots[key] = token_slots
        return token_slots


class AdapterRouter:
    """One per model, shared by its JD-LoRA layers: the default adapter of each bundle (lasting state) and the
    routing of the call in progress, which lives in a context variable and so belongs to the calling thread or task."""

    def __init__(self) -> None:
        self.default_slots: dict[str, int] = {}
        self.checked_bundles: set[str] = set()  # bundles whose values were checked (see `use_adapter_ids`)
        # Set by `peft_jdlora.training.enable_activation_checkpointing`: the layers recomputed in backward replay
        # the routing of the call that ran them, so adapter ids may be used with gradient checkpointing.
        self.replays_routing_in_recompute = False
        self._call: contextvars.ContextVar[Optional[CallRouting]] = contextvars.ContextVar(
            "jdlora_call_routing", default=None
        )

    def set_default(self, bundle: str, slot: int) -> None:
        self.default_slots[bundle] = slot

    def forget(self, bundle: str) -> None:
        self.default_slots.pop(bundle, None)
        self.checked_bundles.discard(bundle)

    def current(self) -> Optional[CallRouting]:
        """The routing of the call in progress in this thread / task, if any."""
        return self._call.get()

    @contextlib.contextmanager
    def routing(self, call: CallRouting) -> Iterator[CallRouting]:
        """Run the block as `call`: layers reached from it (in this thread or task only) route rows by it."""
        token = self._call.set(call)
        try:
            yield call
        finally:
            self._call.reset(token)

    def token_slots(self, bundle: str, x: torch.Tensor, needs_grad: bool) -> Optional[TokenSlots]:
        """Token slots of a layer input for `bundle`: from the call in progress, else from the bundle's default
        adapter (built for this layer alone: a direct call of the model outside any entry point)."""
        call = self._call.get()
        if call is None or call.bundle != bundle:
            slot = self.default_slots.get(bundle, -1)
            if slot < 0:
                return None
            call = CallRouting(bundle, None, slot)
        return call.token_slots(x, needs_grad)

    def __getstate__(self) -> dict[str, Any]:
        # A context variable cannot be pickled or copied; a copy starts with no call in progress.
        return {
            "default_slots": dict(self.default_slots),
            "checked_bundles": set(self.checked_bundles),
            "replays_routing_in_recompute": self.replays_routing_in_recompute,
        }

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__()
        self.default_slots.update(state["default_slots"])
        self.checked_bundles.update(state.get("checked_bundles", ()))
        self.replays_routing_in_recompute = state.get("replays_routing_in_recompute", False)


def check_call_rows(router: AdapterRouter, module: torch.nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
    """Forward pre-hook of the model holding the layers: refuse, before anything runs, an input whose rows do not
    match the call's adapter ids. Installed once per model; a no-op outside calls with adapter ids."""
    call = router.current()
    if call is None or call.row_slots is None:
        return
    found = batch_rows(args, kwargs)
    if found is not None:
        call.check_rows(found[1], found[0])
