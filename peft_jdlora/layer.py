"""The JD-LoRA tuner layer: a Linear (or GPT-2 Conv1D) with a bundle of adapters in a shared basis."""

from __future__ import annotations

from typing import Any, Optional

import torch
from peft.tuners._buffer_dict import BufferDict
from peft.tuners.tuners_utils import BaseTunerLayer, _get_in_out_features, check_adapters_to_merge
from torch import nn

from . import ops
from .batch import AdapterBatch


class JDLoraLayer(BaseTunerLayer):
    """Holds, per PEFT adapter name (one name = one bundle), the module's factors:

    jd_U:       [C, d_out, r]   shared output basis of each cluster
    jd_V:       [C, r, d_in]    shared input basis of each cluster (stored transposed, like lora_A)
    jd_sigma:   [N, r, r] or [N, r]   each adapter's core (full or diagonal), LoRA scaling included
    jd_cluster: [N] int64       cluster of each adapter at this module (from the config, not saved)
    """

    adapter_layer_names = ("jd_U", "jd_V", "jd_sigma")
    other_param_names = ("jd_cluster", "r", "sigma_type")

    def __init__(self, base_layer: nn.Module, batch: Optional[AdapterBatch] = None, **kwargs: Any) -> None:
        self.base_layer = base_layer
        self.r: dict[str, int] = {}
        self.sigma_type: dict[str, str] = {}
        self.jd_U = nn.ParameterDict({})
        self.jd_V = nn.ParameterDict({})
        self.jd_sigma = nn.ParameterDict({})
        self.jd_cluster = BufferDict({}, persistent=False)
        self.jd_batch = batch if batch is not None else AdapterBatch()
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
        init_weights: bool = True,
    ) -> None:
        """Create the factors of `adapter_name` (their values are replaced when a bundle is loaded).

        Fresh factors start with an orthonormal random basis and Σ = 0, so a new bundle leaves the model unchanged
        until Σ is trained or set (like LoRA's B = 0).
        """
        num_adapters = len(adapter_cluster)
        if num_adapters == 0:
            raise ValueError(f"bundle {adapter_name!r} has no adapters: JDLoraConfig.adapter_names is empty.")
        self.r[adapter_name] = r
        self.sigma_type[adapter_name] = sigma_type
        if init_weights:  # one batched QR for all clusters: a bundle of singleton clusters has thousands
            U = torch.linalg.qr(torch.randn(num_clusters, self.out_features, r))[0]  # [C, d_out, r]
            V = torch.linalg.qr(torch.randn(num_clusters, self.in_features, r))[0].transpose(1, 2)  # [C, r, d_in]
        else:
            U = torch.zeros(num_clusters, self.out_features, r)
            V = torch.zeros(num_clusters, r, self.in_features)
        sigma_shape = (num_adapters, r, r) if sigma_type == "full" else (num_adapters, r)
        self.jd_U[adapter_name] = nn.Parameter(U)
        self.jd_V[adapter_name] = nn.Parameter(V.contiguous())
        self.jd_sigma[adapter_name] = nn.Parameter(torch.zeros(sigma_shape))
        self.jd_cluster[adapter_name] = torch.tensor(adapter_cluster, dtype=torch.int64)
        self._move_adapter_to_device_of_base_layer(adapter_name)
        self.set_adapter(self.active_adapters)

    def _factors(self, adapter_name: str, dtype: Optional[torch.dtype] = None) -> tuple[torch.Tensor, ...]:
        U, V, sigma = self.jd_U[adapter_name], self.jd_V[adapter_name], self.jd_sigma[adapter_name]
        if dtype is not None:
            U, V, sigma = U.to(dtype), V.to(dtype), sigma.to(dtype)
        return U, V, sigma, self.jd_cluster[adapter_name].to(U.device)

    def get_delta_weight(self, adapter_name: str, slot: int) -> torch.Tensor:
        """Dense ΔW of adapter `slot` of bundle `adapter_name`, in the layout of the base weight."""
        weight = self.get_base_layer().weight
        U, V, sigma, cluster = self._factors(adapter_name)
        # fp16/bf16 matmuls are slow or missing on CPU; compute in fp32 there, as PEFT's LoRA does.
        compute_dtype = torch.float32 if weight.device.type == "cpu" else U.dtype
        c = int(cluster[slot])
        core = sigma[slot] if sigma.dim() == 3 else torch.diag(sigma[slot])
        delta = U[c].to(compute_dtype) @ core.to(compute_dtype) @ V[c].to(compute_dtype)  # [d_out, d_in]
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
        batch: AdapterBatch,
        fan_in_fan_out: bool = False,
        init_weights: bool = True,
        **kwargs: Any,
    ) -> None:
        super().__init__()
        JDLoraLayer.__init__(self, base_layer, batch=batch, fan_in_fan_out=fan_in_fan_out, **kwargs)
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, r, sigma_type, adapter_cluster, num_clusters, init_weights=init_weights)

    def merge(self, safe_merge: bool = False, adapter_names: Optional[list[str]] = None) -> None:
        """Add the bundle's default adapter (see `JDLoraModel.set_default_adapter`) into the base weight."""
        for adapter_name in check_adapters_to_merge(self, adapter_names):
            if adapter_name not in self.jd_U:
                continue
            slot = self.jd_batch.default_slots.get(adapter_name, -1)
            if slot < 0:
                raise ValueError(
                    f"bundle {adapter_name!r} has no adapter selected to merge: pass one with "
                    "merge_and_unload(adapter=...) / merge_adapter(adapter=...), or call set_default_adapter first."
                )
            base_layer = self.get_base_layer()
            delta = self.get_delta_weight(adapter_name, slot)
            if safe_merge:
                merged = base_layer.weight.data + delta
                if not torch.isfinite(merged).all():
                    raise ValueError(f"NaNs or infs in the merged weights of bundle {adapter_name!r}, adapter {slot}.")
                base_layer.weight.data = merged
            else:
                base_layer.weight.data += delta
            self.merged_adapters.append(adapter_name)
            self.merged_slots[adapter_name] = slot

    def unmerge(self) -> None:
        """Subtract every merged adapter from the base weight again."""
        while self.merged_adapters:
            adapter_name = self.merged_adapters.pop()
            slot = self.merged_slots.pop(adapter_name)
            self.get_base_layer().weight.data -= self.get_delta_weight(adapter_name, slot)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        result = self.base_layer(x, *args, **kwargs)
        if self.disable_adapters:
            return result
        if self.merged:
            if any(self.jd_batch.has_rows(name) for name in self.merged_adapters):
                raise RuntimeError(
                    "adapter_ids cannot be used while an adapter is merged into the base weights: call "
                    "unmerge_adapter() first."
                )
            return result
        for adapter_name in self.active_adapters:
            if adapter_name not in self.jd_U:
                continue
            token_slots = self.jd_batch.token_slots(adapter_name, x)
            if token_slots is None:
                continue
            U, V, sigma, cluster = self._factors(adapter_name)
            x_flat = self._cast_input_dtype(x, U.dtype).reshape(-1, self.in_features)  # [T, d_in]
            metadata = self.jd_batch.metadata(adapter_name, token_slots, cluster)
            delta = ops.jd_lora_delta(x_flat, token_slots, U, V, sigma, cluster, metadata=metadata)  # [T, d_out]
            result = result + delta.view(*result.shape[:-1], self.out_features).to(result.dtype)
        return result

    def __repr__(self) -> str:
        return "jdlora." + super().__repr__()
