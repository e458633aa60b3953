"""One adapter id per row (issue 13.2): a wrong count is an error before anything runs, in forward, positional
generate and `use_adapter_ids`; only generate's own expansion (beams, num_return_sequences) repeats an id."""

from __future__ import annotations

import pytest
import torch
from helpers import random_bundle, tiny_llama, token_ids
from peft import PeftModel

import peft_jdlora
from peft_jdlora import save_bundle


@pytest.fixture(params=[None, "CAUSAL_LM"], ids=["PeftModel", "PeftModelForCausalLM"])
def bundle_path(tmp_path, request):
    # The task type picks PeftModel's class, and each class hands the forward's arguments on differently.
    bundle = random_bundle(tiny_llama(), num_adapters=4, scale=2.0, task_type=request.param)
    save_bundle(bundle, tmp_path / "bundle")
    return tmp_path / "bundle"


@pytest.fixture
def model(bundle_path):
    return PeftModel.from_pretrained(tiny_llama(), bundle_path).eval()


@pytest.fixture
def transformers_model(bundle_path):
    model = tiny_llama()
    model.load_adapter(str(bundle_path), adapter_name="jd")
    return model


def count_embedding_calls(transformers_model: torch.nn.Module) -> list:
    calls = []
    transformers_model.model.embed_tokens.register_forward_hook(lambda *args: calls.append(1))
    return calls


WRONG_COUNTS = [
    pytest.param(4, ["task_00", "task_01"], id="2-ids-for-4-rows"),  # used to run as [a, a, b, b]
    pytest.param(3, ["task_01"], id="1-id-for-3-rows"),
    pytest.param(2, [0, 1, 2, 3], id="4-ids-for-2-rows"),
    pytest.param(6, torch.tensor([0, 1, 2]), id="tensor-of-3-for-6-rows"),
]


@pytest.mark.parametrize(("rows", "ids"), WRONG_COUNTS)
def test_forward_refuses_a_wrong_number_of_ids(model, rows, ids):
    calls = count_embedding_calls(model.get_base_model())
    with pytest.raises(ValueError, match=rf"adapter_ids has {len(ids)} entries but input_ids has {rows} rows"):
        model(input_ids=token_ids(rows), adapter_ids=ids)
    with pytest.raises(ValueError, match=rf"{len(ids)} entries but inputs_embeds has {rows} rows"):
        model(inputs_embeds=torch.randn(rows, 5, 64), adapter_ids=ids)
    assert calls == []


@pytest.mark.parametrize(("rows", "ids"), WRONG_COUNTS)
@pytest.mark.parametrize("num_beams", [1, 2])
def test_generate_refuses_a_wrong_number_of_ids_positional_or_not(model, rows, ids, num_beams):
    calls = count_embedding_calls(model.get_base_model())
    kwargs = {"adapter_ids": ids, "max_new_tokens": 2, "num_beams": num_beams, "pad_token_id": 0}
    with pytest.raises(ValueError, match=rf"adapter_ids has {len(ids)} entries but (inputs|input_ids) has {rows} rows"):
        model.generate(token_ids(rows), **kwargs)
    with pytest.raises(ValueError, match=rf"adapter_ids has {len(ids)} entries but input_ids has {rows} rows"):
        model.generate(input_ids=token_ids(rows), **kwargs)
    assert calls == []


@pytest.mark.parametrize(("rows", "ids"), WRONG_COUNTS)
def test_use_adapter_ids_refuses_a_wrong_number_of_ids(transformers_model, rows, ids):
    calls = count_embedding_calls(transformers_model)
    with peft_jdlora.use_adapter_ids(transformers_model, ids):
        with pytest.raises(ValueError, match=rf"{len(ids)} entries but input_ids has {rows} rows"):
            transformers_model(token_ids(rows))
        with pytest.raises(ValueError, match=rf"{len(ids)} entries but inputs has {rows} rows"):
            transformers_model.generate(token_ids(rows), max_new_tokens=2, num_beams=2, pad_token_id=0)
    with pytest.raises(ValueError, match=rf"{len(ids)} entries but input_ids has {rows} rows"):
        with peft_jdlora.use_adapter_ids(transformers_model, ids, batch_kwargs={"input_ids": token_ids(rows)}):
            pass
    assert calls == []


@pytest.mark.parametrize(
    "gen_kwargs",
    [{"num_beams": 3}, {"num_beams": 2, "num_return_sequences": 2}, {"do_sample": True, "num_return_sequences": 3}],
    ids=["beams", "beams+num_return_sequences", "sampling+num_return_sequences"],
)
def test_generates_own_expansion_maps_to_the_rows_adapter(model, transformers_model, gen_kwargs):
    # The same adapters through PeftModel.generate and through use_adapter_ids + transformers' generate, and
    # against the expansion done by hand (each row repeated k times with its id, greedy / same seed).
    x, ids = token_ids(3, seed=4), ["task_02", None, 1]
    common = {"max_new_tokens": 4, "pad_token_id": 0, **gen_kwargs}
    torch.manual_seed(0)
    through_peft = model.generate(input_ids=x, adapter_ids=ids, **common)
    torch.manual_seed(0)
    with peft_jdlora.use_adapter_ids(transformers_model, ids):
        through_transformers = transformers_model.generate(x, **common)
    assert torch.equal(through_peft, through_transformers)
    k = gen_kwargs.get("num_return_sequences", 1)
    assert through_peft.shape[0] == 3 * k
    if "num_beams" not in gen_kwargs:
        by_hand = {**common, "num_return_sequences": 1}
        torch.manual_seed(0)
        expanded = model.generate(
            input_ids=x.repeat_interleave(k, 0), adapter_ids=[i for i in ids for _ in range(k)], **by_hand
        )
        assert torch.equal(through_peft, expanded)


def test_a_layer_called_inside_generate_accepts_only_generates_expansion(model):
    # Inside a forward the rows must match exactly; a multiple is generate's doing only.
    q_proj = model.get_base_model().model.layers[0].self_attn.q_proj
    with model.base_model.adapter_ids([0, 1]):
        with pytest.raises(ValueError, match="not a multiple"):
            q_proj(torch.randn(4, 3, 64))
        q_proj(torch.randn(2, 3, 64))


def test_use_adapter_ids_around_a_peft_model_call_keeps_its_ids(model):
    # PeftModel's own entry point must not replace the ids of an enclosing use_adapter_ids with the default adapter.
    model.set_default_adapter("task_03")
    x, ids = token_ids(3, seed=6), ["task_01", None, 2]
    with torch.no_grad():
        expected = model(input_ids=x, adapter_ids=ids).logits
        with peft_jdlora.use_adapter_ids(model, ids):
            torch.testing.assert_close(model(input_ids=x).logits, expected, atol=0, rtol=0)
        assert not torch.allclose(model(input_ids=x).logits, expected)  # the default adapter again
