"""Budget plans (`compress(..., budget=...)`): the cost model, plans on collections whose best plan is known, never
worse than the fixed-rank baselines at equal floats, exact float accounting, target-error plans, and serving."""

from __future__ import annotations

import itertools
from dataclasses import replace

import pytest
import torch
from helpers import tiny_llama
from jdlora_hub.testing.adapters import make_lora_adapter, save_base_model
from peft import PeftModel

from peft_jdlora import export_lora, load_bundle, ops, save_bundle
from peft_jdlora.compression import LoraAdapter, compress
from peft_jdlora.compression.cost import (
    DEFAULT_BUDGET,
    DEFAULT_PLAN_CLUSTER_COUNTS,
    budget_to_floats,
    bundle_floats,
    module_floats,
    parse_budget,
    target_rank,
    uniform_floats,
)
from peft_jdlora.compression.synthetic import SyntheticSource

torch.set_num_threads(1)

MODULES = {
    f"model.layers.{i}.self_attn.{p}": shape
    for i in range(2)
    for p, shape in (("q_proj", (96, 96)), ("v_proj", (48, 96)))
}
N, R = 8, 4


def collection(kind: str, noise: float = 0.05, seed: int = 0) -> SyntheticSource:
    return SyntheticSource(
        MODULES, N, lora_rank=R, kind=kind, basis_rank=6, families=2, noise=noise, seed=seed, dtype=torch.float64
    )


def families_of(plan: dict) -> set:
    return {entry["family"] for entry in plan.values()}


def largest_uniform_rank(source, floats: int, method: str) -> int | None:
    """Largest rank whose fixed-rank bundle (engine caps included) stores at most `floats` floats."""
    best = None
    for r in range(1, 200):
        total = 0
        for m, (d_out, d_in) in source.shapes().items():
            k = target_rank(method, r, d_out, d_in, source.ranks()[m])
            total += module_floats(
                d_out, d_in, N, k, N if method == "svd" else 1, "diag" if method == "svd" else "full"
            )
        if total > floats:
            break
        best = r
    return best


# ------------------------------------------------------------------------------------------------ cost model


def test_parse_budget_and_cost_model():
    assert parse_budget("16x") == ("ratio", 16.0)
    assert parse_budget("4MB") == ("bytes", 4e6)
    assert parse_budget("2MiB") == ("bytes", 2.0 * 2**20)
    assert parse_budget(1000) == ("bytes", 1000.0)
    for bad in ("x", "-3", "0x", "16y", True, 0):
        with pytest.raises(ValueError):
            parse_budget(bad)
    # A ratio divides the source's bytes; bytes are counted in the storage dtype.
    assert budget_to_floats("4x", 4000, torch.bfloat16) == 500
    assert budget_to_floats(4000, 123, torch.float32) == 1000
    assert module_floats(10, 6, 3, 2, 1, "full") == 2 * 16 + 3 * 4
    assert module_floats(10, 6, 3, 2, 3, "diag") == 3 * 2 * 16 + 3 * 2
    # "r16": the size of the one-basis bundle compress(rank=16) builds, per-module caps included.
    assert parse_budget("r16") == parse_budget("rank16") == ("rank", 16.0)
    source = collection("shared")
    shapes, ranks = source.shapes(), source.ranks()
    assert budget_to_floats("r40", 1, torch.float32, shapes, ranks) == uniform_floats(shapes, ranks, "jd", 40)
    assert uniform_floats(shapes, ranks, "jd", 40) == sum(
        module_floats(d_out, d_in, N, min(40, d_out, d_in, N * R), 1, "full") for d_out, d_in in MODULES.values()
    )
    bundle = compress(source, rank=12, progress=False, device="cpu")
    assert budget_to_floats("r12", 1, torch.float32, shapes, ranks) == bundle_floats(bundle)
    for bad in ("r0", "r", "r1.5"):
        with pytest.raises(ValueError):
            parse_budget(bad)


# ------------------------------------------------------------------------------------------------ known best plans


def test_shared_basis_gets_one_cluster():
    bundle = compress(collection("shared"), budget="3x", progress=False, device="cpu", cluster_counts=(2,))
    assert families_of(bundle.report.plan) == {"jd1"}
    assert bundle.config.num_clusters == 1 and not bundle.config.cluster_pattern
    assert bundle.config.sigma_type == "full" and not bundle.config.sigma_pattern
    assert bundle.report.overall.mean_error < 0.01


def test_independent_adapters_get_per_adapter_svd():
    # (On a budget below rank-1 SVD everywhere, the cheap rank-1 shared bases fill the modules SVD cannot afford.)
    bundle = compress(collection("random"), budget="2x", progress=False, device="cpu", cluster_counts=(2,))
    assert families_of(bundle.report.plan) == {"svd"}
    config = bundle.config
    assert config.sigma_type == "diag" and config.adapter_clusters == list(range(N)) and config.num_clusters == N
    for f in bundle.modules.values():
        assert f.U.shape[0] == N and f.sigma.dim() == 2


def test_two_families_get_two_clusters():
    source = collection("families")
    bundle = compress(source, budget="2x", progress=False, device="cpu", cluster_counts=(2,))
    assert families_of(bundle.report.plan) == {"jd2"}
    clusters = bundle.config.adapter_clusters
    truth = [source.family(i) for i in range(N)]
    # The same partition as the hidden families (cluster ids are arbitrary).
    assert len(set(clusters)) == 2 and all(
        (clusters[i] == clusters[j]) == (truth[i] == truth[j]) for i in range(N) for j in range(N)
    )
    assert bundle.report.overall.mean_error < 0.01


@pytest.mark.parametrize(("kind", "budget"), [("shared", "2x"), ("random", "2x"), ("families", "3x")])
def test_never_above_either_baseline_at_equal_floats(kind, budget):
    source = collection(kind, noise=0.3)
    bundle = compress(source, budget=budget, progress=False, device="cpu", cluster_counts=(2,))
    report = bundle.report
    floats = report.size.params_bundle
    error = report.overall.mean_error
    errors = {}
    for method in ("svd", "jd"):
        rank = largest_uniform_rank(source, floats, method)
        assert rank is not None
        base = compress(source, method=method, rank=rank, progress=False, device="cpu", cluster_counts=(2,))
        assert base.report.size.params_bundle <= floats
        errors[method] = base.report.overall.mean_error
        assert error <= errors[method] * (1 + 1e-9) + 1e-12, (method, rank, error, errors[method])
    # The plan's own baselines within the budget are the bundles `compress` builds at those ranks: exact on the curves.
    budget_floats = report.budget["floats"]
    for method, family in (("jd", "jd1"), ("svd", "svd")):
        baseline = report.budget["baselines_within_budget"][family]
        assert baseline["exact"] and baseline["rank"] == largest_uniform_rank(source, budget_floats, method)
        real = compress(source, method=method, rank=baseline["rank"], progress=False, device="cpu")
        assert baseline["mean_error"] == pytest.approx(real.report.overall.mean_error, rel=1e-6, abs=1e-12)
        assert error <= baseline["mean_error"] * (1 + 1e-9) + 1e-12
    # The stored bundle (float64) is at most the predicted error: refining a nested start never makes it worse.
    assert error <= report.budget["predicted_mean_error"] * (1 + 1e-9) + 1e-12


@pytest.mark.parametrize("kind", ["random", "shared"])
def test_fixed_rank_report_carries_the_svd_baseline_around_its_size(kind):
    source = collection(kind, noise=0.3)
    bundle = compress(source, rank=12, progress=False, device="cpu")
    floats = bundle.report.size.params_bundle
    same, above = bundle.report.svd_baseline["same_floats"], bundle.report.svd_baseline["next_rank"]
    assert same["rank"] == largest_uniform_rank(source, floats, "svd") and same["floats"] <= floats
    assert above["rank"] == same["rank"] + 1 and above["floats"] > floats
    # Each is the error of the SVD bundle `compress` builds at that rank, predicted without building it.
    for point in (same, above):
        real = compress(source, method="svd", rank=point["rank"], progress=False, device="cpu")
        assert point["floats"] == real.report.size.params_bundle
        assert point["mean_error"] == pytest.approx(real.report.overall.mean_error, rel=1e-9, abs=1e-12)
    # Unrelated adapters: SVD spends the same bytes better; one shared basis: the joint fit does.
    jd = bundle.report.overall.mean_error
    assert (same["mean_error"] < 0.9 * jd) if kind == "random" else (same["mean_error"] > jd)
    # A bundle smaller than rank-1 SVD everywhere still gets the rank-1 point (with its larger size).
    small = compress(source, rank=1, progress=False, device="cpu").report
    assert small.svd_baseline["same_floats"] is None and small.svd_baseline["next_rank"]["rank"] == 1


def test_reported_floats_match_the_tensors_and_the_budget():
    source = collection("families", noise=0.3)
    bundle = compress(source, budget="3x", progress=False, device="cpu", dtype=torch.float32)
    report = bundle.report
    floats = bundle_floats(bundle)
    assert report.size.params_bundle == floats == report.budget["plan_floats"]
    assert floats == sum(entry["floats"] for entry in report.plan.values())
    assert report.size.bytes_bundle == 4 * floats == report.budget["plan_bytes"]
    assert floats <= report.budget["floats"] == budget_to_floats("3x", report.size.bytes_original, torch.float32)
    for module, entry in report.plan.items():
        f = bundle.modules[module]
        assert f.U.numel() + f.V.numel() + f.sigma.numel() == entry["floats"]
        assert (f.U.shape[0], f.U.shape[-1]) == (entry["num_clusters"], entry["rank"])
        for baseline in ("svd_same_floats", "jd1_same_floats"):
            if entry[baseline] is not None:  # never worse than a baseline option of this module with as many floats
                assert entry[baseline]["floats"] <= entry["floats"]
                assert entry["error"] <= entry[baseline]["error"] + 1e-12
    bundle.validate()


def test_budget_below_the_smallest_bundle_is_refused():
    with pytest.raises(ValueError, match="below the smallest bundle"):
        compress(collection("shared"), budget=100, progress=False, device="cpu", cluster_counts=(2,))
    with pytest.raises(ValueError, match="drop"):
        compress(collection("shared"), budget="4x", clusters=2, progress=False, device="cpu", cluster_counts=(2,))


def test_target_error_plans():
    source = collection("families", noise=0.5)
    kwargs = {"progress": False, "device": "cpu", "cluster_counts": (2,)}
    mean = compress(source, budget="auto", target_error=0.05, **kwargs)
    every = compress(source, budget="auto", target_error=0.05, target_error_every=True, **kwargs)
    assert mean.report.overall.mean_error <= 0.05 + 1e-9
    assert every.report.overall.worst_error <= 0.05 + 1e-9
    assert bundle_floats(mean) <= bundle_floats(every)
    # Smallest: the best plan within one float less misses the target.
    smaller = compress(source, budget=8 * (bundle_floats(mean) - 1), **kwargs)  # float64: 8 bytes per float
    assert smaller.report.overall.mean_error > 0.05


# ------------------------------------------------------------------------------------------------ serving


IDS = torch.tensor([[5, 17, 33, 2, 90, 11], [7, 7, 64, 120, 3, 9], [44, 1, 8, 100, 21, 6], [3, 4, 5, 6, 7, 8]])


def _peft_lora(base_folder, folders: dict) -> PeftModel:
    from transformers import AutoModelForCausalLM

    model = None
    for name, folder in folders.items():
        if model is None:
            model = PeftModel.from_pretrained(
                AutoModelForCausalLM.from_pretrained(base_folder), folder, adapter_name=name
            )
        else:
            model.load_adapter(folder, adapter_name=name)
    return model.eval()


def _bundle_model(base_folder, bundle_folder) -> PeftModel:
    from transformers import AutoModelForCausalLM

    return PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_folder), bundle_folder).eval()


def test_lossless_budget_plan_serves_like_the_source_loras(tmp_path):
    base = tiny_llama()
    save_base_model(base, tmp_path / "base")
    folders = {}
    for i, r in enumerate((4, 4, 2, 3)):
        folders[f"task{i}"] = make_lora_adapter(
            base, tmp_path / "src" / f"task{i}", seed=20 + i, r=r, base_model_name="tiny"
        )
    # More floats than the sources: the per-adapter SVD at full rank (lossless) always fits.
    bundle = compress(
        [str(f) for f in folders.values()], budget="0.8x", progress=False, device="cpu", cluster_counts=(2,)
    )
    assert bundle.report.overall.max_module_error < 1e-6  # float32 rounding
    save_bundle(bundle, tmp_path / "bundle")
    model = _bundle_model(tmp_path / "base", tmp_path / "bundle")
    lora = _peft_lora(tmp_path / "base", {f.name: f for f in folders.values()})
    names = list(folders)
    with torch.no_grad():
        mixed = model(input_ids=IDS, adapter_ids=names).logits
        expected = lora(input_ids=IDS, adapter_names=names).logits
    torch.testing.assert_close(mixed, expected, atol=1e-4, rtol=1e-4)


def _mixed_collection() -> list[LoraAdapter]:
    """q_proj: adapters from one shared basis (a shared basis wins); v_proj: independent adapters (SVD wins)."""
    g = torch.Generator().manual_seed(3)
    shapes = {
        f"model.layers.{i}.self_attn.{p}": s for i in range(2) for p, s in (("q_proj", (64, 64)), ("v_proj", (32, 64)))
    }
    bases = {
        m: (
            torch.linalg.qr(torch.randn(d_out, 3, generator=g))[0],
            torch.linalg.qr(torch.randn(d_in, 3, generator=g))[0],
        )
        for m, (d_out, d_in) in shapes.items()
    }
    adapters = []
    for i in range(6):
        modules = {}
        for m, (d_out, d_in) in shapes.items():
            if "q_proj" in m:
                U0, V0 = bases[m]
                B = U0 @ torch.randn(3, 4, generator=g) + 0.05 * torch.randn(d_out, 4, generator=g)
                A = torch.randn(4, 3, generator=g) @ V0.T + 0.05 * torch.randn(4, d_in, generator=g)
            else:
                B, A = torch.randn(d_out, 4, generator=g) / 4, torch.randn(4, d_in, generator=g) / 4
            modules[m] = (A, B)
        adapters.append(LoraAdapter(name=f"task{i}", modules=modules, base_model="tiny"))
    return adapters


def test_mixed_budget_plan_serves_its_own_reconstruction(tmp_path):
    bundle = compress(_mixed_collection(), budget="3x", progress=False, device="cpu", cluster_counts=(2,))
    plan = bundle.report.plan
    assert {plan[m]["kind"] for m in plan if "q_proj" in m} == {"jd"}
    assert {plan[m]["kind"] for m in plan if "v_proj" in m} == {"svd"}
    assert bundle.config.sigma_pattern and bundle.config.cluster_pattern
    base = tiny_llama()
    save_base_model(base, tmp_path / "base")
    save_bundle(bundle, tmp_path / "bundle")
    reloaded = load_bundle(tmp_path / "bundle")
    for m, f in bundle.modules.items():
        torch.testing.assert_close(reloaded.modules[m].sigma, f.sigma, atol=0, rtol=0)
    names = bundle.config.adapter_names
    folders = {}
    for name in names[:4]:
        folders[name] = tmp_path / "export" / name
        export_lora(bundle, name, folders[name])
    model = _bundle_model(tmp_path / "base", tmp_path / "bundle")
    lora = _peft_lora(tmp_path / "base", folders)
    with torch.no_grad():
        mixed = model(input_ids=IDS, adapter_ids=names[:4]).logits
        expected = lora(input_ids=IDS, adapter_names=names[:4]).logits
    torch.testing.assert_close(mixed, expected, atol=1e-4, rtol=1e-4)
    # The Triton kernels serve the same plan (per-module ranks, Σ types and singleton clusters): under the
    # interpreter on CPU here, compiled on a GPU.
    if not ops.triton_available(torch.device("cpu")):
        pytest.skip("the Triton interpreter is off (TRITON_INTERPRET=1 before triton is imported)")
    ops.set_backend("triton")
    try:
        with torch.no_grad():
            kernels = model(input_ids=IDS, adapter_ids=[names[0], None, names[2], names[3]]).logits
    finally:
        ops.set_backend("auto")
    torch.testing.assert_close(kernels[[0, 2, 3]], expected[[0, 2, 3]], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(kernels[1], model(input_ids=IDS[1:2]).logits[0], atol=1e-5, rtol=1e-5)  # base row


def test_cli_convert_with_budget_and_target_error(tmp_path, capsys):
    import json

    from jdlora_hub.cli import main

    base = tiny_llama()
    save_base_model(base, tmp_path / "base")
    sources = [
        str(make_lora_adapter(base, tmp_path / "src" / f"t{i}", seed=40 + i, r=4, base_model_name="tiny"))
        for i in range(3)
    ]
    common = ["--no-base-check", "--quiet", "--json"]
    assert main(["convert", *sources, "--out", str(tmp_path / "b1"), "--budget", "3x", *common]) == 0
    out = json.loads(capsys.readouterr().out)
    report = load_bundle(tmp_path / "b1").report
    assert report.method == "budget" and report.budget["requested"] == "3x"
    assert report.size.params_bundle <= report.budget["floats"] and out["summary"]["method"] == "budget"
    assert report.svd_baseline is None  # a plan has its baselines in report.budget
    card = (tmp_path / "b1" / "README.md").read_text()
    assert "## Budget plan" in card and "per-adapter SVD, one rank everywhere" in card
    assert f"| this bundle | {report.budget['plan_floats']:,} |" in card
    assert all(module in card for module in report.plan)
    argv = ["convert", *sources, "--out", str(tmp_path / "b2"), "--target-error", "0.2", "--every-adapter", *common]
    assert main(argv) == 0
    capsys.readouterr()
    report = load_bundle(tmp_path / "b2").report
    assert report.budget["target"] == "every adapter" and report.overall.worst_error <= 0.2 + 1e-6
    # A fixed-rank bundle of unrelated adapters says that per-adapter SVD would use its bytes better.
    assert main(["convert", *sources, "--out", str(tmp_path / "b3"), "--rank", "8", "--no-base-check", "--quiet"]) == 0
    printed = capsys.readouterr().out
    same = load_bundle(tmp_path / "b3").report.svd_baseline["same_floats"]
    assert "hint:" in printed and f"per-adapter SVD (rank {same['rank']}) has mean error" in printed
    card = (tmp_path / "b3" / "README.md").read_text()
    assert f"| per-adapter SVD near this size | rank {same['rank']}: mean error" in card


def test_budget_hint_thresholds():
    from jdlora_hub.cli import budget_hint

    def summary(same, above):
        point = lambda rank, floats, error: {"rank": rank, "floats": floats, "mean_error": error}  # noqa: E731
        baseline = {
            "same_floats": None if same is None else point(1, *same),
            "next_rank": None if above is None else point(2, *above),
        }
        return {"svd_baseline": baseline, "mean_error": 0.4, "params_bundle": 1000, "compression_ratio": 16.0}

    hint = budget_hint(summary((900, 0.3), None))
    assert "rank 1" in hint and "0.90x these bytes" in hint and "--budget 16.0x" in hint
    assert budget_hint(summary((900, 0.37), (2000, 0.1))) is None  # within 10%, and rank 2 costs 2x the bytes
    assert "rank 2" in budget_hint(summary(None, (1200, 0.2)))  # the next rank at 1.2x the bytes
    assert budget_hint(summary(None, (1300, 0.2))) is None
    assert budget_hint({"mean_error": 0.4, "params_bundle": 1000}) is None  # budget plans carry no svd_baseline


# ------------------------------------------------------------------------------------------------ the default plan


@pytest.mark.parametrize("kind", ["shared", "random", "families"])
def test_default_plan_is_never_worse_than_either_baseline(kind):
    """The plan `jdlora-convert` builds by default (DEFAULT_BUDGET: the size of compress(rank=16), no cluster search)
    against real fixed-rank bundles: per-adapter SVD and one shared basis at the largest uniform rank within the
    plan's floats, and one shared basis within the budget (what the converter built before plans: rank 16)."""
    source = collection(kind, noise=0.3)
    plan = compress(
        source,
        budget=DEFAULT_BUDGET,
        cluster_counts=DEFAULT_PLAN_CLUSTER_COUNTS,
        progress=False,
        device="cpu",
    )
    report = plan.report
    error, floats = report.overall.mean_error, report.size.params_bundle
    fixed = compress(source, rank=16, progress=False, device="cpu")
    assert floats <= report.budget["floats"] == fixed.report.size.params_bundle
    assert error <= fixed.report.overall.mean_error * (1 + 1e-9) + 1e-12
    assert report.budget["families_pruned"] == [] and report.budget["cluster_counts"] == []
    assert set(report.budget["modules_by_family"]) <= {"svd", "jd1"}
    for method in ("svd", "jd"):
        rank = largest_uniform_rank(source, floats, method)
        if rank is None:  # rank 1 does not fit (per-adapter SVD of many adapters is dear)
            continue
        baseline = compress(source, method=method, rank=rank, progress=False, device="cpu").report
        assert baseline.size.params_bundle <= floats
        assert error <= baseline.overall.mean_error * (1 + 1e-9) + 1e-12, (method, rank)
    # Per module, the stored error never exceeds the predicted one (nested starts are only refined).
    for module, entry in report.plan.items():
        assert entry["mean_error"] <= entry["predicted_mean_error"] * (1 + 1e-9) + 1e-12, module


def test_unrelated_adapters_with_decaying_spectra_go_to_per_adapter_svd():
    # Trained LoRAs concentrate their update in a few directions; then per-adapter SVD of low rank is the better use
    # of the default's bytes on unrelated adapters, and the plan takes it (mixing ranks beats one rank everywhere).
    source = SyntheticSource(MODULES, N, lora_rank=R, kind="random", decay=0.5, seed=2, dtype=torch.float64)
    plan = compress(source, budget="r16", cluster_counts=(), progress=False, device="cpu").report
    fixed = compress(source, rank=16, progress=False, device="cpu").report
    assert plan.budget["modules_by_family"] == {"svd": len(MODULES)}
    assert plan.overall.mean_error < 0.2 * fixed.overall.mean_error
    assert plan.overall.mean_error < 0.7 * plan.budget["baselines_within_budget"]["svd"]["mean_error"]


def test_plans_are_deterministic_and_do_not_depend_on_batching():
    source = collection("families", noise=0.3)
    kwargs = {"budget": "3x", "cluster_counts": (2,), "progress": False, "device": "cpu", "seed": 3}
    first, again = compress(source, **kwargs), compress(source, **kwargs)
    one_module_batches = compress(source, max_batch_bytes=1, **kwargs)
    assert first.config.to_dict() == again.config.to_dict() == one_module_batches.config.to_dict()
    for module, f in first.modules.items():
        for x, y in zip(
            (f.U, f.V, f.sigma), (again.modules[module].U, again.modules[module].V, again.modules[module].sigma)
        ):
            assert torch.equal(x, y)
        for name in first.config.adapter_names:
            torch.testing.assert_close(
                one_module_batches.delta_weight(module, name), first.delta_weight(module, name), atol=1e-9, rtol=1e-7
            )
    assert first.report.plan == again.report.plan
    assert first.report.overall == again.report.overall


def test_nested_curves_one_fit_per_family():
    """One fit per cluster of each family gives every rank: errors fall with the rank, the fitted rank is the fit
    `compress(rank=...)` makes, lower ranks are upper bounds the built bundle meets, and options above the fit exist
    (the extension), all from 1 fit per cluster and batch."""
    source = collection("shared", noise=0.3)
    budget_floats = uniform_floats(source.shapes(), source.ranks(), "jd", 6)
    plan = compress(source, budget=budget_floats * 8, cluster_counts=(), progress=False, device="cpu")
    report = plan.report
    assert report.budget["fit_rank"] == 6
    assert report.timings["fits"] == 2  # one per batch of same-shape modules (q_proj, v_proj)
    fixed = compress(source, rank=6, progress=False, device="cpu")
    assert report.budget["baselines_within_budget"]["jd1"]["mean_error"] == pytest.approx(
        fixed.report.overall.mean_error, rel=1e-9, abs=1e-12
    )
    from peft_jdlora.compression.curves import CurveFitter, Family
    from peft_jdlora.compression.engine import Placement
    from peft_jdlora.compression.settings import CompressionSettings

    placement = Placement(torch.device("cpu"), compute_dtype=torch.float64, storage_dtype=torch.float64)
    settings = CompressionSettings(seed=0, max_iter=100, tol=1e-3, stall_tol=1e-5)
    fitter = CurveFitter(source, settings, placement, families=[Family("jd1", (0,) * N)], fit_rank=6, limit=None)
    curves = fitter.curves()
    for module, c in curves.items():
        jd = sorted((o for o in c.options if o.family == "jd1"), key=lambda o: o.rank)
        assert [o.rank for o in jd] == list(range(1, 13))  # nested below the fit, extended to twice its rank
        assert all(a.error >= b.error - 1e-12 for a, b in itertools.pairwise(jd))
        assert [o.rank for o in jd if o.exact] == [6]
        bases = fitter.bases[(module, "jd1")]
        eye = torch.eye(12, dtype=torch.float64)
        torch.testing.assert_close(bases.U[0].mT @ bases.U[0], eye, atol=1e-10, rtol=0)
        torch.testing.assert_close(bases.V[0].mT @ bases.V[0], eye, atol=1e-10, rtol=0)
        # The fit's subspace is the first 6 columns (rotated within), so rank 6 is the fit's error.
        fitted = fixed.report.per_adapter
        exact = next(o for o in jd if o.rank == 6)
        assert sum(exact.errors) / N == pytest.approx(
            sum(fitted[n].modules[module] for n in fitted) / N, rel=1e-9, abs=1e-12
        )
    # Build a plan at ranks below the fit: the stored errors are at most the curves' (refined from nested starts).
    low = {m: next(o for o in c.options if o.family == "jd1" and o.rank == 3) for m, c in curves.items()}
    modules, errors, _iterations = fitter.build(low)
    for module, option in low.items():
        stored = sum(errors[n][module] for n in source.names)
        assert stored <= sum(option.errors) * (1 + 1e-12) + 1e-12
        assert modules[module].U.shape == (1, MODULES[module][0], 3)


def test_clusters_are_chosen_on_a_sample_and_pruned_when_unused():
    modules = {
        f"model.layers.{i}.self_attn.{p}": s for i in range(6) for p, s in (("q_proj", (48, 48)), ("v_proj", (24, 48)))
    }
    shared = SyntheticSource(modules, N, lora_rank=R, kind="shared", basis_rank=4, noise=0.05, seed=4)
    report = compress(shared, budget="4x", cluster_counts=(2,), cluster_sample=4, progress=False, device="cpu").report
    assert report.budget["cluster_sample_modules"] == 4
    assert report.budget["families_pruned"] == ["jd2"]  # one shared basis is what this collection rewards
    assert "jd2" not in report.budget["modules_by_family"]
    families = SyntheticSource(modules, N, lora_rank=R, kind="families", basis_rank=4, noise=0.05, seed=4)
    report = compress(families, budget="3x", cluster_counts=(2,), cluster_sample=4, progress=False, device="cpu").report
    assert report.budget["families_pruned"] == [] and "jd2" in report.budget["modules_by_family"]


def test_engine_gives_every_smaller_cluster_count_on_the_way():
    from peft_jdlora.compression.engine import Engine, Placement
    from peft_jdlora.compression.settings import CompressionSettings

    source = collection("families", noise=0.3)
    placement = Placement(torch.device("cpu"), compute_dtype=torch.float64, storage_dtype=torch.float64)
    settings = CompressionSettings(rank=4, method="jd", sigma="full", max_iter=100, tol=1e-3, stall_tol=1e-5, seed=0)
    found = Engine(source, replace(settings, clusters=3), placement).run(assignments_only=True)
    assert found.modules is None
    for k in (2, 3):
        engine = Engine(source, replace(settings, clusters=k), placement)
        assert found.assignments_by_count[k] == engine.run().assignment


def test_cli_default_is_a_budget_plan_and_fixed_shapes_keep_their_meaning(tmp_path, capsys):
    import json

    from jdlora_hub.cli import main

    base = tiny_llama()
    save_base_model(base, tmp_path / "base")
    folders = {
        f"t{i}": make_lora_adapter(base, tmp_path / "src" / f"t{i}", seed=60 + i, r=4, base_model_name="tiny")
        for i in range(4)
    }
    sources = [str(f) for f in folders.values()]
    common = ["--no-base-check", "--quiet", "--json"]
    assert main(["convert", *sources, "--out", str(tmp_path / "default"), *common]) == 0
    summary = json.loads(capsys.readouterr().out)["summary"]
    report = load_bundle(tmp_path / "default").report
    assert report.method == summary["method"] == "budget"
    assert report.budget["requested"] == DEFAULT_BUDGET and report.budget["cluster_counts"] == []
    assert summary["budget_plan"]["baselines"]["jd1"]["rank"] == 16
    # The same size as --rank 16, and never worse than it.
    assert main(["convert", *sources, "--out", str(tmp_path / "r16"), "--rank", "16", *common]) == 0
    capsys.readouterr()
    r16 = load_bundle(tmp_path / "r16").report
    assert r16.method == "jd-full" and r16.rank == 16
    assert report.size.params_bundle <= r16.size.params_bundle == report.budget["floats"]
    assert report.overall.mean_error <= r16.overall.mean_error + 1e-6  # float32: lossless at 1e-7
    # --method, --sigma and --clusters alone keep today's fixed shapes (rank 16).
    for option, method in (
        (["--method", "svd"], "svd"),
        (["--sigma", "diag"], "jd-diag"),
        (["--clusters", "2"], "jd-full"),
    ):
        out = tmp_path / method / option[0].strip("-")
        assert main(["convert", *sources, "--out", str(out), *option, *common]) == 0
        capsys.readouterr()
        assert load_bundle(out).report.method == method
    # The card and `jdlora inspect` explain the plan per module, with the baselines at the same floats.
    card = (tmp_path / "default" / "README.md").read_text()
    assert "## Budget plan" in card and "r16: the size of one shared basis of rank 16" in card
    assert main(["inspect", str(tmp_path / "default")]) == 0
    printed = capsys.readouterr().out
    assert "plan:" in printed and "within the budget: per-adapter SVD" in printed
    for module in report.plan:
        assert module in printed and module in card
    assert main(["inspect", str(tmp_path / "default"), "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)["plan"]
    assert [r["module"] for r in rows] == list(report.plan)
    # The default bundle serves through PEFT like its exported LoRAs (and through the kernels).
    names = list(folders)
    exported = {}
    for name in names:
        exported[name] = tmp_path / "export" / name
        export_lora(load_bundle(tmp_path / "default"), name, exported[name])
    model = _bundle_model(tmp_path / "base", tmp_path / "default")
    lora = _peft_lora(tmp_path / "base", exported)
    with torch.no_grad():
        mixed = model(input_ids=IDS, adapter_ids=names).logits
        expected = lora(input_ids=IDS, adapter_names=names).logits
    torch.testing.assert_close(mixed, expected, atol=1e-4, rtol=1e-4)
    if ops.triton_available(torch.device("cpu")):
        ops.set_backend("triton")
        try:
            with torch.no_grad():
                kernels = model(input_ids=IDS, adapter_ids=names).logits
        finally:
            ops.set_backend("auto")
        torch.testing.assert_close(kernels, expected, atol=1e-4, rtol=1e-4)


def test_refit_of_a_plan_plans_again(tmp_path, capsys):
    from jdlora_hub.cli import main

    base = tiny_llama()
    save_base_model(base, tmp_path / "base")
    sources = [
        str(make_lora_adapter(base, tmp_path / "src" / f"t{i}", seed=80 + i, r=4, base_model_name="tiny"))
        for i in range(4)
    ]
    common = ["--no-base-check", "--quiet"]
    assert main(["convert", *sources[:3], "--out", str(tmp_path / "b"), "--budget", "3x", *common]) == 0
    assert main(["add", str(tmp_path / "b"), sources[3], "--refit", "--out", str(tmp_path / "refit"), *common]) == 0
    report = load_bundle(tmp_path / "refit").report
    assert report.method == "budget" and report.budget["requested"] == "3x" and report.num_adapters == 4
    assert report.budget["cluster_counts"] == [2, 4]
    # A shape given with --refit is a fixed-rank refit.
    argv = ["add", str(tmp_path / "b"), sources[3], "--refit", "--rank", "4", "--out", str(tmp_path / "r4"), *common]
    assert main(argv) == 0
    capsys.readouterr()
    assert load_bundle(tmp_path / "r4").report.method == "jd-full"


def test_cli_checks_budget_without_importing_torch(tmp_path):
    import subprocess
    import sys

    code = (
        "import sys\n"
        "from jdlora_hub.cli import main\n"
        f"code = main(['convert', {str(tmp_path)!r}, '--out', {str(tmp_path / 'out')!r}, '--budget', '16y'])\n"
        "print(code, 'torch' in sys.modules)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.stdout.split() == ["2", "False"], done.stderr
    assert "--budget" in done.stderr and "r16" in done.stderr


def test_sample_modules_spread_over_kinds_and_layers():
    from peft_jdlora.compression.budget import sample_modules

    shapes = {f"model.layers.{i}.self_attn.{p}": (8, 8) for i in range(30) for p in ("q_proj", "v_proj")}
    sample = sample_modules(shapes, 6)
    assert sample == [f"model.layers.{i}.self_attn.{p}" for i in (0, 14, 29) for p in ("q_proj", "v_proj")]
    assert sample_modules(shapes, 6) == sample  # deterministic
    assert sample_modules(dict(list(shapes.items())[:5]), 6) == list(shapes)[:5]  # few modules: all of them
