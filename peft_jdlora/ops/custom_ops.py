"""The mixed-adapter JD-LoRA forward as a `torch.library` custom op, so `torch.compile` (and engines that compile
their model, such as vLLM) can trace through it:

    delta = torch.ops.peft_jdlora.jd_lora_delta(x, token_slots, U, V, sigma, adapter_cluster)

    x: [T, d_in]; token_slots: [T] int64 (-1 = base model); U: [C, d_out, r]; V: [C, r, d_in];
    sigma: [N, r, r] or [N, r]; adapter_cluster: [N] int64  ->  delta: [T, d_out] in x's dtype

The op is functional (it returns a new tensor and mutates nothing) and has a fake implementation for tracing. Its
real implementation is `peft_jdlora.ops.jd_lora_delta`: the Triton kernels on CUDA, the torch backend otherwise.
Kernel metadata built outside the traced forward (once per step, e.g. by a serving engine) is handed to the op with
`set_step_metadata`, keyed by the storage of the token-slot tensor the forward passes in.
"""

from __future__ import annotations

from typing import Any, Optional

import torch

from . import jd_lora_delta as _dispatch_jd_lora_delta

OP_NAMESPACE = "peft_jdlora"

# (data_ptr of token_slots, T, data_ptr of adapter_cluster) -> kernel metadata for that batch
_step_metadata: dict[tuple[int, int, int], Any] = {}


def set_step_metadata(token_slots: torch.Tensor, adapter_cluster: torch.Tensor, metadata: Any) -> None:
    """Hand prebuilt kernel metadata for `token_slots` [T] and `adapter_cluster` [N] to the op's next calls."""
    _step_metadata[_metadata_key(token_slots, adapter_cluster)] = metadata


def clear_step_metadata() -> None:
    _step_metadata.clear()


def _metadata_key(token_slots: torch.Tensor, adapter_cluster: torch.Tensor) -> tuple[int, int, int]:
    return (token_slots.data_ptr(), token_slots.numel(), adapter_cluster.data_ptr())


# The op is `torch.ops.peft_jdlora.jd_lora_delta`; the Python name says that this object is the op, not the dispatch.
@torch.library.custom_op(f"{OP_NAMESPACE}::jd_lora_delta", mutates_args=())
def jd_lora_delta_op(
    x: torch.Tensor,
    token_slots: torch.Tensor,
    U: torch.Tensor,
    V: torch.Tensor,
    sigma: torch.Tensor,
    adapter_cluster: torch.Tensor,
) -> torch.Tensor:
    metadata: Optional[Any] = _step_metadata.get(_metadata_key(token_slots, adapter_cluster))
    delta = _dispatch_jd_lora_delta(x, token_slots, U, V, sigma, adapter_cluster, metadata=metadata)
    # A custom op may not return a view of its inputs, and its output dtype must match the fake's.
    return delta.to(x.dtype).contiguous() if delta.data_ptr() != x.data_ptr() else delta.clone()


@jd_lora_delta_op.register_fake
def _jd_lora_delta_fake(
    x: torch.Tensor,
    token_slots: torch.Tensor,
    U: torch.Tensor,
    V: torch.Tensor,
    sigma: torch.Tensor,
    adapter_cluster: torch.Tensor,
) -> torch.Tensor:
    torch._check(token_slots.shape[0] == x.shape[0])
    torch._check(U.shape[0] == V.shape[0])
    return x.new_empty(x.shape[0], U.shape[1])


__all__ = ["OP_NAMESPACE", "clear_step_metadata", "jd_lora_delta_op", "set_step_metadata"]
