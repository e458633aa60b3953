"""The mixed-adapter JD-LoRA forward: one entry point, two backends.

`add_jd_lora_delta_(out, x, token_slots, U, V, sigma, adapter_cluster)` adds the update of every token into `out` in
place (what the layers and serving engines call); `jd_lora_delta(...)` returns it as a new, differentiable tensor.
Both run on one of two backends, chosen once per batch (`choose_backend`):

- ``"torch"``: plain PyTorch (`torch_backend.py`): any device, differentiable; the CPU serving and training path;
- ``"triton"``: the Triton kernels of the `jdlora_kernels` package (`add_jd_lora`, `jd_lora_delta` there), inference
  only (they have no backward).

The choice:

- ``"auto"`` (default): the Triton kernels for CUDA tensors when `jdlora_kernels` loads and no gradient is needed,
  the torch backend otherwise;
- ``"torch"``: always the torch backend;
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

from .torch_backend import add_jd_lora_delta_torch_

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


def choose_backend(device: torch.device, needs_grad: bool = False) -> str:
    """The backend ("torch" or "triton") that runs the mixed-adapter op on tensors of `device`.

    "auto" picks the kernels for CUDA tensors without gradients; a forced "triton" raises when the kernels cannot
    run here or a gradient is needed (they have no backward). Decided once per batch shape and call by the layers.
    """
    backend = _backend
    if backend == "torch":
        return "torch"
    if backend == "auto":
        return "triton" if device.type == "cuda" and not needs_grad and kernels_module() is not None else "torch"
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
    return "triton"


def kernel_metadata(token_slots: torch.Tensor, adapter_cluster: torch.Tensor, device: torch.device) -> Optional[Any]:
    """Kernel batch metadata for host (CPU) `token_slots` [T] and `adapter_cluster` [N] on `device`, or None when the
    backend for `device` is the torch backend. Invalid slots raise here, on the host."""
    if choose_backend(device) != "triton":
        return None
    return kernels_module().JDLoraKernelMeta.from_token_slots(token_slots, adapter_cluster, device=device)


def _needs_grad(*tensors: torch.Tensor) -> bool:
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def add_jd_lora_delta_(
    out: torch.Tensor,
    x: torch.Tensor,
    token_slots: torch.Tensor,
    U: torch.Tensor,
    V: torch.Tensor,
    sigma: torch.Tensor,
    adapter_cluster: torch.Tensor,
    metadata: Optional[object] = None,
    backend: Optional[str] = None,
) -> torch.Tensor:
    """out[t] += U[c]·Σ[a]·V[c]·x[t] for each token t of adapter slot a (-1 = base: unchanged), in place; returns out.

    The entry point for serving engines, with flat token slots:

        out:             [T, d_out]      any float dtype (a view of the base layer's output works: rows may be strided)
        x:               [T, d_in]       in U's dtype
        token_slots:     [T] int64       slot of each token, -1 = base model (vLLM's token_lora_mapping)
        U:               [C, d_out, r]   V: [C, r, d_in]   sigma: [N, r, r] (full) or [N, r] (diagonal)
        adapter_cluster: [N] int64       the module's cluster table: the cluster of each slot

    `metadata` is the kernel batch metadata of `token_slots` (`kernel_metadata`, built once per batch on the host and
    shared by every layer with the same cluster table); the triton backend builds it here when it is missing, which
    reads the slots back to the host. `backend` ("torch" or "triton") defaults to `choose_backend`. In place, so
    `out` must not need a gradient: `jd_lora_delta` (a fresh tensor) is the differentiable form.
    """
    if backend is None:
        backend = choose_backend(x.device, _needs_grad(x, U, V, sigma))
    if backend == "triton":
        return kernels_module().jd_lora_delta(x, token_slots, U, V, sigma, adapter_cluster, metadata=metadata, out=out)
    return add_jd_lora_delta_torch_(out, x, token_slots, U, V, sigma, adapter_cluster)


def jd_lora_delta(
    x: torch.Tensor,
    token_slots: torch.Tensor,
    U: torch.Tensor,
    V: torch.Tensor,
    sigma: torch.Tensor,
    adapter_cluster: torch.Tensor,
    metadata: Optional[object] = None,
    backend: Optional[str] = None,
) -> torch.Tensor:
    """delta[t] = U[c]·Σ[a]·V[c]·x[t] for each token t of adapter slot a (-1 = base, gives 0), as a new tensor.

    Shapes as in `add_jd_lora_delta_` -> [T, d_out] in x's dtype. Differentiable on the torch backend (what
    training uses); the triton backend has no backward.
    """
    delta = x.new_zeros(x.shape[0], U.shape[1])  # [T, d_out]
    return add_jd_lora_delta_(delta, x, token_slots, U, V, sigma, adapter_cluster, metadata, backend)


__all__ = [
    "add_jd_lora_delta_",
    "choose_backend",
    "get_backend",
    "jd_lora_delta",
    "kernel_metadata",
    "kernels_module",
    "set_backend",
    "triton_available",
]
