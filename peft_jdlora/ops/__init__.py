"""Mixed-adapter JD-LoRA forward: the PyTorch reference and the dispatch to the Triton kernels.

The backend is chosen per call: `"triton"` on CUDA tensors when the `jdlora_kernels` package imports, `"torch"`
otherwise. `set_backend("torch" | "triton" | "auto")` or the environment variable `PEFT_JDLORA_BACKEND` forces one.
"""

from __future__ import annotations

import os
from typing import Literal, Optional

import torch

from . import reference

Backend = Literal["auto", "torch", "triton"]
_BACKENDS = ("auto", "torch", "triton")
_backend: str = os.environ.get("PEFT_JDLORA_BACKEND", "auto")


def set_backend(backend: Backend) -> None:
    """Force the backend of the mixed-adapter forward: "torch", "triton", or "auto" (triton on CUDA tensors)."""
    global _backend
    if backend not in _BACKENDS:
        raise ValueError(f"backend must be one of {_BACKENDS}, got {backend!r}.")
    _backend = backend


def get_backend() -> str:
    return _backend


def _triton_ops():
    try:
        import jdlora_kernels
    except ImportError:
        return None
    return jdlora_kernels


def triton_available(device: torch.device) -> bool:
    return device.type == "cuda" and _triton_ops() is not None


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
    forward (built by the caller once per batch); the torch backend ignores it.
    """
    backend = _backend
    if backend == "triton" or (backend == "auto" and x.is_cuda):
        ops = _triton_ops()
        if ops is not None and x.is_cuda:
            return ops.jd_lora_delta(x, token_slots, U, V, sigma, adapter_cluster, metadata=metadata)
        if backend == "triton":
            raise RuntimeError(
                "the triton backend was forced but is unavailable: it needs CUDA tensors and the `jdlora_kernels` "
                f"package (x is on {x.device})."
            )
    return reference.jd_lora_delta(x, token_slots, U, V, sigma, adapter_cluster)


__all__ = ["get_backend", "jd_lora_delta", "reference", "set_backend", "triton_available"]
