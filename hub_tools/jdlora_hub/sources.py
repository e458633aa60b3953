"""Finding the source adapters: local PEFT folders, Hub repos (`org/name[@revision]`) and Hub globs (`org/task-*`).

Every Hub source is pinned: its revision is resolved to a commit sha first and everything is downloaded at that sha,
so the bundle records exactly what it was built from. With `HF_HUB_OFFLINE=1` the listing and the revisions come
from the local Hugging Face cache (`scan_cache_dir`) instead of the Hub.

Candidates are screened from their `adapter_config.json` alone (no weights downloaded): a glob keeps the PEFT LoRA
adapters and reports every other match as skipped, with the reason; a source named explicitly must be one.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

from .errors import HubOperationError, SourceError
from .output import CONFIG_NAME, PICKLED_WEIGHTS_NAME, WEIGHTS_NAME

ADAPTER_WEIGHTS = (WEIGHTS_NAME, PICKLED_WEIGHTS_NAME)  # a PEFT adapter's weights, in the order PEFT looks for them
DOWNLOAD_PATTERNS = [CONFIG_NAME, *ADAPTER_WEIGHTS]
GLOB_CHARS = "*?["
_NAME_PREFIX_RE = re.compile(r"^([A-Za-z0-9][A-Za-z0-9_.\-]*)=(.+)$")


@dataclass(frozen=True)
class SourceSpec:
    """One SOURCE argument, parsed. `kind` is "local" (a folder), "hub" (one repo) or "glob" (repos of one org)."""

    text: str
    kind: Literal["local", "hub", "glob"]
    location: str  # absolute folder path, repo id, or "org/pattern"
    revision: Optional[str] = None
    name: Optional[str] = None  # from NAME=SOURCE


@dataclass
class ResolvedAdapter:
    """A source adapter that passed screening: where its files are and where they came from."""

    name: str
    config: dict[str, Any]
    source: dict[str, Any]  # provenance recorded in the bundle's adapter_sources
    spec: SourceSpec
    folder: Optional[Path] = None  # set once downloaded (local sources: the folder itself)
    explicit_name: bool = False
    name_parts: tuple[str, ...] = ()  # path or repo id components, for telling equal names apart

    @property
    def base_model(self) -> Optional[str]:
        return self.config.get("base_model_name_or_path")

    @property
    def label(self) -> str:
        """How the source is named in messages: repo id with revision, or the folder."""
        if self.source.get("type") == "hub" and self.source.get("revision"):
            return f"{self.source['source']}@{self.source['revision'][:10]}"
        return str(self.source.get("source") or self.name)


@dataclass
class Skipped:
    source: str
    reason: str


@dataclass
class Resolution:
    adapters: list[ResolvedAdapter]
    skipped: list[Skipped] = field(default_factory=list)
    base_model: Optional[str] = None


def parse_source(text: str, default_revision: Optional[str] = None, hub_only: bool = False) -> SourceSpec:
    """Parse a SOURCE argument: `[NAME=]FOLDER`, `[NAME=]ORG/REPO[@REVISION]` or `ORG/PATTERN[@REVISION]`.

    A local folder wins over a Hub id of the same spelling, unless `hub_only` (--from-hub)."""
    name = None
    rest = text
    match = _NAME_PREFIX_RE.match(text)
    if match and (hub_only or not Path(text).expanduser().exists()):
        name, rest = match.group(1), match.group(2)
    elif match is None and "=" in text and (hub_only or not Path(text).expanduser().exists()):
        _refuse_bad_name(text, hub_only)
    path = Path(rest).expanduser()
    if path.exists() and not hub_only:
        if not path.is_dir():
            raise SourceError(f"{rest} is a file; a source is a PEFT adapter folder, a Hub repo id or a Hub glob.")
        return SourceSpec(text, "local", str(path.resolve()), None, name)
    repo, _, revision = rest.partition("@")
    # A missing folder should be reported as such, not as a malformed repo id.
    if not hub_only and (rest.startswith((".", "/", "~")) or repo.count("/") > 1 or "\\" in rest):
        raise SourceError(f"local folder {rest} does not exist.")
    if "/" not in repo:
        raise SourceError(
            f"{rest!r} is not an existing folder, and a Hub repo id needs its organisation ('org/{rest}')."
        )
    org, repo_name = repo.split("/", 1)
    if any(c in org for c in GLOB_CHARS):
        raise SourceError(f"in the Hub glob {rest!r} only the repo name may hold wildcards, not the organisation.")
    kind: Literal["hub", "glob"] = "glob" if any(c in repo_name for c in GLOB_CHARS) else "hub"
    if kind == "glob" and name is not None:
        raise SourceError(f"NAME=SOURCE cannot name the adapters of a glob ({text!r}).")
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(f"{org}/x" if kind == "glob" else repo)
    except HFValidationError as err:
        raise SourceError(f"{rest!r} is neither an existing folder nor a valid Hub repo id: {err}") from None
    return SourceSpec(text, kind, repo, revision or default_revision, name)


def _refuse_bad_name(text: str, hub_only: bool) -> None:
    """`text` holds '=' but does not start with a valid NAME=: if it reads as NAME=SOURCE (the part before '=' is not
    the start of a path, or the part after it exists), say what is wrong with the name instead of reporting a missing
    folder named like the whole argument."""
    head, _, tail = text.partition("=")
    looks_like_path = head.startswith((".", "/", "~")) or "\\" in head
    if looks_like_path and not hub_only and not Path(tail).expanduser().exists():
        return  # e.g. ./runs/lr=1e-4: a folder path that happens to hold '=' (reported as missing further on)
    if not tail:
        raise SourceError(f"nothing follows '=' in {text!r}: NAME=SOURCE needs a source after the name.")
    bad = sorted({c for c in head if not (c.isascii() and (c.isalnum() or c in "_.-"))})
    if not head:
        problem = "it is empty"
    elif bad:
        problem = f"it holds {', '.join(repr(c) for c in bad)}"
    else:
        problem = f"it starts with {head[0]!r}"
    raise SourceError(
        f"{head!r} in {text!r} is not a valid adapter name ({problem}): in NAME=SOURCE, NAME holds only ASCII letters, "
        "digits, '_', '.' and '-', and starts with a letter or digit."
    )


def glob_prefix(pattern: str) -> str:
    """The literal start of a glob pattern (what the Hub's substring `search` can narrow the listing with)."""
    out = []
    for c in pattern:
        if c in GLOB_CHARS:
            break
        out.append(c)
    return "".join(out)


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def weights_file(folder: Path) -> Optional[Path]:
    for name in ADAPTER_WEIGHTS:
        if (folder / name).is_file():
            return folder / name
    return None


class HubClient:
    """The few Hub operations the tools need, online or (HF_HUB_OFFLINE=1) from the local cache, with the Hub's
    errors turned into one-line `SourceError` / `HubOperationError`s."""

    def __init__(self, token: Optional[str] = None, progress: bool = True):
        from huggingface_hub import HfApi, constants

        self.api = HfApi(token=token)
        self.offline = constants.is_offline_mode()
        self.progress = progress
        self._cache_scan = None
        self._requested: dict[tuple[str, str], str] = {}  # (repo, sha) -> the branch / tag it was resolved from

    # ------------------------------------------------------------------------------------------------ listing

    def list_repos(self, org: str, pattern: str) -> list[str]:
        """Model repo ids of `org` whose name matches the glob `pattern` (client-side fnmatch: the Hub has no glob)."""
        if self.offline:
            ids = [r.repo_id for r in self._cached_repos() if r.repo_id.split("/")[0] == org]
        else:
            prefix = glob_prefix(pattern)
            with self._hub_errors(f"listing the models of {org!r}"):
                ids = [m.id for m in self.api.list_models(author=org, search=prefix or None)]
        return sorted(i for i in ids if i.split("/")[0] == org and fnmatch.fnmatchcase(i.split("/", 1)[1], pattern))

    def known_repos(self, org: str, limit: int = 8) -> list[str]:
        """A few repo ids of `org`, for error messages."""
        try:
            if self.offline:
                ids = sorted(r.repo_id for r in self._cached_repos() if r.repo_id.split("/")[0] == org)
            else:
                ids = sorted(m.id for m in self.api.list_models(author=org, limit=limit + 1))
        except Exception:
            return []
        return ids[: limit + 1]

    # ------------------------------------------------------------------------------------------------ revisions

    def resolve(self, repo_id: str, revision: Optional[str]) -> tuple[str, list[str]]:
        """(commit sha, file names) of `repo_id` at `revision` (a branch, tag or sha; default: main)."""
        if self.offline:
            return self._resolve_cached(repo_id, revision)
        from huggingface_hub.errors import RepositoryNotFoundError, RevisionNotFoundError

        try:
            with self._hub_errors(f"reading {repo_id}"):
                info = self.api.model_info(repo_id, revision=revision)
        except HubOperationError as err:
            cause = err.__cause__
            if isinstance(cause, RevisionNotFoundError):
                raise SourceError(f"revision {revision!r} does not exist in Hub repo {repo_id}.") from None
            if isinstance(cause, RepositoryNotFoundError):
                raise SourceError(
                    f"Hub repo {repo_id} does not exist (or is private and your token cannot read it)."
                ) from None
            raise
        self._requested[(repo_id, info.sha)] = revision or "main"
        return info.sha, [s.rfilename for s in info.siblings or []]

    def _cached_repos(self) -> list[Any]:
        from huggingface_hub import constants, scan_cache_dir
        from huggingface_hub.errors import CacheNotFound

        if self._cache_scan is None:
            try:
                self._cache_scan = scan_cache_dir()
            except CacheNotFound:
                raise SourceError(
                    f"HF_HUB_OFFLINE=1 is set and there is no local Hugging Face cache at {constants.HF_HUB_CACHE}."
                ) from None
        return [r for r in self._cache_scan.repos if r.repo_type == "model"]

    def _resolve_cached(self, repo_id: str, revision: Optional[str]) -> tuple[str, list[str]]:
        wanted = revision or "main"
        for repo in self._cached_repos():
            if repo.repo_id != repo_id:
                continue
            for rev in repo.revisions:
                if wanted in rev.refs or rev.commit_hash == wanted:
                    files = [f.file_path.relative_to(rev.snapshot_path).as_posix() for f in rev.files]
                    return rev.commit_hash, files
            cached = sorted(
                {r for rev in repo.revisions for r in rev.refs} | {r.commit_hash[:10] for r in repo.revisions}
            )
            raise SourceError(
                f"{repo_id}@{wanted} is not in the local Hugging Face cache (HF_HUB_OFFLINE=1); cached: {cached}."
            )
        raise SourceError(
            f"{repo_id} is not in the local Hugging Face cache and HF_HUB_OFFLINE=1 is set: run once online first."
        )

    # ------------------------------------------------------------------------------------------------ files

    def fetch(self, repo_id: str, sha: str, filename: str) -> Path:
        from huggingface_hub import hf_hub_download

        with self._hub_errors(f"downloading {filename} of {repo_id}@{sha[:10]}"):
            path = Path(hf_hub_download(repo_id, filename, revision=sha))
        self._remember_ref(repo_id, sha)
        return path

    def download(self, repo_id: str, sha: str, allow_patterns: Sequence[str]) -> Path:
        """Snapshot of `repo_id` at the commit `sha` (only the files matching `allow_patterns`)."""
        from huggingface_hub import snapshot_download

        with self._hub_errors(f"downloading {repo_id}@{sha[:10]}"):
            path = Path(snapshot_download(repo_id, revision=sha, allow_patterns=list(allow_patterns)))
        self._remember_ref(repo_id, sha)
        return path

    def _remember_ref(self, repo_id: str, sha: str) -> None:
        """Record in the cache which commit the requested branch / tag pointed to. Downloading by sha (to pin the
        revision) skips this, and without it an offline run could not resolve `org/name` (= main) from the cache."""
        revision = self._requested.get((repo_id, sha))
        if self.offline or revision is None or revision == sha:
            return
        from huggingface_hub import constants
        from huggingface_hub.file_download import repo_folder_name

        ref = Path(constants.HF_HUB_CACHE) / repo_folder_name(repo_id=repo_id, repo_type="model") / "refs" / revision
        try:
            if ref.is_file() and ref.read_text() == sha:
                return
            ref.parent.mkdir(parents=True, exist_ok=True)
            tmp = ref.with_name(f"{ref.name}.{os.getpid()}.tmp")
            tmp.write_text(sha)
            os.replace(tmp, ref)
        except OSError:  # a read-only cache: offline runs then need explicit @sha revisions
            pass

    def _hub_errors(self, what: str):
        return hub_errors(what)


class hub_errors:
    """Context manager: turns huggingface_hub / network exceptions into a one-line `HubOperationError`."""

    def __init__(self, what: str):
        self.what = what

    def __enter__(self) -> None:
        return None

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc is None:
            return False
        if isinstance(exc, HubOperationError | SourceError):
            return False
        from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, OfflineModeIsEnabled

        try:
            import httpx2 as httpx  # huggingface_hub >= 2 ships its HTTP client as httpx2
        except ImportError:  # pragma: no cover - older huggingface_hub
            import httpx
        if isinstance(exc, HfHubHTTPError):
            status = exc.response.status_code if exc.response is not None else "?"
            message = exc.server_message or str(exc).splitlines()[0]
            raise HubOperationError(f"{self.what} failed: HTTP {status}: {message}") from exc
        if isinstance(exc, (OfflineModeIsEnabled, LocalEntryNotFoundError)):
            raise HubOperationError(f"{self.what} failed: {str(exc).splitlines()[0]}") from exc
        if isinstance(exc, httpx.HTTPError | ConnectionError | TimeoutError):
            raise HubOperationError(f"{self.what} failed: cannot reach the Hub ({type(exc).__name__}: {exc})") from exc
        return False


# ---------------------------------------------------------------------------------------------------- resolution


def _read_local_config(folder: Path, what: str) -> dict[str, Any]:
    config_file = folder / CONFIG_NAME
    if not config_file.is_file():
        raise SourceError(f"{what} is not a PEFT adapter folder: it has no {CONFIG_NAME}.")
    return _parse_config(config_file, what)


def _parse_config(config_file: Path, what: str) -> dict[str, Any]:
    # peft_jdlora.bundle.read_json_object does this for bundles and source LoRAs; sources are screened before the
    # command imports torch (which importing peft_jdlora does), hence this copy, as with output.py's file names.
    try:
        data = json.loads(config_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise SourceError(f"{what}: {CONFIG_NAME} is not valid JSON ({err}).") from None
    if not isinstance(data, dict):
        raise SourceError(f"{what}: {CONFIG_NAME} does not hold a JSON object.")
    return data


def lora_problem(config: dict[str, Any]) -> Optional[str]:
    """Why a PEFT adapter config is not a LoRA adapter (None if it is one)."""
    peft_type = config.get("peft_type")
    if peft_type == "JDLORA":
        return "it is a JD-LoRA bundle, not a LoRA adapter (use `jdlora add` to grow a bundle)"
    if peft_type != "LORA":
        return f"its PEFT type is {peft_type!r}, not 'LORA'"
    return None


def unsupported_reason(config: dict[str, Any]) -> Optional[str]:
    """Why a LoRA adapter cannot go into a bundle, when its config alone tells (None otherwise). Cheap screening so
    that such adapters are refused before their weights are downloaded; the engine's reader checks everything else."""
    if config.get("use_dora"):
        return "it is a DoRA adapter (use_dora=true): its learned magnitude vector cannot be represented in a bundle"
    return None


def resolve_sources(
    specs: Sequence[SourceSpec],
    *,
    hub: Optional[Callable[[], HubClient]] = None,
    select_base: Optional[str] = None,
    skip_invalid: bool = False,
    log: Callable[[str], None] = lambda message: None,
) -> Resolution:
    """Expand globs, pin Hub revisions, screen every candidate's adapter_config.json, check that all adapters share
    one base model, name them uniquely, and download the weights of the Hub ones (at their pinned sha)."""
    client: Optional[HubClient] = None

    def get_client() -> HubClient:
        nonlocal client
        if client is None:
            client = hub() if hub is not None else HubClient()
        return client

    adapters: list[ResolvedAdapter] = []
    skipped: list[Skipped] = []
    seen: dict[tuple, str] = {}

    def add(candidate: ResolvedAdapter, key: tuple) -> None:
        reason = unsupported_reason(candidate.config)
        if reason is not None:
            if not skip_invalid:
                raise SourceError(f"{candidate.label}: {reason}.")
            skipped.append(Skipped(candidate.label, reason))
            return
        if key in seen:
            skipped.append(Skipped(candidate.spec.text, f"the same adapter as {seen[key]!r}, listed twice"))
            return
        seen[key] = candidate.spec.text
        adapters.append(candidate)

    for spec in specs:
        if spec.kind == "local":
            folder = Path(spec.location)
            if spec.name is None and not folder.name.isprintable():
                raise SourceError(
                    f"the folder name {folder.name!r} ({spec.location!r}) holds control characters and cannot name an "
                    "adapter: give it a name with NAME=SOURCE."
                )
            config = _read_local_config(folder, spec.location)
            problem = lora_problem(config)
            if problem:
                raise SourceError(f"{spec.location}: {problem}.")
            weights = weights_file(folder)
            if weights is None:
                raise SourceError(f"{spec.location} holds no adapter weights ({' or '.join(ADAPTER_WEIGHTS)}).")
            source = {"type": "local", "source": str(folder), "revision": None, "sha256": file_sha256(weights)}
            candidate = ResolvedAdapter(
                name=spec.name or folder.name,
                config=config,
                source=source,
                spec=spec,
                folder=folder,
                explicit_name=spec.name is not None,
                name_parts=folder.parts,
            )
            add(candidate, ("local", str(folder)))
            continue

        client = get_client()
        if spec.kind == "hub":
            repo_ids, explicit = [spec.location], True
        else:
            org, pattern = spec.location.split("/", 1)
            repo_ids, explicit = client.list_repos(org, pattern), False
            if not repo_ids:
                known = client.known_repos(org)
                hint = (
                    f" Models of {org!r}: {', '.join(known[:8])}{', ...' if len(known) > 8 else ''}." if known else ""
                )
                where = "in the local cache" if client.offline else "on the Hub"
                raise SourceError(f"the glob {spec.location!r} matches no model of {org!r} {where}.{hint}")
            log(f"{spec.location}: {len(repo_ids)} matching repos")
        usable = 0
        for repo_id in repo_ids:
            label = repo_id if spec.revision is None else f"{repo_id}@{spec.revision}"
            try:
                sha, files = client.resolve(repo_id, spec.revision)
            except SourceError as err:
                if explicit:
                    raise
                skipped.append(Skipped(label, str(err)))
                continue
            if CONFIG_NAME not in files:
                if explicit:
                    raise SourceError(f"Hub repo {label} is not a PEFT adapter: it has no {CONFIG_NAME}.")
                skipped.append(Skipped(label, f"not a PEFT adapter (no {CONFIG_NAME})"))
                continue
            config = _parse_config(client.fetch(repo_id, sha, CONFIG_NAME), label)
            problem = lora_problem(config)
            if problem:
                if explicit:
                    raise SourceError(f"Hub repo {label}: {problem}.")
                skipped.append(Skipped(label, problem))
                continue
            if not any(w in files for w in ADAPTER_WEIGHTS):
                message = f"it holds no adapter weights ({' or '.join(ADAPTER_WEIGHTS)})"
                if explicit:
                    raise SourceError(f"Hub repo {label}: {message}.")
                skipped.append(Skipped(label, message))
                continue
            source = {"type": "hub", "source": repo_id, "revision": sha}
            if spec.revision and spec.revision != sha:
                source["requested_revision"] = spec.revision
            candidate = ResolvedAdapter(
                name=spec.name or repo_id.split("/", 1)[1],
                config=config,
                source=source,
                spec=spec,
                explicit_name=spec.name is not None,
                name_parts=tuple(repo_id.split("/")),
            )
            usable += 1
            add(candidate, ("hub", repo_id, sha))
        if not explicit and not usable:
            reasons = "; ".join(f"{s.source}: {s.reason.rstrip('.')}" for s in skipped[-len(repo_ids) :][:5])
            raise SourceError(
                f"none of the {len(repo_ids)} repos matching {spec.location!r} is a usable LoRA adapter ({reasons})."
            )

    if not adapters:
        reasons = "; ".join(f"{s.source}: {s.reason.rstrip('.')}" for s in skipped[:5])
        raise SourceError(f"no usable source adapter ({reasons})." if reasons else "no source adapters given.")

    base_model = _check_base_models(adapters, skipped, select_base)
    adapters = [a for a in adapters if select_base is None or a.base_model in (select_base, None)]
    _assign_unique_names(adapters)
    to_download = [a for a in adapters if a.folder is None]
    if to_download:
        _download_all(get_client(), to_download)
    return Resolution(adapters=adapters, skipped=skipped, base_model=base_model)


def _download_all(client: HubClient, adapters: Sequence[ResolvedAdapter]) -> None:
    """Download the adapters' files at their pinned shas, with one progress bar for all of them (huggingface_hub's
    per-file bars are switched off meanwhile: a thousand of them would bury the log)."""
    from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars
    from tqdm.auto import tqdm

    silenced = not are_progress_bars_disabled()
    if silenced:
        disable_progress_bars()
    try:
        for adapter in tqdm(adapters, desc="Downloading adapters", unit="adapter", disable=not client.progress):
            adapter.folder = client.download(adapter.source["source"], adapter.source["revision"], DOWNLOAD_PATTERNS)
    finally:
        if silenced:
            enable_progress_bars()


def _check_base_models(
    adapters: list[ResolvedAdapter], skipped: list[Skipped], select_base: Optional[str]
) -> Optional[str]:
    """The one base model of the adapters; adapters of other bases are skipped (--select-base) or refused."""
    if select_base is not None:
        for a in adapters:
            if a.base_model not in (select_base, None):
                skipped.append(
                    Skipped(
                        a.spec.text if a.spec.kind != "glob" else a.label,
                        f"base model {a.base_model!r}, not {select_base!r}",
                    )
                )
        if not any(a.base_model in (select_base, None) for a in adapters):
            raise SourceError(f"no source adapter has the base model {select_base!r} (--select-base).")
        return select_base
    groups: dict[str, list[str]] = {}
    for a in adapters:
        if a.base_model is not None:  # adapters that do not record a base model fit any (shapes are checked later)
            groups.setdefault(a.base_model, []).append(a.name)
    if len(groups) > 1:
        described = "; ".join(
            f"{base!r} ({len(names)}: {', '.join(names[:3])}{', ...' if len(names) > 3 else ''})"
            for base, names in sorted(groups.items(), key=lambda kv: -len(kv[1]))
        )
        raise SourceError(
            f"the adapters belong to {len(groups)} different base models: {described}. A bundle holds adapters of "
            "one base model: narrow the sources or pick one with --select-base."
        )
    return next(iter(groups), None)


def _assign_unique_names(adapters: list[ResolvedAdapter]) -> None:
    """Give every adapter a unique name: the folder or repo name, lengthened with its parent folders / organisation
    where two would be equal. Names given with NAME=SOURCE are kept as they are and must be unique."""
    explicit = [a.name for a in adapters if a.explicit_name]
    dupes = sorted({n for n in explicit if explicit.count(n) > 1})
    if dupes:
        raise SourceError(f"adapter names given twice with NAME=SOURCE: {dupes}.")
    depth = {id(a): 1 for a in adapters}
    for _ in range(64):
        names: dict[str, list[ResolvedAdapter]] = {}
        for a in adapters:
            names.setdefault(a.name, []).append(a)
        clashes = [group for group in names.values() if len(group) > 1]
        if not clashes:
            return
        progressed = False
        for group in clashes:
            for a in group:
                if a.explicit_name or depth[id(a)] >= len(a.name_parts):
                    continue
                depth[id(a)] += 1
                a.name = "/".join(a.name_parts[-depth[id(a)] :])
                progressed = True
        if not progressed:
            break
    names_seen: dict[str, str] = {}
    for a in adapters:
        if a.name in names_seen:
            raise SourceError(
                f"two sources would both be named {a.name!r} ({names_seen[a.name]} and {a.spec.text}): name them "
                "with NAME=SOURCE."
            )
        names_seen[a.name] = a.spec.text
