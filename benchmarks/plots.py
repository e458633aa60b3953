"""Plots for docs/benchmarks.md from the results of benchmarks/peers.py and benchmarks/fidelity.py.

    python benchmarks/plots.py                       # reads benchmarks/results/{peers,fidelity,budget_*}.json
    python benchmarks/plots.py --results /tmp/r --out /tmp/figs

Writes (whichever inputs exist):
- error_vs_bytes.png: the paper's squared relative error against stored bytes, every method and peer;
- relative_performance_vs_rank.png: relative exact match / ROUGE-L, agreement and task-loss increase of JD-Full
  (1, 2, 4 clusters) and JD-Diag against rank;
- fidelity_vs_bytes.png: agreement and relative ROUGE-L against stored bytes, every setting evaluated on the tasks;
- budget_vs_baselines.png: error against stored floats of the budget plans and the uniform baselines at the same
  floats (benchmarks/budget.py results, budget_*.json), one panel per collection.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only: no display on the benchmark machines
import matplotlib.pyplot as plt
from matplotlib.ticker import FuncFormatter, NullFormatter

# Plain numbers (0.25, 1, 2) on log axes instead of 2.5×10⁻¹.
PLAIN = FuncFormatter(lambda x, _: f"{x:g}")

ROOT = Path(__file__).resolve().parents[1]

# One look per method across all figures, so that a reader matches them at a glance.
STYLE: dict[str, dict[str, Any]] = {
    "jd-full C=1": {"color": "tab:blue", "marker": "o", "label": "JD-Full (1 cluster)"},
    "jd-full C=2": {"color": "tab:cyan", "marker": "s", "label": "JD-Full (2 clusters)"},
    "jd-full C=4": {"color": "tab:purple", "marker": "D", "label": "JD-Full (4 clusters)"},
    "jd-full C=8": {"color": "tab:pink", "marker": "P", "label": "JD-Full (8 clusters)"},
    "jd-diag": {"color": "tab:green", "marker": "^", "label": "JD-Diag"},
    "svd": {"color": "tab:olive", "marker": "v", "label": "per-adapter SVD"},
    "lorashare": {"color": "tab:red", "marker": "x", "label": "lorashare 0.1.3"},
    "vlora-dev": {"color": "tab:orange", "marker": "*", "label": "vlora-dev 1.0.0 (export --alpha)"},
    "vlora-dev default": {"color": "tab:brown", "marker": "X", "label": "vlora-dev 1.0.0 (export default)"},
}


def series_key(cfg: dict[str, Any]) -> str:
    m = cfg["method"]
    if m == "jd-full":
        return f"jd-full C={cfg.get('clusters', 1)}"
    if m == "vlora-dev" and cfg.get("alpha") is False:
        return "vlora-dev default"
    return m


def knob(cfg: dict[str, Any]) -> int:
    return int(cfg.get("rank", cfg.get("k", 0)))


def plot_error_vs_bytes(peers: dict[str, Any], out: Path) -> Path:
    orig = peers["original_bytes"]
    groups: dict[str, list[tuple[float, float, int]]] = {}
    for e in peers["runs"].values():
        groups.setdefault(series_key(e["config"]), []).append((e["bytes"] / orig, e["mean_error"], knob(e["config"])))
    fig, ax = plt.subplots(figsize=(8, 5.2))
    for key, style in STYLE.items():
        pts = sorted(set(groups.get(key, [])))
        if not pts:
            continue
        xs, ys, _ = zip(*pts)
        line = "none" if key == "vlora-dev default" else "-"
        ax.plot(xs, ys, linestyle=line, marker=style["marker"], color=style["color"], label=style["label"])
        for x, y, k in pts:
            ax.annotate(str(k), (x, y), textcoords="offset points", xytext=(3, 3), fontsize=6, color=style["color"])
    ax.axvline(1.0, color="grey", linestyle=":", linewidth=1)
    ax.text(1.02, 0.96, "= original LoRAs", transform=ax.get_xaxis_transform(), fontsize=7, color="grey")
    ax.set_xscale("log")
    top = max(e["bytes"] / orig for e in peers["runs"].values())
    ax.set_xticks([t for t in (0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5) if t <= 1.2 * top])
    ax.xaxis.set_major_formatter(PLAIN)
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_yscale("symlog", linthresh=1e-3)
    ax.set_ylim(0, 1.05)
    ax.set_xlabel("stored bytes / bytes of the original LoRA adapters (log)")
    ax.set_ylabel("mean squared relative error ‖ΔW−ΔŴ‖²/‖ΔW‖² (symlog)")
    ax.set_title(
        f"Reconstruction error vs stored bytes: {peers['num_adapters']} real LoRAs (r 16, q/v) on SmolLM2-135M\n"
        "numbers at points: rank r (JD), r' (SVD) or k (peers)",
        fontsize=9,
    )
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    path = out / "error_vs_bytes.png"
    fig.savefig(path, dpi=130)
    plt.close(fig)
    return path


def plot_relative_vs_rank(fid: dict[str, Any], out: Path) -> Path:
    groups: dict[str, list[tuple[int, dict[str, float]]]] = {}
    for key, e in fid["runs"].items():
        if key == "original" or e["config"]["method"] not in ("jd-full", "jd-diag"):
            continue
        groups.setdefault(series_key(e["config"]), []).append((knob(e["config"]), e["summary"]))
    metrics = [
        ("relative_exact_match", "exact match, compressed / original"),
        ("relative_rouge_l", "ROUGE-L, compressed / original"),
        ("agreement", "identical greedy generations (agreement)"),
        ("loss_increase", "task loss increase (nats/token)"),
    ]
    fig, axes = plt.subplots(2, 2, figsize=(9, 6.5), sharex=True)
    for ax, (metric, title) in zip(axes.flat, metrics):
        for key, style in STYLE.items():
            pts = sorted(groups.get(key, []), key=lambda p: p[0])
            if not pts:
                continue
            ax.plot(
                [p[0] for p in pts],
                [p[1][metric] for p in pts],
                marker=style["marker"],
                color=style["color"],
                label=style["label"],
            )
        ax.set_title(title, fontsize=9)
        ax.set_xscale("log", base=2)
        ax.xaxis.set_major_formatter(PLAIN)
        ax.grid(True, alpha=0.3)
        if metric != "loss_increase":
            ax.axhline(1.0, color="grey", linestyle=":", linewidth=1)
    for ax in axes[1]:
        ax.set_xlabel("rank r of the shared basis")
    axes[0][0].legend(fontsize=7)
    fig.suptitle(
        f"Fidelity on the tasks vs rank: {fid['num_adapters']} adapters, {fid['n_eval']} held-out examples each, "
        f"served from the bundle with adapter_ids",
        fontsize=9,
    )
    fig.tight_layout()
    path = out / "relative_performance_vs_rank.png"
    fig.savefig(path, dpi=130)
    plt.close(fig)
    return path


def plot_fidelity_vs_bytes(fid: dict[str, Any], out: Path) -> Path:
    orig = fid["original_bytes"]
    groups: dict[str, list[tuple[float, dict[str, float], int]]] = {}
    for key, e in fid["runs"].items():
        if key == "original":
            continue
        groups.setdefault(series_key(e["config"]), []).append((e["bytes"] / orig, e["summary"], knob(e["config"])))
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.2), sharex=True)
    for ax, (metric, title) in zip(axes, [("agreement", "agreement"), ("relative_rouge_l", "relative ROUGE-L")]):
        for key, style in STYLE.items():
            pts = sorted(groups.get(key, []), key=lambda p: p[0])
            if not pts:
                continue
            ax.plot(
                [p[0] for p in pts],
                [p[1][metric] for p in pts],
                marker=style["marker"],
                color=style["color"],
                label=style["label"],
            )
            for x, s, k in pts:
                ax.annotate(str(k), (x, s[metric]), textcoords="offset points", xytext=(3, 3), fontsize=6)
        ax.set_xscale("log")
        ax.xaxis.set_major_formatter(PLAIN)
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("stored bytes / original LoRA bytes (log)")
        ax.grid(True, which="both", alpha=0.3)
        ax.axhline(1.0, color="grey", linestyle=":", linewidth=1)
    axes[0].legend(fontsize=7)
    fig.suptitle("Task fidelity vs stored bytes (numbers at points: rank or k)", fontsize=9)
    fig.tight_layout()
    path = out / "fidelity_vs_bytes.png"
    fig.savefig(path, dpi=130)
    plt.close(fig)
    return path


def plot_budget(rows: list[dict[str, Any]], out: Path) -> Path:
    """Budget plan vs per-adapter SVD, one basis and 2 clusters at the same floats, per collection."""
    collections = sorted({r["collection"] for r in rows})
    fig, axes = plt.subplots(1, len(collections), figsize=(4.6 * len(collections), 4), squeeze=False)
    series = [
        ("budget", {"color": "black", "marker": "o", "label": "budget plan"}),
        ("svd", STYLE["svd"]),
        ("jd1", STYLE["jd-full C=1"]),
        ("jd2", STYLE["jd-full C=2"]),
    ]
    for ax, collection in zip(axes[0], collections):
        picked = sorted((r for r in rows if r["collection"] == collection), key=lambda r: r["floats"])
        for key, style in series:
            # The plan's floats are the row's; a baseline's are its own (at most the plan's).
            pts = [(r[key].get("floats", r["floats"]), r[key]["mean_error"]) for r in picked if r[key]]
            if pts:
                ax.plot(*zip(*pts), marker=style["marker"], color=style["color"], label=style["label"])
        ax.set_xscale("log")
        ax.set_yscale("log")
        for axis in (ax.xaxis, ax.yaxis):
            axis.set_major_formatter(PLAIN)
            axis.set_minor_formatter(NullFormatter())
        ax.set_title(collection, fontsize=9)
        ax.set_xlabel("stored floats (log)")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    axes[0][0].set_ylabel("mean squared relative error (log)")
    fig.suptitle("Budget plans against uniform baselines at the same floats", fontsize=9)
    fig.tight_layout()
    path = out / "budget_vs_baselines.png"
    fig.savefig(path, dpi=130)
    plt.close(fig)
    return path


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--results", type=Path, default=ROOT / "benchmarks" / "results")
    p.add_argument("--out", type=Path, default=ROOT / "docs" / "figures")
    args = p.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    written = []
    if (args.results / "peers.json").is_file():
        written.append(plot_error_vs_bytes(json.loads((args.results / "peers.json").read_text()), args.out))
    if (args.results / "fidelity.json").is_file():
        fid = json.loads((args.results / "fidelity.json").read_text())
        if len(fid.get("runs", {})) > 1:
            written.append(plot_relative_vs_rank(fid, args.out))
            written.append(plot_fidelity_vs_bytes(fid, args.out))
    budget_rows = [r for f in sorted(args.results.glob("budget_*.json")) for r in json.loads(f.read_text())["rows"]]
    if budget_rows:
        written.append(plot_budget(budget_rows, args.out))
    for path in written:
        print(path)
    if not written:
        raise SystemExit(f"no results in {args.results}: run benchmarks/peers.py or benchmarks/fidelity.py first.")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
