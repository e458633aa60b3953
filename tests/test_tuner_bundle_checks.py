"""A bundle is checked before it is trusted (issue 13.5, 13.7): what lies in a bundle is a `BundleFormatError`
naming the tensor or field, raised before anything is allocated or copied into the model."""

from __future__ import annotations

import json
import pickle
import time
import warnings

import pytest
import torch
from helpers import edit_adapter_config, random_bundle, tiny_llama, token_ids
from peft import PeftModel
from safetensors.torch import load_file, save_file
from transformers import Qwen2Config, Qwen2ForCausalLM

from peft_jdlora import BundleFormatError, JDLoraConfig, JDLoraLayer, load_bundle, save_bundle

SIGMA = "base_model.model.model.layers.1.self_attn.v_proj.jd_sigma"
U_KEY = "base_model.model.model.layers.0.self_attn.q_proj.jd_U"


def tiny_qwen2() -> Qwen2ForCausalLM:
    """A Qwen2 with exactly the tiny Llama's module names and shapes: only the model type tells them apart."""
    torch.manual_seed(0)
    config = Qwen2Config(
        vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )  # fmt: skip
    return Qwen2ForCausalLM(config).eval()


@pytest.fixture
def bundle_dir(tmp_path):
    path = tmp_path / "bundle"
    save_bundle(random_bundle(tiny_llama(), num_adapters=5), path)
    return path


def edit_weights(path, edit) -> None:
    weights = load_file(path / "adapter_model.safetensors")
    edit(weights)
    save_file(weights, path / "adapter_model.safetensors")


def injected(model: torch.nn.Module) -> bool:
    return any(isinstance(m, JDLoraLayer) for m in model.modules())


def set_value(key, value):
    def edit(weights):
        weights[key] = weights[key].clone()
        weights[key].view(-1)[3] = value

    return edit


def retype(key, dtype):
    def edit(weights):
        weights[key] = weights[key].to(dtype)

    return edit


def add_tensor(key, shape):
    def edit(weights):
        weights[key] = torch.zeros(shape)

    return edit


def add_untargeted_module(weights):
    for name in ("jd_U", "jd_V", "jd_sigma"):  # k_proj of the right shapes: the config targets q_proj, v_proj
        weights[f"base_model.model.model.layers.0.self_attn.k_proj.{name}"] = weights[
            f"base_model.model.model.layers.0.self_attn.v_proj.{name}"
        ].clone()


LYING_WEIGHTS = [
    pytest.param(set_value(SIGMA, float("nan")), r"jd_sigma.*NaN or inf", id="nan-in-one-sigma"),
    pytest.param(set_value(U_KEY, float("inf")), r"q_proj\.jd_U.*NaN or inf", id="inf-in-U"),
    pytest.param(retype(SIGMA, torch.int32), r"jd_sigma.*dtype I32.*floating point", id="int-sigma"),
    pytest.param(retype(U_KEY, torch.bool), r"jd_U.*dtype BOOL", id="bool-U"),
    pytest.param(
        add_tensor("base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight", (4, 64)),
        r"unexpected tensor .*lora_A",
        id="extra-tensor",
    ),
    pytest.param(add_untargeted_module, r"k_proj.*target_modules does not name", id="untargeted-module"),
]


@pytest.mark.parametrize(("edit", "match"), LYING_WEIGHTS)
def test_lying_weights_are_refused_by_every_loader(bundle_dir, edit, match):
    edit_weights(bundle_dir, edit)
    base = tiny_llama()
    with pytest.raises(BundleFormatError, match=match):
        PeftModel.from_pretrained(base, bundle_dir)
    with pytest.raises(BundleFormatError, match=match):
        load_bundle(bundle_dir)


def test_transformers_load_adapter_values_are_checked_before_the_first_mixed_batch(bundle_dir):
    # transformers' load_adapter copies the tensors in with its own loader: use_adapter_ids checks them once.
    import peft_jdlora

    edit_weights(bundle_dir, set_value(SIGMA, float("nan")))
    model = tiny_llama()
    model.load_adapter(str(bundle_dir), adapter_name="jd")
    with pytest.raises(BundleFormatError, match=r"v_proj\.jd_sigma of bundle 'jd': NaN or inf"):
        with peft_jdlora.use_adapter_ids(model, [0, 1, 2]):
            pass


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        pytest.param(retype(SIGMA, torch.int32), r"dtype I32", id="int-sigma"),
        pytest.param(add_untargeted_module, r"k_proj", id="untargeted-module"),
        pytest.param(lambda w: w.pop(SIGMA), r"layers\.1\.self_attn\.v_proj\.jd_sigma", id="missing-tensor"),
    ],
)
def test_what_the_header_shows_is_refused_before_the_model_is_touched(bundle_dir, edit, match):
    edit_weights(bundle_dir, edit)
    base = tiny_llama()
    with pytest.raises(BundleFormatError, match=match):
        PeftModel.from_pretrained(base, bundle_dir)
    assert not injected(base)


def test_a_huge_rank_is_refused_before_allocating(bundle_dir):
    # Σ alone would be 5 x 10^6 x 10^6 floats: the refusal can only be this fast if nothing was allocated.
    edit_adapter_config(bundle_dir, r=10**6)
    base = tiny_llama()
    start = time.perf_counter()
    with pytest.raises(BundleFormatError, match=r"jd_U has shape \(1, 64, 4\), the config implies \(1, 64, 1000000\)"):
        PeftModel.from_pretrained(base, bundle_dir)
    with pytest.raises(BundleFormatError, match=r"the config implies \(1, 64, 1000000\)"):
        load_bundle(bundle_dir)
    assert time.perf_counter() - start < 60 and not injected(base)


def test_a_huge_rank_through_transformers_load_adapter_is_refused_before_allocating(bundle_dir, monkeypatch):
    """transformers' load_adapter builds the config without its weights file (no header to compare): the factors
    the config implies are checked against free memory before any layer is made."""
    edit_adapter_config(bundle_dir, r=10**6)
    model = tiny_llama()
    implied = r"the config implies \d+\.\d GiB of factors over 4 modules \(r 1000000"
    with pytest.raises(BundleFormatError, match=implied):
        model.load_adapter(str(bundle_dir), adapter_name="jd")
    assert not injected(model)
    # The measure is the device's free memory: with 1 KiB free, even the honest rank-4 bundle (~6 KiB) is refused.
    edit_adapter_config(bundle_dir, r=4)
    monkeypatch.setattr("peft_jdlora.model.available_memory", lambda device: 2**10)
    with pytest.raises(BundleFormatError, match=r"more than the 0\.0 GiB free on cpu"):
        PeftModel.from_pretrained(tiny_llama(), bundle_dir)
    monkeypatch.undo()
    assert injected(PeftModel.from_pretrained(tiny_llama(), bundle_dir).base_model.model)


def test_shapes_of_another_base_model_are_refused_before_the_model_is_touched(tmp_path):
    wide = random_bundle(tiny_llama(), num_adapters=2)
    for module in wide.modules.values():  # a base model with 128-wide projections
        module.U = torch.zeros(1, 128, 4)
        module.V = torch.zeros(1, 4, 128)
    save_bundle(wide, tmp_path / "wide")
    base = tiny_llama()
    with pytest.raises(BundleFormatError, match=r"for a 128x128 layer; this model's .*q_proj' is 64x64"):
        PeftModel.from_pretrained(base, tmp_path / "wide")
    assert not injected(base)


def bundle_for_a_saved_llama(tmp_path):
    base_dir = tmp_path / "llama"
    tiny_llama().save_pretrained(base_dir)
    bundle = random_bundle(tiny_llama(), num_adapters=3)
    bundle.config.base_model_name_or_path = str(base_dir)
    save_bundle(bundle, tmp_path / "bundle")
    return tmp_path / "bundle"


def test_the_base_model_type_is_recorded_and_checked(tmp_path):
    path = bundle_for_a_saved_llama(tmp_path)
    assert json.loads((path / "adapter_config.json").read_text())["base_model_type"] == "llama"
    qwen2 = tiny_qwen2()
    with pytest.raises(BundleFormatError, match=r"base_model_type: the bundle was made for a 'llama' model .* 'qwen2'"):
        PeftModel.from_pretrained(qwen2, path)
    assert not injected(qwen2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        PeftModel.from_pretrained(tiny_llama().from_pretrained(tmp_path / "llama"), path)
    assert not [w for w in caught if "made for base model" in str(w.message)]  # its own base model: no warning
    with pytest.warns(UserWarning, match=r"made for base model .*llama'; it is loaded onto 'elsewhere'"):
        other = tiny_llama()
        other.config._name_or_path = "elsewhere"
        PeftModel.from_pretrained(other, path)


def test_a_bundle_made_on_a_model_records_its_type(tmp_path):
    from peft import get_peft_model

    model = get_peft_model(tiny_llama(), JDLoraConfig(target_modules=["q_proj"], r=2, adapter_names=["a"]))
    model.save_pretrained(tmp_path / "made")
    assert json.loads((tmp_path / "made/adapter_config.json").read_text())["base_model_type"] == "llama"


def test_a_bundle_without_the_recorded_type_still_loads(tmp_path):
    path = bundle_for_a_saved_llama(tmp_path)
    config_file = path / "adapter_config.json"
    config_file.write_text(
        json.dumps({k: v for k, v in json.loads(config_file.read_text()).items() if k != "base_model_type"})
    )
    model = PeftModel.from_pretrained(tiny_qwen2(), path)  # an older bundle: nothing to check against
    assert injected(model)
    load_bundle(path)


@pytest.mark.parametrize(
    ("changes", "match"),
    [
        ({"r": "4"}, r"r must be an integer, got str '4'"),
        ({"adapter_names": "task_00"}, r"adapter_names must be a list of strings"),
        ({"rank_pattern": {"v_proj": 2.5}}, r"rank_pattern must be a mapping"),
        ({"adapter_clusters": ["0", "0", "0", "0", "0"]}, r"adapter_clusters must be a list of integers"),
        ({"fan_in_fan_out": "no"}, r"fan_in_fan_out must be true or false"),
        ({"sigma_pattern": ["diag"]}, r"sigma_pattern must be a mapping"),
        ({"default_adapter": "nope"}, r"default_adapter names no adapter of the bundle: no adapter named 'nope'"),
        ({"default_adapter": 9}, r"default_adapter names no adapter .* index 9 is out of range"),
        ({"format_version": "1"}, r"format_version must be an integer .* got str '1'"),
        ({"init_weights": "gaussian"}, r"init_weights must be true, false or 'zeros'"),
        ({"task_type": "SEQ_CLS"}, r"task_type 'SEQ_CLS' is not supported by JD-LoRA"),
    ],
)
def test_config_fields_of_the_wrong_type_name_the_field(bundle_dir, changes, match):
    edit_adapter_config(bundle_dir, **changes)
    with pytest.raises(BundleFormatError, match=match):
        load_bundle(bundle_dir)
    with pytest.raises(BundleFormatError, match=match):
        PeftModel.from_pretrained(tiny_llama(), bundle_dir)


def test_a_config_that_is_not_an_object_is_refused(bundle_dir):
    (bundle_dir / "adapter_config.json").write_text("[1, 2]")
    with pytest.raises(BundleFormatError, match="holds a JSON list"):
        load_bundle(bundle_dir)


def test_a_folder_without_weights_says_so(bundle_dir):
    (bundle_dir / "adapter_model.safetensors").unlink()
    for load in (lambda: PeftModel.from_pretrained(tiny_llama(), bundle_dir), lambda: load_bundle(bundle_dir)):
        with pytest.raises(
            BundleFormatError, match=r"holds adapter_config\.json but no adapter_model\.safetensors"
        ) as err:
            load()
        assert "Repo id" not in str(err.value)


def test_pickled_weights_are_read_as_tensors_only(bundle_dir, tmp_path):
    # PEFT's save_pretrained(safe_serialization=False) writes adapter_model.bin; it is read as PEFT reads it
    # (torch.load(weights_only=True)): the same bundle, and a pickle that would run code is refused unrun.
    model = PeftModel.from_pretrained(tiny_llama(), bundle_dir)
    model.save_pretrained(tmp_path / "pickled", safe_serialization=False)
    assert (tmp_path / "pickled/adapter_model.bin").is_file()
    again = PeftModel.from_pretrained(tiny_llama(), tmp_path / "pickled")
    with torch.no_grad():
        torch.testing.assert_close(
            again(input_ids=token_ids(), adapter_ids=[0, 4, None]).logits,
            model(input_ids=token_ids(), adapter_ids=[0, 4, None]).logits,
            atol=0,
            rtol=0,
        )
    assert load_bundle(tmp_path / "pickled").config.adapter_names == model.peft_config["default"].adapter_names

    marker = tmp_path / "code-ran"

    class RunsCode:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    (tmp_path / "pickled/adapter_model.bin").write_bytes(pickle.dumps({U_KEY: RunsCode()}))
    with pytest.raises(BundleFormatError, match="cannot be read as tensors"):
        PeftModel.from_pretrained(tiny_llama(), tmp_path / "pickled")
    assert not marker.exists()


@pytest.mark.parametrize("name", ["a\x00b", "task\x1b[2J", "two\nlines"])
def test_adapter_names_with_control_characters_are_refused(name):
    with pytest.raises(BundleFormatError, match=r"adapter_names\[1\] holds control characters"):
        JDLoraConfig(target_modules=["q_proj"], adapter_names=["ok", name])
