"""The front end's pieces without an engine: the OpenAI server's names for bundle adapters and the LoRA resolver
that answers them when runtime LoRA updating is on."""

from __future__ import annotations

import asyncio
import itertools

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
