"""A small Hugging Face Hub-compatible HTTP server for tests and offline demos.

The real Hub cannot be reached from CI, and no public server implements the Hub's upload API, so the Hub paths of
`jdlora-convert` are tested against this one. It implements exactly the endpoints `huggingface_hub` 2.x calls for
listing, reading, downloading and committing model repos, with the same status codes and `X-Error-Code` headers, so
that the client's own error classes (`RepositoryNotFoundError`, `RevisionNotFoundError`, `EntryNotFoundError`, ...)
come out as they would against huggingface.co:

    GET    /api/whoami-v2
    GET    /api/models?author=&search=&limit=&full=              list_models
    GET    /api/models/{repo}[/revision/{rev}][?blobs=1]         model_info / repo_info (sha + siblings)
    GET    /api/models/{repo}/tree/{rev}[/{path}]                list_repo_tree (used by snapshot_download)
    GET    /api/models/{repo}/refs                               list_repo_refs
    POST   /api/repos/create                                     create_repo (409 if it exists)
    DELETE /api/repos/delete                                     delete_repo
    POST   /api/validate-yaml                                    README.md front matter check (create_commit)
    POST   /api/models/{repo}/preupload/{rev}                    always answers uploadMode "regular"
    POST   /api/models/{repo}/commit/{rev}                       NDJSON commit; applied atomically or not at all
    HEAD   /{repo}/resolve/{rev}/{path}                          ETag, X-Repo-Commit, Content-Length
    GET    /{repo}/resolve/{rev}/{path}                          file content (Range supported)

Files are stored as content-addressed blobs under a data folder (git blob ids, so ETags match what the Hub sends for
regular files); repos, commits and refs live in memory. Write endpoints require a bearer token (any token, or the
one given to `LocalHub(token=...)`). Failure injection (`fail_next`) makes the next matching request fail, either
with an HTTP error or by dropping the connection after reading part of the body, and never changes any repo.
`hold_next` makes the next matching request wait until the test releases it (a slow network), so that a test can act
(e.g. send a signal to the client process) at a known point of the client's work.

Use it in-process (a background thread):

    with LocalHub(tmp_path / "hub") as hub:
        hub.create_repo("org/base")
        hub.commit_folder("org/base", "path/to/saved/model")
        env = {"HF_ENDPOINT": hub.url, "HF_TOKEN": "x", "HF_HUB_OFFLINE": "0"}   # for subprocesses

or as a process: `python -m jdlora_hub.testing.hub_server --data DIR --port 8123`.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import hashlib
import json
import re
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Optional, Union
from urllib.parse import parse_qs, unquote, urlsplit

DEFAULT_BRANCH = "main"
GITATTRIBUTES = b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n*.bin filter=lfs diff=lfs merge=lfs -text\n"
_SHA_RE = re.compile(r"^[0-9a-f]{40}$")


class HubError(Exception):
    """An error answered to the client: HTTP status, the Hub's X-Error-Code, and a message."""

    def __init__(
        self,
        status: int,
        message: str,
        code: Optional[str] = None,
        headers: Optional[dict] = None,
        body: Optional[dict] = None,
    ):
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = headers or {}
        self.body = body or {}


@dataclass
class Commit:
    sha: str
    parent: Optional[str]
    message: str
    description: str
    files: dict[str, str]  # path -> blob id
    date: str


@dataclass
class Repo:
    repo_id: str
    private: bool
    created_at: str
    commits: dict[str, Commit] = field(default_factory=dict)
    branches: dict[str, str] = field(default_factory=dict)  # name -> commit sha
    history: list[str] = field(default_factory=list)  # commit shas, oldest first


@dataclass
class Failure:
    """One injected failure: the next request whose endpoint kind is `endpoint` fails this way."""

    endpoint: str
    status: int = 500
    message: str = "Internal Error (injected by the test Hub)"
    disconnect: bool = False  # drop the connection after reading half the body instead of answering
    repo_id: Optional[str] = None


@dataclass
class Hold:
    """One held request: the next request of kind `endpoint` waits, before it is answered, until `release()`."""

    endpoint: str
    repo_id: Optional[str] = None
    timeout: float = 60.0
    reached: threading.Event = field(default_factory=threading.Event)  # set when the request has arrived
    released: threading.Event = field(default_factory=threading.Event)

    def release(self) -> None:
        self.released.set()


@dataclass
class RequestRecord:
    method: str
    path: str
    endpoint: str
    status: int
    repo_id: Optional[str]
    authorized: bool


def git_blob_id(data: bytes) -> str:
    """The git blob sha1 of `data`: the Hub's ETag / oid for a regular (non-LFS) file."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def _now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.000Z")


def _front_matter(text: str) -> Optional[dict]:
    """YAML front matter of a model card, or None. Raises ValueError if it is present but invalid."""
    if not text.startswith("---"):
        return None
    end = text.find("\n---", 3)
    if end < 0:
        raise ValueError("the README.md front matter has no closing '---' line")
    import yaml

    try:
        data = yaml.safe_load(text[3:end])
    except yaml.YAMLError as err:
        raise ValueError(f"the README.md front matter is not valid YAML: {' '.join(str(err).split())}") from None
    if data is not None and not isinstance(data, dict):
        raise ValueError("the README.md front matter must be a YAML mapping")
    return data or {}


class LocalHub:
    """A Hub-compatible server on 127.0.0.1 (random port) with its data under `data_dir`. See the module docstring."""

    def __init__(
        self,
        data_dir: Union[str, Path],
        *,
        token: Optional[str] = None,
        user: str = "tester",
        orgs: tuple[str, ...] = ("org",),
        host: str = "127.0.0.1",
        port: int = 0,
    ):
        self.data_dir = Path(data_dir)
        self.blob_dir = self.data_dir / "blobs"
        self.blob_dir.mkdir(parents=True, exist_ok=True)
        self.token = token
        self.user = user
        self.orgs = tuple(orgs)
        self.repos: dict[str, Repo] = {}
        self.requests: list[RequestRecord] = []
        self._failures: list[Failure] = []
        self._holds: list[Hold] = []
        self._lock = threading.RLock()
        self._counter = 0
        self._server = ThreadingHTTPServer((host, port), _make_handler(self))
        self._server.daemon_threads = True
        self._thread: Optional[threading.Thread] = None

    # ------------------------------------------------------------------------------------------------ lifecycle

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> LocalHub:
        if self._thread is None:
            self._thread = threading.Thread(target=self._server.serve_forever, name="local-hub", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        if self._thread is not None:
            self._server.shutdown()
            self._thread.join()
            self._thread = None
        self._server.server_close()

    def __enter__(self) -> LocalHub:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    def env(self, token: Optional[str] = "hf_test_token") -> dict[str, str]:
        """Environment variables that point `huggingface_hub` (in a new process) at this server."""
        env = {"HF_ENDPOINT": self.url, "HF_HUB_OFFLINE": "0", "HF_HUB_DISABLE_TELEMETRY": "1"}
        if token is not None:
            env["HF_TOKEN"] = self.token or token
        return env

    # ------------------------------------------------------------------------------------------------ repo state

    def create_repo(self, repo_id: str, *, private: bool = False, exist_ok: bool = True) -> Repo:
        """Create a model repo with an initial commit holding `.gitattributes`, as the Hub does."""
        with self._lock:
            if repo_id in self.repos:
                if exist_ok:
                    return self.repos[repo_id]
                raise HubError(409, "You already created this model repo", headers={"X-Error-Code": "RepoExists"})
            if repo_id.count("/") != 1 or not all(repo_id.split("/")):
                raise HubError(400, f"Invalid repo id {repo_id!r}: expected 'namespace/name'.")
            repo = Repo(repo_id=repo_id, private=private, created_at=_now())
            self.repos[repo_id] = repo
            self._commit(repo, DEFAULT_BRANCH, {".gitattributes": GITATTRIBUTES}, [], "initial commit", "")
            return repo

    def delete_repo(self, repo_id: str) -> None:
        with self._lock:
            if self.repos.pop(repo_id, None) is None:
                raise HubError(404, "Repository not found", code="RepoNotFound")

    def commit_files(
        self,
        repo_id: str,
        files: dict[str, bytes],
        *,
        deletions: tuple[str, ...] = (),
        message: str = "Upload files",
        branch: str = DEFAULT_BRANCH,
    ) -> str:
        """Server-side commit (for seeding test repos without going through HTTP); returns the commit sha."""
        with self._lock:
            repo = self._repo(repo_id)
            return self._commit(repo, branch, dict(files), list(deletions), message, "")

    def commit_folder(self, repo_id: str, folder: Union[str, Path], *, message: str = "Upload folder") -> str:
        """Create the repo if needed and commit every file under `folder` (one commit); returns the commit sha."""
        folder = Path(folder)
        files = {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}
        self.create_repo(repo_id, exist_ok=True)
        return self.commit_files(repo_id, files, message=message)

    def head(self, repo_id: str, branch: str = DEFAULT_BRANCH) -> Optional[str]:
        """Commit sha at the tip of `branch`, or None if the repo does not exist."""
        with self._lock:
            repo = self.repos.get(repo_id)
            return None if repo is None else repo.branches.get(branch)

    def repo_files(self, repo_id: str, revision: str = DEFAULT_BRANCH) -> dict[str, bytes]:
        """{path: content} of the repo at `revision`."""
        with self._lock:
            commit = self._resolve(self._repo(repo_id), revision)
            return {path: self._read_blob(blob) for path, blob in commit.files.items()}

    def commit_history(self, repo_id: str) -> list[Commit]:
        """The repo's commits, oldest first."""
        with self._lock:
            repo = self._repo(repo_id)
            return [repo.commits[sha] for sha in repo.history]

    def fail_next(
        self,
        endpoint: str,
        *,
        status: int = 500,
        message: str = "Internal Error (injected by the test Hub)",
        disconnect: bool = False,
        repo_id: Optional[str] = None,
    ) -> None:
        """Make the next request of kind `endpoint` ("commit", "preupload", "resolve", "create_repo", "model_info",
        "list_models", "tree", ...) fail, with HTTP `status` or (`disconnect=True`) by closing the connection after
        reading half of the request body. The failed request changes nothing."""
        with self._lock:
            self._failures.append(Failure(endpoint, status, message, disconnect, repo_id))

    def clear_failures(self) -> None:
        with self._lock:
            self._failures.clear()
            for hold in self._holds:
                hold.release()
            self._holds.clear()

    def hold_next(self, endpoint: str, *, repo_id: Optional[str] = None, timeout: float = 60.0) -> Hold:
        """Make the next request of kind `endpoint` (as for `fail_next`) wait until `release()` is called on the
        returned `Hold` (or `timeout` seconds pass), then answer it normally. `Hold.reached` is set when it arrives."""
        hold = Hold(endpoint, repo_id, timeout)
        with self._lock:
            self._holds.append(hold)
        return hold

    def requests_to(self, endpoint: str, repo_id: Optional[str] = None) -> list[RequestRecord]:
        with self._lock:
            return [r for r in self.requests if r.endpoint == endpoint and (repo_id is None or r.repo_id == repo_id)]

    # ------------------------------------------------------------------------------------------------ internals

    def _repo(self, repo_id: str) -> Repo:
        repo = self.repos.get(repo_id)
        if repo is None:
            raise HubError(404, "Repository not found", code="RepoNotFound")
        return repo

    def _resolve(self, repo: Repo, revision: str) -> Commit:
        if revision in repo.branches:
            return repo.commits[repo.branches[revision]]
        if _SHA_RE.match(revision) and revision in repo.commits:
            return repo.commits[revision]
        raise HubError(404, f"Invalid rev id: {revision}", code="RevisionNotFound")

    def _write_blob(self, data: bytes) -> str:
        blob = git_blob_id(data)
        path = self.blob_dir / blob
        if not path.exists():
            tmp = path.with_suffix(f".tmp{threading.get_ident()}")
            tmp.write_bytes(data)
            tmp.replace(path)
        return blob

    def _read_blob(self, blob: str) -> bytes:
        return (self.blob_dir / blob).read_bytes()

    def _blob_size(self, blob: str) -> int:
        return (self.blob_dir / blob).stat().st_size

    def _commit(
        self,
        repo: Repo,
        branch: str,
        additions: dict[str, bytes],
        deletions: list[str],
        message: str,
        description: str,
        parent_commit: Optional[str] = None,
    ) -> str:
        """Apply one commit atomically: everything is validated and every blob written before the ref moves."""
        parent = repo.branches.get(branch)
        if parent_commit is not None and parent_commit != parent:
            raise HubError(412, "A commit has happened since. Please refresh and try again.")
        files = dict(repo.commits[parent].files) if parent else {}
        for path in deletions:
            if path.endswith("/"):
                doomed = [p for p in files if p.startswith(path)]
                if not doomed:
                    raise HubError(404, f"A folder with this name doesn't exist: {path}", code="EntryNotFound")
            else:
                if path not in files:
                    raise HubError(404, f"A file with this name doesn't exist: {path}", code="EntryNotFound")
                doomed = [path]
            for p in doomed:
                del files[p]
        for path, data in additions.items():
            if not path or path.startswith("/") or ".." in path.split("/"):
                raise HubError(400, f"Invalid path in commit: {path!r}")
            if path == "README.md":
                try:
                    _front_matter(data.decode())
                except (ValueError, UnicodeDecodeError) as err:
                    raise HubError(400, f"Invalid metadata in README.md: {err}") from None
            files[path] = self._write_blob(data)
        self._counter += 1
        seed = json.dumps([repo.repo_id, parent, sorted(files.items()), message, self._counter, time.time()])
        sha = hashlib.sha1(seed.encode()).hexdigest()
        repo.commits[sha] = Commit(sha, parent, message, description, files, _now())
        repo.history.append(sha)
        repo.branches[branch] = sha
        return sha

    def _take(self, queue: list[Any], endpoint: str, repo_id: Optional[str]) -> Optional[Any]:
        """Remove and return the first `Hold` / `Failure` of `queue` meant for a request of kind `endpoint` on
        `repo_id` (one without a repo_id is meant for any repo)."""
        with self._lock:
            for i, entry in enumerate(queue):
                if entry.endpoint == endpoint and (entry.repo_id is None or entry.repo_id == repo_id):
                    return queue.pop(i)
        return None

    def _card_data(self, commit: Commit) -> Optional[dict]:
        blob = commit.files.get("README.md")
        if blob is None:
            return None
        try:
            return _front_matter(self._read_blob(blob).decode())
        except (ValueError, UnicodeDecodeError):
            return None

    def _model_json(self, repo: Repo, commit: Commit, *, siblings: bool, blobs: bool = False) -> dict[str, Any]:
        card = self._card_data(commit) or {}
        tags = list(card.get("tags") or [])
        library = card.get("library_name")
        if library and library not in tags:
            tags.insert(0, library)
        data: dict[str, Any] = {
            "_id": hashlib.sha1(repo.repo_id.encode()).hexdigest()[:24],
            "id": repo.repo_id,
            "modelId": repo.repo_id,
            "author": repo.repo_id.split("/")[0],
            "sha": commit.sha,
            "lastModified": commit.date,
            "createdAt": repo.created_at,
            "private": repo.private,
            "gated": False,
            "disabled": False,
            "downloads": 0,
            "likes": 0,
            "tags": tags,
            "library_name": library,
        }
        if card:
            data["cardData"] = card
        if siblings:
            entries = []
            for path, blob in sorted(commit.files.items()):
                entry: dict[str, Any] = {"rfilename": path}
                if blobs:
                    entry.update(size=self._blob_size(blob), blobId=blob)
                entries.append(entry)
            data["siblings"] = entries
        return data


# ---------------------------------------------------------------------------------------------------- HTTP layer

_REPO = r"(?P<repo>[^/]+/[^/]+)"
_ROUTES: list[tuple[str, str, re.Pattern]] = [
    (method, name, re.compile(pattern))
    for method, name, pattern in [
        ("GET", "whoami", r"^/api/whoami-v2$"),
        ("GET", "list_models", r"^/api/models$"),
        ("GET", "tree", rf"^/api/models/{_REPO}/tree/(?P<rev>[^/]+)(?:/(?P<path>.*))?$"),
        ("GET", "refs", rf"^/api/models/{_REPO}/refs$"),
        ("GET", "model_info", rf"^/api/models/{_REPO}(?:/revision/(?P<rev>[^/]+))?$"),
        ("POST", "create_repo", r"^/api/repos/create$"),
        ("DELETE", "delete_repo", r"^/api/repos/delete$"),
        ("POST", "validate_yaml", r"^/api/validate-yaml$"),
        ("POST", "preupload", rf"^/api/models/{_REPO}/preupload/(?P<rev>[^/]+)$"),
        ("POST", "commit", rf"^/api/models/{_REPO}/commit/(?P<rev>[^/]+)$"),
        ("HEAD", "resolve", rf"^/{_REPO}/resolve/(?P<rev>[^/]+)/(?P<path>.+)$"),
        ("GET", "resolve", rf"^/{_REPO}/resolve/(?P<rev>[^/]+)/(?P<path>.+)$"),
    ]
]
_WRITE_ENDPOINTS = {"create_repo", "delete_repo", "preupload", "commit"}


def _make_handler(hub: LocalHub) -> type[BaseHTTPRequestHandler]:
    class Handler(_HubRequestHandler):
        pass

    Handler.hub = hub
    return Handler


class _HubRequestHandler(BaseHTTPRequestHandler):
    hub: LocalHub
    protocol_version = "HTTP/1.1"
    server_version = "jdlora-local-hub/1"

    # Quiet: tests read `hub.requests` instead of a log on stderr.
    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_HEAD(self) -> None:
        self._dispatch("HEAD")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def do_DELETE(self) -> None:
        self._dispatch("DELETE")

    # ------------------------------------------------------------------------------------------------ plumbing

    def _dispatch(self, method: str) -> None:
        split = urlsplit(self.path)
        # Match on the raw path, then unquote each captured part: revisions such as "refs%2Fpr%2F1" are one segment.
        raw_path = split.path
        query = parse_qs(split.query)
        endpoint, params = "unknown", {}
        for route_method, name, pattern in _ROUTES:
            match = pattern.match(raw_path)
            if route_method == method and match:
                endpoint = name
                params = {k: unquote(v) for k, v in match.groupdict().items() if v is not None}
                break
        repo_id = params.get("repo")
        authorized = self._authorized()
        status = 500
        try:
            hold = self.hub._take(self.hub._holds, endpoint, repo_id)
            if hold is not None:
                hold.reached.set()
                hold.released.wait(hold.timeout)
            failure = self.hub._take(self.hub._failures, endpoint, repo_id)
            if failure is not None:
                if failure.disconnect:
                    length = int(self.headers.get("Content-Length") or 0)
                    self.rfile.read(length // 2)
                    self.close_connection = True
                    status = 0
                    with contextlib.suppress(OSError):
                        self.connection.shutdown(2)  # socket.SHUT_RDWR: the client sees the connection drop
                    return
                self._read_body()
                raise HubError(failure.status, failure.message)
            if endpoint == "unknown":
                self._read_body()
                raise HubError(404, f"Not found: {method} {raw_path} (not implemented by the local test Hub)")
            if endpoint in _WRITE_ENDPOINTS and not authorized:
                self._read_body()
                raise HubError(401, "Invalid credentials in Authorization header", headers={"X-Error-Message": ""})
            if endpoint == "whoami" and not authorized:
                raise HubError(401, "Invalid credentials in Authorization header")
            handler = getattr(self, f"_ep_{endpoint}")
            status = handler(params, query) or 200
        except HubError as err:
            status = err.status
            self._send_error(err)
        except (BrokenPipeError, ConnectionResetError):  # the client is gone (e.g. killed while held)
            status = 0
            self.close_connection = True
        except Exception as err:  # a bug in the server: answer 500 rather than hang the client
            status = 500
            self._send_error(HubError(500, f"local test Hub error: {err!r}"))
        finally:
            with self.hub._lock:
                self.hub.requests.append(RequestRecord(method, raw_path, endpoint, status, repo_id, authorized))

    def _authorized(self) -> bool:
        auth = self.headers.get("Authorization", "")
        if not auth.startswith("Bearer ") or not auth[7:].strip():
            return False
        return self.hub.token is None or auth[7:].strip() == self.hub.token

    def _read_body(self) -> bytes:
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _json_body(self) -> Any:
        body = self._read_body()
        try:
            return json.loads(body or b"null")
        except json.JSONDecodeError as err:
            raise HubError(400, f"Invalid JSON body: {err}") from None

    def _send(self, status: int, body: bytes, headers: Optional[dict[str, str]] = None, head_only=False) -> None:
        self.send_response(status)
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if not head_only:
            self.wfile.write(body)

    def _send_json(self, data: Any, status: int = 200, headers: Optional[dict[str, str]] = None) -> int:
        self._send(status, json.dumps(data).encode(), {"Content-Type": "application/json", **(headers or {})})
        return status

    def _send_error(self, err: HubError) -> None:
        headers = {"Content-Type": "application/json", **err.headers}
        if err.code:
            headers["X-Error-Code"] = err.code
        headers.setdefault("X-Error-Message", err.message)
        if not headers["X-Error-Message"]:
            del headers["X-Error-Message"]
        body = json.dumps({"error": err.message, **err.body}).encode()
        self._send(err.status, body, headers, head_only=self.command == "HEAD")

    # ------------------------------------------------------------------------------------------------ endpoints

    def _ep_whoami(self, params: dict, query: dict) -> int:
        return self._send_json(
            {
                "type": "user",
                "name": self.hub.user,
                "fullname": self.hub.user,
                "orgs": [{"type": "org", "name": org, "roleInOrg": "write"} for org in self.hub.orgs],
                "auth": {"type": "access_token", "accessToken": {"displayName": "test", "role": "write"}},
            }
        )

    def _ep_list_models(self, params: dict, query: dict) -> int:
        author = (query.get("author") or [None])[0]
        search = (query.get("search") or [None])[0]
        limit = int((query.get("limit") or [0])[0] or 0)
        full = (query.get("full") or ["false"])[0].lower() in ("1", "true")
        out = []
        with self.hub._lock:
            for repo_id in sorted(self.hub.repos):
                repo = self.hub.repos[repo_id]
                if author and repo_id.split("/")[0] != author:
                    continue
                if search and search.lower() not in repo_id.lower():
                    continue
                commit = repo.commits[repo.branches[DEFAULT_BRANCH]]
                out.append(self.hub._model_json(repo, commit, siblings=full))
        return self._send_json(out[:limit] if limit else out)

    def _ep_model_info(self, params: dict, query: dict) -> int:
        blobs = (query.get("blobs") or ["false"])[0].lower() in ("1", "true")
        with self.hub._lock:
            repo = self.hub._repo(params["repo"])
            commit = self.hub._resolve(repo, params.get("rev", DEFAULT_BRANCH))
            data = self.hub._model_json(repo, commit, siblings=True, blobs=blobs)
        return self._send_json(data)

    def _ep_refs(self, params: dict, query: dict) -> int:
        with self.hub._lock:
            repo = self.hub._repo(params["repo"])
            branches = [
                {"name": name, "ref": f"refs/heads/{name}", "targetCommit": sha} for name, sha in repo.branches.items()
            ]
        return self._send_json({"branches": branches, "converts": [], "tags": [], "pullRequests": []})

    def _ep_tree(self, params: dict, query: dict) -> int:
        recursive = (query.get("recursive") or ["false"])[0].lower() in ("1", "true")
        prefix = params.get("path", "").strip("/")
        with self.hub._lock:
            repo = self.hub._repo(params["repo"])
            commit = self.hub._resolve(repo, params["rev"])
            files = dict(commit.files)
        if prefix and not any(p.startswith(prefix + "/") for p in files):
            raise HubError(404, f"Entry not found: {prefix}", code="EntryNotFound")
        entries: dict[str, dict] = {}
        for path, blob in sorted(files.items()):
            if prefix and not path.startswith(prefix + "/"):
                continue
            rel = path[len(prefix) + 1 :] if prefix else path
            parts = rel.split("/")
            # Folders on the way: listed once each (all of them when recursive, the first level otherwise).
            for depth in range(1, len(parts)):
                if not recursive and depth > 1:
                    break
                folder = "/".join(([prefix] if prefix else []) + parts[:depth])
                entries.setdefault(
                    folder,
                    {"type": "directory", "oid": hashlib.sha1(folder.encode()).hexdigest(), "size": 0, "path": folder},
                )
            if recursive or len(parts) == 1:
                entries[path] = {"type": "file", "oid": blob, "size": self.hub._blob_size(blob), "path": path}
        return self._send_json(list(entries.values()))

    def _ep_create_repo(self, params: dict, query: dict) -> int:
        body = self._json_body() or {}
        if body.get("type", "model") != "model":
            raise HubError(400, "The local test Hub only hosts model repos.")
        name, org = body.get("name"), body.get("organization")
        if not name:
            raise HubError(400, "Missing repo name.")
        repo_id = f"{org or self.hub.user}/{name}"
        if repo_id.split("/")[0] not in (self.hub.user, *self.hub.orgs):
            raise HubError(403, f"You don't have the rights to create a model under the namespace {org!r}.")
        with self.hub._lock:
            if repo_id in self.hub.repos:
                # The Hub names the existing repo's url in its 409 answer; create_repo(exist_ok=True) reads it.
                raise HubError(409, "You already created this model repo", body={"url": f"{self.hub.url}/{repo_id}"})
            self.hub.create_repo(repo_id, private=body.get("visibility") == "private" or bool(body.get("private")))
        return self._send_json({"url": f"{self.hub.url}/{repo_id}", "name": repo_id, "id": repo_id})

    def _ep_delete_repo(self, params: dict, query: dict) -> int:
        body = self._json_body() or {}
        repo_id = f"{body.get('organization') or self.hub.user}/{body.get('name')}"
        self.hub.delete_repo(repo_id)
        return self._send_json({})

    def _ep_validate_yaml(self, params: dict, query: dict) -> int:
        body = self._json_body() or {}
        try:
            _front_matter(body.get("content", ""))
        except ValueError as err:
            self._send_json({"errors": [{"message": str(err)}], "warnings": []}, status=400)
            return 400
        return self._send_json({"errors": [], "warnings": []})

    def _ep_preupload(self, params: dict, query: dict) -> int:
        body = self._json_body() or {}
        with self.hub._lock:
            repo = self.hub._repo(params["repo"])
            commit = self.hub._resolve(repo, params["rev"])
            files = dict(commit.files)
        # "regular" for every file: the content then travels base64-encoded inside the commit itself, so a commit is
        # complete or absent, and no LFS / Xet storage is needed.
        answer = [
            {"path": f["path"], "uploadMode": "regular", "shouldIgnore": False, "oid": files.get(f["path"])}
            for f in body.get("files", [])
        ]
        return self._send_json({"files": answer, "commitOid": commit.sha})

    def _ep_commit(self, params: dict, query: dict) -> int:
        if query.get("create_pr"):
            self._read_body()
            raise HubError(400, "The local test Hub does not support pull requests.")
        body = self._read_body()
        header: dict[str, Any] = {}
        additions: dict[str, bytes] = {}
        deletions: list[str] = []
        for line in body.splitlines():
            if not line.strip():
                continue
            try:
                item = json.loads(line)
            except json.JSONDecodeError as err:
                raise HubError(400, f"Invalid NDJSON line in commit payload: {err}") from None
            key, value = item.get("key"), item.get("value", {})
            if key == "header":
                header = value
            elif key == "file":
                content = value.get("content", "")
                additions[value["path"]] = (
                    base64.b64decode(content) if value.get("encoding") == "base64" else content.encode()
                )
            elif key == "deletedFile":
                deletions.append(value["path"])
            elif key == "deletedFolder":
                deletions.append(value["path"].rstrip("/") + "/")
            elif key == "lfsFile":
                raise HubError(400, "The local test Hub stores regular files only (preupload answers 'regular').")
            else:
                raise HubError(400, f"Unknown commit operation key {key!r}.")
        if not header.get("summary"):
            raise HubError(400, "Missing commit summary.")
        revision = params["rev"]
        with self.hub._lock:
            repo = self.hub._repo(params["repo"])
            if revision not in repo.branches:
                raise HubError(404, f"Invalid rev id: {revision}", code="RevisionNotFound")
            sha = self.hub._commit(
                repo,
                revision,
                additions,
                deletions,
                header["summary"],
                header.get("description", ""),
                parent_commit=header.get("parentCommit"),
            )
        return self._send_json(
            {
                "success": True,
                "commitOid": sha,
                "commitUrl": f"{self.hub.url}/{params['repo']}/commit/{sha}",
                "pullRequestUrl": None,
            }
        )

    def _ep_resolve(self, params: dict, query: dict) -> int:
        with self.hub._lock:
            repo = self.hub._repo(params["repo"])
            commit = self.hub._resolve(repo, params["rev"])
            blob = commit.files.get(params["path"])
        if blob is None:
            raise HubError(404, "Entry not found", code="EntryNotFound", headers={"X-Repo-Commit": commit.sha})
        data = self.hub._read_blob(blob)
        headers = {
            "Content-Type": "application/octet-stream",
            "ETag": f'"{blob}"',
            "X-Repo-Commit": commit.sha,
            "Accept-Ranges": "bytes",
        }
        status = 200
        range_header = self.headers.get("Range")
        if range_header and self.command == "GET":
            match = re.match(r"bytes=(\d+)-(\d*)$", range_header.strip())
            if match:
                start = int(match.group(1))
                end = int(match.group(2)) if match.group(2) else len(data) - 1
                headers["Content-Range"] = f"bytes {start}-{end}/{len(data)}"
                data, status = data[start : end + 1], 206
        self._send(status, data, headers, head_only=self.command == "HEAD")
        return status


# ---------------------------------------------------------------------------------------------------- as a process


def _seed(hub: LocalHub, specs: list[str]) -> None:
    for spec in specs:
        repo_id, _, folder = spec.partition("=")
        hub.commit_folder(repo_id, folder)


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m jdlora_hub.testing.hub_server",
        description="Run a local Hugging Face Hub-compatible server (for tests and offline demos). "
        "Point huggingface_hub at it with HF_ENDPOINT=<printed url> and any HF_TOKEN.",
    )
    parser.add_argument("--data", required=True, help="folder for the server's blobs")
    parser.add_argument("--port", type=int, default=0, help="port on 127.0.0.1 (default: a free one)")
    parser.add_argument("--token", default=None, help="the only token accepted for writes (default: any)")
    parser.add_argument("--org", action="append", default=None, help="organisation the user may write to")
    parser.add_argument("--seed", action="append", default=[], metavar="ORG/NAME=FOLDER", help="upload a folder")
    args = parser.parse_args(argv)
    hub = LocalHub(args.data, token=args.token, orgs=tuple(args.org or ["org"]), port=args.port)
    _seed(hub, args.seed)
    print(hub.url, flush=True)
    try:
        hub._server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        hub._server.server_close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
