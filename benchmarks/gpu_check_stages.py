"""The torch-side stages of benchmarks/gpu_check.py, one per subcommand, each writing one JSON file.

    python benchmarks/gpu_check_stages.py probe  --json probe.json  [--dry-run]   versions, GPU, a smoke run
    python benchmarks/gpu_check_stages.py checks --json checks.json [--dry-run]   kernels against float64
    python benchmarks/gpu_check_stages.py tune   --json tune.json   [--dry-run] [--deadline EPOCH]

`checks`: the kernels against a float64 reference and against PyTorch in the same dtype, on the serving shapes
(d 4096, r 16, a bundle of 1000; decode 256 tokens every one its own adapter with some base rows, prefill 2048 tokens
in 64 requests) for fp16 / bf16, full / diagonal Σ, 1 / 2 / 4 / 8 clusters, every Σ epilogue, split-K as the
heuristic picks it, off and forced; the one-basis dense path; fused QKV slices; a CUDA-graph replay on a new batch.

`tune`: one launch knob at a time away from the heuristic's configuration (BLOCK_M, SPLIT_K, BLOCK_K, warps and
stages of the shrink, BLOCK_N, warps and stages of the expand, the Σ epilogue, the dense one-basis path, the shrink
folded into the base GEMM), timed as CUDA-graph replays on the decode and prefill shapes that matter, then every
knob's best value together. It stops at --deadline and keeps what it measured.

With --dry-run everything runs on the CPU in the Triton interpreter (TRITON_INTERPRET=1) at tiny shapes: a
rehearsal of the code paths, not a measurement. Each result file is rewritten after every row, so a stage stopped at
its time limit leaves what it finished.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import platform
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Optional

import torch

HERE = Path(__file__).resolve().parent


def load_kernel_bench():
    """benchmarks/kernels.py under another name: `kernels` is Hugging Face's kernel loader."""
    spec = importlib.util.spec_from_file_location("jdlora_bench_kernels", HERE / "kernels.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def write_json(path: Path, data: Any) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str) + "\n")
    tmp.replace(path)


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return float((actual.double() - expected.double()).norm() / expected.double().norm().clamp(min=1e-30))


def device_for(dry_run: bool) -> torch.device:
    if dry_run:
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise SystemExit("no CUDA device: torch.cuda.is_available() is False (use --dry-run to rehearse on the CPU)")
    return torch.device("cuda")


# ---------------------------------------------------------------------------------------------- probe


def probe(args) -> dict[str, Any]:
    """Versions and locations of the packages the run uses, the GPU, and a smoke run of each layer of the stack."""
    result: dict[str, Any] = {
        "python": platform.python_version(),
        "executable": sys.executable,
        "platform": platform.platform(),
        "packages": {},
        "smoke": {},
    }
    for name in ("torch", "triton", "numpy", "transformers", "peft", "huggingface_hub", "safetensors", "tokenizers"):
        try:
            module = __import__(name)
            result["packages"][name] = {"version": getattr(module, "__version__", "?"), "path": module.__file__}
        except Exception as err:  # reported, not raised: the summary says what is missing
            result["packages"][name] = {"error": f"{type(err).__name__}: {err}"}
    for name in ("accelerate", "peft_jdlora", "jdlora_kernels"):
        try:
            module = __import__(name)
            result["packages"][name] = {"version": getattr(module, "__version__", "?"), "path": module.__file__}
        except Exception as err:
            result["packages"][name] = {"error": f"{type(err).__name__}: {err}"}
    result["cuda"] = {"available": torch.cuda.is_available(), "torch_cuda": torch.version.cuda}
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        result["cuda"].update(
            name=props.name,
            capability=f"{props.major}.{props.minor}",
            multiprocessors=props.multi_processor_count,
            memory_gib=round(props.total_memory / 2**30, 1),
            devices=torch.cuda.device_count(),
        )
        result["gpu"] = props.name
    else:
        result["gpu"] = None
    try:
        smi = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=20)
        result["nvidia_smi"] = smi.stdout.strip() or smi.stderr.strip()
    except (OSError, subprocess.SubprocessError) as err:
        result["nvidia_smi"] = f"not available ({type(err).__name__})"
    result["smoke"] = smoke(args.dry_run)
    result["ok"] = all(step["ok"] for step in result["smoke"].values())
    return result


def smoke(dry_run: bool) -> dict[str, dict[str, Any]]:
    """Each layer of the stack once: a kernel launch, a tiny Llama with a PEFT LoRA, a tiny Llama with a bundle."""
    steps: dict[str, dict[str, Any]] = {}

    def step(name: str, fn) -> None:
        start = time.perf_counter()
        try:
            detail = fn()
            steps[name] = {"ok": True, "seconds": round(time.perf_counter() - start, 2), "detail": detail}
        except Exception as err:  # a failing step is the finding
            steps[name] = {
                "ok": False,
                "error": f"{type(err).__name__}: {err}",
                "trace": traceback.format_exc()[-2000:],
            }

    device = torch.device("cpu" if dry_run else ("cuda" if torch.cuda.is_available() else "cpu"))

    def kernel() -> str:
        import jdlora_kernels as jk

        gen = torch.Generator().manual_seed(0)
        x = torch.randn(24, 64, generator=gen)
        U, V = torch.randn(2, 48, 16, generator=gen), torch.randn(2, 16, 64, generator=gen)
        sigma, clusters = torch.randn(5, 16, 16, generator=gen), torch.tensor([0, 1, 1, 0, 1])
        slots = torch.randint(-1, 5, (24,), generator=gen)
        to = lambda t: t.to(device)  # noqa: E731
        y = jk.jd_lora_delta(to(x), slots, to(U), to(V), to(sigma), clusters)
        expected = jk.jd_lora_delta_ref(x.double(), slots, U.double(), V.double(), sigma.double(), clusters)
        err = rel_err(y.cpu(), expected)
        if err > 1e-4:
            raise AssertionError(f"kernel vs float64 relative error {err:.2e}")
        return f"{device.type}, interpreted={jk.INTERPRETED}, rel err {err:.1e}"

    def tiny_llama():
        from transformers import LlamaConfig, LlamaForCausalLM

        torch.manual_seed(0)
        config = LlamaConfig(
            vocab_size=128,
            hidden_size=64,
            intermediate_size=96,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            pad_token_id=0,
        )
        return LlamaForCausalLM(config).to(device).eval()

    def peft_lora() -> str:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(tiny_llama(), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
        with torch.no_grad():
            logits = model(input_ids=torch.ones(2, 5, dtype=torch.long, device=device)).logits
        return f"logits {tuple(logits.shape)}"

    def bundle() -> str:
        import tempfile

        from peft import PeftModel

        import peft_jdlora
        from peft_jdlora.bundle import Bundle, ModuleFactors

        base = tiny_llama()
        modules = {}
        gen = torch.Generator().manual_seed(0)
        for name, module in base.named_modules():
            if name.endswith(("q_proj", "v_proj")):
                U = torch.randn(1, module.out_features, 4, generator=gen)
                V = torch.randn(1, 4, module.in_features, generator=gen)
                modules[name] = ModuleFactors(U, V, torch.randn(3, 4, 4, generator=gen))
        config = peft_jdlora.JDLoraConfig(
            target_modules=sorted(modules), r=4, adapter_names=["a", "b", "c"], task_type="CAUSAL_LM"
        )
        with tempfile.TemporaryDirectory() as tmp:
            peft_jdlora.save_bundle(Bundle(config=config, modules=modules), Path(tmp) / "bundle")
            model = PeftModel.from_pretrained(base, Path(tmp) / "bundle").eval()
            with torch.no_grad():
                ids = torch.ones(3, 5, dtype=torch.long, device=device)
                logits = model(input_ids=ids, adapter_ids=["a", None, 2]).logits
        return f"logits {tuple(logits.shape)}"

    step("kernel", kernel)
    step("peft_lora", peft_lora)
    step("bundle", bundle)
    return steps


# ---------------------------------------------------------------------------------------------- checks


def make_problem(T: int, d: int, r: int, N: int, C: int, pattern: str, sigma_type: str, dtype, device, seed: int):
    gen = torch.Generator().manual_seed(seed)
    if pattern == "decode":  # every token its own adapter, an eighth of the rows on the base model
        slots = torch.randperm(N, generator=gen)[:T]
        slots[torch.randperm(T, generator=gen)[: T // 8]] = -1
    else:  # prefill: 64 requests of contiguous tokens (one of them, maybe, on the base model)
        slots = torch.randint(-1, N, (64,), generator=gen).repeat_interleave(T // 64)
    return {
        "x": torch.randn(T, d, generator=gen).to(device, dtype),
        "slots": slots,
        "clusters": torch.randint(0, C, (N,), generator=gen),
        "U": (torch.randn(C, d, r, generator=gen) / r**0.5).to(device, dtype),
        "V": (torch.randn(C, r, d, generator=gen) / d**0.5).to(device, dtype),
        "sigma": torch.randn((N, r, r) if sigma_type == "full" else (N, r), generator=gen).to(device, dtype),
    }


def fp64_update(jk, p: dict[str, torch.Tensor]) -> torch.Tensor:
    d = lambda t: t.double()  # noqa: E731
    device = p["x"].device
    slots, clusters = p["slots"].to(device), p["clusters"].to(device)
    return jk.jd_lora_delta_ref(d(p["x"]), slots, d(p["U"]), d(p["V"]), d(p["sigma"]), clusters)


def check_matrix(small: bool) -> dict[str, Any]:
    """What `checks` covers: the serving shapes on a GPU, a few of each kind in the rehearsal."""
    if small:
        return dict(d=64, r=16, N=40, batches=(("decode", 16), ("prefill", 64)), clusters=(1, 2), splits=("auto", 4))
    batches = (("decode", 256), ("prefill", 2048))
    return dict(d=4096, r=16, N=1000, batches=batches, clusters=(1, 2, 4, 8), splits=("auto", 1, 4))


def checks(args) -> dict[str, Any]:
    import jdlora_kernels as jk

    from peft_jdlora import ops

    device = device_for(args.dry_run)
    small = args.dry_run
    matrix = check_matrix(small)
    d, r, N, batches = matrix["d"], matrix["r"], matrix["N"], matrix["batches"]
    cluster_counts, splits = matrix["clusters"], matrix["splits"]
    dtypes = {"fp16": torch.float16, "bf16": torch.bfloat16}
    limits = {"fp16": 5e-3, "bf16": 3e-2}
    # Kernel error against PyTorch's in the same dtype: about equal on a GPU; the interpreter rounds fp32 -> bf16
    # toward zero (GPUs round to nearest), which doubles it there (as in tests/test_kernels.py).
    slack = {"fp16": 1.5, "bf16": 3.0 if jk.INTERPRETED else 1.5}
    out: dict[str, Any] = {
        "shapes": {"d_in": d, "d_out": d, "rank": r, "adapters": N},
        "limits": limits,
        "torch_error_slack": slack,
        "rows": [],
    }

    def record(**row) -> None:
        out["rows"].append(row)
        write_json(args.json, out)

    for dtype_name, dtype in dtypes.items():
        limit = limits[dtype_name]
        for sigma_type in ("full", "diag"):
            modes = {"diag": jk.SIGMA_DIAG} if sigma_type == "diag" else {"tile": jk.SIGMA_TILE, "row": jk.SIGMA_ROW}
            for clusters in cluster_counts:
                for pattern, T in batches:
                    p = make_problem(T, d, r, N, clusters, pattern, sigma_type, dtype, device, seed=T + clusters)
                    expected = fp64_update(jk, p)
                    slots_dev, clusters_dev = p["slots"].to(device), p["clusters"].to(device)
                    torch_y = ops.jd_lora_delta(
                        p["x"], slots_dev, p["U"], p["V"], p["sigma"], clusters_dev, backend="torch"
                    )
                    torch_err = rel_err(torch_y, expected)
                    meta = jk.JDLoraKernelMeta.from_token_slots(p["slots"], p["clusters"], device=device)
                    base_rows = (p["slots"] < 0).to(device)
                    key = dict(dtype=dtype_name, sigma=sigma_type, clusters=clusters, batch=pattern, tokens=T)
                    for mode_name, mode in modes.items():
                        for split in splits:
                            config = None if split == "auto" else {"SPLIT_K": split}
                            y = torch.zeros(T, d, dtype=dtype, device=device)
                            try:
                                jk.add_jd_lora(
                                    y, p["x"], meta, p["U"], p["V"], p["sigma"], sigma_mode=mode, shrink_config=config
                                )
                            except Exception as err:  # recorded as a failed check
                                record(**key, path=f"{mode_name}/split={split}", ok=False, error=repr(err)[:500])
                                continue
                            err = rel_err(y, expected)
                            untouched = not bool(y[base_rows].any())
                            ok = err < limit and err <= slack[dtype_name] * torch_err + 1e-3 and untouched
                            record(
                                **key,
                                path=f"{mode_name}/split={split}",
                                rel_err=err,
                                torch_rel_err=torch_err,
                                limit=limit,
                                base_rows_untouched=untouched,
                                ok=ok,
                            )
                    if clusters == 1:
                        y = torch.zeros(T, d, dtype=dtype, device=device)
                        jk.add_jd_lora_dense(y, p["x"], meta, p["U"], p["V"], p["sigma"])
                        err = rel_err(y, expected)
                        record(**key, path="dense", rel_err=err, torch_rel_err=torch_err, limit=limit, ok=err < limit)
        record(**fused_slices_check(jk, dtype_name, dtype, limit, device, small))
    if device.type == "cuda":
        record(**graph_replay_check(jk, device))
    out["passed"] = sum(1 for row in out["rows"] if row.get("ok"))
    out["failed"] = sum(1 for row in out["rows"] if not row.get("ok"))
    write_json(args.json, out)
    return out


def fused_slices_check(jk, dtype_name: str, dtype, limit: float, device, small: bool) -> dict[str, Any]:
    """Fused QKV of a 4096-wide Llama (4096 / 1024 / 1024 columns), two clusters, one input and one metadata."""
    gen = torch.Generator().manual_seed(5)
    d, r, N, T = (64, 16, 40, 24) if small else (4096, 16, 1000, 256)
    widths = (d, d // 4, d // 4)
    x = torch.randn(T, d, generator=gen).to(device, dtype)
    clusters = torch.randint(0, 2, (N,), generator=gen)
    slots = torch.randint(-1, N, (T,), generator=gen)
    Us = [(torch.randn(2, w, r, generator=gen) / r**0.5).to(device, dtype) for w in widths]
    Vs = [(torch.randn(2, r, d, generator=gen) / d**0.5).to(device, dtype) for _ in widths]
    sigmas = [torch.randn(N, r, r, generator=gen).to(device, dtype) for _ in widths]
    meta = jk.JDLoraKernelMeta.from_token_slots(slots, clusters, device=device)
    y = jk.add_jd_lora(torch.zeros(T, sum(widths), dtype=dtype, device=device), x, meta, Us, Vs, sigmas)
    errors, start = [], 0
    for U, V, sigma, width in zip(Us, Vs, sigmas, widths):
        p = {"x": x, "slots": slots, "clusters": clusters, "U": U, "V": V, "sigma": sigma}
        errors.append(rel_err(y[:, start : start + width], fp64_update(jk, p)))
        start += width
    return dict(dtype=dtype_name, path="fused_qkv", tokens=T, rel_err=max(errors), limit=limit, ok=max(errors) < limit)


def graph_replay_check(jk, device) -> dict[str, Any]:
    """add_jd_lora and the dense path captured in one CUDA graph, replayed after `copy_` of a new batch."""
    dtype = torch.bfloat16
    p = make_problem(256, 4096, 16, 1000, 1, "decode", "full", dtype, device, seed=9)
    meta = jk.JDLoraKernelMeta.from_token_slots(p["slots"], p["clusters"], device=device)
    y = torch.zeros(256, 4096, dtype=dtype, device=device)
    y_dense = torch.zeros_like(y)

    def step():
        y.zero_()
        y_dense.zero_()
        jk.add_jd_lora(y, p["x"], meta, p["U"], p["V"], p["sigma"])
        jk.add_jd_lora_dense(y_dense, p["x"], meta, p["U"], p["V"], p["sigma"])

    step()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    new_slots = torch.randperm(1000, generator=torch.Generator().manual_seed(3))[:256]
    meta.copy_(jk.JDLoraKernelMeta.from_token_slots(new_slots, p["clusters"], device=device))
    graph.replay()
    torch.cuda.synchronize()
    expected = fp64_update(jk, {**p, "slots": new_slots})
    errors = (rel_err(y, expected), rel_err(y_dense, expected))
    return dict(
        dtype="bf16", path="cuda_graph_replay", tokens=256, rel_err=max(errors), limit=3e-2, ok=max(errors) < 3e-2
    )


# ---------------------------------------------------------------------------------------------- tune


def tune_variants(jk, small: bool) -> list[tuple[str, Any, dict[str, Any]]]:
    """(knob, value, Batch kwargs) one knob at a time, in the order of their expected effect (a deadline may cut the
    list short). "block_m" changes the metadata's tiles; the others are launch overrides of add_jd_lora."""

    def shrink(**cfg):
        return {"jd_config": {"shrink_config": cfg}}

    def expand(**cfg):
        return {"jd_config": {"expand_config": cfg}}

    variants: list[tuple[str, Any, dict[str, Any]]] = [("default", "-", {})]
    grid = {
        "SPLIT_K": ((1, 2, 4, 8, 16, 32), lambda v: shrink(SPLIT_K=v)),
        "BLOCK_M": ((16, 32, 64), lambda v: {"block_m": v}),
        "BLOCK_N": ((32, 64, 128, 256), lambda v: expand(BLOCK_N=v)),
        "sigma_mode": (("tile", "row"), lambda v: {"jd_config": {"sigma_mode": {"tile": 1, "row": 2}[v]}}),
        "BLOCK_K": ((32, 64, 128), lambda v: shrink(BLOCK_K=v)),
        "shrink_warps": ((2, 4, 8), lambda v: shrink(num_warps=v)),
        "shrink_stages": ((2, 3, 4), lambda v: shrink(num_stages=v)),
        "expand_warps": ((4, 8), lambda v: expand(num_warps=v)),
        "expand_stages": ((1, 2, 3), lambda v: expand(num_stages=v)),
    }
    if small:  # the rehearsal: every code path once, not every value
        grid = {knob: (values[:1], kwargs) for knob, (values, kwargs) in grid.items() if knob in ("SPLIT_K", "BLOCK_M")}
    for knob, (values, kwargs) in grid.items():
        variants += [(knob, value, kwargs(value)) for value in values]
    return variants


def tune_shapes(small: bool) -> tuple[tuple[str, int, int], ...]:
    """(phase, tokens, distinct adapters) the sweep times, most important first."""
    if small:
        return (("decode", 8, 8), ("prefill", 32, 4))
    return (("decode", 256, 256), ("decode", 1024, 1000), ("decode", 64, 64), ("prefill", 2048, 64))


def merge_variant(parts: list[dict[str, Any]]) -> dict[str, Any]:
    """Several one-knob Batch kwargs as one (the combined best configuration)."""
    merged: dict[str, Any] = {"jd_config": {}}
    for part in parts:
        if "block_m" in part:
            merged["block_m"] = part["block_m"]
        for key, value in part.get("jd_config", {}).items():
            if isinstance(value, dict):
                merged["jd_config"].setdefault(key, {}).update(value)
            else:
                merged["jd_config"][key] = value
    return merged


def tune(args) -> dict[str, Any]:
    import jdlora_kernels as jk

    bench = load_kernel_bench()
    device = device_for(args.dry_run)
    small = args.dry_run
    bench_args = bench.parse_args(["--out", str(args.json)] + (["--dry-run"] if small else []))
    bench_args.sigma = ["full"]
    weights = bench.make_weights(bench_args, device, torch.Generator().manual_seed(0))
    shapes = tune_shapes(small)
    warmup, iters, graph = (1, 1, False) if small else (5, 30, True)
    deadline = args.deadline or float("inf")
    out: dict[str, Any] = {
        "shapes": [list(s) for s in shapes],
        "d_in": bench_args.d_in,
        "rank": bench_args.rank,
        "rows": [],
        "complete": False,
    }

    def measure(phase, tokens, distinct, kwargs, method="jd_full") -> float:
        gen = torch.Generator().manual_seed(tokens * 7919 + distinct)  # the same batch for every variant
        batch = bench.Batch(jk, bench_args, phase, tokens, distinct, weights, gen, **kwargs)
        batch.check(bench_args.tolerance, methods=[method])  # a knob must not buy speed with wrong numbers
        return bench.time_ms(batch.methods[method], warmup, iters, graph=graph)

    def record(phase, tokens, distinct, knob, value, kwargs, method="jd_full") -> Optional[float]:
        row = {"phase": phase, "tokens": tokens, "distinct": distinct, "knob": knob, "value": value, "method": method}
        try:
            row["ms"] = measure(phase, tokens, distinct, kwargs, method)
        except Exception as err:  # e.g. out of shared memory: that configuration is not an option
            row["error"] = f"{type(err).__name__}: {str(err)[:300]}"
        out["rows"].append(row)
        write_json(args.json, out)
        return row.get("ms")

    variants = tune_variants(jk, small)
    best: dict[tuple, dict[str, tuple[float, Any, dict]]] = {shape: {} for shape in shapes}
    default_ms: dict[tuple, float] = {}
    for knob, value, kwargs in variants:
        for shape in shapes:
            if time.time() > deadline - 10:
                return out
            ms = record(*shape, knob, value, kwargs)
            if knob == "default" and ms is not None:
                default_ms[shape] = ms
            elif ms is not None and ms < best[shape].get(knob, (float("inf"),))[0]:
                best[shape][knob] = (ms, value, kwargs)
    for shape in shapes:  # alternatives to the two launches: one basis through cuBLAS, the shrink folded in
        if time.time() > deadline - 10:
            return out
        record(*shape, "path", "dense", {}, method="jd_dense_full")
        record(*shape, "path", "layer_jd", {}, method="layer_jd_full")
        record(*shape, "path", "layer_fold", {}, method="layer_fold_full")
    out["combined"] = []
    for shape in shapes:
        if time.time() > deadline - 10 or shape not in default_ms:
            return out
        winners = [(knob, v) for knob, v in best[shape].items() if v[0] < default_ms[shape]]
        parts = [kwargs for _, (_, _, kwargs) in winners]
        choice = {knob: value for knob, (_, value, _) in winners}
        # Timed even when no knob won (then it is the default again): every shape gets its row.
        ms = record(*shape, "combined", json.dumps(choice), merge_variant(parts))
        default_again = record(*shape, "default", "again", {})
        out["combined"].append(
            {
                "shape": list(shape),
                "choice": choice,
                "ms": ms,
                "default_ms": default_ms[shape],
                "default_again": default_again,
            }
        )
        write_json(args.json, out)
    out["complete"] = True
    write_json(args.json, out)
    return out


# ---------------------------------------------------------------------------------------------- main


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("stage", choices=("probe", "checks", "tune"))
    parser.add_argument("--json", type=Path, required=True, help="where the stage writes its results")
    parser.add_argument("--dry-run", action="store_true", help="CPU, Triton interpreter, tiny shapes")
    parser.add_argument("--deadline", type=float, default=None, help="tune: stop before this time.time()")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    if args.stage == "probe":
        result = probe(args)
        write_json(args.json, result)
        print(json.dumps({k: v for k, v in result.items() if k != "smoke"}, indent=2, default=str))
        for name, step in result["smoke"].items():
            print(f"smoke {name}: {'ok ' + str(step.get('detail')) if step['ok'] else 'FAILED ' + step['error']}")
            if not step["ok"]:
                print(step["trace"])
        return 0 if result["ok"] else 1
    if args.stage == "checks":
        result = checks(args)
        for row in result["rows"]:
            where = " ".join(f"{k}={row[k]}" for k in ("dtype", "sigma", "clusters", "batch", "path") if k in row)
            err = f"rel err {row['rel_err']:.2e}" if "rel_err" in row else row.get("error")
            print(f"{'ok  ' if row['ok'] else 'FAIL'} {where}: {err}")
        print(f"checks: {result['passed']} passed, {result['failed']} failed")
        return 0 if result["failed"] == 0 else 1
    result = tune(args)
    for row in result["rows"]:
        print(row, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
