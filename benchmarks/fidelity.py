"""Fidelity of compressed adapters on their real tasks (the paper's measures), served as a product would serve them.

For each adapter of a collection written by `benchmarks/train_collection.py`, compared with the original LoRA:

- task loss (cross-entropy per answer token) on held-out examples of its task;
- exact match and ROUGE-L (F1 of the longest common token subsequence) of greedy generations against the targets,
  and their ratio compressed / original ("relative performance");
- agreement: the share of greedy generations identical (token for token) to those of the original LoRA.

The originals run in one PEFT `PeftModel` holding every original LoRA, each row choosing its own with
`adapter_names=[...]`; a compressed collection runs as a JD-LoRA bundle loaded with `PeftModel.from_pretrained`,
each row choosing its adapter with `adapter_ids=[...]`. Every batch interleaves the tasks, so neighbouring rows use
different adapters (the mixed batch the product exists for). Peers (lorashare, vlora-dev) are evaluated from the
PEFT LoRA folders they export, with PEFT's LoRA like the originals.

    python benchmarks/fidelity.py                                  # default settings, whole collection
    python benchmarks/fidelity.py --limit 6 --n-eval 8 --configs jd-full:16:1 --out /tmp/fid

Results are cached per configuration in <out>/fidelity.json (reruns resume); <out>/fidelity.md holds the table.
Affordable on 2 shared CPU cores: SmolLM2-135M, 1 torch thread, a few greedy tokens per example.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # peers.py beside this file
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))  # jdlora_common, shared with the demo

from jdlora_common import (
    cache_root,
    chat_prompt,
    collate,
    greedy_generate,
    load_smollm2,
    tokenize_examples,
    write_json_atomic,
)
from peers import collection_fingerprint, collection_folders, machine, safetensors_payload_bytes

DEFAULT_OUT = Path(__file__).resolve().parent / "results"
DEFAULT_CONFIGS = (
    "jd-full:16:1",
    "jd-full:32:1",
    "jd-full:64:1",
    "jd-full:8:1",
    "jd-full:32:4",
    "jd-diag:64:1",
    "svd:4:1",
    "lorashare:32",
    "vlora-dev:4",
    "jd-full:32:2",
    "jd-diag:32:1",
    "svd:2:1",
)


# ------------------------------------------------------------------------------------------------ metrics


def normalize(text: str) -> str:
    """Whitespace-collapsed, stripped text (case kept: some tasks are about case)."""
    return " ".join(text.split())


def exact_match(prediction: str, target: str) -> float:
    return float(normalize(prediction) == normalize(target))


def rouge_l(prediction: str, target: str) -> float:
    """ROUGE-L F1 over lower-cased whitespace tokens: LCS length against the lengths of both sequences."""
    p, t = prediction.lower().split(), target.lower().split()
    if not p or not t:
        return float(p == t)
    # LCS by dynamic programming over one row (answers are a few tokens long).
    prev = [0] * (len(t) + 1)
    for x in p:
        cur = [0]
        for j, y in enumerate(t):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    lcs = prev[-1]
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(p), lcs / len(t)
    return 2 * precision * recall / (precision + recall)


# ------------------------------------------------------------------------------------------------ data


def eval_rows(folders: Sequence[Path], tokenizer: Any, n_eval: int, seq_len: int) -> list[dict[str, Any]]:
    """Held-out examples (the eval.jsonl saved beside each adapter), the first `n_eval` per task that fit in
    `seq_len` tokens, interleaved round-robin over the tasks so that every batch mixes adapters."""
    per_task: list[list[dict[str, Any]]] = []
    for folder in folders:
        with open(folder / "eval.jsonl") as f:
            examples = [json.loads(line) for line in f]
        instruction = examples[0]["instruction"]
        tokenized, kept = tokenize_examples(tokenizer, instruction, examples, seq_len)
        rows = []
        for tok, i in list(zip(tokenized, kept))[:n_eval]:
            ex = examples[i]
            rows.append(
                {
                    "adapter": folder.name,
                    "prompt": chat_prompt(ex["instruction"], ex["input"]),
                    "target": ex["target"],
                    "tokens": tok,
                }
            )
        per_task.append(rows)
    mixed = []
    for k in range(max(len(r) for r in per_task)):
        mixed += [rows[k] for rows in per_task if k < len(rows)]
    return mixed


# ------------------------------------------------------------------------------------------------ evaluation


@torch.no_grad()
def row_losses(
    model: Any, rows: Sequence[dict], pad_id: int, batch_size: int, **select: Any
) -> list[tuple[float, int]]:
    """(summed answer-token cross-entropy, answer tokens) per row; `select` is adapter_names= or adapter_ids= for
    the rows of the whole list (sliced per batch)."""
    ((key, ids),) = select.items()
    out = []
    for start in range(0, len(rows), batch_size):
        chunk = rows[start : start + batch_size]
        batch = collate([r["tokens"] for r in chunk], pad_id)
        logits = model(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            **{key: ids[start : start + batch_size]},
        ).logits.float()
        labels = batch["labels"][:, 1:]
        ce = torch.nn.functional.cross_entropy(
            logits[:, :-1].transpose(1, 2), labels, ignore_index=-100, reduction="none"
        )  # [rows, tokens]
        mask = labels != -100
        out += [(float(ce[i][mask[i]].sum()), int(mask[i].sum())) for i in range(len(chunk))]
    return out


def evaluate_model(
    model: Any, tokenizer: Any, rows: Sequence[dict], batch_size: int, max_new_tokens: int, **select: Any
) -> dict[str, Any]:
    """Per-row losses and greedy generations (token ids up to end-of-turn) of a mixed batch."""
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    t0 = time.perf_counter()
    losses = row_losses(model, rows, pad_id, batch_size, **select)
    t_loss = time.perf_counter() - t0
    ((key, ids),) = select.items()
    generations: list[list[int]] = []
    t_gen = 0.0
    for start in range(0, len(rows), batch_size):
        chunk = rows[start : start + batch_size]
        gen, seconds = greedy_generate(
            model, tokenizer, [r["prompt"] for r in chunk], max_new_tokens, **{key: ids[start : start + batch_size]}
        )
        generations += gen
        t_gen += seconds
    return {"losses": losses, "generations": generations, "seconds": {"loss": t_loss, "generate": t_gen}}


def score(
    rows: Sequence[dict], result: dict[str, Any], tokenizer: Any, reference: dict[str, Any] | None
) -> dict[str, Any]:
    """Per-adapter loss, exact match, ROUGE-L, and agreement with `reference` (the original LoRA's generations)."""
    per: dict[str, dict[str, list[float]]] = {}
    for i, row in enumerate(rows):
        text = tokenizer.decode(result["generations"][i], skip_special_tokens=True).strip()
        entry = per.setdefault(row["adapter"], {"ce": [], "tok": [], "em": [], "rouge": [], "agree": []})
        ce, n = result["losses"][i]
        entry["ce"].append(ce)
        entry["tok"].append(n)
        entry["em"].append(exact_match(text, row["target"]))
        entry["rouge"].append(rouge_l(text, row["target"]))
        if reference is not None:
            entry["agree"].append(float(result["generations"][i] == reference["generations"][i]))
    out = {}
    for name, e in per.items():
        out[name] = {
            "loss": sum(e["ce"]) / max(sum(e["tok"]), 1),
            "exact_match": sum(e["em"]) / len(e["em"]),
            "rouge_l": sum(e["rouge"]) / len(e["rouge"]),
            "n": len(e["em"]),
        }
        if e["agree"]:
            out[name]["agreement"] = sum(e["agree"]) / len(e["agree"])
    return out


def summary(per_adapter: dict[str, dict[str, float]], original: dict[str, dict[str, float]] | None) -> dict:
    """Means over adapters; relative performance = compressed metric / original metric, as a ratio of the means
    over the collection (robust to tasks where the original scores 0) and as a mean of per-task ratios over the
    tasks where the original scores above 0."""
    names = list(per_adapter)
    mean = {k: sum(per_adapter[n][k] for n in names) / len(names) for k in ("loss", "exact_match", "rouge_l")}
    if "agreement" in per_adapter[names[0]]:
        mean["agreement"] = sum(per_adapter[n]["agreement"] for n in names) / len(names)
    if original is not None:
        for k in ("exact_match", "rouge_l"):
            base = sum(original[n][k] for n in names) / len(names)
            mean[f"relative_{k}"] = mean[k] / base if base > 0 else float("nan")
            ratios = [per_adapter[n][k] / original[n][k] for n in names if original[n][k] > 0]
            mean[f"relative_{k}_per_task"] = sum(ratios) / len(ratios) if ratios else float("nan")
        mean["loss_increase"] = mean["loss"] - sum(original[n]["loss"] for n in names) / len(names)
    return mean


# ------------------------------------------------------------------------------------------------ configurations


def parse_config(spec: str) -> dict[str, Any]:
    """`jd-full:<rank>:<clusters>`, `jd-diag:<rank>:1`, `svd:<rank>:1`, `lorashare:<k>`, `vlora-dev:<k>`."""
    parts = spec.split(":")
    if parts[0] in ("jd-full", "jd-diag", "svd") and len(parts) == 3:
        return {"method": parts[0], "rank": int(parts[1]), "clusters": int(parts[2])}
    if parts[0] in ("lorashare", "vlora-dev") and len(parts) == 2:
        return {"method": parts[0], "k": int(parts[1])}
    raise SystemExit(f"bad configuration {spec!r}: jd-full:R:C, jd-diag:R:1, svd:R:1, lorashare:K or vlora-dev:K")


def compressed_bundle(folders: Sequence[Path], cfg: dict[str, Any], out: Path) -> tuple[Path, dict[str, Any]]:
    """Compress the collection with our engine and save the bundle; returns its folder and a few report fields."""
    from peft_jdlora.bundle import save_bundle
    from peft_jdlora.compression import compress

    paths = [str(f) for f in folders]
    if cfg["method"] == "svd":
        bundle = compress(paths, rank=cfg["rank"], method="svd", device="cpu", progress=False)
    else:
        sigma = "diag" if cfg["method"] == "jd-diag" else "full"
        bundle = compress(paths, rank=cfg["rank"], sigma=sigma, clusters=cfg["clusters"], device="cpu", progress=False)
    save_bundle(bundle, out, overwrite=True)
    info = {
        "bytes": int(bundle.report.size.bytes_bundle),
        "mean_error": float(bundle.report.overall.mean_error),
        "errors": {n: float(e.mean_error) for n, e in bundle.report.per_adapter.items()},
    }
    return out, info


def peer_exports(folders: Sequence[Path], cfg: dict[str, Any], out: Path) -> tuple[list[Path], dict[str, Any]]:
    """PEFT LoRA folders that a peer exports for every adapter (vlora-dev with the original lora_alpha passed, as
    `vlora export --alpha` does; lorashare keeps the original config itself)."""
    from vlora import SharedSubspace, load_adapter, save_adapter

    exported = []
    if cfg["method"] == "lorashare":
        from lorashare import SHAREModel

        share = SHAREModel.from_adapters({f.name: str(f) for f in folders}, num_components=cfg["k"], device="cpu")
        share.save_pretrained(out / "checkpoint")
        for f in folders:
            share.reconstruct(f.name, output_dir=out / "export" / f.name)
            exported.append(out / "export" / f.name)
    else:
        sub = SharedSubspace.from_adapters(
            [load_adapter(f) for f in folders], task_ids=[f.name for f in folders], num_components=cfg["k"]
        )
        sub.save(out / "checkpoint")
        for f in folders:
            original = json.loads((f / "adapter_config.json").read_text())
            weights = sub.reconstruct(f.name)
            for key in ("lora_alpha", "base_model_name_or_path", "target_modules", "task_type"):
                weights.metadata[key] = original.get(key)
            save_adapter(weights, out / "export" / f.name)
            exported.append(out / "export" / f.name)
    return exported, {"bytes": safetensors_payload_bytes(out / "checkpoint")}


def run_lora_folders(base: Any, tokenizer: Any, folders: Sequence[Path], rows: list[dict], args: Any) -> dict:
    """Evaluate plain PEFT LoRA folders (the originals, or a peer's exports) in one PeftModel, per-row
    `adapter_names`. Returns the raw result; `base` comes back unmodified."""
    from peft import PeftModel

    model = PeftModel.from_pretrained(base, str(folders[0]), adapter_name=folders[0].name)
    for f in folders[1:]:
        model.load_adapter(str(f), adapter_name=f.name)
    model.eval()
    try:
        return evaluate_model(
            model, tokenizer, rows, args.batch_size, args.max_new_tokens, adapter_names=[r["adapter"] for r in rows]
        )
    finally:
        model.unload()


def run_bundle(base: Any, tokenizer: Any, bundle_dir: Path, rows: list[dict], args: Any) -> dict:
    """Evaluate a JD-LoRA bundle as served: `PeftModel.from_pretrained(base, bundle_dir)`, per-row `adapter_ids`."""
    from peft import PeftModel

    import peft_jdlora  # noqa: F401  (registers the JDLORA peft type with PEFT)

    model = PeftModel.from_pretrained(base, str(bundle_dir))
    model.eval()
    try:
        return evaluate_model(
            model, tokenizer, rows, args.batch_size, args.max_new_tokens, adapter_ids=[r["adapter"] for r in rows]
        )
    finally:
        model.unload()


def label(cfg: dict[str, Any]) -> str:
    m = cfg["method"]
    if m == "original":
        return "original LoRA (PEFT)"
    if m == "jd-full":
        return f"JD-Full r={cfg['rank']}" + (f" C={cfg['clusters']}" if cfg["clusters"] > 1 else "")
    if m == "jd-diag":
        return f"JD-Diag r={cfg['rank']}"
    if m == "svd":
        return f"SVD r'={cfg['rank']}"
    return f"{m} k={cfg['k']}"


def markdown(results: dict[str, Any]) -> str:
    orig = results["runs"]["original"]
    lines = [
        f"{results['num_adapters']} adapters, {results['n_eval']} eval examples per task "
        f"({results['rows']} rows, every batch of {results['batch_size']} mixing adapters), greedy "
        f"{results['max_new_tokens']} new tokens; machine: {results['machine']}.",
        "",
        "| setting | stored MiB | × originals | weight error | task loss | Δ loss | EM | rel. EM | ROUGE-L "
        "| rel. ROUGE-L | agreement |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    o = orig["summary"]
    lines.append(
        f"| original LoRA (PEFT) | {results['original_bytes'] / 2**20:.2f} | 1.000 | 0 | {o['loss']:.3f} | 0 "
        f"| {o['exact_match']:.3f} | 1 | {o['rouge_l']:.3f} | 1 | 1 |"
    )
    runs = [e for k, e in results["runs"].items() if k != "original"]
    for e in sorted(runs, key=lambda e: (e["config"]["method"], e["bytes"])):
        s = e["summary"]
        err = f"{e['mean_error']:.4f}" if "mean_error" in e else "–"
        lines.append(
            f"| {label(e['config'])} | {e['bytes'] / 2**20:.2f} | {e['bytes'] / results['original_bytes']:.3f} "
            f"| {err} | {s['loss']:.3f} | {s['loss_increase']:+.3f} | {s['exact_match']:.3f} "
            f"| {s['relative_exact_match']:.3f} | {s['rouge_l']:.3f} | {s['relative_rouge_l']:.3f} "
            f"| {s['agreement']:.3f} |"
        )
    return "\n".join(lines) + "\n"


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--collection", type=Path, default=cache_root() / "collection")
    p.add_argument("--limit", type=int, default=None, help="use only the first N adapters")
    p.add_argument("--n-eval", type=int, default=12, help="eval examples per task")
    p.add_argument("--seq-len", type=int, default=64, help="examples longer than this (prompt + answer) are skipped")
    p.add_argument("--max-new-tokens", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--configs", default=",".join(DEFAULT_CONFIGS), help="comma-separated settings, run in order")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="results folder (fidelity.json, fidelity.md)")
    p.add_argument("--threads", type=int, default=1)
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    folders = collection_folders(args.collection.expanduser(), args.limit)
    folders = [f for f in folders if (f / "eval.jsonl").is_file()]
    if len(folders) < 2:
        raise SystemExit(f"{args.collection} holds {len(folders)} finished adapters with eval.jsonl; need 2.")
    names = [f.name for f in folders]
    base, tokenizer = load_smollm2()
    base.eval()
    rows = eval_rows(folders, tokenizer, args.n_eval, args.seq_len)
    settings = {k: getattr(args, k) for k in ("n_eval", "seq_len", "max_new_tokens", "batch_size")}
    fingerprint = collection_fingerprint(folders)
    out_json = args.out / "fidelity.json"
    results: dict[str, Any] = json.loads(out_json.read_text()) if out_json.is_file() else {}
    if (results.get("adapters"), results.get("settings"), results.get("fingerprint")) != (names, settings, fingerprint):
        # Cached runs do not apply: other adapters, settings, or an adapter / its eval data retrained since.
        results = {"adapters": names, "settings": settings, "fingerprint": fingerprint, "runs": {}}
    results.update(
        collection=str(args.collection),
        num_adapters=len(names),
        rows=len(rows),
        original_bytes=sum(safetensors_payload_bytes(f) for f in folders),
        machine=machine(),
        command="python benchmarks/fidelity.py " + " ".join(sys.argv[1:] if argv is None else argv),
        **settings,
    )

    if "original" not in results["runs"]:
        t0 = time.perf_counter()
        raw = run_lora_folders(base, tokenizer, folders, rows, args)
        per = score(rows, raw, tokenizer, None)
        results["runs"]["original"] = {
            "config": {"method": "original"},
            "per_adapter": per,
            "summary": summary(per, None),
            "generations": raw["generations"],
            "seconds": raw["seconds"],
        }
        write_json_atomic(out_json, results)
        print(f"original LoRA: {results['runs']['original']['summary']} ({time.perf_counter() - t0:.0f} s)", flush=True)
    original = results["runs"]["original"]

    for spec in args.configs.split(","):
        cfg = parse_config(spec.strip())
        if spec in results["runs"]:
            continue
        t0 = time.perf_counter()
        work = Path(tempfile.mkdtemp(prefix="jdlora-fidelity-"))
        try:
            if cfg["method"] in ("lorashare", "vlora-dev"):
                exported, info = peer_exports(folders, cfg, work)
                raw = run_lora_folders(base, tokenizer, exported, rows, args)
            else:
                bundle_dir, info = compressed_bundle(folders, cfg, work / "bundle")
                raw = run_bundle(base, tokenizer, bundle_dir, rows, args)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        per = score(rows, raw, tokenizer, original)
        entry = {
            "config": cfg,
            **info,
            "per_adapter": per,
            "summary": summary(per, original["per_adapter"]),
            "seconds": {**raw["seconds"], "total": time.perf_counter() - t0},
        }
        results["runs"][spec] = entry
        write_json_atomic(out_json, results)  # after every configuration, so that an interrupted run resumes
        s = entry["summary"]
        print(
            f"{label(cfg):28s} {info['bytes'] / 2**20:7.2f} MiB  loss {s['loss']:.3f} ({s['loss_increase']:+.3f})  "
            f"rel EM {s['relative_exact_match']:.3f}  rel ROUGE-L {s['relative_rouge_l']:.3f}  "
            f"agreement {s['agreement']:.3f}  ({entry['seconds']['total']:.0f} s)",
            flush=True,
        )
    (args.out / "fidelity.md").write_text(markdown(results))
    print(markdown(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
