"""The compression engine: a collection of PEFT LoRA adapters -> a JD-LoRA bundle ("Compress then Serve").

    from peft_jdlora.compression import CompressionSettings, compress, project, remove, evaluate, read_lora_adapter
    bundle = compress(["./lora_a", "./lora_b", ...], rank=32, sigma="full", clusters="auto", target_error=0.05)
    bundle = compress(folders, CompressionSettings(budget="16x"))     # a budget plan; settings as one object
    save_bundle(bundle, "bundle/")

Methods (docs/algorithms.md): per-adapter SVD, JD-Full, JD-Diag, clusters with one cluster per adapter, and
projection of new adapters into an existing bundle; all computed from the LoRA factors, batched over modules of the
same shape, on the GPU when there is one, and split over processes under torch.distributed.
"""

from .api import compress, evaluate, is_svd_bundle, project, remove
from .cost import bundle_floats, module_floats, parse_budget
from .engine import FactorSource, LoraFactorSource
from .settings import CompressionSettings, CompressionSettingsError
from .sources import AdapterReadError, LoraAdapter, check_collection, read_lora_adapter

__all__ = [
    "AdapterReadError",
    "CompressionSettings",
    "CompressionSettingsError",
    "FactorSource",
    "LoraAdapter",
    "LoraFactorSource",
    "bundle_floats",
    "check_collection",
    "compress",
    "evaluate",
    "is_svd_bundle",
    "module_floats",
    "parse_budget",
    "project",
    "read_lora_adapter",
    "remove",
]
