"""The JD-LoRA tuner layer: a Linear (or GPT-2 Conv1D) with a bundle of adapters in a shared basis."""

from __future__ import annotations

from typing import Any, Optional, Union

import torch
from peft.tuners._buffer_dict import BufferDict
from peft.tuners.tuners_utils import BaseTunerLayer, _get_in_out_features, check_adapters_to_merge
from torch import nn

from . import ops
from .batch import AdapterRouter, ClusterTable
from .bundle import adapter_delta_weight

InitWeights = Union[bool, str]


def random_basis(num_clusters: int, rows: int, rank: int) -> torch.Tensor:
    """[C, rows, rank] random bases with orthonormal columns, or orthonormal rows when rank > rows (any rank works, as
    in LoRA: the stored shape never depends on how the basis was made). One batched QR for all clusters."""
    if rank <= rows:
        return torch.linalg.qr(torch.randn(num_clusters, rows, rank))[0]
    return torch.linalg.qr(torch.randn(num_clusters, rank, rows))[0].transpose(1, 2)


class JDLoraLayer(BaseTunerLayer):
    """Holds, per PEFT adapter name (one name = one bundle), the module's factors:

    jd_U:       [C, d_out, r]   shared output basis of each cluster
    jd_V:       [C, r, d_in]    shared input basis of each cluster (stored transposed, like lora_A)
    jd_sigma:   [N, r, r] or [N, r]   each adapter's core (full or diagonal), LoRA scaling included
    jd_cluster: [N] int64       cluster of each adapter at this module (from the config, not saved), with its host
                                copy in `jd_cluster_table` (the kernel metadata is built from it)
    jd_sigma_trained: [r, r] or [r]   Σ of one more adapter being trained in the bundle's basis (slot N, after the
                                bundle's own; see `peft_jdlora.training`). Kept apart so that it alone requires grad.
    """

    adapter_layer_names = ("jd_U", "jd_V", "jd_sigma")
    # jd_sigma_trained is not among adapter_layer_names: PEFT's set_adapter must never make it (or, through it, the
    # whole bundle) trainable; training.py sets requires_grad itself.
    other_param_names = ("jd_cluster", "jd_cluster_table", "r", "sigma_type", "jd_sigma_trained")

    def __init__(self, base_layer: nn.Module, router: Optional[AdapterRouter] = None, **kwargs: Any) -> None:
        self.base_layer = base_layer
        self.r: dict[str, int] = {}
        self.sigma_type: dict[str, str] = {}
        self.jd_U = nn.ParameterDict({})
        self.jd_V = nn.ParameterDict({})
        self.jd_sigma = nn.ParameterDict({})
        self.jd_sigma_trained = nn.ParameterDict({})
        self.jd_cluster = BufferDict({}, persistent=False)
        self.jd_cluster_table: dict[str, ClusterTable] = {}
        self.jd_router = router if router is not None else AdapterRouter()
        self.merged_slots: dict[str, int] = {}
        self._disable_adapters = False
        self.merged_adapters = []
        in_features, out_features = _get_in_out_features(self.get_base_layer())
        if in_features is None or out_features is None:
            raise TypeError(f"JD-LoRA supports torch.nn.Linear and transformers Conv1D, not {type(base_layer)}.")
        self.in_features, self.out_features = in_features, out_features
        self.kwargs = kwargs

    def update_layer(
        self,
        adapter_name: str,
        r: int,
        sigma_type: str,
        adapter_cluster: list[int],
        num_clusters: int,
        init_weights: InitWeights = True,
    ) -> None:
        """Create the factors of `adapter_name`, initialised as `JDLoraConfig.init_weights` says: True, a random
        orthonormal basis and Σ = 0 (the model is unchanged until Σ is trained, like LoRA's B = 0); False, a random
        basis and a random Σ (a non-identity adapter); "zeros", zeros (values about to be loaded)."""
        num_adapters = len(adapter_cluster)
        if num_adapters == 0:
            raise ValueError(f"bundle {adapter_name!r} has no adapters: JDLoraConfig.adapter_names is empty.")
        self.r[adapter_name] = r
        self.sigma_type[adapter_name] = sigma_type
        sigma_shape = (num_adapters, r, r) if sigma_type == "full" else (num_adapters, r)
        if init_weights == "zeros":
            U = torch.zeros(num_clusters, self.out_features, r)
            V = torch.zeros(num_clusters, r, self.in_features)
            sigma = torch.zeros(sigma_shape)
        else:
            U = random_basis(num_clusters, self.out_features, r)  # [C, d_out, r]
            V = random_basis(num_clusters, self.in_features, r).transpose(1, 2)  # [C, r, d_in]
            # Random Σ with singular values of order 1 (U and V are orthonormal): visibly not the identity.
            sigma = torch.zeros(sigma_shape) if init_weights else torch.randn(sigma_shape) / r**0.5
        self.jd_U[adapter_name] = nn.Parameter(U.contiguous())
        self.jd_V[adapter_name] = nn.Parameter(V.contiguous())
        self.jd_sigma[adapter_name] = nn.Parameter(sigma)
        self.jd_cluster[adapter_name] = torch.tensor(adapter_cluster, dtype=torch.int64)
        self.jd_cluster_table[adapter_name] = ClusterTable.of(adapter_cluster)
        self._move_adapter_to_device_of_base_layer(adapter_name)
        self.set_adapter(self.active_adapters)

    def _factors(self, adapter_name: str) -> tuple[torch.Tensor, ...]:
        U, V, sigma = self.jd_U[adapter_name], self.jd_V[adapter_name], self.jd_sigma[adapter_name]
        if adapter_name in self.jd_sigma_trained:  # the adapter in training is slot N: [N + 1, r, r] or [N + 1, r]
            trained = self.jd_sigma_trained[adapter_name]
            sigma = torch.cat([sigma, trained.to(sigma.dtype).unsqueeze(0)])
        return U, V, sigma, self.jd_cluster[adapter_name].to(U.device)

    def get_delta_weight(self, adapter_name: str, slot: int) -> torch.Tensor:
        """Dense ΔW of adapter `slot` of bundle `adapter_name`, in the layout of the base weight."""
        weight = self.get_base_layer().weight
        U, V, sigma, cluster = self._factors(adapter_name)
        # fp16/bf16 matmuls are slow or missing on CPU; compute in fp32 there, as PEFT's LoRA does.
        compute_dtype = torch.float32 if weight.device.type == "cpu" else U.dtype
        delta = adapter_delta_weight(U, V, sigma, slot, int(cluster[slot]), compute_dtype)  # [d_out, d_in]
        if self.kwargs.get("fan_in_fan_out", False):
            delta = delta.T
        return delta.to(weight.dtype)


class Linear(nn.Module, JDLoraLayer):
    """JD-LoRA on a `torch.nn.Linear` or transformers `Conv1D` (set `fan_in_fan_out=True` for the latter)."""

    def __init__(
        self,
        base_layer: nn.Module,
        adapter_name: str,
        r: int,
        sigma_type: str,
        adapter_cluster: list[int],
        num_clusters: int,
        router: AdapterRouter,
        fan_in_fan_out: bool = False,
        init_weights: InitWeights = True,
        **kwargs: Any,
    ) -> None:
        super().__init__()
        JDLoraLayer.__init__(self, base_layer, router=router, fan_in_fan_out=fan_in_fan_out, **kwargs)
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, r, sigma_type, adapter_cluster, num_clusters, init_weights=init_weights)

    def merge(self, safe_merge: bool = False, adapter_names: Optional[list[str]] = None, slot: Optional[int] = None):
        """Add one adapter of each bundle into the base weight: adapter `slot`, or the bundle's default adapter
        (`JDLoraModel.merge_adapter(adapter=...)` passes the slot; PEFT's generic calls use the default)."""
        for adapter_name in check_adapters_to_merge(self, adapter_names):
            if adapter_name not in self.jd_U:
                continue
            merge_slot = self.jd_router.default_slots.get(adapter_name, -1) if slot is None else slot
            if merge_slot < 0:
                raise ValueError(
                    f"bundle {adapter_name!r} has no adapter selected to merge: pass one with "
                    "merge_and_unload(adapter=...) / merge_adapter(adapter=...), or call set_default_adapter first."
                )
            base_layer = self.get_base_layer()
            delta = self.get_delta_weight(adapter_name, merge_slot)
            if safe_merge:
                merged = base_layer.weight.data + delta
                if not torch.isfinite(merged).all():
                    raise ValueError(
                        f"NaNs detected in the merged weights. The adapter {adapter_name} seems to be broken "
                        f"(adapter {merge_slot} of the bundle)."
                    )
                base_layer.weight.data = merged
            else:
                base_layer.weight.data += delta
            self.merged_adapters.append(adapter_name)
            self.merged_slots[adapter_name] = merge_slot

    def unmerge(self) -> None:
        """Subtract every merged adapter from the base weight again."""
        while self.merged_adapters:
            adapter_name = self.merged_adapters.pop()
            slot = self.merged_slots.pop(adapter_name)
            self.get_base_layer().weight.data -= self.get_delta_weight(adapter_name, slot)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self.disable_adapters:  # as PEFT's LoRA: a disabled layer is the base layer, merged or not
            if self.merged:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        result = self.base_layer(x, *args, **kwargs)
        call = self.jd_router.current()
        if self.merged:
            if call is not None and call.row_slots is not None and call.bundle in self.merged_adapters:
                raise RuntimeError(
                    "adapter_ids cannot be used while an adapter is merged into the base weights: call "
                    "unmerge_adapter() first."
                )
            return result
        for adapter_name in self.active_adapters:
            if adapter_name not in self.jd_U:
                continue
            U, V, sigma, cluster = self._factors(adapter_name)
            needs_grad = torch.is_grad_enabled() and (
                result.requires_grad or x.requires_grad or U.requires_grad or V.requires_grad or sigma.requires_grad
            )
            slots = self.jd_router.token_slots(adapter_name, x, needs_grad)
            if slots is None:
                continue
            x_flat = self._cast_input_dtype(x, U.dtype).reshape(-1, self.in_features)  # [T, d_in]
            if needs_grad:  # out of place, so that autograd sees the sum; the kernels have no backward
                backend = slots.backend if slots.backend == "torch" else ops.choose_backend(x.device, needs_grad)
                delta = ops.jd_lora_delta(x_flat, slots.slots, U, V, sigma, cluster, backend=backend)  # [T, d_out]
                result = result + delta.view(*result.shape[:-1], self.out_features).to(result.dtype)
                continue
            if not result.is_contiguous():
                result = result.contiguous()
            metadata = slots.metadata(self.jd_cluster_table[adapter_name])
            out = result.view(-1, self.out_features)  # [T, d_out], the base layer's output
            ops.add_jd_lora_delta_(out, x_flat, slots.slots, U, V, sigma, cluster, metadata, slots.backend)
        return result

    def __repr__(self) -> str:
        return "jdlora." + super().__repr__()
