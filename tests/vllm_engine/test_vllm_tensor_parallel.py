"""tensor_parallel_size=2 (two CPU workers over gloo) gives the tokens of PEFT (and so of tensor_parallel_size=1):
U is sharded as vLLM shards lora_B (column-parallel qkv / gate_up, with the one KV head replicated on both ranks),
V as it shards lora_A (row-parallel o / down), Σ replicated; ordinary LoRAs in bundle-patched modules too."""

from __future__ import annotations

import pytest

pytest.importorskip("vllm", reason="the vLLM plugin tests run in the vLLM virtual environment (scripts/test_vllm.sh)")

from jd_vllm_helpers import (
    ALL_LINEAR,
    engine_summary,
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

NAMES = ["t0", "t1", "t2", "t3", "t4"]


def test_tensor_parallel_2_matches_peft(tmp_path, monkeypatch):
    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "1")
    monkeypatch.setenv("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")  # collective_rpc of a test function to the workers
    base_dir = save_tiny_llama(tmp_path / "base")
    base = LlamaForCausalLM.from_pretrained(base_dir)
    plan = make_bundle(
        base,
        ALL_LINEAR,
        NAMES,
        r=4,
        num_clusters=2,
        rank_pattern={"v_proj": 2, "down_proj": 3},
        sigma_pattern={"v_proj": "diag", "o_proj": "diag"},
        cluster_pattern={"model.layers.1.mlp.down_proj": list(range(len(NAMES)))},
        seed=7,
    )
    collection = {
        "base": base_dir,
        "plan": save(plan, tmp_path / "plan"),
        "lora": save_plain_lora(base, tmp_path / "lora", ("q_proj", "o_proj", "up_proj"), r=8),
    }
    llm = tiny_engine(
        base_dir,
        {"bundles": [str(collection["plan"])], "plain_lora_slots": 1},
        max_model_len=64,
        tensor_parallel_size=2,
        distributed_executor_backend="mp",
    )
    plan_dir = str(collection["plan"])
    rows = [
        (LoRARequest("t0", 1, plan_dir), ("plan", "t0")),
        (None, None),
        (LoRARequest("t3", 2, plan_dir), ("plan", "t3")),
        (LoRARequest("plain", 3, str(collection["lora"])), ("lora", None)),
        (LoRARequest("t4", 4, plan_dir), ("plan", "t4")),
        (LoRARequest("t1", 5, plan_dir), ("plan", "t1")),
    ]
    prompts = [[1, 7, 8, 9, 10], [1, 20, 21], [1, 30, 31, 32], [1, 40, 41, 42, 43], [1, 50], [1, 60, 61, 62]]
    got = vllm_generations(llm, prompts, [request for request, _ in rows], 6)
    assert got == reference_generations(collection, prompts, [ref for _, ref in rows], 6)
    summaries = engine_summary(llm)
    assert sorted(s["tp_rank"] for s in summaries) == [0, 1]
    # Each rank holds its shard of U and V: together a little more than one copy (the replicated KV head and Σ).
    assert summaries[0]["resident_bundle_bytes"] == summaries[1]["resident_bundle_bytes"]
