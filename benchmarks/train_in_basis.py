"""Train held-out tasks inside a bundle's basis (Σ only) against ordinary LoRAs: SmolLM2-135M-Instruct, real tasks.

Some tasks are held out; LoRAs of the others (r 16, q/v, `benchmarks/train_collection.py`'s trainer and settings)
are compressed into two bundles, JD-Full r=16 with one basis and with two clusters. Then, for each held-out task,
with the same steps, batches (same order), schedule and clipping:

- `lora`: an ordinary PEFT LoRA (r 16, alpha 32, q_proj/v_proj), trained in lockstep with
- `sigma`: Σ only from zeros in the one-basis bundle (`peft_jdlora.add_trainable_adapter`); the two alternate step
  by step, so their seconds per step are timed interleaved, in one run;
- `add`: `jdlora add` of that trained LoRA, i.e. its projection into the one-basis bundle (same bundle size as
  `sigma`: both add r² numbers per module);
- `add+sigma`: Σ only starting from that projection (init="project:<LoRA>");
- `cluster 0` / `cluster 1`: Σ only from zeros in each cluster of the two-cluster bundle, and the cluster
  `cluster_scores` picks from the first 4 training batches (the cheap criterion of cluster="auto"), with its cost.

Eval loss: cross-entropy per answer token on the task's held-out examples (teacher forced); "fraction" is the share of
the LoRA's loss reduction that a method reaches, (base − method) / (base − LoRA).

    OMP_NUM_THREADS=1 python benchmarks/train_in_basis.py --threads 1
    OMP_NUM_THREADS=1 python benchmarks/train_in_basis.py --threads 1 --smoke     # 2 steps, a check of the script

Trained LoRAs are cached under <cache>/train_in_basis/ (a rerun with the same settings reuses them); results go to
--out (JSON, rewritten after every task) and --markdown.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the model and the data come from wheels

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # tasks.py, peers.py beside this file
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))  # jdlora_common, shared with the demo

from jdlora_common import (
    TrainConfig,
    cache_root,
    collate,
    eval_loss,
    load_smollm2,
    task_splits,
    tokenize_examples,
    train_collection,
    write_json_atomic,
)
from peers import machine
from tasks import get_task

import peft_jdlora

BUNDLE_TASKS = "trec_fine,sms_spam,vader_tweets,vader_amazon,warriner_arousal,cmu_syllables"
HELD_OUT = "trec_coarse,vader_movies,warriner_valence,cmu_g2p"
PROBE_BATCHES = 4


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bundle-tasks", default=BUNDLE_TASKS, help="tasks whose LoRAs make the bundles")
    p.add_argument("--held-out", default=HELD_OUT, help="tasks trained as LoRA and Σ-only")
    p.add_argument("--steps", type=int, default=32)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--rank", type=int, default=16, help="LoRA rank and bundle rank")
    p.add_argument("--lora-lr", type=float, default=1e-3, help="the collection's LoRA learning rate")
    p.add_argument(
        "--sigma-lr",
        type=float,
        default=1e-2,
        help="Σ-only learning rate (fixed before the run: Σ carries the whole update's scale, LoRA's A and B share it)",
    )
    p.add_argument("--n-eval", type=int, default=40)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--cache", type=Path, default=None, help="default: <cache>/train_in_basis")
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "train_in_basis.json")
    p.add_argument("--markdown", type=Path, default=None, help="default: --out with .md")
    p.add_argument("--smoke", action="store_true", help="2 steps, 2 bundle tasks, 1 held-out task, 8 eval rows")
    return p.parse_args(argv)


def load_average() -> str:
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "n/a"


# ---------------------------------------------------------------------------------------------------- training


def fixed_batches(rows: list[dict], config: TrainConfig, seed: int, pad_id: int) -> list[dict[str, torch.Tensor]]:
    """The batches `train_lora` draws (epochs of a seeded permutation), as a list: every method sees the same ones."""
    order, pool, out = random.Random(seed), [], []
    for _ in range(config.steps):
        if len(pool) < config.batch_size:
            fresh = list(range(len(rows)))
            order.shuffle(fresh)
            pool += fresh
        out.append(collate([rows[i] for i in pool[: config.batch_size]], pad_id))
        del pool[: config.batch_size]
    return out


class Trainer:
    """One model's optimiser and schedule as in `train_lora`: AdamW (no weight decay), linear warmup, then linear
    decay to 10%, gradients clipped at norm 1."""

    def __init__(self, model: Any, params: list[torch.nn.Parameter], lr: float, config: TrainConfig) -> None:
        self.model, self.params = model, params
        self.optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
        self.schedule = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer,
            lambda s: (
                min(1.0, (s + 1) / max(config.warmup, 1))
                * (1.0 - 0.9 * s / max(config.steps - 1, 1) if s >= config.warmup else 1.0)
            ),
        )
        self.seconds: list[float] = []
        self.losses: list[float] = []

    def step(self, batch: dict[str, torch.Tensor]) -> None:
        self.model.train()
        start = time.perf_counter()
        loss = self.model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, 1.0)
        self.optimizer.step()
        self.schedule.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.seconds.append(time.perf_counter() - start)
        self.losses.append(loss.item())

    def summary(self) -> dict[str, Any]:
        return {
            "median_s_per_step": round(statistics.median(self.seconds), 4),
            "train_loss_first": round(self.losses[0], 4),
            "train_loss_last5": round(sum(self.losses[-5:]) / len(self.losses[-5:]), 4),
        }


def sigma_model(base: Any, bundle_dir: Path, name: str, **kwargs: Any) -> tuple[Any, Any]:
    from peft import PeftModel

    model = PeftModel.from_pretrained(base, str(bundle_dir), is_trainable=True)
    return model, peft_jdlora.add_trainable_adapter(model, name, **kwargs)


def release(model: Any, adapter: Any = None) -> Any:
    """The base model back, without adapter layers or hooks."""
    if adapter is not None:
        adapter.close()
    return model.unload()


def train_sigma_only(
    base: Any,
    bundle_dir: Path,
    name: str,
    batches: list,
    eval_rows: list,
    pad_id: int,
    lr: float,
    config: TrainConfig,
    **kwargs: Any,
) -> tuple[Any, dict[str, Any]]:
    model, adapter = sigma_model(base, bundle_dir, name, **kwargs)
    before = eval_loss(model, eval_rows, pad_id)
    trainer = Trainer(model, adapter.parameters(), lr, config)
    for batch in batches:
        trainer.step(batch)
    record = {
        "eval_loss_before": round(before, 4),
        "eval_loss": round(eval_loss(model, eval_rows, pad_id), 4),
        "trainable_params": adapter.num_trainable_params,
        "cluster": adapter.cluster_choice["default_cluster"],
        **trainer.summary(),
    }
    return release(model, adapter), record


# ---------------------------------------------------------------------------------------------------- one task


def held_out_task(
    name: str,
    bases: list[Any],
    tokenizer: Any,
    bundles: dict[int, Path],
    config: TrainConfig,
    args: argparse.Namespace,
    lora_dir: Path,
    log: Callable[[str], None],
) -> dict[str, Any]:
    from peft import LoraConfig, get_peft_model

    task = get_task(name)
    seed = config.task_seed(name)
    splits = task_splits(task, seed=seed, n_train=config.n_train, n_eval=config.n_eval)
    train_rows, _ = tokenize_examples(tokenizer, task.instruction, splits["train"], config.seq_len)
    eval_rows, _ = tokenize_examples(tokenizer, task.instruction, splits["eval"], config.seq_len)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    batches = fixed_batches(train_rows, config, seed, pad_id)
    record: dict[str, Any] = {"task": name, "source": task.source, "n_train": len(train_rows), "n_eval": len(eval_rows)}

    # LoRA and Σ-only from zeros, step by step in lockstep (timed interleaved).
    lora_config = LoraConfig(
        r=config.rank,
        lora_alpha=config.alpha,
        lora_dropout=config.dropout,
        target_modules=list(config.target_modules),
        bias="none",
        task_type="CAUSAL_LM",
    )
    torch.manual_seed(seed)  # lora_A's initialisation and dropout, as train_lora
    lora = get_peft_model(bases[0], lora_config)
    record["base"] = {"eval_loss": round(eval_loss(lora, eval_rows, pad_id), 4)}  # B = 0: the base model
    sigma, adapter = sigma_model(bases[1], bundles[1], name, init="zeros")
    lora_trainer = Trainer(lora, [p for p in lora.parameters() if p.requires_grad], args.lora_lr, config)
    sigma_trainer = Trainer(sigma, adapter.parameters(), args.sigma_lr, config)
    for step, batch in enumerate(batches):
        lora_trainer.step(batch)
        sigma_trainer.step(batch)
        if step == 0 or (step + 1) % 8 == 0:
            log(f"  {name} step {step + 1}: LoRA {lora_trainer.losses[-1]:.3f}, Σ {sigma_trainer.losses[-1]:.3f}")
    record["lora"] = {
        "eval_loss": round(eval_loss(lora, eval_rows, pad_id), 4),
        "trainable_params": sum(p.numel() for p in lora.parameters() if p.requires_grad),
        **lora_trainer.summary(),
    }
    record["sigma"] = {
        "eval_loss": round(eval_loss(sigma, eval_rows, pad_id), 4),
        "trainable_params": adapter.num_trainable_params,
        **sigma_trainer.summary(),
    }
    record["step_time_ratio_sigma_over_lora"] = round(
        record["sigma"]["median_s_per_step"] / record["lora"]["median_s_per_step"], 3
    )
    folder = lora_dir / name
    lora.save_pretrained(str(folder))
    bases[0] = lora.unload()
    bases[1] = release(sigma, adapter)
    losses = {k: record[k]["eval_loss"] for k in ("base", "lora", "sigma")}
    log(f"  {name}: eval loss {losses}")

    # `jdlora add` of the trained LoRA (the projection, before any step) and Σ trained on from it.
    bases[1], projected = train_sigma_only(
        bases[1], bundles[1], name, batches, eval_rows, pad_id, args.sigma_lr, config, init=f"project:{folder}"
    )
    record["add"] = {"eval_loss": projected["eval_loss_before"], "trainable_params": projected["trainable_params"]}
    record["add+sigma"] = projected
    log(f"  {name}: jdlora add {record['add']['eval_loss']}, add+Σ {projected['eval_loss']}")

    # Two clusters: the cheap criterion's pick, and Σ-only trained in each cluster.
    if 2 in bundles:
        from peft import PeftModel

        probe_model = PeftModel.from_pretrained(bases[1], str(bundles[2]), is_trainable=True)
        start = time.perf_counter()
        scores = peft_jdlora.cluster_scores(probe_model, batches[:PROBE_BATCHES])["<default>"]
        seconds = time.perf_counter() - start
        bases[1] = probe_model.unload()
        record["clusters"] = {
            "scores": scores["scores"],
            "picked": scores["best"],
            "criterion_seconds": round(seconds, 2),
        }
        for cluster in (0, 1):
            bases[1], trained = train_sigma_only(
                bases[1],
                bundles[2],
                name,
                batches,
                eval_rows,
                pad_id,
                args.sigma_lr,
                config,
                init="zeros",
                cluster=cluster,
            )
            record["clusters"][f"cluster {cluster}"] = trained
        losses = [record["clusters"][f"cluster {c}"]["eval_loss"] for c in (0, 1)]
        record["clusters"]["best"] = int(losses[1] < losses[0])
        record["clusters"]["regret"] = round(losses[scores["best"]] - min(losses), 4)
        log(f"  {name}: clusters {losses}, picked {scores['best']} ({seconds:.1f} s)")

    base_loss, lora_loss = record["base"]["eval_loss"], record["lora"]["eval_loss"]
    gain = base_loss - lora_loss
    for key in ("sigma", "add", "add+sigma"):
        record[key]["fraction"] = round((base_loss - record[key]["eval_loss"]) / gain, 3) if gain > 0 else None
    if "clusters" in record:
        picked = record["clusters"][f"cluster {record['clusters']['picked']}"]
        picked["fraction"] = round((base_loss - picked["eval_loss"]) / gain, 3) if gain > 0 else None
    return record


# ---------------------------------------------------------------------------------------------------- report


def markdown(results: dict[str, Any]) -> str:
    rows = results["tasks"]
    lines = [
        f"Run {results['date']} on {results['machine']}, {results['threads']} torch thread(s); load at start: "
        f"`{results['load_start']}`; at end: `{results['load_end']}`.",
        "",
        "| task | LoRA numbers | Σ numbers | LoRA s/step | Σ s/step | base | LoRA | Σ only | fraction | jdlora add "
        "| fraction | add + Σ | fraction |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['task']} | {r['lora']['trainable_params']:,} | {r['sigma']['trainable_params']:,} | "
            f"{r['lora']['median_s_per_step']:.2f} | {r['sigma']['median_s_per_step']:.2f} | "
            f"{r['base']['eval_loss']:.3f} | "
            f"{r['lora']['eval_loss']:.3f} | {r['sigma']['eval_loss']:.3f} | {r['sigma']['fraction']} | "
            f"{r['add']['eval_loss']:.3f} | {r['add']['fraction']} | {r['add+sigma']['eval_loss']:.3f} | "
            f"{r['add+sigma']['fraction']} |"
        )
    s = results["summary"]
    lines += [
        "",
        f"Median fraction of the LoRA's loss reduction: Σ only {s['median_fraction_sigma']}, jdlora add "
        f"{s['median_fraction_add']}, add + Σ {s['median_fraction_add_sigma']}; Σ-only trainable numbers / LoRA's: "
        f"1/{s['lora_over_sigma_params']:.0f}; Σ-only s/step / LoRA s/step (median over tasks, interleaved): "
        f"{s['median_step_time_ratio']}.",
    ]
    if any("clusters" in r for r in rows):
        lines += [
            "",
            "| task | criterion scores (cluster 0, 1) | picked | criterion s | Σ only, cluster 0 | Σ only, cluster 1 "
            "| regret |",
            "|---|---|---:|---:|---:|---:|---:|",
        ]
        for r in rows:
            c = r.get("clusters")
            if c:
                scores = ", ".join(f"{v:.3g}" for v in c["scores"])
                lines.append(
                    f"| {r['task']} | {scores} | {c['picked']} | {c['criterion_seconds']:.1f} | "
                    f"{c['cluster 0']['eval_loss']:.3f} | {c['cluster 1']['eval_loss']:.3f} | {c['regret']:.3f} |"
                )
    return "\n".join(lines) + "\n"


def summarise(rows: list[dict[str, Any]]) -> dict[str, Any]:
    def median(key: str) -> Any:
        values = [r[key]["fraction"] for r in rows if r[key]["fraction"] is not None]
        return round(statistics.median(values), 3) if values else None

    return {
        "median_fraction_sigma": median("sigma"),
        "median_fraction_add": median("add"),
        "median_fraction_add_sigma": median("add+sigma"),
        "lora_over_sigma_params": rows[0]["lora"]["trainable_params"] / rows[0]["sigma"]["trainable_params"],
        "median_step_time_ratio": round(statistics.median(r["step_time_ratio_sigma_over_lora"] for r in rows), 3),
        "clusters_picked_best": sum(r["clusters"]["picked"] == r["clusters"]["best"] for r in rows if "clusters" in r),
        "clusters_tasks": sum("clusters" in r for r in rows),
    }


# ---------------------------------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    from peft_jdlora.bundle import save_bundle
    from peft_jdlora.compression import compress

    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    bundle_tasks = [t for t in args.bundle_tasks.split(",") if t]
    held_out = [t for t in args.held_out.split(",") if t]
    if args.smoke:
        args.steps, args.n_eval, bundle_tasks, held_out = 2, 8, bundle_tasks[:2], held_out[:1]
    overlap = set(bundle_tasks) & set(held_out)
    if overlap:
        raise SystemExit(f"tasks both in the bundle and held out: {sorted(overlap)}")
    config = TrainConfig(
        steps=args.steps,
        batch_size=args.batch_size,
        seq_len=args.seq_len,
        rank=args.rank,
        alpha=2 * args.rank,
        lr=args.lora_lr,
        n_eval=args.n_eval,
    )
    cache = (args.cache or cache_root() / "train_in_basis").expanduser()
    tag = f"s{config.steps}-b{config.batch_size}-l{config.seq_len}-r{config.rank}-lr{config.lr:g}-e{config.n_eval}"
    root = cache / tag
    log = lambda s: print(s, flush=True)  # noqa: E731
    results: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": machine(),
        "threads": torch.get_num_threads(),
        "load_start": load_average(),
        "settings": {**vars(args), "cache": str(root), "out": str(args.out), "markdown": str(args.markdown)},
        "bundle_tasks": bundle_tasks,
        "tasks": [],
    }
    log(f"load: {results['load_start']}")
    base, tokenizer = load_smollm2()
    base, folders, records = train_collection(
        base, tokenizer, [get_task(n) for n in bundle_tasks], config, root / "collection", log
    )
    results["collection"] = {
        r["task"]: {k: r[k] for k in ("loss_before", "loss_after", "seconds_per_step")} for r in records
    }
    bundles = {}
    for clusters in (1, 2):
        bundle = compress(
            [str(f) for f in folders], rank=args.rank, sigma="full", clusters=clusters, device="cpu", progress=False
        )
        bundles[clusters] = save_bundle(bundle, root / f"bundle-c{clusters}", overwrite=True)
        results[f"bundle_c{clusters}"] = {
            "mean_error": bundle.report.overall.mean_error,
            "assignment": bundle.config.adapter_clusters,
            "bytes": bundle.report.size.bytes_bundle,
        }
        log(f"bundle with {clusters} cluster(s): mean error {bundle.report.overall.mean_error:.4f}")
    bases = [base, load_smollm2()[0]]
    for name in held_out:
        log(f"[held out] {name}")
        results["tasks"].append(held_out_task(name, bases, tokenizer, bundles, config, args, root / "held_out", log))
        results["summary"] = summarise(results["tasks"])
        results["load_end"] = load_average()
        write_json_atomic(args.out, results)
    markdown_path = args.markdown or args.out.with_suffix(".md")
    markdown_path.write_text(markdown(results))
    log(markdown(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
