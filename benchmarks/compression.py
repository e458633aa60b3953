"""Compression benchmark: fidelity against stored size, and compression time at 7B scale.

Three parts (`--part`, comma-separated; all by default):

  synthetic  error vs stored parameters for per-adapter SVD, JD-Full, JD-Diag and clusters on synthetic collections
             with known structure: a shared basis plus noise, two families, independent random adapters.
  real       the same grid on real LoRAs trained on SmolLM2-135M (benchmarks/train_collection.py writes them to
             ~/.cache/peft-jdlora/collection/<task>/); skipped with a message when --collection does not exist.
  mistral    compression time for a Mistral-7B-shaped collection: 500 adapters of rank 16 on q/k/v/o of 32 layers
             (q, o: 4096x4096; k, v: 1024x4096 with GQA), about 27 GB of fp32 factors. The factors are generated
             module by module (memory linear in the number of adapters); on a small CPU time --mistral-layers of the
             32 layers and read the printed extrapolation (modules are independent problems of identical shapes).

    python benchmarks/compression.py --part synthetic,real
    python benchmarks/compression.py --part mistral --mistral-layers 1                 # CPU
    python benchmarks/compression.py --part mistral --mistral-layers 32 --device cuda   # GPU

Writes every measurement to --out (JSON, with the machine) and prints tables. Errors are the paper's squared
relative error ‖ΔW − ÛΣ̂V̂ᵀ‖²/‖ΔW‖², averaged over modules per adapter, then over adapters ("mean") or the worst
adapter ("worst"); "size" is the bundle's stored parameters over the original LoRA parameters.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import sys
import time
from pathlib import Path
from typing import Any, Optional

import torch

from peft_jdlora.compression import compress
from peft_jdlora.compression.engine import FactorSource
from peft_jdlora.compression.synthetic import SyntheticSource

SMOLLM2_LIKE = {  # 4 layers of SmolLM2-135M's q_proj / v_proj (hidden 576, 3 KV heads of 64)
    f"model.layers.{i}.self_attn.{p}": shape
    for i in range(4)
    for p, shape in (("q_proj", (576, 576)), ("v_proj", (192, 576)))
}


def mistral_modules(layers: int) -> dict[str, tuple[int, int]]:
    shapes = {"q_proj": (4096, 4096), "k_proj": (1024, 4096), "v_proj": (1024, 4096), "o_proj": (4096, 4096)}
    return {f"model.layers.{i}.self_attn.{p}": shape for i in range(layers) for p, shape in shapes.items()}


def grid(lora_rank: int, quick: bool) -> list[dict[str, Any]]:
    """Methods and ranks, scaled to the adapters' rank (ranks of a shared basis are multiples of it)."""
    r = lora_rank
    svd = [max(1, r // 8), max(1, r // 4), max(1, r // 2), r]
    joint = [r, 2 * r, 4 * r, 8 * r]
    if quick:
        svd, joint = svd[1:3], joint[:2]
    runs = [{"method": "svd", "rank": k} for k in svd]
    runs += [{"method": "jd", "sigma": "full", "rank": k} for k in joint]
    runs += [{"method": "jd", "sigma": "diag", "rank": k} for k in joint]
    runs += [{"method": "jd", "sigma": "full", "rank": k, "clusters": c} for c in (2, 4) for k in joint[:3]]
    runs += [{"method": "jd", "sigma": "full", "rank": 2 * r, "clusters": "auto", "target_error": 0.05}]
    return runs[: len(runs) if not quick else 8]


def run_grid(label: str, adapters: Any, lora_rank: int, args: argparse.Namespace) -> list[dict[str, Any]]:
    rows = []
    for spec in grid(lora_rank, args.quick):
        kwargs = dict(spec)
        start = time.perf_counter()
        bundle = compress(adapters, device=args.device, seed=args.seed, progress=False, **kwargs)
        seconds = time.perf_counter() - start
        report = bundle.report
        rows.append(
            {
                "part": label.split(":")[0],
                "collection": label,
                "method": report.method,
                "rank": spec["rank"],
                "clusters": spec.get("clusters", 1),
                "num_clusters": report.num_clusters,
                "size": report.size.params_bundle / report.size.params_original,
                "params_bundle": report.size.params_bundle,
                "params_original": report.size.params_original,
                "mean_error": report.overall.mean_error,
                "worst_error": report.overall.worst_error,
                "jd_full_iterations": report.iterations.get("jd_full", {}).get("mean"),
                "seconds": seconds,
            }
        )
        print_row(rows[-1])
    return rows


def print_header(title: str) -> None:
    print(f"\n## {title}")
    print(
        f"{'collection':<28} {'method':<8} {'rank':>5} {'clust':>6} {'size':>8} {'mean err':>9} {'worst':>8} {'s':>7}"
    )


def print_row(row: dict[str, Any]) -> None:
    clusters = f"{row['num_clusters']}" + ("*" if row["clusters"] == "auto" else "")
    print(
        f"{row['collection']:<28} {row['method']:<8} {row['rank']:>5} {clusters:>6} {row['size']:>8.4f} "
        f"{row['mean_error']:>9.4f} {row['worst_error']:>8.4f} {row['seconds']:>7.2f}",
        flush=True,
    )


def part_synthetic(args: argparse.Namespace) -> list[dict[str, Any]]:
    n, r = (12, 8) if args.quick else (32, 8)
    collections = {
        "synthetic:shared+noise": SyntheticSource(
            SMOLLM2_LIKE, n, lora_rank=r, kind="shared", basis_rank=32, noise=0.25, seed=args.seed
        ),
        "synthetic:two-families": SyntheticSource(
            SMOLLM2_LIKE, n, lora_rank=r, kind="families", families=2, basis_rank=16, noise=0.25, seed=args.seed
        ),
        "synthetic:independent": SyntheticSource(SMOLLM2_LIKE, n, lora_rank=r, kind="random", seed=args.seed),
    }
    print_header(f"synthetic collections: {n} adapters of rank {r}, 4 layers of q_proj/v_proj (576 wide)")
    rows = []
    for label, source in collections.items():
        rows += run_grid(label, source.adapters(), r, args)
    return rows


def part_real(args: argparse.Namespace) -> list[dict[str, Any]]:
    root = Path(args.collection).expanduser()
    folders = sorted(p for p in root.glob("*") if (p / "adapter_config.json").is_file()) if root.is_dir() else []
    if not folders:
        print(f"\n## real collection: no PEFT LoRA folders under {root} (run benchmarks/train_collection.py); skipped")
        return []
    with open(folders[0] / "adapter_config.json") as f:
        lora_rank = int(json.load(f).get("r", 16))
    print_header(f"real collection {root}: {len(folders)} LoRAs of rank {lora_rank} on SmolLM2-135M")
    return run_grid(f"real:{root.name}", [str(p) for p in folders], lora_rank, args)


class TimedSource(FactorSource):
    """Wraps a source and accumulates the seconds spent producing factors (generation, not compression)."""

    def __init__(self, inner: FactorSource):
        self.inner = inner
        self.names, self.sources, self.dtype = inner.names, inner.sources, inner.dtype
        self.base_model = inner.base_model
        self.load_seconds = 0.0

    def shapes(self):
        return self.inner.shapes()

    def ranks(self):
        return self.inner.ranks()

    def load(self, modules, rank, dtype):
        start = time.perf_counter()
        out = self.inner.load(modules, rank, dtype)
        self.load_seconds += time.perf_counter() - start
        return out


def part_mistral(args: argparse.Namespace) -> list[dict[str, Any]]:
    layers, n, r = args.mistral_layers, args.mistral_adapters, args.mistral_rank
    modules = mistral_modules(layers)
    print(
        f"\n## Mistral-7B-shaped collection: {n} adapters of rank {r} on q/k/v/o, {layers} of 32 layers "
        f"({len(modules)} modules), kind={args.mistral_kind}, device={args.device}, threads={torch.get_num_threads()}"
    )
    full_bytes = sum(n * r * (d_out + d_in) * 4 for d_out, d_in in mistral_modules(32).values())
    print(f"   the full collection is {full_bytes / 1e9:.1f} GB of fp32 factors; generated module by module")
    rows = []
    methods = {"jd-full": ("jd", "full"), "jd-diag": ("jd", "diag"), "svd": ("svd", "full")}
    for name in args.mistral_methods.split(","):
        if name not in methods:
            raise SystemExit(f"unknown --mistral-methods entry {name!r}; choose from {sorted(methods)}")
        method, sigma = methods[name]
        source = TimedSource(
            SyntheticSource(
                modules, n, lora_rank=r, kind=args.mistral_kind, basis_rank=4 * r, noise=1.0, seed=args.seed
            )
        )
        if args.device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
            torch.cuda.synchronize()
        start = time.perf_counter()
        bundle = compress(source, rank=r, method=method, sigma=sigma, device=args.device, seed=args.seed, progress=True)
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        compute = seconds - source.load_seconds
        report = bundle.report
        row = {
            "part": "mistral",
            "collection": f"mistral-7b-shaped:{args.mistral_kind}",
            "method": report.method,
            "rank": r,
            "adapters": n,
            "layers_timed": layers,
            "modules_timed": len(modules),
            "seconds_total": seconds,
            "seconds_generating_factors": source.load_seconds,
            "seconds_compressing": compute,
            "extrapolated_seconds_32_layers": compute * 32 / layers,
            "jd_full_iterations": report.iterations.get("jd_full"),
            "mean_error": report.overall.mean_error,
            "size": report.size.params_bundle / report.size.params_original,
            "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6,
            "device": args.device,
        }
        if args.device.startswith("cuda"):
            row["peak_gpu_gb"] = torch.cuda.max_memory_allocated() / 1e9
        print(
            f"   {row['method']:<8} {seconds:8.1f} s for {layers} layer(s) ({source.load_seconds:.1f} s of it "
            f"generating factors) -> compression alone {compute:.1f} s, extrapolated to 32 layers: "
            f"{row['extrapolated_seconds_32_layers'] / 60:.1f} min; mean error {row['mean_error']:.4f}; "
            f"peak RSS {row['peak_rss_gb']:.1f} GB",
            flush=True,
        )
        rows.append(row)
    return rows


def machine(args: argparse.Namespace) -> dict[str, Any]:
    model = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), model)
    except OSError:
        pass
    info = {
        "cpu": model,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "device": args.device,
    }
    if args.device.startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name()
    return info


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--part", default="synthetic,real,mistral", help="comma-separated: synthetic, real, mistral")
    p.add_argument("--collection", default="~/.cache/peft-jdlora/collection", help="folder of PEFT LoRA folders")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (torch.set_num_threads)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="small grids (a smoke run)")
    p.add_argument("--mistral-layers", type=int, default=1, help="layers of 32 to time (extrapolated to 32)")
    p.add_argument("--mistral-adapters", type=int, default=500)
    p.add_argument("--mistral-rank", type=int, default=16)
    p.add_argument("--mistral-kind", default="random", choices=["random", "shared"], help="synthetic structure")
    p.add_argument(
        "--mistral-methods",
        default="jd-full,jd-diag",
        help="comma-separated: jd-full, jd-diag, svd (svd holds a rank-r bundle as large as the collection in memory)",
    )
    p.add_argument(
        "--out",
        type=Path,
        default=Path("~/.cache/peft-jdlora/benchmarks/compression.json"),
        help="JSON file for the results (default: %(default)s)",
    )
    return p.parse_args(argv)


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("--device cuda: no CUDA device available", file=sys.stderr)
        return 2
    parts = [p.strip() for p in args.part.split(",") if p.strip()]
    unknown = set(parts) - {"synthetic", "real", "mistral"}
    if unknown:
        print(f"unknown --part {sorted(unknown)}", file=sys.stderr)
        return 2
    results: dict[str, Any] = {"machine": machine(args), "args": {k: str(v) for k, v in vars(args).items()}}
    print(f"machine: {results['machine']}")
    rows = []
    for part in parts:
        rows += {"synthetic": part_synthetic, "real": part_real, "mistral": part_mistral}[part](args)
    results["results"] = rows
    out = args.out.expanduser()
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
