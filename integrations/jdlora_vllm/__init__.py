"""jdlora_vllm: serve JD-LoRA bundles in vLLM with every adapter of every bundle resident on the device.

Installed with `pip install "peft-jdlora[vllm]"`, vLLM loads it in every process through the
`vllm.general_plugins` entry point. It changes nothing until the engine's `additional_config` has a `jdlora` entry:

    vllm serve BASE --enable-lora --max-loras 64 \
        --additional-config '{"jdlora": {"bundles": ["org/jdlora-bundle", "./other-bundle"]}}'

Then a request names an adapter of a configured bundle with `LoRARequest("<adapter>", <id>, "<bundle>")`, or on the
OpenAI server with `"model": "<adapter>"`. See docs/vllm.md.
"""

from __future__ import annotations

from jdlora_hub import __version__  # the distribution's version, without importing torch in every vLLM process

from .registration import SUPPORTED_VLLM, check_vllm_version, register
from .settings import JDLoraVllmConfigError, JDVllmSettings

__all__ = ["SUPPORTED_VLLM", "JDLoraVllmConfigError", "JDVllmSettings", "__version__", "check_vllm_version", "register"]
