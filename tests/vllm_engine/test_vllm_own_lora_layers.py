"""JD layers next to vLLM's own LoRA layers (--lora-target-modules naming modules no bundle patches): with an
ordinary LoRA in vLLM's last slot, bundle rows, the ordinary LoRA's rows and base rows all equal PEFT's, and an
ordinary LoRA that lands in a bundle's packed layer (k_proj in the qkv_proj a bundle's q_proj patches) counts
against plain_lora_slots at the front end.

vLLM 0.32's CPU LoRA ops read slot -1 (no LoRA) as the last slot; the plugin gives vLLM's own layers a zero slot
there (manager._add_zero_slot_for_no_lora_rows). Before it, the bundle and base rows of this batch got the ordinary
LoRA's o_proj / gate_up_proj / lm_head / embedding updates."""

from __future__ import annotations

import pytest

pytest.importorskip("vllm", reason="the vLLM plugin tests run in the vLLM virtual environment (scripts/test_vllm.sh)")

from jd_vllm_helpers import (
    lora_layer_kinds,
    make_bundle,
    reference_generations,
    save,
    save_plain_lora,
    save_tiny_llama,
    tiny_engine,
    vllm_generations,
)
from transformers import LlamaForCausalLM
from vllm.exceptions import VLLMValidationError
from vllm.lora.request import LoRARequest

MAX_TOKENS = 6
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "lm_head", "embed_tokens"]


@pytest.fixture(scope="module")
def collection(tmp_path_factory):
    root = tmp_path_factory.mktemp("own_layers")
    base_dir = save_tiny_llama(root / "base")
    base = LlamaForCausalLM.from_pretrained(base_dir)
    return {
        "base": base_dir,
        "bundle": save(make_bundle(base, ("q_proj", "v_proj"), ["a", "b"], seed=4), root / "bundle"),
        # q_proj in a JD layer's pool; o_proj, gate_proj, lm_head, embed_tokens in vLLM's own layers
        "lora": save_plain_lora(base, root / "lora", ("q_proj", "o_proj", "gate_proj", "lm_head", "embed_tokens")),
        "k_lora": save_plain_lora(base, root / "k_lora", ("k_proj",), r=4, seed=7),
        "up_lora": save_plain_lora(base, root / "up_lora", ("up_proj",), r=4, seed=8),
    }


@pytest.fixture(scope="module")
def llm(collection):
    engine = tiny_engine(
        collection["base"],
        {"bundles": [str(collection["bundle"])], "plain_lora_slots": 1},
        max_loras=2,
        lora_target_modules=TARGETS,
    )
    yield engine
    del engine


def _lora_in_slots(worker) -> list:
    """Runs inside a vLLM worker: the LoRA id in each of vLLM's slots."""
    return list(worker.model_runner.lora_manager._adapter_manager.lora_index_to_id)


def _prompts(count: int, seed: int) -> list[list[int]]:
    return [[1, 5 + i + seed, 9, 33 + 3 * i, 70] for i in range(count)]


def test_bundle_base_and_ordinary_rows_with_an_ordinary_lora_in_the_last_slot(llm, collection):
    bundle, lora = str(collection["bundle"]), str(collection["lora"])
    kinds = llm.collective_rpc(lora_layer_kinds)[0]
    assert "JDMergedQKVParallelLinearWithLoRA" in kinds and "RowParallelLinearWithLoRA" in kinds
    assert {"MergedColumnParallelLinearWithLoRA", "LogitsProcessorWithLoRA", "VocabParallelEmbeddingWithLoRA"} <= set(
        kinds
    )
    prompts = _prompts(3, seed=0)
    vllm_generations(llm, prompts[:1], [LoRARequest("a", 1, bundle)], 2)  # the bundle adapter takes slot 0
    rows = [
        (LoRARequest("a", 1, bundle), ("bundle", "a")),
        (LoRARequest("plain", 2, lora), ("lora", None)),
        (None, None),
    ]
    got = vllm_generations(llm, prompts, [request for request, _ in rows], MAX_TOKENS)
    assert llm.collective_rpc(_lora_in_slots)[0] == [1, 2]  # the ordinary LoRA in the last slot
    want = reference_generations(collection, prompts, [ref for _, ref in rows], MAX_TOKENS)
    assert got == want
    assert len({tuple(g) for g in got}) == len(got)


def test_lora_in_a_bundle_layer_beyond_plain_lora_slots_is_refused_at_the_front_end(llm, collection):
    lora, k_lora, up_lora = str(collection["lora"]), str(collection["k_lora"]), str(collection["up_lora"])
    prompts = _prompts(3, seed=1)
    # k_proj is packed with the bundle's q_proj into one JD layer: its pool entry is the one "plain" holds.
    with pytest.raises(VLLMValidationError, match=r"'k_only' patches a layer that a JD-LoRA bundle patches"):
        vllm_generations(llm, prompts[:2], [LoRARequest("plain", 2, lora), LoRARequest("k_only", 3, k_lora)], 2)
    # up_proj's gate_up_proj is one of vLLM's own layers (no bundle patches gate_proj): no pool entry needed.
    requests = [LoRARequest("up_only", 4, up_lora), None, LoRARequest("b", 5, str(collection["bundle"]))]
    got = vllm_generations(llm, prompts, requests, MAX_TOKENS)
    assert got == reference_generations(collection, prompts, [("up_lora", None), None, ("bundle", "b")], MAX_TOKENS)
