"""The prepared GPU run (benchmarks/gpu_check.py and its stages) rehearsed on the CPU, so that it cannot rot while
no GPU is around: the package plan (image first, carried wheels for the rest), the stage loop (budgets, a failing
or overrunning stage does not stop the others, the results folder layout a device run can bring back), and every
torch stage's own logic in the Triton interpreter at tiny shapes, read back by the summary.

The whole rehearsal is `bash benchmarks/gpu_check.sh OUT --dry-run` (about two minutes); this file runs its parts
in-process at the smallest sizes.
"""

from __future__ import annotations

import argparse
import json
import sys
import zipfile
from pathlib import Path

import pytest
import torch
from helpers import load_benchmark

ROOT = Path(__file__).resolve().parents[1]


gc = load_benchmark("gpu_check")


# ---------------------------------------------------------------------------------------------- packages


def make_wheel(folder: Path, name: str, version: str, requires=(), tag: str = "py3-none-any") -> Path:
    path = folder / f"{name}-{version}-{tag}.whl"
    metadata = "\n".join(["Metadata-Version: 2.1", f"Name: {name}", f"Version: {version}"])
    metadata += "".join(f"\nRequires-Dist: {req}" for req in requires)
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr(f"{name}/__init__.py", f"__version__ = {version!r}\n")
        archive.writestr(f"{name}-{version}.dist-info/METADATA", metadata + "\n")
    return path


@pytest.fixture
def wheels(tmp_path):
    folder = tmp_path / "wheels"
    folder.mkdir()
    make_wheel(folder, "peft", "0.21.2", ["transformers>=5.20", "accelerate>=0.21.0", "tomli; python_version < '3'"])
    make_wheel(folder, "transformers", "5.24.0", ["huggingface-hub>=1.31,<3"])
    make_wheel(folder, "accelerate", "1.15.0")
    make_wheel(folder, "regex", "2026.1.1", tag="cp27-cp27mu-manylinux1_x86_64")  # for another Python
    return gc.read_wheels(folder)


def test_package_plan_keeps_the_image_and_carries_only_what_is_missing_or_out_of_range(wheels):
    image = {"torch": "2.11.0", "peft": "0.17.0", "transformers": "5.17.0", "huggingface-hub": "1.33.0"}
    requirements = ["torch>=2.4", "peft>=0.21,<0.22", "transformers>=5.0,<6", "huggingface_hub>=1.0"]
    plan = gc.plan_packages(requirements, image, wheels)
    # peft 0.17 is out of range; the carried peft wants transformers >= 5.20, so the image's 5.17 is replaced too;
    # accelerate is missing; torch and huggingface_hub stay the image's. tomli's marker is false: never asked for.
    assert sorted(plan.carried) == ["accelerate", "peft", "transformers"]
    assert plan.image == {"torch": "2.11.0", "huggingface-hub": "1.33.0"}
    assert plan.problems == [] and "tomli" not in plan.carried

    # In range: the image's own peft and transformers stay, and nothing is carried (the image's packages answer for
    # their own requirements; the env stage's smoke run checks that they import and work).
    in_range = gc.plan_packages(requirements, {**image, "peft": "0.21.0", "transformers": "5.30.0"}, wheels)
    assert in_range.carried == {} and in_range.image["peft"] == "0.21.0"
    carried_first = gc.plan_packages(requirements, {**image, "peft": "0.21.0"}, wheels, prefer_carried=True)
    assert sorted(carried_first.carried) == ["accelerate", "peft", "transformers"]


def test_package_plan_names_what_nothing_satisfies_and_what_it_breaks(wheels):
    plan = gc.plan_packages(["torch>=2.4", "regex>=2025"], {}, wheels)
    assert any(p.startswith("torch>=2.4: the image has nothing; carried: none") for p in plan.problems)
    assert any("regex" in p and "not for this Python" in p for p in plan.problems)
    # An image package kept as it is, whose own requirement the carried version breaks: a warning names both.
    requires = {"sentence-transformers": ["transformers<5.20"]}
    plan = gc.plan_packages(
        ["transformers>=5.22", "sentence-transformers"],
        {"transformers": "5.17.0", "sentence-transformers": "6.0.1"},
        wheels,
        installed_requires=lambda name: requires.get(name, []),
    )
    assert list(plan.carried) == ["transformers"]
    assert plan.warnings == ["the image's sentence-transformers wants transformers<5.20, the run uses 5.24.0"]


def test_carried_wheels_unpack_onto_a_path_and_a_folder_of_two_versions_is_refused(tmp_path, wheels):
    gc.unpack([wheels["peft"], wheels["accelerate"]], tmp_path / "site")
    assert (tmp_path / "site" / "peft" / "__init__.py").read_text() == "__version__ = '0.21.2'\n"
    make_wheel(tmp_path / "wheels", "peft", "0.22.0")
    with pytest.raises(ValueError, match="two wheels of peft"):
        gc.read_wheels(tmp_path / "wheels")


def test_project_requirements_come_from_pyproject():
    requirements = gc.project_requirements()
    assert any(r.startswith("peft>=0.21") for r in requirements) and "triton>=3.2" in requirements


# ---------------------------------------------------------------------------------------------- the stage loop

KERNELS_JSON = {
    "environment": {
        "gpu": "Test GPU",
        "torch": "2.11.0",
        "triton": "3.6.0",
        "cuda": "13.0",
        "dtype": "bf16",
        "d_in": 4096,
        "d_out": 4096,
        "rank": 16,
        "clusters": 1,
        "bundle_adapters": 1000,
        "preset": "gpu-check",
        "graphs": True,
        "iters": 50,
    },
    "rows": [
        {"phase": "decode", "tokens": 1024, "distinct_adapters": 1000, "method": m, "ms_eager": 9.0, "ms_graph": ms}
        for m, ms in {
            **{"mm": 1.0, "single": 0.5, "per_adapter": 1.1, "jd_full": 0.55, "jd_diag": 0.5},
            **{"layer_single": 1.5, "layer_jd_full": 1.6, "layer_fold_full": 1.4},
        }.items()
    ],
}
SERVING_ROW = {
    "method": "JD-LoRA adapter_ids",
    "resident": 1000,
    "distinct_in_batch": 64,
    "decode_tokens_per_s": 900.0,
    "prefill_tokens_per_s": 5000.0,
    "decode_vs_base": 0.97,
    "prefill_vs_base": 0.99,
    "adapter_bytes": 2**20,
}
SERVING_JSON = {
    "machine": "Test GPU",
    "device": "cuda",
    "dtype": "torch.bfloat16",
    "args": {
        "dtype": "bfloat16",
        "model": "llama-4096",
        "layers": 8,
        "batch": 64,
        "prompt_len": 32,
        "new_tokens": 16,
        "rank": 16,
        "repeats": 3,
    },
    "rows": [
        SERVING_ROW,
        {**SERVING_ROW, "method": "PEFT adapter_names", "resident": 64, "decode_tokens_per_s": 60.0},
    ],
}
# Each fake stage gets the path of its JSON as argv[1].
FAKE_STAGES = {
    "kernels": f"import json, sys; json.dump({KERNELS_JSON!r}, open(sys.argv[1], 'w'))",
    # Writes what it measured so far, then overruns its budget.
    "serving": f"import json, sys, time; json.dump({SERVING_JSON!r}, open(sys.argv[1], 'w')); time.sleep(600)",
    "checks": "import sys; print('a check failed'); sys.exit(1)",
    "tests": "print('never runs')",
    "tune": "import json, sys; json.dump({'rows': [], 'complete': True}, open(sys.argv[1], 'w'))",
}


def result_files(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())


def test_a_failing_or_overrunning_stage_does_not_stop_the_others(tmp_path, monkeypatch):
    stages = (
        gc.Stage("kernels", 60, 1, "writes its numbers"),
        gc.Stage("serving", 2, 1, "overruns its 2 s"),
        gc.Stage("checks", 60, 1, "fails"),
        gc.Stage("tests", 60, 30, "needs more time than the run has"),
        gc.Stage("tune", None, 1, "takes what is left"),
        gc.Stage("extra", 10, 0, "cannot even start (no command for it)"),
    )
    monkeypatch.setattr(
        gc.Run, "command", lambda self, name: [sys.executable, "-c", FAKE_STAGES[name], str(self.stage_json(name))]
    )
    out = tmp_path / "results"
    run = gc.Run(gc.parse_args([str(out), "--time-limit", "20"]), stages)
    assert run.run() == 1
    results = json.loads((out / "results.json").read_text())
    status = {name: stage["status"] for name, stage in results["stages"].items()}
    assert status == {
        **{"kernels": "ok", "serving": "timeout", "checks": "failed", "tests": "skipped", "tune": "ok"},
        "extra": "failed",
    }
    assert results["stages"]["extra"]["note"] == "KeyError: 'extra'"
    assert results["stages"]["serving"]["result"]["rows"][0]["method"] == "JD-LoRA adapter_ids"  # kept at timeout
    assert results["stages"]["checks"]["rc"] == 1 and "wall_s" in results
    assert "a check failed" in (out / "logs" / "checks.log").read_text()
    assert "stopped after 2 s" in (out / "logs" / "serving.log").read_text()
    # What a device run brings back: at most 8 files, at most two folders down.
    files = result_files(out)
    assert files == [f"logs/{n}.log" for n in ("checks", "extra", "kernels", "serving", "tests", "tune")] + [
        "results.json",
        "summary.md",
    ]
    assert len(files) <= gc.MAX_RESULT_FILES and not run.work.exists()
    summary = (out / "summary.md").read_text()
    assert "| serving | timeout | " in summary and "| tests | skipped (no time left) |" in summary
    # The ratios and targets read from the kernel and serving numbers.
    row = "| decode | 1024 | 1000 | 1.0000 | 0.5000 | 1.1000 | 0.5500 | 0.5000 | – | 1.10× | 1.00× | 0.55× | 0.50× |"
    assert row + " 1.07× | 0.93× |" in summary
    assert "JD full Σ / one-LoRA shrink+expand = 1.10× (target ≤ 1.10×: met)" in summary
    assert "generate at 0.970× the base model (target ≥ 0.95×: met)" in summary
    assert "15.00× its generate tokens/s (target ≥ 10×: met)" in summary

    with pytest.raises(SystemExit, match="not empty"):
        gc.Run(gc.parse_args([str(out)]), stages).run()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(SystemExit, match="not a gpu_check result"):
        gc.Run(gc.parse_args([str(out), "--overwrite"]), stages).run()
    assert (out / "notes.txt").read_text() == "mine"


def test_the_real_run_commands_ask_for_the_issue_shapes(tmp_path):
    run = gc.Run(gc.parse_args([str(tmp_path / "r")]))
    bench = load_benchmark("kernels")
    kernels = bench.parse_args(run.command("kernels")[2:])
    assert kernels.preset == "gpu-check" and (kernels.d_in, kernels.d_out, kernels.rank) == (4096, 4096, 16)
    decode, prefill, distinct = bench.PRESETS["gpu-check"]
    assert set(decode) >= {1, 16, 64, 256} and prefill == (2048,) and distinct == (1, 64, 1000)
    serving = " ".join(run.command("serving"))
    assert "--device cuda --dtype bfloat16 --model llama-4096" in serving and "--resident 64,1000" in serving
    assert load_benchmark("serving").MODEL_SHAPES["llama-4096"]["hidden_size"] == 4096
    assert "--dry-run" not in " ".join(run.command("tests")) + " ".join(run.command("checks"))
    assert sum(s.min_s for s in gc.STAGES) < run.args.time_limit <= 360  # the issue's 6 minutes


# ---------------------------------------------------------------------------------------------- the torch stages


def test_rehearsal_of_every_torch_stage_feeds_the_summary(tmp_path, monkeypatch):
    stages = load_benchmark("gpu_check_stages")
    bench = stages.load_kernel_bench()
    probe = stages.smoke(dry_run=True)
    assert all(step["ok"] for step in probe.values()), probe

    monkeypatch.setitem(bench.PRESETS, "dry-run", ((8,), (), (1000,)))  # one decode batch, every token its adapter
    assert bench.main(["--dry-run", "--d-in", "32", "--d-out", "48", "--out", str(tmp_path / "kernels.json")]) == 0
    kernels = json.loads((tmp_path / "kernels.json").read_text())
    assert {row["method"] for row in kernels["rows"]} >= {"mm", "single", "per_adapter", "jd_full", "layer_fold_full"}
    assert all(row["rel_err"] < 3e-2 for row in kernels["rows"] if row["rel_err"] is not None)

    small = dict(d=32, r=16, N=12, batches=(("decode", 8),), clusters=(1, 2), splits=("auto", 4))
    monkeypatch.setattr(stages, "check_matrix", lambda _: small)
    checks = stages.checks(argparse.Namespace(dry_run=True, json=tmp_path / "checks.json"))
    paths = {row["path"] for row in checks["rows"]}
    assert checks["failed"] == 0 and {"tile/split=4", "row/split=auto", "diag/split=4", "dense", "fused_qkv"} <= paths

    full_list = stages.tune_variants
    monkeypatch.setattr(stages, "tune_shapes", lambda _: (("decode", 8, 8),))
    monkeypatch.setattr(stages, "tune_variants", lambda jk, small: full_list(jk, small)[:2])
    tune = stages.tune(argparse.Namespace(dry_run=True, json=tmp_path / "tune.json", deadline=None))
    assert tune["complete"] and {r["knob"] for r in tune["rows"]} == {"default", "SPLIT_K", "path", "combined"}

    serving = load_benchmark("serving")
    argv = ["serving.py", "--device", "cpu", "--model", "tiny", "--layers", "1", "--batch", "2", "--prompt-len", "3"]
    argv += ["--new-tokens", "1", "--resident", "2", "--repeats", "1", "--threads", "1", "--svd-rank", "0"]
    monkeypatch.setattr(sys, "argv", [*argv, "--out", str(tmp_path / "serving.json")])
    serving.main()
    torch.set_num_threads(1)
    serving_json = json.loads((tmp_path / "serving.json").read_text())
    methods = [row["method"] for row in serving_json["rows"]]
    assert methods == ["base model", "one LoRA", "PEFT adapter_names", "JD-LoRA adapter_ids"]

    results = {
        "dry_run": True,
        "started": "now",
        "time_limit_s": 600,
        "environment": {"packages": {"peft": {"version": "0.21.2", "source": "carried (peft.whl)"}}},
        "stages": {
            name: {"status": "ok", "seconds": 1.0, "timeout_s": 9, "log": f"logs/{name}.log", "result": result}
            for name, result in (
                ("env", {"gpu": None, "packages": {}, "smoke": probe}),
                ("kernels", kernels),
                ("serving", serving_json),
                ("checks", checks),
                ("tune", tune),
            )
        },
    }
    summary = gc.render_summary(results)
    assert "Carried wheels used: peft 0.21.2." in summary
    assert "| decode | 8 | 8 |" in summary and "Target (decode, 8 distinct adapters, T = 8)" in summary
    assert "| JD-LoRA adapter_ids | 2 | 2 |" in summary and "Against PEFT `adapter_names=` with 2 adapters" in summary
    assert f"{checks['passed']} of {checks['passed']} kernel paths within tolerance" in summary
    assert "| decode T=8 A=8 | SPLIT_K (jd_full) | 1 |" in summary


def test_junit_report_is_read_into_counts_and_failures(tmp_path):
    (tmp_path / "t.xml").write_text(
        '<testsuites><testsuite name="pytest">'
        '<testcase classname="tests.test_kernels" name="test_a"/>'
        '<testcase classname="tests.test_kernels" name="test_b"><failure message="assert 0.1 &lt; 0.03">x</failure>'
        '</testcase><testcase classname="tests.test_kernels" name="test_c"><skipped message="needs a GPU"/></testcase>'
        "</testsuite></testsuites>"
    )
    report = gc.parse_junit(tmp_path / "t.xml")
    assert (report["passed"], report["failed"], report["skipped"]) == (1, 1, 1)
    assert report["failures"] == [{"test": "tests.test_kernels::test_b", "message": "assert 0.1 < 0.03"}]
    lines = gc.tests_section(report)
    assert lines[0] == "1 passed, 1 failed, 0 errors, 1 skipped." and "- skipped (1): needs a GPU" in lines
