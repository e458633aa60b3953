"""Pushing a bundle folder to the Hub as one commit.

`HfApi.upload_folder` becomes a streamed multi-commit upload when `hf_xet` is installed (huggingface_hub >= 1.x), so
the push goes through `HfApi.create_commit` with one `CommitOperationAdd` per file: one commit by construction, which
the Hub applies completely or not at all. The commit is made against the sha the repo had when the push started
(`parent_commit`), so a concurrent push is refused instead of silently interleaved. If the repo was created for this
push and the commit fails, the empty repo is deleted again: a failed push leaves the Hub as it was.

The token is only ever handed to huggingface_hub; messages name the repo and the user, never the token.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from .errors import HubOperationError, UsageError
from .sources import hub_errors

# Files a bundle consists of: a stale copy of one of these in the repo (e.g. an old .bin) would confuse loaders.
BUNDLE_FILES = (
    "adapter_config.json",
    "adapter_model.safetensors",
    "adapter_model.bin",
    "jdlora_report.json",
    "README.md",
)
_REPO_ID_RE = re.compile(r"^[A-Za-z0-9][\w.\-]*/[A-Za-z0-9][\w.\-]*$")


@dataclass
class PushResult:
    repo_id: str
    commit: str
    url: str
    created: bool
    changed: bool  # False when the repo already held exactly these files (the Hub then makes no commit)


def check_push_target(repo_id: str) -> None:
    """Fail fast (before any compression) if pushing to `repo_id` cannot work: bad id, offline, or no token."""
    if not _REPO_ID_RE.match(repo_id) or ".." in repo_id or repo_id.endswith((".git", ".")):
        raise UsageError(f"--push expects a Hub repo id ORG/NAME, got {repo_id!r}.")
    from huggingface_hub import constants, get_token

    if constants.is_offline_mode():
        raise UsageError("cannot --push with HF_HUB_OFFLINE=1 set.")
    if not get_token():
        raise UsageError("--push needs a Hugging Face token: run `hf auth login` or set HF_TOKEN.")
    from huggingface_hub import HfApi

    with hub_errors("checking the Hugging Face token"):
        user = HfApi().whoami()
    namespace = repo_id.split("/")[0]
    allowed = {user.get("name")} | {org.get("name") for org in user.get("orgs", [])}
    if namespace not in allowed:
        raise UsageError(
            f"the Hugging Face token of {user.get('name')!r} cannot write to {namespace!r} "
            f"(it may write to: {', '.join(sorted(n for n in allowed if n))})."
        )


def push_bundle(
    folder: Path,
    repo_id: str,
    *,
    private: bool = False,
    commit_message: Optional[str] = None,
    log: Callable[[str], None] = lambda message: None,
) -> PushResult:
    """Upload every file of `folder` to `repo_id` in one commit (creating the repo if needed)."""
    from huggingface_hub import CommitOperationAdd, CommitOperationDelete, HfApi

    api = HfApi()
    folder = Path(folder)
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    if not files:
        raise UsageError(f"{folder} holds no files to push.")
    with hub_errors(f"checking Hub repo {repo_id}"):
        existed = api.repo_exists(repo_id)
    created_sha = None
    if not existed:
        with hub_errors(f"creating Hub repo {repo_id}"):
            api.create_repo(repo_id, private=private, exist_ok=True)
    with hub_errors(f"reading Hub repo {repo_id}"):
        info = api.model_info(repo_id, files_metadata=False)
    parent = info.sha
    if not existed:
        created_sha = parent
        log(f"created Hub repo {repo_id}")
    remote = {s.rfilename for s in info.siblings or []}
    local = {p.relative_to(folder).as_posix() for p in files}
    operations: list = [
        CommitOperationAdd(path_in_repo=p.relative_to(folder).as_posix(), path_or_fileobj=str(p)) for p in files
    ]
    operations += [CommitOperationDelete(path_in_repo=name) for name in sorted(remote & set(BUNDLE_FILES) - local)]
    message = commit_message or f"Upload JD-LoRA bundle ({len(files)} files) with jdlora-convert"
    try:
        with hub_errors(f"pushing to Hub repo {repo_id}"):
            commit = api.create_commit(repo_id, operations, commit_message=message, parent_commit=parent)
    except HubOperationError as err:
        # A Hub commit is atomic, but a dropped connection leaves open whether it landed: look before claiming.
        head = _head(api, repo_id)
        if head == parent and created_sha is not None and _delete_if_untouched(api, repo_id, created_sha):
            raise HubOperationError(
                f"{err} Nothing was pushed: the repo created for this push was deleted again."
            ) from err
        if head == parent:
            raise HubOperationError(f"{err} The commit was not applied: {repo_id} is unchanged.") from err
        if head is None:
            raise HubOperationError(f"{err} {repo_id} cannot be read back: check whether the upload landed.") from err
        raise HubOperationError(f"{err} {repo_id} is now at {head}: check whether the upload landed.") from err
    return PushResult(
        repo_id=repo_id,
        commit=commit.oid,
        url=str(commit.commit_url),
        created=not existed,
        changed=commit.oid != parent,
    )


def _head(api, repo_id: str) -> Optional[str]:
    try:
        return api.model_info(repo_id).sha
    except Exception:  # the Hub may be unreachable: then nothing can be claimed
        return None


def _delete_if_untouched(api, repo_id: str, created_sha: str) -> bool:
    """Delete a repo this push created, but only if nobody has committed to it since (its head is still ours)."""
    try:
        if api.model_info(repo_id).sha != created_sha:
            return False
        api.delete_repo(repo_id, missing_ok=True)
        return True
    except Exception:  # best effort: the original failure is what the user must see
        return False
