"""Mixed batches: every row uses its own adapter, in forward and generate, against independent references."""

from __future__ import annotations

import pytest
import torch
from helpers import random_bundle, tiny_gpt2, tiny_llama, token_ids
from peft import PeftModel
from transformers import GenerationConfig

import peft_jdlora
from peft_jdlora import export_lora, save_bundle
from peft_jdlora.ops import torch_backend

IDS = ["task_01", 3, None, "task_00", 2, -1]
SLOTS = [1, 3, -1, 0, 2, -1]


def load_jd(make_base, bundle, tmp_path):
    path = tmp_path / "bundle"
    save_bundle(bundle, path)
    return PeftModel.from_pretrained(make_base(), path).eval()


def load_peft_lora(make_base, bundle, tmp_path) -> PeftModel:
    """PEFT's own LoRA holding every adapter of the bundle, exported as ordinary LoRA folders."""
    names = bundle.config.adapter_names
    model = None
    for name in names:
        folder = tmp_path / "lora" / name
        export_lora(bundle, name, folder)
        if model is None:
            model = PeftModel.from_pretrained(make_base(), folder, adapter_name=name)
        else:
            model.load_adapter(folder, adapter_name=name)
    return model.eval()


def peft_names(bundle, slots):
    return [bundle.config.adapter_names[s] if s >= 0 else "__base__" for s in slots]


@pytest.mark.parametrize("sigma_type", ["full", "diag"])
@pytest.mark.parametrize("num_clusters", [1, 3])
def test_llama_mixed_batch_equals_single_runs_and_peft_lora(tmp_path, sigma_type, num_clusters):
    bundle = random_bundle(tiny_llama(), num_adapters=4, r=5, sigma_type=sigma_type, num_clusters=num_clusters)
    model = load_jd(tiny_llama, bundle, tmp_path)
    lora = load_peft_lora(tiny_llama, bundle, tmp_path)
    base = tiny_llama()
    input_ids = token_ids(len(IDS), 9)
    with torch.no_grad():
        mixed = model(input_ids=input_ids, adapter_ids=IDS).logits
        for row, adapter in enumerate(IDS):
            single = model(input_ids=input_ids[row : row + 1], adapter_ids=[adapter]).logits[0]
            torch.testing.assert_close(mixed[row], single, atol=1e-5, rtol=1e-5)
        expected = lora(input_ids=input_ids, adapter_names=peft_names(bundle, SLOTS)).logits
        torch.testing.assert_close(mixed, expected, atol=1e-4, rtol=1e-4)
        base_logits = base(input_ids=input_ids).logits
    for row, slot in enumerate(SLOTS):
        if slot < 0:
            torch.testing.assert_close(mixed[row], base_logits[row], atol=0, rtol=0)
        else:  # the adapters really change the output, so the comparisons above are not vacuous
            assert (mixed[row] - base_logits[row]).abs().max() > 1e-2


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("num_clusters", [1, 3])
def test_mixed_batch_under_autocast_is_as_close_as_peft_lora(tmp_path, dtype, num_clusters):
    """Under torch.autocast the base layer's output and the shrink come out in the autocast dtype while U stays float32
    (in-place ops are not cast): the in-place add must still run, as close to float32 as PEFT's LoRA gets."""
    bundle = random_bundle(tiny_llama(), num_adapters=4, r=5, num_clusters=num_clusters)
    model = load_jd(tiny_llama, bundle, tmp_path)
    lora = load_peft_lora(tiny_llama, bundle, tmp_path)
    input_ids = token_ids(len(IDS), 9)
    names = peft_names(bundle, SLOTS)
    with torch.no_grad():
        exact = lora(input_ids=input_ids, adapter_names=names).logits
        with torch.autocast("cpu", dtype=dtype):
            mixed = model(input_ids=input_ids, adapter_ids=IDS).logits.float()
            lora_autocast = lora(input_ids=input_ids, adapter_names=names).logits.float()
    peft_error = (lora_autocast - exact).abs().max().item()
    assert peft_error > 0  # autocast really ran in low precision
    assert (mixed - exact).abs().max().item() <= 4 * peft_error


def test_gather_path_for_many_clusters_matches_peft_lora(tmp_path, monkeypatch):
    # Force the per-token gathered-basis path (used when C·r is large), and chunking over tokens.
    monkeypatch.setattr(torch_backend, "WIDE_GEMM_MAX_COLUMNS", 1)
    monkeypatch.setattr(torch_backend, "GATHER_CHUNK_TOKENS", 7)
    bundle = random_bundle(tiny_llama(), num_adapters=4, r=3, num_clusters=4)
    model = load_jd(tiny_llama, bundle, tmp_path)
    lora = load_peft_lora(tiny_llama, bundle, tmp_path)
    input_ids = token_ids(len(IDS), 5)
    with torch.no_grad():
        mixed = model(input_ids=input_ids, adapter_ids=IDS).logits
        expected = lora(input_ids=input_ids, adapter_names=peft_names(bundle, SLOTS)).logits
    torch.testing.assert_close(mixed, expected, atol=1e-4, rtol=1e-4)


def test_gpt2_conv1d_mixed_batch_matches_peft_lora(tmp_path):
    bundle = random_bundle(tiny_gpt2(), num_adapters=4, r=4, suffixes=("c_attn", "c_proj"), num_clusters=2)
    assert bundle.config.fan_in_fan_out
    model = load_jd(tiny_gpt2, bundle, tmp_path)
    lora = load_peft_lora(tiny_gpt2, bundle, tmp_path)
    input_ids = token_ids(len(IDS), 6)
    with torch.no_grad():
        mixed = model(input_ids=input_ids, adapter_ids=IDS).logits
        expected = lora(input_ids=input_ids, adapter_names=peft_names(bundle, SLOTS)).logits
        base_logits = tiny_gpt2()(input_ids=input_ids).logits
    torch.testing.assert_close(mixed, expected, atol=1e-4, rtol=1e-4)
    assert (mixed[0] - base_logits[0]).abs().max() > 1e-2


def test_adapter_ids_as_tensor_and_numpy_scalars(tmp_path):
    import numpy as np

    bundle = random_bundle(tiny_llama(), num_adapters=4)
    model = load_jd(tiny_llama, bundle, tmp_path)
    input_ids = token_ids(len(SLOTS), 4)
    with torch.no_grad():
        by_names = model(input_ids=input_ids, adapter_ids=IDS).logits
        by_tensor = model(input_ids=input_ids, adapter_ids=torch.tensor(SLOTS)).logits
        by_numpy = model(input_ids=input_ids, adapter_ids=[np.int64(s) for s in SLOTS]).logits
    torch.testing.assert_close(by_names, by_tensor, atol=0, rtol=0)
    torch.testing.assert_close(by_names, by_numpy, atol=0, rtol=0)


def test_loss_with_labels_and_padding_on_either_side(tmp_path):
    bundle = random_bundle(tiny_llama(), num_adapters=4)
    model = load_jd(tiny_llama, bundle, tmp_path)
    input_ids = token_ids(3, 6)
    ids = ["task_00", "task_02", None]
    with torch.no_grad():
        unpadded = [model(input_ids=input_ids[i : i + 1], adapter_ids=[a]).logits[0] for i, a in enumerate(ids)]
        # right padding: the real tokens are the first 6
        padded = torch.cat([input_ids, torch.zeros(3, 2, dtype=torch.long)], dim=1)
        mask = torch.cat([torch.ones(3, 6, dtype=torch.long), torch.zeros(3, 2, dtype=torch.long)], dim=1)
        out = model(input_ids=padded, attention_mask=mask, adapter_ids=ids, labels=padded.masked_fill(mask == 0, -100))
        assert torch.isfinite(out.loss)
        for row in range(3):
            torch.testing.assert_close(out.logits[row, :6], unpadded[row], atol=1e-5, rtol=1e-5)
        # left padding: the real tokens are the last 6
        padded = torch.cat([torch.zeros(3, 2, dtype=torch.long), input_ids], dim=1)
        mask = torch.cat([torch.zeros(3, 2, dtype=torch.long), torch.ones(3, 6, dtype=torch.long)], dim=1)
        logits = model(input_ids=padded, attention_mask=mask, adapter_ids=ids).logits
        for row in range(3):
            torch.testing.assert_close(logits[row, -1], unpadded[row][-1], atol=1e-4, rtol=1e-4)


def _left_padded_batch():
    input_ids = token_ids(3, 5, seed=3)
    input_ids[1, :2] = 0  # row 1 is left padded
    mask = torch.ones_like(input_ids)
    mask[1, :2] = 0
    return input_ids, mask


@pytest.mark.parametrize(
    "gen_kwargs",
    [
        {"do_sample": False},
        {"do_sample": False, "num_beams": 3, "num_return_sequences": 2},
        {"do_sample": False, "num_beams": 2, "use_cache": False},
    ],
    ids=["greedy", "beams+num_return_sequences", "beams-nocache"],
)
def test_generate_mixed_equals_per_row(tmp_path, gen_kwargs):
    bundle = random_bundle(tiny_llama(), num_adapters=4, num_clusters=2, scale=2.0)
    model = load_jd(tiny_llama, bundle, tmp_path)
    input_ids, mask = _left_padded_batch()
    ids = ["task_03", "task_01", None]
    common = {"max_new_tokens": 6, "pad_token_id": 0, **gen_kwargs}
    with torch.no_grad():
        mixed = model.generate(input_ids=input_ids, attention_mask=mask, adapter_ids=ids, **common)
        k = gen_kwargs.get("num_return_sequences", 1)
        for row, adapter in enumerate(ids):
            single = model.generate(
                input_ids=input_ids[row : row + 1], attention_mask=mask[row : row + 1], adapter_ids=[adapter], **common
            )
            assert torch.equal(mixed[row * k : (row + 1) * k, : single.shape[1]], single)


def test_generate_sampling_and_generation_config_match_peft_lora(tmp_path):
    bundle = random_bundle(tiny_llama(), num_adapters=4, scale=2.0)
    model = load_jd(tiny_llama, bundle, tmp_path)
    lora = load_peft_lora(tiny_llama, bundle, tmp_path)
    input_ids, mask = _left_padded_batch()
    config = GenerationConfig(max_new_tokens=6, do_sample=True, top_k=0, temperature=1.0, pad_token_id=0)
    with torch.no_grad():
        torch.manual_seed(7)
        ours = model.generate(
            input_ids=input_ids, attention_mask=mask, adapter_ids=[2, 0, None], generation_config=config
        )
        torch.manual_seed(7)
        theirs = lora.generate(
            input_ids=input_ids,
            attention_mask=mask,
            adapter_names=["task_02", "task_00", "__base__"],
            generation_config=config,
        )
    assert torch.equal(ours, theirs)


def test_sampling_with_num_return_sequences_equals_pre_expanded_batch(tmp_path):
    # PEFT's adapter_names cannot expand rows; ours maps the k returned sequences of row j to row j's adapter.
    bundle = random_bundle(tiny_llama(), num_adapters=4, scale=2.0)
    model = load_jd(tiny_llama, bundle, tmp_path)
    input_ids, mask = _left_padded_batch()
    config = GenerationConfig(max_new_tokens=5, do_sample=True, pad_token_id=0, num_return_sequences=2)
    with torch.no_grad():
        torch.manual_seed(11)
        expanded_by_generate = model.generate(
            input_ids=input_ids, attention_mask=mask, adapter_ids=[2, 0, None], generation_config=config
        )
        torch.manual_seed(11)
        pre_expanded = model.generate(
            input_ids=input_ids.repeat_interleave(2, 0),
            attention_mask=mask.repeat_interleave(2, 0),
            adapter_ids=[2, 2, 0, 0, None, None],
            generation_config=GenerationConfig(max_new_tokens=5, do_sample=True, pad_token_id=0),
        )
    assert expanded_by_generate.shape[0] == 6
    assert torch.equal(expanded_by_generate, pre_expanded)


def test_kv_cache_does_not_change_generation(tmp_path):
    bundle = random_bundle(tiny_llama(), num_adapters=3, scale=2.0)
    model = load_jd(tiny_llama, bundle, tmp_path)
    input_ids, mask = _left_padded_batch()
    with torch.no_grad():
        cached = model.generate(
            input_ids=input_ids, attention_mask=mask, adapter_ids=[0, 1, 2], max_new_tokens=5, do_sample=False
        )
        uncached = model.generate(
            input_ids=input_ids,
            attention_mask=mask,
            adapter_ids=[0, 1, 2],
            max_new_tokens=5,
            do_sample=False,
            use_cache=False,
        )
    assert torch.equal(cached, uncached)


def test_encoder_decoder_t5_mixed_batch(tmp_path):
    from transformers import T5Config, T5ForConditionalGeneration

    def make_t5():
        torch.manual_seed(0)
        config = T5Config(
            vocab_size=96, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_decoder_layers=2, num_heads=4,
            decoder_start_token_id=0, pad_token_id=0, eos_token_id=1,
        )  # fmt: skip
        return T5ForConditionalGeneration(config).eval()

    bundle = random_bundle(make_t5(), num_adapters=3, r=4, suffixes=("q", "v"), scale=2.0)
    model = load_jd(make_t5, bundle, tmp_path)
    lora = load_peft_lora(make_t5, bundle, tmp_path)
    input_ids = token_ids(3, 5) % 96
    decoder_input_ids = token_ids(3, 4, seed=1) % 96
    ids = ["task_02", None, "task_00"]
    with torch.no_grad():
        ours = model(input_ids=input_ids, decoder_input_ids=decoder_input_ids, adapter_ids=ids).logits
        theirs = lora(
            input_ids=input_ids, decoder_input_ids=decoder_input_ids, adapter_names=["task_02", "__base__", "task_00"]
        ).logits
        torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)
        mixed = model.generate(input_ids=input_ids, adapter_ids=ids, max_new_tokens=4, do_sample=False, num_beams=2)
        for row, adapter in enumerate(ids):
            single = model.generate(
                input_ids=input_ids[row : row + 1],
                adapter_ids=[adapter],
                max_new_tokens=4,
                do_sample=False,
                num_beams=2,
            )
            assert torch.equal(mixed[row, : single.shape[1]], single[0])


def test_default_adapter_is_used_without_ids(tmp_path):
    bundle = random_bundle(tiny_llama(), num_adapters=3)
    model = load_jd(tiny_llama, bundle, tmp_path)
    input_ids = token_ids(2, 4)
    with torch.no_grad():
        base_logits = tiny_llama()(input_ids=input_ids).logits
        torch.testing.assert_close(model(input_ids=input_ids).logits, base_logits, atol=0, rtol=0)
        model.set_default_adapter("task_02")
        explicit = model(input_ids=input_ids, adapter_ids=["task_02", "task_02"]).logits
        torch.testing.assert_close(model(input_ids=input_ids).logits, explicit, atol=0, rtol=0)
        # rows given None in a mixed batch still use the base model, whatever the default
        mixed = model(input_ids=input_ids, adapter_ids=[None, "task_02"]).logits
        torch.testing.assert_close(mixed[0], base_logits[0], atol=0, rtol=0)
        model.set_default_adapter(None)
        torch.testing.assert_close(model(input_ids=input_ids).logits, base_logits, atol=0, rtol=0)


def test_default_adapter_from_config(tmp_path):
    bundle = random_bundle(tiny_llama(), num_adapters=3, default_adapter="task_01")
    model = load_jd(tiny_llama, bundle, tmp_path)
    input_ids = token_ids(2, 4)
    with torch.no_grad():
        torch.testing.assert_close(
            model(input_ids=input_ids).logits, model(input_ids=input_ids, adapter_ids=[1, 1]).logits, atol=0, rtol=0
        )


def test_use_adapter_ids_with_transformers_load_adapter(tmp_path):
    bundle = random_bundle(tiny_llama(), num_adapters=3)
    save_bundle(bundle, tmp_path / "bundle")
    reference_model = load_jd(tiny_llama, bundle, tmp_path / "ref")
    model = tiny_llama()
    model.load_adapter(str(tmp_path / "bundle"), adapter_name="jd")
    input_ids = token_ids(3, 5)
    with torch.no_grad():
        with peft_jdlora.use_adapter_ids(model, ["task_02", None, 0]):
            ours = model(input_ids).logits
        expected = reference_model(input_ids=input_ids, adapter_ids=["task_02", None, 0]).logits
    torch.testing.assert_close(ours, expected, atol=1e-6, rtol=1e-6)


def test_per_module_rank_sigma_and_clusters_plan_matches_peft_lora(tmp_path):
    # The shapes a budget plan produces: ranks, Σ types and cluster assignments differing per module, including
    # a module stored as per-adapter SVD (a singleton cluster per adapter with a diagonal Σ).
    from peft_jdlora.bundle import ModuleFactors

    bundle = random_bundle(
        tiny_llama(), num_adapters=4, r=4, num_clusters=2, rank_pattern={"layers.1.self_attn.v_proj": 2}
    )
    singleton = "model.layers.0.self_attn.v_proj"
    bundle.config.sigma_pattern = {singleton: "diag"}
    bundle.config.cluster_pattern = {singleton: [0, 1, 2, 3]}
    gen = torch.Generator().manual_seed(5)
    d_out, d_in = bundle.modules[singleton].shape
    U = torch.linalg.qr(torch.randn(4, d_out, 4, generator=gen))[0]
    V = torch.linalg.qr(torch.randn(4, d_in, 4, generator=gen))[0].transpose(1, 2)
    bundle.modules[singleton] = ModuleFactors(U.contiguous(), V.contiguous(), torch.randn(4, 4, generator=gen))
    model = load_jd(tiny_llama, bundle, tmp_path)
    layer = model.get_base_model().model.layers[0].self_attn.v_proj
    assert layer.jd_sigma["default"].shape == (4, 4) and layer.jd_U["default"].shape[0] == 4
    lora = load_peft_lora(tiny_llama, bundle, tmp_path)
    input_ids = token_ids(len(IDS), 5)
    with torch.no_grad():
        mixed = model(input_ids=input_ids, adapter_ids=IDS).logits
        expected = lora(input_ids=input_ids, adapter_names=peft_names(bundle, SLOTS)).logits
    torch.testing.assert_close(mixed, expected, atol=1e-4, rtol=1e-4)
