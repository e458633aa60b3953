"""Helpers the tests share: tiny models built from configs, hand-made bundles, token batches, config edits, and the
loading of benchmark scripts. Imported explicitly (`from helpers import ...`); fixtures live in conftest.py."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

import peft_jdlora
from peft_jdlora.bundle import CONFIG_NAME, Bundle, ModuleFactors

ROOT = Path(__file__).resolve().parents[1]
VOCAB_SIZE = 128  # of the tiny models; token ids below 3 are pad / bos / eos


def tiny_llama(seed: int = 0, dtype: torch.dtype = torch.float32) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=VOCAB_SIZE,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    return LlamaForCausalLM(config).to(dtype).eval()


def tiny_gpt2(seed: int = 0) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=VOCAB_SIZE, n_positions=64, n_embd=48, n_layer=2, n_head=4, pad_token_id=0)
    return GPT2LMHeadModel(config).eval()


def token_ids(batch: int = 3, length: int = 5, seed: int = 0) -> torch.Tensor:
    """[batch, length] random token ids of the tiny models' vocabulary, none of them pad / bos / eos."""
    return torch.randint(3, VOCAB_SIZE, (batch, length), generator=torch.Generator().manual_seed(seed))


def target_modules_of(model: torch.nn.Module, suffixes: tuple[str, ...]) -> dict[str, tuple[int, int]]:
    """{module path: (d_out, d_in)} of the Linear / Conv1D modules whose name ends with one of `suffixes`."""
    from transformers.pytorch_utils import Conv1D

    out = {}
    for name, module in model.named_modules():
        if name.split(".")[-1] in suffixes:
            if isinstance(module, torch.nn.Linear):
                out[name] = (module.out_features, module.in_features)
            elif isinstance(module, Conv1D):
                out[name] = (module.nf, module.weight.shape[0])
    return out


def random_bundle(
    model: torch.nn.Module,
    num_adapters: int = 5,
    r: int = 4,
    sigma_type: str = "full",
    num_clusters: int = 1,
    suffixes: tuple[str, ...] = ("q_proj", "v_proj"),
    rank_pattern: dict[str, int] | None = None,
    seed: int = 0,
    scale: float = 0.5,
    **config_kwargs: Any,
) -> Bundle:
    """A bundle with random factors for `model` (values big enough to change the logits visibly)."""
    gen = torch.Generator().manual_seed(seed)
    shapes = target_modules_of(model, suffixes)
    names = [f"task_{i:02d}" for i in range(num_adapters)]
    clusters = [i % num_clusters for i in range(num_adapters)]
    config = peft_jdlora.JDLoraConfig(
        target_modules=sorted(shapes),
        r=r,
        rank_pattern=rank_pattern or {},
        sigma_type=sigma_type,
        num_clusters=num_clusters,
        adapter_names=names,
        adapter_clusters=clusters,
        base_model_name_or_path="tiny",
        fan_in_fan_out=any(not isinstance(m, torch.nn.Linear) for n, m in model.named_modules() if n in shapes),
        **config_kwargs,
    )
    modules = {}
    for name, (d_out, d_in) in shapes.items():
        rank = config.rank_for(name)
        U = torch.linalg.qr(torch.randn(num_clusters, d_out, rank, generator=gen))[0]
        V = torch.linalg.qr(torch.randn(num_clusters, d_in, rank, generator=gen))[0].transpose(1, 2)
        sigma_shape = (num_adapters, rank, rank) if sigma_type == "full" else (num_adapters, rank)
        sigma = scale * torch.randn(sigma_shape, generator=gen)
        modules[name] = ModuleFactors(U.contiguous(), V.contiguous(), sigma)
    return Bundle(config=config, modules=modules)


def edit_adapter_config(folder: Path, **changes: Any) -> None:
    """Overwrite fields of the adapter_config.json in `folder` (a PEFT adapter or a bundle)."""
    path = Path(folder) / CONFIG_NAME
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


def load_benchmark(name: str) -> ModuleType:
    """benchmarks/<name>.py as a module. benchmarks/ is not a package: the script is imported by path, with whatever it
    puts on sys.path (its own folder, for its sibling imports) and the sibling modules it imports taken away again
    afterwards, since benchmarks/kernels.py would hide Hugging Face's `kernels` library from later tests."""
    saved_path, saved_modules = list(sys.path), set(sys.modules)
    try:
        spec = importlib.util.spec_from_file_location(f"jdlora_bench_{name}", ROOT / "benchmarks" / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module  # dataclasses look their module up while the classes are made
        spec.loader.exec_module(module)
    finally:
        sys.path[:] = saved_path
        for added in set(sys.modules) - saved_modules:
            origin = getattr(sys.modules[added], "__file__", None) or ""
            if origin.startswith(str(ROOT / "benchmarks")):
                del sys.modules[added]
    return module
