"""The front end's pieces without an engine: the OpenAI server's names for bundle adapters and the LoRA resolver
that answers them when runtime LoRA updating is on."""

from __future__ import annotations

import asyncio
import itertools
import json

import pytest

pytest.importorskip("vllm", reason="the vLLM plugin tests run in the vLLM virtual environment (scripts/test_vllm.sh)")

import jdlora_vllm
from jd_vllm_helpers import make_bundle, save, tiny_llama_config
from jdlora_vllm import frontend
from jdlora_vllm.catalog import BundleCatalog
from jdlora_vllm.settings import JDVllmSettings
from transformers import LlamaForCausalLM
from vllm.exceptions import VLLMValidationError
from vllm.lora.request import LoRARequest
from vllm.lora.resolver import LoRAResolverRegistry


@pytest.fixture
def state(tmp_path):
    model = LlamaForCausalLM(tiny_llama_config())
    one = save(make_bundle(model, ("q_proj",), ["a", "shared"]), tmp_path / "one")
    two = save(make_bundle(model, ("v_proj",), ["shared", "b"]), tmp_path / "two")
    settings = JDVllmSettings.from_additional_config({"jdlora": {"bundles": [str(one), str(two)]}})
    return frontend.FrontendState(settings, BundleCatalog.open(settings))


def test_register_is_idempotent():
    from vllm.lora import utils as lora_utils

    jdlora_vllm.register()
    jdlora_vllm.register()
    classes = lora_utils._all_lora_classes
    assert len(classes) == len(set(classes))
    assert classes[0].__name__.startswith("JD")
    assert "jdlora" in LoRAResolverRegistry.get_supported_resolvers()


def test_server_names_and_resolver(state, monkeypatch):
    ids = itertools.count(1)
    requests = state.served_requests(lambda: next(ids), "tiny")
    assert sorted(requests) == ["a", "b", "one/a", "one/shared", "two/b", "two/shared"]
    assert len({r.lora_int_id for r in requests.values()}) == len(requests)
    monkeypatch.setattr(frontend, "_server_catalog", state)
    resolver = LoRAResolverRegistry.get_resolver("jdlora")
    resolved = asyncio.run(resolver.resolve_lora("tiny", "two/shared"))
    assert resolved.lora_path == str(state.catalog.bundles[1].spec.source)
    assert asyncio.run(resolver.resolve_lora("tiny", "shared")) is None  # ambiguous: not this resolver's to guess
    assert asyncio.run(resolver.resolve_lora("tiny", "nope")) is None


def test_request_checks(state, tmp_path):
    one = str(state.catalog.bundles[0].spec.source)
    request = LoRARequest("shared", 7, one)
    state.check(request)
    assert request.lora_name == "one/shared"  # two bundles hold "shared": vLLM identifies adapters by name
    with pytest.raises(VLLMValidationError, match="lora_int_id 7 already names another adapter"):
        state.check(LoRARequest("a", 7, one))
    with pytest.raises(VLLMValidationError, match="no adapter named 'zz'"):
        state.check(LoRARequest("zz", 8, one))


def _lora_folder(folder, targets):
    """An ordinary LoRA as the front end reads it: only its adapter_config.json."""
    folder.mkdir()
    (folder / "adapter_config.json").write_text(json.dumps({"target_modules": targets}))
    return str(folder)


def test_ordinary_loras_packed_with_a_bundle_module_count_against_plain_lora_slots(tmp_path):
    """k_proj shares vLLM's qkv_proj layer with a bundle's q_proj, up_proj shares gate_up_proj with its gate_proj:
    their LoRAs take pool entries in those JD layers, so the front end counts them (the worker would otherwise
    fail the step); o_proj's layer is vLLM's own and needs none."""
    model = LlamaForCausalLM(tiny_llama_config())
    bundle = save(make_bundle(model, ("q_proj", "gate_proj"), ["a"]), tmp_path / "bundle")
    settings = JDVllmSettings.from_additional_config({"jdlora": {"bundles": [str(bundle)], "plain_lora_slots": 3}})
    packed = {"qkv_proj": ["q_proj", "k_proj", "v_proj"], "gate_up_proj": ["gate_proj", "up_proj"]}
    state = frontend.FrontendState(settings, BundleCatalog.open(settings), packed_modules_mapping=lambda: packed)
    for lora_id, targets in enumerate([["k_proj"], ["o_proj"], ["up_proj"], ["o_proj", "down_proj"], ["qkv_proj"]]):
        state.check(LoRARequest(f"lora{lora_id}", 10 + lora_id, _lora_folder(tmp_path / f"l{lora_id}", targets)))
    with pytest.raises(VLLMValidationError, match=r"'v_only' patches a layer that a JD-LoRA bundle patches"):
        state.check(LoRARequest("v_only", 20, _lora_folder(tmp_path / "v", ["v_proj"])))


def test_served_packed_modules_are_the_model_classes(tmp_path):
    from vllm.config import ModelConfig

    base = tmp_path / "base"
    LlamaForCausalLM(tiny_llama_config()).save_pretrained(base)
    config = type("VllmConfig", (), {"model_config": ModelConfig(model=str(base), skip_tokenizer_init=True)})()
    assert frontend.served_packed_modules(config) == {
        "qkv_proj": ["q_proj", "k_proj", "v_proj"],
        "gate_up_proj": ["gate_proj", "up_proj"],
    }
