"""Budget plans against the fixed-rank baselines: error vs stored floats, and the gain at equal floats.

For every collection and budget ratio (the bundle is `ratio` times smaller than the source LoRAs):

  budget    compress(budget="<ratio>x"): representation, rank and clusters chosen per module (budget.py)
  svd       per-adapter SVD, the largest uniform rank whose bundle fits in the budget plan's floats
  jd1       one shared basis (JD-Full), the largest uniform rank that fits
  jd<C>     C clusters (JD-Full), the largest uniform rank that fits

All baselines are real `compress` runs (not the planner's curves), at the largest rank whose stored floats do not
exceed those of the budget plan, so "gain" = budget error / min(svd, jd1 error) is at equal or fewer baseline floats.

Collections:
  real     PEFT LoRA folders under --collection (the 25-task SmolLM2-135M collection; whatever exists is used)
  shared   PEFT LoRA folders under --shared (8 tasks trained from one shared initialisation); when absent, a synthetic
           analogue with SmolLM2-135M's q/v shapes: A_i = A_0 + δ_i (one shared A initialisation, moved by training),
           B_i independent (reported as "synthetic-shared-init")

    OMP_NUM_THREADS=1 python benchmarks/budget.py --ratios 32,16,8,default --out budget.json

The "default" ratio compares the fixed-rank bundle `compress()` builds with its defaults (rank 16, one basis) with a
budget plan of exactly its bytes.

Two more parts (`--parts scaling,mistral`):

  scaling  planning time and error against the number of adapters (`--sizes`, default 8,25,100,500,1000) on synthetic
           collections of SmolLM2-135M's q/v shapes (30 layers, r16; `SyntheticSource`): "unrelated" (independent
           adapters whose spectra fall off like trained LoRAs', decay 0.5) and "shared" (every adapter in one hidden
           basis pair of rank 16, plus unstructured factors of relative size 0.25). Per collection, interleaved in
           one process: the fixed-rank bundle (rank 16, one basis: what jdlora-convert built by default before
           plans), then the default plan at its size
           (budget "r16", no cluster search: what jdlora-convert builds now), and with `--with-clusters` the plan
           with clusters (2, 4) chosen on a sample. Errors at equal bytes: the plan, the fixed bundle, and
           per-adapter SVD at the largest rank that fits (exact, from the plan's curves). `--planners` picks among
           fixed, plan, clusters; run with the library of an older commit on PYTHONPATH (its synthetic.py replaced
           by this one) to time that commit's planner on the same collections ("plan" then means its budget plan of
           the fixed bundle's bytes).
  mistral  the default plan of a Mistral-7B-shaped collection (`--mistral-adapters` 500 of rank 16 on q/k/v/o of 32
           layers; unrelated adapters) planned and written to disk, with its seconds and peak memory (RSS). Run it in
           a process of its own for a meaningful peak.

    OMP_NUM_THREADS=1 python benchmarks/budget.py --parts scaling --out benchmarks/results/plan_scaling.json
    OMP_NUM_THREADS=1 python benchmarks/budget.py --parts mistral --out benchmarks/results/plan_mistral.json

(Their rows have their own layout: keep them out of `results/budget_*.json`, which benchmarks/plots.py plots.)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Optional

import torch

from peft_jdlora.compression import compress
from peft_jdlora.compression.engine import FactorSource, LoraFactorSource
from peft_jdlora.compression.sources import read_lora_adapter
from peft_jdlora.compression.synthetic import SyntheticSource

try:
    from peft_jdlora.compression.cost import module_floats, target_rank
except ImportError:  # the library of a commit before the cost model (timing its planner with --parts scaling)
    from peft_jdlora.compression.budget import module_floats
    from peft_jdlora.compression.engine import target_rank

SMOLLM2_QV = {
    f"model.layers.{i}.self_attn.{p}": shape
    for i in range(30)
    for p, shape in (("q_proj", (576, 576)), ("v_proj", (192, 576)))
}


class SharedInitSource(FactorSource):
    """LoRAs trained from one shared initialisation, simulated: A_i = A_0 + drift·δ_i (A_0, δ_i Gaussian, per
    module), B_i independent Gaussian; scaling 2 (alpha 32 / r 16). Deterministic per (seed, module)."""

    def __init__(self, modules: dict[str, tuple[int, int]], num_adapters: int, rank: int, drift: float, seed: int):
        self._shapes, self.rank, self.drift, self.seed = dict(modules), rank, drift, seed
        self.names = [f"shared_init_{i:02d}" for i in range(num_adapters)]
        self.sources = [{"source": "synthetic:shared-init", "index": i} for i in range(num_adapters)]
        self.base_model = "synthetic"
        self.dtype = torch.float32

    def shapes(self) -> dict[str, tuple[int, int]]:
        return dict(self._shapes)

    def ranks(self) -> dict[str, list[int]]:
        return {m: [self.rank] * len(self.names) for m in self._shapes}

    def load(self, modules: Sequence[str], rank: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        d_out, d_in = self._shapes[modules[0]]
        N = len(self.names)
        A = torch.zeros(len(modules), N, rank, d_in, dtype=dtype)
        B = torch.zeros(len(modules), N, d_out, rank, dtype=dtype)
        for j, module in enumerate(modules):
            g = torch.Generator().manual_seed((self.seed * 1_000_003 + zlib.crc32(module.encode())) % (2**63))
            A0 = torch.randn(self.rank, d_in, generator=g) / d_in**0.5
            for i in range(N):
                A[j, i, : self.rank] = A0 + self.drift * torch.randn(self.rank, d_in, generator=g) / d_in**0.5
                B[j, i, :, : self.rank] = 2.0 * torch.randn(d_out, self.rank, generator=g) / d_out**0.5
        return A, B


def largest_rank(source: FactorSource, floats: int, method: str, clusters: int = 1) -> Optional[int]:
    """Largest uniform rank whose bundle (with the engine's per-module caps) has at most `floats` floats."""
    shapes, ranks = source.shapes(), source.ranks()
    N = len(source.names)
    best = None
    for r in range(1, 1025):
        total = 0
        for m, (d_out, d_in) in shapes.items():
            k = target_rank(method, r, d_out, d_in, ranks[m])
            if method == "svd":
                total += module_floats(d_out, d_in, N, k, N, "diag")
            else:
                total += module_floats(d_out, d_in, N, k, clusters, "full")
        if total > floats:
            break
        best = r
    return best


def default_bundle(source: Any, args: argparse.Namespace) -> dict[str, Any]:
    """What `jdlora-convert` builds when given no --rank / --clusters / --budget: `compress()` with its defaults."""
    start = time.perf_counter()
    report = compress(source, seed=args.seed, progress=False, device=args.device).report
    return {
        "rank": report.rank,
        "floats": report.size.params_bundle,
        "bytes": report.size.bytes_bundle,
        "ratio": report.size.ratio,
        "mean_error": report.overall.mean_error,
        "worst_error": report.overall.worst_error,
        "seconds": time.perf_counter() - start,
    }


def run(source: Any, label: str, ratios: Sequence[Any], args: argparse.Namespace) -> list[dict[str, Any]]:
    """One row per ratio; the ratio "default" is the size of the default bundle, which the row also carries."""
    rows = []
    for ratio in ratios:
        default = default_bundle(source, args) if ratio == "default" else None
        budget = default["bytes"] if default else f"{ratio}x"
        start = time.perf_counter()
        bundle = compress(source, budget=budget, seed=args.seed, progress=False, device=args.device)
        plan_seconds = time.perf_counter() - start
        report = bundle.report
        floats = report.size.params_bundle
        row: dict[str, Any] = {
            "collection": label,
            "ratio": ratio if default is None else round(default["ratio"], 2),
            "default": default,
            "floats": floats,
            "original_floats": report.size.params_original,
            "budget": {
                "mean_error": report.overall.mean_error,
                "worst_error": report.overall.worst_error,
                "modules_by_family": report.budget["modules_by_family"],
                "ranks": sorted({p["rank"] for p in report.plan.values()}),
                "seconds": plan_seconds,
                "timings": report.timings,
            },
        }
        for name, method, clusters in [("svd", "svd", 1), ("jd1", "jd", 1)] + [
            (f"jd{c}", "jd", c) for c in args.clusters
        ]:
            r = largest_rank(source, floats, method, clusters)
            if r is None:
                row[name] = None
                continue
            start = time.perf_counter()
            kwargs = {"method": method, "rank": r}
            if clusters > 1:
                kwargs["clusters"] = clusters
            base = compress(source, seed=args.seed, progress=False, device=args.device, **kwargs)
            row[name] = {
                "rank": r,
                "floats": base.report.size.params_bundle,
                "mean_error": base.report.overall.mean_error,
                "worst_error": base.report.overall.worst_error,
                "seconds": time.perf_counter() - start,
            }
        baselines = [row[k]["mean_error"] for k in ("svd", "jd1") if row.get(k)]
        if default is not None:
            row["gain_vs_default"] = row["budget"]["mean_error"] / default["mean_error"]
        row["gain_vs_best_baseline"] = row["budget"]["mean_error"] / min(baselines) if baselines else None
        rows.append(row)
        print_row(row, args.clusters)
    return rows


def print_row(row: dict[str, Any], clusters: Sequence[int]) -> None:
    def cell(entry: Optional[dict[str, Any]]) -> str:
        return "      -      " if entry is None else f"{entry['mean_error']:.4f} (r{entry['rank']:>3})"

    families = ", ".join(f"{k}:{v}" for k, v in row["budget"]["modules_by_family"].items())
    gain = row["gain_vs_best_baseline"]
    gain_text = "-" if gain is None else f"{gain:.3f}"
    if row.get("default"):
        d = row["default"]
        gain_text += f" | default r{d['rank']} {d['mean_error']:.4f} ({d['seconds']:.0f}s)"
    clustered = " | ".join(f"jd{c} {cell(row.get(f'jd{c}'))}" for c in clusters)
    print(
        f"{row['collection']:<24} {row['ratio']:>5}x {row['floats']:>10} | budget {row['budget']['mean_error']:.4f} "
        f"[{families}] ranks {row['budget']['ranks']} {row['budget']['seconds']:.0f}s | svd {cell(row['svd'])} | "
        f"jd1 {cell(row['jd1'])} | {clustered} | gain {gain_text}",
        flush=True,
    )


# ------------------------------------------------------------------------------------------------ scaling


def scaling_source(kind: str, num_adapters: int, seed: int, layers: int = 30) -> FactorSource:
    modules = {m: s for m, s in SMOLLM2_QV.items() if int(m.split(".")[2]) < layers}
    if kind == "unrelated":
        return SyntheticSource(modules, num_adapters, lora_rank=16, kind="random", decay=0.5, seed=seed)
    if kind == "shared":
        return SyntheticSource(modules, num_adapters, lora_rank=16, kind="shared", basis_rank=16, noise=0.25, seed=seed)
    raise SystemExit(f"unknown scaling kind {kind!r}: choose unrelated or shared")


def fixed_floats(source: FactorSource, rank: int = 16) -> int:
    """Stored elements of compress(source, rank=rank): one basis, full Σ, per-module caps (the cost model)."""
    shapes, ranks = source.shapes(), source.ranks()
    N = len(source.names)
    return sum(
        module_floats(d_out, d_in, N, target_rank("jd", rank, d_out, d_in, ranks[m]), 1, "full")
        for m, (d_out, d_in) in shapes.items()
    )


def _timed(label: str, source: FactorSource, **kwargs: Any) -> tuple[Any, float]:
    """compress(source, **kwargs) and its seconds."""
    start = time.perf_counter()
    out = compress(source, **kwargs)
    seconds = time.perf_counter() - start
    print(f"   {label}: {seconds:.1f} s", flush=True)
    return out, seconds


def _report_json(report: Any) -> dict[str, Any]:
    """The report as its JSON: `BundleReport.to_dict()`, or the dict itself from the library of a commit before the
    typed report (`--parts scaling` times an older commit's planner with this script)."""
    return report.to_dict() if hasattr(report, "to_dict") else report


def _plan_entry(report: dict[str, Any], seconds: float) -> dict[str, Any]:
    """A plan's row of `--parts scaling`, from its report's JSON."""
    budget = report.get("budget", {})
    return {
        "seconds": seconds,
        "floats": report["params"]["bundle"],
        "mean_error": report["overall"]["mean_error"],
        "worst_error": report["overall"]["worst_error"],
        "modules_by_family": budget.get("modules_by_family"),
        "predicted_mean_error": budget.get("predicted_mean_error"),
        "baselines_within_budget": budget.get("baselines_within_budget"),
        "timings": report.get("timings"),
    }


def part_scaling(args: argparse.Namespace) -> list[dict[str, Any]]:
    rows = []
    planners = args.planners.split(",")
    for kind in args.kinds.split(","):
        for N in [int(n) for n in args.sizes.split(",")]:
            source = scaling_source(kind, N, args.seed, args.scaling_layers)
            budget_bytes = fixed_floats(source) * 4  # float32 storage
            print(f"## scaling: {kind}, {N} adapters, budget {budget_bytes:,} bytes (the size of rank 16)", flush=True)
            row: dict[str, Any] = {"collection": kind, "adapters": N, "budget_bytes": budget_bytes}
            common = {"seed": args.seed, "progress": False, "device": args.device}
            if "fixed" in planners:
                bundle, seconds = _timed("fixed rank 16", source, rank=16, **common)
                report = _report_json(bundle.report)
                row["fixed"] = {
                    "seconds": seconds,
                    "floats": report["params"]["bundle"],
                    "mean_error": report["overall"]["mean_error"],
                    "worst_error": report["overall"]["worst_error"],
                    "svd_baseline": report.get("svd_baseline"),
                }
            if "plan" in planners:
                # A plan of exactly the fixed bundle's bytes, with no cluster search: what jdlora-convert builds.
                bundle, seconds = _timed("default plan", source, budget=budget_bytes, cluster_counts=(), **common)
                row["plan"] = _plan_entry(_report_json(bundle.report), seconds)
            if "clusters" in planners:
                bundle, seconds = _timed(
                    "plan with clusters", source, budget=budget_bytes, cluster_counts=(2, 4), **common
                )
                row["clusters"] = _plan_entry(_report_json(bundle.report), seconds)
            if "fixed" in row and "plan" in row:
                row["plan_time_ratio"] = row["plan"]["seconds"] / row["fixed"]["seconds"]
                row["plan_error_ratio"] = row["plan"]["mean_error"] / row["fixed"]["mean_error"]
            print_scaling_row(row, flush=True)
            rows.append(row)
    return rows


def print_scaling_row(row: dict[str, Any], flush: bool = True) -> None:
    parts = [f"{row['collection']:<10} N={row['adapters']:<5}"]
    for key in ("fixed", "plan", "clusters"):
        if key in row:
            entry = row[key]
            parts.append(f"{key} {entry['mean_error']:.4f} in {entry['seconds']:.1f}s")
            if key != "fixed" and entry.get("baselines_within_budget"):
                svd = entry["baselines_within_budget"].get("svd")
                svd_text = "does not fit" if svd is None else f"r{svd['rank']} {svd['mean_error']:.4f}"
                parts.append(f"svd {svd_text}")
                parts.append(f"{entry['modules_by_family']}")
    if "plan_time_ratio" in row:
        parts.append(f"time x{row['plan_time_ratio']:.2f}, error x{row['plan_error_ratio']:.3f}")
    print(" | ".join(parts), flush=flush)


# ------------------------------------------------------------------------------------------------ mistral


def mistral_modules(layers: int) -> dict[str, tuple[int, int]]:
    shapes = {"q_proj": (4096, 4096), "k_proj": (1024, 4096), "v_proj": (1024, 4096), "o_proj": (4096, 4096)}
    return {f"model.layers.{i}.self_attn.{p}": shape for i in range(layers) for p, shape in shapes.items()}


class TimedSource(FactorSource):
    """A source that counts the seconds spent producing factors (generating them here; reading files otherwise)."""

    def __init__(self, inner: FactorSource):
        self.inner = inner
        self.names, self.sources, self.base_model, self.dtype = (
            inner.names,
            inner.sources,
            inner.base_model,
            inner.dtype,
        )
        self.load_seconds = 0.0

    def shapes(self) -> dict[str, tuple[int, int]]:
        return self.inner.shapes()

    def ranks(self) -> dict[str, list[int]]:
        return self.inner.ranks()

    def load(self, modules: Sequence[str], rank: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        start = time.perf_counter()
        out = self.inner.load(modules, rank, dtype)
        self.load_seconds += time.perf_counter() - start
        return out


def part_mistral(args: argparse.Namespace) -> list[dict[str, Any]]:
    import resource
    import tempfile

    from peft_jdlora.bundle import save_bundle

    modules = mistral_modules(args.mistral_layers)
    n = args.mistral_adapters
    source = TimedSource(SyntheticSource(modules, n, lora_rank=16, kind="random", decay=0.5, seed=args.seed))
    print(
        f"## mistral: {n} adapters of rank 16 on q/k/v/o of {args.mistral_layers} layers ({len(modules)} modules), "
        f"default plan (budget r16, no cluster search), threads={torch.get_num_threads()}, load {os.getloadavg()}",
        flush=True,
    )
    fixed = None
    if args.mistral_with_fixed:  # the fixed-rank bundle of the same size first, in the same process
        start = time.perf_counter()
        report = compress(source, rank=16, seed=args.seed, progress=True, device=args.device).report
        fixed = {"seconds": time.perf_counter() - start, "mean_error": report.overall.mean_error}
        print(f"   fixed rank 16: {fixed['seconds']:.1f} s, mean error {fixed['mean_error']:.4f}", flush=True)
    start = time.perf_counter()
    bundle = compress(source, budget="r16", cluster_counts=(), seed=args.seed, progress=True, device=args.device)
    planned = time.perf_counter() - start
    with tempfile.TemporaryDirectory() as folder:
        save_bundle(bundle, Path(folder) / "bundle")
        written = time.perf_counter() - start
        size = sum(f.stat().st_size for f in (Path(folder) / "bundle").iterdir())
    report = bundle.report
    row = {
        "collection": "mistral-7b-shaped:unrelated",
        "adapters": n,
        "layers": args.mistral_layers,
        "modules": len(modules),
        "seconds_planned": planned,
        "seconds_planned_and_written": written,
        "seconds_generating_factors": source.load_seconds,
        "timings": report.timings,
        "bundle_bytes_on_disk": size,
        "floats": report.size.params_bundle,
        "mean_error": report.overall.mean_error,
        "modules_by_family": report.budget["modules_by_family"],
        "baselines_within_budget": report.budget["baselines_within_budget"],
        "fixed_rank_16": fixed,
        "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6,
        "load_average_after": os.getloadavg(),
    }
    print(json.dumps(row, indent=2, default=str), flush=True)
    return [row]


def folders_of(root: Path) -> list[Path]:
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if (p / "adapter_config.json").is_file() and any(p.glob("adapter_model.*")))


def machine() -> dict[str, Any]:
    try:
        cpu = next(
            line.split(":", 1)[1].strip()
            for line in subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines()
            if line.startswith("Model name")
        )
    except (OSError, StopIteration):
        cpu = platform.processor()
    return {
        "cpu": cpu,
        "cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": sys.version.split()[0],
    }


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--collection", default="~/.cache/peft-jdlora/collection")
    p.add_argument("--shared", default="~/.cache/peft-jdlora/collection-shared")
    p.add_argument("--parts", default="real,shared", help="comma-separated: real, shared, scaling, mistral")
    p.add_argument(
        "--ratios",
        default="32,16,8,default",
        help="budget ratios (bundle = original / ratio); 'default': the size of the bundle built with no options",
    )
    p.add_argument("--clusters", default="2,4", help="cluster counts of the clustered baselines")
    p.add_argument("--limit", type=int, default=0, help="use only the first N adapters (0: all)")
    p.add_argument("--shared-layers", type=int, default=30, help="layers of the synthetic shared-init analogue")
    p.add_argument("--sizes", default="8,25,100,500,1000", help="numbers of adapters of the scaling part")
    p.add_argument("--kinds", default="unrelated,shared", help="collections of the scaling part")
    p.add_argument("--planners", default="fixed,plan", help="scaling part: fixed, plan, clusters (comma-separated)")
    p.add_argument("--with-clusters", action="store_true", help="scaling part: also the plan with clusters (2, 4)")
    p.add_argument("--scaling-layers", type=int, default=30, help="layers of SmolLM2's 30 in the scaling part")
    p.add_argument("--mistral-adapters", type=int, default=500)
    p.add_argument("--mistral-layers", type=int, default=32)
    p.add_argument(
        "--mistral-with-fixed",
        action="store_true",
        help="mistral part: time the fixed-rank bundle first (same process)",
    )
    p.add_argument("--device", default="cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default="budget.json")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    args.clusters = [int(c) for c in args.clusters.split(",") if c]
    ratios = [r if r == "default" else float(r) if "." in r else int(r) for r in args.ratios.split(",")]
    if args.with_clusters and "clusters" not in args.planners.split(","):
        args.planners += ",clusters"
    results: dict[str, Any] = {"machine": machine(), "args": vars(args), "load_average": os.getloadavg(), "rows": []}
    parts = args.parts.split(",")
    if "scaling" in parts:
        results["rows"] += part_scaling(args)
    if "mistral" in parts:
        results["rows"] += part_mistral(args)
    if "real" in parts:
        folders = folders_of(Path(args.collection).expanduser())
        folders = folders[: args.limit] if args.limit else folders
        if folders:
            adapters = [read_lora_adapter(f, name=f.name) for f in folders]
            print(f"## real: {len(adapters)} LoRAs from {args.collection}", flush=True)
            results["rows"] += run(LoraFactorSource(adapters), f"real-{len(adapters)}", ratios, args)
        else:
            print(f"## real: no PEFT LoRA folders under {args.collection}; skipped")
    if "shared" in parts:
        folders = folders_of(Path(args.shared).expanduser())
        if folders:
            adapters = [read_lora_adapter(f, name=f.name) for f in folders]
            print(f"## shared: {len(adapters)} LoRAs from {args.shared}", flush=True)
            results["rows"] += run(LoraFactorSource(adapters), f"shared-{len(adapters)}", ratios, args)
        else:
            modules = {m: s for m, s in SMOLLM2_QV.items() if int(m.split(".")[2]) < args.shared_layers}
            source = SharedInitSource(modules, 8, 16, drift=0.5, seed=args.seed)
            print(f"## shared: {args.shared} absent; synthetic shared-init analogue (8 adapters, r16, q/v)", flush=True)
            results["rows"] += run(source, "synthetic-shared-init", ratios, args)
    results["load_average_after"] = os.getloadavg()
    Path(args.out).write_text(json.dumps(results, indent=2, default=str) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
