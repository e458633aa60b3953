"""Pushing and reading bundles on a local Hub-compatible server, in-process (huggingface_hub pointed at the server by
patching its endpoint constants): one-commit pushes, rollback of a repo created for a failed push, stale files,
push preconditions, `jdlora push` and `jdlora inspect` of a Hub bundle."""

from __future__ import annotations

import json
import shutil

import pytest
from helpers import random_bundle, tiny_llama
from huggingface_hub import constants
from jdlora_hub.cli import main
from jdlora_hub.errors import ExitCode, HubOperationError, SourceError, UsageError
from jdlora_hub.pipeline import OutputOptions, VerifyOptions, _write_verified
from jdlora_hub.push import check_push_target, push_bundle
from jdlora_hub.sources import HubClient
from jdlora_hub.testing import LocalHub

TOKEN = "hf_in_process_token_456"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with LocalHub(tmp_path_factory.mktemp("push-hub"), token=TOKEN, orgs=("org",)) as hub:
        yield hub


@pytest.fixture
def hub(server, monkeypatch, tmp_path):
    """The server, with huggingface_hub in this process talking to it (and caching under tmp_path)."""
    monkeypatch.setattr(constants, "ENDPOINT", server.url)
    monkeypatch.setattr(
        constants, "HUGGINGFACE_CO_URL_TEMPLATE", server.url + "/{repo_id}/resolve/{revision}/{filename}"
    )
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    server.clear_failures()
    return server


@pytest.fixture(scope="module")
def bundle_folder(tmp_path_factory):
    """A bundle folder written the way the commands write one (files, report, model card)."""
    bundle = random_bundle(tiny_llama(), num_adapters=3, r=4)
    bundle.report = {"method": "jd-full", "per_adapter": {n: {"mean_error": 0.01} for n in bundle.config.adapter_names}}
    out = tmp_path_factory.mktemp("push-bundle") / "bundle"
    _write_verified(
        bundle,
        OutputOptions(out=out),
        VerifyOptions(base_check=False),
        originals={},
        recorded_base=None,
        hub=HubClient,
        log=lambda m: None,
    )
    return out


def test_push_creates_the_repo_and_makes_one_commit(hub, bundle_folder):
    result = push_bundle(bundle_folder, "org/fresh")
    assert result.created and result.commit == hub.head("org/fresh")
    assert len(hub.commit_history("org/fresh")) == 2  # the repo's creation, then the whole bundle at once
    files = hub.repo_files("org/fresh")
    assert set(files) == {
        ".gitattributes",
        "README.md",
        "adapter_config.json",
        "adapter_model.safetensors",
        "jdlora_report.json",
    }
    assert files["adapter_model.safetensors"] == (bundle_folder / "adapter_model.safetensors").read_bytes()


def test_push_replaces_stale_bundle_files_and_keeps_others(hub, bundle_folder):
    hub.create_repo("org/stale")
    hub.commit_files("org/stale", {"adapter_model.bin": b"old weights", "notes.txt": b"keep me"})
    push_bundle(bundle_folder, "org/stale")
    files = hub.repo_files("org/stale")
    assert "adapter_model.bin" not in files  # would shadow nothing, but confuses loaders and readers
    assert files["notes.txt"] == b"keep me"
    assert len(hub.commit_history("org/stale")) == 3


def test_failed_push_to_a_new_repo_deletes_it_again(hub, bundle_folder):
    hub.fail_next("commit", status=500, repo_id="org/never")
    with pytest.raises(HubOperationError, match="the repo created for this push was deleted again") as err:
        push_bundle(bundle_folder, "org/never")
    assert err.value.exit_code == ExitCode.HUB
    assert hub.head("org/never") is None


def test_failed_push_to_an_existing_repo_leaves_it_unchanged(hub, bundle_folder, tmp_path):
    push_bundle(bundle_folder, "org/kept")
    head, files = hub.head("org/kept"), hub.repo_files("org/kept")
    assert push_bundle(bundle_folder, "org/kept").commit == head  # same files: nothing to commit
    changed = shutil.copytree(bundle_folder, tmp_path / "changed")
    (changed / "README.md").write_text((changed / "README.md").read_text() + "\nA new line.\n")
    hub.fail_next("commit", status=503, repo_id="org/kept")
    with pytest.raises(HubOperationError, match=r"HTTP 503.*org/kept is unchanged"):
        push_bundle(changed, "org/kept")
    assert hub.head("org/kept") == head and hub.repo_files("org/kept") == files


def test_push_preconditions(hub, monkeypatch):
    with pytest.raises(UsageError, match="ORG/NAME"):
        check_push_target("not a repo id")
    with pytest.raises(UsageError, match="cannot write to 'someone-else'"):
        check_push_target("someone-else/bundle")
    check_push_target("org/bundle")
    monkeypatch.delenv("HF_TOKEN")
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", "/nonexistent/token")
    with pytest.raises(UsageError, match="needs a Hugging Face token"):
        check_push_target("org/bundle")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(UsageError, match="HF_HUB_OFFLINE"):
        check_push_target("org/bundle")


def test_jdlora_push_and_inspect_a_hub_bundle(hub, bundle_folder, capsys):
    assert main(["push", str(bundle_folder), "org/inspected", "--json"]) == 0
    pushed = json.loads(capsys.readouterr().out)["push"]
    assert pushed["commit"] == hub.head("org/inspected") and pushed["created"]

    assert main(["inspect", "org/inspected", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["bundle"] == {"type": "hub", "source": "org/inspected", "revision": hub.head("org/inspected")}
    assert [a["name"] for a in data["adapters"]] == ["task_00", "task_01", "task_02"]
    assert data["summary"]["rank"] == 4 and data["summary"]["modules"] == 4

    assert main(["inspect", "org/missing-bundle"]) == ExitCode.INPUT
    assert "Hub repo org/missing-bundle does not exist" in capsys.readouterr().err
    assert main(["inspect", "org/inspected@no-such-branch"]) == ExitCode.INPUT
    assert "revision 'no-such-branch' does not exist" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------- only the bundle


def with_user_files(bundle_folder, folder, files: dict[str, bytes]):
    folder = shutil.copytree(bundle_folder, folder)
    for name, data in files.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(data)
    return folder


BUNDLE_FILES = {"README.md", "adapter_config.json", "adapter_model.safetensors", "jdlora_report.json"}


def test_the_hub_tools_name_the_bundle_files_as_the_library_does():
    # jdlora_hub keeps its own copy of the names (its commands parse arguments without importing torch).
    from jdlora_hub import output

    from peft_jdlora import bundle

    for name in ("CONFIG_NAME", "WEIGHTS_NAME", "PICKLED_WEIGHTS_NAME", "REPORT_NAME", "CARD_NAME", "BUNDLE_FILES"):
        assert getattr(output, name) == getattr(bundle, name), name
    assert set(output.BUNDLE_FILES) == BUNDLE_FILES


def test_push_uploads_only_the_bundle_files(hub, bundle_folder, tmp_path, capsys):
    secret = f"HF_TOKEN={TOKEN}\n".encode()
    folder = with_user_files(
        bundle_folder, tmp_path / "b", {".env": secret, "notes.txt": b"mine", "eval/run.json": b"{}", "x.bin": b"p"}
    )
    assert main(["push", str(folder), "org/only-bundle"]) == 0
    err = capsys.readouterr().err
    assert "not pushed (not part of the bundle): .env, eval/, notes.txt, x.bin" in err
    remote = hub.repo_files("org/only-bundle")
    assert set(remote) == BUNDLE_FILES | {".gitattributes"}
    assert all(TOKEN.encode() not in data for data in remote.values())
    assert {n: remote[n] for n in BUNDLE_FILES} == {n: (folder / n).read_bytes() for n in BUNDLE_FILES}


def test_push_of_a_git_checkout_makes_one_commit(hub, bundle_folder, tmp_path, capsys):
    folder = with_user_files(bundle_folder, tmp_path / "b", {".git/config": b"[core]\n", ".git/HEAD": b"ref: main\n"})
    assert main(["push", str(folder), "org/from-git", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["push"]["commit"] == hub.head("org/from-git")
    assert set(hub.repo_files("org/from-git")) == BUNDLE_FILES | {".gitattributes"}
    assert len(hub.commit_history("org/from-git")) == 2


def test_a_folder_that_cannot_be_pushed_creates_no_repo(hub, bundle_folder, tmp_path):
    folder = with_user_files(bundle_folder, tmp_path / "b", {})
    (folder / "adapter_model.safetensors").unlink()
    with pytest.raises(SourceError, match=r"has no adapter_model\.safetensors"):
        push_bundle(folder, "org/not-created")
    assert hub.head("org/not-created") is None and not hub.requests_to("preupload", "org/not-created")


@pytest.mark.parametrize("failure", [RuntimeError("a bug after the repo was created"), KeyboardInterrupt()])
def test_any_failure_after_creating_the_repo_deletes_it_again(hub, bundle_folder, monkeypatch, failure):
    from huggingface_hub import HfApi

    def create_commit(self, *args, **kwargs):
        raise failure

    monkeypatch.setattr(HfApi, "create_commit", create_commit)
    created = len(hub.requests_to("create_repo"))
    with pytest.raises(type(failure)):
        push_bundle(bundle_folder, "org/rolled-back")
    assert len(hub.requests_to("create_repo")) == created + 1  # the repo was created, then deleted again
    assert hub.head("org/rolled-back") is None


def test_pushed_files_hold_no_local_paths(hub, bundle_folder, tmp_path, capsys):
    """A bundle built from local folders names them in its config, report and card; a push publishes `<local>/NAME`
    instead, and says so in the card, while the local folder keeps the paths (`--refit` re-reads them)."""
    from jdlora_hub.card import bundle_card
    from jdlora_hub.pipeline import _original_sources

    from peft_jdlora import load_bundle

    folder = shutil.copytree(bundle_folder, tmp_path / "b")
    home = "/home/alice/projects/secret-client"
    config = json.loads((folder / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = f"{home}/base"
    config["adapter_sources"] = [
        {"type": "local", "source": f"{home}/loras/{name}", "revision": None, "sha256": "ab" * 32, "base_model": None}
        for name in config["adapter_names"]
    ]
    (folder / "adapter_config.json").write_text(json.dumps(config))
    report = json.loads((folder / "jdlora_report.json").read_text())
    report["verification"] = {"base_model_check": {"status": "skipped", "base_model": f"{home}/base",
                                                   "reason": f"'{home}/base' is not a local folder"}}  # fmt: skip
    (folder / "jdlora_report.json").write_text(json.dumps(report))
    bundle = load_bundle(folder)
    card = bundle_card(bundle.config, bundle.report, title="b")  # the card names the sources and the base model
    assert f"{home}/loras/task_00" in card and f'from_pretrained("{home}/base")' in card
    (folder / "README.md").write_text(card)

    assert main(["push", str(folder), "org/redacted"]) == 0
    assert "local paths published as <local>/NAME" in capsys.readouterr().err
    remote = hub.repo_files("org/redacted")
    for name in ("adapter_config.json", "jdlora_report.json", "README.md"):
        assert b"/home/alice" not in remote[name] and b"<local>/" in remote[name], name
    pushed = json.loads(remote["adapter_config.json"])
    assert pushed["base_model_name_or_path"] == "<local>/base"
    assert [s["source"] for s in pushed["adapter_sources"]] == [f"<local>/{n}" for n in config["adapter_names"]]
    assert pushed["adapter_sources"][0]["sha256"] == "ab" * 32
    assert "Local paths were not published" in remote["README.md"].decode()
    assert "| <local>/task_00 |" in remote["README.md"].decode()
    assert remote["adapter_model.safetensors"] == (folder / "adapter_model.safetensors").read_bytes()
    assert json.loads((folder / "adapter_config.json").read_text()) == config  # the local folder keeps its paths

    downloaded = tmp_path / "downloaded"
    downloaded.mkdir()
    for name, data in remote.items():
        (downloaded / name).write_bytes(data)
    with pytest.raises(SourceError, match="its path is not published"):
        _original_sources(load_bundle(downloaded), HubClient)
