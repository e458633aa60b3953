"""Reading real PEFT LoRA folders (written by PEFT itself): what is accepted, and what is refused with a reason."""

from __future__ import annotations

import math
import re
from datetime import datetime
from pathlib import Path

import pytest
import torch
from helpers import edit_adapter_config, tiny_gpt2, tiny_llama
from peft import IA3Config, LoraConfig, get_peft_model
from safetensors.torch import load_file, save_file
from transformers import LlamaConfig, LlamaForCausalLM

from peft_jdlora.compression import AdapterReadError, LoraAdapter, check_collection, compress, read_lora_adapter
from peft_jdlora.compression.sources import pattern_key


def save_lora(path: Path, model=None, seed: int = 0, safe_serialization: bool = True, **config):
    """Write a PEFT LoRA folder for `model` (tiny Llama by default) with nonzero B; return the PeftModel."""
    torch.manual_seed(seed)
    config.setdefault("r", 4)
    config.setdefault("lora_alpha", 8)
    config.setdefault("target_modules", ["q_proj", "v_proj"])
    peft_model = get_peft_model(
        model if model is not None else tiny_llama(), LoraConfig(init_lora_weights=False, **config)
    )
    peft_model.save_pretrained(str(path), safe_serialization=safe_serialization)
    return peft_model


def peft_delta_weights(peft_model) -> dict[str, torch.Tensor]:
    """{module path: ΔW [d_out, d_in]} as PEFT's own LoRA layers compute it (scaling included)."""
    out = {}
    for name, module in peft_model.base_model.model.named_modules():
        if hasattr(module, "lora_A") and "default" in getattr(module, "lora_A", {}):
            delta = module.get_delta_weight("default").detach().double()
            out[name] = delta.T if module.fan_in_fan_out else delta
    return out


def assert_matches_peft(adapter: LoraAdapter, peft_model) -> None:
    expected = peft_delta_weights(peft_model)
    assert sorted(adapter.modules) == sorted(expected)
    for module, delta in expected.items():
        torch.testing.assert_close(adapter.delta_weight(module), delta, atol=1e-6, rtol=1e-5)


# ------------------------------------------------------------------------------------------------ accepted


def test_plain_lora_equals_peft_delta_weights(tmp_path):
    peft_model = save_lora(tmp_path / "plain")
    adapter = read_lora_adapter(tmp_path / "plain")
    assert adapter.name == "plain" and adapter.dtype == torch.float32 and not adapter.fan_in_fan_out
    assert adapter.task_type is None and adapter.source["r"] == 4 and adapter.source["lora_alpha"] == 8
    assert adapter.source["source"] == str(tmp_path / "plain") and adapter.source["format"] == "safetensors"
    assert "model.layers.0.self_attn.q_proj" in adapter.modules
    assert_matches_peft(adapter, peft_model)
    named = read_lora_adapter(tmp_path / "plain", name="task", source={"source": "org/repo", "revision": "abc"})
    assert named.name == "task" and named.source["source"] == "org/repo" and named.source["revision"] == "abc"


def test_rslora_scaling(tmp_path):
    peft_model = save_lora(tmp_path / "rs", r=8, lora_alpha=4, use_rslora=True)
    adapter = read_lora_adapter(tmp_path / "rs")
    assert_matches_peft(adapter, peft_model)
    assert adapter.source["use_rslora"] is True
    plain = read_lora_adapter(tmp_path / "rs")  # same tensors, read as if alpha/r: differs by sqrt(r)
    _, b = plain.modules["model.layers.0.self_attn.q_proj"]
    raw_b = load_file(str(tmp_path / "rs" / "adapter_model.safetensors"))[
        "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"
    ]
    torch.testing.assert_close(b, raw_b * 4 / math.sqrt(8))


def test_rank_and_alpha_patterns_match_like_peft(tmp_path):
    peft_model = save_lora(
        tmp_path / "patterns",
        r=4,
        lora_alpha=8,
        target_modules=["q_proj", "v_proj", "o_proj"],
        rank_pattern={"model.layers.0.self_attn.q_proj": 8, r"layers\.1\.self_attn\.(v|o)_proj": 2},
        alpha_pattern={"v_proj": 16, "o_proj": 3},
    )
    adapter = read_lora_adapter(tmp_path / "patterns")
    shapes = adapter.shapes()
    assert shapes["model.layers.0.self_attn.q_proj"][2] == 8
    assert shapes["model.layers.1.self_attn.v_proj"][2] == 2 and shapes["model.layers.1.self_attn.o_proj"][2] == 2
    assert shapes["model.layers.0.self_attn.v_proj"][2] == 4
    assert_matches_peft(adapter, peft_model)


def test_pattern_key_mirrors_peft():
    from peft.utils.other import get_pattern_key

    keys = ["q_proj", r"layers\.1\..*v_proj", "model.layers.0.mlp.up_proj", "proj"]
    for module in [
        "model.layers.0.self_attn.q_proj",
        "model.layers.1.self_attn.v_proj",
        "model.layers.0.self_attn.v_proj",
        "model.layers.0.mlp.up_proj",
        "model.layers.0.mlp.gate_proj",
        "model.layers.0.self_attn.xq_proj",
    ]:
        ours = pattern_key(keys, module)
        assert (ours if ours is not None else module) == get_pattern_key(keys, module)


def test_bin_weights_equal_safetensors(tmp_path):
    peft_model = save_lora(tmp_path / "bin", safe_serialization=False)
    assert (tmp_path / "bin" / "adapter_model.bin").is_file()
    assert not (tmp_path / "bin" / "adapter_model.safetensors").exists()
    adapter = read_lora_adapter(tmp_path / "bin")
    assert adapter.source["format"] == "bin"
    assert_matches_peft(adapter, peft_model)


def test_pickled_bin_is_refused_by_weights_only(tmp_path):
    save_lora(tmp_path / "evil", safe_serialization=False)
    torch.save({"payload": datetime(2020, 1, 1)}, tmp_path / "evil" / "adapter_model.bin")
    with pytest.raises(AdapterReadError, match="weights_only=True"):
        read_lora_adapter(tmp_path / "evil")


def test_gpt2_conv1d_fan_in_fan_out(tmp_path):
    peft_model = save_lora(tmp_path / "gpt2", model=tiny_gpt2(), target_modules=["c_attn", "c_proj"])
    adapter = read_lora_adapter(tmp_path / "gpt2")
    assert adapter.fan_in_fan_out
    d_out, d_in, r = adapter.shapes()["transformer.h.0.attn.c_attn"]
    assert (d_out, d_in, r) == (144, 48, 4)
    assert_matches_peft(adapter, peft_model)


def test_bf16_adapter_records_its_dtype(tmp_path):
    peft_model = save_lora(tmp_path / "bf16", model=tiny_llama(dtype=torch.bfloat16))
    peft_model.to(torch.bfloat16)  # PEFT creates LoRA weights in fp32 even on a bf16 model: store them in bf16
    peft_model.save_pretrained(str(tmp_path / "bf16"))
    adapter = read_lora_adapter(tmp_path / "bf16")
    assert adapter.dtype == torch.bfloat16
    a, _ = adapter.modules["model.layers.0.self_attn.q_proj"]
    assert a.dtype == torch.float32  # computed in fp32; bf16 is the default storage dtype of a bundle
    for module, delta in peft_delta_weights(peft_model).items():
        torch.testing.assert_close(adapter.delta_weight(module), delta, atol=1e-2, rtol=1e-2)
    assert compress([adapter], rank=4, progress=False).modules["model.layers.0.self_attn.q_proj"].U.dtype == (
        torch.bfloat16
    )


def test_lazy_reading_equals_eager(tmp_path):
    save_lora(tmp_path / "lazy")
    eager = read_lora_adapter(tmp_path / "lazy")
    lazy = read_lora_adapter(tmp_path / "lazy", lazy=True)
    assert lazy.shapes() == eager.shapes() and len(lazy.modules) == len(eager.modules)
    for module in eager.modules:
        for x, y in zip(eager.modules[module], lazy.modules[module]):
            assert torch.equal(x, y)


def test_adapter_name_with_adapter_key_infix(tmp_path):
    """Some writers keep the adapter name in the keys (`lora_A.default.weight`); PEFT loads those too."""
    save_lora(tmp_path / "infix")
    path = tmp_path / "infix" / "adapter_model.safetensors"
    tensors = load_file(str(path))
    renamed = {k.replace(".lora_A.weight", ".lora_A.default.weight"): v for k, v in tensors.items()}
    save_file(renamed, str(path))
    adapter = read_lora_adapter(tmp_path / "infix")
    assert len(adapter.modules) == 4


# ------------------------------------------------------------------------------------------------ refused


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"use_dora": True}, "DoRA"),
        ({"lora_bias": True}, "bias"),
        ({"modules_to_save": ["lm_head"]}, "modules_to_save"),
        ({"target_modules": ["embed_tokens", "q_proj"]}, "embedding"),
    ],
)
def test_unrepresentable_llama_adapters_are_refused(tmp_path, config, message):
    save_lora(tmp_path / "bad", **config)
    with pytest.raises(AdapterReadError, match=message) as info:
        read_lora_adapter(tmp_path / "bad")
    assert "bad" in str(info.value)  # names the folder or file at fault


def test_dora_magnitude_tensor_is_refused_even_without_the_flag(tmp_path):
    save_lora(tmp_path / "dora", use_dora=True)
    edit_adapter_config(tmp_path / "dora", use_dora=False)
    with pytest.raises(AdapterReadError, match="lora_magnitude_vector"):
        read_lora_adapter(tmp_path / "dora")


def test_trained_base_biases_are_refused(tmp_path):
    save_lora(tmp_path / "bias", model=tiny_gpt2(), target_modules=["c_attn"], bias="all")
    with pytest.raises(AdapterReadError, match=r"trained bias.*bias='all'"):
        read_lora_adapter(tmp_path / "bias")


def test_modules_to_save_tensors_are_refused_even_without_the_config_entry(tmp_path):
    save_lora(tmp_path / "mts", modules_to_save=["lm_head"])
    edit_adapter_config(tmp_path / "mts", modules_to_save=None)
    with pytest.raises(AdapterReadError, match=re.escape("lm_head.weight")):
        read_lora_adapter(tmp_path / "mts")


def test_convolution_targets_are_refused(tmp_path):
    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 8, 3)
            self.proj = torch.nn.Linear(8, 8)

    save_lora(tmp_path / "conv", model=Net(), target_modules=["conv", "proj"])
    with pytest.raises(AdapterReadError, match="convolution"):
        read_lora_adapter(tmp_path / "conv")


def test_other_peft_types_are_refused(tmp_path):
    get_peft_model(tiny_llama(), IA3Config(target_modules=["k_proj", "down_proj"], feedforward_modules=["down_proj"]))
    model = get_peft_model(
        tiny_llama(), IA3Config(target_modules=["k_proj", "down_proj"], feedforward_modules=["down_proj"])
    )
    model.save_pretrained(str(tmp_path / "ia3"))
    with pytest.raises(AdapterReadError, match="peft_type is 'IA3'"):
        read_lora_adapter(tmp_path / "ia3")


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"init_lora_weights": "pissa"}, "modifies the base weights"),
        ({"init_lora_weights": "olora"}, "modifies the base weights"),
        ({"use_qalora": True}, "QALoRA"),
        ({"layer_replication": [[0, 2], [1, 2]]}, "layer_replication"),
        ({"target_parameters": ["mlp.experts.gate_up_proj"]}, "targets parameters"),
        ({"trainable_token_indices": [1, 2]}, "trainable_token_indices"),
        ({"alora_invocation_tokens": [5, 6]}, "alora_invocation_tokens"),
        ({"r": 8}, "does not match the weights"),
    ],
)
def test_config_cases_are_refused(tmp_path, changes, message):
    save_lora(tmp_path / "cfg")
    edit_adapter_config(tmp_path / "cfg", **changes)
    with pytest.raises(AdapterReadError, match=message):
        read_lora_adapter(tmp_path / "cfg")


def test_unreadable_folders(tmp_path):
    with pytest.raises(AdapterReadError, match="not a folder"):
        read_lora_adapter(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(AdapterReadError, match=r"holds no adapter_config\.json"):
        read_lora_adapter(tmp_path / "empty")
    save_lora(tmp_path / "broken")
    (tmp_path / "broken" / "adapter_config.json").write_text("{not json")
    with pytest.raises(AdapterReadError, match="not valid JSON"):
        read_lora_adapter(tmp_path / "broken")
    save_lora(tmp_path / "noweights")
    (tmp_path / "noweights" / "adapter_model.safetensors").unlink()
    with pytest.raises(AdapterReadError, match="holds neither"):
        read_lora_adapter(tmp_path / "noweights")
    save_lora(tmp_path / "half")
    path = tmp_path / "half" / "adapter_model.safetensors"
    tensors = load_file(str(path))
    save_file({k: v for k, v in tensors.items() if "layers.0.self_attn.q_proj.lora_B" not in k}, str(path))
    with pytest.raises(AdapterReadError, match=r"q_proj'? has no lora_B"):
        read_lora_adapter(tmp_path / "half")
    path.write_bytes(b"garbage")
    with pytest.raises(AdapterReadError, match="cannot be read"):
        read_lora_adapter(tmp_path / "half")


# ------------------------------------------------------------------------------------------------ collections


def test_collection_mismatches_are_refused(tmp_path):
    save_lora(tmp_path / "a")
    save_lora(tmp_path / "b", seed=1)
    a, b = read_lora_adapter(tmp_path / "a"), read_lora_adapter(tmp_path / "b")
    with pytest.raises(AdapterReadError, match="two adapters are named 'a'"):
        check_collection([a, read_lora_adapter(tmp_path / "b", name="a")])
    edit_adapter_config(tmp_path / "b", base_model_name_or_path="org/other-model")
    edit_adapter_config(tmp_path / "a", base_model_name_or_path="org/model")
    a, b = read_lora_adapter(tmp_path / "a"), read_lora_adapter(tmp_path / "b")
    with pytest.raises(AdapterReadError, match="different base models"):
        compress([a, b], progress=False)
    assert compress([a, b], rank=2, check_base_model=False, progress=False).config.num_adapters == 2

    wide = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=128,
            hidden_size=32,
            intermediate_size=48,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
        )
    )
    save_lora(tmp_path / "narrow", model=wide)
    with pytest.raises(AdapterReadError, match=r"64x64.*'a' but 32x32.*'narrow'"):
        check_collection([a, read_lora_adapter(tmp_path / "narrow")])
    save_lora(tmp_path / "gpt2", model=tiny_gpt2(), target_modules=["c_attn"])
    with pytest.raises(AdapterReadError, match="fan_in_fan_out"):
        check_collection([read_lora_adapter(tmp_path / "narrow"), read_lora_adapter(tmp_path / "gpt2")])


def test_mixed_ranks_and_module_subsets_compress_together(tmp_path):
    save_lora(tmp_path / "qv", r=4)
    save_lora(tmp_path / "qo", r=8, target_modules=["q_proj", "o_proj"], seed=1)
    save_lora(tmp_path / "mlp", r=2, target_modules=["up_proj"], seed=2)
    bundle = compress([tmp_path / "qv", tmp_path / "qo", tmp_path / "mlp"], rank=16, progress=False)
    assert bundle.config.adapter_names == ["qv", "qo", "mlp"]
    assert set(bundle.modules) == {
        f"model.layers.{i}.{m}"
        for i in range(2)
        for m in ("self_attn.q_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.up_proj")
    }
    per_adapter = bundle.report.per_adapter
    assert len(per_adapter["mlp"].modules) == 2 and len(per_adapter["qv"].modules) == 4
    assert bundle.report.overall.mean_error < 1e-6  # lossless up to fp32 rounding
    # Modules an adapter lacks are exact zeros for it.
    assert float(bundle.delta_weight("model.layers.0.mlp.up_proj", "qv").abs().max()) == 0.0
    assert bundle.config.rank_for("model.layers.0.mlp.up_proj") == 2  # capped at the module's total rank
