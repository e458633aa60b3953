"""Bundles served by vLLM (CPU, fp32) give the same greedy tokens as `PeftModel.from_pretrained(base, bundle)
.generate(adapter_ids=...)`, for every row of a batch that mixes base rows, adapters of several bundles (a
multi-cluster plan with per-module ranks, diagonal Σ and singleton clusters; an fp16 bundle; a 1000-adapter
bundle), and an ordinary PEFT LoRA; a bf16 model serving a bf16 bundle gives PEFT's tokens at bf16; and bad
requests fail alone, with the adapter named."""

from __future__ import annotations

import random

import pytest

pytest.importorskip("vllm", reason="the vLLM plugin tests run in the vLLM virtual environment (scripts/test_vllm.sh)")

import torch
from jd_vllm_helpers import (
    ALL_LINEAR,
    engine_summary,
    lora_layer_kinds,
    make_bundle,
    punica_token_slots,
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

MAX_TOKENS = 8
PLAN_NAMES = ["task_a", "task_b", "task_c", "task_d", "shared", "task_f"]
HALF_NAMES = ["h0", "h1", "shared", "h3"]
BIG_ADAPTERS = 1000


@pytest.fixture(scope="module")
def collection(tmp_path_factory):
    root = tmp_path_factory.mktemp("collection")
    base_dir = save_tiny_llama(root / "base")
    base = LlamaForCausalLM.from_pretrained(base_dir)
    layers = [f"model.layers.{i}" for i in range(base.config.num_hidden_layers)]
    singleton = list(range(len(PLAN_NAMES)))
    # A budget plan's shapes: per-module ranks, diagonal Σ where per-adapter SVD won, singleton clusters.
    plan = make_bundle(
        base,
        ALL_LINEAR,
        PLAN_NAMES,
        r=4,
        num_clusters=3,
        rank_pattern={"k_proj": 2, "v_proj": 6, "o_proj": 3, "down_proj": 2},
        sigma_pattern={"k_proj": "diag", "v_proj": "diag", "down_proj": "diag"},
        cluster_pattern={
            **{f"{layer}.self_attn.v_proj": singleton for layer in layers},
            **{f"{layer}.mlp.down_proj": singleton for layer in layers},
            f"{layers[0]}.self_attn.o_proj": [0, 0, 1, 1, 0, 1],
        },
        seed=1,
    )
    half = make_bundle(
        base, ("q_proj", "v_proj", "gate_proj", "up_proj"), HALF_NAMES, r=4, num_clusters=2, dtype=torch.float16, seed=2
    )
    half_fp32 = make_bundle(
        base, ("q_proj", "v_proj", "gate_proj", "up_proj"), HALF_NAMES, r=4, num_clusters=2, dtype=torch.float16, seed=2
    )
    for factors in half_fp32.modules.values():  # the reference: the fp16 values served at the model's fp32
        factors.U, factors.V, factors.sigma = factors.U.float(), factors.V.float(), factors.sigma.float()
    bf16 = make_bundle(
        base, ("q_proj", "v_proj", "gate_proj", "up_proj"), HALF_NAMES, num_clusters=2, dtype=torch.bfloat16, seed=5
    )
    big_names = [f"user_{i:04d}" for i in range(BIG_ADAPTERS)]
    big = make_bundle(base, ("q_proj", "v_proj"), big_names, r=4, scale=0.8, seed=3)
    return {
        "base": base_dir,
        "plan": save(plan, root / "plan"),
        "half": save(half, root / "half"),
        "half_fp32": save(half_fp32, root / "half_fp32"),
        "bf16": save(bf16, root / "bf16"),
        "big": save(big, root / "big"),
        "lora": save_plain_lora(base, root / "lora", ("q_proj", "v_proj", "down_proj"), r=8),
        "lora2": save_plain_lora(base, root / "lora2", ("q_proj",), r=4, seed=5),
        "lm_head_lora": save_plain_lora(base, root / "lm_head_lora", ("q_proj", "lm_head"), r=4, seed=6),
        "big_names": big_names,
    }


@pytest.fixture(scope="module")
def llm(collection):
    engine = tiny_engine(
        collection["base"],
        {
            "bundles": [
                str(collection["plan"]),
                {"path": str(collection["half"]), "name": "half"},
                str(collection["big"]),
            ],
            "plain_lora_slots": 1,
        },
        max_cpu_loras=8,
        kv_cache_memory_bytes=64 << 20,
    )
    yield engine
    del engine


@pytest.fixture(scope="module")
def llm_bf16(collection):
    """A bf16 model serving a bf16 bundle, bundles only (plain_lora_slots=0)."""
    engine = tiny_engine(
        collection["base"], {"bundles": [str(collection["bf16"])], "plain_lora_slots": 0}, dtype="bfloat16"
    )
    yield engine
    del engine


def _prompts(count: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[1] + [rng.randrange(3, 256) for _ in range(rng.randrange(3, 12))] for _ in range(count)]


def test_mixed_batch_matches_peft_row_by_row(llm, collection):
    plan, half, lora = str(collection["plan"]), str(collection["half"]), str(collection["lora"])
    rows = [
        (None, None),
        (LoRARequest("task_a", 1, plan), ("plan", "task_a")),
        (LoRARequest("task_d", 2, plan), ("plan", "task_d")),
        (None, None),
        (LoRARequest("h1", 3, half), ("half_fp32", "h1")),
        (LoRARequest("plain", 4, lora), ("lora", None)),
        (LoRARequest("task_f", 5, plan), ("plan", "task_f")),
        (LoRARequest("half/h3", 6, half), ("half_fp32", "h3")),
        (LoRARequest("task_b", 1 + 100, plan), ("plan", "task_b")),
        (LoRARequest("plain", 4, lora), ("lora", None)),
    ]
    prompts = _prompts(len(rows), seed=0)
    got = vllm_generations(llm, prompts, [request for request, _ in rows], MAX_TOKENS)
    want = reference_generations(collection, prompts, [ref for _, ref in rows], MAX_TOKENS)
    assert got == want
    assert len({tuple(g) for g in got}) > 3  # the adapters move the generations apart


def test_more_distinct_adapters_than_max_loras_without_reloading(llm, collection):
    big, names = str(collection["big"]), collection["big_names"]
    picks = [0, 999, 17, 500, 3, 250, 998, 42, 777, 5, 123, 640]  # 12 distinct adapters with max_loras=4
    requests = [LoRARequest(names[i], 1000 + i, big) for i in picks] + [None, None]
    prompts = _prompts(len(requests), seed=1)
    got = vllm_generations(llm, prompts, requests, MAX_TOKENS)
    want = reference_generations(collection, prompts, [("big", names[i]) for i in picks] + [None, None], MAX_TOKENS)
    assert got == want
    # vLLM's own LoRA layers saw the bundle rows as base rows: no per-slot LoRA work for them.
    assert set(llm.collective_rpc(punica_token_slots)[0]) == {-1}
    # Without --lora-target-modules vLLM wraps only what the bundles patch (not lm_head or the embeddings).
    assert all(kind.startswith("JD") for kind in llm.collective_rpc(lora_layer_kinds)[0])
    summary = engine_summary(llm)[0]
    # Every adapter of every bundle is resident; JD layers hold no per-slot LoRA stacks (one-element stand-ins).
    assert summary["sigma_rows"] == {"plan": len(PLAN_NAMES), "half": len(HALF_NAMES), "big": BIG_ADAPTERS}
    assert summary["jd_layers"] == 4 * 2  # qkv, o, gate_up, down in each of the 2 layers
    assert summary["largest_per_slot_stack_storage"] == 1


def test_same_adapter_name_in_two_bundles(llm, collection):
    plan, half = str(collection["plan"]), str(collection["half"])
    requests = [LoRARequest("shared", 201, plan), LoRARequest("shared", 202, half)]
    prompts = _prompts(2, seed=2)
    got = vllm_generations(llm, prompts, requests, MAX_TOKENS)
    want = reference_generations(collection, prompts, [("plan", "shared"), ("half_fp32", "shared")], MAX_TOKENS)
    assert got == want
    assert got[0] != got[1]
    assert [r.lora_name for r in requests] == [f"{collection['plan'].name}/shared", "half/shared"]


def test_unknown_adapter_fails_that_request_only(llm, collection):
    with pytest.raises(VLLMValidationError, match=r"no adapter named 'task_zz'.*Similar names: \['task_"):
        vllm_generations(llm, _prompts(1, 3), [LoRARequest("task_zz", 301, str(collection["plan"]))], MAX_TOKENS)
    with pytest.raises(VLLMValidationError, match="no adapter named 'half/task_a'"):
        vllm_generations(llm, _prompts(1, 3), [LoRARequest("half/task_a", 302, str(collection["plan"]))], MAX_TOKENS)
    # the engine still serves
    got = vllm_generations(llm, _prompts(1, 3), [LoRARequest("task_c", 303, str(collection["plan"]))], MAX_TOKENS)
    assert got == reference_generations(collection, _prompts(1, 3), [("plan", "task_c")], MAX_TOKENS)


def test_one_id_for_two_adapters_is_refused(llm, collection):
    plan = str(collection["plan"])
    vllm_generations(llm, _prompts(1, 4), [LoRARequest("task_a", 401, plan)], 2)
    with pytest.raises(VLLMValidationError, match="lora_int_id 401 already names another adapter"):
        vllm_generations(llm, _prompts(1, 4), [LoRARequest("task_b", 401, plan)], 2)


def test_unconfigured_bundle_is_refused(llm, tmp_path, collection):
    other = save(make_bundle(LlamaForCausalLM.from_pretrained(collection["base"]), ("q_proj",), ["x"]), tmp_path / "b")
    with pytest.raises(VLLMValidationError, match="not among the configured bundles"):
        vllm_generations(llm, _prompts(1, 5), [LoRARequest("x", 501, str(other))], 2)


def test_ordinary_loras_beyond_plain_slots_are_refused(llm, collection):
    vllm_generations(llm, _prompts(1, 6), [LoRARequest("plain", 4, str(collection["lora"]))], 2)
    with pytest.raises(VLLMValidationError, match="plain_lora_slots=1"):
        vllm_generations(llm, _prompts(1, 6), [LoRARequest("plain2", 601, str(collection["lora2"]))], 2)


def test_ordinary_lora_on_a_module_no_bundle_patches_is_refused(llm, collection):
    with pytest.raises(VLLMValidationError, match=r"patches \['lm_head'\], but this engine wraps only the modules"):
        vllm_generations(llm, _prompts(1, 7), [LoRARequest("head", 701, str(collection["lm_head_lora"]))], 2)


def test_bf16_model_and_bundle_match_peft_at_bf16(llm_bf16, collection):
    bf16 = str(collection["bf16"])
    names = ["h0", None, "h1", "shared", "h3"]
    requests = [None if n is None else LoRARequest(n, 801 + i, bf16) for i, n in enumerate(names)]
    prompts = _prompts(len(names), seed=8)
    got = vllm_generations(llm_bf16, prompts, requests, MAX_TOKENS)
    refs = [None if n is None else ("bf16", n) for n in names]
    assert got == reference_generations(collection, prompts, refs, MAX_TOKENS, dtype=torch.bfloat16)
    assert len({tuple(g) for g in got}) > 3
