"""`jdlora train BUNDLE --name NAME --data train.jsonl --out DIR`: train a new adapter inside a bundle's basis.

Only the new adapter's Σ learns (`peft_jdlora.add_trainable_adapter`); the bases and the bundle's adapters are written
back bit-identical, with the new adapter appended. The data is JSON Lines, one example per line:

    {"prompt": "...", "target": "..."}     the loss is on the target tokens (plus the end-of-sequence token)
    {"text": "..."}                        the loss is on every token

A held-out split (`--eval-fraction`, or `--eval-data FILE`) gives the evaluation loss before and after training,
which the report records with the steps and the data's SHA-256. The output is written like every other command's:
atomically, verified by reading it back, `--overwrite` to replace an existing folder, `--in-place` to update the
bundle folder itself. A NaN or infinite loss stops training with exit code 7 and writes nothing.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import random
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from .errors import ExitCode, JDLoraHubError, SourceError, UsageError

Log = Callable[[str], None]
AUTOCAST_DTYPES = ("bf16", "fp16")
PROBE_BATCHES = 4  # batches of the training data that score the clusters when --cluster auto must choose
# AdamW's first step is lr / (1 - beta1) = 10 x lr (torch's default betas), and torch turns it into a float32 number:
# a larger --lr cannot even take one step.
ADAMW_FIRST_STEP_FACTOR = 10.0
FLOAT32_MAX = 3.4028234663852886e38


class TrainingError(JDLoraHubError):
    """Training failed (a NaN or infinite loss); nothing was written."""

    exit_code = ExitCode.TRAINING


@dataclass
class TrainOptions:
    """How the adapter is trained (the `jdlora train` options)."""

    steps: int = 100
    lr: float = 5e-3
    batch_size: int = 8
    max_length: int = 256
    warmup: int = 10
    weight_decay: float = 0.0
    eval_fraction: float = 0.1
    eval_data: Optional[Path] = None
    init: str = "zeros"
    cluster: str = "auto"
    seed: int = 0
    device: Optional[str] = None
    autocast: Optional[str] = None  # "bf16" | "fp16" | None
    gradient_checkpointing: bool = False
    base_model: Optional[str] = None


@dataclass
class Examples:
    """Tokenized examples of one JSONL file and what was dropped."""

    rows: list[dict[str, list[int]]] = field(default_factory=list)
    lines: int = 0
    dropped_empty: int = 0
    dropped_too_long: int = 0
    truncated: int = 0


# ---------------------------------------------------------------------------------------------------- arguments


def add_parser(sub: Any, common: argparse.ArgumentParser, add_output_args: Callable[..., None]) -> None:
    from .cli import _non_negative_float, _positive_int, number_option

    positive_float = number_option(float, lambda value: value > 0 and math.isfinite(value), "a number > 0")
    fraction = number_option(float, lambda value: 0 <= value < 1, "a fraction in [0, 1)")

    p = sub.add_parser(
        "train",
        parents=[common],
        help="train a new adapter inside a bundle's basis (only its Σ learns)",
        description="Train a new adapter of a bundle inside its shared bases: only the adapter's Σ learns (r² or r "
        "numbers per module), the bases and the other adapters stay bit-identical, and the bundle is written with "
        "the new adapter appended, servable at once in mixed batches.",
        epilog="DATA is JSON Lines: {'prompt': ..., 'target': ...} (loss on the target) or {'text': ...} (loss on "
        "every token) per line. Exit codes as for `jdlora convert`, and 7: training failed (NaN loss).",
    )
    p.add_argument("bundle", metavar="BUNDLE", help="bundle folder or Hub id[@revision]")
    p.add_argument("--name", required=True, help="name of the new adapter (not yet in the bundle)")
    p.add_argument("--data", type=Path, required=True, help="training data (JSON Lines)")
    p.add_argument("--revision", help="revision of a Hub bundle (default: main)")
    add_output_args(p, in_place=True)
    group = p.add_argument_group("training")
    group.add_argument("--steps", type=_positive_int, default=TrainOptions.steps, help="optimizer steps (default: 100)")
    group.add_argument("--lr", type=positive_float, default=TrainOptions.lr, help="peak learning rate (default: 5e-3)")
    group.add_argument("--batch-size", type=_positive_int, default=TrainOptions.batch_size, help="(default: 8)")
    group.add_argument(
        "--max-length",
        type=_positive_int,
        default=TrainOptions.max_length,
        help="tokens per example (default: 256); longer prompt/target examples are dropped, longer texts cut",
    )
    group.add_argument("--warmup", type=int, default=TrainOptions.warmup, help="linear warmup steps (default: 10)")
    group.add_argument("--weight-decay", type=_non_negative_float, default=0.0, help="AdamW weight decay (default 0)")
    group.add_argument(
        "--eval-fraction",
        type=fraction,
        default=None,  # None: not given (it excludes --eval-data even when given as the default value)
        help="share of the examples held out for the evaluation loss (default: 0.1; 0: none)",
    )
    group.add_argument("--eval-data", type=Path, help="held-out examples (JSON Lines) instead of --eval-fraction")
    group.add_argument(
        "--init",
        default="zeros",
        help="starting Σ: zeros (the base model), mean (the cluster's mean adapter) or project:LORA_FOLDER (the "
        "projection of a trained LoRA, as `jdlora add` stores it); default: zeros",
    )
    group.add_argument(
        "--cluster",
        default="auto",
        help="cluster to train in: auto (the projection's choice with --init project:..., else the cluster whose "
        "bases capture most of the loss gradient on a few batches), a cluster id, or an adapter's name",
    )
    group.add_argument("--seed", type=int, default=0, help="data order and split (default: 0)")
    group.add_argument("--device", help="cpu, cuda, cuda:1, ... (default: cuda when available)")
    group.add_argument("--autocast", choices=AUTOCAST_DTYPES, help="mixed precision for the forward pass")
    group.add_argument("--gradient-checkpointing", action="store_true", help="recompute activations in backward")
    group.add_argument(
        "--base-model", metavar="FOLDER_OR_ID", help="the base model (default: the one the bundle records)"
    )


def options_from_args(args: argparse.Namespace) -> TrainOptions:
    if args.eval_data is not None and args.eval_fraction is not None:
        raise UsageError("--eval-data and --eval-fraction exclude each other.")
    if args.warmup < 0:
        raise UsageError(f"--warmup must be >= 0, got {args.warmup}.")
    if args.lr * ADAMW_FIRST_STEP_FACTOR >= FLOAT32_MAX:
        raise UsageError(
            f"--lr {args.lr:g} is too large: AdamW's first step ({ADAMW_FIRST_STEP_FACTOR:g} x lr) is past float32's "
            f"range; use a learning rate below {FLOAT32_MAX / ADAMW_FIRST_STEP_FACTOR:.1e}."
        )
    init = args.init
    if not (init in ("zeros", "mean") or (init.startswith("project:") and len(init) > len("project:"))):
        raise UsageError(f"--init must be zeros, mean or project:LORA_FOLDER, got {init!r}.")
    options = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainOptions)}  # the options' own names
    if args.eval_data is not None:
        eval_fraction = 0.0
    else:
        eval_fraction = TrainOptions.eval_fraction if args.eval_fraction is None else args.eval_fraction
    return TrainOptions(**{**options, "eval_fraction": eval_fraction})


# ---------------------------------------------------------------------------------------------------- data


def read_examples(path: Path, tokenizer: Any, max_length: int) -> Examples:
    """Token ids and labels (-100 where no loss is taken) of every line of a JSONL file; `SourceError` naming the
    file and line for anything that is not an example."""
    if not path.is_file():
        raise SourceError(f"--data {path}: no such file.")
    eos = tokenizer.eos_token_id
    out = Examples()
    for number, line in enumerate(_text_lines(path), start=1):
        if not line.strip():
            continue
        out.lines += 1
        where = f"{path}:{number}"
        try:
            item = json.loads(line)
        except json.JSONDecodeError as err:
            raise SourceError(f"{where}: not valid JSON ({err.msg}).") from None
        if not isinstance(item, dict):
            raise SourceError(f"{where}: expected an object with 'prompt' and 'target', or 'text'.")
        if "text" in item and ("prompt" in item or "target" in item):
            raise SourceError(f"{where}: give 'text', or 'prompt' and 'target', not both.")
        if "text" in item:
            if not isinstance(item["text"], str):
                raise SourceError(f"{where}: 'text' must be a string.")
            ids = list(tokenizer(item["text"])["input_ids"])
            if eos is not None and item["text"]:
                ids.append(eos)
            if len(ids) > max_length:
                ids, out.truncated = ids[:max_length], out.truncated + 1
            labels = list(ids)
        elif "prompt" in item and "target" in item:
            prompt, target = item["prompt"], item["target"]
            if not isinstance(prompt, str) or not isinstance(target, str):
                raise SourceError(f"{where}: 'prompt' and 'target' must be strings.")
            prompt_ids = list(tokenizer(prompt)["input_ids"])
            target_ids = list(tokenizer(target, add_special_tokens=False)["input_ids"]) if target else []
            if target_ids and eos is not None:
                target_ids.append(eos)
            if len(prompt_ids) + len(target_ids) > max_length:
                out.dropped_too_long += 1
                continue
            ids, labels = prompt_ids + target_ids, [-100] * len(prompt_ids) + target_ids
        else:
            raise SourceError(f"{where}: expected 'prompt' and 'target', or 'text'; got keys {sorted(item)}.")
        # A label is predicted from the token before it: a loss needs a labelled token after the first.
        if not any(label != -100 for label in labels[1:]):
            out.dropped_empty += 1
            continue
        out.rows.append({"input_ids": ids, "labels": labels})
    return out


def _text_lines(path: Path) -> Iterator[str]:
    """The lines of a UTF-8 text file, read as needed; a byte-order mark (some editors write one) is dropped."""
    with open(path, encoding="utf-8-sig") as f:
        read = 0
        try:
            for line in f:
                read += 1
                yield line
        except UnicodeDecodeError:  # decoded a block at a time: the bad byte is at or shortly after that line
            raise SourceError(f"{path}: not UTF-8 text (near line {read + 1}).") from None


def _describe_drops(examples: Examples) -> str:
    parts = [f"{examples.lines} example lines"]
    if examples.dropped_empty:
        parts.append(f"{examples.dropped_empty} with no token to learn (empty target or text)")
    if examples.dropped_too_long:
        parts.append(f"{examples.dropped_too_long} longer than --max-length")
    return ", ".join(parts)


def split_examples(
    train: Examples, eval_examples: Optional[Examples], fraction: float, seed: int
) -> tuple[list[dict], list[dict]]:
    """(train rows, eval rows): the given eval file, or a seeded held-out share of the training examples."""
    rows = list(train.rows)
    if eval_examples is not None:
        return rows, list(eval_examples.rows)
    if fraction <= 0 or len(rows) < 2:
        return rows, []
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    n_eval = min(max(1, round(fraction * len(rows))), len(rows) - 1)
    held = set(order[:n_eval])
    return [r for i, r in enumerate(rows) if i not in held], [rows[i] for i in sorted(held)]


def collate(rows: Sequence[dict], pad_id: int, device: Any = "cpu") -> dict[str, Any]:
    """Right-padded batch of {"input_ids", "labels"} rows (the examples and benchmarks use it too); padding is masked
    out of attention and loss."""
    import torch

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


def eval_loss(model: Any, rows: Sequence[dict], pad_id: int, device: Any, autocast: Any, batch_size: int) -> float:
    """Mean cross-entropy per labelled token over `rows` (token-weighted: batch boundaries do not matter)."""
    import torch

    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(rows), batch_size):
            batch = collate(rows[start : start + batch_size], pad_id, device)
            with autocast():
                logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
            labels = batch["labels"][:, 1:]
            total += torch.nn.functional.cross_entropy(
                logits[:, :-1].reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100, reduction="sum"
            ).item()
            count += int((labels != -100).sum())
    model.train(was_training)
    return total / max(count, 1)


# ---------------------------------------------------------------------------------------------------- the command


def _schedule(step: int, options: TrainOptions) -> float:
    """Linear warmup, then linear decay to 10% at the last step (as the project's LoRA trainer)."""
    warm = min(1.0, (step + 1) / max(options.warmup, 1))
    if step < options.warmup:
        return warm
    return 1.0 - 0.9 * step / max(options.steps - 1, 1)


def _cluster_arg(text: str, adapter_names: Sequence[str]) -> Any:
    if text == "auto" or text in adapter_names:
        return text
    if text.isdigit():
        return int(text)
    raise UsageError(f"--cluster must be auto, a cluster id or an adapter of the bundle, got {text!r}.")


def train(
    ref: str,
    name: str,
    data: Path,
    output: Any,
    options: TrainOptions,
    *,
    revision: Optional[str] = None,
    progress: bool = True,
    log: Log = lambda message: None,
) -> Any:
    """Train adapter `name` in the basis of bundle `ref` on `data` and write the bundle with it appended."""
    import torch
    from peft import PeftModel
    from tqdm.auto import tqdm

    import peft_jdlora
    from peft_jdlora.bundle import read_config
    from peft_jdlora.compression import AdapterReadError

    from . import pipeline
    from .sources import file_sha256
    from .verify import _load_base, find_base_model

    pipeline._check_output(output)
    folder, where = pipeline.locate_bundle(ref, revision=revision, progress=progress)
    config = read_config(folder)
    if name in config.adapter_names:
        raise SourceError(
            f"the bundle already holds an adapter named {name!r} (index {config.adapter_names.index(name)}): choose "
            "another --name, or remove it first (`jdlora remove`)."
        )
    cluster = _cluster_arg(options.cluster, config.adapter_names)
    recorded_base = config.base_model_name_or_path
    inputs = [("the bundle being changed", folder)] if where["type"] == "local" else []
    if options.init.startswith("project:"):
        inputs.append(("the LoRA folder of --init", Path(options.init.removeprefix("project:")).expanduser()))
    verify = pipeline.VerifyOptions(base_model=options.base_model)
    pipeline._check_output_location(output, inputs + pipeline._local_base_model(verify, recorded_base))
    _refuse_output_over_files(output, [("--data", data), ("--eval-data", options.eval_data)])

    base_folder, base_name, reason = find_base_model(options.base_model, recorded_base, lambda: _hub(progress))
    if base_folder is None:
        raise SourceError(f"no base model to train on: {reason}.")
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(base_folder))
    except (OSError, ValueError) as err:
        raise SourceError(f"the base model {base_name} has no usable tokenizer: {err}") from None
    examples = read_examples(data, tokenizer, options.max_length)
    if not examples.rows:
        raise SourceError(f"--data {data} tokenises to nothing to train on: {_describe_drops(examples)}.")
    eval_examples = read_examples(options.eval_data, tokenizer, options.max_length) if options.eval_data else None
    if eval_examples is not None and not eval_examples.rows:
        raise SourceError(f"--eval-data {options.eval_data} tokenises to nothing: {_describe_drops(eval_examples)}.")
    train_rows, eval_rows = split_examples(examples, eval_examples, options.eval_fraction, options.seed)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad_id is None:
        pad_id = 0  # padding is masked out of attention and loss: any id works

    device = torch.device(options.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    autocast = _autocast(options.autocast, device)
    log(f"loading the base model {base_name}")
    base = _load_base(base_folder, config.task_type, str(device))
    model = PeftModel.from_pretrained(base, str(folder), is_trainable=True)
    rng = random.Random(options.seed)

    def batches() -> Any:
        """Endless epochs, each a fresh seeded permutation cut into full batches (all rows when fewer)."""
        size = min(options.batch_size, len(train_rows))
        while True:
            order = list(range(len(train_rows)))
            rng.shuffle(order)
            for start in range(0, len(order) - size + 1, size):
                yield collate([train_rows[i] for i in order[start : start + size]], pad_id, device)

    stream = batches()
    probe = [next(stream) for _ in range(PROBE_BATCHES)] if cluster == "auto" else None
    try:
        adapter = peft_jdlora.add_trainable_adapter(
            model, name, init=options.init, cluster=cluster, probe_batches=probe
        )
    except AdapterReadError as err:  # the LoRA of --init project:...
        raise SourceError(f"--init {options.init}: {err}") from None
    except peft_jdlora.TrainingSetupError as err:  # its refusals only: any other error is a bug, not a usage error
        raise UsageError(str(err)) from None
    adapter.record_data(
        sha256=file_sha256(data),
        file=str(data.resolve()),
        examples=len(train_rows),
        eval_examples=len(eval_rows),
        lr=options.lr,
        batch_size=options.batch_size,
        max_length=options.max_length,
        seed=options.seed,
    )
    if options.gradient_checkpointing:
        peft_jdlora.enable_activation_checkpointing(model)
    log(
        f"training {name!r}: {adapter.num_trainable_params:,} numbers (Σ of {len(adapter.sigma)} modules) in cluster "
        f"{adapter.cluster_choice['default_cluster']} ({adapter.cluster_choice['method']}), {len(train_rows)} train / "
        f"{len(eval_rows)} eval examples"
    )
    loss_before = eval_loss(model, eval_rows, pad_id, device, autocast, options.batch_size) if eval_rows else None
    params = adapter.parameters()
    optimizer = torch.optim.AdamW(params, lr=options.lr, weight_decay=options.weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: _schedule(s, options))
    torch.manual_seed(options.seed)  # dropout
    model.train()
    losses: list[float] = []
    start = time.perf_counter()
    bar = tqdm(range(options.steps), desc=f"Training {name}", unit="step", disable=not progress)
    try:
        for step in bar:
            batch = next(stream) if probe is None or step >= len(probe) else probe[step]
            with autocast():
                loss = model(**batch).loss
            if not math.isfinite(loss.item()):
                raise peft_jdlora.NonFiniteLossError(f"the loss is {loss.item()} at step {step + 1}")
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            diverged = adapter.nonfinite_module()
            if diverged is not None:
                raise peft_jdlora.NonFiniteLossError(
                    f"the trained numbers are not finite after step {step + 1} (Σ at {diverged})"
                )
            schedule.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(loss.item())
            bar.set_postfix(loss=f"{losses[-1]:.4f}")
    except peft_jdlora.NonFiniteLossError as err:
        raise TrainingError(
            f"training {name!r} stopped: {err}. Lower --lr (or drop --autocast fp16); nothing was written."
        ) from None
    finally:
        bar.close()
    seconds = time.perf_counter() - start
    loss_after = eval_loss(model, eval_rows, pad_id, device, autocast, options.batch_size) if eval_rows else None
    if loss_after is not None and not math.isfinite(loss_after):
        raise TrainingError(f"the evaluation loss of {name!r} after training is {loss_after}; nothing was written.")
    record = {
        "name": name,
        "steps": options.steps,
        "lr": options.lr,
        "batch_size": options.batch_size,
        "init": options.init.partition(":")[0],  # the LoRA folder of project:... is in adapter_sources (init_lora)
        "cluster": adapter.cluster_choice["default_cluster"],
        "cluster_choice": adapter.cluster_choice,
        "trainable_params": adapter.num_trainable_params,
        "train_examples": len(train_rows),
        "eval_examples": len(eval_rows),
        "dropped": {"empty": examples.dropped_empty, "too_long": examples.dropped_too_long},
        "truncated": examples.truncated,
        "eval_loss_before": loss_before,
        "eval_loss_after": loss_after,
        "train_loss_first": losses[0],
        "train_loss_last": sum(losses[-5:]) / len(losses[-5:]),
        "seconds": round(seconds, 3),
        "seconds_per_step": round(seconds / options.steps, 4),
        "device": str(device),
        "data_sha256": adapter.data_sha256,
    }
    adapter.record_data(eval_loss_before=loss_before, eval_loss_after=loss_after)
    result_bundle = peft_jdlora.training.trained_bundle(model)
    result_bundle.report.training[name] = record
    _write(result_bundle, adapter, output, log)
    log(f"wrote {output.out} ({name!r} appended, trained in the bundle's basis)")
    pushed = pipeline._push(output, log)
    from .card import adapter_rows, bundle_summary

    return pipeline.Result(
        command="train",
        out=str(output.out),
        adapters=adapter_rows(result_bundle.config, result_bundle.report),
        summary=bundle_summary(result_bundle.config, result_bundle.report),
        push=pushed,
        extra={"trained": record, "bundle": where},
    )


def _refuse_output_over_files(output: Any, files: Sequence[tuple[str, Optional[Path]]]) -> None:
    """An output folder that holds an input file would delete it when it is replaced."""
    if output.in_place:
        return
    out = Path(output.out).expanduser().resolve()
    for what, path in files:
        if path is not None and path.expanduser().resolve().is_relative_to(out):
            raise UsageError(f"--out {output.out} contains {what} {path}: replacing it would delete that file.")


def _hub(progress: bool) -> Any:
    from .sources import HubClient

    return HubClient(progress=progress)


def _autocast(kind: Optional[str], device: Any) -> Callable[[], Any]:
    import contextlib

    import torch

    if kind is None:
        return contextlib.nullcontext
    dtype = torch.bfloat16 if kind == "bf16" else torch.float16
    return lambda: torch.autocast(device_type=device.type, dtype=dtype)


def _write(bundle: Any, adapter: Any, output: Any, log: Log) -> None:
    """Write the bundle as the other commands do: staged, verified by reading it back, swapped in with signals
    held; the report and card last."""
    from peft_jdlora.bundle import CARD_NAME, REPORT_NAME, atomic_output_dir, write_bundle_files
    from peft_jdlora.training import trained_card

    from .errors import OutputExistsError
    from .output import staged_bundle_update
    from .signals import held_signals
    from .verify import check_reload

    destination = (
        staged_bundle_update(output.out) if output.in_place else atomic_output_dir(output.out, output.overwrite)
    )
    try:
        with held_signals(start=False) as hold_signals, destination as tmp:
            write_bundle_files(bundle, tmp, with_report=False)
            check_reload(bundle, tmp)
            card = trained_card(bundle, adapter, title=output.out.resolve().name)
            (tmp / REPORT_NAME).write_text(bundle.report.to_json())
            (tmp / CARD_NAME).write_text(card)
            hold_signals()
    except FileExistsError as err:
        raise OutputExistsError(str(err)) from None


def format_lines(result: Any) -> list[str]:
    """The `train` part of the text summary."""
    from .card import format_error

    t = result.extra.get("trained") or {}
    if not t:
        return []
    lines = [
        f"trained:       {t['name']}: {t['steps']} steps, {t['trainable_params']:,} numbers, cluster {t['cluster']} "
        f"({t['cluster_choice']['method']}), {t['seconds_per_step']:.3f} s/step",
    ]
    if t.get("eval_loss_before") is not None:
        lines.append(
            f"eval loss:     {t['eval_loss_before']:.4f} -> {t['eval_loss_after']:.4f} on {t['eval_examples']} "
            "held-out examples"
        )
    else:
        lines.append("eval loss:     n/a (no held-out examples)")
    lines.append(f"train loss:    {format_error(t['train_loss_first'])} -> {format_error(t['train_loss_last'])}")
    return lines
