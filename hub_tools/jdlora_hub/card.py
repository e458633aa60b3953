"""Model cards (README.md) for bundles and for LoRA adapters exported from a bundle.

Built with huggingface_hub's `ModelCard` / `ModelCardData`, so the YAML front matter is what the Hub expects
(`library_name: peft` makes the Hub show "PEFT" and the loading snippet; `base_model` links the base model page).
`PeftModel.push_to_hub` would replace PEFT's card with a transformers one, which is why the tools write their own.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any, Optional

from . import __version__

if TYPE_CHECKING:
    from peft_jdlora.report import BundleReport

PROJECT_URL = "https://github.com/huggingface/peft"
PAPER = "Compress then Serve (Brüel-Gabrielsson et al., arXiv:2407.00066)"
_HUB_ID_RE = re.compile(r"^[A-Za-z0-9][\w.\-]*(/[\w.\-]+)?$")
_PIPELINE_TAGS = {"CAUSAL_LM": "text-generation", "SEQ_2_SEQ_LM": "text2text-generation"}
_AUTO_CLASSES = {"CAUSAL_LM": "AutoModelForCausalLM", "SEQ_2_SEQ_LM": "AutoModelForSeq2SeqLM"}


def is_hub_id(name: Optional[str]) -> bool:
    """True for names that look like Hub repo ids (a local path must not go into `base_model` metadata)."""
    return bool(name) and not name.startswith((".", "/", "~")) and bool(_HUB_ID_RE.match(name))


def _cell(value: Any) -> str:
    """A Markdown table cell: pipes escaped, newlines flattened."""
    return str(value).replace("|", "\\|").replace("\n", " ")


def describe_modules(modules: Any) -> str:
    """Target modules in brief: the distinct layer names and the count ("q_proj, v_proj (60 modules)")."""
    if not isinstance(modules, (list, tuple)):
        return str(modules)
    names = sorted({m.rsplit(".", 1)[-1] for m in modules})
    return f"{', '.join(names)} ({len(modules)} modules)"


def format_error(value: Optional[float]) -> str:
    if value is None:
        return "n/a"
    if value == 0:
        return "0"
    return f"{value:.2e}" if 0 < abs(value) < 1e-3 else f"{value:.4f}"


def _format_bytes(n: Optional[float]) -> str:
    if n is None:
        return "n/a"
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TB"


def adapter_rows(config: Any, report: Optional[BundleReport]) -> list[dict[str, Any]]:
    """One row per adapter: index, name, source, revision, cluster, errors (what `inspect` and the card show)."""
    per_adapter = report.per_adapter if report is not None else {}
    clusters = config.adapter_clusters or [0] * config.num_adapters
    sources = config.adapter_sources or [{} for _ in config.adapter_names]
    rows = []
    for i, name in enumerate(config.adapter_names):
        source = sources[i] if i < len(sources) else {}
        entry = per_adapter.get(name)
        rows.append(
            {
                "index": i,
                "name": name,
                "source": source.get("source"),
                "revision": source.get("revision"),
                "cluster": clusters[i] if entry is None or entry.cluster is None else entry.cluster,
                "mean_error": entry.mean_error if entry is not None else None,
                "max_error": entry.max_error if entry is not None else None,
                "rank": source.get("r"),
            }
        )
    return rows


def describe_svd_baseline(baseline: Optional[dict[str, Any]], floats: Optional[int]) -> str:
    """'rank 1: mean error 0.235 in 0.97× these bytes; rank 2: 0.110 in 1.9×' from a report's "svd_baseline"."""
    points = [p for p in (baseline or {}).values() if p]
    if not points or not floats:
        return "n/a"
    return "; ".join(
        f"rank {p['rank']}: mean error {format_error(p['mean_error'])} in {p['floats'] / floats:.2f}× these bytes"
        for p in points
    )


def bundle_summary(config: Any, report: Optional[BundleReport]) -> dict[str, Any]:
    """The bundle's facts as a flat dict (model card, `jdlora inspect`)."""
    if report is None:
        from peft_jdlora.report import BundleReport

        report = BundleReport()
    overall, size = report.overall, report.size
    targets = config.target_modules
    return {
        "base_model": config.base_model_name_or_path,
        "task_type": config.task_type,
        "num_adapters": config.num_adapters,
        "rank": config.r,
        "rank_pattern": dict(config.rank_pattern),
        "sigma_type": config.sigma_type,
        "num_clusters": config.num_clusters,
        "target_modules": list(targets) if isinstance(targets, (list, tuple, set)) else targets,
        "format_version": config.format_version,
        "method": report.method,
        "mean_error": overall.mean_error,
        "worst_adapter": overall.worst_adapter,
        "worst_error": overall.worst_error,
        "params_original": size.params_original,
        "params_bundle": size.params_bundle,
        "compression_ratio": size.ratio,
        "bytes_original": size.bytes_original,
        "bytes_bundle": size.bytes_bundle,
        "dtype": size.dtype,
        "seconds": report.seconds,
        "device": report.device,
        "verification": report.verification,
        "svd_baseline": report.svd_baseline,
        "budget_plan": _plan_summary(report),
    }


def _plan_summary(report: BundleReport) -> Optional[dict[str, Any]]:
    """A budget plan in brief (None for fixed-rank bundles): what was asked, the modules by kind, and the uniform
    baselines within the budget."""
    budget = report.budget
    if report.method != "budget" or not budget:
        return None
    return {
        "requested": describe_plan_request(budget),
        "modules_by_family": budget.get("modules_by_family"),
        "plan_floats": budget.get("plan_floats"),
        "baselines": budget.get("baselines_within_budget") or budget.get("baselines_same_floats"),
    }


def describe_plan_summary(plan: Optional[dict[str, Any]]) -> Optional[str]:
    """'r16 (...): svd 30, jd1 30 modules; within the budget: per-adapter SVD r1 0.2347, one shared basis r16 0.44'."""
    if not plan:
        return None
    kinds = ", ".join(f"{k} {v}" for k, v in (plan.get("modules_by_family") or {}).items())
    names = {"svd": "per-adapter SVD", "jd1": "one shared basis"}
    baselines = []
    given = plan.get("baselines") or {}
    for family in [f for f in ("svd", "jd1") if f in given] + [f for f in given if f not in ("svd", "jd1")]:
        base = given[family]
        text = "does not fit" if base is None else f"r{base['rank']} {format_error(base['mean_error'])}"
        baselines.append(f"{names.get(family, family)} {text}")
    return f"{plan['requested']}: {kinds} modules; within the budget: {', '.join(baselines)}"


def bundle_card(
    config: Any, report: Optional[BundleReport], *, repo_id: Optional[str] = None, title: Optional[str] = None
) -> str:
    """README.md of a bundle: front matter, what it is, how to load it and pick adapters, the adapter table, and the
    compression settings and size."""
    from huggingface_hub import ModelCard, ModelCardData

    summary = bundle_summary(config, report)
    rows = adapter_rows(config, report)
    base = summary["base_model"]
    tags = ["peft", "lora", "jdlora", "compressed-lora", "multi-lora"]
    data = ModelCardData(
        library_name="peft",
        base_model=base if is_hub_id(base) else None,
        tags=tags,
        pipeline_tag=_PIPELINE_TAGS.get(str(summary["task_type"])),
    )
    where = repo_id or "path/to/this/bundle"
    auto_class = _AUTO_CLASSES.get(str(summary["task_type"]), "AutoModelForCausalLM")
    first = [r["name"] for r in rows[:2]]
    example_ids = ", ".join(repr(n) for n in first) + (", None" if first else "None")
    title = title or (repo_id.split("/")[-1] if repo_id else "JD-LoRA bundle")

    lines = [
        f"# {title}",
        "",
        f"A **JD-LoRA bundle**: {summary['num_adapters']} LoRA adapters of `{base}` compressed jointly into one shared "
        f"basis per target module ({PAPER}). For each module and adapter *i* of cluster *c*, the weight update is "
        "ΔW_i ≈ U_c Σ_i V_cᵀ: the bases U_c, V_c are shared, only the small Σ_i belongs to adapter *i*. "
        "One model serves every adapter at once, a different one on each row of a batch.",
        "",
        "## How to use",
        "",
        "```python",
        "import peft_jdlora  # registers the JDLORA peft type with PEFT: import it before loading the bundle",
        "from peft import PeftModel",
        f"from transformers import {auto_class}, AutoTokenizer",
        "",
        f'base = {auto_class}.from_pretrained("{base}")',
        f'tokenizer = AutoTokenizer.from_pretrained("{base}")',
        f'model = PeftModel.from_pretrained(base, "{where}")',
        "",
        'batch = tokenizer(["first prompt", "second prompt", "third prompt"], return_tensors="pt", padding=True)',
        "# one adapter per row: a name, an index, or None (-1) for the base model",
        f"out = model.generate(**batch, adapter_ids=[{example_ids}])",
        "```",
        "",
        "Install with `pip install peft-jdlora`. Without `import peft_jdlora`, PEFT does not know the JDLORA type.",
        f"Get one adapter back as an ordinary PEFT LoRA folder: `jdlora export {where} --adapter NAME --out DIR`.",
        "",
        "## Adapters",
        "",
        "Error: squared relative Frobenius error of ΔW, ‖ΔW − ΔŴ‖² / ‖ΔW‖², mean over the adapter's modules.",
        "",
        "| # | name | source | revision | cluster | error |",
        "|---|------|--------|----------|---------|-------|",
    ]
    for r in rows:
        revision = (r["revision"] or "")[:10] if r["revision"] else "local"
        lines.append(
            f"| {r['index']} | {_cell(r['name'])} | {_cell(r['source'] or 'n/a')} | {_cell(revision)} | "
            f"{r['cluster']} | {format_error(r['mean_error'])} |"
        )
    ratio = summary["compression_ratio"]
    settings = [
        ("method", summary["method"] or "n/a"),
        (
            "rank r",
            summary["rank"] if not summary["rank_pattern"] else f"{summary['rank']} ({summary['rank_pattern']})",
        ),
        ("Σ type", summary["sigma_type"]),
        ("clusters", summary["num_clusters"]),
        (
            "target modules",
            describe_modules(summary["target_modules"]),
        ),
        ("mean error", format_error(summary["mean_error"])),
        (
            "worst adapter",
            f"{summary['worst_adapter']} ({format_error(summary['worst_error'])})"
            if summary["worst_adapter"]
            else "n/a",
        ),
        (
            "parameters",
            f"{summary['params_bundle']:,} (originals: {summary['params_original']:,}, ratio {ratio:.2f}×)"
            if summary["params_bundle"] and summary["params_original"] and ratio
            else "n/a",
        ),
        (
            "size",
            f"{_format_bytes(summary['bytes_bundle'])} in {summary['dtype']} "
            f"(originals: {_format_bytes(summary['bytes_original'])})"
            if summary["bytes_bundle"]
            else "n/a",
        ),
        ("per-adapter SVD near this size", describe_svd_baseline(summary["svd_baseline"], summary["params_bundle"])),
        (
            "compression time",
            f"{summary['seconds']:.1f} s on {summary['device']}" if summary["seconds"] is not None else "n/a",
        ),
        ("format version", summary["format_version"]),
        ("made with", f"peft-jdlora {__version__}"),
    ]
    lines += ["", "## Compression", "", "| setting | value |", "|---|---|"]
    lines += [f"| {name} | {_cell(value)} |" for name, value in settings]
    lines += budget_plan_lines(report)
    verification = summary["verification"]
    if verification:
        lines += ["", "## Verification", ""]
        lines.append("Every adapter's error was computed; the written bundle was reloaded and matched.")
        check = verification.get("base_model_check")
        if check and check.get("status") == "ok":
            lines.append(
                f"On `{check['base_model']}`, the bundle's logits were compared with the original PEFT LoRA adapters' "
                f"on {check['tokens']} tokens (relative error of the adapter's effect on the logits):"
            )
            lines += ["", "| adapter | logits error |", "|---|---|"]
            lines += [f"| {_cell(a['name'])} | {format_error(a['effect_error'])} |" for a in check["adapters"]]
        elif check:
            lines.append(f"Base model check: {check.get('status')} ({check.get('reason', '')}).")
    lines += [
        "",
        "## About",
        "",
        "Made with `jdlora-convert` from peft-jdlora: the JDLORA PEFT tuner, its bundle format and the tools that "
        "build bundles from collections of LoRA adapters on the Hugging Face Hub. Each adapter's source repo and "
        "revision are recorded in `adapter_config.json` (`adapter_sources`); the full fidelity report is in "
        "`jdlora_report.json`.",
        "",
    ]
    return str(ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(lines)))


_BASELINE_NAMES = {"svd": "per-adapter SVD, one rank everywhere", "jd1": "one shared basis, one rank everywhere"}


def _same_floats(entry: Optional[dict[str, Any]]) -> str:
    """'r2: 0.1234' for a module's baseline within the same floats ('≤' marks an upper bound), or 'does not fit'."""
    if not entry:
        return "does not fit"
    error = entry.get("mean_error", entry.get("error"))
    return f"r{entry['rank']}: {'' if entry.get('exact', True) else '≤ '}{format_error(error)}"


def plan_rows(report: Optional[BundleReport]) -> list[dict[str, Any]]:
    """Per module of a budget plan (empty otherwise): the choice, the floats it stores, its error (mean over the
    adapters that have the module), and per-adapter SVD's and one shared basis's best error within the same floats."""
    rows = []
    for module, entry in ((report.plan if report is not None else None) or {}).items():
        rows.append(
            {
                "module": module,
                "kind": entry["family"] if entry["kind"] == "jd" else "svd",
                "rank": entry["rank"],
                "num_clusters": entry["num_clusters"],
                "sigma_type": entry["sigma_type"],
                "floats": entry["floats"],
                "error": entry.get("mean_error", entry["error"]),
                "svd_same_floats": _same_floats(entry.get("svd_same_floats")),
                "jd1_same_floats": _same_floats(entry.get("jd1_same_floats")),
            }
        )
    return rows


def describe_plan_request(budget: dict[str, Any]) -> str:
    """How the plan's size was asked for, in words."""
    requested = budget.get("requested")
    if requested == "auto":
        return f"the smallest plan meeting error {budget.get('target_error')} ({budget.get('target')})"
    if isinstance(requested, str) and requested.lower().startswith("r"):
        counts = budget.get("cluster_counts")
        searched = " (per-adapter SVD or one shared basis per module)" if counts == [] else ""
        return f"{requested}: the size of one shared basis of rank {requested.lstrip('rRank')}{searched}"
    return str(requested)


def budget_plan_lines(report: Optional[BundleReport]) -> list[str]:
    """The "Budget plan" section of a bundle made with a budget (the default of jdlora-convert, --budget,
    --target-error): what the planner chose per module, and what the uniform baselines reach within the same budget
    and, per module, within the same floats (so readers can see the gain)."""
    budget = report.budget if report is not None else None
    plan = report.plan if report is not None else None
    if not budget or not plan:
        return []
    lines = ["", "## Budget plan", ""]
    lines.append(
        f"Requested: {describe_plan_request(budget)}. The plan stores {budget['plan_floats']:,} floats "
        f"({_format_bytes(budget.get('plan_bytes'))}); modules by kind: {budget.get('modules_by_family')}. "
        "Each module is stored the way that gives the lowest error for its floats: per-adapter SVD (a basis of its "
        "own per adapter), or shared bases (jd1: one for all adapters; jdC: C clusters)."
    )
    baselines = budget.get("baselines_within_budget") or budget.get("baselines_same_floats") or {}
    lines += ["", "| plan | floats | mean error |", "|---|---|---|"]
    lines.append(f"| this bundle | {budget['plan_floats']:,} | {format_error(report.overall.mean_error)} |")
    for family in sorted(baselines, key=lambda f: (f not in _BASELINE_NAMES, f != "svd", f)):
        base = baselines[family]
        if base is None:
            lines.append(f"| {_BASELINE_NAMES.get(family, family)} | does not fit | n/a |")
        else:
            lines.append(
                f"| {_BASELINE_NAMES.get(family, family)} (rank {base['rank']}) | {base['floats']:,} | "
                f"{format_error(base['mean_error'])} |"
            )
    lines += [
        "",
        "Per module: the error is the mean over the adapters that have the module; the last two columns give the best "
        "per-adapter SVD and one shared basis within the same floats (≤: an upper bound, not fitted at that rank).",
        "",
        "| module | kind | rank | clusters | Σ | floats | error | per-adapter SVD | one shared basis |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in plan_rows(report):
        lines.append(
            f"| {_cell(row['module'])} | {row['kind']} | {row['rank']} | {row['num_clusters']} | {row['sigma_type']} | "
            f"{row['floats']:,} | {format_error(row['error'])} | {row['svd_same_floats']} | {row['jd1_same_floats']} |"
        )
    return lines


def export_card(config: Any, report: Optional[BundleReport], adapter: str, bundle_ref: str) -> str:
    """README.md of one adapter exported from a bundle as a plain PEFT LoRA folder."""
    from huggingface_hub import ModelCard, ModelCardData

    base = config.base_model_name_or_path
    row = next(r for r in adapter_rows(config, report) if r["name"] == adapter)
    data = ModelCardData(
        library_name="peft", base_model=base if is_hub_id(base) else None, tags=["peft", "lora", "jdlora-export"]
    )
    auto_class = _AUTO_CLASSES.get(str(config.task_type), "AutoModelForCausalLM")
    lines = [
        f"# {adapter}",
        "",
        f"Adapter `{adapter}` of the JD-LoRA bundle `{bundle_ref}`, exported as an ordinary PEFT LoRA adapter "
        f"(rank {config.r} per module, scaling 1: the adapter's scaling is folded into lora_B). It computes exactly "
        "what the bundle computes for this adapter; its squared relative error to the original adapter is "
        f"{format_error(row['mean_error'])}.",
        "",
        f"Original source: {row['source'] or 'n/a'}" + (f" at revision {row['revision']}" if row["revision"] else ""),
        "",
        "```python",
        "from peft import PeftModel",
        f"from transformers import {auto_class}",
        "",
        f'model = PeftModel.from_pretrained({auto_class}.from_pretrained("{base}"), "path/to/this/folder")',
        "```",
        "",
    ]
    return str(ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(lines)))
