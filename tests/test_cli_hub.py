"""The console scripts against a local Hub-compatible server: glob listing, pinned downloads, compression,
verification, push, loading from the Hub, offline runs from the cache, and every bad input failing cleanly.

Each command runs as a real subprocess (the installed `jdlora-convert` / `jdlora` scripts) with HF_ENDPOINT pointing at
the server started by this module and HF_HOME in a temporary folder.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from helpers import tiny_gpt2, tiny_llama
from huggingface_hub import ModelCard
from jdlora_hub.testing import LocalHub
from jdlora_hub.testing.adapters import corrupt_weights, make_lora_adapter, save_base_model
from peft import PeftModel
from transformers import AutoModelForCausalLM

from peft_jdlora import load_bundle

TOKEN = "hf_cli_hub_secret_token_123"
ADAPTERS = {"task-a": dict(seed=1, r=4), "task-b": dict(seed=2, r=4, use_rslora=True), "task-c": dict(seed=3, r=2)}
RANK = "10"  # = 4 + 4 + 2: the joint basis holds all three adapters exactly


def script(name: str) -> list[str]:
    """The installed console script, or the same entry point through the interpreter if scripts are not installed."""
    path = Path(sys.executable).parent / name
    if path.is_file():
        return [str(path)]
    entry = {"jdlora": "main", "jdlora-convert": "convert_main"}[name]
    return [sys.executable, "-c", f"import sys; from jdlora_hub.cli import {entry}; sys.exit({entry}())"]


@dataclass
class World:
    root: Path
    hub: LocalHub
    env: dict[str, str]

    def run(self, name: str, *args: str, **env: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [*script(name), *args], env={**self.env, **env}, capture_output=True, text=True, timeout=300
        )


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli_hub")
    hub = LocalHub(root / "hub", token=TOKEN, orgs=("org",)).start()
    base = tiny_llama()
    save_base_model(base, root / "base")
    hub.commit_folder("org/tiny-llama", root / "base")
    for name, kwargs in ADAPTERS.items():
        make_lora_adapter(base, root / name, base_model_name="org/tiny-llama", **kwargs)
        hub.commit_folder(f"org/{name}", root / name)
    hub.create_repo("org/task-notes")  # matched by the glob, but not an adapter
    hub.commit_files("org/task-notes", {"README.md": b"# notes\n"})
    make_lora_adapter(
        tiny_gpt2(), root / "gpt2-lora", seed=4, base_model_name="org/tiny-gpt2", target_modules=["c_attn"]
    )
    hub.commit_folder("org/gpt2-lora", root / "gpt2-lora")
    make_lora_adapter(base, root / "dora", seed=5, base_model_name="org/tiny-llama", use_dora=True)
    shutil.copytree(root / "task-a", root / "corrupt")
    corrupt_weights(root / "corrupt")
    env = {
        **os.environ,
        **hub.env(token=TOKEN),
        "HF_HOME": str(root / "hf"),
        "OMP_NUM_THREADS": "1",
        "PYTHONWARNINGS": "ignore",
    }
    env.pop("HF_HUB_CACHE", None)
    yield World(root, hub, env)
    hub.stop()


@pytest.fixture(scope="module")
def converted(world):
    """`jdlora-convert 'org/task-*' --push org/bundle`, once for the module."""
    out = world.root / "bundle"
    result = world.run(
        "jdlora-convert", "--from-hub", "org/task-*", "--out", str(out), "--rank", RANK,
        "--base-model", "org/tiny-llama", "--push", "org/bundle", "--json",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    return out, json.loads(result.stdout), result


def assert_one_line_error(result: subprocess.CompletedProcess, code: int, *fragments: str) -> str:
    assert result.returncode == code, (result.returncode, result.stderr)
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if ": error: " in line]
    assert len(errors) == 1, result.stderr
    for fragment in fragments:
        assert fragment in errors[0], errors[0]
    return errors[0]


def no_temp_leftovers(folder: Path) -> bool:
    return not [p for p in folder.iterdir() if p.name.startswith(".") and (".tmp-" in p.name or ".old-" in p.name)]


# ---------------------------------------------------------------------------------------------------- success


def test_convert_glob_pins_revisions_verifies_and_pushes_one_commit(world, converted):
    out, data, result = converted
    hub = world.hub
    assert [a["name"] for a in data["adapters"]] == ["task-a", "task-b", "task-c"]
    for row in data["adapters"]:
        assert row["source"] == f"org/{row['name']}"
        assert row["revision"] == hub.head(f"org/{row['name']}")  # pinned to the commit sha
        assert row["mean_error"] < 1e-6
    assert data["skipped"] == [{"source": "org/task-notes", "reason": "not a PEFT adapter (no adapter_config.json)"}]
    check = data["verification"]["base_model_check"]
    assert check["status"] == "ok" and check["base_model"].startswith("org/tiny-llama@")
    assert len(check["adapters"]) == 3 and check["max_effect_error"] < 1e-3
    assert TOKEN not in result.stdout + result.stderr

    # The folder: a PEFT adapter folder, the report and the model card; nothing half written beside it.
    assert sorted(p.name for p in out.iterdir()) == [
        "README.md", "adapter_config.json", "adapter_model.safetensors", "jdlora_report.json",
    ]  # fmt: skip
    assert no_temp_leftovers(out.parent)
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["peft_type"] == "JDLORA" and config["base_model_name_or_path"] == "org/tiny-llama"
    assert config["base_model_type"] == "llama"  # from the base model downloaded for the check (a fresh cache)
    assert [s["revision"] for s in config["adapter_sources"]] == [hub.head(f"org/{n}") for n in ADAPTERS]
    card = ModelCard.load(out / "README.md")
    assert card.data.library_name == "peft" and card.data.base_model == "org/tiny-llama"
    assert {"peft", "lora", "jdlora"} <= set(card.data.tags)
    for needle in ("import peft_jdlora", "adapter_ids=", "| setting | value |", hub.head("org/task-b")[:10]):
        assert needle in card.text

    # The push: exactly one commit on top of the repo's creation, holding exactly the local files.
    history = hub.commit_history("org/bundle")
    assert len(history) == 2 and data["push"]["commit"] == history[-1].sha == hub.head("org/bundle")
    remote = hub.repo_files("org/bundle")
    assert {k: v for k, v in remote.items() if k != ".gitattributes"} == {p.name: p.read_bytes() for p in out.iterdir()}
    assert all(r.authorized for r in hub.requests_to("commit", "org/bundle"))


def test_bundle_loaded_from_the_hub_gives_the_local_logits(world, converted):
    out, _, _ = converted
    ids = [[5, 17, 33, 2, 90, 11], [7, 7, 64, 120, 3, 9], [44, 1, 8, 100, 21, 6], [9, 8, 7, 6, 5, 4]]
    adapter_ids = ["task-a", "task-b", "task-c", None]
    code = (
        "import sys, torch, peft_jdlora\n"
        "from peft import PeftModel\n"
        "from transformers import AutoModelForCausalLM\n"
        "base = AutoModelForCausalLM.from_pretrained('org/tiny-llama')\n"
        "model = PeftModel.from_pretrained(base, 'org/bundle').eval()\n"
        f"ids = torch.tensor({ids})\n"
        "with torch.no_grad():\n"
        f"    logits = model(input_ids=ids, adapter_ids={adapter_ids!r}).logits\n"
        "torch.save(logits, sys.argv[1])\n"
    )
    target = world.root / "hub_logits.pt"
    result = subprocess.run(
        [sys.executable, "-c", code, str(target)], env=world.env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr
    from_hub = torch.load(target)

    base = AutoModelForCausalLM.from_pretrained(world.root / "base")
    local = PeftModel.from_pretrained(base, str(out)).eval()
    with torch.no_grad():
        expected = local(input_ids=torch.tensor(ids), adapter_ids=adapter_ids).logits
    torch.testing.assert_close(from_hub, expected, rtol=0, atol=1e-6)

    # And the bundle reproduces the original adapter under PEFT's own LoRA (the basis holds it exactly).
    lora = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(world.root / "base"), world.root / "task-b")
    with torch.no_grad():
        original = lora.eval()(input_ids=torch.tensor(ids[1:2])).logits
    torch.testing.assert_close(from_hub[1:2], original, rtol=1e-4, atol=1e-4)


def test_offline_run_uses_the_cache_only(world, converted):
    _, online, _ = converted
    before = len(world.hub.requests)
    out = world.root / "offline-bundle"
    result = world.run("jdlora-convert", "org/task-*", "--out", str(out), "--rank", RANK, "--json", HF_HUB_OFFLINE="1")
    assert result.returncode == 0, result.stderr
    assert len(world.hub.requests) == before  # not one request reached the server
    data = json.loads(result.stdout)
    assert [(a["name"], a["revision"]) for a in data["adapters"]] == [
        (a["name"], a["revision"]) for a in online["adapters"]
    ]
    # The recorded base model (org/tiny-llama) was cached by the first run: the logits check runs offline too.
    assert data["verification"]["base_model_check"]["status"] == "ok"
    pushed = world.run(
        "jdlora-convert", "org/task-a", "--out", str(world.root / "x"), "--push", "org/y", HF_HUB_OFFLINE="1"
    )
    assert_one_line_error(pushed, 2, "HF_HUB_OFFLINE")


# ---------------------------------------------------------------------------------------------------- bad inputs


def test_glob_that_matches_nothing(world):
    out = world.root / "none"
    result = world.run("jdlora-convert", "org/nothing-*", "--out", str(out))
    assert_one_line_error(result, 3, "'org/nothing-*' matches no model of 'org'", "org/task-a")
    assert not out.exists()


def test_adapters_of_two_base_models(world):
    out = world.root / "mixed"
    result = world.run("jdlora-convert", "org/*", "--out", str(out))
    assert_one_line_error(result, 3, "2 different base models", "'org/tiny-gpt2' (1: gpt2-lora)", "--select-base")
    assert not out.exists()


def test_corrupt_safetensors_file(world):
    out = world.root / "from-corrupt"
    result = world.run("jdlora-convert", str(world.root / "task-a"), str(world.root / "corrupt"), "--out", str(out))
    assert_one_line_error(result, 3, "adapter 'corrupt'", "adapter_model.safetensors cannot be read")
    assert not out.exists() and no_temp_leftovers(world.root)


def test_dora_adapter(world):
    out = world.root / "from-dora"
    result = world.run("jdlora-convert", str(world.root / "task-a"), str(world.root / "dora"), "--out", str(out))
    assert_one_line_error(result, 3, "DoRA")
    assert not out.exists()


def test_existing_output_folder_is_refused(world):
    out = world.root / "existing"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    result = world.run("jdlora-convert", "org/task-a", "--out", str(out))
    assert_one_line_error(result, 4, "already exists", "--overwrite")
    assert [p.name for p in out.iterdir()] == ["keep.txt"] and (out / "keep.txt").read_text() == "mine"


def test_failed_verification_writes_and_pushes_nothing(world):
    out = world.root / "too-lossy"
    result = world.run(
        "jdlora-convert", "org/task-*", "--out", str(out), "--rank", "1", "--max-error", "1e-6",
        "--push", "org/too-lossy", "--no-base-check", "--quiet",
    )  # fmt: skip
    assert_one_line_error(result, 5, "exceed --max-error")
    assert len(result.stderr.strip().splitlines()) == 1  # --quiet: no progress bars, no log lines
    assert not out.exists() and no_temp_leftovers(world.root)
    assert world.hub.head("org/too-lossy") is None


def test_failed_upload_midway_leaves_the_remote_repo_unchanged(world, converted):
    hub = world.hub
    head, files = hub.head("org/bundle"), hub.repo_files("org/bundle")
    hub.fail_next("commit", disconnect=True, repo_id="org/bundle")  # the connection drops while the commit uploads
    out = world.root / "second-bundle"
    sha_a = hub.head("org/task-a")
    hub.commit_files("org/task-a", {"notes.txt": b"a later commit on main"})  # the pinned sha is no longer main
    result = world.run(
        "jdlora-convert", f"org/task-a@{sha_a}", "org/task-b", "--revision", "main", "--out", str(out),
        "--rank", "8", "--push", "org/bundle", "--no-base-check",
    )  # fmt: skip
    assert_one_line_error(result, 6, "pushing to Hub repo org/bundle failed", "org/bundle is unchanged")
    assert hub.head("org/bundle") == head and hub.repo_files("org/bundle") == files
    assert len(hub.requests_to("commit", "org/bundle")) == 2  # the first push, and this one (not retried)
    assert TOKEN not in result.stdout + result.stderr
    # The local bundle was verified and written before the push (`jdlora push` can retry it: test_hub_push.py).
    local = load_bundle(out)
    assert local.config.adapter_names == ["task-a", "task-b"] and (out / "README.md").is_file()
    sources = local.config.adapter_sources
    assert sources[0]["revision"] == sha_a != hub.head("org/task-a")
    assert sources[1]["revision"] == hub.head("org/task-b") and sources[1]["requested_revision"] == "main"


# ---------------------------------------------------------------------------------------------------- interrupted


def temp_entries(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if ".tmp-" in p.name or ".old-" in p.name)


@pytest.mark.parametrize(
    ("signum", "code", "message", "in_place"),
    [
        (signal.SIGTERM, 143, "terminated by SIGTERM", False),
        (signal.SIGINT, 130, "interrupted", False),
        (signal.SIGTERM, 143, "terminated by SIGTERM", True),
    ],
)
def test_a_signal_during_verification_leaves_nothing_behind(
    world, converted, tmp_path, signum, code, message, in_place
):
    """The process is stopped while it verifies the written bundle (the base model's Hub request is held): the
    temporary folder goes away, no output appears, an in-place bundle stays exactly as it was."""
    if in_place:
        folder = shutil.copytree(converted[0], tmp_path / "bundle")
        (folder / "notes.txt").write_text("mine")
        make_lora_adapter(tiny_llama(), tmp_path / "task-d", seed=6, base_model_name="org/tiny-llama")
        argv = ["add", str(folder), str(tmp_path / "task-d"), "--in-place"]
        before = {p.name: p.read_bytes() for p in folder.iterdir()}
        staging = folder
    else:
        folder = tmp_path / "out"
        argv = ["convert", str(world.root / "task-a"), str(world.root / "task-b"), "--out", str(folder), "--rank", "8"]
        staging = tmp_path
    hold = world.hub.hold_next("model_info", repo_id="org/tiny-llama")
    proc = subprocess.Popen(
        [*script("jdlora"), *argv, "--base-model", "org/tiny-llama"],
        env=world.env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert hold.reached.wait(240), "the command never asked for the base model"
        assert temp_entries(staging), "the command should be writing its temporary folder now"
        proc.send_signal(signum)
    finally:
        hold.release()
        _, stderr = proc.communicate(timeout=240)
    assert proc.returncode == code, stderr
    assert stderr.strip().splitlines()[-1] == f"jdlora: {message}." and "Traceback" not in stderr
    assert temp_entries(staging) == [] and temp_entries(tmp_path) == []
    if in_place:
        assert {p.name: p.read_bytes() for p in folder.iterdir()} == before
    else:
        assert not folder.exists()


# ---------------------------------------------------------------------------------------------------- published


def test_push_publishes_no_local_paths(world, tmp_path):
    """Adapters from local folders, verified on a local base model: the pushed config, report and card name them as
    <local>/NAME; the local bundle keeps the full paths."""
    base = tiny_llama()
    for name, seed in (("local-a", 7), ("local-b", 8)):
        make_lora_adapter(base, tmp_path / name, seed=seed, base_model_name=str(world.root / "base"))
    out = tmp_path / "bundle"
    result = world.run(
        "jdlora-convert", str(tmp_path / "local-a"), str(tmp_path / "local-b"), "--out", str(out), "--rank", "8",
        "--push", "org/from-local", "--json",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["verification"]["base_model_check"]["status"] == "ok"
    remote = world.hub.repo_files("org/from-local")
    assert set(remote) == {".gitattributes", *(p.name for p in out.iterdir())}
    for name in ("adapter_config.json", "jdlora_report.json", "README.md"):
        assert str(tmp_path).encode() not in remote[name] and str(world.root).encode() not in remote[name], name
        assert str(tmp_path).encode() in (out / name).read_bytes() or name == "jdlora_report.json"
    config = json.loads(remote["adapter_config.json"])
    assert config["base_model_name_or_path"] == "<local>/base"
    assert [s["source"] for s in config["adapter_sources"]] == ["<local>/local-a", "<local>/local-b"]
    report = json.loads(remote["jdlora_report.json"])
    assert report["verification"]["base_model_check"]["base_model"] == "<local>/base"
    assert "Local paths were not published" in remote["README.md"].decode()
