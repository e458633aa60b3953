"""The JDLORA tuner as PEFT users meet it: loading, saving, errors, merging, dtypes and training."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from helpers import random_bundle, tiny_llama, token_ids
from peft import AutoPeftModelForCausalLM, LoraConfig, PeftConfig, PeftModel, get_peft_model
from safetensors.torch import load_file, save_file

import peft_jdlora
from peft_jdlora import BundleFormatError, JDLoraConfig, JDLoraLayer, save_bundle
from peft_jdlora.bundle import load_bundle


def saved_bundle(tmp_path, **kwargs):
    bundle = random_bundle(tiny_llama(), **kwargs)
    path = tmp_path / "bundle"
    save_bundle(bundle, path)
    return bundle, path


def test_registration_is_idempotent_and_peft_knows_the_type(tmp_path):
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING

    peft_jdlora.register()
    peft_jdlora.register()
    assert PEFT_TYPE_TO_CONFIG_MAPPING["JDLORA"] is JDLoraConfig
    assert PEFT_TYPE_TO_TUNER_MAPPING[peft_jdlora.JDLORA] is peft_jdlora.JDLoraModel
    _, path = saved_bundle(tmp_path)
    config = PeftConfig.from_pretrained(path)
    assert isinstance(config, JDLoraConfig) and config.peft_type.value == "JDLORA"
    assert json.loads((path / "adapter_config.json").read_text())["peft_type"] == "JDLORA"


def test_bundle_loads_in_a_fresh_interpreter_without_importing_peft_jdlora(tmp_path):
    _, path = saved_bundle(tmp_path)
    code = (
        "import sys; from peft import PeftConfig; "
        f"c = PeftConfig.from_pretrained({str(path)!r}); print(type(c).__name__, 'peft_jdlora' in sys.modules)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["JDLoraConfig", "True"]


def test_save_and_reload_round_trip_is_exact(tmp_path):
    bundle, path = saved_bundle(tmp_path, num_clusters=2, rank_pattern={"v_proj": 3})
    model = PeftModel.from_pretrained(tiny_llama(), path)
    model.save_pretrained(tmp_path / "again")
    again = PeftModel.from_pretrained(tiny_llama(), tmp_path / "again")
    first, second = (
        load_file(path / "adapter_model.safetensors"),
        load_file(tmp_path / "again/adapter_model.safetensors"),
    )
    assert first.keys() == second.keys()
    for key in first:
        assert torch.equal(first[key], second[key]), key
    assert again.peft_config["default"].adapter_names == bundle.config.adapter_names
    assert again.peft_config["default"].rank_pattern == {"v_proj": 3}
    ids = ["task_04", None, 1]
    with torch.no_grad():
        torch.testing.assert_close(
            model(input_ids=token_ids(), adapter_ids=ids).logits,
            again(input_ids=token_ids(), adapter_ids=ids).logits,
            atol=0,
            rtol=0,
        )


def test_auto_peft_model_and_device_map(tmp_path):
    base_dir = tmp_path / "base"
    tiny_llama().save_pretrained(base_dir)
    bundle = random_bundle(tiny_llama(), num_adapters=3, task_type="CAUSAL_LM")
    bundle.config.base_model_name_or_path = str(base_dir)
    save_bundle(bundle, tmp_path / "bundle")
    auto = AutoPeftModelForCausalLM.from_pretrained(tmp_path / "bundle", device_map="cpu")
    plain = PeftModel.from_pretrained(tiny_llama(), tmp_path / "bundle")
    with torch.no_grad():
        torch.testing.assert_close(
            auto(input_ids=token_ids(), adapter_ids=[0, 1, 2]).logits,
            plain(input_ids=token_ids(), adapter_ids=[0, 1, 2]).logits,
            atol=1e-6,
            rtol=1e-6,
        )


def test_low_cpu_mem_usage_loading(tmp_path):
    _, path = saved_bundle(tmp_path)
    fast = PeftModel.from_pretrained(tiny_llama(), path, low_cpu_mem_usage=True)
    plain = PeftModel.from_pretrained(tiny_llama(), path)
    with torch.no_grad():
        torch.testing.assert_close(
            fast(input_ids=token_ids(), adapter_ids=[0, 1, 2]).logits,
            plain(input_ids=token_ids(), adapter_ids=[0, 1, 2]).logits,
            atol=0,
            rtol=0,
        )


@pytest.mark.parametrize(
    ("bad_ids", "error", "match"),
    [
        (["task_00", "nope", None], KeyError, r"adapter_ids\[1\].*'nope'"),
        ([0, 5, None], IndexError, r"adapter_ids\[1\].*index 5 is out of range.*5 adapters"),
        (torch.tensor([0, 7, 1]), IndexError, r"outside \[-1, 5\)"),
        (["task_00", None], ValueError, r"2 entries but input_ids has 3 rows"),
        ("task_00", TypeError, r"one adapter name, index or None per row"),
        ([0, 1.5, 2], TypeError, r"adapter_ids\[1\]"),
        (torch.tensor([0.0, 1.0, 2.0]), TypeError, r"1-D integer tensor"),
    ],
)
@pytest.mark.parametrize("call", ["forward", "generate"])
def test_bad_adapter_ids_fail_before_any_compute(tmp_path, bad_ids, error, match, call):
    _, path = saved_bundle(tmp_path)
    model = PeftModel.from_pretrained(tiny_llama(), path)
    calls = []
    model.get_base_model().model.embed_tokens.register_forward_hook(lambda *args: calls.append(1))
    with pytest.raises(error, match=match):
        if call == "forward":
            model(input_ids=token_ids(), adapter_ids=bad_ids)
        else:
            model.generate(input_ids=token_ids(), adapter_ids=bad_ids, max_new_tokens=2)
    assert calls == []


def test_hooks_are_removed_when_the_call_raises(tmp_path):
    _, path = saved_bundle(tmp_path)
    model = PeftModel.from_pretrained(tiny_llama(), path)
    transformer = model.get_base_model()
    hooks_before = len(transformer._forward_pre_hooks)
    out_of_vocab = torch.full((3, 4), 1000)
    with pytest.raises(IndexError):
        model(input_ids=out_of_vocab, adapter_ids=[0, 1, 2])
    assert len(transformer._forward_pre_hooks) == hooks_before
    assert model.base_model.jd_router.current() is None  # the failed call's routing ended with it
    with torch.no_grad():  # the next call without ids is the base model again, not the failed call's adapters
        torch.testing.assert_close(
            model(input_ids=token_ids()).logits, tiny_llama()(input_ids=token_ids()).logits, atol=0, rtol=0
        )


def test_rows_not_matching_an_expanded_batch_are_refused(tmp_path):
    _, path = saved_bundle(tmp_path)
    model = PeftModel.from_pretrained(tiny_llama(), path)
    with pytest.raises(ValueError, match="not a multiple"):
        with model.base_model.adapter_ids([0, 1]):
            model.get_base_model().model.layers[0].self_attn.q_proj(torch.randn(3, 4, 64))


def test_adapter_names_argument_is_refused_with_a_pointer_to_adapter_ids(tmp_path):
    _, path = saved_bundle(tmp_path)
    model = PeftModel.from_pretrained(tiny_llama(), path)
    with pytest.raises(TypeError, match="adapter_ids"):
        model(input_ids=token_ids(), adapter_names=["task_00"] * 3)


def test_adapter_ids_are_refused_by_models_without_a_bundle(tmp_path):
    model = get_peft_model(tiny_llama(), LoraConfig(target_modules=["q_proj"]))
    assert "adapter_ids" not in model.special_peft_forward_args


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        ({"format_version": 99}, "format version 99 is not supported"),
        ({"sigma_type": "tri"}, "sigma_type must be one of"),
        ({"adapter_clusters": [0, 0, 5, 0, 0]}, r"invalid cluster ids \[5\]"),
        ({"adapter_names": ["a", "a", "b", "c", "d"]}, r"repeated: \['a'\]"),
        ({"r": 6}, r"jd_U.*has shape .*6"),
    ],
)
def test_bad_config_is_a_clear_error(tmp_path, edit, match):
    _, path = saved_bundle(tmp_path)
    config_file = path / "adapter_config.json"
    config_file.write_text(json.dumps({**json.loads(config_file.read_text()), **edit}))
    with pytest.raises(BundleFormatError, match=match):
        PeftModel.from_pretrained(tiny_llama(), path)
    with pytest.raises(BundleFormatError, match=match):
        load_bundle(path)


def test_missing_tensors_are_a_clear_error(tmp_path):
    _, path = saved_bundle(tmp_path)
    weights = load_file(path / "adapter_model.safetensors")
    dropped = "base_model.model.model.layers.1.self_attn.v_proj.jd_sigma"
    del weights[dropped]
    save_file(weights, path / "adapter_model.safetensors")
    with pytest.raises(BundleFormatError, match=r"layers\.1\.self_attn\.v_proj\.jd_sigma"):
        PeftModel.from_pretrained(tiny_llama(), path)
    with pytest.raises(BundleFormatError, match=r"layers.1.self_attn.v_proj'.*lacks.*jd_sigma"):
        load_bundle(path)


def test_merge_and_unload_one_adapter(tmp_path):
    _, path = saved_bundle(tmp_path, num_clusters=2)
    model = PeftModel.from_pretrained(tiny_llama(), path)
    with torch.no_grad():
        expected = model(input_ids=token_ids(), adapter_ids=["task_03"] * 3).logits
        merged = model.merge_and_unload(adapter="task_03")
        assert not any(isinstance(m, JDLoraLayer) for m in merged.modules())
        torch.testing.assert_close(merged(input_ids=token_ids()).logits, expected, atol=1e-5, rtol=1e-5)


def test_merge_unmerge_restores_weights_and_blocks_mixed_batches(tmp_path):
    _, path = saved_bundle(tmp_path)
    model = PeftModel.from_pretrained(tiny_llama(), path)
    original = {k: v.clone() for k, v in model.get_base_model().state_dict().items() if "base_layer.weight" in k}
    with pytest.raises(ValueError, match="no adapter selected to merge"):
        model.merge_adapter()
    with torch.no_grad():
        expected = model(input_ids=token_ids(), adapter_ids=[2, 2, 2]).logits
        model.base_model.merge_adapter(adapter=2)
        torch.testing.assert_close(model(input_ids=token_ids()).logits, expected, atol=1e-5, rtol=1e-5)
        with pytest.raises(RuntimeError, match="unmerge"):
            model(input_ids=token_ids(), adapter_ids=[0, 1, 2])
        model.unmerge_adapter()
    restored = model.get_base_model().state_dict()
    for key, weight in original.items():
        torch.testing.assert_close(restored[key], weight, atol=1e-6, rtol=0)


def test_export_adapter_from_model_loads_in_peft_lora(tmp_path):
    _, path = saved_bundle(tmp_path, sigma_type="diag")
    model = PeftModel.from_pretrained(tiny_llama(), path)
    model.export_adapter("task_01", tmp_path / "lora")
    config = PeftConfig.from_pretrained(tmp_path / "lora")
    assert isinstance(config, LoraConfig) and config.r == 4
    lora = PeftModel.from_pretrained(tiny_llama(), tmp_path / "lora")
    with torch.no_grad():
        torch.testing.assert_close(
            lora(input_ids=token_ids()).logits,
            model(input_ids=token_ids(), adapter_ids=[1, 1, 1]).logits,
            atol=1e-5,
            rtol=1e-5,
        )
    with pytest.raises(FileExistsError):
        model.export_adapter("task_01", tmp_path / "lora")


@pytest.mark.parametrize(("dtype", "atol"), [(torch.float16, 2e-2), (torch.bfloat16, 1e-1)])
def test_half_precision_models_keep_the_bundle_in_their_dtype(tmp_path, dtype, atol):
    _, path = saved_bundle(tmp_path)
    model = PeftModel.from_pretrained(tiny_llama(dtype=dtype), path)
    layer = model.get_base_model().model.layers[0].self_attn.q_proj
    assert layer.jd_U["default"].dtype == dtype and layer.jd_sigma["default"].dtype == dtype
    reference = PeftModel.from_pretrained(tiny_llama(), path)
    ids = [0, None, 4]
    with torch.no_grad():
        low = model(input_ids=token_ids(), adapter_ids=ids).logits
        high = reference(input_ids=token_ids(), adapter_ids=ids).logits
    assert low.dtype == dtype
    torch.testing.assert_close(low.float(), high, atol=atol, rtol=0)


def test_get_peft_model_starts_at_the_base_model_and_trains_sigma(tmp_path):
    config = JDLoraConfig(target_modules=["q_proj", "v_proj"], r=4, adapter_names=["a", "b"], sigma_type="diag")
    model = get_peft_model(tiny_llama(), config)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".jd_" in n for n in trainable)
    ids = token_ids()
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids, adapter_ids=["a", "b", None]).logits, tiny_llama()(ids).logits)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    loss = model(input_ids=ids, labels=ids, adapter_ids=["a", "b", "a"]).loss
    loss.backward()
    optimizer.step()
    sigma = model.get_base_model().model.layers[0].self_attn.q_proj.jd_sigma["default"]
    assert sigma.abs().sum() > 0
    model.save_pretrained(tmp_path / "trained")
    again = PeftModel.from_pretrained(tiny_llama(), tmp_path / "trained")
    with torch.no_grad():
        torch.testing.assert_close(
            again(input_ids=ids, adapter_ids=["b", "a", None]).logits,
            model(input_ids=ids, adapter_ids=["b", "a", None]).logits,
        )


def test_two_bundles_on_one_model(tmp_path):
    first = random_bundle(tiny_llama(), num_adapters=3, seed=1)
    second = random_bundle(tiny_llama(), num_adapters=2, seed=2)
    save_bundle(first, tmp_path / "one")
    save_bundle(second, tmp_path / "two")
    model = PeftModel.from_pretrained(tiny_llama(), tmp_path / "one", adapter_name="one")
    model.load_adapter(tmp_path / "two", adapter_name="two")
    only_two = PeftModel.from_pretrained(tiny_llama(), tmp_path / "two")
    model.set_adapter("two")
    with torch.no_grad():
        torch.testing.assert_close(
            model(input_ids=token_ids(), adapter_ids=[1, None, 0]).logits,
            only_two(input_ids=token_ids(), adapter_ids=[1, None, 0]).logits,
        )
    assert model.base_model.adapter_names() == ["task_00", "task_01"]


def test_pattern_keys_are_matched_as_peft_matches_them_and_a_full_path_wins(tmp_path):
    from peft.utils.other import get_pattern_key

    pattern = {r"layers\.1\.self_attn\.(q|v)_proj": 2, "v_proj": 5, "model.layers.0.self_attn.v_proj": 3}
    config = JDLoraConfig(target_modules=["q_proj", "v_proj"], r=4, adapter_names=["a"], rank_pattern=pattern)
    expected = {"0.self_attn.q_proj": 4, "0.self_attn.v_proj": 3, "1.self_attn.q_proj": 2, "1.self_attn.v_proj": 2}
    for tail, rank in expected.items():
        assert config.rank_for(f"model.layers.{tail}") == rank, tail
    for tail in ("0.self_attn.q_proj", "1.self_attn.q_proj", "1.self_attn.v_proj"):  # no key names the full path
        module = f"model.layers.{tail}"
        key = get_pattern_key(list(pattern), module)
        assert config.rank_for(module) == (pattern[key] if key in pattern else 4)
    # Through a saved bundle: the regex key shapes the loaded layers.
    _, path = saved_bundle(tmp_path, rank_pattern={r"layers\.1\..*_proj": 2})
    model = PeftModel.from_pretrained(tiny_llama(), path)
    ranks = {name: layer.r["default"] for name, layer in model.named_modules() if isinstance(layer, JDLoraLayer)}
    assert sorted(set(ranks.values())) == [2, 4]
    assert all((rank == 2) == (".layers.1." in name) for name, rank in ranks.items())
    with pytest.raises(BundleFormatError, match=r"sigma_pattern key '\(q_proj' is not a valid regular expression"):
        JDLoraConfig(target_modules=["q_proj"], adapter_names=["a"], sigma_pattern={"(q_proj": "diag"})
