"""Mixed-adapter JD-LoRA forward: the PyTorch reference and the dispatch to the Triton kernels.

The backend is chosen per call:

- ``"auto"`` (default): the Triton kernels for CUDA tensors when `jdlora_kernels` loads and no gradient is needed
  (the kernels have no backward), the PyTorch reference otherwise;
- ``"torch"``: always the reference;
- ``"triton"``: always the kernels; on CPU tensors this needs the Triton interpreter (``TRITON_INTERPRET=1`` set
  before triton is imported), and a call that needs a gradient raises.

`set_backend(...)` or the environment variable ``PEFT_JDLORA_BACKEND`` picks one. The kernels come from the installed
`jdlora_kernels` module; without it, ``PEFT_JDLORA_KERNELS`` may name a Hub kernel repository or a local kernel folder
(``kernels/build``) to load through the `kernels` library, as TGI's `load_kernel(module=..., repo_id=...)` does.
"""

from __future__ import annotations

import functools
import importlib
import os
from pathlib import Path
from types import ModuleType
from typing import Any, Literal, Optional

import torch

from . import reference

Backend = Literal["auto", "torch", "triton"]
_BACKENDS = ("auto", "torch", "triton")
KERNELS_MODULE = "jdlora_kernels"
_backend: str = os.environ.get("PEFT_JDLORA_BACKEND", "auto")
if _backend not in _BACKENDS:
    raise ValueError(f"PEFT_JDLORA_BACKEND must be one of {_BACKENDS}, got {_backend!r}.")


def set_backend(backend: Backend) -> None:
    """Force the backend of the mixed-adapter forward: "torch", "triton", or "auto" (triton on CUDA tensors)."""
    global _backend
    if backend not in _BACKENDS:
        raise ValueError(f"backend must be one of {_BACKENDS}, got {backend!r}.")
    _backend = backend


def get_backend() -> str:
    return _backend


@functools.lru_cache(maxsize=1)
def _load_kernels() -> tuple[Optional[ModuleType], str]:
    """(module or None, why not): the importable module first, then a kernel named by PEFT_JDLORA_KERNELS."""
    try:
        return importlib.import_module(KERNELS_MODULE), ""
    except ModuleNotFoundError as err:
        if err.name not in (KERNELS_MODULE, "triton"):
            raise
        reason = f"`{KERNELS_MODULE}` is not importable ({err})"
    source = os.environ.get("PEFT_JDLORA_KERNELS")
    if not source:
        return None, reason
    try:
        import kernels
    except ImportError:
        kernels = None
    if not hasattr(kernels, "get_local_kernel"):  # missing, or a stray `kernels/` folder imported as a namespace
        return None, f"{reason}, and PEFT_JDLORA_KERNELS={source!r} needs the `kernels` package (pip install kernels)"
    if Path(source).is_dir():
        return kernels.get_local_kernel(Path(source)), ""
    return kernels.get_kernel(source, version=1, trust_remote_code=[source]), ""


def kernels_module() -> Optional[ModuleType]:
    """The Triton kernel module (`jdlora_kernels`, or the Hub kernel), or None when it cannot be loaded."""
    return _load_kernels()[0]


def triton_available(device: torch.device) -> bool:
    """Whether the kernels can run on tensors of `device` (CUDA, or CPU under the Triton interpreter)."""
    module = kernels_module()
    if module is None:
        return False
    return device.type == "cuda" or (device.type == "cpu" and bool(getattr(module, "INTERPRETED", False)))


def _use_triton(device: torch.device, needs_grad: bool) -> bool:
    backend = _backend
    if backend == "torch":
        return False
    if backend == "auto":
        return device.type == "cuda" and not needs_grad and kernels_module() is not None
    module, reason = _load_kernels()
    if module is None:
        raise RuntimeError(f"the triton backend was forced but the kernels are unavailable: {reason}.")
    if not triton_available(device):
        raise RuntimeError(
            f"the triton backend was forced but tensors on {device} cannot run the kernels: they need CUDA tensors, or "
            "CPU tensors with TRITON_INTERPRET=1 set before triton is imported."
        )
    if needs_grad:
        raise RuntimeError(
            "the triton backend was forced but this call needs gradients, and the kernels have no backward: use "
            "set_backend('auto') or 'torch' for training, or run under torch.no_grad() / torch.inference_mode()."
        )
    return True


def kernel_metadata(token_slots: torch.Tensor, adapter_cluster: torch.Tensor, device: torch.device) -> Optional[Any]:
    """Kernel batch metadata for host (CPU) `token_slots` [T] and `adapter_cluster` [N] on `device`, or None when the
    backend for `device` is the PyTorch reference. Invalid slots raise here, on the host."""
    if not _use_triton(device, needs_grad=False):
        return None
    return kernels_module().JDLoraKernelMeta.from_token_slots(token_slots, adapter_cluster, device=device)


def jd_lora_delta(
    x: torch.Tensor,
    token_slots: torch.Tensor,
    U: torch.Tensor,
    V: torch.Tensor,
    sigma: torch.Tensor,
    adapter_cluster: torch.Tensor,
    metadata: Optional[object] = None,
) -> torch.Tensor:
    """delta[t] = U[c]·Σ[a]·V[c]·x[t] for each token t of adapter slot a (-1 = base, gives 0).

    x: [T, d_in]; token_slots: [T] int64; U: [C, d_out, r]; V: [C, r, d_in]; sigma: [N, r, r] or [N, r];
    adapter_cluster: [N] int64 -> [T, d_out]. `metadata` is the kernel batch metadata shared by all layers of a
    forward (built once per batch by `kernel_metadata`); the torch backend ignores it, and the triton backend builds
    it here when it is missing (which reads the slots back to the host).
    """
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (x, U, V, sigma))
    if _use_triton(x.device, needs_grad):
        return kernels_module().jd_lora_delta(x, token_slots, U, V, sigma, adapter_cluster, metadata=metadata)
    return reference.jd_lora_delta(x, token_slots, U, V, sigma, adapter_cluster)


__all__ = [
    "get_backend",
    "jd_lora_delta",
    "kernel_metadata",
    "kernels_module",
    "reference",
    "set_backend",
    "triton_available",
]
