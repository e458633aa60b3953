"""`JDLoraModel`: the PEFT tuner that injects JD-LoRA layers and routes each row of a batch to its own adapter."""

from __future__ import annotations

import contextlib
import functools
import math
import os
import warnings
from collections.abc import Iterator
from typing import Any, Optional, Union

import torch
from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer, _ExcludedModule, check_target_module_exists
from peft.utils import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING
from torch import nn
from transformers.pytorch_utils import Conv1D

from .batch import AdapterId, AdapterIds, AdapterRouter, CallRouting, batch_rows, check_call_rows, resolve_adapter_ids
from .bundle import FACTOR_NAMES, FLOAT_DTYPES, KEY_PREFIX
from .config import BundleFormatError, JDLoraConfig
from .layer import JDLoraLayer, Linear

# Attribute of the transformers model that holds its router: the generate wrapper (registration.py) and
# `use_adapter_ids` find the routing of a model through it.
ROUTER_ATTR = "_jdlora_router"


def router_of(model: nn.Module) -> AdapterRouter:
    """The model's router, created on first use together with the forward pre-hook that checks the row count of
    every call with adapter ids before anything runs (a no-op for other calls)."""
    router = model.__dict__.get(ROUTER_ATTR)
    if router is None:
        router = AdapterRouter()
        model.__dict__[ROUTER_ATTR] = router
        model.register_forward_pre_hook(functools.partial(check_call_rows, router), with_kwargs=True)
    return router


def _layer_dims(module: nn.Module) -> Optional[tuple[int, int]]:
    """(d_out, d_in) of a layer JD-LoRA can patch (nn.Linear, transformers' Conv1D), else None."""
    if isinstance(module, nn.Linear):
        return module.out_features, module.in_features
    if isinstance(module, Conv1D):
        return module.nf, module.weight.shape[0]
    return None


def available_memory(device: torch.device) -> Optional[int]:
    """Bytes free on `device` now (CPU: the kernel's MemAvailable; CUDA: the driver's free memory), None if unknown."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    if device.type != "cpu":
        return None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):  # not a POSIX system
        return None


def _remove_router(model: nn.Module) -> None:
    router = model.__dict__.pop(ROUTER_ATTR, None)
    for key, hook in list(model._forward_pre_hooks.items()):
        if isinstance(hook, functools.partial) and hook.func is check_call_rows and hook.args[0] is router:
            del model._forward_pre_hooks[key]
            model._forward_pre_hooks_with_kwargs.pop(key, None)


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
        self.jd_router = router_of(model)

    def _prepare_adapter_config(self, peft_config: JDLoraConfig, model_config: dict) -> JDLoraConfig:
        if peft_config.target_modules is None:
            model_type = model_config.get("model_type")
            if model_type not in self.target_module_mapping:
                raise ValueError(
                    f"Please specify target_modules in JDLoraConfig: no default for model type {model_type!r}."
                )
            peft_config.target_modules = sorted(self.target_module_mapping[model_type])
        if isinstance(peft_config, JDLoraConfig):
            self._check_base_model(peft_config, model_config)
            targeted = self._targeted_layers(peft_config)
            checked = getattr(peft_config, "_checked_shapes", None)
            if checked is not None:
                self._check_checkpoint_fits(peft_config, checked, targeted)
            self._check_factors_fit_in_memory(peft_config, targeted)
        return peft_config

    @staticmethod
    def _check_base_model(config: JDLoraConfig, model_config: dict) -> None:
        """Refuse a bundle made for another model type; warn when the base model's name differs."""
        model_type = model_config.get("model_type")
        if config.base_model_type and model_type and config.base_model_type != model_type:
            raise BundleFormatError(
                f"base_model_type: the bundle was made for a {config.base_model_type!r} model "
                f"({config.base_model_name_or_path or 'name not recorded'}) and this model is a {model_type!r} one: "
                "the shapes may agree, the weights do not. Load it onto the base model it was made for."
            )
        if config.base_model_type is None and model_type:
            config.base_model_type = model_type  # recorded in the config this model saves
        recorded, actual = config.base_model_name_or_path, model_config.get("_name_or_path")
        if recorded and actual and str(recorded) != str(actual):
            warnings.warn(
                f"the JD-LoRA bundle was made for base model {str(recorded)!r}; it is loaded onto {str(actual)!r} "
                f"(also a {model_type!r} model). Make sure it holds the same weights.",
                stacklevel=2,
            )

    def _targeted_layers(self, config: JDLoraConfig) -> dict[str, nn.Module]:
        """{module name: base layer} of the modules the config targets in this model ({} for "all-linear", which
        PEFT resolves later)."""
        if config.target_modules == "all-linear":
            return {}
        inside_tuner_layers = [name + "." for name, m in self.model.named_modules() if isinstance(m, BaseTunerLayer)]
        targeted = {}
        for name, module in self.model.named_modules():
            if not name or any(name.startswith(prefix) for prefix in inside_tuner_layers):
                continue
            match = check_target_module_exists(config, name)
            if match and not isinstance(match, _ExcludedModule):
                targeted[name] = module.get_base_layer() if isinstance(module, BaseTunerLayer) else module
        return targeted

    @staticmethod
    def _check_factors_fit_in_memory(config: JDLoraConfig, targeted: dict[str, nn.Module]) -> None:
        """Before any layer is allocated: the factors the config implies (float32, as `update_layer` creates them)
        must fit in the free memory of the device holding the base layers. A config loaded without its weights file
        (transformers' `load_adapter`) is checked this way only, so a lying rank or count is refused here, not by
        running out of memory."""
        needed, device = 0, None
        for name, module in targeted.items():
            dims = _layer_dims(module)
            if dims is None:
                continue
            shapes = config.factor_shapes(name, *dims)
            needed += 4 * sum(math.prod(shape) for shape in shapes.values())
            device = device or module.weight.device
        free = available_memory(device) if device is not None else None
        if free is not None and needed > free:
            raise BundleFormatError(
                f"the config implies {needed / 2**30:.1f} GiB of factors over {len(targeted)} modules (r "
                f"{config.r}, rank_pattern {len(config.rank_pattern or {})} entries, {config.num_adapters} adapters, "
                f"num_clusters {config.num_clusters}), more than the {free / 2**30:.1f} GiB free on {device}: a config "
                "that does not match its weights, or a bundle too large for this machine."
            )

    def _check_checkpoint_fits(
        self, config: JDLoraConfig, checked: dict[str, tuple[int, int]], targeted: dict[str, nn.Module]
    ) -> None:
        """Before any layer is allocated: the modules the config targets in this model and the modules the weights
        file holds must be the same, with the same shapes (`JDLoraConfig.from_pretrained` checked the file)."""
        if config.target_modules == "all-linear":
            return
        for name in sorted(set(checked) - set(targeted)):
            raise BundleFormatError(
                f"tensor {KEY_PREFIX}{name}.jd_U is for module {name!r}, which this base model does not have or the "
                "config does not target: a bundle made for another model?"
            )
        for name, module in sorted(targeted.items()):
            if name not in checked:
                raise BundleFormatError(
                    f"the config targets module {name!r} of this model but the bundle's weights hold no tensors for "
                    "it (adapter_model.safetensors does not match adapter_config.json)."
                )
            dims = _layer_dims(module)
            if dims is None:
                continue  # _create_and_replace refuses it with its own message
            if dims != checked[name]:
                raise BundleFormatError(
                    f"tensors {KEY_PREFIX}{name}.jd_U / jd_V are for a {checked[name][0]}x{checked[name][1]} layer; "
                    f"this model's {name!r} is {dims[0]}x{dims[1]}: a bundle made for another base model?"
                )

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
        self.jd_router.set_default(adapter_name, config.resolve_adapter(config.default_adapter))
        loading = getattr(config, "_checked_shapes", None) is not None  # values replaced right after: no random init
        layer_args = {
            "r": config.rank_for(current_key),
            "sigma_type": config.sigma_for(current_key),
            "adapter_cluster": config.clusters_for(current_key),
            "num_clusters": config.num_clusters_for(current_key),
            "init_weights": "zeros" if loading else config.init_weights,
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
            router=self.jd_router,
            fan_in_fan_out=isinstance(base_layer, Conv1D) or config.fan_in_fan_out,
            **layer_args,
        )
        if adapter_name not in self.active_adapters:
            new_module.requires_grad_(False)
        self._replace_module(parent, target_name, new_module, target)

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
        """Map checkpoint keys to the model's and check the values before they are copied in: every tensor the config
        implies, nothing else, floating point, the right shapes, finite (PEFT would only warn about missing keys,
        ignore extra ones and cast integers silently)."""
        remapped = super()._remap_adapter_state_dict_for_load(model, config, adapter_name, state_dict)
        if not isinstance(config, JDLoraConfig):
            return remapped
        expected = {
            key: tensor
            for key, tensor in model.state_dict().items()
            if any(key.endswith(f".{name}.{adapter_name}") for name in FACTOR_NAMES)
        }
        missing = sorted(key for key in expected if key not in remapped)
        if missing:
            raise BundleFormatError(
                f"the bundle's weights lack {len(missing)} tensors the config implies, e.g. "
                f"{_checkpoint_key(missing[0], adapter_name)!r}: adapter_model.safetensors does not match "
                "adapter_config.json."
            )
        unexpected = sorted(key for key in remapped if key not in expected)
        if unexpected:
            raise BundleFormatError(
                f"the bundle's weights hold {len(unexpected)} tensors this model has no place for, e.g. "
                f"{unexpected[0]!r} (untargeted modules, or not JD-LoRA factors)."
            )
        for key, tensor in expected.items():
            name, value = _checkpoint_key(key, adapter_name), remapped[key]
            if value.dtype not in FLOAT_DTYPES.values():
                raise BundleFormatError(f"tensor {name!r} has dtype {value.dtype}; bundle tensors are floating point.")
            if tuple(value.shape) != tuple(tensor.shape):
                raise BundleFormatError(
                    f"tensor {name!r} has shape {tuple(value.shape)} but the config and base model imply "
                    f"{tuple(tensor.shape)} (rank, cluster count, adapter count, or a different base model)."
                )
            if not torch.isfinite(value).all():
                raise BundleFormatError(f"tensor {name!r} holds NaN or inf values.")
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
        self.jd_router.set_default(name, slot)

    @contextlib.contextmanager
    def _enable_peft_forward_hooks(self, *args: Any, **kwargs: Any) -> Iterator[None]:
        """Entered by PeftModel's forward and generate: opens this call's routing (see `batch.py`)."""
        if kwargs.get("adapter_names") is not None:
            raise TypeError("JD-LoRA bundles select adapters per row with adapter_ids=..., not adapter_names=.")
        adapter_ids = kwargs.get("adapter_ids")
        if adapter_ids is None and self.jd_router.current() is not None:  # inside use_adapter_ids: its ids hold
            yield
            return
        if adapter_ids is None:
            active = [name for name in self.active_adapters if isinstance(self.peft_config.get(name), JDLoraConfig)]
            slot = self.jd_router.default_slots.get(active[0], -1) if len(active) == 1 else -1
            if slot < 0:  # base rows only, or several bundles active: each layer reads its bundle's default
                yield
                return
            call = CallRouting(active[0], None, slot)
        else:
            # The rows are checked by the model's pre-hook (every forward) and the generate wrapper, before they run.
            call = open_call(self.model, self.jd_router, self._bundle_name(), adapter_ids)
        with self.jd_router.routing(call):
            yield

    def adapter_ids(
        self, adapter_ids: AdapterIds, bundle: Optional[str] = None, batch_kwargs: Optional[dict[str, Any]] = None
    ) -> contextlib.AbstractContextManager[None]:
        """Context in which each row of the model's input uses its own adapter (see `use_adapter_ids`)."""
        return use_adapter_ids(self.model, adapter_ids, bundle=self._bundle_name(bundle), batch_kwargs=batch_kwargs)

    # ---------------------------------------------------------------- merging

    def _layers(self) -> Iterator[JDLoraLayer]:
        return (module for module in self.model.modules() if isinstance(module, JDLoraLayer))

    def merge_adapter(
        self, adapter_names: Optional[list[str]] = None, safe_merge: bool = False, adapter: AdapterId = None
    ) -> None:
        """Merge one adapter of the bundle into the base weights: `adapter` (name or index), or, when None, the
        bundle's default adapter. The default adapter (what rows given no id use) is left as it is; an adapter of
        the bundle merged before is replaced."""
        if adapter is None:
            super().merge_adapter(adapter_names=adapter_names, safe_merge=safe_merge)
            return
        if adapter_names is not None and len(adapter_names) != 1:
            raise ValueError(f"merge_adapter(adapter=...) merges an adapter of one bundle, not {adapter_names}.")
        bundle = self._bundle_name(adapter_names[0] if adapter_names else None)
        slot = self.peft_config[bundle].resolve_adapter(adapter)
        if slot < 0:
            raise ValueError("adapter None / -1 is the base model: there is nothing to merge.")
        self._check_merge_allowed()
        for layer in self._layers():
            if layer.merged_slots.get(bundle, slot) != slot:
                layer.unmerge()
            layer.merge(safe_merge=safe_merge, adapter_names=[bundle], slot=slot)

    def merge_and_unload(
        self,
        progressbar: bool = False,
        safe_merge: bool = False,
        adapter_names: Optional[list[str]] = None,
        adapter: AdapterId = None,
    ) -> nn.Module:
        """Fold one adapter of the bundle (`adapter`, or the default one) into the base model and drop the bundle."""
        if adapter is None:
            return super().merge_and_unload(progressbar=progressbar, safe_merge=safe_merge, adapter_names=adapter_names)
        self.merge_adapter(adapter_names=adapter_names, safe_merge=safe_merge, adapter=adapter)
        return self._unload_and_optionally_merge(merge=False, progressbar=progressbar)

    def _unload_and_optionally_merge(self, *args: Any, **kwargs: Any) -> nn.Module:
        model = super()._unload_and_optionally_merge(*args, **kwargs)
        _remove_router(model)  # no JD-LoRA layer is left: the returned model is the plain base model
        return model

    def delete_adapter(self, adapter_name: str) -> None:
        super().delete_adapter(adapter_name)
        self.jd_router.forget(adapter_name)

    def export_adapter(
        self, adapter: Union[str, int], output_dir: str, bundle: Optional[str] = None, overwrite: bool = False
    ) -> str:
        """Write one adapter as an ordinary PEFT LoRA folder (rank r per module) that `LoraConfig` loads."""
        from .bundle import bundle_from_model, export_lora

        name = self._bundle_name(bundle)
        return export_lora(bundle_from_model(self, name), adapter, output_dir, overwrite=overwrite)


def open_call(
    model: nn.Module,
    router: AdapterRouter,
    bundle: str,
    adapter_ids: AdapterIds,
    batch_kwargs: Optional[dict[str, Any]] = None,
) -> CallRouting:
    """The routing of one call with adapter ids, resolved and checked at entry: names, indices and, when
    `batch_kwargs` hold the batch (`use_adapter_ids(batch_kwargs=...)`), the row count."""
    config = model.peft_config[bundle]
    slots = resolve_adapter_ids(config, adapter_ids)  # [B]
    call = CallRouting(bundle, slots, router.default_slots.get(bundle, -1))
    found = batch_rows((), batch_kwargs or {})
    if found is not None:
        call.check_rows(found[1], found[0])
    replayed = getattr(router, "replays_routing_in_recompute", False)  # peft_jdlora.enable_activation_checkpointing
    checkpointing = getattr(model, "is_activation_checkpointing", False) and not replayed
    if torch.is_grad_enabled() and checkpointing and model.training:
        raise RuntimeError(
            "adapter_ids cannot be combined with gradient checkpointing in training: the layers recomputed during "
            "backward run after the call has ended and would not see its adapter ids. Enable checkpointing with "
            "peft_jdlora.enable_activation_checkpointing(model), which replays each call's ids in the recomputation, "
            "or train with one adapter per batch (set_default_adapter)."
        )
    return call


def _loaded_router(model: nn.Module) -> tuple[AdapterRouter, nn.Module]:
    """The router of a model holding a bundle (a transformers model, a PeftModel or a JDLoraModel) and the module
    that holds `peft_config`."""
    for candidate in (model, getattr(model, "base_model", None), getattr(model, "model", None)):
        if candidate is None:
            continue
        router = candidate.__dict__.get(ROUTER_ATTR) or candidate.__dict__.get("jd_router")
        if isinstance(router, AdapterRouter):
            return router, candidate
    raise ValueError("the model holds no JD-LoRA layers: load a bundle first.")


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
            tokens = model.generate(input_ids, num_beams=2)     # generate's beams map to their row's adapter

    Ids are checked (names, range, and the row count of every call inside, before it runs); the routing belongs to
    the calling thread or task, and ends with the block even if a call raises. `bundle` names the PEFT adapter
    (bundle) when several are loaded.
    """
    router, holder = _loaded_router(model)
    loaded = sorted(name for name, c in getattr(holder, "peft_config", {}).items() if isinstance(c, JDLoraConfig))
    if bundle is None:
        if len(loaded) != 1:
            raise ValueError(f"several bundles are loaded ({loaded}): pass bundle=... to choose one.")
        bundle = loaded[0]
    if bundle not in loaded:
        raise KeyError(f"no bundle named {bundle!r} is loaded; loaded: {loaded}.")
    _check_values_once(router, holder, bundle)
    call = open_call(holder, router, bundle, adapter_ids, batch_kwargs)
    with router.routing(call):
        yield


def _check_values_once(router: AdapterRouter, model: nn.Module, bundle: str) -> None:
    """transformers' `load_adapter` copies a bundle's tensors in with its own loader, past the checks of
    `JDLoraModel._remap_adapter_state_dict_for_load`: check the values once before the bundle serves a mixed batch."""
    if bundle in router.checked_bundles:
        return
    for name, module in model.named_modules():
        if isinstance(module, JDLoraLayer) and bundle in module.jd_U:
            for factor in FACTOR_NAMES:
                if not torch.isfinite(getattr(module, factor)[bundle]).all():
                    raise BundleFormatError(f"tensor {KEY_PREFIX}{name}.{factor} of bundle {bundle!r}: NaN or inf.")
    router.checked_bundles.add(bundle)


def _checkpoint_key(model_key: str, adapter_name: str) -> str:
    return model_key.removesuffix(f".{adapter_name}")
