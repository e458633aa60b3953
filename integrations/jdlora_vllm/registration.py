"""`register()`: the `vllm.general_plugins` entry point. Idempotent and cheap: vLLM calls it once in every process
(front end, engine core, each tensor-parallel worker).

vLLM has no registry for LoRA layer types or LoRA managers, so the plugin installs itself where vLLM looks them up
at call time (private API, checked against the tested vLLM range):

    vllm.lora.utils._all_lora_classes                            JD layer classes first
    vllm.v1.worker.lora_model_runner_mixin.LRUCacheWorkerLoRAManager   JDWorkerLoRAManager
    vllm.v1.engine.input_processor.InputProcessor._validate_lora       also checks bundle requests
    vllm.entrypoints.openai.models.serving.OpenAIServingModels.init_static_loras   also serves bundle names
    vllm.lora.resolver.LoRAResolverRegistry                      the "jdlora" resolver
    vllm.engine.arg_utils.EngineArgs.create_engine_config        vLLM's LoRA wrappers limited to the bundles' modules
                                                                 when --lora-target-modules is not given
"""

from __future__ import annotations

import importlib

# vLLM minor versions whose LoRA internals this plugin was written and tested against (inclusive, exclusive).
SUPPORTED_VLLM = ((0, 32), (0, 34))
_registered = False


def check_vllm_version(version: str) -> None:
    """Raise a clear error for a vLLM outside the tested range (the hooks above are private API)."""
    try:
        major_minor = tuple(int(part) for part in version.split(".")[:2])
    except ValueError:
        major_minor = None
    low, high = SUPPORTED_VLLM
    if major_minor is None or not low <= major_minor < high:
        raise RuntimeError(
            f"jdlora_vllm supports vLLM >= {low[0]}.{low[1]}, < {high[0]}.{high[1]} (it hooks into vLLM's LoRA "
            f"internals, which change between versions), but vLLM {version} is installed. Install a supported vLLM "
            '(pip install "peft-jdlora[vllm]"), or keep vLLM from loading the plugin with VLLM_PLUGINS set to the '
            "plugins you want (without jdlora)."
        )


def register() -> None:
    """Install the plugin into this process's vLLM. Safe to call any number of times."""
    global _registered
    if _registered:
        return
    import vllm

    check_vllm_version(vllm.__version__)
    _install_layers()
    _install_worker_manager()
    _install_frontend()
    _registered = True


def _install_layers() -> None:
    from vllm.lora import utils as lora_utils

    from .layers import JD_LAYER_CLASSES

    current = tuple(cls for cls in lora_utils._all_lora_classes if cls not in JD_LAYER_CLASSES)
    lora_utils._all_lora_classes = JD_LAYER_CLASSES + current


def _install_worker_manager() -> None:
    from vllm.v1.worker import lora_model_runner_mixin

    from .manager import JDWorkerLoRAManager

    lora_model_runner_mixin.LRUCacheWorkerLoRAManager = JDWorkerLoRAManager


def _install_frontend() -> None:
    from vllm.engine.arg_utils import EngineArgs
    from vllm.lora.resolver import LoRAResolverRegistry
    from vllm.v1.engine.input_processor import InputProcessor

    from .frontend import (
        BundleAdapterResolver,
        create_engine_config_with_bundles,
        init_static_loras_with_bundles,
        validate_lora_with_bundles,
    )

    if not getattr(EngineArgs.create_engine_config, "_jdlora_wrapped", False):
        EngineArgs.create_engine_config = create_engine_config_with_bundles(EngineArgs.create_engine_config)
    if not getattr(InputProcessor._validate_lora, "_jdlora_wrapped", False):
        InputProcessor._validate_lora = validate_lora_with_bundles(InputProcessor._validate_lora)
    try:
        serving = importlib.import_module("vllm.entrypoints.openai.models.serving")
    except ImportError:  # a vLLM build without the OpenAI server
        serving = None
    if serving is not None:
        models = serving.OpenAIServingModels
        if not getattr(models.init_static_loras, "_jdlora_wrapped", False):
            models.init_static_loras = init_static_loras_with_bundles(models.init_static_loras)
    if "jdlora" not in LoRAResolverRegistry.get_supported_resolvers():
        LoRAResolverRegistry.register_resolver("jdlora", BundleAdapterResolver())
