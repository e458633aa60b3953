"""Paired timing of greedy generation: the base model, one LoRA, and a JD-LoRA bundle with 1000 resident adapters and
every row a different adapter, run in rotation so each round times all three under the same machine state.

    python benchmarks/serving_paired.py --rounds 30 --threads 2 --out benchmarks/results/serving_cpu_paired.json

Reports, per method, the median and the interquartile range of the per-round ratio to the base model (the ratio of
two runs seconds apart, so slow drifts of a shared machine cancel), which is what the serving targets are about.
Shapes and adapters as in benchmarks/serving.py (4-layer SmolLM2-135M-shaped Llama, 32 rows, prompt 32, 16 new tokens).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch
from peft import PeftModel
from serving import cpu_name, lora_folders, make_base, random_bundle_for


def quartiles(values: list[float]) -> tuple[float, float, float]:
    q1, median, q3 = statistics.quantiles(values, n=4)
    return q1, median, q3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--resident", type=int, default=1000)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    root = Path(tempfile.mkdtemp(prefix="jdlora-serving-"))
    folder = lora_folders(make_base(args.layers, "cpu", torch.float32), 1, 16, root)[0]
    bundle = random_bundle_for(make_base(args.layers, "cpu", torch.float32), args.resident, 16, root)
    models = {
        "base model": make_base(args.layers, "cpu", torch.float32),
        "one LoRA": PeftModel.from_pretrained(make_base(args.layers, "cpu", torch.float32), folder).eval(),
        "JD-LoRA adapter_ids": PeftModel.from_pretrained(make_base(args.layers, "cpu", torch.float32), bundle).eval(),
    }
    prompt = torch.randint(3, 49152, (32, 32), generator=torch.Generator().manual_seed(0))
    rows = [f"lora_{i % args.resident:04d}" for i in range(32)]
    kwargs = {"max_new_tokens": 16, "min_new_tokens": 16, "do_sample": False, "pad_token_id": 0}
    extra = {"JD-LoRA adapter_ids": {"adapter_ids": rows}}
    seconds: dict[str, list[float]] = {name: [] for name in models}
    with torch.no_grad():
        for name, model in models.items():  # warm-up
            model.generate(input_ids=prompt, **kwargs, **extra.get(name, {}))
        for _ in range(args.rounds):
            for name, model in models.items():
                start = time.perf_counter()
                model.generate(input_ids=prompt, **kwargs, **extra.get(name, {}))
                seconds[name].append(time.perf_counter() - start)
    machine = f"{cpu_name()}, {args.threads} threads"
    result = {"machine": machine, "args": vars(args) | {"out": str(args.out)}, "methods": {}}
    for name, times in seconds.items():
        ratios = [b / t for b, t in zip(seconds["base model"], times)]  # tokens/s relative to the base model
        q1, median, q3 = quartiles(ratios)
        tokens_per_s = 32 * 16 / statistics.median(times)
        result["methods"][name] = {"tokens_per_s": tokens_per_s, "vs_base_median": median, "vs_base_iqr": [q1, q3]}
        print(f"{name:<22} {tokens_per_s:7.1f} tok/s   vs base: median {median:.3f} (IQR {q1:.3f}–{q3:.3f})")
    print(f"machine: {machine}; {args.rounds} rounds")
    if args.out:
        args.out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
