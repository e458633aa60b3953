"""The JD layers' CUDA path (the Triton kernels, with the per-step kernel metadata the routing builds) inside a real
vLLM engine, run on the CPU through the Triton interpreter: greedy tokens equal PEFT's row by row, with the
ordinary-LoRA pool empty (plain_lora_slots=0, the bundles-only setting) and not.

The engine runs in a child process: the interpreter must be on before triton is imported (scripts/test_vllm.sh
turns it off for the engine tests, whose CPU path is the PyTorch one), and PEFT_JDLORA_BACKEND=triton makes the
layers take the kernels on CPU tensors, as "auto" does on CUDA. The PEFT references are computed here, on the
PyTorch backend."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("vllm", reason="the vLLM plugin tests run in the vLLM virtual environment (scripts/test_vllm.sh)")

from jd_vllm_helpers import (
    ALL_LINEAR,
    make_bundle,
    reference_generations,
    save,
    save_plain_lora,
    save_tiny_llama,
    tiny_engine,
    vllm_generations,
)

MAX_TOKENS = 6
NAMES = ["a", "b", "c", "d"]
POOL_SIZES = (0, 2)


def _step_kernel_tables(worker) -> dict:
    """Runs inside a vLLM worker: the backend the JD op takes on CPU tensors, and which cluster tables ("pool" or
    a bundle index) got Triton kernel metadata in the steps so far."""
    import torch
    from jdlora_vllm.routing import POOL

    from peft_jdlora import ops

    routing = worker.model_runner.lora_manager._adapter_manager.jd_routing
    tables = {"pool" if key[0] == POOL else str(key[0]) for key, _ in routing._kernel_metadata}
    return {"backend": ops.choose_backend(torch.device("cpu")), "tables": sorted(tables)}


def _serve(spec: dict) -> dict:
    """The child process: one engine per pool size, the same batch through each."""
    from vllm.lora.request import LoRARequest

    results = {}
    for pool in spec["pool_sizes"]:
        llm = tiny_engine(spec["base"], {"bundles": [spec["plan"]], "plain_lora_slots": pool})
        requests = [None if row is None else LoRARequest(*row) for row in spec["rows"]]
        if not pool:
            requests = requests[:-1]  # the ordinary LoRA needs a pool entry
        prompts = spec["prompts"][: len(requests)]
        results[str(pool)] = {
            "tokens": vllm_generations(llm, prompts, requests, spec["max_tokens"]),
            **llm.collective_rpc(_step_kernel_tables)[0],
        }
        del llm
    return results


@pytest.fixture(scope="module")
def collection(tmp_path_factory):
    from transformers import LlamaForCausalLM

    root = tmp_path_factory.mktemp("triton_path")
    base_dir = save_tiny_llama(root / "base")
    base = LlamaForCausalLM.from_pretrained(base_dir)
    layers = [f"model.layers.{i}" for i in range(base.config.num_hidden_layers)]
    plan = make_bundle(
        base,
        ALL_LINEAR,
        NAMES,
        r=4,
        num_clusters=2,
        rank_pattern={"k_proj": 2, "down_proj": 3},
        sigma_pattern={"down_proj": "diag", "up_proj": "diag"},
        cluster_pattern={f"{layer}.mlp.down_proj": [0, 1, 2, 3] for layer in layers},
        seed=1,
    )
    return {
        "base": base_dir,
        "plan": save(plan, root / "plan"),
        "lora": save_plain_lora(base, root / "lora", ("q_proj", "v_proj", "down_proj"), r=8),
    }


def test_triton_path_matches_peft_with_and_without_an_ordinary_lora_pool(collection):
    plan, lora = str(collection["plan"]), str(collection["lora"])
    rows = [None, ("a", 1, plan), ("d", 2, plan), ("b", 3, plan), ("plain", 4, lora)]  # the LoRA last
    refs = [None, ("plan", "a"), ("plan", "d"), ("plan", "b"), ("lora", None)]
    prompts = [[1, 5 + i, 9, 33 + 3 * i, 70] for i in range(len(rows))]
    spec = {
        "base": str(collection["base"]),
        "plan": plan,
        "rows": rows,
        "prompts": prompts,
        "max_tokens": MAX_TOKENS,
        "pool_sizes": list(POOL_SIZES),
    }
    env = {**os.environ, "TRITON_INTERPRET": "1", "PEFT_JDLORA_BACKEND": "triton"}
    child = subprocess.run(
        [sys.executable, __file__, json.dumps(spec)], env=env, capture_output=True, text=True, timeout=600
    )
    lines = [line for line in child.stdout.splitlines() if line.startswith("RESULT ")]
    assert child.returncode == 0 and lines, child.stderr[-4000:]
    results = json.loads(lines[-1].removeprefix("RESULT "))
    want = reference_generations(collection, prompts, refs, MAX_TOKENS)
    for pool in POOL_SIZES:
        got = results[str(pool)]
        assert got["backend"] == "triton"
        assert got["tables"] == (["0", "pool"] if pool else ["0"])  # no table, so no metadata, for an empty pool
        assert got["tokens"] == want[: len(got["tokens"])], f"plain_lora_slots={pool}"
    assert len({tuple(t) for t in want}) == len(want)  # every row's adapter moves its generation


if __name__ == "__main__":
    print("RESULT " + json.dumps(_serve(json.loads(sys.argv[1]))), flush=True)
