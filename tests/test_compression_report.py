"""BundleReport, the typed fidelity report: assembled by the compression, the same JSON as before it had a type (plus
its version), reports written before it read back, fields checked on reading, and written once by the tools."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from helpers import tiny_llama
from jdlora_hub.cli import main
from jdlora_hub.testing.adapters import make_lora_adapter, save_base_model

from peft_jdlora import BundleFormatError, load_bundle, save_bundle
from peft_jdlora.compression import compress, evaluate, remove
from peft_jdlora.compression.synthetic import SyntheticSource
from peft_jdlora.report import REPORT_NAME, REPORT_VERSION, AdapterReport, BundleReport, OverallFidelity

MODULES = {"layers.0.q_proj": (24, 20), "layers.0.v_proj": (12, 20)}

# A report as the compression wrote it before the report had a type (and a version): what old bundles hold.
OLD_REPORT = {
    "method": "jd-full",
    "rank": 4,
    "sigma_type": "full",
    "num_clusters": 1,
    "num_adapters": 2,
    "num_modules": 2,
    "iterations": {"cluster_passes": 0, "jd_full": {"max": 7, "mean": 6.5, "not_converged": 0, "stalled": 0}},
    "cluster_search": [],
    "per_adapter": {
        "a": {"mean_error": 0.1, "max_error": 0.15, "cluster": 0, "modules": {"m0": 0.05, "m1": 0.15}, "params": 88},
        "b": {"mean_error": 0.3, "max_error": 0.4, "cluster": 0, "modules": {"m0": 0.2, "m1": 0.4}, "params": 88},
    },
    "overall": {"mean_error": 0.2, "worst_adapter": "b", "worst_error": 0.3, "max_module_error": 0.4},
    "params": {"original": 176, "bundle": 120, "ratio": 176 / 120},
    "bytes": {"original": 704, "bundle": 480, "dtype": "float32"},
    "seconds": 0.5,
    "device": "cpu",
    "world_size": 1,
    "compute_dtype": "float32",
    "seed": 0,
    "tol": 0.001,
    "stall_tol": 1e-05,
    "max_iter": 100,
    "clusters_requested": 1,
    "target_error": None,
    "svd_baseline": {"same_floats": {"rank": 1, "floats": 96, "mean_error": 0.5}, "next_rank": None},
    "verification": {"errors_checked": True, "reloaded": True},
}


def synthetic(seed: int = 0) -> SyntheticSource:
    return SyntheticSource(MODULES, 4, lora_rank=3, kind="families", noise=0.2, seed=seed, dtype=torch.float64)


def test_a_report_written_before_the_type_reads_and_writes_back_the_same_json():
    report = BundleReport.from_dict(json.loads(json.dumps(OLD_REPORT)))
    assert report.version == 0 and report.method == "jd-full" and report.rank == 4
    assert report.per_adapter["b"] == AdapterReport(0.3, 0.4, 0, {"m0": 0.2, "m1": 0.4}, params=88)
    assert report.overall == OverallFidelity(0.2, "b", 0.3, 0.4)
    assert (report.size.params_original, report.size.bytes_bundle, report.size.dtype) == (176, 480, "float32")
    assert report.size.ratio == pytest.approx(176 / 120)
    assert report.verification == {"errors_checked": True, "reloaded": True}
    # The same keys and values back (nulls are left out), plus the version it was read as.
    expected = {k: v for k, v in OLD_REPORT.items() if v is not None}
    assert report.to_dict() == {**expected, "report_version": 0}


def test_keys_a_newer_writer_added_survive_a_round_trip():
    data = {**OLD_REPORT, "report_version": REPORT_VERSION + 1, "energy": {"kwh": 0.1}}
    data["per_adapter"] = {"a": {**OLD_REPORT["per_adapter"]["a"], "licence": "mit"}}
    report = BundleReport.from_dict(data)
    assert report.extra == {"energy": {"kwh": 0.1}} and report.per_adapter["a"].extra == {"licence": "mit"}
    again = report.to_dict()
    assert again["energy"] == {"kwh": 0.1} and again["per_adapter"]["a"]["licence"] == "mit"
    assert again["report_version"] == REPORT_VERSION + 1


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"per_adapter": []}, "field 'per_adapter' must be an object, got list"),
        ({"per_adapter": {"a": {"mean_error": "low"}}}, r"per_adapter\['a'\]: field 'mean_error' must be a number"),
        ({"per_adapter": {"a": {"modules": {"m0": None}}}}, r"per_adapter\['a'\]: the error of module 'm0' must be"),
        ({"overall": {"worst_adapter": 3}}, "overall: field 'worst_adapter' must be a string"),
        ({"params": {"original": "176"}}, "params: field 'original' must be an integer"),
        ({"num_clusters": 1.5}, "field 'num_clusters' must be an integer"),
        ({"budget": "3x"}, "field 'budget' must be an object"),
        ({"projected": ["a", 1]}, "field 'projected' must be a list of adapter names"),
        ({"report_version": -1}, "'report_version' must be a non-negative integer"),
    ],
)
def test_a_malformed_report_is_refused_naming_the_field(change, message):
    with pytest.raises(BundleFormatError, match=message):
        BundleReport.from_dict({**OLD_REPORT, **change})


def test_load_bundle_names_the_report_file_at_fault(tmp_path):
    bundle = compress(synthetic(), rank=3, device="cpu", progress=False)
    save_bundle(bundle, tmp_path / "b")
    assert load_bundle(tmp_path / "b").report == bundle.report
    (tmp_path / "b" / REPORT_NAME).write_text(json.dumps({"overall": {"mean_error": "n/a"}}))
    with pytest.raises(BundleFormatError, match=rf"{REPORT_NAME}: overall: field 'mean_error' must be a number"):
        load_bundle(tmp_path / "b")
    (tmp_path / "b" / REPORT_NAME).write_text("[1, 2]")
    with pytest.raises(BundleFormatError, match="holds a JSON list, not an object of report fields"):
        load_bundle(tmp_path / "b")


def test_the_compression_assembles_one_report_and_project_remove_update_it():
    source = synthetic()
    bundle = compress(source, rank=3, clusters=2, device="cpu", progress=False)
    report = bundle.report
    assert isinstance(report, BundleReport) and report.version == REPORT_VERSION
    assert report.overall == OverallFidelity.of(report.per_adapter)
    assert report.size.params_bundle == sum(
        f.U.numel() + f.V.numel() + f.sigma.numel() for f in bundle.modules.values()
    )
    assert [report.per_adapter[n].cluster for n in source.names] == bundle.config.adapter_clusters
    assert report.clusters_requested == 2 and report.device == "cpu" and report.world_size == 1
    # The same assembly for a budget plan.
    plan = compress(source, budget="3x", cluster_counts=(), device="cpu", progress=False).report
    assert plan.method == "budget" and plan.budget["requested"] == "3x" and plan.device == "cpu"
    assert plan.overall == OverallFidelity.of(plan.per_adapter) and plan.max_share == 4.0
    # Removing keeps the others' entries (with their new clusters) and refreshes the overall numbers and sizes.
    smaller = remove(bundle, [source.names[0]])
    assert list(smaller.report.per_adapter) == source.names[1:] and smaller.report.removed == [source.names[0]]
    assert smaller.report.overall == OverallFidelity.of(smaller.report.per_adapter)
    removed_params = report.per_adapter[source.names[0]].params
    assert smaller.report.size.params_original == report.size.params_original - removed_params
    assert bundle.report is report and list(report.per_adapter) == source.names  # the input's report is untouched


def test_evaluate_returns_a_report_of_those_adapters(tmp_path):
    base = tiny_llama()
    folders = [make_lora_adapter(base, tmp_path / n, seed=i, r=2, base_model_name="tiny") for i, n in enumerate("ab")]
    bundle = compress([str(f) for f in folders], rank=4, progress=False)
    evaluation = evaluate(bundle, [str(folders[1])])
    assert isinstance(evaluation, BundleReport) and list(evaluation.per_adapter) == ["b"]
    assert evaluation.per_adapter["b"].mean_error == pytest.approx(bundle.report.per_adapter["b"].mean_error, abs=1e-6)
    assert evaluation.overall.worst_adapter == "b"


def test_a_report_is_a_type_not_a_dict():
    bundle = compress(synthetic(), rank=3, device="cpu", progress=False)
    with pytest.raises(TypeError, match=r"read its fields .*report.to_dict\(\)\['overall'\]"):
        bundle.report["overall"]
    bundle.report = {"method": "svd", "per_adapter": {"a": {"mean_error": 0.5}}}  # a dict given is read into the type
    assert bundle.report.method == "svd" and bundle.report.per_adapter["a"].has_error
    assert not AdapterReport(mean_error=math.nan).has_error and not AdapterReport().has_error


def test_convert_writes_the_report_once_with_its_verification(tmp_path, monkeypatch, capsys):
    base = tiny_llama()
    save_base_model(base, tmp_path / "base")
    folders = [make_lora_adapter(base, tmp_path / n, seed=i, r=2, base_model_name=str(tmp_path / "base")) for i, n in
               enumerate("ab")]  # fmt: skip
    writes = []
    write_text = Path.write_text

    def counting(path, text, *args, **kwargs):
        if path.name == REPORT_NAME:
            writes.append(json.loads(text))
        return write_text(path, text, *args, **kwargs)

    monkeypatch.setattr(Path, "write_text", counting)
    assert main(["convert", *map(str, folders), "--rank", "4", "--out", str(tmp_path / "bundle"), "--quiet"]) == 0
    capsys.readouterr()
    assert len(writes) == 1 and writes[0]["verification"]["base_model_check"]["status"] == "ok"
    assert load_bundle(tmp_path / "bundle").report.to_dict() == writes[0]
