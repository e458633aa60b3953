"""Tiny models, bundles and LoRAs for the vLLM plugin tests (no downloads), and the PEFT references they are
checked against. vLLM's CPU attention needs head_dim in {32, 64, 80, ...}: the tiny Llama has 2 heads of 32."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from peft_jdlora import JDLoraConfig
from peft_jdlora.bundle import Bundle, ModuleFactors, save_bundle

ALL_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def tiny_llama_config(num_layers: int = 2) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=num_layers,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=32,
        max_position_embeddings=256,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=False,
    )


def save_tiny_llama(folder: Path, seed: int = 0) -> Path:
    torch.manual_seed(seed)
    model = LlamaForCausalLM(tiny_llama_config())
    model.generation_config.eos_token_id = None  # greedy references run to max_new_tokens, as ignore_eos does
    model.save_pretrained(folder)
    return folder


def module_shapes(model: torch.nn.Module, suffixes: tuple[str, ...]) -> dict[str, tuple[int, int]]:
    return {
        name: (m.out_features, m.in_features)
        for name, m in model.named_modules()
        if isinstance(m, torch.nn.Linear) and name.rpartition(".")[2] in suffixes
    }


def make_bundle(
    model: torch.nn.Module,
    suffixes: tuple[str, ...],
    names: list[str],
    r: int = 4,
    num_clusters: int = 1,
    rank_pattern: Optional[dict[str, int]] = None,
    sigma_pattern: Optional[dict[str, str]] = None,
    cluster_pattern: Optional[dict[str, list[int]]] = None,
    dtype: torch.dtype = torch.float32,
    scale: float = 0.6,
    seed: int = 0,
) -> Bundle:
    """A bundle with random orthonormal bases and Σ large enough to move greedy generations."""
    gen = torch.Generator().manual_seed(seed)
    shapes = module_shapes(model, suffixes)
    config = JDLoraConfig(
        target_modules=sorted(shapes),
        r=r,
        rank_pattern=rank_pattern or {},
        sigma_pattern=sigma_pattern or {},
        num_clusters=num_clusters,
        cluster_pattern=cluster_pattern or {},
        adapter_names=list(names),
        adapter_clusters=[i % num_clusters for i in range(len(names))],
        base_model_name_or_path="tiny-llama",
    )
    modules = {}
    for module, (d_out, d_in) in shapes.items():
        rank = config.rank_for(module)
        clusters = config.num_clusters_for(module)
        U = torch.linalg.qr(torch.randn(clusters, d_out, rank, generator=gen))[0]
        V = torch.linalg.qr(torch.randn(clusters, d_in, rank, generator=gen))[0].transpose(1, 2)
        full = config.sigma_for(module) == "full"
        sigma_shape = (len(names), rank, rank) if full else (len(names), rank)
        sigma = scale * torch.randn(sigma_shape, generator=gen)
        modules[module] = ModuleFactors(U.contiguous().to(dtype), V.contiguous().to(dtype), sigma.to(dtype))
    return Bundle(config=config, modules=modules)


def save_plain_lora(model: torch.nn.Module, folder: Path, suffixes: tuple[str, ...], r: int = 8, seed: int = 3) -> Path:
    """An ordinary PEFT LoRA with non-zero B (a freshly initialised LoRA would be the base model)."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    base = LlamaForCausalLM(model.config)
    base.load_state_dict(model.state_dict())
    peft_model = get_peft_model(base, LoraConfig(r=r, lora_alpha=2 * r, target_modules=list(suffixes)))
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, 0.3)
    peft_model.save_pretrained(folder)
    return folder


def save(bundle: Bundle, folder: Path) -> Path:
    save_bundle(bundle, folder)
    return folder


# ---------------------------------------------------------------------------- running and references


def vllm_generations(llm, prompts: list[list[int]], lora_requests: list, max_tokens: int) -> list[list[int]]:
    """Greedy token ids of each prompt through vLLM, with each prompt's own LoRARequest (None = base model)."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True, detokenize=False)
    outputs = llm.generate(
        [TokensPrompt(prompt_token_ids=p) for p in prompts], params, lora_request=lora_requests, use_tqdm=False
    )
    return [list(o.outputs[0].token_ids) for o in outputs]


_reference_models: dict[str, torch.nn.Module] = {}


def _reference_model(collection: dict, key: Optional[str], dtype: torch.dtype) -> torch.nn.Module:
    """The base model at `dtype`, or a PeftModel with the bundle / LoRA `collection[key]` (loaded once per test
    session)."""
    cache_key = f"{collection['base']}::{key}::{dtype}"
    if cache_key not in _reference_models:
        from peft import PeftModel

        import peft_jdlora  # noqa: F401  (registers JDLORA)

        base = LlamaForCausalLM.from_pretrained(collection["base"], dtype=dtype).eval()
        model = base if key is None else PeftModel.from_pretrained(base, str(collection[key])).eval()
        _reference_models[cache_key] = model
    return _reference_models[cache_key]


@torch.no_grad()
def reference_generations(
    collection: dict, prompts: list[list[int]], refs: list, max_tokens: int, dtype: torch.dtype = torch.float32
) -> list[list[int]]:
    """Greedy token ids from transformers + PEFT with the base model at `dtype`: refs[i] is None (base), ("lora",
    None) for the ordinary LoRA, or (bundle key, adapter name) for `PeftModel.from_pretrained(base, bundle)
    .generate(adapter_ids=[name])`."""
    out = []
    for prompt, ref in zip(prompts, refs):
        key, adapter = (None, None) if ref is None else ref
        model = _reference_model(collection, key, dtype)
        kwargs = {"adapter_ids": [adapter]} if adapter is not None else {}
        ids = model.generate(
            torch.tensor([prompt]), max_new_tokens=max_tokens, min_new_tokens=max_tokens, do_sample=False, **kwargs
        )
        out.append(ids[0, len(prompt) :].tolist())
    return out


def _summarize_worker(worker) -> dict:
    """Runs inside a vLLM worker (collective_rpc): what the JD layers hold."""
    from jdlora_vllm.layers import JDLinearMixin

    runner = worker.model_runner
    manager = runner.lora_manager._adapter_manager
    layers = [m for m in runner.get_model().modules() if isinstance(m, JDLinearMixin)]
    names = [b.name for b in manager.jd_catalog.bundles]
    sigma_rows = {}
    for layer in layers:
        for term in layer.jd_terms:
            sigma_rows[names[term.bundle]] = term.sigma.shape[0]
    stacks = [t for layer in layers for t in (*layer.lora_a_stacked, *layer.lora_b_stacked)]
    resident = sum(
        t.numel() * t.element_size()
        for layer in layers
        for term in layer.jd_terms
        for t in (term.U, term.V, term.sigma)
    )
    return {
        "jd_layers": len(layers),
        "sigma_rows": sigma_rows,
        "largest_per_slot_stack_storage": max(t.untyped_storage().nbytes() // t.element_size() for t in stacks),
        "resident_bundle_bytes": resident,
        "tp_rank": getattr(layers[0], "tp_rank", 0) if layers else 0,
    }


def engine_summary(llm) -> list[dict]:
    return llm.collective_rpc(_summarize_worker)


def lora_layer_kinds(worker) -> list[str]:
    """Runs inside a vLLM worker: the class names of the model's LoRA wrappers."""
    return sorted({type(m).__name__ for m in worker.model_runner.get_model().modules() if "LoRA" in type(m).__name__})


def save_word_tokenizer(folder: Path) -> Path:
    """A word-level tokenizer over the tiny vocabulary ("t0" ... "t255"), for the OpenAI server (which loads one)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"t{i}": i for i in range(tiny_llama_config().vocab_size)}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="t3"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.decoder = decoders.WordPiece(prefix="##")
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token="t1", eos_token="t2", pad_token="t0", unk_token="t3"
    )
    fast.save_pretrained(folder)
    return folder


def punica_token_slots(worker) -> list[int]:
    """Runs inside a vLLM worker: the per-token LoRA slots vLLM's own LoRA layers saw in the last step."""
    manager = worker.model_runner.lora_manager._adapter_manager
    return [int(i) for wrapper in manager.punica_wrapper_mapping.values() for i in wrapper.token_lora_indices.tolist()]


def tiny_engine(base_dir: Path, jdlora: Optional[dict], **overrides):
    """A vLLM engine for the tiny Llama on CPU: fp32, eager, small KV cache, no tokenizer, LoRA on, and the plugin's
    settings `jdlora` (None: no jdlora entry)."""
    from vllm import LLM

    args = dict(
        model=str(base_dir),
        skip_tokenizer_init=True,
        enforce_eager=True,
        kv_cache_memory_bytes=32 << 20,
        max_model_len=128,
        dtype="float32",
        enable_lora=True,
        max_loras=4,
        max_lora_rank=8,
        seed=0,
        additional_config={} if jdlora is None else {"jdlora": jdlora},
    )
    args.update(overrides)
    return LLM(**args)
