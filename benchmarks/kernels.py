"""Per-layer GPU timings of the mixed-adapter JD-LoRA kernels against the paths they replace.

For one projection (d_in -> d_out, LoRA rank r) and each batch shape, times with CUDA events (median of repeated
runs after warmup, eager launches and CUDA-graph replay):

  (a) mm          torch.mm of the same shapes: the base layer, the roofline vLLM compares LoRA kernels with
  (b) single      one LoRA for the whole batch: x·Aᵀ then addmm with Bᵀ into y (two cuBLAS GEMMs, PEFT's path)
  (c) per-adapter the batch's distinct adapters as uncompressed LoRAs, vLLM-style: tokens sorted by adapter, a
                  segmented shrink and expand (the same Triton kernels with one basis per adapter and Σ = I)
  (c') gather-bmm the same, loop-free in PyTorch: gather each token's A and B, two bmm
  (d) jd          the JD-LoRA bundle (1000 adapters in one shared basis, full or diagonal Σ): add_jd_lora

for decode (1 to 256 tokens, one per request) and prefill (512 to 8192 tokens in equal requests), with 1 to 1000
distinct adapters in the batch (at most one per token). Every path is checked against a float64 reference first.
The metadata of a batch is built once on the host and shared by all layers; its build time is reported apart.

    python benchmarks/kernels.py --out results.json                 # writes results.json and results.md
    python benchmarks/kernels.py --quick --out quick.json            # a smaller grid

Target: (d) with 1000 distinct adapters within 10% of (b). Needs a CUDA GPU; not a test.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

DECODE_TOKENS = (1, 16, 64, 256)
PREFILL_TOKENS = (512, 2048, 8192)
DISTINCT_ADAPTERS = (1, 8, 64, 256, 1000)
BUNDLE_ADAPTERS = 1000
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def time_ms(fn: Callable[[], Any], warmup: int, iters: int, graph: bool) -> float:
    """Median milliseconds of `fn` (eager launches, or one CUDA graph replay per run)."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    run = fn
    if graph:
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):  # warm up on the capture stream (allocator, lazy init)
            fn()
        torch.cuda.current_stream().wait_stream(stream)
        cuda_graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(cuda_graph):
            fn()
        run = cuda_graph.replay
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        run()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def request_slots(tokens: int, distinct: int, phase: str, pool: int, gen: torch.Generator) -> torch.Tensor:
    """Slot of every token: `distinct` adapters drawn from the pool, one per decode token or per prefill request."""
    distinct = min(distinct, tokens)
    chosen = torch.randperm(pool, generator=gen)[:distinct]
    if phase == "decode":
        per_token = chosen[torch.arange(tokens) % distinct]
        return per_token[torch.randperm(tokens, generator=gen)]
    lengths = torch.full((distinct,), tokens // distinct)
    lengths[: tokens % distinct] += 1
    return chosen.repeat_interleave(lengths)  # requests are contiguous in a prefill batch


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return float((actual.double() - expected.double()).norm() / expected.double().norm().clamp(min=1e-30))


def lora_reference(x: torch.Tensor, slots: torch.Tensor, A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """float64 per-adapter LoRA update, one adapter at a time (no [T, d, r] gathers at prefill sizes)."""
    y = torch.zeros(x.shape[0], B.shape[1], dtype=torch.float64, device=x.device)
    for slot in slots.unique().tolist():
        rows = (slots == slot).nonzero().flatten().to(x.device)
        y[rows] = x[rows].double() @ A[slot].double().T @ B[slot].double().T
    return y


def jd_reference(x, slots, U, V, sigma, clusters) -> torch.Tensor:
    """float64 JD update, one cluster at a time: x·V_cᵀ, each token's Σ, then ·U_cᵀ."""
    y = torch.zeros(x.shape[0], U.shape[1], dtype=torch.float64, device=x.device)
    token_cluster = clusters[slots]
    for c in token_cluster.unique().tolist():
        rows = (token_cluster == c).nonzero().flatten()
        h = x[rows.to(x.device)].double() @ V[c].double().T  # [n, r]
        core = sigma[slots[rows].to(x.device)].double()
        z = torch.bmm(core, h.unsqueeze(-1)).squeeze(-1) if sigma.dim() == 3 else h * core
        y[rows.to(x.device)] = z @ U[c].double().T
    return y


def bench_shape(jk, args, phase: str, tokens: int, distinct: int, weights: dict, gen) -> list[dict[str, Any]]:
    device, dtype = weights["W"].device, DTYPES[args.dtype]
    slots = request_slots(tokens, distinct, phase, BUNDLE_ADAPTERS, gen)  # [T] on the host
    slots_dev = slots.to(device)
    x = torch.randn(tokens, args.d_in, generator=gen).to(device, dtype)
    y = torch.zeros(tokens, args.d_out, device=device, dtype=dtype)
    W, A, B = weights["W"], weights["A"], weights["B"]

    # (d) JD bundle: host metadata once per batch for all layers (timed apart), then two launches per layer.
    t0 = time.perf_counter()
    meta = jk.JDLoraKernelMeta.from_token_slots(slots, weights["clusters"], device=device)
    meta.buffer.cpu()  # wait for the copy
    meta_us = (time.perf_counter() - t0) * 1e6
    # (c) per-adapter LoRA: the batch's adapters as their own bases (slot = cluster) and Σ = 1, same kernels.
    active = slots.unique()
    remap = torch.full((BUNDLE_ADAPTERS,), -1, dtype=torch.int64)
    remap[active] = torch.arange(active.numel())
    lora_meta = jk.JDLoraKernelMeta.from_token_slots(remap[slots], torch.arange(active.numel()), device=device)
    lora_A, lora_B = A[active.to(device)].contiguous(), B[active.to(device)].contiguous()
    ones = torch.ones(active.numel(), args.rank, device=device, dtype=dtype)
    A0, B0 = A[int(slots[0])], B[int(slots[0])]

    methods: dict[str, Callable[[], Any]] = {
        "mm": lambda: torch.mm(x, W.T, out=y),
        "single": lambda: y.addmm_(x @ A0.T, B0.T),
        "per_adapter": lambda: jk.add_jd_lora(y, x, lora_meta, lora_B, lora_A, ones),
    }
    gathered_bytes = tokens * (args.d_in + args.d_out) * args.rank * x.element_size()
    if gathered_bytes <= args.max_gather_gb * 2**30:  # gather-bmm materialises every token's A and B
        methods["gather_bmm"] = lambda: y.add_(
            torch.bmm(B[slots_dev], torch.bmm(A[slots_dev], x.unsqueeze(-1))).squeeze(-1)
        )
    for sigma_type in args.sigma:
        sig = weights[f"sigma_{sigma_type}"]
        methods[f"jd_{sigma_type}"] = lambda sig=sig: jk.add_jd_lora(y, x, meta, weights["U"], weights["V"], sig)

    # Correctness first (float64 references), then time.
    checks = {}
    expected_lora = lora_reference(x, slots, A, B)
    for name in methods:
        if name in ("mm", "single"):
            continue
        y.zero_()
        methods[name]()
        if name.startswith("jd_"):
            sig = weights[f"sigma_{name[3:]}"]
            expected = jd_reference(x, slots, weights["U"], weights["V"], sig, weights["clusters"])
        else:
            expected = expected_lora
        checks[name] = rel_err(y, expected)
        if checks[name] > args.tolerance:
            raise AssertionError(f"{name} at {phase} T={tokens} A={distinct}: relative error {checks[name]:.2e}")

    rows = []
    for name, fn in methods.items():
        rows.append(
            {
                "phase": phase,
                "tokens": tokens,
                "distinct_adapters": min(distinct, tokens),
                "method": name,
                "ms_eager": time_ms(fn, args.warmup, args.iters, graph=False),
                "ms_graph": time_ms(fn, args.warmup, args.iters, graph=True),
                "rel_err": checks.get(name),
                "metadata_us": meta_us if name.startswith("jd_") else None,
            }
        )
    return rows


def make_weights(args, device: torch.device, gen: torch.Generator) -> dict[str, torch.Tensor]:
    dtype, r, d_in, d_out, N, C = DTYPES[args.dtype], args.rank, args.d_in, args.d_out, BUNDLE_ADAPTERS, args.clusters

    def randn(*shape: int, scale: float) -> torch.Tensor:
        return (torch.randn(*shape, generator=gen) * scale).to(device, dtype)

    clusters = torch.arange(N) % C
    return {
        "W": randn(d_out, d_in, scale=d_in**-0.5),
        "A": randn(N, r, d_in, scale=d_in**-0.5),  # per-adapter LoRA A_i, B_i
        "B": randn(N, d_out, r, scale=r**-0.5),
        "U": randn(C, d_out, r, scale=r**-0.5),  # the bundle's shared bases and cores
        "V": randn(C, r, d_in, scale=d_in**-0.5),
        "sigma_full": randn(N, r, r, scale=r**-0.5),
        "sigma_diag": randn(N, r, scale=1.0),
        "clusters": clusters,
    }


def markdown(results: dict[str, Any]) -> str:
    env = results["environment"]
    lines = [
        f"GPU: {env['gpu']}; torch {env['torch']}, triton {env['triton']}; {env['dtype']}, d_in={env['d_in']}, "
        f"d_out={env['d_out']}, r={env['rank']}, {env['clusters']} cluster(s), bundle of {BUNDLE_ADAPTERS} adapters. "
        "Milliseconds per layer (median, CUDA-graph replay; eager in parentheses).",
        "",
    ]
    methods = [m for m in ("mm", "single", "per_adapter", "gather_bmm", "jd_full", "jd_diag") if m in env["methods"]]
    header = ["phase", "tokens", "distinct", *methods, *(f"{m}/single" for m in methods if m.startswith("jd_"))]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    by_shape: dict[tuple, dict[str, dict]] = {}
    for row in results["rows"]:
        by_shape.setdefault((row["phase"], row["tokens"], row["distinct_adapters"]), {})[row["method"]] = row
    for (phase, tokens, distinct), rows in by_shape.items():
        cells = [phase, str(tokens), str(distinct)]
        cells += [f"{rows[m]['ms_graph']:.4f} ({rows[m]['ms_eager']:.4f})" if m in rows else "-" for m in methods]
        single = rows["single"]["ms_graph"]
        cells += [f"{rows[m]['ms_graph'] / single:.2f}" if single > 0 else "-" for m in methods if m.startswith("jd_")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="JSON results; the markdown table goes next to it")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    parser.add_argument("--d-in", type=int, default=4096)
    parser.add_argument("--d-out", type=int, default=4096)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--clusters", type=int, default=1, help="clusters of the JD bundle (default 1)")
    parser.add_argument("--sigma", nargs="+", choices=("full", "diag"), default=["full", "diag"])
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--iters", type=int, default=50)
    parser.add_argument("--tolerance", type=float, default=3e-2, help="max relative error against float64")
    parser.add_argument("--max-gather-gb", type=float, default=4.0, help="skip gather-bmm above this much gathering")
    parser.add_argument("--quick", action="store_true", help="decode 1/64/256, prefill 2048; 1, 64, 1000 adapters")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print(
            "benchmarks/kernels.py times Triton kernels on a CUDA GPU, and torch.cuda.is_available() is False here: "
            "nothing was measured. Run it on a machine with an NVIDIA GPU.",
            file=sys.stderr,
        )
        return 2
    import jdlora_kernels as jk
    import triton

    if jk.INTERPRETED:
        print("unset TRITON_INTERPRET: the interpreter cannot be timed.", file=sys.stderr)
        return 2
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    device = torch.device("cuda")
    weights = make_weights(args, device, gen)
    decode = (1, 64, 256) if args.quick else DECODE_TOKENS
    prefill = (2048,) if args.quick else PREFILL_TOKENS
    distinct_counts = (1, 64, 1000) if args.quick else DISTINCT_ADAPTERS
    methods = ["mm", "single", "per_adapter", "gather_bmm", *(f"jd_{s}" for s in args.sigma)]
    results: dict[str, Any] = {
        "environment": {
            "gpu": torch.cuda.get_device_name(device),
            "torch": torch.__version__,
            "triton": triton.__version__,
            "cuda": torch.version.cuda,
            "python": platform.python_version(),
            "dtype": args.dtype,
            "d_in": args.d_in,
            "d_out": args.d_out,
            "rank": args.rank,
            "clusters": args.clusters,
            "bundle_adapters": BUNDLE_ADAPTERS,
            "methods": methods,
            "warmup": args.warmup,
            "iters": args.iters,
        },
        "rows": [],
    }
    print(f"GPU: {results['environment']['gpu']}")
    seen = set()
    for phase, token_counts in (("decode", decode), ("prefill", prefill)):
        for tokens in token_counts:
            for distinct in distinct_counts:
                if (phase, tokens, min(distinct, tokens)) in seen:
                    continue
                seen.add((phase, tokens, min(distinct, tokens)))
                rows = bench_shape(jk, args, phase, tokens, distinct, weights, gen)
                results["rows"] += rows
                summary = ", ".join(f"{r['method']} {r['ms_graph']:.4f}" for r in rows)
                print(f"{phase:7s} T={tokens:5d} A={min(distinct, tokens):4d}: {summary} ms")
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    table = markdown(results)
    args.out.with_suffix(".md").write_text(table)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
