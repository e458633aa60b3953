"""Serving throughput with the PEFT / transformers stack: a batch in which every row uses a different adapter.

Compares, on one model and one batch shape, for 1, 8, 64, 256 and 1000 resident adapters:
  (a) the base model, (b) one LoRA, (c) PEFT LoRA with all adapters loaded and `adapter_names=` per row,
  (d) the JD-LoRA bundle with `adapter_ids=` per row (the default shape: one shared basis per module), and a bundle of
      per-adapter SVD on every module (the shape budget plans pick for unrelated adapters; `--svd-rank`),
and reports tokens/s of greedy generation and of a prefill forward, plus the resident adapter memory.

    python benchmarks/serving.py --out serving.json                      # CPU, 4-layer 576-wide Llama
    python benchmarks/serving.py --device cuda --dtype bfloat16 --model llama-4096 --layers 8 --out gpu.json

Adapters are random (LoRA r=16 on q_proj/v_proj, nonzero B) and the bundle is a random one of the same rank and
targets: throughput depends on shapes, not values. Not a test; run it alone (two torch jobs on 2 cores slow each other
down many times over).
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import tempfile
import time
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

import peft_jdlora
from peft_jdlora import JDLoraConfig, save_bundle
from peft_jdlora.bundle import Bundle, ModuleFactors

# Model shapes: SmolLM2-135M (the CPU default), Llama-2-7B's (4096 wide, the GPU run), and a tiny one (rehearsals).
MODEL_SHAPES = {
    "smollm2": dict(
        vocab_size=49152,
        hidden_size=576,
        intermediate_size=1536,
        num_attention_heads=9,
        num_key_value_heads=3,
        tie_word_embeddings=True,
    ),
    "llama-4096": dict(
        vocab_size=32000,
        hidden_size=4096,
        intermediate_size=11008,
        num_attention_heads=32,
        num_key_value_heads=32,
        tie_word_embeddings=False,
    ),
    "tiny": dict(
        vocab_size=512,
        hidden_size=64,
        intermediate_size=96,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=True,
    ),
}


def make_base(layers: int, device: str, dtype: torch.dtype, shape: str = "smollm2") -> LlamaForCausalLM:
    """A random-weight Llama of MODEL_SHAPES[shape] with `layers` layers, built on `device` in `dtype`.

    Built on the device itself (no CPU copy first: a 4096-wide model would take minutes to initialise there).
    `device="meta"` gives the shapes alone, for code that only reads module sizes.
    """
    torch.manual_seed(0)
    config = LlamaConfig(**MODEL_SHAPES[shape], num_hidden_layers=layers, max_position_embeddings=2048, pad_token_id=0)
    with torch.device(device):
        model = LlamaForCausalLM(config)
    # Frozen like every served model (and like the base under a PeftModel): on CPU, torch.matmul folds a strided
    # [B, 1, d] lm_head input into one mm only when the weight requires grad, and otherwise runs a batched mm against
    # an expanded weight, several times slower; an unfrozen base would get the fast path the adapted models cannot.
    return model.to(dtype=dtype).eval().requires_grad_(False)


def adapter_writer_base(layers: int, shape: str) -> LlamaForCausalLM:
    """A CPU base whose weights are left uninitialised: LoRA folders save only the adapters' own (random) weights."""
    return make_base(layers, "meta", torch.float32, shape).to_empty(device="cpu")


def lora_folders(base: LlamaForCausalLM, count: int, rank: int, root: Path) -> list[Path]:
    folders = []
    config = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    model = get_peft_model(base, config)
    for i in range(count):
        torch.manual_seed(1000 + i)
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.data.normal_(0, 0.02)
        folder = root / f"lora_{i:04d}"
        model.save_pretrained(folder)
        folders.append(folder)
    model.unload()
    return folders


def qv_shapes(base: LlamaForCausalLM) -> dict[str, tuple[int, int]]:
    """{module: (d_out, d_in)} of the q_proj / v_proj projections the adapters target."""
    return {
        name: (module.out_features, module.in_features)
        for name, module in base.named_modules()
        if name.endswith(("q_proj", "v_proj")) and isinstance(module, torch.nn.Linear)
    }


def random_bundle_for(base: LlamaForCausalLM, count: int, rank: int, root: Path) -> Path:
    """The default bundle's shape: one shared basis of `rank` per module, full Σ."""
    names = [f"lora_{i:04d}" for i in range(count)]
    modules = {}
    gen = torch.Generator().manual_seed(0)
    for name, (d_out, d_in) in qv_shapes(base).items():
        U = torch.linalg.qr(torch.randn(d_out, rank, generator=gen))[0][None]
        V = torch.linalg.qr(torch.randn(d_in, rank, generator=gen))[0].T[None]
        sigma = 0.02 * torch.randn(count, rank, rank, generator=gen)  # [N, r, r]
        modules[name] = ModuleFactors(U.contiguous(), V.contiguous(), sigma)
    config = JDLoraConfig(target_modules=sorted(modules), r=rank, adapter_names=names, task_type="CAUSAL_LM")
    path = root / f"bundle_{count}"
    save_bundle(Bundle(config=config, modules=modules), path)
    return path


def svd_bundle_for(base: LlamaForCausalLM, count: int, rank: int, root: Path) -> Path:
    """The shape budget plans choose on unrelated adapters: per-adapter SVD of `rank` (a singleton cluster per
    adapter, diagonal Σ) on every module."""
    names = [f"lora_{i:04d}" for i in range(count)]
    modules = {}
    gen = torch.Generator().manual_seed(1)
    for name, (d_out, d_in) in qv_shapes(base).items():
        U = torch.linalg.qr(torch.randn(count, d_out, rank, generator=gen))[0]  # [N, d_out, q]
        V = torch.linalg.qr(torch.randn(count, d_in, rank, generator=gen))[0].mT  # [N, q, d_in]
        sigma = 0.02 * torch.randn(count, rank, generator=gen)  # [N, q]
        modules[name] = ModuleFactors(U.contiguous(), V.contiguous(), sigma)
    config = JDLoraConfig(
        target_modules=sorted(modules),
        r=rank,
        sigma_type="diag",
        num_clusters=count,
        adapter_clusters=list(range(count)),
        adapter_names=names,
        task_type="CAUSAL_LM",
    )
    path = root / f"svd_bundle_{count}"
    save_bundle(Bundle(config=config, modules=modules), path)
    return path


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "cpu"


def timed_against(fn, reference_fn, repeats: int, device: str) -> tuple[float, float]:
    """Median seconds of `fn()` and of `reference_fn()` over `repeats` interleaved runs after one warm-up each.

    Interleaving makes the ratio of the two robust to load that drifts during the benchmark.
    """
    fn()
    reference_fn()
    times: tuple[list[float], list[float]] = ([], [])
    for _ in range(repeats):
        for f, bucket in ((fn, times[0]), (reference_fn, times[1])):
            if device == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            f()
            if device == "cuda":
                torch.cuda.synchronize()
            bucket.append(time.perf_counter() - start)
    return tuple(sorted(bucket)[len(bucket) // 2] for bucket in times)


def adapter_bytes(model: torch.nn.Module, marker: str) -> int:
    return sum(p.numel() * p.element_size() for n, p in model.named_parameters() if marker in n)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default=None, help="float32 (CPU default) or bfloat16 (GPU default)")
    parser.add_argument("--model", choices=sorted(MODEL_SHAPES), default="smollm2", help="shapes of the random model")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--batch", type=int, default=32, help="rows per batch; each row a different adapter")
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--resident", default="1,8,64,256,1000", help="numbers of resident adapters")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--skip-peft-above", type=int, default=1000, help="skip PEFT adapter_names above this count")
    parser.add_argument(
        "--svd-rank",
        type=int,
        default=2,
        help="also time a bundle of per-adapter SVD of this rank on every module (the shape budget plans pick for "
        "unrelated adapters); 0 skips it",
    )
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if args.device == "cuda" else torch.float32)
    counts = [int(c) for c in args.resident.split(",")]
    machine = torch.cuda.get_device_name() if args.device == "cuda" else f"{cpu_name()}, {args.threads} threads"

    vocab = MODEL_SHAPES[args.model]["vocab_size"]
    prompt = torch.randint(3, vocab, (args.batch, args.prompt_len), generator=torch.Generator().manual_seed(0))
    prompt = prompt.to(args.device)
    gen_kwargs = {
        "max_new_tokens": args.new_tokens,
        "min_new_tokens": args.new_tokens,
        "do_sample": False,
        "pad_token_id": 0,
    }
    tokens_generated = args.batch * args.new_tokens
    tokens_prefilled = args.batch * args.prompt_len
    results = {
        "machine": machine,
        "device": args.device,
        "dtype": str(dtype),
        "args": vars(args) | {"out": str(args.out)},
        "rows": [],
    }

    def measure(label: str, count: int, model, extra: dict, memory: int) -> None:
        """Times `model` interleaved with the base model, so each row carries its own ratio to the base."""
        with torch.no_grad():
            generate_s, base_generate_s = timed_against(
                lambda: model.generate(input_ids=prompt, **gen_kwargs, **extra),
                lambda: base.generate(input_ids=prompt, **gen_kwargs),
                args.repeats,
                args.device,
            )
            prefill_s, base_prefill_s = timed_against(
                lambda: model(input_ids=prompt, **extra), lambda: base(input_ids=prompt), args.repeats, args.device
            )
        row = {
            "method": label,
            "resident": count,
            "distinct_in_batch": len(set(extra.get("adapter_ids", extra.get("adapter_names", [None])))),
            "decode_tokens_per_s": tokens_generated / generate_s,
            "prefill_tokens_per_s": tokens_prefilled / prefill_s,
            "decode_vs_base": base_generate_s / generate_s,
            "prefill_vs_base": base_prefill_s / prefill_s,
            "adapter_bytes": memory,
        }
        results["rows"].append(row)
        if args.out:  # after every row: a run stopped at a time limit keeps what it measured
            args.out.write_text(json.dumps(results, indent=2))
        print(
            f"{label:<22} resident={count:>5} distinct={row['distinct_in_batch']:>3} "
            f"generate {row['decode_tokens_per_s']:9.1f} tok/s ({row['decode_vs_base']:.3f}x base)  "
            f"prefill {row['prefill_tokens_per_s']:9.1f} tok/s ({row['prefill_vs_base']:.3f}x base)  "
            f"adapters {memory / 2**20:8.2f} MiB",
            flush=True,
        )

    def served_base() -> LlamaForCausalLM:
        return make_base(args.layers, args.device, dtype, args.model)

    shapes_only = make_base(args.layers, "meta", torch.float32, args.model)  # module sizes for the bundle builders
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        # Every file first: writing a thousand adapters between two measurements leaves the process (allocator,
        # page cache) in a state that slowed the next model by up to 15% in early runs.
        peft_counts = [count for count in counts if count <= args.skip_peft_above]
        folders = lora_folders(adapter_writer_base(args.layers, args.model), max([1, *peft_counts]), args.rank, root)
        bundles = {count: random_bundle_for(shapes_only, count, args.rank, root) for count in counts}
        svd_bundles = {
            count: svd_bundle_for(shapes_only, count, args.svd_rank, root) for count in counts if args.svd_rank
        }
        gc.collect()
        base = served_base()
        measure("base model", 0, served_base(), {}, 0)
        one = PeftModel.from_pretrained(served_base(), folders[0]).eval()
        measure("one LoRA", 1, one, {}, adapter_bytes(one, "lora_"))
        del one
        gc.collect()
        for count in counts:
            rows = [f"lora_{i % count:04d}" for i in range(args.batch)]
            if count <= args.skip_peft_above:
                peft = PeftModel.from_pretrained(
                    served_base(),
                    folders[0],
                    adapter_name=rows[0] if count == 1 else "lora_0000",
                ).eval()
                for i in range(1, count):
                    peft.load_adapter(folders[i], adapter_name=f"lora_{i:04d}")
                measure("PEFT adapter_names", count, peft, {"adapter_names": rows}, adapter_bytes(peft, "lora_"))
                del peft
                gc.collect()
            jd = PeftModel.from_pretrained(served_base(), bundles[count]).eval()
            measure("JD-LoRA adapter_ids", count, jd, {"adapter_ids": rows}, adapter_bytes(jd, ".jd_"))
            del jd
            gc.collect()
            if count in svd_bundles:
                plan = PeftModel.from_pretrained(served_base(), svd_bundles[count]).eval()
                label = f"JD-LoRA SVD r'={args.svd_rank}"
                measure(label, count, plan, {"adapter_ids": rows}, adapter_bytes(plan, ".jd_"))
                del plan
                gc.collect()
    if args.out:
        args.out.write_text(json.dumps(results, indent=2))
    print(f"machine: {machine}; peft_jdlora {peft_jdlora.__version__}; torch {torch.__version__}")


if __name__ == "__main__":
    main()
