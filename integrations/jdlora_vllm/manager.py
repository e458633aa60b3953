"""vLLM's worker-side LoRA managers, taught that a `LoRARequest` may name an adapter of a configured bundle.

    JDWorkerLoRAManager       installed as vLLM's `LRUCacheWorkerLoRAManager`: a request whose path is a configured
                              bundle becomes a weightless `BundleAdapter`; any other request is loaded by vLLM as before
    JDLoRAModelManager        its `_manager_cls`: loads every configured bundle onto the device when vLLM wraps the
                              model's layers (before vLLM sizes the KV cache), points slots at bundle adapters or
                              ordinary-LoRA pool entries on activation, and builds the per-token routing once per step

Without a `jdlora` entry in `additional_config` both classes behave exactly as vLLM's own.
"""

from __future__ import annotations

import math
from typing import Any, Optional

from vllm import envs
from vllm.logger import init_logger
from vllm.lora.layers import (
    LogitsProcessorWithLoRA,
    LoRAMapping,
    VocabParallelEmbeddingWithLoRA,
)
from vllm.lora.layers.base_linear import BaseLinearLayerWithLoRA
from vllm.lora.lora_model import LoRAModel
from vllm.lora.model_manager import LRUCacheLoRAModelManager
from vllm.lora.request import LoRARequest
from vllm.lora.utils import get_adapter_absolute_path
from vllm.lora.worker_manager import LRUCacheWorkerLoRAManager

from .build import LayerBuild, building, weights_mapper_name_map
from .catalog import AdapterRef, BundleCatalog, is_bundle_folder
from .layers import JDLinearMixin
from .routing import StepRouting, token_slots_from_mapping
from .settings import JDLoraVllmConfigError, JDVllmSettings

logger = init_logger("vllm.jdlora")


class BundleAdapter(LoRAModel):
    """A vLLM adapter that holds no weights of its own: the slot it occupies computes adapter `ref.adapter` of
    configured bundle `ref.bundle`. `loras` is empty, except for the warm-up stand-ins vLLM creates for the modules
    no bundle patches."""

    def __init__(self, lora_model_id: int, ref: AdapterRef, loras: Optional[dict] = None, **kwargs: Any) -> None:
        super().__init__(lora_model_id, rank=1, loras=loras or {}, **kwargs)
        self.ref = ref

    def clone(self, lora_model_id: int) -> BundleAdapter:
        return BundleAdapter(lora_model_id, self.ref, loras=self.loras.copy())


def check_engine_supports_bundles(lora_config: Any) -> None:
    """Refuse, at engine start, the vLLM LoRA modes that JD layers do not implement (never fall back silently)."""
    if lora_config.fully_sharded_loras:
        raise JDLoraVllmConfigError(
            "fully_sharded_loras=True is not supported with JD-LoRA bundles (a full Σ mixes the rank coordinates that "
            "mode shards): start the engine without --fully-sharded-loras."
        )
    if envs.VLLM_LORA_ENABLE_DUAL_STREAM:
        raise JDLoraVllmConfigError(
            "VLLM_LORA_ENABLE_DUAL_STREAM=1 is not supported with JD-LoRA bundles: unset it to serve bundles."
        )


def check_base_model(catalog: BundleCatalog, hf_config: Any) -> None:
    """A bundle recorded for another model type is refused; shapes are checked per module by the JD layers."""
    served_type = getattr(hf_config, "model_type", None)
    for bundle in catalog.bundles:
        bundle_type = getattr(bundle.config, "base_model_type", None)
        if bundle_type and served_type and bundle_type != served_type:
            raise JDLoraVllmConfigError(
                f"bundle {bundle.spec.source!r} was made for a {bundle_type!r} model, but the served model is a "
                f"{served_type!r} model."
            )


def _cuda_graph_capture_sizes(vllm_config: Any) -> list[int]:
    """Token counts vLLM pads a step to when it replays a CUDA graph (none in eager mode)."""
    compilation = getattr(vllm_config, "compilation_config", None)
    if compilation is None or getattr(vllm_config.model_config, "enforce_eager", False):
        return []
    return sorted(compilation.cudagraph_capture_sizes or [])


class JDLoRAModelManager(LRUCacheLoRAModelManager):
    """`LRUCacheLoRAModelManager` that also serves the configured bundles (see the module docstring)."""

    def __init__(self, model: Any, *args: Any, vllm_config: Any = None, **kwargs: Any) -> None:
        self.jd_settings = JDVllmSettings.from_additional_config(getattr(vllm_config, "additional_config", None))
        self.jd_routing: Optional[StepRouting] = None
        self.jd_catalog: Optional[BundleCatalog] = None
        if self.jd_settings is not None:
            lora_config = kwargs["lora_config"]
            check_engine_supports_bundles(lora_config)
            self.jd_catalog = BundleCatalog.open(self.jd_settings)
            check_base_model(self.jd_catalog, vllm_config.model_config.hf_config)
            self._jd_bundles = [self.jd_catalog.load_factors(i) for i in range(len(self.jd_catalog.bundles))]
            self.jd_routing = StepRouting(
                num_bundles=len(self._jd_bundles),
                num_slots=lora_config.max_loras,
                pool_size=self.jd_settings.plain_lora_slots,
                max_tokens=math.ceil(kwargs["max_num_batched_tokens"] / 8) * 8,
                device=kwargs["device"],
                capture_sizes=_cuda_graph_capture_sizes(vllm_config),
            )
            self.jd_routing.slot_owner = self._lora_id_in_slot
        super().__init__(model, *args, vllm_config=vllm_config, **kwargs)
        if self.jd_settings is not None:
            del self._jd_bundles  # the layers hold what they need, on the device
            names = [b.name for b in self.jd_catalog.bundles]
            logger.info("jdlora: serving %d bundles %s with every adapter resident.", len(names), names)

    @property
    def serves_bundles(self) -> bool:
        return self.jd_routing is not None

    def _lora_id_in_slot(self, slot: int) -> Optional[int]:
        return self.lora_index_to_id[slot]

    # ------------------------------------------------------------------ wrapping the model

    def _create_lora_modules(self) -> None:
        if not self.serves_bundles:
            return super()._create_lora_modules()
        build = LayerBuild(
            bundles=self._jd_bundles,
            sources=[b.spec.source for b in self.jd_catalog.bundles],
            routing=self.jd_routing,
            plain_lora_slots=self.jd_settings.plain_lora_slots,
            packed_modules_mapping=self.packed_modules_mapping,
            map_name=weights_mapper_name_map(self.model),
        )
        with building(build):
            super()._create_lora_modules()
        self._jd_layers = frozenset(name for name, module in self.modules.items() if isinstance(module, JDLinearMixin))
        self._add_zero_slot_for_no_lora_rows()
        unserved = build.unserved_modules()
        if unserved:
            source, module = unserved[0]
            raise JDLoraVllmConfigError(
                f"bundle {source!r} patches {module!r}, which vLLM does not wrap for LoRA in this model "
                f"({len(unserved)} such modules; check --lora-target-modules, and that the bundle was made for this "
                "model). vLLM wraps: " + ", ".join(sorted(self.modules)[:6]) + (" ..." if len(self.modules) > 6 else "")
            )

    def _add_zero_slot_for_no_lora_rows(self) -> None:
        """Give vLLM's own LoRA layers one more slot than `max_loras`, never written: the slot that index -1 reads.

        vLLM 0.32's CPU LoRA ops (`vllm/lora/ops/torch_ops`, what `PunicaWrapperCPU` runs) gather
        `lora_*_stacked[token_lora_indices]` without skipping -1, the index of a token without LoRA, so such a token
        gets the LoRA in slot `max_loras - 1` (also after that LoRA left the slot: vLLM does not clear a freed slot).
        Base rows are such tokens, and so are bundle rows in these layers (`without_bundle_adapters`). With the
        extra slot, -1 reads zeros. Only there: vLLM's Triton kernels (CUDA, XPU) skip -1, and their stacks keep the
        shapes vLLM sized and captured.
        """
        from vllm.lora.punica_wrapper.punica_cpu import PunicaWrapperCPU

        if not any(isinstance(w, PunicaWrapperCPU) for w in self.punica_wrapper_mapping.values()):
            return
        own_layers = (BaseLinearLayerWithLoRA, VocabParallelEmbeddingWithLoRA, LogitsProcessorWithLoRA)
        for name, module in self.modules.items():
            # JD layers never read their stacks; fused-MoE LoRA layers run vLLM's Triton kernels, not these ops
            if name not in self._jd_layers and isinstance(module, own_layers):
                module.create_lora_weights(self.lora_slots + 1, self.lora_config, self.model.config)

    # ------------------------------------------------------------------ adapters

    def _create_merged_loras_inplace(self, lora_model: LoRAModel) -> None:
        if isinstance(lora_model, BundleAdapter) and not lora_model.loras:
            return  # weightless: nothing to pack (vLLM's packing reads the first LoRA's tensors)
        super()._create_merged_loras_inplace(lora_model)

    def create_dummy_lora(self, lora_id: int, rank: int, embedding_modules: Optional[dict] = None) -> LoRAModel:
        """Warm-up adapters: vLLM's zero LoRAs for the modules it wraps itself, and a real bundle adapter in the JD
        layers, so profiling and graph capture run the same code as serving."""
        dummy = super().create_dummy_lora(lora_id, rank, embedding_modules)
        if not self.serves_bundles:
            return dummy
        loras = {name: lora for name, lora in dummy.loras.items() if name not in self._jd_layers}
        first = self.jd_catalog.bundles[0]
        return BundleAdapter(lora_id, AdapterRef(0, (lora_id - 1) % first.num_adapters), loras=loras)

    def activate_adapter(self, lora_id: int) -> bool:
        if not self.serves_bundles or lora_id in self._active_adapters:
            return super().activate_adapter(lora_id)
        lora_model = self._registered_adapters.get(lora_id)
        if lora_model is None:
            return super().activate_adapter(lora_id)  # vLLM's own error for an adapter it never registered
        needs_pool = not isinstance(lora_model, BundleAdapter) and not self._jd_layers.isdisjoint(lora_model.loras)
        if needs_pool:
            self.jd_routing.pool.assign(lora_id)  # before vLLM writes the weights: set_lora reads the entry
        try:
            activated = super().activate_adapter(lora_id)
        except BaseException:
            self.jd_routing.pool.release(lora_id)
            raise
        slot = self.lora_index_to_id.index(lora_id)
        if isinstance(lora_model, BundleAdapter):
            self.jd_routing.point_slot_at_adapter(slot, lora_model.ref.bundle, lora_model.ref.adapter)
        elif needs_pool:
            self.jd_routing.point_slot_at_pool(slot, self.jd_routing.pool.entry_of(lora_id))
        else:
            self.jd_routing.clear_slot(slot)
        self._last_slot_layout = None  # the routing changed: rebuild the step's per-token indices
        return activated

    def _deactivate_adapter(self, lora_id: int) -> None:
        if self.serves_bundles and lora_id in self.lora_index_to_id:
            self.jd_routing.clear_slot(self.lora_index_to_id.index(lora_id))
            self.jd_routing.pool.release(lora_id)
            self._last_slot_layout = None
        super()._deactivate_adapter(lora_id)

    def remove_all_adapters(self) -> None:
        super().remove_all_adapters()
        if self.serves_bundles:
            self.jd_routing.clear()

    # ------------------------------------------------------------------ per step

    def _set_adapter_mapping(self, mapping: LoRAMapping) -> None:
        if not self.serves_bundles:
            return super()._set_adapter_mapping(mapping)
        self.jd_routing.set_token_slots(token_slots_from_mapping(mapping.index_mapping, self.lora_index_to_id))
        # vLLM's own LoRA layers (modules no bundle patches, embeddings, lm_head) see bundle-adapter tokens as base
        # tokens (-1; on CPU it reads the zero slot `_add_zero_slot_for_no_lora_rows` adds): those layers hold nothing
        # for them, and a step without other LoRA tokens then skips their per-slot LoRA ops in prefill.
        super()._set_adapter_mapping(without_bundle_adapters(mapping, self._bundle_adapter_ids()))

    def _bundle_adapter_ids(self) -> frozenset[int]:
        """vLLM ids of the adapters whose slot points at a bundle adapter."""
        bundle_slots = (self.jd_routing.slot_adapter >= 0).any(dim=0).tolist()  # [S]
        return frozenset(
            lora_id for lora_id, is_bundle in zip(self.lora_index_to_id, bundle_slots) if lora_id and is_bundle
        )


def without_bundle_adapters(mapping: LoRAMapping, bundle_ids: frozenset[int]) -> LoRAMapping:
    """`mapping` with the tokens and prompts of bundle adapters mapped to no LoRA (id 0)."""
    if not bundle_ids:
        return mapping
    return LoRAMapping(
        index_mapping=tuple(0 if i in bundle_ids else i for i in mapping.index_mapping),
        prompt_mapping=tuple(0 if i in bundle_ids else i for i in mapping.prompt_mapping),
        is_prefill=mapping.is_prefill,
        type=mapping.type,
    )


class JDWorkerLoRAManager(LRUCacheWorkerLoRAManager):
    """`LRUCacheWorkerLoRAManager` whose requests may name bundle adapters (see the module docstring)."""

    _manager_cls = JDLoRAModelManager

    def _load_adapter(self, lora_request: LoRARequest) -> LoRAModel:
        manager = self._adapter_manager
        if isinstance(manager, JDLoRAModelManager) and manager.serves_bundles:
            ref = manager.jd_catalog.lookup(lora_request.lora_name, lora_request.lora_path)
            if ref is not None:
                return BundleAdapter(lora_request.lora_int_id, ref)
            _refuse_unconfigured_bundle(lora_request, manager.jd_catalog)
        return super()._load_adapter(lora_request)


def _refuse_unconfigured_bundle(lora_request: LoRARequest, catalog: BundleCatalog) -> None:
    try:
        path = get_adapter_absolute_path(lora_request.lora_path)
    except Exception:  # vLLM's own loader reports paths it cannot find
        return
    if is_bundle_folder(path):
        configured = [b.spec.source for b in catalog.bundles]
        raise JDLoraVllmConfigError(
            f"LoRA request {lora_request.lora_name!r} points at the JD-LoRA bundle {lora_request.lora_path!r}, which "
            f"is not among the configured bundles {configured}: add it to additional_config['jdlora']['bundles']."
        )
