"""Per-layer GPU timings of the mixed-adapter JD-LoRA kernels against the paths they replace.

For one projection (d_in -> d_out, LoRA rank r) and each batch shape, times with CUDA events (median of repeated
runs after warmup, eager launches and CUDA-graph replay):

  (a) mm          torch.mm of the same shapes: the base layer, the roofline vLLM compares LoRA kernels with
  (b) single      one LoRA for the whole batch: x·Aᵀ then addmm with Bᵀ into y (two cuBLAS GEMMs, PEFT's path)
  (c) per-adapter the batch's distinct adapters as uncompressed LoRAs, vLLM-style: tokens sorted by adapter, a
                  segmented shrink and expand (the same Triton kernels with one basis per adapter and Σ = I)
  (c') gather-bmm the same, loop-free in PyTorch: gather each token's A and B, two bmm
  (d) jd          the JD-LoRA bundle (1000 adapters in one shared basis, full or diagonal Σ): add_jd_lora
  (d') jd_dense   with one basis (--clusters 1): add_jd_lora_dense, the shrink and expand as cuBLAS GEMMs over the
                  whole batch and Σ as a gathered bmm
  (e) layer_*     the whole layer, base GEMM included: mm + single LoRA, mm + jd, and `layer_fold` (one basis: the
                  shrink folded into the base GEMM, x·[W; V_0]ᵀ, then Σ and the expand)

for decode (1 to 1024 tokens, one per request) and prefill (512 to 8192 tokens in equal requests), with 1 to 1000
distinct adapters in the batch (at most one per token). Every path is checked against a float64 reference first.
The metadata of a batch is built once on the host and shared by all layers; its build time is reported apart.

    python benchmarks/kernels.py --out results.json                      # writes results.json and results.md
    python benchmarks/kernels.py --preset quick --out quick.json         # a smaller grid
    python benchmarks/kernels.py --preset gpu-check --out k.json         # the grid of benchmarks/gpu_check.sh
    TRITON_INTERPRET=1 python benchmarks/kernels.py --dry-run --out /tmp/k.json   # CPU rehearsal, tiny shapes

Target: (d) with 1000 distinct adapters within 10% of (b). Needs a CUDA GPU (or --dry-run); not a test.
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
from typing import Any, Optional

import torch

BUNDLE_ADAPTERS = 1000
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
# (decode token counts, prefill token counts, distinct adapter counts) per preset.
PRESETS = {
    "full": ((1, 16, 64, 256, 1024), (512, 2048, 8192), (1, 8, 64, 256, 1000)),
    "quick": ((1, 64, 256), (2048,), (1, 64, 1000)),
    "gpu-check": ((1, 16, 64, 256, 1024), (2048,), (1, 64, 1000)),
    "dry-run": ((1, 8), (32,), (1, 4, 1000)),
}
# Methods in table order; jd_dense_* and layer_fold_* need one basis (--clusters 1).
METHODS = (
    "mm",
    "single",
    "per_adapter",
    "gather_bmm",
    "jd_full",
    "jd_diag",
    "jd_dense_full",
    "jd_dense_diag",
    "layer_single",
    "layer_jd_full",
    "layer_fold_full",
)


def time_ms(fn: Callable[[], Any], warmup: int, iters: int, graph: bool) -> float:
    """Median milliseconds of `fn`: CUDA events around eager launches or one CUDA-graph replay per run; on the CPU
    (the --dry-run rehearsal) wall-clock time of eager calls."""
    for _ in range(warmup):
        fn()
    if not torch.cuda.is_available() or not torch.cuda.is_initialized():
        times = []
        for _ in range(iters):
            start = time.perf_counter()
            fn()
            times.append((time.perf_counter() - start) * 1e3)
        return statistics.median(times)
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


def make_weights(args, device: torch.device, gen: torch.Generator) -> dict[str, torch.Tensor]:
    dtype, r, d_in, d_out, N, C = DTYPES[args.dtype], args.rank, args.d_in, args.d_out, BUNDLE_ADAPTERS, args.clusters

    def randn(*shape: int, scale: float) -> torch.Tensor:
        return (torch.randn(*shape, generator=gen) * scale).to(device, dtype)

    clusters = torch.arange(N) % C
    weights = {
        "W": randn(d_out, d_in, scale=d_in**-0.5),
        "A": randn(N, r, d_in, scale=d_in**-0.5),  # per-adapter LoRA A_i, B_i
        "B": randn(N, d_out, r, scale=r**-0.5),
        "U": randn(C, d_out, r, scale=r**-0.5),  # the bundle's shared bases and cores
        "V": randn(C, r, d_in, scale=d_in**-0.5),
        "sigma_full": randn(N, r, r, scale=r**-0.5),
        "sigma_diag": randn(N, r, scale=1.0),
        "clusters": clusters,
    }
    if C == 1:  # the base weight with the shrink basis appended: x·[W; V_0]ᵀ gives the base output and h at once
        weights["W_fold"] = torch.cat([weights["W"], weights["V"][0]]).contiguous()  # [d_out + r, d_in]
    return weights


class Batch:
    """One batch shape: its inputs, metadata and the callables of every method (each adds into `y` or overwrites it).

    `jd_config` (shrink_config / expand_config / sigma_mode overrides) and `block_m` are the launch knobs the tuning
    sweep of benchmarks/gpu_check_stages.py varies."""

    def __init__(
        self,
        jk,
        args,
        phase: str,
        tokens: int,
        distinct: int,
        weights: dict,
        gen: torch.Generator,
        block_m: Optional[int] = None,
        jd_config: Optional[dict[str, Any]] = None,
    ) -> None:
        self.phase, self.tokens, self.distinct = phase, tokens, min(distinct, tokens)
        self.weights = weights
        device, dtype = weights["W"].device, DTYPES[args.dtype]
        self.slots = request_slots(tokens, distinct, phase, BUNDLE_ADAPTERS, gen)  # [T] on the host
        self.slots_dev = self.slots.to(device)
        self.x = torch.randn(tokens, args.d_in, generator=gen).to(device, dtype)
        self.y = torch.zeros(tokens, args.d_out, device=device, dtype=dtype)
        d_out, rank = args.d_out, args.rank
        # (d) JD bundle: host metadata once per batch for all layers (timed apart), then two launches per layer.
        t0 = time.perf_counter()
        self.meta = jk.JDLoraKernelMeta.from_token_slots(
            self.slots, weights["clusters"], device=device, block_m=block_m
        )
        self.meta.buffer.cpu()  # wait for the copy
        self.metadata_us = (time.perf_counter() - t0) * 1e6
        # (c) per-adapter LoRA: the batch's adapters as their own bases (slot = cluster) and Σ = 1, same kernels.
        active = self.slots.unique()
        remap = torch.full((BUNDLE_ADAPTERS,), -1, dtype=torch.int64)
        remap[active] = torch.arange(active.numel())
        lora_meta = jk.JDLoraKernelMeta.from_token_slots(remap[self.slots], torch.arange(active.numel()), device=device)
        W, A, B, U, V = (weights[k] for k in ("W", "A", "B", "U", "V"))
        lora_A, lora_B = A[active.to(device)].contiguous(), B[active.to(device)].contiguous()
        ones = torch.ones(active.numel(), rank, device=device, dtype=dtype)
        A0, B0 = A[int(self.slots[0])], B[int(self.slots[0])]
        x, y, meta, cfg = self.x, self.y, self.meta, dict(jd_config or {})

        def jd(sigma):
            return lambda: jk.add_jd_lora(y, x, meta, U, V, sigma, **cfg)

        methods: dict[str, Callable[[], Any]] = {
            "mm": lambda: torch.mm(x, W.T, out=y),
            "single": lambda: y.addmm_(x @ A0.T, B0.T),
            "per_adapter": lambda: jk.add_jd_lora(y, x, lora_meta, lora_B, lora_A, ones),
        }
        gathered_bytes = tokens * (args.d_in + args.d_out) * rank * x.element_size()
        if gathered_bytes <= args.max_gather_gb * 2**30:  # gather-bmm materialises every token's A and B
            slots_dev = self.slots_dev
            methods["gather_bmm"] = lambda: y.add_(
                torch.bmm(B[slots_dev], torch.bmm(A[slots_dev], x.unsqueeze(-1))).squeeze(-1)
            )
        for sigma_type in args.sigma:
            methods[f"jd_{sigma_type}"] = jd(weights[f"sigma_{sigma_type}"])
        one_basis = U.shape[0] == 1
        if one_basis:
            for sigma_type in args.sigma:
                sig = weights[f"sigma_{sigma_type}"]
                methods[f"jd_dense_{sigma_type}"] = lambda sig=sig: jk.add_jd_lora_dense(y, x, meta, U, V, sig)
        methods["layer_single"] = lambda: torch.mm(x, W.T, out=y).addmm_(x @ A0.T, B0.T)
        if "full" in args.sigma:
            sig = weights["sigma_full"]
            methods["layer_jd_full"] = lambda: jk.add_jd_lora(torch.mm(x, W.T, out=y), x, meta, U, V, sig, **cfg)
            if one_basis:
                folded = torch.empty(tokens, d_out + rank, device=device, dtype=dtype)
                base_out, shrunk = folded[:, :d_out], folded[:, d_out:]
                methods["layer_fold_full"] = lambda: jk.add_jd_lora_dense(
                    torch.mm(x, weights["W_fold"].T, out=folded)[:, :d_out], x, meta, U, V, sig, shrunk=shrunk
                )
                self.fold_output = base_out
        self.methods = methods

    def output_of(self, name: str) -> torch.Tensor:
        return self.fold_output if name.startswith("layer_fold") else self.y

    def check(self, tolerance: float, methods: Optional[list[str]] = None) -> dict[str, float]:
        """Relative error of every method (or of `methods`) against float64 (the layer methods against base +
        update); raises above `tolerance`."""
        w = self.weights
        expected_lora = lora_reference(self.x, self.slots, w["A"], w["B"])
        base = self.x.double() @ w["W"].double().T
        single = (self.x.double() @ w["A"][int(self.slots[0])].double().T) @ w["B"][int(self.slots[0])].double().T
        errors = {}
        for name, fn in self.methods.items():
            if name in ("mm", "single") or (methods is not None and name not in methods):
                continue
            self.y.zero_()
            fn()
            if name == "layer_single":
                expected = base + single
            elif "full" in name or "diag" in name:
                sigma = w["sigma_full" if "full" in name else "sigma_diag"]
                expected = jd_reference(self.x, self.slots, w["U"], w["V"], sigma, w["clusters"])
                if name.startswith("layer_"):
                    expected = expected + base
            else:
                expected = expected_lora
            errors[name] = rel_err(self.output_of(name), expected)
            if errors[name] > tolerance:
                raise AssertionError(
                    f"{name} at {self.phase} T={self.tokens} A={self.distinct}: relative error {errors[name]:.2e}"
                )
        return errors


def bench_shape(jk, args, phase: str, tokens: int, distinct: int, weights: dict, gen) -> list[dict[str, Any]]:
    batch = Batch(jk, args, phase, tokens, distinct, weights, gen)
    checks = batch.check(args.tolerance)  # correctness first (float64 references), then time
    rows = []
    for name, fn in batch.methods.items():
        rows.append(
            {
                "phase": phase,
                "tokens": tokens,
                "distinct_adapters": batch.distinct,
                "method": name,
                "ms_eager": time_ms(fn, args.warmup, args.iters, graph=False),
                "ms_graph": time_ms(fn, args.warmup, args.iters, graph=True) if args.graphs else None,
                "rel_err": checks.get(name),
                "metadata_us": batch.metadata_us if "jd" in name else None,
            }
        )
    return rows


def ms_of(row: dict[str, Any]) -> float:
    """The headline time of a row: CUDA-graph replay when measured (launch overhead removed), else eager."""
    return row["ms_graph"] if row.get("ms_graph") is not None else row["ms_eager"]


# Ratios of the markdown table: (name, numerator method, denominator method).
RATIOS = (
    ("jd_full/single", "jd_full", "single"),
    ("jd_diag/single", "jd_diag", "single"),
    ("jd_full/per_adapter", "jd_full", "per_adapter"),
    ("jd_full/mm", "jd_full", "mm"),
    ("layer_jd/layer_single", "layer_jd_full", "layer_single"),
    ("layer_fold/layer_single", "layer_fold_full", "layer_single"),
)


def markdown(results: dict[str, Any]) -> str:
    env = results["environment"]
    graph = env.get("graphs", True)
    lines = [
        f"Device: {env['gpu']}; torch {env['torch']}, triton {env['triton']}; {env['dtype']}, d_in={env['d_in']}, "
        f"d_out={env['d_out']}, r={env['rank']}, {env['clusters']} cluster(s), bundle of {BUNDLE_ADAPTERS} adapters. "
        + (
            "Milliseconds per layer (median, CUDA-graph replay; eager in parentheses); ratios of the graph times."
            if graph
            else "Milliseconds per layer (median of eager calls)."
        ),
        "",
    ]
    by_shape: dict[tuple, dict[str, dict]] = {}
    for row in results["rows"]:
        by_shape.setdefault((row["phase"], row["tokens"], row["distinct_adapters"]), {})[row["method"]] = row
    present = {row["method"] for row in results["rows"]}
    methods = [m for m in METHODS if m in present]
    ratios = [(name, a, b) for name, a, b in RATIOS if a in present and b in present]
    header = ["phase", "tokens", "distinct", *methods, *(name for name, _, _ in ratios)]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for (phase, tokens, distinct), rows in by_shape.items():
        cells = [phase, str(tokens), str(distinct)]
        for m in methods:
            if m not in rows:
                cells.append("-")
            elif graph and rows[m].get("ms_graph") is not None:
                cells.append(f"{rows[m]['ms_graph']:.4f} ({rows[m]['ms_eager']:.4f})")
            else:
                cells.append(f"{rows[m]['ms_eager']:.4f}")
        for _, a, b in ratios:
            ok = a in rows and b in rows and ms_of(rows[b]) > 0
            cells.append(f"{ms_of(rows[a]) / ms_of(rows[b]):.2f}" if ok else "-")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def parse_args(argv: Optional[list[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="JSON results; the markdown table goes next to it")
    parser.add_argument("--preset", choices=sorted(PRESETS), default=None, help="batch grid (default: full)")
    parser.add_argument("--quick", action="store_true", help="the same as --preset quick")
    parser.add_argument("--dry-run", action="store_true", help="CPU rehearsal in the Triton interpreter, tiny shapes")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    parser.add_argument("--d-in", type=int, default=None, help="default 4096 (64 with --dry-run)")
    parser.add_argument("--d-out", type=int, default=None, help="default 4096 (64 with --dry-run)")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--clusters", type=int, default=1, help="clusters of the JD bundle (default 1)")
    parser.add_argument("--sigma", nargs="+", choices=("full", "diag"), default=["full", "diag"])
    parser.add_argument("--warmup", type=int, default=None, help="default 10 (1 with --dry-run)")
    parser.add_argument("--iters", type=int, default=None, help="default 50 (2 with --dry-run)")
    parser.add_argument("--no-graphs", dest="graphs", action="store_false", help="eager timings only")
    parser.add_argument("--tolerance", type=float, default=3e-2, help="max relative error against float64")
    parser.add_argument("--max-gather-gb", type=float, default=4.0, help="skip gather-bmm above this much gathering")
    args = parser.parse_args(argv)
    if args.quick and args.preset not in (None, "quick"):
        parser.error("--quick and --preset disagree")
    args.preset = (
        "dry-run" if args.dry_run and args.preset is None else (args.preset or ("quick" if args.quick else "full"))
    )
    small = args.dry_run
    args.d_in = args.d_in or (64 if small else 4096)
    args.d_out = args.d_out or (64 if small else 4096)
    args.warmup = args.warmup if args.warmup is not None else (1 if small else 10)
    args.iters = args.iters or (2 if small else 50)
    if small:
        args.graphs = False
    return args


def environment(args, device: torch.device) -> dict[str, Any]:
    import triton

    return {
        "gpu": torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"CPU ({platform.processor() or 'cpu'})",
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
        "preset": args.preset,
        "graphs": args.graphs,
        "warmup": args.warmup,
        "iters": args.iters,
        "dry_run": args.dry_run,
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not args.dry_run and not torch.cuda.is_available():
        print(
            "benchmarks/kernels.py times Triton kernels on a CUDA GPU, and torch.cuda.is_available() is False here: "
            "nothing was measured. Run it on a machine with an NVIDIA GPU (or rehearse with --dry-run).",
            file=sys.stderr,
        )
        return 2
    import jdlora_kernels as jk

    if jk.INTERPRETED and not args.dry_run:
        print("unset TRITON_INTERPRET: the interpreter cannot be timed.", file=sys.stderr)
        return 2
    if args.dry_run and not jk.INTERPRETED:
        print("--dry-run runs the kernels on the CPU: set TRITON_INTERPRET=1 before starting.", file=sys.stderr)
        return 2
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    device = torch.device("cpu" if args.dry_run else "cuda")
    weights = make_weights(args, device, gen)
    decode, prefill, distinct_counts = PRESETS[args.preset]
    results: dict[str, Any] = {"environment": environment(args, device), "rows": []}
    print(f"device: {results['environment']['gpu']}", flush=True)
    seen = set()
    for phase, token_counts in (("decode", decode), ("prefill", prefill)):
        for tokens in token_counts:
            for distinct in distinct_counts:
                if (phase, tokens, min(distinct, tokens)) in seen:
                    continue
                seen.add((phase, tokens, min(distinct, tokens)))
                rows = bench_shape(jk, args, phase, tokens, distinct, weights, gen)
                results["rows"] += rows
                # After every shape: a run stopped at a time limit keeps what it measured.
                args.out.write_text(json.dumps(results, indent=2) + "\n")
                summary = ", ".join(f"{r['method']} {ms_of(r):.4f}" for r in rows)
                print(f"{phase:7s} T={tokens:5d} A={min(distinct, tokens):4d}: {summary} ms", flush=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    table = markdown(results)
    args.out.with_suffix(".md").write_text(table)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
