"""The demo's code path (train a LoRA collection, compress, serve a mixed batch, compare with PEFT LoRA) on a tiny
Llama built from a config and a character-level tokenizer: no download, a few seconds. The demo (examples/demo.py)
and its building blocks (examples/jdlora_common/) are scripts beside the library, not part of the installed package."""

from __future__ import annotations

import importlib.util
import json
import os
import string
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import tiny_llama
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from peft_jdlora import load_bundle

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))  # the demo and jdlora_common

from demo import DemoConfig, collection_folders, format_report, mixed_rows, run_demo
from jdlora_common import END_OF_TURN, Task, TrainConfig, chat_prompt, greedy_generate, tokenize_examples, train_lora

WORDS = [
    "apple", "bread", "chair", "dance", "eagle", "flame", "grape", "house", "input", "juice", "knife", "lemon",
    "music", "night", "ocean", "piano", "queen", "river", "stone", "table", "under", "voice", "water", "young",
    "zebra", "cloud", "plant", "light", "sound", "train", "money", "paper", "green", "happy", "world", "sugar",
]  # fmt: skip


def char_tokenizer() -> PreTrainedTokenizerFast:
    """One token per printable character plus SmolLM2's chat tokens, ids matching tiny_llama's pad/bos/eos."""
    vocab = {"<pad>": 0, "<|im_start|>": 1, END_OF_TURN: 2, "<unk>": 3}
    for ch in string.printable:
        vocab.setdefault(ch, len(vocab))
    assert len(vocab) <= 128  # tiny_llama's vocab_size
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens(["<pad>", "<|im_start|>", END_OF_TURN, "<unk>"])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<|im_start|>", eos_token=END_OF_TURN, unk_token="<unk>"
    )


def word_task(name: str, instruction: str, fn) -> Task:
    return Task(name, instruction, "test words", lambda: [{"input": w, "target": fn(w)} for w in WORDS])


TASKS = [
    word_task("reverse", "Reverse the word.", lambda w: w[::-1]),
    word_task("upper", "Capitalise the word.", str.upper),
    word_task("first", "First letter?", lambda w: w[0]),
]


def test_tokenize_examples_masks_the_prompt_and_drops_long_rows():
    tok = char_tokenizer()
    rows = [{"input": "abc", "target": "cba"}, {"input": "x" * 80, "target": "y"}]
    out, kept = tokenize_examples(tok, "Reverse.", rows, seq_len=48)
    assert kept == [0]
    prompt_len = len(chat_prompt("Reverse.", "abc")) - len("<|im_start|>") * 2 - len(END_OF_TURN) + 3
    ids, labels = out[0]["input_ids"], out[0]["labels"]
    assert len(ids) == len(labels) == prompt_len + len("cba") + 1
    assert labels[:prompt_len] == [-100] * prompt_len
    assert tok.decode(labels[prompt_len:]) == "cba" + END_OF_TURN


def test_train_lora_is_reproducible_and_learns(tmp_path):
    tok = char_tokenizer()
    config = TrainConfig(steps=6, rank=4, alpha=8, n_train=24, n_eval=8, seq_len=64, lr=5e-3)
    records, weights = [], []
    for run in range(2):
        base = tiny_llama()
        base, record = train_lora(base, tok, TASKS[1], config, tmp_path / f"run{run}", log=lambda s: None)
        records.append(record)
        weights.append((tmp_path / f"run{run}" / "adapter_model.safetensors").read_bytes())
        # unload() gave the base back without LoRA layers
        assert not any("lora_" in n for n, _ in base.named_parameters())
    assert weights[0] == weights[1]
    assert records[0]["loss_after"] == records[1]["loss_after"]
    assert records[0]["loss_after"] < records[0]["loss_before"]
    folder = tmp_path / "run0"
    assert json.loads((folder / "adapter_config.json").read_text())["r"] == 4
    eval_rows = [json.loads(line) for line in (folder / "eval.jsonl").read_text().splitlines()]
    assert len(eval_rows) == record["n_eval"] == 8
    assert all(r["target"] == r["input"].upper() for r in eval_rows)


def test_shared_init_gives_every_adapter_the_same_A(tmp_path):
    from safetensors.torch import load_file

    tok = char_tokenizer()
    config = TrainConfig(steps=1, rank=4, alpha=8, n_train=16, n_eval=8, lr=0.0, shared_init_seed=7)
    base = tiny_llama()
    for task in TASKS[:2]:
        base, _ = train_lora(base, tok, task, config, tmp_path / task.name, log=lambda s: None)
    a, b = (load_file(str(tmp_path / t.name / "adapter_model.safetensors")) for t in TASKS[:2])
    keys = [k for k in a if "lora_A" in k]
    assert keys and all(torch.equal(a[k], b[k]) for k in keys)


def test_mixed_rows_alternate_adapters_and_add_a_base_row(tmp_path):
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        rows = [{"instruction": "I", "input": f"{name}{k}", "target": "t"} for k in range(3)]
        (tmp_path / name / "eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    rows = mixed_rows([tmp_path / "a", tmp_path / "b"], per_adapter=2)
    assert [r.adapter for r in rows] == ["a", "b", None, "a", "b", None]
    assert rows[2].prompt == rows[0].prompt and rows[2].target is None
    assert rows[3].prompt == chat_prompt("I", "a1")


def test_greedy_generate_trims_after_end_of_turn():
    tok = char_tokenizer()
    model = tiny_llama()
    with torch.no_grad():  # make end-of-turn the argmax everywhere: generation must stop after one token
        model.lm_head.weight.zero_()
        model.lm_head.weight[2].fill_(1.0)
        model.model.norm.weight.fill_(1.0)
    out, seconds = greedy_generate(model, tok, [chat_prompt("I", "ab"), chat_prompt("I", "a much longer one")], 5)
    assert out == [[2], [2]] and seconds >= 0


def test_run_demo_end_to_end(tmp_path):
    tok = char_tokenizer()
    config = DemoConfig(
        tasks=3,
        steps=4,
        seq_len=64,
        lora_rank=4,
        bundle_rank=12,  # 3 adapters × rank 4: the shared basis holds every update exactly
        shared_init_seed=None,
        prompts_per_adapter=2,
        max_new_tokens=4,
    )
    logs: list[str] = []
    report = run_demo(tiny_llama(), tok, config, tmp_path, tasks=TASKS, log=logs.append)

    names = [t.name for t in TASKS]
    assert list(report["per_adapter"]) == names
    bundle = load_bundle(tmp_path / "bundle")
    assert bundle.config.adapter_names == names
    assert report["errors"]["overall"] < 1e-6
    # the adapters change the base model's answers, and the bundle reproduces PEFT's LoRA on every row
    assert report["lora_differs_from_base"] > 0
    assert report["agreement"] == 1.0
    assert report["base_rows_match_base_model"] is True
    assert report["rows"] == 2 * (len(names) + 1)
    mem = report["memory_bytes"]
    assert 0 < mem["bundle_resident"] and 0 < mem["lora_resident"]
    assert json.loads((tmp_path / "report.json").read_text())["agreement"] == 1.0
    text = format_report(report)
    assert all(n in text for n in names) and "agreement" in text

    # A second run with the same settings reuses the trained adapters; a lower bundle rank loses fidelity.
    logs.clear()
    config.bundle_rank = 2
    report2 = run_demo(tiny_llama(), tok, config, tmp_path, tasks=TASKS, log=logs.append)
    assert sum("cached" in line for line in logs) == len(names)
    assert report2["errors"]["overall"] > 0.05


def test_demo_collection_needs_eval_files(tmp_path):
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "adapter_config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match=r"eval\.jsonl"):
        collection_folders(tmp_path, 4)
    with pytest.raises(FileNotFoundError, match="no adapter folders"):
        collection_folders(tmp_path / "x", 4)


def test_library_modules_leave_hub_settings_alone(tmp_path):
    """Importing the installed packages must not switch the Hub off in the user's process (the demo, when it lived in
    peft_jdlora, set HF_HUB_OFFLINE on import), and the demo is no module of the library any more."""
    code = (
        "import importlib, os, pkgutil\n"
        "import _peft_jdlora_autoload, jdlora_hub, jdlora_kernels, peft_jdlora\n"
        "packages = (peft_jdlora, jdlora_hub, jdlora_kernels)\n"
        "names = [m.name for p in packages for m in pkgutil.walk_packages(p.__path__, p.__name__ + '.')]\n"
        "for name in names:\n"
        "    if not name.endswith('.__main__'):  # jdlora_hub.__main__ runs the CLI\n"
        "        importlib.import_module(name)\n"
        "print(len(names), os.environ.get('HF_HUB_OFFLINE'), os.environ.get('HF_HUB_DISABLE_TELEMETRY'))\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "HF_HUB_DISABLE_TELEMETRY")}
    env.pop("PYTHONPATH", None)  # what is installed only: neither examples/ nor the repository folder on sys.path
    result = subprocess.run(
        [sys.executable, "-c", code], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    count, offline, telemetry = result.stdout.split()
    assert int(count) > 10  # the walk found the modules
    assert (offline, telemetry) == ("None", "None")
    assert importlib.util.find_spec("peft_jdlora.demo") is None
