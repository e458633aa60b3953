"""Pushing a bundle folder to the Hub as one commit.

`HfApi.upload_folder` becomes a streamed multi-commit upload when `hf_xet` is installed (huggingface_hub >= 1.x), so
the push goes through `HfApi.create_commit` with one `CommitOperationAdd` per file: one commit by construction, which
the Hub applies completely or not at all. The commit is made against the sha the repo had when the push started
(`parent_commit`), so a concurrent push is refused instead of silently interleaved. If the repo was created for this
push and the commit fails, the empty repo is deleted again: a failed push leaves the Hub as it was.

Only the bundle's own files are uploaded (config, weights, report, card: `output.BUNDLE_FILES`), never whatever else
lies in the folder (`.git/`, a `.env` holding a token, notes), and with local paths redacted (`redact`). The commit is
prepared and checked before the repo is created, so a folder that cannot be pushed leaves no empty repo behind.

The token is only ever handed to huggingface_hub; messages name the repo and the user, never the token.
"""

from __future__ import annotations

import json
import re
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

from .errors import HubOperationError, SourceError, UsageError
from .output import BUNDLE_FILES, CARD_NAME, CONFIG_NAME, PICKLED_WEIGHTS_NAME, REPORT_NAME, WEIGHTS_NAME
from .redact import dumps, publishable
from .sources import hub_errors

# Bundle files the repo may hold from an older push and the folder no longer has: deleted in the same commit (a stale
# .bin beside the safetensors would confuse loaders and readers).
STALE_REMOTE_FILES = (*BUNDLE_FILES, PICKLED_WEIGHTS_NAME)
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


@dataclass
class Upload:
    """What a push of a bundle folder sends: {path in repo: bytes or local file}, and what it leaves out."""

    files: dict[str, Union[bytes, str]]
    left_out: list[str]  # other entries of the folder, never uploaded
    redacted: list[str]  # local paths replaced by <local>/NAME in the config, report and card


def bundle_upload(folder: Path) -> Upload:
    """The bundle files of `folder` as a push publishes them (config, report and card with local paths redacted),
    checked before anything is sent: the redacted config must still load as a JD-LoRA config."""
    from peft_jdlora import BundleFormatError
    from peft_jdlora.bundle import read_config

    folder = Path(folder)
    missing = [name for name in (CONFIG_NAME, WEIGHTS_NAME, CARD_NAME) if not (folder / name).is_file()]
    if missing:
        raise SourceError(f"{folder} is not a complete bundle folder: it has no {', '.join(missing)}.")
    try:
        config = json.loads((folder / CONFIG_NAME).read_text())
        report = json.loads((folder / REPORT_NAME).read_text()) if (folder / REPORT_NAME).is_file() else None
        card = (folder / CARD_NAME).read_text()
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise SourceError(f"{folder}: a bundle file cannot be read ({err}).") from None
    files: dict[str, Union[bytes, str]] = {n: str(folder / n) for n in BUNDLE_FILES if (folder / n).is_file()}
    config, report, card, redacted = publishable(config, report, card)
    if redacted:  # the files as they are, unless they name local paths
        with tempfile.TemporaryDirectory() as tmp:
            (Path(tmp) / CONFIG_NAME).write_bytes(dumps(config))
            try:
                read_config(Path(tmp))
            except BundleFormatError as err:  # the redaction must not break the bundle: refuse rather than publish
                raise SourceError(f"{folder}: the config to push does not load: {err}") from None
        files[CONFIG_NAME] = dumps(config)
        files[CARD_NAME] = card.encode()
        if report is not None:
            files[REPORT_NAME] = dumps(report)
    left_out = sorted(p.name + ("/" if p.is_dir() else "") for p in folder.iterdir() if p.name not in files)
    return Upload(files=files, left_out=left_out, redacted=redacted)


def push_bundle(
    folder: Path,
    repo_id: str,
    *,
    private: bool = False,
    commit_message: Optional[str] = None,
    log: Callable[[str], None] = lambda message: None,
) -> PushResult:
    """Upload the bundle files of `folder` to `repo_id` in one commit, creating the repo if needed.

    In this order: the files are read and checked and the commit's operations built (a folder that cannot be pushed
    fails here, before the Hub is touched), then the repo is created if it does not exist, then one commit is made.
    A repo created by this call is deleted again if anything after its creation fails."""
    from huggingface_hub import CommitOperationAdd, CommitOperationDelete, HfApi

    api = HfApi()
    upload = bundle_upload(folder)
    if upload.left_out:
        log(f"not pushed (not part of the bundle): {', '.join(upload.left_out)}")
    if upload.redacted:
        log(f"local paths published as <local>/NAME: {len(upload.redacted)}")
    additions = [CommitOperationAdd(path_in_repo=name, path_or_fileobj=data) for name, data in upload.files.items()]
    message = commit_message or f"Upload JD-LoRA bundle ({len(additions)} files) with jdlora-convert"
    with hub_errors(f"checking Hub repo {repo_id}"):
        existed = api.repo_exists(repo_id)
    if not existed:
        with hub_errors(f"creating Hub repo {repo_id}"):
            api.create_repo(repo_id, private=private, exist_ok=True)
    parent: Optional[str] = None  # the repo's head before the commit
    committed = False  # create_commit was called: from then on, whether it landed must be looked up
    try:
        with hub_errors(f"reading Hub repo {repo_id}"):
            info = api.model_info(repo_id, files_metadata=False)
        parent = info.sha
        if not existed:
            log(f"created Hub repo {repo_id}")
        remote = {s.rfilename for s in info.siblings or []}
        stale = sorted(remote & set(STALE_REMOTE_FILES) - set(upload.files))
        operations: list = [*additions, *(CommitOperationDelete(path_in_repo=name) for name in stale)]
        committed = True
        with hub_errors(f"pushing to Hub repo {repo_id}"):
            commit = api.create_commit(repo_id, operations, commit_message=message, parent_commit=parent)
    except HubOperationError as err:
        raise _explained(api, err, repo_id, created=not existed, parent=parent, committed=committed) from err
    except BaseException:
        # Not a Hub failure (a bug, Ctrl-C, SIGTERM): never leave behind an empty repo that this call created.
        if not existed:
            _delete_if_untouched(api, repo_id, parent if parent is not None else _head(api, repo_id))
        raise
    return PushResult(
        repo_id=repo_id,
        commit=commit.oid,
        url=str(commit.commit_url),
        created=not existed,
        changed=commit.oid != parent,
    )


def _explained(
    api, err: HubOperationError, repo_id: str, *, created: bool, parent: Optional[str], committed: bool
) -> HubOperationError:
    """The failure, with what it left on the Hub. A Hub commit is atomic, but a dropped connection leaves open whether
    it landed: look before claiming anything."""
    head = _head(api, repo_id)
    untouched = head is not None and (head == parent or (parent is None and not committed))
    if untouched and created and _delete_if_untouched(api, repo_id, head):
        return HubOperationError(f"{err} Nothing was pushed: the repo created for this push was deleted again.")
    if untouched or (not committed and not created):
        return HubOperationError(f"{err} The commit was not applied: {repo_id} is unchanged.")
    if head is None:
        return HubOperationError(f"{err} {repo_id} cannot be read back: check whether the upload landed.")
    return HubOperationError(f"{err} {repo_id} is now at {head}: check whether the upload landed.")


def _head(api, repo_id: str) -> Optional[str]:
    try:
        return api.model_info(repo_id).sha
    except Exception:  # the Hub may be unreachable: then nothing can be claimed
        return None


def _delete_if_untouched(api, repo_id: str, created_sha: Optional[str]) -> bool:
    """Delete a repo this push created, but only if nobody has committed to it since (its head is still ours)."""
    if created_sha is None:
        return False
    try:
        if api.model_info(repo_id).sha != created_sha:
            return False
        api.delete_repo(repo_id, missing_ok=True)
        return True
    except Exception:  # best effort: the original failure is what the user must see
        return False
