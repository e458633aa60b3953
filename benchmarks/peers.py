"""Reconstruction error vs stored bytes: JD-LoRA (JD-Full, JD-Diag, clusters, per-adapter SVD) against the peers
`lorashare` (0.1.3) and `vlora-dev` (1.0.0) on the same PEFT LoRA collection.

For every method and knob setting it records the bytes the method actually stores (tensor payload of the files it
writes, or of the bundle) and the paper's squared relative error per adapter,
‖ΔW_i − ΔŴ_i‖²_F / ‖ΔW_i‖²_F averaged over modules, where ΔŴ_i is what a user gets back: for the peers the PEFT LoRA
folder they export (read back with `read_lora_adapter`, so the exported `lora_alpha` counts), for JD-LoRA the
bundle's U_c Σ_i V_c.

    python benchmarks/peers.py                                    # ~/.cache/peft-jdlora/collection, all adapters
    python benchmarks/peers.py --limit 8 --out /tmp/peers         # a quick subset

Results are cached per configuration in <out>/peers.json (reruns resume); <out>/peers.md holds the tables.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))  # jdlora_common, shared with the demo

from jdlora_common import cache_root, write_json_atomic

from peft_jdlora.bundle import adapter_core
from peft_jdlora.compression import compress, read_lora_adapter

# Factors per module as (A [r, d_in], B [d_out, r]) with the scaling folded into B: ΔW = B·A.
Factors = dict[str, tuple[torch.Tensor, torch.Tensor]]

DEFAULT_OUT = Path(__file__).resolve().parent / "results"


def machine() -> str:
    """CPU model and core count, for the tables (timings are not the point here, but the record should say)."""
    model = platform.processor() or "unknown CPU"
    try:
        for line in subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout.splitlines():
            if line.startswith("Model name:"):
                model = line.split(":", 1)[1].strip()
    except (OSError, subprocess.CalledProcessError):
        pass
    return f"{model}, {os.cpu_count()} cores, torch {torch.__version__}"


def collection_folders(collection: Path, limit: int | None) -> list[Path]:
    """Finished adapter folders (those listed in manifest.json when there is one: a folder being written by a
    running training job is not in the manifest yet), sorted by name."""
    manifest = collection / "manifest.json"
    folders = sorted(p.parent for p in collection.glob("*/adapter_model.safetensors"))
    if manifest.is_file():
        done = set(json.loads(manifest.read_text()).get("adapters", {}))
        folders = [f for f in folders if f.name in done]
    return folders[:limit] if limit else folders


def collection_fingerprint(folders: Sequence[Path]) -> str:
    """SHA-256 over every adapter's weights, config and eval data (when present): a cached run applies only to the
    same files."""
    digest = hashlib.sha256()
    for folder in folders:
        for name in ("adapter_config.json", "adapter_model.safetensors", "eval.jsonl"):
            if not (folder / name).is_file():
                continue
            digest.update(f"{folder.name}/{name}\0".encode())
            digest.update(hashlib.sha256((folder / name).read_bytes()).digest())
    return digest.hexdigest()


# ------------------------------------------------------------------------------------------------ the metric


def squared_relative_error(orig: tuple[torch.Tensor, torch.Tensor], approx: tuple[torch.Tensor, torch.Tensor]) -> float:
    """‖B1A1 − B2A2‖²/‖B1A1‖² from the factors, without forming d_out×d_in matrices:
    B1A1 − B2A2 = [B1, −B2]·[A1; A2] and ‖BA‖² = tr((BᵀB)(AAᵀ))."""
    a1, b1 = (t.double() for t in orig)
    a2, b2 = (t.double() for t in approx)
    a = torch.cat([a1, a2])
    b = torch.cat([b1, -b2], dim=1)
    diff = torch.sum((b.T @ b) * (a @ a.T))
    norm = torch.sum((b1.T @ b1) * (a1 @ a1.T))
    return float((diff / norm).clamp_min(0.0)) if norm > 0 else 0.0


def adapter_errors(originals: dict[str, Factors], recon: Callable[[str], Factors]) -> dict[str, float]:
    """Mean over modules of the squared relative error, per adapter. A module missing from the reconstruction counts
    as error 1 (ΔŴ = 0), which is what serving it would give."""
    out = {}
    for name, modules in originals.items():
        approx = recon(name)
        errs = []
        for module, factors in modules.items():
            if module in approx:
                errs.append(squared_relative_error(factors, approx[module]))
            else:
                errs.append(1.0)
        out[name] = sum(errs) / len(errs)
    return out


def safetensors_payload_bytes(folder: Path) -> int:
    """Tensor bytes in every *.safetensors file under `folder` (headers and JSON side files not counted, so that
    the comparison is on stored numbers)."""
    from safetensors import safe_open

    total = 0
    for path in folder.rglob("*.safetensors"):
        with safe_open(str(path), framework="pt") as f:
            for key in f.keys():
                sl = f.get_slice(key)
                numel = 1
                for d in sl.get_shape():
                    numel *= d
                total += numel * _dtype_size(sl.get_dtype())
    return total


def _dtype_size(name: str) -> int:
    return {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "U8": 1, "I8": 1, "BOOL": 1}[name]


def _folder_factors(folder: Path) -> Factors:
    adapter = read_lora_adapter(folder)
    return {m: (a, b) for m, (a, b) in adapter.modules.items()}


# ------------------------------------------------------------------------------------------------ the methods


def run_jd(folders: Sequence[Path], originals: dict[str, Factors], method: str, rank: int, clusters: int) -> dict:
    """Our compression; error from the bundle's own factors (U_c, Σ_i, V_c), bytes from the bundle report."""
    t0 = time.perf_counter()
    if method == "svd":
        bundle = compress([str(f) for f in folders], rank=rank, method="svd", device="cpu", progress=False)
    else:
        sigma = "diag" if method == "jd-diag" else "full"
        bundle = compress(
            [str(f) for f in folders], rank=rank, sigma=sigma, clusters=clusters, device="cpu", progress=False
        )
    seconds = time.perf_counter() - t0

    def recon(name: str) -> Factors:
        slot = bundle.config.resolve_adapter(name)
        out = {}
        for module, f in bundle.modules.items():
            c = bundle.cluster_of(module, slot)
            out[module] = (f.V[c].double(), f.U[c].double() @ adapter_core(f.sigma, slot).double())
        return out

    errors = adapter_errors(originals, recon)
    report = bundle.report
    return {
        "bytes": int(report.size.bytes_bundle),
        "errors": errors,
        "reported_mean_error": float(report.overall.mean_error),
        "seconds": seconds,
        "num_clusters": int(report.num_clusters),
    }


def run_lorashare(folders: Sequence[Path], originals: dict[str, Factors], k: int, work: Path) -> dict:
    """lorashare's SHAREModel: PCA of the stacked A factors and, separately, of the stacked B factors per module
    (k components each), per-adapter loadings; its own checkpoint gives the stored bytes, and each adapter comes
    back through `reconstruct(name, output_dir)` (a PEFT LoRA folder with the original config)."""
    from lorashare import SHAREModel

    t0 = time.perf_counter()
    share = SHAREModel.from_adapters({f.name: str(f) for f in folders}, num_components=k, device="cpu")
    seconds = time.perf_counter() - t0
    ckpt = work / "share"
    share.save_pretrained(ckpt)
    stored = safetensors_payload_bytes(ckpt)

    def recon(name: str) -> Factors:
        out = work / "export" / name
        share.reconstruct(name, output_dir=out)
        return _folder_factors(out)

    errors = adapter_errors(originals, recon)
    return {"bytes": stored, "errors": errors, "seconds": seconds, "k_effective": int(share.config.num_components)}


def run_vlora(folders: Sequence[Path], originals: dict[str, Factors], k: int, work: Path, alpha: bool) -> dict:
    """vlora-dev's SharedSubspace: PCA over whole flattened A (and B) matrices of the adapters per module (k
    components, plus the mean), per-adapter loadings of length k. Export is what `vlora export` does:
    `save_adapter(sub.reconstruct(task))`, with `--alpha` (the original lora_alpha) when `alpha` is True; without
    it the exported config says lora_alpha = r whatever the source had."""
    from vlora import SharedSubspace, load_adapter, save_adapter

    t0 = time.perf_counter()
    adapters = [load_adapter(f) for f in folders]
    sub = SharedSubspace.from_adapters(adapters, task_ids=[f.name for f in folders], num_components=k)
    seconds = time.perf_counter() - t0
    ckpt = work / "subspace"
    sub.save(ckpt)
    stored = safetensors_payload_bytes(ckpt)
    configs = {f.name: json.loads((f / "adapter_config.json").read_text()) for f in folders}

    def recon(name: str) -> Factors:
        weights = sub.reconstruct(name)
        cfg = configs[name]
        # What `vlora export --base-model ... --target-modules ...` writes; `--alpha` only when asked.
        weights.metadata["base_model_name_or_path"] = cfg.get("base_model_name_or_path")
        weights.metadata["target_modules"] = cfg.get("target_modules")
        weights.metadata["task_type"] = cfg.get("task_type")
        if alpha:
            weights.metadata["lora_alpha"] = cfg["lora_alpha"]
        out = work / "export" / name
        save_adapter(weights, out)
        return _folder_factors(out)

    errors = adapter_errors(originals, recon)
    return {"bytes": stored, "errors": errors, "seconds": seconds, "k_effective": int(sub.num_components)}


# ------------------------------------------------------------------------------------------------ the sweep


def configurations(n: int) -> list[dict[str, Any]]:
    """The settings swept: enough of each knob to draw error-vs-bytes curves over the same byte range."""
    cfgs: list[dict[str, Any]] = []
    for r in (8, 16, 32, 64, 128):
        cfgs.append({"method": "jd-full", "rank": r, "clusters": 1})
    for c in (2, 4):
        for r in (16, 32, 64):
            cfgs.append({"method": "jd-full", "rank": r, "clusters": c})
    cfgs.append({"method": "jd-full", "rank": 32, "clusters": 8})
    for r in (16, 32, 64, 128):
        cfgs.append({"method": "jd-diag", "rank": r, "clusters": 1})
    for r in (1, 2, 4, 8, 12, 16):
        cfgs.append({"method": "svd", "rank": r, "clusters": 1})
    for k in (8, 16, 32, 64, 128, 192):
        cfgs.append({"method": "lorashare", "k": k})
    for k in sorted({1, 2, 4, 8, 12, 16, n - 1, n}):
        if 1 <= k <= n:
            cfgs.append({"method": "vlora-dev", "k": k, "alpha": True})
    for k in sorted({4, n}):
        cfgs.append({"method": "vlora-dev", "k": k, "alpha": False})
    return cfgs


def config_key(cfg: dict[str, Any]) -> str:
    return ",".join(f"{k}={cfg[k]}" for k in sorted(cfg))


def run_config(cfg: dict[str, Any], folders: Sequence[Path], originals: dict[str, Factors]) -> dict[str, Any]:
    work = Path(tempfile.mkdtemp(prefix="jdlora-peers-"))
    try:
        if cfg["method"] in ("jd-full", "jd-diag", "svd"):
            return run_jd(folders, originals, cfg["method"], cfg["rank"], cfg["clusters"])
        if cfg["method"] == "lorashare":
            return run_lorashare(folders, originals, cfg["k"], work)
        return run_vlora(folders, originals, cfg["k"], work, cfg["alpha"])
    finally:
        shutil.rmtree(work, ignore_errors=True)


def label(cfg: dict[str, Any]) -> str:
    m = cfg["method"]
    if m == "jd-full":
        return f"JD-Full r={cfg['rank']}" + (f" C={cfg['clusters']}" if cfg["clusters"] > 1 else "")
    if m == "jd-diag":
        return f"JD-Diag r={cfg['rank']}"
    if m == "svd":
        return f"SVD r'={cfg['rank']}"
    if m == "lorashare":
        return f"lorashare k={cfg['k']}"
    return f"vlora-dev k={cfg['k']}" + ("" if cfg["alpha"] else " (export default alpha)")


def markdown(results: dict[str, Any]) -> str:
    rows = sorted(results["runs"].values(), key=lambda e: (e["config"]["method"], e["bytes"]))
    orig = results["original_bytes"]
    lines = [
        f"Collection: {results['num_adapters']} adapters ({results['collection']}), original LoRA bytes "
        f"{orig / 2**20:.2f} MiB; machine: {results['machine']}.",
        "",
        "| method | stored MiB | × originals | mean error | median | max | seconds |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for e in rows:
        errs = sorted(e["errors"].values())
        lines.append(
            f"| {label(e['config'])} | {e['bytes'] / 2**20:.3f} | {e['bytes'] / orig:.3f} | {e['mean_error']:.4f} "
            f"| {errs[len(errs) // 2]:.4f} | {errs[-1]:.4f} | {e['seconds']:.1f} |"
        )
    lines += ["", *equal_bytes_table(results)]
    return "\n".join(lines) + "\n"


def equal_bytes_table(results: dict[str, Any]) -> list[str]:
    """For every peer setting, the best JD-LoRA setting that stores no more bytes: the comparison issue 6 asks for."""
    runs = list(results["runs"].values())
    ours = [e for e in runs if e["config"]["method"] in ("jd-full", "jd-diag", "svd")]
    peers = [e for e in runs if e["config"]["method"] in ("lorashare", "vlora-dev")]
    lines = [
        "| peer setting | peer MiB | peer error | best JD-LoRA at ≤ those bytes | its MiB | its error |",
        "|---|---:|---:|---|---:|---:|",
    ]
    for p in sorted(peers, key=lambda e: (e["config"]["method"], e["bytes"])):
        fit = [e for e in ours if e["bytes"] <= p["bytes"]]
        best = min(fit, key=lambda e: e["mean_error"]) if fit else None
        lines.append(
            f"| {label(p['config'])} | {p['bytes'] / 2**20:.3f} | {p['mean_error']:.4f} | "
            + (
                f"{label(best['config'])} | {best['bytes'] / 2**20:.3f} | {best['mean_error']:.4f} |"
                if best
                else "(none that small) | | |"
            )
        )
    return lines


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--collection", type=Path, default=cache_root() / "collection")
    p.add_argument("--limit", type=int, default=None, help="use only the first N adapters")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="results folder (peers.json, peers.md)")
    p.add_argument("--only", default=None, help="comma-separated methods to run (jd-full,jd-diag,svd,lorashare,...)")
    p.add_argument("--threads", type=int, default=1)
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    folders = collection_folders(args.collection.expanduser(), args.limit)
    if len(folders) < 2:
        raise SystemExit(f"{args.collection} holds {len(folders)} finished adapters; need at least 2.")
    names = [f.name for f in folders]
    originals: dict[str, Factors] = {f.name: _folder_factors(f) for f in folders}
    original_bytes = sum(safetensors_payload_bytes(f) for f in folders)
    out_json = args.out / "peers.json"
    results: dict[str, Any] = json.loads(out_json.read_text()) if out_json.is_file() else {}
    fingerprint = collection_fingerprint(folders)
    if (results.get("adapters"), results.get("fingerprint")) != (names, fingerprint):
        # Cached runs do not apply: a different collection, or an adapter retrained since.
        results = {"adapters": names, "fingerprint": fingerprint, "runs": {}}
    results.update(
        collection=str(args.collection),
        num_adapters=len(names),
        original_bytes=original_bytes,
        machine=machine(),
        command="python benchmarks/peers.py " + " ".join(sys.argv[1:] if argv is None else argv),
    )
    only = set(args.only.split(",")) if args.only else None
    for cfg in configurations(len(names)):
        key = config_key(cfg)
        if key in results["runs"] or (only and cfg["method"] not in only):
            continue
        t0 = time.perf_counter()
        entry = run_config(cfg, folders, originals)
        entry["config"] = cfg
        entry["mean_error"] = sum(entry["errors"].values()) / len(entry["errors"])
        results["runs"][key] = entry
        write_json_atomic(out_json, results)  # after every configuration, so that an interrupted run resumes
        print(
            f"{label(cfg):42s} {entry['bytes'] / 2**20:8.3f} MiB  error {entry['mean_error']:.4f}  "
            f"({time.perf_counter() - t0:.0f} s)",
            flush=True,
        )
    (args.out / "peers.md").write_text(markdown(results))
    print(markdown(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
