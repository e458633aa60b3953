"""`JDLoraModel`: the PEFT tuner that injects JD-LoRA layers and routes each row of a batch to its own adapter."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any, Optional, Union

import torch
from peft.tuners.tuners_utils import BaseTuner
from peft.utils import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING
from torch import nn
from transformers.pytorch_utils import Conv1D

from .batch import AdapterBatch, AdapterId, AdapterIds, check_batch_size, resolve_adapter_ids
from .bundle import FACTOR_NAMES
from .config import BundleFormatError, JDLoraConfig
from .layer import JDLoraLayer, Linear


class JDLoraModel(BaseTuner):
    """
    Serves a bundle of LoRA adapters compressed into a shared basis per module (see `JDLoraConfig`).

    Each row of a batch picks its adapter with `adapter_ids` (names, indices, or None / -1 for the base model):

        model = PeftModel.from_pretrained(base, "org/jdlora-bundle")
        model.generate(**batch, adapter_ids=["task_a", 3, None])

    Rows given no id use the bundle's default adapter (`set_default_adapter`), which is the base model unless set.
    `merge_and_unload(adapter=...)` folds one adapter into the base weights for single-adapter deployment.
    """

    prefix: str = "jd_"
    tuner_layer_cls = JDLoraLayer
    target_module_mapping = TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING

    # ---------------------------------------------------------------- injection

    def _pre_injection_hook(self, model: nn.Module, config: JDLoraConfig, adapter_name: str) -> None:
        if "jd_batch" not in self.__dict__:
            self.jd_batch = AdapterBatch()

    def _create_and_replace(
        self,
        config: JDLoraConfig,
        adapter_name: str,
        target: nn.Module,
        target_name: str,
        parent: nn.Module,
        current_key: str,
        **optional_kwargs: Any,
    ) -> None:
        if current_key is None:
            raise ValueError("current_key must not be None")
        self.jd_batch.set_default(adapter_name, config.resolve_adapter(config.default_adapter))
        layer_args = {
            "r": config.rank_for(current_key),
            "sigma_type": config.sigma_for(current_key),
            "adapter_cluster": config.clusters_for(current_key),
            "num_clusters": config.num_clusters_for(current_key),
            "init_weights": config.init_weights,
        }
        if isinstance(target, JDLoraLayer):
            target.update_layer(adapter_name, **layer_args)
            return
        base_layer = target.get_base_layer() if hasattr(target, "get_base_layer") else target
        if not isinstance(base_layer, (nn.Linear, Conv1D)):
            raise TypeError(
                f"JD-LoRA can patch torch.nn.Linear and transformers Conv1D layers only; module {current_key!r} is "
                f"a {type(base_layer).__name__}."
            )
        new_module = Linear(
            target,
            adapter_name,
            batch=self.jd_batch,
            fan_in_fan_out=isinstance(base_layer, Conv1D) or config.fan_in_fan_out,
            **layer_args,
        )
        if adapter_name not in self.active_adapters:
            new_module.requires_grad_(False)
        self._replace_module(parent, target_name, new_module, target)

    def _prepare_adapter_config(self, peft_config: JDLoraConfig, model_config: dict) -> JDLoraConfig:
        if peft_config.target_modules is None:
            model_type = model_config.get("model_type")
            if model_type not in self.target_module_mapping:
                raise ValueError(
                    f"Please specify target_modules in JDLoraConfig: no default for model type {model_type!r}."
                )
            peft_config.target_modules = sorted(self.target_module_mapping[model_type])
        return peft_config

    def _cast_adapter_dtype(self, adapter_name: str, autocast_adapter_dtype: bool = True) -> None:
        # PEFT upcasts fp16/bf16 adapter weights to fp32 for stable training. A bundle loaded for inference keeps the
        # dtype of the layer it patches instead: serving thousands of adapters is what the compact dtype is for.
        if self.peft_config[adapter_name].inference_mode:
            return
        super()._cast_adapter_dtype(adapter_name, autocast_adapter_dtype=autocast_adapter_dtype)

    @classmethod
    def _remap_adapter_state_dict_for_load(
        cls, model: nn.Module, config: JDLoraConfig, adapter_name: str, state_dict: dict[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        """Map checkpoint keys to the model's, and refuse a checkpoint that lacks tensors or has the wrong shapes
        (PEFT would only warn about missing keys and leave random factors in place)."""
        remapped = super()._remap_adapter_state_dict_for_load(model, config, adapter_name, state_dict)
        if not isinstance(config, JDLoraConfig):
            return remapped
        expected = {
            key: tensor
            for key, tensor in model.state_dict().items()
            if any(
                f".{name}.{adapter_name}" in key and key.endswith(f".{name}.{adapter_name}") for name in FACTOR_NAMES
            )
        }
        missing = sorted(key for key in expected if key not in remapped)
        if missing:
            raise BundleFormatError(
                f"the bundle's weights lack {len(missing)} tensors the config implies, e.g. "
                f"{_checkpoint_key(missing[0], adapter_name)!r}: adapter_model.safetensors does not match "
                "adapter_config.json."
            )
        for key, tensor in expected.items():
            if tuple(remapped[key].shape) != tuple(tensor.shape):
                raise BundleFormatError(
                    f"tensor {_checkpoint_key(key, adapter_name)!r} has shape {tuple(remapped[key].shape)} but the "
                    f"config and base model imply {tuple(tensor.shape)} (rank, cluster count, adapter count, or a "
                    "different base model)."
                )
        return remapped

    # ---------------------------------------------------------------- adapter selection

    def _bundle_name(self, bundle: Optional[str] = None) -> str:
        """The PEFT adapter name of the JD-LoRA bundle to act on (the active one unless named)."""
        if bundle is not None:
            if bundle not in self.peft_config:
                raise KeyError(f"no bundle named {bundle!r} is loaded; loaded: {sorted(self.peft_config)}.")
            return bundle
        active = [name for name in self.active_adapters if isinstance(self.peft_config.get(name), JDLoraConfig)]
        if len(active) != 1:
            raise ValueError(
                f"expected exactly one active JD-LoRA bundle, found {active}: pass bundle=... or call set_adapter()."
            )
        return active[0]

    def adapter_names(self, bundle: Optional[str] = None) -> list[str]:
        """Names of the adapters in a bundle, in bundle order."""
        return list(self.peft_config[self._bundle_name(bundle)].adapter_names)

    def set_default_adapter(self, adapter: AdapterId, bundle: Optional[str] = None) -> None:
        """Choose the adapter (name, index, or None for the base model) for rows given no adapter id."""
        name = self._bundle_name(bundle)
        config = self.peft_config[name]
        slot = config.resolve_adapter(adapter)
        config.default_adapter = None if slot < 0 else config.adapter_names[slot]
        self.jd_batch.set_default(name, slot)

    @contextlib.contextmanager
    def _enable_peft_forward_hooks(self, *args: Any, **kwargs: Any) -> Iterator[None]:
        adapter_ids = kwargs.get("adapter_ids")
        if adapter_ids is None:
            if "adapter_names" in kwargs and kwargs["adapter_names"] is not None:
                raise TypeError("JD-LoRA bundles select adapters per row with adapter_ids=..., not adapter_names=.")
            yield
            return
        with self.adapter_ids(adapter_ids, batch_kwargs=kwargs):
            yield

    def adapter_ids(
        self, adapter_ids: AdapterIds, bundle: Optional[str] = None, batch_kwargs: Optional[dict[str, Any]] = None
    ) -> contextlib.AbstractContextManager[None]:
        """Context in which each row of the model's input uses its own adapter (see `use_adapter_ids`)."""
        return use_adapter_ids(self.model, adapter_ids, bundle=self._bundle_name(bundle), batch_kwargs=batch_kwargs)

    # ---------------------------------------------------------------- merging

    def merge_adapter(
        self, adapter_names: Optional[list[str]] = None, safe_merge: bool = False, adapter: AdapterId = None
    ) -> None:
        """Merge one adapter of the bundle (`adapter`, or the default one) into the base weights."""
        if adapter is not None:
            self.set_default_adapter(adapter, bundle=adapter_names[0] if adapter_names else None)
        super().merge_adapter(adapter_names=adapter_names, safe_merge=safe_merge)

    def merge_and_unload(
        self,
        progressbar: bool = False,
        safe_merge: bool = False,
        adapter_names: Optional[list[str]] = None,
        adapter: AdapterId = None,
    ) -> nn.Module:
        """Fold one adapter of the bundle (`adapter`, or the default one) into the base model and drop the bundle."""
        if adapter is not None:
            self.set_default_adapter(adapter, bundle=adapter_names[0] if adapter_names else None)
        return super().merge_and_unload(progressbar=progressbar, safe_merge=safe_merge, adapter_names=adapter_names)

    def export_adapter(
        self, adapter: Union[str, int], output_dir: str, bundle: Optional[str] = None, overwrite: bool = False
    ) -> str:
        """Write one adapter as an ordinary PEFT LoRA folder (rank r per module) that `LoraConfig` loads."""
        from .bundle import bundle_from_model, export_lora

        name = self._bundle_name(bundle)
        return export_lora(bundle_from_model(self, name), adapter, output_dir, overwrite=overwrite)


@contextlib.contextmanager
def use_adapter_ids(
    model: nn.Module,
    adapter_ids: AdapterIds,
    bundle: Optional[str] = None,
    batch_kwargs: Optional[dict[str, Any]] = None,
) -> Iterator[None]:
    """Run `model` with one adapter per row, for code that calls a model holding a bundle directly, e.g. a
    transformers model that loaded the bundle with `model.load_adapter(path)`:

        with use_adapter_ids(model, ["task_a", None, 3]):
            logits = model(input_ids).logits

    `bundle` names the PEFT adapter (bundle) when several are loaded. Ids are checked (names, range, and the row
    count when `batch_kwargs` holds input_ids) before anything runs; the hooks are removed even if the call raises.
    """
    layers = [m for m in model.modules() if isinstance(m, JDLoraLayer)]
    if not layers:
        raise ValueError("the model holds no JD-LoRA layers: load a bundle first.")
    loaded = sorted({name for layer in layers for name in layer.jd_U})
    if bundle is None:
        if len(loaded) != 1:
            raise ValueError(f"several bundles are loaded ({loaded}): pass bundle=... to choose one.")
        bundle = loaded[0]
    if bundle not in loaded:
        raise KeyError(f"no bundle named {bundle!r} is loaded; loaded: {loaded}.")
    slots = resolve_adapter_ids(model.peft_config[bundle], adapter_ids)
    for key in ("input_ids", "inputs_embeds", "attention_mask"):
        value = (batch_kwargs or {}).get(key)
        if isinstance(value, torch.Tensor) and value.dim() > 1:
            check_batch_size(slots, value.shape[0], key)
            break
    if any(layer.merged for layer in layers):
        raise RuntimeError(
            "adapter_ids cannot be used while an adapter is merged into the base weights: call unmerge_adapter() first."
        )
    batches = {id(layer.jd_batch): layer.jd_batch for layer in layers}.values()
    hook = model.register_forward_pre_hook(_check_rows_hook(slots), with_kwargs=True)
    for batch in batches:
        batch.set_rows(bundle, slots)
    try:
        yield
    finally:
        for batch in batches:
            batch.clear()
        hook.remove()


def _checkpoint_key(model_key: str, adapter_name: str) -> str:
    return model_key.removesuffix(f".{adapter_name}")


def _check_rows_hook(slots: torch.Tensor):
    def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
        for key in ("input_ids", "inputs_embeds", "decoder_input_ids"):
            value = kwargs.get(key)
            if value is None and key == "input_ids" and args and isinstance(args[0], torch.Tensor):
                value = args[0]
            if isinstance(value, torch.Tensor) and value.dim() > 1:
                rows = value.shape[0]
                if rows % slots.numel():
                    raise ValueError(
                        f"adapter_ids has {slots.numel()} entries but {key} has {rows} rows: give one adapter id "
                        "per row."
                    )
                return

    return hook
