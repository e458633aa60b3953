"""JD-LoRA behaves as PEFT's tuners do where PEFT's generic behaviour applies to a bundle (issue 13.6, 13.7, 16.2):
any rank, disabling while merged, init_weights, explicit merging, deleting, safe_merge, refused task types."""

from __future__ import annotations

import pytest
import torch
from helpers import random_bundle, tiny_gpt2, tiny_llama, token_ids
from peft import LoraConfig, PeftModel, get_peft_model
from torch import nn

from peft_jdlora import BundleFormatError, JDLoraConfig, JDLoraLayer, save_bundle


class MLP(nn.Module):
    """Layers narrower than the default rank (16): 10 -> 20 -> 2."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.lin0 = nn.Linear(10, 20)
        self.lin1 = nn.Linear(20, 2)

    def forward(self, X: torch.Tensor) -> torch.Tensor:
        return self.lin1(torch.relu(self.lin0(X)))


def loaded(tmp_path, **bundle_kwargs) -> PeftModel:
    save_bundle(random_bundle(tiny_llama(), **{"num_adapters": 4, "scale": 1.0, **bundle_kwargs}), tmp_path / "b")
    return PeftModel.from_pretrained(tiny_llama(), tmp_path / "b").eval()


def layer_of(model: PeftModel, index: int = 0, name: str = "q_proj") -> JDLoraLayer:
    return getattr(model.get_base_model().model.layers[index].self_attn, name)


# ---------------------------------------------------------------------------------------------- any rank


@pytest.mark.parametrize("init_weights", [True, False, "zeros"])
def test_a_rank_above_the_layer_dimension_works_as_in_lora(tmp_path, init_weights):
    config = JDLoraConfig(target_modules=["lin0", "lin1"], adapter_names=["a", "b"], init_weights=init_weights)
    model = get_peft_model(MLP(), config)  # r = 16 > lin1's 2 outputs and lin0's 10 inputs
    lin0, lin1 = model.base_model.model.lin0, model.base_model.model.lin1
    assert lin1.jd_U["default"].shape == (1, 2, 16) and lin1.jd_V["default"].shape == (1, 16, 20)
    assert lin0.jd_V["default"].shape == (1, 16, 10) and lin1.jd_sigma["default"].shape == (2, 16, 16)
    if init_weights is not True and init_weights != "zeros":  # the random basis: orthonormal rows where r > d
        U = lin1.jd_U["default"][0].detach()
        torch.testing.assert_close(U @ U.T, torch.eye(2), atol=1e-5, rtol=0)
    X = torch.randn(4, 10)
    with model.base_model.adapter_ids(["a", "b", None, "a"]):
        out = model(X)
    assert torch.isfinite(out).all()
    model.save_pretrained(tmp_path / "saved")
    again = PeftModel.from_pretrained(MLP(), tmp_path / "saved")
    with again.base_model.adapter_ids(["a", "b", None, "a"]):
        torch.testing.assert_close(again(X), out, atol=0, rtol=0)


def test_a_rank_above_the_hidden_size_on_a_transformers_model():
    model = get_peft_model(tiny_llama(), JDLoraConfig(target_modules=["q_proj"], r=80, adapter_names=["a"]))
    assert layer_of(model).jd_U["default"].shape == (1, 64, 80)
    with torch.no_grad():
        model(input_ids=token_ids(), adapter_ids=["a", None, "a"])


# ---------------------------------------------------------------------------------------------- init_weights


def test_init_weights_false_is_a_random_adapter_that_trains_everywhere():
    ids = token_ids()
    config = JDLoraConfig(target_modules=["q_proj", "v_proj"], r=4, adapter_names=["a", "b"], init_weights=False)
    model = get_peft_model(tiny_llama(), config)
    with torch.no_grad():
        base = tiny_llama()(input_ids=ids).logits
        assert (model(input_ids=ids, adapter_ids=["a", "b", "a"]).logits - base).abs().max() > 1e-3  # not identity
    model(input_ids=ids, labels=ids, adapter_ids=["a", "b", "a"]).loss.backward()
    layer = layer_of(model)
    for name in ("jd_U", "jd_V", "jd_sigma"):
        assert getattr(layer, name)["default"].grad.abs().sum() > 0, name


def test_init_weights_true_is_the_identity_and_zeros_are_zeros():
    ids = token_ids()
    identity = get_peft_model(tiny_llama(), JDLoraConfig(target_modules=["q_proj"], r=4, adapter_names=["a"]))
    with torch.no_grad():
        torch.testing.assert_close(identity(input_ids=ids, adapter_ids=["a"] * 3).logits, tiny_llama()(ids).logits)
    U = layer_of(identity).jd_U["default"][0].detach()
    torch.testing.assert_close(U.T @ U, torch.eye(4), atol=1e-5, rtol=0)
    zeros = get_peft_model(
        tiny_llama(), JDLoraConfig(target_modules=["q_proj"], r=4, adapter_names=["a"], init_weights="zeros")
    )
    assert all(p.abs().sum() == 0 for n, p in zeros.named_parameters() if ".jd_" in n)


# ---------------------------------------------------------------------------------------------- merging


def test_merge_takes_the_adapter_explicitly_and_leaves_the_default_alone(tmp_path):
    model = loaded(tmp_path)
    ids = token_ids()
    with torch.no_grad():
        base = model(input_ids=ids).logits  # no default adapter: unlabelled rows are the base model
        as_a = model(input_ids=ids, adapter_ids=["task_01"] * 3).logits
        as_b = model(input_ids=ids, adapter_ids=["task_03"] * 3).logits
        model.base_model.merge_adapter(adapter="task_01")
        torch.testing.assert_close(model(input_ids=ids).logits, as_a, atol=1e-5, rtol=1e-5)
        assert model.peft_config["default"].default_adapter is None
        model.unmerge_adapter()
        torch.testing.assert_close(model(input_ids=ids).logits, base, atol=1e-5, rtol=1e-5)  # still the base model
        model.base_model.merge_adapter(adapter="task_01")
        merged = model.merge_and_unload(adapter="task_03")  # replaces the adapter merged before
        torch.testing.assert_close(merged(input_ids=ids).logits, as_b, atol=1e-5, rtol=1e-5)


def test_merging_without_an_adapter_uses_the_default_one(tmp_path):
    model = loaded(tmp_path, default_adapter="task_02")
    ids = token_ids()
    with torch.no_grad():
        expected = model(input_ids=ids, adapter_ids=[2, 2, 2]).logits
        torch.testing.assert_close(model.merge_and_unload()(input_ids=ids).logits, expected, atol=1e-5, rtol=1e-5)


def test_merging_into_gpt2_conv1d_layers(tmp_path):
    # PEFT's generic merge tests skip Conv1D for tuners outside its own list: checked here instead.
    bundle = random_bundle(tiny_gpt2(), num_adapters=3, suffixes=("c_attn", "c_proj"), num_clusters=2)
    save_bundle(bundle, tmp_path / "gpt2")
    model = PeftModel.from_pretrained(tiny_gpt2(), tmp_path / "gpt2").eval()
    ids = token_ids()
    with torch.no_grad():
        expected = model(input_ids=ids, adapter_ids=[2, 2, 2]).logits
        assert (expected - tiny_gpt2()(input_ids=ids).logits).abs().max() > 1e-3
        merged = model.merge_and_unload(adapter="task_02")
        torch.testing.assert_close(merged(input_ids=ids).logits, expected, atol=1e-5, rtol=1e-5)


def test_disable_adapter_while_merged_is_the_base_model(tmp_path):
    model = loaded(tmp_path)
    ids = token_ids()
    with torch.no_grad():
        base = tiny_llama()(input_ids=ids).logits
        model.base_model.merge_adapter(adapter=1)
        with model.disable_adapter():  # as PEFT's LoRA: the merged adapter is taken out again
            torch.testing.assert_close(model(input_ids=ids).logits, base, atol=1e-5, rtol=1e-5)
        assert not layer_of(model).merged


def test_safe_merge_reports_nan_as_peft_does(tmp_path):
    model = loaded(tmp_path)
    with torch.no_grad():
        layer_of(model, 1, "v_proj").jd_sigma["default"][2, 0, 0] = float("nan")
    with pytest.raises(
        ValueError, match=r"NaNs detected in the merged weights\. The adapter default seems to be broken"
    ):
        model.merge_and_unload(safe_merge=True, adapter=2)


def test_merged_models_refuse_adapter_ids(tmp_path):
    model = loaded(tmp_path)
    model.base_model.merge_adapter(adapter=0)
    with pytest.raises(RuntimeError, match="unmerge_adapter"):
        model(input_ids=token_ids(), adapter_ids=[0, 1, 2])


# ---------------------------------------------------------------------------------------------- delete, refuse


def test_delete_adapter_forgets_the_bundle_everywhere(tmp_path):
    save_bundle(random_bundle(tiny_llama(), num_adapters=3, default_adapter="task_01"), tmp_path / "x")
    save_bundle(random_bundle(tiny_llama(), num_adapters=2, seed=1), tmp_path / "y")
    model = PeftModel.from_pretrained(tiny_llama(), tmp_path / "y", adapter_name="y")
    model.load_adapter(tmp_path / "x", adapter_name="x")
    assert model.base_model.jd_router.default_slots["x"] == 1
    model.delete_adapter("x")
    assert "x" not in model.base_model.jd_router.default_slots
    assert not any("x" in layer.jd_U or "x" in layer.jd_cluster_table for layer in model.base_model._layers())


@pytest.mark.parametrize("task_type", ["SEQ_CLS", "TOKEN_CLS", "QUESTION_ANS"])
def test_task_types_that_train_a_head_are_refused(task_type):
    with pytest.raises(BundleFormatError, match=rf"task_type '{task_type}' is not supported .*modules_to_save"):
        JDLoraConfig(target_modules=["q_proj"], adapter_names=["a"], task_type=task_type)


def test_adapter_ids_on_a_model_without_a_bundle_are_refused():
    model = get_peft_model(tiny_llama(), LoraConfig(target_modules=["q_proj"], task_type="CAUSAL_LM"))
    with pytest.raises(TypeError, match=r"adapter_ids selects adapters of a JD-LoRA bundle.*adapter_names"):
        model(input_ids=token_ids(), adapter_ids=[0, 1, 2])
    with pytest.raises(TypeError, match="adapter_ids selects adapters of a JD-LoRA bundle"):
        model.generate(input_ids=token_ids(), adapter_ids=[0, 1, 2], max_new_tokens=1)
    with torch.no_grad():
        model(input_ids=token_ids())  # without adapter_ids, nothing changes


# ---------------------------------------------------------------------------------------------- in place


def test_in_place_inference_equals_the_differentiable_path(tmp_path):
    # No grad: the delta is added into the base layer's output in place; with grad: out of place, for autograd.
    # An fp16 base with an fp32 bundle (a trainable bundle is upcast) also takes the in-place path.
    for dtype in (torch.float32, torch.float16):
        bundle = random_bundle(tiny_llama(), num_adapters=4, num_clusters=2, scale=1.0)
        save_bundle(bundle, tmp_path / f"b{dtype}")
        model = PeftModel.from_pretrained(tiny_llama(dtype=dtype), tmp_path / f"b{dtype}", is_trainable=True)
        assert layer_of(model).jd_U["default"].dtype == torch.float32
        ids = ["task_03", None, 1]
        with torch.no_grad():
            in_place = model(input_ids=token_ids(), adapter_ids=ids).logits
        differentiable = model(input_ids=token_ids(), adapter_ids=ids).logits
        assert differentiable.requires_grad
        torch.testing.assert_close(in_place, differentiable.detach(), atol=1e-5, rtol=1e-5)


def test_adapter_ids_with_gradient_checkpointing_in_training_are_refused(tmp_path):
    # The layers recomputed in backward run after the call ended: they could not see its ids (a wrong gradient,
    # or torch's checkpoint error). Refused up front; one adapter per batch (the default adapter) trains fine.
    save_bundle(random_bundle(tiny_llama(), num_adapters=3), tmp_path / "b")
    base = tiny_llama()
    base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model = PeftModel.from_pretrained(base, tmp_path / "b", is_trainable=True).train()
    ids = token_ids()
    with pytest.raises(RuntimeError, match="gradient checkpointing"):
        model(input_ids=ids, labels=ids, adapter_ids=[0, 2, None])
    model.set_default_adapter("task_01")
    model(input_ids=ids, labels=ids).loss.backward()
    assert layer_of(model).jd_sigma["default"].grad.abs().sum() > 0
    with torch.no_grad():
        model.eval()(input_ids=ids, adapter_ids=[0, 2, None])  # inference recomputes nothing
