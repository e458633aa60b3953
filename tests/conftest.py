"""Shared fixtures: tiny models built from configs and hand-made bundles (no downloads)."""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # kernels run on CPU tensors in the interpreter
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

import peft_jdlora
from peft_jdlora.bundle import Bundle, ModuleFactors

torch.set_num_threads(1)  # tiny models: one thread is fastest, and CI shares 2 cores with the test runner


def tiny_llama(seed: int = 0, dtype: torch.dtype = torch.float32) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=128,
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
    config = GPT2Config(vocab_size=128, n_positions=64, n_embd=48, n_layer=2, n_head=4, pad_token_id=0)
    return GPT2LMHeadModel(config).eval()


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
    **config_kwargs,
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


@pytest.fixture
def llama():
    return tiny_llama()


@pytest.fixture
def gpt2():
    return tiny_gpt2()
