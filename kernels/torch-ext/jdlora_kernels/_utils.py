"""Launch helpers shared by the kernels: where a kernel may run, launch configurations, input checks.

No autotuning: configurations come from shape heuristics, so a launch never benchmarks (which would need a GPU and
would break CUDA-graph capture) and the same shapes always get the same kernels. `config=` on every launch wrapper
overrides them (the benchmark and the tests use it).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any, Optional

import torch
import triton

# fp32 intermediates between shrink and expand; the output keeps the input dtype.
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# Per-row Σ products (shrink epilogue, "row" mode) work on [BLOCK_M, BLOCK_I, BLOCK_R] fp32 chunks of this many
# elements: big enough to keep the loads wide, small enough to stay in registers.
ROW_SIGMA_CHUNK_ELEMENTS = 8192


def is_interpreted(kernel: Any) -> bool:
    """True when `kernel` (a @triton.jit function) runs in the Triton interpreter (TRITON_INTERPRET=1 at import)."""
    try:
        from triton.runtime.interpreter import InterpretedFunction
    except ImportError:  # pragma: no cover - every triton >= 3.0 has it
        return False
    return isinstance(kernel, InterpretedFunction)


def check_launchable(device: torch.device, interpreted: bool) -> None:
    """Triton needs a GPU, or the interpreter for CPU tensors; say so before triton fails with "0 active drivers"."""
    if device.type == "cpu" and not interpreted:
        raise RuntimeError(
            "jdlora_kernels runs Triton kernels on GPU tensors; these tensors are on the CPU. Set TRITON_INTERPRET=1 "
            "before triton is first imported to run the kernels in the Triton interpreter, or use the PyTorch "
            "reference (jdlora_kernels.jd_lora_delta_ref)."
        )


@functools.cache
def _multiprocessors(device_type: str, index: int) -> int:
    if device_type == "cuda":
        return torch.cuda.get_device_properties(index).multi_processor_count
    if device_type == "xpu" and hasattr(torch, "xpu"):
        props = torch.xpu.get_device_properties(index)
        return int(getattr(props, "gpu_subslice_count", 64))
    return 4  # the interpreter: a few programs are plenty


def multiprocessors(device: torch.device) -> int:
    """Streaming multiprocessors of `device` (cached host query: no device sync)."""
    index = device.index if device.index is not None else 0
    if device.type == "cuda" and device.index is None:
        index = torch.cuda.current_device()
    return _multiprocessors(device.type, index)


def rank_block(rank: int) -> int:
    """Padded rank tile: a power of two, >= 16 because tl.dot needs every tile dimension >= 16."""
    return max(16, triton.next_power_of_2(rank))


def shrink_config(
    d_in: int,
    rank: int,
    block_r: int,
    block_m: int,
    max_tiles: int,
    sigma_elements: int,
    device: torch.device,
    interpreted: bool,
) -> dict[str, int]:
    """BLOCK_K, SPLIT_K, BLOCK_I and warps/stages of the shrink.

    Decode batches have few row tiles, so the reduction over d_in is split (SPLIT_K programs per tile, combined with
    fp32 atomics) until the grid fills the GPU about twice over. Every split program applies Σ to its partial sum
    and so reads the tile's Σ (`sigma_elements`: BLOCK_M·r diagonal, r² per tile, BLOCK_M·r² per row) again; the
    split stops before those reads outweigh the program's share of x and V.
    """
    block_i = max(1, min(block_r, ROW_SIGMA_CHUNK_ELEMENTS // (block_m * block_r)))
    if interpreted:
        return {"BLOCK_K": 32, "SPLIT_K": 1, "BLOCK_I": block_i, "num_warps": 4, "num_stages": 1}
    block_k = 64 if block_r <= 64 else 32
    k_blocks = triton.cdiv(d_in, block_k)
    max_split = max(1, min(64, k_blocks, (block_m + rank) * d_in // max(1, sigma_elements)))
    target = 2 * multiprocessors(device)
    split_k = 1
    while split_k * 2 <= max_split and max_tiles * split_k * 2 <= target:
        split_k *= 2
    return {"BLOCK_K": block_k, "SPLIT_K": split_k, "BLOCK_I": block_i, "num_warps": 4, "num_stages": 3}


def expand_config(
    d_out: int, block_m: int, max_tiles: int, num_slices: int, device: torch.device, interpreted: bool
) -> dict[str, int]:
    """BLOCK_N and warps/stages of the expand: wide column tiles, narrowed while the grid is too small."""
    if interpreted:
        return {"BLOCK_N": 32, "num_warps": 4, "num_stages": 1}
    block_n = 128
    target = 2 * multiprocessors(device)
    while block_n > 32 and max_tiles * num_slices * triton.cdiv(d_out, block_n) < target:
        block_n //= 2
    return {"BLOCK_N": block_n, "num_warps": 8 if block_m * block_n >= 64 * 128 else 4, "num_stages": 2}


def merge_config(default: dict[str, int], override: Optional[dict[str, int]]) -> dict[str, int]:
    if not override:
        return default
    unknown = set(override) - set(default)
    if unknown:
        raise KeyError(f"unknown launch parameters {sorted(unknown)}; known: {sorted(default)}.")
    return {**default, **override}


def as_slices(value: Any, what: str) -> list[torch.Tensor]:
    """A tensor or a non-empty sequence of tensors (fused slices) as a list."""
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, Sequence) and value and all(isinstance(v, torch.Tensor) for v in value):
        return list(value)
    raise TypeError(f"{what} must be a tensor or a non-empty list of tensors (one per fused slice).")


def slice_table(rows: Sequence[Sequence[int]], device: torch.device) -> torch.Tensor:
    """An int64 [S, F] table of per-slice pointers and strides, cached per content (built once, not per forward)."""
    key = (device, tuple(tuple(int(v) for v in row) for row in rows))
    table = _SLICE_TABLES.get(key)
    if table is None:
        if len(_SLICE_TABLES) >= _MAX_SLICE_TABLES:
            _SLICE_TABLES.pop(next(iter(_SLICE_TABLES)))
        # Built once per weight set (a copy to the device, so done at warmup, before any CUDA-graph capture).
        table = torch.tensor(key[1], dtype=torch.int64).to(device)
        _SLICE_TABLES[key] = table
    return table


_SLICE_TABLES: dict[tuple, torch.Tensor] = {}
_MAX_SLICE_TABLES = 1024
