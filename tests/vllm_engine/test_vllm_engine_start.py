"""What the plugin refuses at engine start (a clear error naming the bundle, module or setting; never a silent
fallback to plain LoRA or a wrong answer), and what it leaves alone."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("vllm", reason="the vLLM plugin tests run in the vLLM virtual environment (scripts/test_vllm.sh)")

import torch
from jd_vllm_helpers import (
    lora_layer_kinds,
    make_bundle,
    save,
    save_tiny_llama,
    tiny_engine,
    tiny_llama_config,
    vllm_generations,
)
from transformers import LlamaForCausalLM


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("start")
    base_dir = save_tiny_llama(root / "base")
    base = LlamaForCausalLM.from_pretrained(base_dir)
    wide_config = tiny_llama_config()
    wide_config.hidden_size, wide_config.head_dim = 128, 64
    wide = LlamaForCausalLM(wide_config)
    return {
        "base": base_dir,
        "bundle": save(make_bundle(base, ("q_proj", "v_proj"), ["a", "b"]), root / "bundle"),
        "wide_bundle": save(make_bundle(wide, ("q_proj", "v_proj"), ["a"]), root / "wide_bundle"),
        "lm_head_bundle": _lm_head_bundle(base, root / "lm_head_bundle"),
        "qwen_bundle": _bundle_for_model_type(base, "qwen2", root / "qwen_bundle"),
    }


def _bundle_for_model_type(base, model_type, folder):
    bundle = make_bundle(base, ("q_proj", "v_proj"), ["a"])
    bundle.config.base_model_type = model_type  # same shapes, another architecture
    return save(bundle, folder)


def _lm_head_bundle(base, folder):
    bundle = make_bundle(base, ("q_proj",), ["a"])
    torch.manual_seed(0)
    bundle.modules["lm_head"] = type(next(iter(bundle.modules.values())))(
        torch.linalg.qr(torch.randn(1, 256, 2))[0],
        torch.linalg.qr(torch.randn(1, 64, 2))[0].transpose(1, 2),
        torch.ones(1, 2, 2),
    )
    bundle.config.target_modules = sorted(bundle.modules)
    bundle.config.rank_pattern = {"lm_head": 2}
    return save(bundle, folder)


def _start(models, jdlora, **engine_args):
    return tiny_engine(models["base"], jdlora, **{"max_loras": 2, "max_model_len": 64, **engine_args})


def _fails(models, jdlora, match, **engine_args):
    with pytest.raises(Exception) as info:
        _start(models, jdlora, **engine_args)
    text = "".join(str(e) for e in _chain(info.value))
    assert match in text, text


def _chain(error):
    while error is not None:
        yield error
        error = error.__cause__ or error.__context__


def test_bundle_of_another_model_shape(models):
    _fails(models, {"bundles": [str(models["wide_bundle"])]}, "the bundle was made for another base model")


def test_bundle_of_another_model_type(models):
    _fails(
        models,
        {"bundles": [str(models["qwen_bundle"])]},
        "was made for a 'qwen2' model, but the served model is a 'llama'",
    )


def test_fully_sharded_loras_is_refused(models):
    _fails(
        models,
        {"bundles": [str(models["bundle"])]},
        "fully_sharded_loras=True is not supported",
        fully_sharded_loras=True,
    )


def test_bundle_module_vllm_does_not_wrap(models):
    _fails(models, {"bundles": [str(models["lm_head_bundle"])]}, "patches 'lm_head', which vLLM does not wrap")


def test_bundle_module_outside_lora_target_modules(models):
    _fails(
        models,
        {"bundles": [str(models["bundle"])]},
        "which vLLM does not wrap for LoRA",
        lora_target_modules=["o_proj"],
    )


def test_bad_settings_name_the_key(models, tmp_path):
    _fails(models, {"bundles": [str(models["bundle"])], "plain_slots": 2}, "unknown keys ['plain_slots']")
    _fails(models, {"bundles": []}, "must be a non-empty list")
    _fails(models, {"bundles": [str(tmp_path / "missing")]}, "is neither a local folder nor a Hub repo id")
    (tmp_path / "not_a_bundle").mkdir()
    (tmp_path / "not_a_bundle" / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA"}))
    _fails(models, {"bundles": [str(tmp_path / "not_a_bundle")]}, "not a JD-LoRA bundle")


def test_dual_stream_is_refused(monkeypatch):
    # On CPU vLLM itself refuses dual streams before any LoRA manager exists, so the check is called directly.
    from types import SimpleNamespace

    from jdlora_vllm.manager import check_engine_supports_bundles
    from jdlora_vllm.settings import JDLoraVllmConfigError

    check_engine_supports_bundles(SimpleNamespace(fully_sharded_loras=False))
    monkeypatch.setenv("VLLM_LORA_ENABLE_DUAL_STREAM", "1")
    with pytest.raises(JDLoraVllmConfigError, match="VLLM_LORA_ENABLE_DUAL_STREAM=1 is not supported"):
        check_engine_supports_bundles(SimpleNamespace(fully_sharded_loras=False))


def test_without_jdlora_settings_vllm_is_unchanged(models):
    llm = _start(models, None)
    kinds = llm.collective_rpc(lora_layer_kinds)[0]
    assert "MergedQKVParallelLinearWithLoRA" in kinds
    assert not any(kind.startswith("JD") for kind in kinds), kinds
    assert len(vllm_generations(llm, [[1, 5, 6]], [None], 3)[0]) == 3
