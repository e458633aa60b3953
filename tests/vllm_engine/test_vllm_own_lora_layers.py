"""JD layers next to vLLM's own LoRA layers (--lora-target-modules naming modules no bundle patches): with an
ordinary LoRA in vLLM's last slot, bundle rows, the ordinary LoRA's rows and base rows all equal PEFT's.

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
