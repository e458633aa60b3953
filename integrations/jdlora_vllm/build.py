"""What the JD layers need while vLLM's LoRA manager wraps the model's layers: the bundles' tensors per module,
the step routing they will read, and a record of which bundle modules found a layer.

vLLM builds its wrappers through `from_layer(layer, max_loras, lora_config, packed_modules_list, model_config)`,
which names neither the module nor the manager, so the manager publishes this context for the duration of
`_create_lora_modules` and the JD layer classes read it (`current_build`).
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Callable, Iterator
from typing import Any, Optional

import torch

from peft_jdlora.bundle import Bundle, ModuleFactors

from .routing import StepRouting

_current: contextvars.ContextVar[Optional[LayerBuild]] = contextvars.ContextVar("jdlora_vllm_build", default=None)


def current_build() -> Optional[LayerBuild]:
    return _current.get()


class LayerBuild:
    """Bundles' factors keyed by the served model's module names (vLLM's names, after its weight mapper)."""

    def __init__(
        self,
        bundles: list[Bundle],
        sources: list[str],
        routing: StepRouting,
        plain_lora_slots: int,
        packed_modules_mapping: dict[str, list[str]],
        map_name: Callable[[str], Optional[str]],
    ) -> None:
        self.routing = routing
        self.plain_lora_slots = plain_lora_slots
        self.packed_modules_mapping = packed_modules_mapping
        self._sources = sources
        # module name in the served model -> [(bundle index, factors, cluster of each adapter [N])]
        self._factors: dict[str, list[tuple[int, ModuleFactors, torch.Tensor]]] = {}
        self._unmapped: list[tuple[str, str]] = []
        for index, bundle in enumerate(bundles):
            for module, factors in bundle.modules.items():
                served = map_name(module)
                if served is None:
                    self._unmapped.append((sources[index], module))
                    continue
                cluster = torch.tensor(bundle.config.clusters_for(module), dtype=torch.int64)
                self._factors.setdefault(served, []).append((index, factors, cluster))
        self._wrapped: set[str] = set()

    def source_of(self, bundle_index: int) -> str:
        return self._sources[bundle_index]

    def packed_modules(self, prefix: str) -> list[str]:
        return list(self.packed_modules_mapping.get(prefix.rpartition(".")[2], []))

    @staticmethod
    def slice_names(prefix: str, packed_modules: list[str]) -> list[str]:
        """Names of the modules a layer computes: `model.layers.0.self_attn.qkv_proj` with packed modules
        [q_proj, k_proj, v_proj] computes `model.layers.0.self_attn.q_proj`, `...k_proj`, `...v_proj`."""
        if not packed_modules:
            return [prefix]
        parent = prefix.rpartition(".")[0]
        return [f"{parent}.{name}" if parent else name for name in packed_modules]

    def patches_any(self, names: list[str]) -> bool:
        return any(name in self._factors for name in names)

    def factors_for(self, name: str) -> list[tuple[int, ModuleFactors, torch.Tensor]]:
        return self._factors.get(name, [])

    def mark_wrapped(self, name: str) -> None:
        self._wrapped.add(name)

    def unserved_modules(self) -> list[tuple[str, str]]:
        """(bundle source, module) of every bundle module that no JD layer computes."""
        missing = list(self._unmapped)
        for name, entries in sorted(self._factors.items()):
            if name not in self._wrapped:
                missing.extend((self._sources[index], name) for index, _, _ in entries)
        return missing


@contextlib.contextmanager
def building(build: LayerBuild) -> Iterator[LayerBuild]:
    token = _current.set(build)
    try:
        yield build
    finally:
        _current.reset(token)


def weights_mapper_name_map(model: Any) -> Callable[[str], Optional[str]]:
    """Map a bundle's (transformers) module name to the served model's, through the model's `hf_to_vllm_mapper`
    when it has one (multimodal wrappers rename prefixes); the identity otherwise."""
    mapper = getattr(model, "hf_to_vllm_mapper", None)
    if mapper is not None and hasattr(mapper, "get_rename_mapper"):
        mapper = mapper.get_rename_mapper()  # renames only: q_proj stays q_proj, packing is the layers' business
    if mapper is None or not hasattr(mapper, "_map_name"):
        return lambda name: name

    def map_name(name: str) -> Optional[str]:
        mapped = mapper._map_name(f"{name}.weight")
        return None if mapped is None else mapped.removesuffix(".weight")

    return map_name
