"""Registers the JDLORA peft type with PEFT (idempotent; done by `import peft_jdlora`)."""

from __future__ import annotations

import functools

from .config import JDLoraConfig
from .model import JDLoraModel
from .peft_type import JDLORA

ADAPTER_IDS_ARG = "adapter_ids"


def register() -> None:
    """Make PEFT (and transformers' PEFT integration) know JD-LoRA bundles. Safe to call any number of times."""
    from peft import mapping
    from peft.peft_model import PeftModel

    mapping.PEFT_TYPE_TO_CONFIG_MAPPING[JDLORA] = JDLoraConfig
    mapping.PEFT_TYPE_TO_TUNER_MAPPING[JDLORA] = JDLoraModel
    mapping.PEFT_TYPE_TO_PREFIX_MAPPING[JDLORA] = JDLoraModel.prefix
    _let_peft_model_accept_adapter_ids(PeftModel)


def _let_peft_model_accept_adapter_ids(peft_model_cls: type) -> None:
    """PeftModel strips the names in its per-instance `special_peft_forward_args` before calling the base model;
    transformers' generate rejects unknown kwargs, so `adapter_ids` must be among them for models holding a bundle.
    Only instances that hold a JD-LoRA bundle get the name, so other adapters keep rejecting a stray `adapter_ids`."""
    if getattr(peft_model_cls.__init__, "_jdlora_wrapped", False):
        return
    original_init = peft_model_cls.__init__
    original_add_adapter = peft_model_cls.add_adapter

    def maybe_accept(self) -> None:
        if any(getattr(c, "peft_type", None) == JDLORA for c in getattr(self, "peft_config", {}).values()):
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

    __init__._jdlora_wrapped = True
    peft_model_cls.__init__ = __init__
    peft_model_cls.add_adapter = add_adapter
