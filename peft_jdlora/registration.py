"""Registers the JDLORA peft type with PEFT (idempotent; done by `import peft_jdlora`)."""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator
from typing import Any

import torch

from .batch import batch_rows
from .config import JDLoraConfig
from .model import ROUTER_ATTR, JDLoraModel
from .peft_type import JDLORA

ADAPTER_IDS_ARG = "adapter_ids"
_WRAPPED = "_jdlora_wrapped"


def register() -> None:
    """Make PEFT (and transformers' PEFT integration) know JD-LoRA bundles. Safe to call any number of times."""
    from peft import mapping
    from peft.peft_model import PeftModel
    from transformers.generation.utils import GenerationMixin

    mapping.PEFT_TYPE_TO_CONFIG_MAPPING[JDLORA] = JDLoraConfig
    mapping.PEFT_TYPE_TO_TUNER_MAPPING[JDLORA] = JDLoraModel
    mapping.PEFT_TYPE_TO_PREFIX_MAPPING[JDLORA] = JDLoraModel.prefix
    _let_peft_model_accept_adapter_ids(PeftModel)
    _let_generate_expand_adapter_ids(GenerationMixin)


def _holds_bundle(peft_model: Any) -> bool:
    return any(getattr(c, "peft_type", None) == JDLORA for c in getattr(peft_model, "peft_config", {}).values())


def _let_peft_model_accept_adapter_ids(peft_model_cls: type) -> None:
    """PeftModel strips the names in its per-instance `special_peft_forward_args` before calling the base model;
    transformers' generate rejects unknown kwargs, so `adapter_ids` must be among them for models holding a bundle.
    Other models refuse `adapter_ids` instead of passing it on, where a model's `**kwargs` would swallow it."""
    if getattr(peft_model_cls.__init__, _WRAPPED, False):
        return
    original_init = peft_model_cls.__init__
    original_add_adapter = peft_model_cls.add_adapter
    original_hooks = peft_model_cls._enable_peft_forward_hooks

    def maybe_accept(self) -> None:
        if _holds_bundle(self):
            self.special_peft_forward_args.add(ADAPTER_IDS_ARG)

    @functools.wraps(original_init)
    def __init__(self, *args, **kwargs):
        original_init(self, *args, **kwargs)
        maybe_accept(self)

    @functools.wraps(original_add_adapter)
    def add_adapter(self, *args, **kwargs):
        result = original_add_adapter(self, *args, **kwargs)
        maybe_accept(self)
        return result

    @contextlib.contextmanager
    @functools.wraps(original_hooks)
    def _enable_peft_forward_hooks(self, *args, **kwargs) -> Iterator[None]:
        if kwargs.get(ADAPTER_IDS_ARG) is not None and not _holds_bundle(self):
            kinds = sorted({str(getattr(c, "peft_type", "?")) for c in self.peft_config.values()})
            raise TypeError(
                f"adapter_ids selects adapters of a JD-LoRA bundle, but this model holds {', '.join(kinds)} adapters "
                "and no bundle: for PEFT's own mixed batches pass adapter_names=[...] instead."
            )
        with original_hooks(self, *args, **kwargs):
            yield

    __init__._jdlora_wrapped = True
    peft_model_cls.__init__ = __init__
    peft_model_cls.add_adapter = add_adapter
    peft_model_cls._enable_peft_forward_hooks = _enable_peft_forward_hooks


def _let_generate_expand_adapter_ids(generation_mixin: type) -> None:
    """Inside a call with adapter ids, transformers' generate runs the model on k rows per input row (beams,
    num_return_sequences): tell the call's routing that k, taken from the generation config the same way generate
    does, after checking that the input has one row per id. Outside such calls, generate runs unchanged."""
    original_generate = generation_mixin.generate
    if getattr(original_generate, _WRAPPED, False):
        return

    @functools.wraps(original_generate)
    def generate(self, *args, **kwargs):
        router = self.__dict__.get(ROUTER_ATTR)
        call = router.current() if router is not None else None
        if call is None or call.row_slots is None or call.generating:
            return original_generate(self, *args, **kwargs)
        inputs = args[0] if args else kwargs.get("inputs")
        if isinstance(inputs, torch.Tensor) and inputs.dim() > 1:
            found = ("inputs", inputs.shape[0])
        else:
            found = batch_rows((), kwargs)
        if found is not None:
            call.check_rows(found[1], found[0])
        config_arg = kwargs.get("generation_config", args[1] if len(args) > 1 else None)
        gen_kwargs = {k: v for k, v in kwargs.items() if k not in ("generation_config", "inputs")}
        generation_config, _ = self._prepare_generation_config(config_arg, **gen_kwargs)
        expansion = max(generation_config.num_beams or 1, generation_config.num_return_sequences or 1)
        with router.routing(call.for_generation(expansion)):
            return original_generate(self, *args, **kwargs)

    generate._jdlora_wrapped = True
    generation_mixin.generate = generate
