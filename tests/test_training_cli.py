"""`jdlora train` end to end on a tiny Llama with a character tokenizer built offline: JSONL data (prompt/target and
text), held-out evaluation, the written bundle (servable, old tensors bit-identical, provenance with the data's
SHA-256), --in-place, and every error with its exit code (nothing written)."""

from __future__ import annotations

import hashlib
import json
import shlex
import string

import pytest
import torch
from helpers import random_bundle, tiny_llama
from jdlora_hub.cli import main
from jdlora_hub.errors import ExitCode
from jdlora_hub.testing.adapters import make_lora_adapter
from jdlora_hub.train import collate, read_examples, split_examples
from peft import PeftModel
from safetensors.torch import load_file
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from peft_jdlora import load_bundle, save_bundle
from peft_jdlora.training import TRAINED_SOURCE

WORDS = [
    "apple", "bread", "chair", "dance", "eagle", "flame", "grape", "house", "input", "juice", "knife", "lemon",
    "music", "night", "ocean", "piano", "queen", "river", "stone", "table", "under", "voice", "water", "young",
]  # fmt: skip


def char_tokenizer() -> PreTrainedTokenizerFast:
    """One token per printable character, ids matching tiny_llama's pad (0), bos (1) and eos (2)."""
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3}
    for ch in string.printable:
        vocab.setdefault(ch, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens(["<pad>", "<s>", "</s>", "<unk>"])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )


pytestmark = pytest.mark.usefixtures("restore_process_state")  # the commands run in this process


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("train_cli")
    base = tiny_llama()
    base.save_pretrained(root / "base")
    char_tokenizer().save_pretrained(root / "base")
    for clusters in (1, 2):
        bundle = random_bundle(base, num_adapters=4, r=4, num_clusters=clusters, seed=clusters)
        bundle.config.base_model_name_or_path = str(root / "base")
        save_bundle(bundle, root / f"bundle{clusters}")
    for name, seed in (("a", 11), ("b", 12), ("c", 13)):
        make_lora_adapter(base, root / "loras" / name, seed=seed, r=4, base_model_name=str(root / "base"))
    assert (
        main(shlex.split(f"convert {root / 'loras/a'} {root / 'loras/b'} --out {root / 'converted'} --rank 4 -q")) == 0
    )
    with open(root / "reverse.jsonl", "w") as f:
        for w in WORDS:
            f.write(json.dumps({"prompt": f"Reverse {w}: ", "target": w[::-1]}) + "\n")
    with open(root / "text.jsonl", "w") as f:
        for w in WORDS:
            f.write(json.dumps({"text": f"{w} is {w.upper()}."}) + "\n")
    return root


def run(capsys, command: str, *argv: str) -> tuple[int, dict]:
    code = main([*shlex.split(command), *argv, "--json", "-q"])
    out = capsys.readouterr().out
    return code, json.loads(out) if out.strip() else {}


def test_train_writes_the_bundle_with_the_adapter_appended(world, tmp_path, capsys):
    out = tmp_path / "plus"
    data = world / "reverse.jsonl"
    options = "--steps 12 --batch-size 4 --lr 0.1 --eval-fraction 0.25 --warmup 2 --seed 3"
    code, result = run(capsys, f"train {world / 'bundle1'} --name rev --data {data} --out {out} {options}")
    assert code == 0, result
    trained = result["trained"]
    assert trained["train_examples"] == 18 and trained["eval_examples"] == 6
    assert trained["eval_loss_after"] < trained["eval_loss_before"] - 0.03  # a tiny random model learns slowly
    assert trained["trainable_params"] == 4 * 16 and trained["cluster_choice"]["method"] == "single cluster"

    saved = load_bundle(out)
    assert saved.config.adapter_names == ["task_00", "task_01", "task_02", "task_03", "rev"]
    entry = saved.config.adapter_sources[-1]
    assert entry["source"] == TRAINED_SOURCE and entry["steps"] == 12
    assert entry["data_sha256"] == hashlib.sha256(data.read_bytes()).hexdigest()
    assert entry["file"] == str(data.resolve())
    assert saved.report.training["rev"]["eval_loss_after"] == trained["eval_loss_after"]
    assert "## Trained in the bundle's basis" in (out / "README.md").read_text()
    source, written = (
        load_file(world / "bundle1/adapter_model.safetensors"),
        load_file(out / "adapter_model.safetensors"),
    )
    for key, tensor in source.items():
        assert torch.equal(written[key][: tensor.shape[0]] if key.endswith("jd_sigma") else written[key], tensor), key

    # Served at once: the loaded bundle gives the held-out loss the command reported, on rows picking "rev".
    examples = read_examples(data, char_tokenizer(), max_length=256)
    _, eval_rows = split_examples(examples, None, fraction=0.25, seed=3)
    model = PeftModel.from_pretrained(tiny_llama(), out).eval()
    batch = collate(eval_rows, pad_id=0, device="cpu")
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], adapter_ids=["rev"] * 6)
    labels = batch["labels"][:, 1:]
    loss = torch.nn.functional.cross_entropy(logits.logits[:, :-1].reshape(-1, 128), labels.reshape(-1))
    assert loss.item() == pytest.approx(trained["eval_loss_after"], rel=1e-5)

    main(["inspect", str(out)])
    text = capsys.readouterr().out
    assert "rev" in text and TRAINED_SOURCE in text


@pytest.mark.parametrize("autocast", ["bf16", "fp16"])
def test_train_with_autocast_evaluates_and_learns(world, tmp_path, capsys, autocast):
    """--autocast runs the no-grad evaluation forward under autocast too (the in-place serving path)."""
    out = tmp_path / "plus"
    options = f"--steps 12 --batch-size 4 --lr 0.1 --eval-fraction 0.25 --warmup 2 --seed 3 --autocast {autocast}"
    code, result = run(
        capsys, f"train {world / 'bundle1'} --name rev --data {world / 'reverse.jsonl'} --out {out} {options}"
    )
    assert code == 0, result
    trained = result["trained"]
    assert trained["eval_loss_after"] < trained["eval_loss_before"] - 0.03
    assert load_bundle(out).config.adapter_names[-1] == "rev"


def test_train_text_data_in_place_keeps_other_files(world, tmp_path, capsys):
    import shutil

    folder = tmp_path / "mine"
    shutil.copytree(world / "bundle1", folder)
    (folder / "notes.txt").write_text("keep me")
    data = world / "text.jsonl"
    code = main(shlex.split(f"train {folder} --name text --data {data} --in-place --steps 3 --batch-size 4 -q"))
    text = capsys.readouterr().out
    assert code == 0
    assert "trained:       text: 3 steps" in text and "eval loss:" in text
    assert (folder / "notes.txt").read_text() == "keep me"
    assert load_bundle(folder).config.adapter_names[-1] == "text"


def test_train_chooses_a_cluster_and_starts_from_a_projection(world, tmp_path, capsys):
    common = f"--data {world / 'reverse.jsonl'} --steps 2 --batch-size 4"
    code, result = run(capsys, f"train {world / 'bundle2'} --name rev --out {tmp_path / 'a'} {common}")
    assert code == 0, result
    assert result["trained"]["cluster_choice"]["method"] == "gradient"
    assert len(result["trained"]["cluster_choice"]["scores"]["<default>"]) == 2

    lora = make_lora_adapter(tiny_llama(), tmp_path / "lora", seed=5, r=4, base_model_name=str(world / "base"))
    init = f"--init project:{lora}"
    code, result = run(capsys, f"train {world / 'bundle2'} --name rev --out {tmp_path / 'b'} {init} {common}")
    assert code == 0, result
    assert result["trained"]["cluster_choice"]["method"] == "projection error"
    entry = load_bundle(tmp_path / "b").config.adapter_sources[-1]
    assert entry["init"] == "project" and entry["init_lora"] == str(lora.resolve())  # a path of its own: redactable


def test_a_converted_bundle_keeps_its_report_and_refit_names_the_trained_adapter(world, tmp_path, capsys):
    out = tmp_path / "plus"
    data = world / "reverse.jsonl"
    code, result = run(capsys, f"train {world / 'converted'} --name rev --data {data} --out {out} --steps 2")
    assert code == 0, result
    source = json.loads((world / "converted" / "jdlora_report.json").read_text())
    report = json.loads((out / "jdlora_report.json").read_text())
    assert set(report["per_adapter"]) == {"a", "b", "rev"}
    for name in ("a", "b"):
        assert report["per_adapter"][name] == source["per_adapter"][name]
    assert report["params"]["bundle"] == source["params"]["bundle"] + 4 * 16  # 4 modules, r² = 16 more each
    card = (out / "README.md").read_text()
    assert "| rev | zeros | 0 | 2 |" in card and "trained in basis" in card

    code, result = run(capsys, f"add {out} {world / 'loras/c'} --refit --out {tmp_path / 'refit'}")
    assert code == ExitCode.INPUT and "'rev' was trained in the bundle's basis" in result["error"]
    code, result = run(capsys, f"add {out} {world / 'loras/c'} --out {tmp_path / 'added'}")  # projection works
    assert code == 0, result
    assert load_bundle(tmp_path / "added").config.adapter_names == ["a", "b", "rev", "c"]


def write_lines(path, lines):
    path.write_text("".join(line + "\n" for line in lines))
    return path


def test_examples_with_a_byte_order_mark_read_as_without(tmp_path):
    lines = [{"prompt": "Reverse ab: ", "target": "ba"}, {"text": "caf\u00e9 \u2028 ok"}]
    text = "".join(json.dumps(line, ensure_ascii=False) + "\n" for line in lines).encode("utf-8")
    (tmp_path / "plain.jsonl").write_bytes(text)
    (tmp_path / "marked.jsonl").write_bytes(b"\xef\xbb\xbf" + text)
    tokenizer = char_tokenizer()
    plain, marked = (read_examples(tmp_path / name, tokenizer, 64) for name in ("plain.jsonl", "marked.jsonl"))
    assert marked.rows == plain.rows and marked.lines == 2  # a raw U+2028 inside a JSON string is no line break


@pytest.mark.parametrize("error", [ValueError, KeyError])
def test_a_bug_inside_the_training_setup_is_an_internal_error(world, tmp_path, capsys, monkeypatch, error):
    """Only add_trainable_adapter's own refusals (TrainingSetupError) are usage errors: a ValueError or KeyError from
    a bug is an internal error (exit 1) with the hint to its traceback, and nothing is written."""
    import peft_jdlora

    def broken(*args, **kwargs):
        raise error("a bug inside the setup")

    monkeypatch.setattr(peft_jdlora, "add_trainable_adapter", broken)
    out = tmp_path / "out"
    code, result = run(capsys, f"train {world / 'bundle1'} --out {out} --name n --data {world / 'reverse.jsonl'}")
    assert code == ExitCode.INTERNAL and f"internal error: {error.__name__}" in result["error"], result
    assert not out.exists()


def test_train_errors_have_their_exit_codes_and_write_nothing(world, tmp_path, capsys, monkeypatch):
    bundle = str(world / "bundle1")
    out = tmp_path / "out"

    def fails(code, match, options):
        got, result = run(capsys, f"train {bundle} --out {out} {options}")
        assert got == code, result
        assert match in result["error"], result["error"]
        assert not out.exists() and not list(tmp_path.glob(".out*"))

    data = world / "reverse.jsonl"
    fails(ExitCode.INPUT, "already holds an adapter named 'task_01'", f"--name task_01 --data {data}")
    empty = write_lines(tmp_path / "empty.jsonl", [json.dumps({"prompt": "x", "target": ""}), ""])
    fails(
        ExitCode.INPUT, "tokenises to nothing to train on: 1 example lines, 1 with no token", f"--name n --data {empty}"
    )
    long = write_lines(tmp_path / "long.jsonl", [json.dumps({"prompt": "x" * 40, "target": "y"})])
    fails(ExitCode.INPUT, "1 longer than --max-length", f"--name n --data {long} --max-length 16")
    bad = write_lines(tmp_path / "bad.jsonl", [json.dumps({"text": "fine"}), "{not json"])
    fails(ExitCode.INPUT, "bad.jsonl:2: not valid JSON", f"--name n --data {bad}")
    keys = write_lines(tmp_path / "keys.jsonl", [json.dumps({"input": "a", "output": "b"})])
    fails(ExitCode.INPUT, "keys.jsonl:1: expected 'prompt' and 'target', or 'text'", f"--name n --data {keys}")
    fails(ExitCode.INPUT, "no such file", f"--name n --data {tmp_path / 'missing.jsonl'}")
    latin = tmp_path / "latin.jsonl"
    latin.write_bytes(json.dumps({"text": "caf\u00e9"}).encode().replace(b"\\u00e9", b"\xe9"))
    fails(ExitCode.INPUT, "latin.jsonl: not UTF-8 text", f"--name n --data {latin}")
    fails(ExitCode.USAGE, "exclude each other", f"--name n --data {data} --eval-data {data} --eval-fraction 0.1")
    fails(ExitCode.USAGE, "the bundle has 1 clusters", f"--name n --data {data} --cluster 3")
    fails(ExitCode.USAGE, "--init must be", f"--name n --data {data} --init random")
    not_lora = world / "base"
    fails(ExitCode.INPUT, f"--init project:{not_lora}", f"--name n --data {data} --init project:{not_lora}")

    # Training diverges at step two (Σ turns NaN, as an overflow would make it): stop there, say so, write nothing.
    original_step, calls = torch.optim.AdamW.step, []

    def diverging_step(self, *args, **kwargs):
        result = original_step(self, *args, **kwargs)
        calls.append(1)
        if len(calls) == 2:
            with torch.no_grad():
                for group in self.param_groups:
                    for param in group["params"]:
                        param.fill_(float("nan"))
        return result

    monkeypatch.setattr(torch.optim.AdamW, "step", diverging_step)
    fails(
        ExitCode.TRAINING,
        "stopped: the trained numbers are not finite after step 2",
        f"--name n --data {data} --steps 5",
    )
    # Diverging on the last step, with no held-out examples to see it.
    calls.clear()
    fails(
        ExitCode.TRAINING,
        "stopped: the trained numbers are not finite after step 2",
        f"--name n --data {data} --steps 2 --eval-fraction 0",
    )
    monkeypatch.undo()
    # A learning rate whose first AdamW step (10 x lr) is past float32's range is refused before anything loads.
    fails(ExitCode.USAGE, "--lr 1e+38 is too large", f"--name n --data {data} --lr 1e38")
    out.mkdir()
    got, result = run(capsys, f"train {bundle} --out {out} --name n --data {data}")
    assert got == ExitCode.OUTPUT_EXISTS and "--overwrite" in result["error"]
    assert list(out.iterdir()) == []
