"""The local Hub-compatible test server, driven by huggingface_hub's own client (in-process, explicit endpoint)."""

from __future__ import annotations

import pytest
from huggingface_hub import (
    CommitOperationAdd,
    CommitOperationDelete,
    HfApi,
    constants,
    hf_hub_download,
    snapshot_download,
)
from huggingface_hub.errors import (
    EntryNotFoundError,
    HfHubHTTPError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from jdlora_hub.testing import LocalHub

TOKEN = "hf_server_test_token"


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    with LocalHub(tmp_path_factory.mktemp("hub"), token=TOKEN, orgs=("org",)) as server:
        yield server


@pytest.fixture
def api(hub, monkeypatch):
    # tests/conftest.py turns the Hub off for the whole suite; these tests talk to the local server only.
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    return HfApi(endpoint=hub.url, token=TOKEN)


def test_listing_info_and_downloads(hub, api, tmp_path):
    hub.create_repo("org/alpha")
    hub.commit_files("org/alpha", {"config.json": b'{"a": 1}', "sub/w.bin": b"\x00\x01"})
    hub.create_repo("org/beta")
    hub.create_repo("other/gamma")

    ids = [m.id for m in api.list_models(author="org")]
    assert "org/alpha" in ids and "org/beta" in ids and "other/gamma" not in ids
    assert [m.id for m in api.list_models(author="org", search="alp")] == ["org/alpha"]

    info = api.model_info("org/alpha")
    assert info.sha == hub.head("org/alpha")
    assert sorted(s.rfilename for s in info.siblings) == [".gitattributes", "config.json", "sub/w.bin"]

    folder = snapshot_download("org/alpha", revision=info.sha, cache_dir=tmp_path, endpoint=hub.url, token=TOKEN)
    assert (tmp_path / "models--org--alpha" / "snapshots" / info.sha).samefile(folder)
    assert open(f"{folder}/sub/w.bin", "rb").read() == b"\x00\x01"
    path = hf_hub_download("org/alpha", "config.json", cache_dir=tmp_path, endpoint=hub.url, token=TOKEN)
    assert open(path).read() == '{"a": 1}'

    with pytest.raises(RepositoryNotFoundError):
        api.model_info("org/missing")
    with pytest.raises(RevisionNotFoundError):
        api.model_info("org/alpha", revision="no-such-branch")
    with pytest.raises(EntryNotFoundError):
        hf_hub_download("org/alpha", "nope.json", cache_dir=tmp_path, endpoint=hub.url, token=TOKEN)


def test_commits_are_single_and_atomic(hub, api):
    api.create_repo("org/commits")
    api.create_repo("org/commits", exist_ok=True)  # the Hub answers 409 with the repo's url
    before = len(hub.commit_history("org/commits"))
    info = api.create_commit(
        "org/commits",
        [CommitOperationAdd("README.md", b"---\ntags: [x]\n---\nhello"), CommitOperationAdd("a.bin", b"\x00" * 100)],
        commit_message="two files",
    )
    assert info.oid == hub.head("org/commits")
    assert len(hub.commit_history("org/commits")) == before + 1
    assert hub.repo_files("org/commits")["a.bin"] == b"\x00" * 100

    head = hub.head("org/commits")
    api.create_commit("org/commits", [CommitOperationDelete("a.bin")], commit_message="rm", parent_commit=head)
    assert "a.bin" not in hub.repo_files("org/commits")

    # A stale parent commit is refused (412), and so is a README with broken YAML front matter: nothing changes.
    head = hub.head("org/commits")
    with pytest.raises(HfHubHTTPError) as err:
        api.create_commit("org/commits", [CommitOperationAdd("b", b"b")], commit_message="x", parent_commit=info.oid)
    assert err.value.response.status_code == 412
    with pytest.raises(ValueError, match="Invalid metadata in README"):
        api.create_commit("org/commits", [CommitOperationAdd("README.md", b"---\n: [\n---\n")], commit_message="x")
    assert hub.head("org/commits") == head


def test_upload_folder_is_one_commit(hub, api, tmp_path):
    for name in ("adapter_config.json", "adapter_model.safetensors", "README.md"):
        (tmp_path / name).write_text(name)
    api.create_repo("org/folder", exist_ok=True)
    before = len(hub.commit_history("org/folder"))
    api.upload_folder(repo_id="org/folder", folder_path=tmp_path)
    assert len(hub.commit_history("org/folder")) == before + 1
    assert set(hub.repo_files("org/folder")) == {
        ".gitattributes",
        "adapter_config.json",
        "adapter_model.safetensors",
        "README.md",
    }


@pytest.mark.parametrize("disconnect", [False, True])
def test_injected_commit_failure_changes_nothing(hub, api, disconnect):
    repo_id = f"org/fragile-{disconnect}"
    hub.create_repo(repo_id)
    head = hub.head(repo_id)
    hub.fail_next("commit", disconnect=disconnect, repo_id=repo_id)
    with pytest.raises(Exception) as err:
        api.create_commit(repo_id, [CommitOperationAdd("x.bin", b"x" * 4096)], commit_message="fails")
    if not disconnect:
        assert isinstance(err.value, HfHubHTTPError) and err.value.response.status_code == 500
    assert hub.head(repo_id) == head
    assert "x.bin" not in hub.repo_files(repo_id)
    api.create_commit(repo_id, [CommitOperationAdd("x.bin", b"x")], commit_message="works")  # failures are one-shot
    assert hub.repo_files(repo_id)["x.bin"] == b"x"


def test_writes_need_the_token(hub, monkeypatch):
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    with pytest.raises(HfHubHTTPError) as err:
        HfApi(endpoint=hub.url, token="hf_wrong").create_repo("org/denied")
    assert err.value.response.status_code == 401
    with pytest.raises(HfHubHTTPError):
        HfApi(endpoint=hub.url, token=TOKEN).create_repo("someone-else/denied")
    assert hub.head("org/denied") is None and hub.head("someone-else/denied") is None
