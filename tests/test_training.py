"""Training a new adapter inside a bundle's basis (`peft_jdlora.add_trainable_adapter`): only its Σ learns, every
other tensor stays bit-identical, a mixed training batch trains it on its own rows only, and `save_pretrained` writes
the bundle with it appended; checked against PEFT's own LoRA, dense float64 references and brute force."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import random_bundle, tiny_gpt2, tiny_llama
from peft import PeftModel
from safetensors.torch import load_file

import peft_jdlora
from peft_jdlora import NonFiniteLossError, add_trainable_adapter, save_bundle
from peft_jdlora.bundle import export_lora, load_bundle
from peft_jdlora.training import TRAINED_SOURCE, cluster_scores, trainable_adapter

VOCAB = 128


def token_batch(rows=4, length=8, seed=0):
    ids = torch.randint(3, VOCAB, (rows, length), generator=torch.Generator().manual_seed(seed))
    return {"input_ids": ids, "labels": ids.clone(), "attention_mask": torch.ones_like(ids)}


def load(path, model_fn=tiny_llama, **kwargs):
    return PeftModel.from_pretrained(model_fn(), path, is_trainable=True, **kwargs)


@pytest.fixture
def bundle_dir(tmp_path):
    bundle = random_bundle(tiny_llama(), num_adapters=5, r=4, num_clusters=2, seed=3)
    save_bundle(bundle, tmp_path / "bundle")
    return tmp_path / "bundle"


def snapshot(model):
    """Every tensor of the model except the trained Σ: base weights and the bundle's own factors."""
    return {k: v.detach().clone() for k, v in model.state_dict().items() if "jd_sigma_trained" not in k}


def train_steps(model, batches, steps, lr=0.05, weight_decay=0.1):
    """A plain loop over all of model.parameters(): frozen tensors must not move (weight decay included)."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    model.train()
    losses = []
    for step in range(steps):
        loss = model(**batches[step % len(batches)]).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    model.eval()
    return losses


# ---------------------------------------------------------------------------------------------------- gradients


def test_only_the_new_sigma_requires_and_receives_gradients(bundle_dir):
    model = load(bundle_dir)
    adapter = add_trainable_adapter(model, "new", cluster=1)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {n for n, _ in model.named_parameters() if ".jd_sigma_trained." in n}
    assert len(trainable) == 4 and adapter.num_trainable_params == 4 * 4 * 4  # 4 modules, r² each
    assert model.get_nb_trainable_parameters()[0] == adapter.num_trainable_params
    model.train()
    model(**token_batch()).loss.backward()
    for name, param in model.named_parameters():
        if name in trainable:
            assert param.grad is not None and param.grad.abs().sum() > 0, name
        else:
            assert param.grad is None, name


def test_zeros_start_at_the_base_model_and_the_gradient_is_the_dense_one_projected(bundle_dir):
    """At Σ = 0 the model is the base model, and ∂L/∂Σ = U_cᵀ (∂L/∂W) V_cᵀ with ∂L/∂W from the base weight."""
    model = load(bundle_dir)
    add_trainable_adapter(model, "new", cluster=1)
    batch = token_batch()
    reference = tiny_llama()
    weight_grads = {}
    for name, module in reference.named_modules():
        if name.endswith(("q_proj", "v_proj")):
            module.weight.requires_grad_(True)
            weight_grads[name] = module.weight
    ref_out = reference(**batch)
    ref_out.loss.backward()
    out = model(**batch)
    torch.testing.assert_close(out.logits, ref_out.logits, atol=0, rtol=0)
    out.loss.backward()
    bundle = load_bundle(bundle_dir)
    for module, param in trainable_adapter(model).sigma.items():
        f = bundle.modules[module]
        expected = f.U[1].double().T @ weight_grads[module].grad.double() @ f.V[1].double().T
        torch.testing.assert_close(param.grad.double(), expected, rtol=1e-4, atol=1e-7)


# ---------------------------------------------------------------------------------------------------- training


def test_plain_loop_trains_it_and_leaves_every_other_tensor_and_adapter_bit_identical(bundle_dir):
    model = load(bundle_dir)
    ids = token_batch(rows=5, seed=1)["input_ids"]
    old_rows = ["task_00", "task_01", None, "task_03", 4]
    with torch.no_grad():
        before_logits = model(input_ids=ids, adapter_ids=old_rows).logits
    before = snapshot(model)
    adapter = add_trainable_adapter(model, "new", cluster=0)
    losses = train_steps(model, [token_batch(seed=s) for s in range(3)], steps=12)
    assert losses[-1] < losses[0] - 0.05
    after = snapshot(model)
    assert before.keys() == after.keys()
    for key in before:
        assert torch.equal(before[key], after[key]), key
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids, adapter_ids=old_rows).logits, before_logits, atol=0, rtol=0)
    assert adapter.steps == 12 and adapter.batches == 12
    assert all(p.abs().sum() > 0 for p in adapter.parameters())


def test_mixed_training_batch_trains_the_new_adapter_on_its_own_rows_only(bundle_dir):
    """The gradient of a batch whose rows use several adapters equals the gradient of the new adapter's rows alone."""
    model = load(bundle_dir)
    adapter = add_trainable_adapter(model, "new", cluster=1)
    with torch.no_grad():
        for p in adapter.parameters():
            p.normal_(0, 0.3)  # away from 0, so that the other rows' outputs would depend on it if they leaked
    batch = token_batch(rows=4, seed=2)
    ids_of_rows = ["new", "task_02", None, "new"]
    model.train()

    def grads(rows, keep):
        for p in adapter.parameters():
            p.grad = None
        logits = model(input_ids=batch["input_ids"][rows], adapter_ids=[ids_of_rows[i] for i in rows]).logits
        targets = batch["labels"][rows][:, 1:]
        per_token = torch.nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, VOCAB), targets.reshape(-1), reduction="none"
        ).view(len(rows), -1)
        (per_token * keep.view(-1, 1)).sum().backward()
        return [p.grad.clone() for p in adapter.parameters()]

    mixed = grads([0, 1, 2, 3], torch.tensor([1.0, 1.0, 1.0, 1.0]))
    alone = grads([0, 3], torch.tensor([1.0, 1.0]))
    for a, b in zip(mixed, alone):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    other_rows = grads([1, 2], torch.tensor([1.0, 1.0]))
    assert all(g.abs().sum() == 0 for g in other_rows)
    assert all(p.grad is None for n, p in model.named_parameters() if ".jd_sigma_trained." not in n)


def test_gradient_checkpointing_with_adapter_ids_replays_the_routing(bundle_dir):
    """transformers' own checkpointing refuses per-row ids in training (the recomputation would not see them);
    `enable_activation_checkpointing` replays each call's ids and gives the gradients of a run without it."""

    def gradients(checkpointing: str):
        model = load(bundle_dir)
        adapter = add_trainable_adapter(model, "new", cluster=1)
        with torch.no_grad():
            for p in adapter.parameters():
                p.fill_(0.1)
        if checkpointing == "transformers":
            model.base_model.model.activation_checkpointing_enable()
        elif checkpointing == "replay":
            peft_jdlora.enable_activation_checkpointing(model)
        model.train()
        model(**token_batch(seed=4), adapter_ids=["new", "task_01", "new", None]).loss.backward()
        return [p.grad for p in adapter.parameters()]

    with pytest.raises(RuntimeError, match="enable_activation_checkpointing"):
        gradients("transformers")
    for a, b in zip(gradients("none"), gradients("replay")):
        assert a.abs().sum() > 0
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_gradient_checkpointing_by_transformers_matches_a_plain_run_of_the_default_adapter(bundle_dir):
    def gradients(checkpoint: bool):
        model = load(bundle_dir)
        adapter = add_trainable_adapter(model, "new", cluster=1)
        with torch.no_grad():
            for p in adapter.parameters():
                p.fill_(0.1)
        if checkpoint:
            model.base_model.model.activation_checkpointing_enable()
        model.train()
        model(**token_batch(seed=5)).loss.backward()
        return [p.grad for p in adapter.parameters()]

    for a, b in zip(gradients(False), gradients(True)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast_training_steps_are_finite_and_touch_only_the_new_sigma(bundle_dir, dtype):
    model = load(bundle_dir)
    before = snapshot(model)
    adapter = add_trainable_adapter(model, "new", cluster=0)
    optimizer = torch.optim.AdamW(adapter.parameters(), lr=0.05)
    model.train()
    losses = []
    for step in range(4):
        with torch.autocast("cpu", dtype=dtype):
            loss = model(**token_batch(seed=step % 2)).loss
        loss.backward()
        assert all(torch.isfinite(p.grad).all() for p in adapter.parameters())
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    assert all(p.dtype == torch.float32 for p in adapter.parameters())
    after = snapshot(model)
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_trainer_trains_and_its_checkpoints_are_bundles(bundle_dir, tmp_path):
    from transformers import Trainer, TrainingArguments

    model = load(bundle_dir)
    adapter = add_trainable_adapter(model, "new", cluster=1)
    rows = [{k: v[0] for k, v in token_batch(rows=1, seed=s).items()} for s in range(8)]
    args = TrainingArguments(
        output_dir=str(tmp_path / "trainer"),
        max_steps=4,
        per_device_train_batch_size=2,
        learning_rate=0.05,
        save_strategy="steps",
        save_steps=4,
        report_to=[],
        use_cpu=True,
        logging_steps=1,
        seed=0,
        remove_unused_columns=False,
    )
    trainer = Trainer(model=model, args=args, train_dataset=rows)
    trainer.train()
    assert adapter.steps == 4 and adapter.batches == 4
    checkpoint = tmp_path / "trainer" / "checkpoint-4"
    saved = load_bundle(checkpoint)
    assert saved.config.adapter_names[-1] == "new"
    assert saved.config.adapter_sources[-1]["steps"] == 4
    assert (checkpoint / "trainer_state.json").is_file()  # the Trainer's own files stay beside the bundle
    for module, param in adapter.sigma.items():
        torch.testing.assert_close(saved.modules[module].sigma[-1], param.detach(), atol=0, rtol=0)


# ---------------------------------------------------------------------------------------------------- saving


def test_save_load_round_trip_appends_the_adapter_and_keeps_the_rest_bit_identical(bundle_dir, tmp_path):
    model = load(bundle_dir)
    adapter = add_trainable_adapter(model, "new", cluster=1)
    train_steps(model, [token_batch(seed=s) for s in range(2)], steps=3)
    out = tmp_path / "plus"
    model.save_pretrained(out)
    assert sorted(p.name for p in out.iterdir()) == [
        "README.md",
        "adapter_config.json",
        "adapter_model.safetensors",
        "jdlora_report.json",
    ]
    source, saved = load_file(bundle_dir / "adapter_model.safetensors"), load_file(out / "adapter_model.safetensors")
    assert source.keys() == saved.keys()
    for key, tensor in source.items():
        if key.endswith("jd_sigma"):
            assert torch.equal(saved[key][:-1], tensor), key
        else:
            assert torch.equal(saved[key], tensor), key
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["adapter_names"] == [f"task_{i:02d}" for i in range(5)] + ["new"]
    assert config["adapter_clusters"] == [0, 1, 0, 1, 0, 1]
    assert config["inference_mode"] is True and config["default_adapter"] is None
    entry = config["adapter_sources"][-1]
    assert entry["source"] == TRAINED_SOURCE and entry["steps"] == 3 and entry["init"] == "zeros"
    assert entry["data_sha256"] == adapter.data_sha256 and len(entry["data_sha256"]) == 64
    assert entry["trainable_params"] == 64
    report = json.loads((out / "jdlora_report.json").read_text())
    assert report["trained_in_basis"] == ["new"] and report["per_adapter"]["new"]["params"] == 64
    card = (out / "README.md").read_text()
    assert "## Trained in the bundle's basis" in card and "| new | zeros | 1 | 3 |" in card

    again = PeftModel.from_pretrained(tiny_llama(), out)
    ids = token_batch(rows=4, seed=9)["input_ids"]
    rows = ["new", "task_01", None, "new"]
    with torch.no_grad():
        torch.testing.assert_close(
            again(input_ids=ids, adapter_ids=rows).logits, model(input_ids=ids, adapter_ids=rows).logits
        )


def test_the_new_adapter_matches_peft_lora_and_its_mixed_rows_match_single_rows(bundle_dir, tmp_path):
    model = load(bundle_dir)
    add_trainable_adapter(model, "new", cluster=1)
    train_steps(model, [token_batch(seed=s) for s in range(2)], steps=4)
    model.save_pretrained(tmp_path / "plus")
    served = PeftModel.from_pretrained(tiny_llama(), tmp_path / "plus").eval()
    ids = token_batch(rows=4, seed=11)["input_ids"]
    rows = ["new", "task_03", "new", None]
    with torch.no_grad():
        mixed = served(input_ids=ids, adapter_ids=rows).logits
        for i, adapter in enumerate(rows):
            single = served(input_ids=ids[i : i + 1], adapter_ids=[adapter]).logits
            torch.testing.assert_close(mixed[i : i + 1], single, rtol=1e-5, atol=1e-5)
    export_lora(load_bundle(tmp_path / "plus"), "new", tmp_path / "new_lora")
    lora = PeftModel.from_pretrained(tiny_llama(), tmp_path / "new_lora").eval()
    with torch.no_grad():
        torch.testing.assert_close(mixed[[0, 2]], lora(input_ids=ids[[0, 2]]).logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("base_dtype", [torch.float32, torch.bfloat16])
def test_a_bf16_bundle_is_written_back_in_bf16_bit_identical(tmp_path, base_dtype):
    """PEFT upcasts a trainable bundle to float32 (or loads bf16 values into float32 layers): the saved bundle is
    bf16 again, the old tensors bit-identical to the source file, the new Σ rounded once."""
    bundle = random_bundle(tiny_llama(), num_adapters=3, r=4)
    for module, f in bundle.modules.items():
        bundle.modules[module] = type(f)(f.U.bfloat16(), f.V.bfloat16(), f.sigma.bfloat16())
    save_bundle(bundle, tmp_path / "b")
    model = load(tmp_path / "b", model_fn=lambda: tiny_llama(dtype=base_dtype))
    adapter = add_trainable_adapter(model, "new")
    train_steps(model, [token_batch()], steps=2)
    model.save_pretrained(tmp_path / "out")
    source, saved = (
        load_file(tmp_path / "b/adapter_model.safetensors"),
        load_file(tmp_path / "out/adapter_model.safetensors"),
    )
    for key, tensor in source.items():
        assert saved[key].dtype == torch.bfloat16, key
        assert torch.equal(saved[key][: tensor.shape[0]], tensor), key
    for module, param in adapter.sigma.items():
        assert torch.equal(saved[f"base_model.model.{module}.jd_sigma"][-1], param.detach().bfloat16())


def test_save_into_existing_folders_never_overwrites_without_being_asked(bundle_dir, tmp_path):
    model = load(bundle_dir)
    add_trainable_adapter(model, "new", cluster=0)
    notes = tmp_path / "run"
    notes.mkdir()
    (notes / "notes.txt").write_text("mine")
    model.save_pretrained(notes)  # a folder without bundle files: they are added, the rest stays
    assert (notes / "notes.txt").read_text() == "mine" and load_bundle(notes).config.adapter_names[-1] == "new"
    original = {p.name: p.read_bytes() for p in bundle_dir.iterdir()}
    with pytest.raises(FileExistsError, match="overwrite=True"):
        model.save_pretrained(bundle_dir)
    assert {p.name: p.read_bytes() for p in bundle_dir.iterdir()} == original
    peft_jdlora.save_trained_bundle(model, notes, overwrite=True)
    assert (notes / "notes.txt").read_text() == "mine"


def test_save_refuses_when_a_frozen_tensor_changed(bundle_dir, tmp_path):
    model = load(bundle_dir)
    add_trainable_adapter(model, "new", cluster=0)
    model.set_adapter("default")  # PEFT's set_adapter makes the whole bundle trainable again
    train_steps(model, [token_batch()], steps=1)
    with pytest.raises(RuntimeError, match="frozen tensors of the bundle changed"):
        model.save_pretrained(tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_diagonal_sigma_and_gpt2_conv1d_layers(tmp_path):
    base = tiny_gpt2()
    bundle = random_bundle(base, num_adapters=3, r=4, sigma_type="diag", suffixes=("c_attn", "c_proj"))
    save_bundle(bundle, tmp_path / "b")
    model = load(tmp_path / "b", model_fn=tiny_gpt2)
    adapter = add_trainable_adapter(model, "new")
    assert all(p.shape == (4,) for p in adapter.parameters())
    losses = train_steps(model, [token_batch(seed=s) for s in range(2)], steps=6)
    assert losses[-1] < losses[0]
    model.save_pretrained(tmp_path / "out")
    again = PeftModel.from_pretrained(tiny_gpt2(), tmp_path / "out")
    ids = token_batch(rows=2, seed=3)["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(
            again(input_ids=ids, adapter_ids=["new", 0]).logits, model(input_ids=ids, adapter_ids=["new", 0]).logits
        )


def test_a_bundle_of_many_modules_keeps_its_target_modules(tmp_path):
    """PEFT shortens a list of 20 or more target modules to suffixes in the live config when it injects the layers:
    the saved bundle keeps the list it was loaded with (and the live config's set does not break the checks)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    def deeper():
        torch.manual_seed(0)
        config = LlamaConfig(
            vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
            num_key_value_heads=2, pad_token_id=0, bos_token_id=1, eos_token_id=2,
        )  # fmt: skip
        return LlamaForCausalLM(config).eval()

    suffixes = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    bundle = random_bundle(deeper(), num_adapters=2, r=2, suffixes=suffixes)
    save_bundle(bundle, tmp_path / "b")
    model = load(tmp_path / "b", model_fn=deeper)
    assert not isinstance(model.peft_config["default"].target_modules, list)  # PEFT's shortened set
    adapter = add_trainable_adapter(model, "new")
    assert len(adapter.sigma) == 21
    model.save_pretrained(tmp_path / "out")
    saved = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert saved["target_modules"] == bundle.config.target_modules
    assert load_bundle(tmp_path / "out").config.adapter_names == ["task_00", "task_01", "new"]


# ---------------------------------------------------------------------------------------------------- init / clusters


def test_mean_init_is_the_mean_sigma_of_the_cluster(bundle_dir):
    model = load(bundle_dir)
    adapter = add_trainable_adapter(model, "new", init="mean", cluster="task_01")  # task_01 is in cluster 1
    bundle = load_bundle(bundle_dir)
    assert adapter.cluster_choice["default_cluster"] == 1
    for module, param in adapter.sigma.items():
        expected = bundle.modules[module].sigma[[1, 3]].mean(0)
        torch.testing.assert_close(param.detach(), expected)


def make_lora(tmp_path, base, seed=21):
    from jdlora_hub.testing.adapters import make_lora_adapter

    return make_lora_adapter(base, tmp_path / f"lora{seed}", seed=seed, r=4, base_model_name="tiny")


def test_project_init_equals_jdlora_add_and_a_forced_cluster_is_least_squares(bundle_dir, tmp_path):
    from peft_jdlora.compression import project, read_lora_adapter

    lora = make_lora(tmp_path, tiny_llama())
    projected = project(load_bundle(bundle_dir), [read_lora_adapter(lora, name="new")], progress=False)
    model = load(bundle_dir)
    adapter = add_trainable_adapter(model, "new", init=f"project:{lora}")
    assert adapter.cluster_choice["method"] == "projection error"
    assert adapter.cluster_choice["default_cluster"] == projected.config.adapter_clusters[-1]
    for module, param in adapter.sigma.items():
        torch.testing.assert_close(param.detach(), projected.modules[module].sigma[-1], rtol=1e-5, atol=1e-6)

    other = 1 - projected.config.adapter_clusters[-1]
    forced = add_trainable_adapter(load(bundle_dir), "new", init=f"project:{lora}", cluster=other)
    source = read_lora_adapter(lora)
    bundle = load_bundle(bundle_dir)
    for module, param in forced.sigma.items():
        a, b = source.modules[module]
        f = bundle.modules[module]
        U, V = f.U[other].double(), f.V[other].double()  # brute force: the dense least-squares problem
        design = torch.kron(U.contiguous(), V.T.contiguous())  # vec(U Σ V) = (U ⊗ Vᵀ) vec(Σ), row-major
        target = (b.double() @ a.double()).reshape(-1)
        expected = torch.linalg.lstsq(design, target).solution.view(4, 4)
        torch.testing.assert_close(param.detach().double(), expected, rtol=1e-4, atol=1e-6)


def test_cluster_scores_match_the_dense_gradient_and_auto_picks_the_cluster_of_the_task(tmp_path):
    base = tiny_llama()
    bundle = random_bundle(base, num_adapters=4, r=4, num_clusters=2, seed=5, scale=2.0)
    save_bundle(bundle, tmp_path / "b")
    # The task: what adapter 1 (cluster 1) predicts; its basis should win.
    teacher = PeftModel.from_pretrained(tiny_llama(), tmp_path / "b").eval()
    ids = token_batch(rows=8, length=12, seed=6)["input_ids"]
    with torch.no_grad():
        labels = teacher(input_ids=ids, adapter_ids=[1] * 8).logits.argmax(-1)
    labels = torch.cat([ids[:, :1], labels[:, :-1]], dim=1)  # position t predicts the teacher's token t
    probe = [{"input_ids": ids[:4], "labels": labels[:4]}, {"input_ids": ids[4:], "labels": labels[4:]}]

    model = load(tmp_path / "b")
    scores = cluster_scores(model, probe)["<default>"]
    reference = tiny_llama()
    weights = {
        n: m.weight.requires_grad_(True) for n, m in reference.named_modules() if n.endswith(("q_proj", "v_proj"))
    }
    for batch in probe:
        (reference(**batch).loss / len(probe)).backward()
    dense = [0.0, 0.0]
    for module, weight in weights.items():
        f = bundle.modules[module]
        for c in range(2):
            P_u = f.U[c].double() @ f.U[c].double().T  # orthonormal bases: projectors
            P_v = f.V[c].double().T @ f.V[c].double()
            dense[c] += float((P_u @ weight.grad.double() @ P_v).square().sum())
    assert scores["scores"] == pytest.approx(dense, rel=1e-4)
    assert scores["best"] == 1 and dense[1] > dense[0]
    adapter = add_trainable_adapter(model, "new", probe_batches=probe)
    assert adapter.cluster_choice["method"] == "gradient" and adapter.cluster_choice["default_cluster"] == 1


def test_budget_plan_bundle_with_per_adapter_svd_modules(tmp_path):
    """Modules stored as per-adapter SVD have no shared basis: zeros leaves them untrained (with a warning);
    project gives the new adapter its own SVD basis there, as `jdlora add` does."""
    from peft_jdlora.compression import project, read_lora_adapter

    base = tiny_llama()
    bundle = random_bundle(base, num_adapters=3, r=4, sigma_type="diag", num_clusters=1)
    v_modules = [m for m in bundle.modules if m.endswith("v_proj")]
    gen = torch.Generator().manual_seed(1)
    for m in v_modules:  # v_proj: a singleton cluster per adapter, diagonal Σ (per-adapter SVD)
        d_out, d_in = bundle.modules[m].shape
        U = torch.linalg.qr(torch.randn(3, d_out, 4, generator=gen))[0]
        V = torch.linalg.qr(torch.randn(3, d_in, 4, generator=gen))[0].transpose(1, 2).contiguous()
        bundle.modules[m] = type(bundle.modules[m])(U, V, torch.rand(3, 4, generator=gen))
    bundle.config.cluster_pattern = {m: [0, 1, 2] for m in v_modules}
    save_bundle(bundle, tmp_path / "b")
    with pytest.warns(UserWarning, match="per-adapter SVD"):
        adapter = add_trainable_adapter(load(tmp_path / "b"), "new")
    assert sorted(adapter.untrained_modules) == sorted(v_modules)
    assert all(not adapter.sigma[m].requires_grad for m in v_modules)

    lora = make_lora(tmp_path, base)
    model = load(tmp_path / "b")
    adapter = add_trainable_adapter(model, "new", init=f"project:{lora}")
    assert adapter.untrained_modules == [] and adapter.num_trainable_params == 4 * 4
    model.save_pretrained(tmp_path / "out")
    saved = load_bundle(tmp_path / "out")
    added = project(load_bundle(tmp_path / "b"), [read_lora_adapter(lora, name="new")], progress=False)
    assert saved.config.cluster_pattern == added.config.cluster_pattern
    for m in bundle.modules:
        torch.testing.assert_close(saved.modules[m].U, added.modules[m].U)
        torch.testing.assert_close(saved.modules[m].sigma, added.modules[m].sigma, rtol=1e-5, atol=1e-6)


def test_default_plan_of_unrelated_loras_trains_only_where_a_basis_is_shared(tmp_path):
    """jdlora-convert's default plan stores unrelated LoRAs mostly as per-adapter SVD, as its default layout (no
    cluster_pattern entry): a zeros start is not trained inside one adapter's own basis there; a projection gets its
    own basis."""
    from peft_jdlora.compression import compress, read_lora_adapter

    base = tiny_llama()
    loras = [read_lora_adapter(make_lora(tmp_path / f"l{seed}", base, seed=seed)) for seed in range(4)]
    bundle = compress(loras, budget="r4", cluster_counts=(), progress=False)
    config = bundle.config
    svd = sorted(m for m, entry in bundle.report.plan.items() if entry["kind"] == "svd")
    assert svd and any(config.pattern_key(config.cluster_pattern, m) is None for m in svd)
    save_bundle(bundle, tmp_path / "b")
    with pytest.warns(UserWarning, match="per-adapter SVD"):
        adapter = add_trainable_adapter(load(tmp_path / "b"), "new")
    assert sorted(adapter.untrained_modules) == svd
    adapter = add_trainable_adapter(load(tmp_path / "b"), "new", init=f"project:{make_lora(tmp_path, base, seed=9)}")
    assert adapter.untrained_modules == [] and {adapter.clusters[m] for m in svd} == {4}  # its own basis there


# ---------------------------------------------------------------------------------------------------- errors


def test_errors_name_taken_not_trainable_twice_and_bad_choices(bundle_dir, tmp_path):
    with pytest.raises(ValueError, match=r"already holds an adapter named 'task_02' \(index 2\)"):
        add_trainable_adapter(load(bundle_dir), "task_02", cluster=0)
    with pytest.raises(ValueError, match="is_trainable=True"):
        add_trainable_adapter(PeftModel.from_pretrained(tiny_llama(), bundle_dir), "new", cluster=0)
    with pytest.raises(ValueError, match="probe_batches"):
        add_trainable_adapter(load(bundle_dir), "new")  # two clusters, nothing to choose by
    with pytest.raises(ValueError, match="the bundle has 2 clusters"):
        add_trainable_adapter(load(bundle_dir), "new", cluster=2)
    with pytest.raises(KeyError, match="no adapter named 'nope'"):
        add_trainable_adapter(load(bundle_dir), "new", cluster="nope")
    with pytest.raises(ValueError, match="init must be one of"):
        add_trainable_adapter(load(bundle_dir), "new", init="random", cluster=0)
    model = load(bundle_dir)
    add_trainable_adapter(model, "new", cluster=0)
    with pytest.raises(ValueError, match="already training adapter 'new'"):
        add_trainable_adapter(model, "newer", cluster=0)
    svd = random_bundle(tiny_llama(), num_adapters=3, r=2, sigma_type="diag", num_clusters=3)
    svd.report = {"method": "svd"}
    save_bundle(svd, tmp_path / "svd")
    with pytest.raises(ValueError, match="no shared basis"):
        add_trainable_adapter(load(tmp_path / "svd"), "new")


def test_nan_loss_stops_training_and_nothing_is_written(bundle_dir, tmp_path):
    model = load(bundle_dir)
    adapter = add_trainable_adapter(model, "new", cluster=0)
    with torch.no_grad():
        for param in adapter.parameters():  # (a NaN in q_proj alone can vanish in CPU attention)
            param[0, 0] = float("nan")
    model.train()
    with pytest.raises(NonFiniteLossError, match="training loss is nan"):
        model(**token_batch())
    with pytest.raises(NonFiniteLossError, match="NaN or inf"):
        model.save_pretrained(tmp_path / "out")
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out*"))
