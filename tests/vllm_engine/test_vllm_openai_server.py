"""The OpenAI-compatible server, started as users start it and driven over HTTP by the `openai` client:
`"model": "<adapter>"` serves the bundle adapter (no VLLM_ALLOW_RUNTIME_LORA_UPDATING needed), `/v1/models` lists
every served name, `--lora-modules` LoRAs and base requests still work, and unknown names are a 404."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

import pytest

pytest.importorskip("vllm", reason="the vLLM plugin tests run in the vLLM virtual environment (scripts/test_vllm.sh)")

import openai
from jd_vllm_helpers import (
    make_bundle,
    reference_generations,
    save,
    save_plain_lora,
    save_tiny_llama,
    save_word_tokenizer,
)
from transformers import LlamaForCausalLM

STARTUP_SECONDS = 420


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("server")
    base_dir = save_word_tokenizer(save_tiny_llama(root / "base"))
    base = LlamaForCausalLM.from_pretrained(base_dir)
    collection = {
        "base": base_dir,
        "one": save(make_bundle(base, ("q_proj", "v_proj"), ["task_a", "task_b", "shared"], seed=11), root / "one"),
        "two": save(make_bundle(base, ("q_proj", "o_proj"), ["shared", "task_z"], seed=12), root / "two"),
        "lora": save_plain_lora(base, root / "lora", ("q_proj", "v_proj"), r=8),
    }
    port = _free_port()
    settings = {"jdlora": {"bundles": [str(collection["one"]), str(collection["two"])], "plain_lora_slots": 1}}
    command = [
        sys.executable, "-m", "vllm.entrypoints.openai.api_server",
        "--model", str(base_dir), "--served-model-name", "tiny",
        "--host", "127.0.0.1", "--port", str(port),
        "--dtype", "float32", "--enforce-eager", "--max-model-len", "128", "--kv-cache-memory-bytes", str(64 << 20),
        "--enable-lora", "--max-loras", "4", "--max-lora-rank", "8",
        "--lora-modules", f"plain={collection['lora']}",
        "--additional-config", json.dumps(settings),
    ]  # fmt: skip
    env = {**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "1"}
    env.pop("VLLM_ALLOW_RUNTIME_LORA_UPDATING", None)
    log = open(root / "server.log", "w")
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0, timeout=120)
    try:
        deadline = time.monotonic() + STARTUP_SECONDS
        while True:
            if process.poll() is not None:
                pytest.fail(f"the server exited ({process.returncode}):\n{(root / 'server.log').read_text()[-4000:]}")
            try:
                client.models.list()
                break
            except openai.APIConnectionError:
                if time.monotonic() > deadline:
                    pytest.fail(f"the server did not start:\n{(root / 'server.log').read_text()[-4000:]}")
                time.sleep(1)
        yield client, collection
    finally:
        process.terminate()
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
        log.close()


def _complete(client, model: str, prompt: list[int], max_tokens: int = 6) -> list[int]:
    response = client.completions.create(
        model=model,
        prompt=prompt,
        max_tokens=max_tokens,
        temperature=0.0,
        extra_body={"return_token_ids": True, "ignore_eos": True},
    )
    return list(response.choices[0].token_ids)


def test_models_lists_every_served_name(server):
    client, _ = server
    ids = {model.id for model in client.models.list().data}
    assert {"tiny", "plain", "task_a", "task_b", "task_z", "one/shared", "two/shared", "one/task_a"} <= ids
    assert "shared" not in ids  # in both bundles: served qualified only


def test_completions_by_adapter_name_match_peft(server):
    client, collection = server
    prompt = [1, 17, 23, 42, 99]
    cases = [
        ("task_a", ("one", "task_a")),
        ("one/task_b", ("one", "task_b")),
        ("two/shared", ("two", "shared")),
        ("one/shared", ("one", "shared")),
        ("task_z", ("two", "task_z")),
        ("plain", ("lora", None)),
        ("tiny", None),
    ]
    got = [_complete(client, model, prompt) for model, _ in cases]
    want = reference_generations(collection, [prompt] * len(cases), [ref for _, ref in cases], 6)
    assert got == want
    assert len({tuple(g) for g in got}) == len(cases)


def test_unknown_or_ambiguous_names_are_not_found(server):
    client, _ = server
    for model in ("task_q", "shared", "one/task_z"):
        with pytest.raises(openai.NotFoundError):
            _complete(client, model, [1, 5])
