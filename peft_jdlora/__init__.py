"""peft-jdlora: serve thousands of LoRA adapters of one base model from a jointly compressed bundle.

`import peft_jdlora` registers the JDLORA peft type with PEFT, so that `PeftModel.from_pretrained(base, bundle)`
loads a bundle and `model.generate(..., adapter_ids=[...])` runs a batch in which every row uses its own adapter.
"""

from .batch import AdapterRouter, CallRouting, TokenSlots, resolve_adapter_ids
from .bundle import Bundle, ModuleFactors, export_lora, load_bundle, save_bundle
from .config import FORMAT_VERSION, BundleFormatError, JDLoraConfig
from .layer import JDLoraLayer, Linear
from .model import JDLoraModel, use_adapter_ids
from .peft_type import JDLORA, JDLoraPeftType
from .registration import register
from .training import (
    NonFiniteLossError,
    TrainableAdapter,
    TrainingSetupError,
    add_trainable_adapter,
    cluster_scores,
    enable_activation_checkpointing,
    save_trained_bundle,
)

__version__ = "0.1.0"

register()

__all__ = [
    "FORMAT_VERSION",
    "JDLORA",
    "AdapterRouter",
    "Bundle",
    "BundleFormatError",
    "CallRouting",
    "JDLoraConfig",
    "JDLoraLayer",
    "JDLoraModel",
    "JDLoraPeftType",
    "Linear",
    "ModuleFactors",
    "NonFiniteLossError",
    "TokenSlots",
    "TrainableAdapter",
    "TrainingSetupError",
    "add_trainable_adapter",
    "cluster_scores",
    "enable_activation_checkpointing",
    "export_lora",
    "load_bundle",
    "register",
    "resolve_adapter_ids",
    "save_bundle",
    "save_trained_bundle",
    "use_adapter_ids",
]
