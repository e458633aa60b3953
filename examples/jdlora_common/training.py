"""Training one real PEFT LoRA adapter per task with a plain, seeded torch loop, and a collection of them."""

from __future__ import annotations

import json
import os
import random
import shutil
import tempfile
import time
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Union

import torch
from jdlora_hub.train import collate  # the right-padded batches `jdlora train` trains on

from .files import replace_dir_atomic, write_json_atomic
from .tasks import END_OF_TURN, Task, chat_prompt, task_splits


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
        replace_dir_atomic(tmp, output_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    base = model.unload()  # removes the LoRA layers (no merge): the base is as it was
    return base, record


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
