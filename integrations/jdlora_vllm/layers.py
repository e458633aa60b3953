"""JD layers: vLLM's LoRA wrappers of linear layers that hold every adapter of the configured bundles.

Each class subclasses one of vLLM's wrappers, so vLLM's tensor-parallel slicing (GQA replicas included) and forward
(base GEMM, gathers, all-reduces) stay vLLM's own. Per output slice s (q, k, v of a fused `qkv_proj`; gate, up of
`gate_up_proj`) and per bundle b that patches it, a layer keeps resident:

    U   [C, d_out_s, r]    shared output bases of the bundle's clusters     (rows sharded like lora_B)
    V   [C, r, d_in]       shared input bases                               (columns sharded like lora_A)
    Σ   [N, r, r] or [N, r]  every adapter's core, replicated on each rank
    cluster [N] int64      cluster of each adapter at this module

and, for ordinary (non-bundle) LoRAs, a pool of `plain_lora_slots` entries per slice:

    plain_A [P, max_lora_rank, d_in]      plain_B [P, d_out_s, max_lora_rank]   (vLLM's scaling folded into B)

vLLM's per-slot `lora_a_stacked` / `lora_b_stacked` are shape-only stand-ins (zero-stride views: one element of
memory), read by vLLM for warm-up shapes. A slot carries only which adapter it points at (`routing.StepRouting`).
The update of each (bundle, slice) is one `torch.ops.peft_jdlora.jd_lora_delta` call on the step's per-token
adapter indices: the Triton kernels on CUDA, the torch backend (`peft_jdlora.ops.torch_backend`) on CPU.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch
from vllm.lora.layers import (
    ColumnParallelLinearWithLoRA,
    MergedColumnParallelLinearWithLoRA,
    MergedQKVParallelLinearWithLoRA,
    QKVParallelLinearWithLoRA,
    RowParallelLinearWithLoRA,
)

import peft_jdlora.ops.custom_ops  # noqa: F401  (registers torch.ops.peft_jdlora.jd_lora_delta)

from .build import current_build
from .routing import POOL


@dataclass
class BundleTerm:
    """One bundle's factors for one output slice of a layer, on this rank (shapes in the module docstring)."""

    bundle: int
    module: str
    offset: int  # first column of the slice in this rank's output
    U: torch.Tensor
    V: torch.Tensor
    sigma: torch.Tensor
    cluster: torch.Tensor


def _shape_only(*shape: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A tensor of `shape` that holds one element: what vLLM reads of a JD layer's per-slot LoRA stacks."""
    return torch.zeros((1,) * len(shape), dtype=dtype, device=device).expand(*shape)


class JDLinearMixin:
    """The JD behaviour shared by every wrapper; combined with one vLLM wrapper class below."""

    jd_terms: list[BundleTerm]
    jd_modules: list[str]

    @classmethod
    def can_replace_layer(
        cls,
        source_layer: torch.nn.Module,
        lora_config: Any,
        packed_modules_list: list,
        model_config: Any = None,
        **kwargs: Any,
    ) -> bool:
        build = current_build()
        if build is None:
            return False
        prefix = getattr(source_layer, "prefix", None)
        if not prefix or not build.patches_any(build.slice_names(prefix, packed_modules_list)):
            return False
        return super().can_replace_layer(  # type: ignore[misc]
            source_layer=source_layer,
            lora_config=lora_config,
            packed_modules_list=packed_modules_list,
            model_config=model_config,
        )

    # ------------------------------------------------------------------ weights

    def create_lora_weights(self, max_loras: int, lora_config: Any, model_config: Any = None) -> None:
        build = current_build()
        if build is None:
            raise RuntimeError("JD layers are built only while jdlora_vllm's LoRA manager creates the LoRA modules.")
        self.lora_config = lora_config
        dtype, device = lora_config.lora_dtype, self.device
        if not self._jd_multi_slice:
            self.output_slices = (self.output_size,)
        rank = lora_config.max_lora_rank
        self.lora_a_stacked = tuple(
            _shape_only(max_loras, 1, rank, self.input_size, dtype=dtype, device=device) for _ in self.output_slices
        )
        self.lora_b_stacked = tuple(
            _shape_only(max_loras, 1, size, rank, dtype=dtype, device=device) for size in self.output_slices
        )
        names = build.slice_names(self.base_layer.prefix, build.packed_modules(self.base_layer.prefix))
        if len(names) != len(self.output_slices):
            raise RuntimeError(
                f"{self.base_layer.prefix}: {len(names)} packed modules {names} for {len(self.output_slices)} output "
                "slices; jdlora_vllm cannot tell which slice each bundle module patches."
            )
        offsets = [sum(self.output_slices[:s]) for s in range(len(self.output_slices))]
        self.jd_modules = names
        self.jd_terms = []
        for s, name in enumerate(names):
            for bundle_index, factors, cluster in build.factors_for(name):
                self._check_shapes(name, s, factors.U, factors.V, build.source_of(bundle_index))
                U = self._shard_output_basis(s, factors.U)
                V = self._shard_input_basis(factors.V)
                self.jd_terms.append(
                    BundleTerm(
                        bundle=bundle_index,
                        module=name,
                        offset=offsets[s],
                        U=U.to(device=device, dtype=dtype).contiguous(),
                        V=V.to(device=device, dtype=dtype).contiguous(),
                        sigma=factors.sigma.to(device=device, dtype=dtype).contiguous(),
                        cluster=build.routing.cluster_table(bundle_index, cluster),
                    )
                )
            build.mark_wrapped(name)
        pool = build.plain_lora_slots
        self.plain_A = [torch.zeros(pool, rank, self.input_size, dtype=dtype, device=device) for _ in names]
        self.plain_B = [torch.zeros(pool, size, rank, dtype=dtype, device=device) for size in self.output_slices]
        self.plain_sigma = torch.ones(pool, rank, dtype=dtype, device=device)  # [P, r]: Σ = I, a plain LoRA
        # Each pool entry its own "cluster": a per-entry LoRA through the same op. An empty pool (plain_lora_slots=0)
        # registers no table: no token can use it, and the kernels' per-step metadata needs at least one entry.
        self.plain_cluster: Optional[torch.Tensor] = (
            build.routing.cluster_table(POOL, torch.arange(pool, dtype=torch.int64)) if pool else None
        )  # [P]
        self.plain_offsets = offsets
        self.jd_routing = build.routing

    @property
    def _jd_multi_slice(self) -> bool:
        return isinstance(self, MergedColumnParallelLinearWithLoRA)

    def _full_output_size(self, s: int) -> int:
        if isinstance(self, MergedQKVParallelLinearWithLoRA):
            head = self.base_layer.head_size
            return (self.base_layer.total_num_heads if s == 0 else self.base_layer.total_num_kv_heads) * head
        if self._jd_multi_slice:
            return self.base_layer.output_sizes[s]
        return self.base_layer.output_size

    def _check_shapes(self, name: str, s: int, U: torch.Tensor, V: torch.Tensor, source: str) -> None:
        expected = (self._full_output_size(s), self.base_layer.input_size)
        got = (U.shape[1], V.shape[2])
        if got != expected:
            raise ValueError(
                f"bundle {source!r} patches {name} with a {got[0]}x{got[1]} update, but the served model's {name} is "
                f"{expected[0]}x{expected[1]}: the bundle was made for another base model."
            )

    def _shard_output_basis(self, s: int, U: torch.Tensor) -> torch.Tensor:
        """U [C, d_out_s, r] -> this rank's rows, sliced exactly as vLLM slices lora_B of slice s."""
        if self.tp_size == 1:
            return U
        rows_first = U.permute(1, 0, 2)  # [d_out_s, C, r]: vLLM slices lora_B by its first dim
        if self._jd_multi_slice:
            per_slice: list[Optional[torch.Tensor]] = [None] * len(self.output_slices)
            per_slice[s] = rows_first
            sharded = self.slice_lora_b(per_slice)[s]
        else:
            sharded = self.slice_lora_b(rows_first)
        return sharded.permute(1, 0, 2)

    def _shard_input_basis(self, V: torch.Tensor) -> torch.Tensor:
        """V [C, r, d_in] -> this rank's columns (row-parallel layers shard their input like lora_A)."""
        if self.tp_size == 1 or not isinstance(self, RowParallelLinearWithLoRA):
            return V
        num_clusters, rank, d_in = V.shape
        return self.slice_lora_a(V.reshape(num_clusters * rank, d_in)).reshape(num_clusters, rank, -1)

    # ------------------------------------------------------------------ ordinary LoRAs (vLLM slots)

    def reset_lora(self, index: int) -> None:
        entry = self.jd_routing.pool_entry_of_slot(index)
        if entry is not None:
            for A, B in zip(self.plain_A, self.plain_B):
                A[entry].zero_()
                B[entry].zero_()

    def set_lora(self, index: int, lora_a: Any, lora_b: Any) -> None:
        """Write an ordinary LoRA (vLLM's lora_a [r, d_in], lora_b [d_out, r] with scaling folded, per slice) into
        the pool entry of slot `index`."""
        entry = self.jd_routing.pool_entry_of_slot(index)
        if entry is None:
            raise RuntimeError(f"{self.base_layer.prefix}: slot {index} holds no ordinary LoRA pool entry.")
        self.reset_lora(index)
        if self._jd_multi_slice:
            if isinstance(lora_b, list) and len(lora_b) != len(self.output_slices):
                lora_a, lora_b = self.expand_packed_lora(lora_a, lora_b)
        if self.tp_size > 1:
            lora_a, lora_b = self.slice_lora_a(lora_a), self.slice_lora_b(lora_b)
        if not self._jd_multi_slice:
            lora_a, lora_b = [lora_a], [lora_b]
        for s, (a, b) in enumerate(zip(lora_a, lora_b)):
            if a is not None:
                self.plain_A[s][entry, : a.shape[0], : a.shape[1]].copy_(a, non_blocking=True)
            if b is not None:
                self.plain_B[s][entry, : b.shape[0], : b.shape[1]].copy_(b, non_blocking=True)

    # ------------------------------------------------------------------ forward

    def _apply_lora_to_output(self, x: torch.Tensor, output: torch.Tensor) -> torch.Tensor:
        original_shape = output.shape if output.ndim == 3 else None
        if x.ndim == 3 and output.ndim == 3:  # transformers backend: [1, T, d]
            x, output = x.flatten(0, 1), output.flatten(0, 1)
        num_tokens = x.shape[0]
        routing = self.jd_routing
        for term in self.jd_terms:
            slots = routing.adapter_tokens(term.bundle, num_tokens)  # [T]
            if slots is None:
                continue
            delta = torch.ops.peft_jdlora.jd_lora_delta(
                x.to(term.U.dtype), slots, term.U, term.V, term.sigma, term.cluster
            )  # [T, d_out_s]
            output[:, term.offset : term.offset + term.U.shape[1]] += delta.to(output.dtype)
        pool_slots = routing.pool_tokens(num_tokens)  # [T]
        if pool_slots is not None and self.plain_cluster is not None:
            for A, B, offset in zip(self.plain_A, self.plain_B, self.plain_offsets):
                delta = torch.ops.peft_jdlora.jd_lora_delta(
                    x.to(A.dtype), pool_slots, B, A, self.plain_sigma, self.plain_cluster
                )
                output[:, offset : offset + B.shape[1]] += delta.to(output.dtype)
        if original_shape is not None:
            output = output.reshape(original_shape)
        return output


class JDColumnParallelLinearWithLoRA(JDLinearMixin, ColumnParallelLinearWithLoRA):
    pass


class JDMergedColumnParallelLinearWithLoRA(JDLinearMixin, MergedColumnParallelLinearWithLoRA):
    pass


class JDQKVParallelLinearWithLoRA(JDLinearMixin, QKVParallelLinearWithLoRA):
    pass


class JDMergedQKVParallelLinearWithLoRA(JDLinearMixin, MergedQKVParallelLinearWithLoRA):
    pass


class JDRowParallelLinearWithLoRA(JDLinearMixin, RowParallelLinearWithLoRA):
    pass


# Most specific first, as vLLM orders its own tuple: from_layer() takes the first class that accepts a layer.
JD_LAYER_CLASSES: tuple[type, ...] = (
    JDMergedQKVParallelLinearWithLoRA,
    JDQKVParallelLinearWithLoRA,
    JDMergedColumnParallelLinearWithLoRA,
    JDColumnParallelLinearWithLoRA,
    JDRowParallelLinearWithLoRA,
)
