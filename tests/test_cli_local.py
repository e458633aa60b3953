"""The commands on local folders, run in-process through `jdlora_hub.cli.main`: convert, inspect, export, add
(projection and refit), remove, their round trips through PEFT's own LoRA, exit codes, help texts and source parsing.
"""

from __future__ import annotations

import json
import os
import shutil
from importlib.metadata import entry_points
from pathlib import Path

import pytest
import torch
from helpers import tiny_llama
from huggingface_hub import ModelCard
from jdlora_hub.cli import build_convert_parser, build_parser, convert_main, main
from jdlora_hub.errors import ExitCode, SourceError
from jdlora_hub.sources import glob_prefix, parse_source, resolve_sources
from jdlora_hub.testing.adapters import make_lora_adapter, save_base_model
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from peft_jdlora import load_bundle
from peft_jdlora.bundle import lora_factors

IDS = torch.tensor([[5, 17, 33, 2, 90, 11], [7, 7, 64, 120, 3, 9], [44, 1, 8, 100, 21, 6]])


pytestmark = pytest.mark.usefixtures("restore_process_state")  # the commands run in this process


@pytest.fixture(scope="module")
def local(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli_local")
    base = tiny_llama()
    save_base_model(base, root / "base")
    # The adapters record the base model as a local folder: the logits check finds it without --base-model.
    for name, seed, r in (("a", 11, 4), ("b", 12, 4), ("c", 13, 2), ("e", 14, 4)):
        make_lora_adapter(base, root / "adapters" / name, seed=seed, r=r, base_model_name=str(root / "base"))
    shutil.copytree(root / "adapters" / "a", root / "adapters" / "d")  # the same weights as a, under another name
    return root


def run_json(capsys, *argv: str) -> dict:
    code = main([*argv, "--json"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    return json.loads(captured.out)


def bundle_logits(folder: Path, root: Path, adapter_ids: list) -> torch.Tensor:
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(root / "base"), str(folder)).eval()
    with torch.no_grad():
        return model(input_ids=IDS[: len(adapter_ids)], adapter_ids=adapter_ids).logits


def lora_logits(folder: Path, root: Path, rows: slice) -> torch.Tensor:
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(root / "base"), str(folder)).eval()
    with torch.no_grad():
        return model(input_ids=IDS[rows]).logits


@pytest.fixture(scope="module")
def bundle(local):
    """a, b, c compressed at rank 10 = 4 + 4 + 2 (exact)."""
    out = local / "bundle"
    adapters = [str(local / "adapters" / n) for n in "abc"]
    assert main(["convert", *adapters, "--out", str(out), "--rank", "10", "--quiet"]) == 0
    return out


def test_convert_local_folders_verifies_on_the_recorded_base(local, bundle, capsys):
    data = run_json(capsys, "inspect", str(bundle))
    assert [(a["name"], a["source"], a["revision"]) for a in data["adapters"]] == [
        (n, str(local / "adapters" / n), None) for n in "abc"
    ]
    assert all(a["mean_error"] < 1e-6 for a in data["adapters"])
    check = data["summary"]["verification"]["base_model_check"]
    assert check["status"] == "ok" and check["base_model"] == str(local / "base") and check["max_effect_error"] < 1e-3
    config = json.loads((bundle / "adapter_config.json").read_text())
    assert all(len(s["sha256"]) == 64 for s in config["adapter_sources"])  # local sources: the weights' hash
    card = ModelCard.load(bundle / "README.md")
    assert card.data.library_name == "peft" and card.data.base_model is None  # a local path is not Hub metadata
    assert str(local / "base") in card.text

    assert main(["inspect", str(bundle)]) == 0
    text = capsys.readouterr().out
    assert "base model:    " + str(local / "base") in text
    assert [line.split()[1] for line in text.splitlines() if line.strip()[:1].isdigit()] == ["a", "b", "c"]


def test_export_one_and_all_round_trip_through_peft_lora(local, bundle, capsys):
    out = local / "export-b"
    data = run_json(capsys, "export", str(bundle), "--adapter", "b", "--out", str(out))
    assert data["adapters"][0]["name"] == "b" and data["adapters"][0]["folder"] == str(out)
    assert json.loads((out / "adapter_config.json").read_text())["peft_type"] == "LORA"
    assert "Adapter `b` of the JD-LoRA bundle" in (out / "README.md").read_text()
    expected = bundle_logits(bundle, local, ["a", "b"])[1:2]
    torch.testing.assert_close(lora_logits(out, local, slice(1, 2)), expected, rtol=1e-5, atol=1e-5)

    everything = local / "export-all"
    data = run_json(capsys, "export", str(bundle), "--all", "--out", str(everything))
    assert sorted(p.name for p in everything.iterdir()) == ["a", "b", "c"]
    torch.testing.assert_close(lora_logits(everything / "b", local, slice(1, 2)), expected, rtol=1e-5, atol=1e-5)

    assert main(["export", str(bundle), "--adapter", "b", "--out", str(out)]) == ExitCode.OUTPUT_EXISTS
    assert main(["export", str(bundle), "--adapter", "zz", "--out", str(local / "x")]) == ExitCode.INPUT
    assert "no adapter named 'zz'" in capsys.readouterr().err
    assert not (local / "x").exists()


def test_add_by_projection_keeps_the_bundle_and_places_the_new_adapter(local, bundle, capsys):
    out = local / "bundle-plus-d"
    data = run_json(capsys, "add", str(bundle), str(local / "adapters" / "d"), "--out", str(out))
    assert [a["name"] for a in data["adapters"]] == ["a", "b", "c", "d"] and data["added"] == ["d"]
    assert data["adapters"][3]["mean_error"] < 1e-6  # d = a lies in the basis
    assert load_bundle(out).report.per_adapter["d"].projected
    before = bundle_logits(bundle, local, ["a", "b", "c"])
    after = bundle_logits(out, local, ["a", "b", "c"])
    torch.testing.assert_close(after, before, rtol=0, atol=1e-6)  # projection leaves the others alone
    torch.testing.assert_close(bundle_logits(out, local, ["d"]), before[:1], rtol=1e-5, atol=1e-5)

    clash = main(["add", str(bundle), "a=" + str(local / "adapters" / "e"), "--out", str(local / "clash")])
    assert clash == ExitCode.INPUT and "already holds adapters named ['a']" in capsys.readouterr().err
    assert not (local / "clash").exists()


def test_add_with_refit_recompresses_from_the_recorded_sources(local, bundle, capsys):
    out = local / "bundle-refit"
    data = run_json(
        capsys, "add", str(bundle), str(local / "adapters" / "e"), "--refit", "--rank", "14", "--out", str(out)
    )
    assert [a["name"] for a in data["adapters"]] == ["a", "b", "c", "e"] and data["refit"]
    assert all(a["mean_error"] < 1e-6 for a in data["adapters"])  # 14 = 4 + 4 + 2 + 4
    assert data["verification"]["base_model_check"]["status"] == "ok"
    assert load_bundle(out).config.adapter_sources[3]["source"] == str(local / "adapters" / "e")


def test_remove_drops_adapters_and_keeps_the_others_exact(local, bundle, capsys):
    out = local / "bundle-minus-b"
    data = run_json(capsys, "remove", str(bundle), "b", "--out", str(out))
    assert [a["name"] for a in data["adapters"]] == ["a", "c"] and data["removed"] == ["b"]
    kept = bundle_logits(bundle, local, ["a", "b", "c"])
    after = bundle_logits(out, local, ["a", None, "c"])
    torch.testing.assert_close(after[[0, 2]], kept[[0, 2]], rtol=0, atol=1e-6)
    assert "b" not in load_bundle(out).report.per_adapter

    in_place = shutil.copytree(bundle, local / "in-place")
    assert main(["remove", str(in_place), "c", "--in-place", "--quiet"]) == 0
    assert load_bundle(in_place).config.adapter_names == ["a", "b"]
    assert "| c |" not in (in_place / "README.md").read_text()  # the card was refreshed

    assert main(["remove", str(bundle), "zz", "--out", str(local / "y")]) == ExitCode.INPUT
    assert main(["remove", str(bundle), "a", "b", "c", "--out", str(local / "y")]) == ExitCode.USAGE
    assert not (local / "y").exists()


def test_logits_check_failure_writes_nothing(local, capsys):
    out = local / "strict"
    adapters = [str(local / "adapters" / n) for n in "ab"]
    code = main(["convert", *adapters, "--out", str(out), "--rank", "8", "--max-logit-error", "1e-12", "--json"])
    captured = capsys.readouterr()
    assert code == ExitCode.VERIFICATION
    assert json.loads(captured.out)["exit_code"] == ExitCode.VERIFICATION
    assert "--max-logit-error" in captured.err and "Traceback" not in captured.err
    assert not out.exists() and not [p for p in local.iterdir() if p.name.startswith(".strict")]


@pytest.mark.parametrize(
    ("argv", "fragment"),
    [
        (["convert", "./a", "--out", "o", "--clusters", "auto"], "--clusters auto chooses"),
        (
            ["convert", "./a", "--out", "o", "--target-error", "0.1", "--rank", "8"],
            "--target-error is used with --clusters auto",
        ),
        (["convert", "./a", "--out", "o", "--budget", "16y"], "--budget"),
        (["convert", "./a", "--out", "o", "--budget", "16x", "--rank", "8"], "--budget chooses ranks"),
        (["convert", "./a", "--out", "o", "--budget", "auto"], "--budget auto picks the smallest bundle meeting"),
        (["convert", "./a", "--out", "o", "--every-adapter"], "--every-adapter applies to --budget auto"),
        (["convert", "./a", "--out", "o", "--rank", "4", "--tol", "0"], "--tol must be a number > 0, got 0.0"),
        (["convert", "./a", "--out", "o", "--device", "cuda 1"], "--device must name a device"),
        (["add", "bundle", "./a", "--refit", "--clusters", "auto", "--out", "o"], "--clusters auto chooses"),
        (["convert", "org/a", "--out", "o", "--push", "not a repo"], "--push expects a Hub repo id"),
        (["remove", "org/bundle", "a", "--in-place"], "--in-place needs a local bundle folder"),
        (["export", "bundle", "--out", "o"], "--adapter NAME"),
    ],
)
def test_usage_errors(argv, fragment, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "a").mkdir()
    assert main(argv) == ExitCode.USAGE
    err = capsys.readouterr().err
    assert fragment in err and len(err.strip().splitlines()) == 1 and not (tmp_path / "o").exists()


@pytest.mark.parametrize("error", [ValueError, TypeError])
@pytest.mark.parametrize("command", ["convert", "refit"])
def test_a_bug_inside_compress_is_an_internal_error(local, bundle, capsys, monkeypatch, error, command):
    """A ValueError or TypeError from a bug inside the engine is no usage error (exit 2 is for settings, through
    CompressionSettingsError only): it is an internal error with the hint to its traceback, and nothing is written."""
    from peft_jdlora.compression.engine import Engine

    def broken(self, *args, **kwargs):
        raise error("a bug inside compress")

    monkeypatch.setattr(Engine, "run", broken)
    out = local / f"bug-{command}"
    if command == "convert":
        argv = ["convert", *(str(local / "adapters" / n) for n in "ab"), "--rank", "4"]
    else:
        argv = ["add", str(bundle), str(local / "adapters" / "e"), "--refit"]
    code = main([*argv, "--out", str(out), "--no-base-check", "--quiet"])
    err = capsys.readouterr().err
    assert code == ExitCode.INTERNAL
    assert f"internal error: {error.__name__}: a bug inside compress (set JDLORA_DEBUG=1 for the traceback)" in err
    assert not out.exists()


def test_a_budget_below_the_collections_smallest_bundle_is_a_usage_error(local, capsys):
    """A setting only the collection can refuse (the budget's floor) is a usage error naming the option."""
    out = local / "tiny-budget"
    code = main(["convert", *(str(local / "adapters" / n) for n in "ab"), "--budget", "100", "--out", str(out)])
    err = capsys.readouterr().err
    assert code == ExitCode.USAGE
    assert "error: the --budget (25 floats = 100 bytes in float32) is below the smallest bundle" in err
    assert not out.exists()


def test_missing_local_source(tmp_path, capsys):
    assert convert_main([str(tmp_path / "nope"), "--out", str(tmp_path / "o")]) == ExitCode.INPUT
    assert capsys.readouterr().err.strip() == f"jdlora-convert: error: local folder {tmp_path / 'nope'} does not exist."


def test_help_texts_and_console_scripts(capsys):
    for argv in (["--help"], ["convert", "--help"], ["inspect", "--help"], ["export", "--help"], ["add", "--help"],
                 ["remove", "--help"], ["push", "--help"]):  # fmt: skip
        with pytest.raises(SystemExit) as exit_info:
            main(argv)
        assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for option in ("--rank", "--sigma", "--clusters", "--max-error", "--base-model", "--push", "--refit", "--all"):
        assert option in text
    assert "exit codes: 0 ok" in build_convert_parser().format_help()
    overview = build_parser().format_help()
    assert all(f"    {command}" in overview for command in ("convert", "inspect", "export", "add", "remove", "push"))
    scripts = {ep.name: ep.value for ep in entry_points(group="console_scripts")}
    assert scripts["jdlora-convert"] == "jdlora_hub.cli:convert_main"
    assert scripts["jdlora"] == "jdlora_hub.cli:main"


def test_source_parsing_and_names(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert parse_source("org/task-a@v2").kind == "hub" and parse_source("org/task-a@v2").revision == "v2"
    assert parse_source("org/task-*", default_revision="dev").kind == "glob"
    assert parse_source("org/task-*", default_revision="dev").revision == "dev"
    assert parse_source("sql=org/sql-lora").name == "sql"
    assert glob_prefix("task-[ab]*") == "task-"
    for bad, fragment in (
        ("*/x", "only the repo name"),
        ("lonely", "needs its organisation"),
        ("./gone", "does not exist"),
    ):
        with pytest.raises(SourceError, match=fragment):
            parse_source(bad)

    base = tiny_llama()
    for run in ("x", "y"):  # two folders both called "final"
        make_lora_adapter(base, tmp_path / run / "final", seed=1, base_model_name="base")
    resolution = resolve_sources([parse_source("x/final"), parse_source("y/final"), parse_source("z=x/final")])
    assert [a.name for a in resolution.adapters] == ["x/final", "y/final"]
    assert resolution.skipped[0].reason.startswith("the same adapter as 'x/final'")


def test_base_model_selection_and_skipping_invalid_adapters(tmp_path, capsys):
    base = tiny_llama()
    make_lora_adapter(base, tmp_path / "one", seed=1, base_model_name="org/base")
    make_lora_adapter(base, tmp_path / "two", seed=2, base_model_name="org/other")
    make_lora_adapter(base, tmp_path / "dora", seed=3, base_model_name="org/base", use_dora=True)
    specs = [parse_source(str(tmp_path / n)) for n in ("one", "two")]
    with pytest.raises(SourceError, match="2 different base models"):
        resolve_sources(specs)
    kept = resolve_sources(specs, select_base="org/base")
    assert [a.name for a in kept.adapters] == ["one"] and kept.base_model == "org/base"
    assert kept.skipped[0].reason == "base model 'org/other', not 'org/base'"

    shutil.copytree(tmp_path / "one", tmp_path / "broken")
    (tmp_path / "broken" / "adapter_model.safetensors").write_bytes(b"\x00" * 16)
    argv = [str(tmp_path / n) for n in ("one", "dora", "broken")] + ["--out", str(tmp_path / "b"), "--rank", "4"]
    assert convert_main(argv) == ExitCode.INPUT
    assert "DoRA" in capsys.readouterr().err and not (tmp_path / "b").exists()
    assert convert_main([*argv, "--skip-invalid", "--json", "--no-base-check"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert [a["name"] for a in data["adapters"]] == ["one"]
    reasons = {s["source"]: s["reason"] for s in data["skipped"]}
    assert reasons[str(tmp_path / "dora")].startswith("it is a DoRA adapter")
    assert "cannot be read" in reasons[str(tmp_path / "broken")]


def test_verification_steps(local, tmp_path):
    from jdlora_hub.errors import VerificationError
    from jdlora_hub.verify import check_errors, check_reload

    from peft_jdlora.bundle import write_bundle_files
    from peft_jdlora.compression import compress, read_lora_adapter

    adapters = [read_lora_adapter(local / "adapters" / n) for n in "ab"]
    bundle = compress(adapters, rank=2, progress=False)
    engine_errors = {n: bundle.report.per_adapter[n].mean_error for n in "ab"}
    bundle.report.per_adapter.clear()  # errors missing: they are computed with evaluate()
    assert check_errors(bundle, adapters, max_error=None) == pytest.approx(engine_errors, rel=1e-6)
    assert bundle.report.overall.worst_adapter == max(engine_errors, key=engine_errors.get)
    with pytest.raises(VerificationError, match="exceed --max-error"):
        check_errors(bundle, adapters, max_error=min(engine_errors.values()) / 2)

    write_bundle_files(bundle, tmp_path)
    check_reload(bundle, tmp_path)
    bundle.modules[next(iter(bundle.modules))].sigma[0] += 1.0  # what was computed is not what was written
    with pytest.raises(VerificationError, match="reads back with different sigma"):
        check_reload(bundle, tmp_path)


# ---------------------------------------------------------------------------------------------------- no data lost


def folder_bytes(folder: Path) -> dict[str, bytes]:
    """Every file under `folder` (hidden ones included), by relative path."""
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize(
    ("command", "fragment"),
    [
        (["convert", "{a}", "{b}", "--rank", "8", "--out", "{a}", "--overwrite"], "is the source folder"),
        (["convert", "{a}", "{b}", "--rank", "8", "--out", "{adapters}", "--overwrite"], "contains the source folder"),
        (["convert", "{a}", "{b}", "--rank", "8", "--out", "{a}/bundle"], "lies inside the source folder"),
        (["convert", "{a}", "{b}", "--rank", "8", "--out", "{base}", "--overwrite"], "is the base model"),
        (["add", "{bundle}", "{e}", "--out", "{bundle}", "--overwrite"], "is the bundle being changed"),
        (["add", "{bundle}", "{e}", "--out", "{adapters}", "--overwrite"], "contains the source folder"),
        (["remove", "{bundle}", "a", "--out", "{root}", "--overwrite"], "contains the bundle being changed"),
        (["export", "{bundle}", "--all", "--out", "{root}", "--overwrite"], "contains the bundle being exported"),
    ],
)
def test_an_output_over_an_input_is_refused_and_deletes_nothing(local, bundle, capsys, command, fragment):
    where = {
        "a": local / "adapters" / "a",
        "b": local / "adapters" / "b",
        "e": local / "adapters" / "e",
        "adapters": local / "adapters",
        "base": local / "base",
        "bundle": bundle,
        "root": local,
    }
    before = {name: folder_bytes(where[name]) for name in ("adapters", "base", "bundle")}
    assert main([*(arg.format(**where) for arg in command), "--quiet"]) == ExitCode.USAGE
    err = capsys.readouterr().err
    assert fragment in err and "Choose an --out outside the inputs" in err and len(err.strip().splitlines()) == 1
    assert {name: folder_bytes(where[name]) for name in ("adapters", "base", "bundle")} == before
    assert not (local / "adapters" / "a" / "bundle").exists()


def test_in_place_replaces_only_the_bundle_files(local, bundle, capsys):
    folder = shutil.copytree(bundle, local / "in-place-with-others")
    user_files = {".git/config": b"[core]\n", ".git/HEAD": b"ref: refs/heads/main\n", "notes.txt": b"mine\n",
                  ".env": b"HF_TOKEN=hf_secret\n", "eval/results.json": b"{}\n"}  # fmt: skip
    for name, data in user_files.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(data)

    assert main(["remove", str(folder), "b", "--in-place", "--quiet"]) == 0
    assert load_bundle(folder).config.adapter_names == ["a", "c"]
    assert main(["add", str(folder), str(local / "adapters" / "e"), "--in-place", "--quiet", "--no-base-check"]) == 0
    assert load_bundle(folder).config.adapter_names == ["a", "c", "e"]
    capsys.readouterr()

    after = folder_bytes(folder)
    assert {name: after[name] for name in user_files} == user_files
    assert set(after) == set(user_files) | {"README.md", "adapter_config.json", "adapter_model.safetensors",
                                            "jdlora_report.json"}  # fmt: skip
    assert "| e |" in (folder / "README.md").read_text()
    assert not [p for p in local.iterdir() if ".tmp-" in p.name or ".old-" in p.name]


def test_in_place_swap_is_all_or_nothing(local, bundle, monkeypatch):
    from jdlora_hub import output

    folder = shutil.copytree(bundle, local / "in-place-failing")
    (folder / "notes.txt").write_text("mine")
    before = folder_bytes(folder)
    real_replace, calls = os.replace, []

    def failing_replace(src, dst):
        calls.append(Path(dst).name)
        if len(calls) == 2:  # the weights are in place, the config is not yet
            raise OSError(28, "No space left on device")
        return real_replace(src, dst)

    monkeypatch.setattr(output.os, "replace", failing_replace)
    with pytest.raises(OSError, match="No space left"):
        with output.staged_bundle_update(folder) as staging:
            for name in ("adapter_model.safetensors", "adapter_config.json", "README.md"):
                (staging / name).write_bytes(b"new " + name.encode())
    assert calls[:2] == ["adapter_model.safetensors", "adapter_config.json"]
    assert folder_bytes(folder) == before  # the weights were put back; nothing else was touched

    monkeypatch.setattr(output.os, "replace", real_replace)
    with pytest.raises(RuntimeError, match="not bundle files"):
        with output.staged_bundle_update(folder) as staging:
            (staging / "notes.txt").write_text("a command must never do this")
    assert folder_bytes(folder) == before


def test_export_prefers_adapter_names_over_indices(local, bundle, tmp_path, capsys):
    folder = tmp_path / "digits"
    sources = ["1=" + str(local / "adapters" / "a"), "0=" + str(local / "adapters" / "b")]
    assert main(["convert", *sources, "--out", str(folder), "--rank", "8", "--no-base-check", "--quiet"]) == 0
    capsys.readouterr()
    data = run_json(capsys, "export", str(folder), "--adapter", "0", "--out", str(tmp_path / "zero"))
    assert data["adapters"][0]["name"] == "0" and data["adapters"][0]["index"] == 1
    exported = load_file(tmp_path / "zero" / "adapter_model.safetensors")
    expected = lora_factors(load_bundle(folder), "0")
    for module, (a, b) in expected.items():
        torch.testing.assert_close(exported[f"base_model.model.{module}.lora_A.weight"], a, rtol=0, atol=0)
        torch.testing.assert_close(exported[f"base_model.model.{module}.lora_B.weight"], b, rtol=0, atol=0)
    # A number that names no adapter is still an index.
    data = run_json(capsys, "export", str(bundle), "--adapter", "2", "--out", str(tmp_path / "two"))
    assert data["adapters"][0]["name"] == "c"


def edited_bundle(source: Path, folder: Path, **fields) -> Path:
    """A copy of the bundle `source` with some fields of its adapter_config.json replaced."""
    shutil.copytree(source, folder)
    config = json.loads((folder / "adapter_config.json").read_text())
    config.update(fields)
    (folder / "adapter_config.json").write_text(json.dumps(config))
    return folder


@pytest.mark.parametrize(
    ("field", "value"),
    [("num_clusters", "2"), ("default_adapter", "nobody"), ("rank_pattern", ["q_proj"]), ("sigma_pattern", ["diag"])],
)
def test_a_bundle_config_with_a_bad_field_is_bad_input(bundle, tmp_path, capsys, field, value):
    folder = edited_bundle(bundle, tmp_path / "bundle", **{field: value})
    for argv in (["inspect", str(folder)], ["export", str(folder), "--all", "--out", str(tmp_path / "o")]):
        assert main([*argv, "--offline"]) == ExitCode.INPUT
        errors = [line for line in capsys.readouterr().err.splitlines() if ": error: " in line]
        assert len(errors) == 1 and field in errors[0], errors
    assert not (tmp_path / "o").exists()


def test_export_of_names_no_folder_can_hold(bundle, tmp_path, capsys):
    long_name = "task-" + "x" * 295
    folder = edited_bundle(bundle, tmp_path / "long", adapter_names=[long_name, "b", "c"])
    data = run_json(capsys, "export", str(folder), "--all", "--out", str(tmp_path / "out-long"))
    folders = {a["name"]: Path(a["folder"]).name for a in data["adapters"]}
    assert folders["b"] == "b" and len(folders[long_name]) <= 96 and folders[long_name].startswith("task-xxx")
    assert f"# {long_name}" in (tmp_path / "out-long" / folders[long_name] / "README.md").read_text()

    folder = edited_bundle(bundle, tmp_path / "nul", adapter_names=["a\x00b", "b", "c"])
    code = main(["export", str(folder), "--all", "--out", str(tmp_path / "out-nul")])
    err = capsys.readouterr().err
    assert code == ExitCode.INPUT, err  # a bundle whose config holds a NUL in a name is refused as bad input
    assert "adapter_names[0] holds control characters" in err and not (tmp_path / "out-nul").exists()


def test_inspect_escapes_terminal_control_sequences(bundle, tmp_path, capsys):
    evil = "\x1b[2J\x1b[31mred\u202egnp.exe\x07"
    config = json.loads((bundle / "adapter_config.json").read_text())
    sources = [dict(s, source=s["source"] + evil) for s in config["adapter_sources"]]
    folder = edited_bundle(bundle, tmp_path / "evil", base_model_name_or_path="base" + evil, adapter_sources=sources)
    for argv in (["inspect", str(folder)], ["inspect", str(folder), "--json"]):
        assert main(argv) == 0
        out = capsys.readouterr().out
        assert not any(c in out for c in "\x1b\x07\u202e"), out
    assert json.loads(out)["summary"]["base_model"] == "base" + evil  # --json escapes, and keeps the value
    main(["inspect", str(folder)])
    assert "base\\x1b[2J\\x1b[31mred\\u202egnp.exe\\x07" in capsys.readouterr().out

    renamed = edited_bundle(bundle, tmp_path / "evil-name", adapter_names=["a" + evil, "b", "c"])
    code = main(["inspect", str(renamed)])
    captured = capsys.readouterr()
    assert code in (ExitCode.OK, ExitCode.INPUT)  # shown escaped, or refused as a bad name (naming the field)
    assert not any(c in captured.out + captured.err for c in "\x1b\x07\u202e")


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("my task={a}", "'my task' in 'my task={a}' is not a valid adapter name (it holds ' ')"),
        ("a/b={a}", "'a/b' in 'a/b={a}' is not a valid adapter name (it holds '/')"),
        ("={a}", "'' in '={a}' is not a valid adapter name (it is empty)"),
        ("_x={a}", "'_x' in '_x={a}' is not a valid adapter name (it starts with '_')"),
        ("sql=", "nothing follows '=' in 'sql='"),
    ],
)
def test_a_bad_name_in_name_equals_source_is_named(local, tmp_path, capsys, text, fragment):
    text, fragment = (s.format(a=local / "adapters" / "a") for s in (text, fragment))
    assert convert_main([text, "--out", str(tmp_path / "o")]) == ExitCode.INPUT
    err = capsys.readouterr().err
    assert fragment in err and "does not exist" not in err
    assert not (tmp_path / "o").exists()


def test_a_folder_path_holding_an_equals_sign_is_still_a_folder(local, tmp_path, capsys):
    folder = shutil.copytree(local / "adapters" / "a", tmp_path / "lr=1e-4")
    assert convert_main([str(folder), "--out", str(tmp_path / "o"), "--rank", "4", "--no-base-check", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["adapters"][0]["name"] == "lr=1e-4"
    assert convert_main([str(tmp_path / "gone=1"), "--out", str(tmp_path / "p")]) == ExitCode.INPUT
    assert "local folder" in capsys.readouterr().err  # a missing folder is still reported as one


def test_a_source_folder_name_with_control_characters_needs_a_name(local, tmp_path, capsys):
    folder = shutil.copytree(local / "adapters" / "a", tmp_path / "x\x1b[31m")
    assert convert_main([str(folder), "--out", str(tmp_path / "o")]) == ExitCode.INPUT
    err = capsys.readouterr().err
    assert "holds control characters" in err and "NAME=SOURCE" in err and "\x1b" not in err
    assert convert_main(["x=" + str(folder), "--out", str(tmp_path / "o"), "--rank", "4", "--no-base-check"]) == 0


def test_base_model_of_another_size_is_bad_input(local, tmp_path, capsys):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    narrow = LlamaConfig(  # tiny_llama's layout at half its hidden size
        vocab_size=128, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )  # fmt: skip
    save_base_model(LlamaForCausalLM(narrow), tmp_path / "narrow")
    out = tmp_path / "o"
    argv = [str(local / "adapters" / "a"), "--out", str(out), "--rank", "4", "--base-model", str(tmp_path / "narrow")]
    assert convert_main(argv) == ExitCode.INPUT
    err = capsys.readouterr().err
    assert "does not fit the bundle" in err and "'model.layers.0.self_attn.q_proj' is 32x32" in err and "64x64" in err
    assert not out.exists() and not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]


def test_signals_raise_and_wait_while_files_are_renamed_into_place():
    import signal

    from jdlora_hub.signals import Terminated, held_signals, termination_raises

    previous = signal.getsignal(signal.SIGTERM)
    with termination_raises():
        with pytest.raises(Terminated) as raised:
            os.kill(os.getpid(), signal.SIGTERM)
            for _ in range(1000):  # the handler runs between two bytecodes of the main thread
                pass
        assert raised.value.signum == signal.SIGTERM
        steps = []
        with pytest.raises(KeyboardInterrupt):
            with held_signals():
                os.kill(os.getpid(), signal.SIGINT)
                for _ in range(1000):
                    pass
                steps.append("the block ran to its end")  # held: the signal waits for the block
        assert steps == ["the block ran to its end"]
    assert signal.getsignal(signal.SIGTERM) is previous
