"""A local, in-memory Hugging Face Hub for tests.

`LocalHub` is a small HTTP server (standard library only) that speaks the subset of the Hub protocol used by the
*real* `huggingface_hub` client (2.x): creating repos, committing files, tagging, listing refs / trees / commits and
downloading files. Nothing in the client is patched: the client is only told to use ``http://127.0.0.1:<port>`` as
its endpoint (see `configure_hf_client`), so every call goes through HTTP exactly as it would against huggingface.co.

Storage model (per repo): a linear git-like history of commits (sha, message, parent, full file snapshot), branches
(``main`` at creation, like the Hub which also makes an "initial commit" holding ``.gitattributes``) and tags.

Design decisions worth knowing:

* Every file is a regular git blob. The ``preupload`` endpoint answers ``uploadMode: "regular"`` for every file, so
  the client never takes the LFS or Xet upload path, and ``/resolve`` responses never carry ``X-Xet-Hash`` nor a
  ``Link: <...>; rel="xet-auth"`` header, so the client never takes the Xet download path either (even with
  ``hf_xet`` installed). ``ETag`` is the git blob sha1, as the Hub sends for non-LFS files.
* Errors carry the ``X-Error-Code`` header the client maps to exceptions (`huggingface_hub.utils._http`):
  ``RepoNotFound`` -> `RepositoryNotFoundError`, ``RevisionNotFound`` -> `RevisionNotFoundError`,
  ``EntryNotFound`` -> `RemoteEntryNotFoundError`.
* ``LocalHub(token="hf_...")`` enforces ``Authorization: Bearer hf_...`` on write endpoints (401 otherwise) and on
  reads of private repos (401 + ``RepoNotFound``, as the Hub does so that private repos look missing). Without a
  token nothing is enforced.
* Each request is served on its own connection (HTTP/1.0 semantics), so `stop()` leaves no idle keep-alive
  connection behind in the client's shared connection pool.
"""

from __future__ import annotations

import base64
import hashlib
import itertools
import json
import re
import sys
import threading
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import TYPE_CHECKING, Any, Self
from urllib.parse import parse_qs, unquote, urlsplit

if TYPE_CHECKING:
    import pytest

# URL prefix of each repo type, in API routes (`/api/models/...`) and in download routes (`/datasets/...`).
_API_PREFIX_TO_TYPE = {"models": "model", "datasets": "dataset", "spaces": "space"}
_URL_PREFIX = {"model": "", "dataset": "datasets/", "space": "spaces/"}
# Sub-routes that can follow `/api/{type}s/{repo_id}`; used to tell `ns/name/<action>` apart from `name/<action>`.
_REPO_ACTIONS = {"revision", "preupload", "commit", "tag", "branch", "refs", "tree", "commits", "paths-info"}

# What the Hub puts in the "initial commit" of a new repo.
_GITATTRIBUTES = b"*.bin filter=lfs diff=lfs merge=lfs -text\n*.safetensors filter=lfs diff=lfs merge=lfs -text\n"

_sha_counter = itertools.count()


def git_blob_sha(data: bytes) -> str:
    """The git object id of a blob, i.e. what the Hub returns as ETag / `oid` for non-LFS files."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def _now() -> str:
    # The client's `parse_datetime` expects `%Y-%m-%dT%H:%M:%S.%fZ`.
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


@dataclass(frozen=True)
class RecordedRequest:
    """One request as received by the server. Header names are lower-cased; values (authorization too) are kept."""

    method: str
    path: str  # raw path, including the query string
    headers: dict[str, str]

    @property
    def authorization(self) -> str | None:
        return self.headers.get("authorization")


@dataclass
class Commit:
    sha: str
    title: str
    description: str
    parent: str | None
    files: dict[str, bytes]  # full snapshot of the repo at this commit
    date: str
    author: str


@dataclass
class Repo:
    repo_type: str
    repo_id: str
    private: bool
    created_at: str
    commits: dict[str, Commit] = field(default_factory=dict)
    branches: dict[str, str] = field(default_factory=dict)  # name -> commit sha
    tags: dict[str, str] = field(default_factory=dict)  # name -> commit sha

    def resolve(self, revision: str) -> Commit:
        """Branch, then tag, then full or abbreviated (>= 7 chars) commit sha; `refs/heads/x` / `refs/tags/x` too."""
        if revision.startswith("refs/heads/") and revision[len("refs/heads/") :] in self.branches:
            return self.commits[self.branches[revision[len("refs/heads/") :]]]
        if revision.startswith("refs/tags/") and revision[len("refs/tags/") :] in self.tags:
            return self.commits[self.tags[revision[len("refs/tags/") :]]]
        if revision in self.branches:
            return self.commits[self.branches[revision]]
        if revision in self.tags:
            return self.commits[self.tags[revision]]
        if revision in self.commits:
            return self.commits[revision]
        if 7 <= len(revision) < 40:
            matches = [sha for sha in self.commits if sha.startswith(revision.lower())]
            if len(matches) == 1:
                return self.commits[matches[0]]
        raise HubError(404, f"Invalid rev id: {revision}", error_code="RevisionNotFound")

    def history(self, start: Commit) -> Iterator[Commit]:
        """`start` and its ancestors, newest first."""
        commit: Commit | None = start
        while commit is not None:
            yield commit
            commit = self.commits[commit.parent] if commit.parent else None


class HubError(Exception):
    """Raised by route handlers; turned into an HTTP error response shaped like the Hub's."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        error_code: str | None = None,
        headers: Mapping[str, str] | None = None,
        body: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.error_code = error_code
        self.headers = dict(headers or {})
        self.body = dict(body or {})


class LocalHub:
    """In-memory Hugging Face Hub served over HTTP on 127.0.0.1 (see the module docstring).

    Example:
        ```py
        with LocalHub() as hub:
            configure_hf_client(monkeypatch, hub.url, tmp_path)
            HfApi().create_repo("user/repo")
        ```

    Attributes:
        url: the endpoint to give the client (`HF_ENDPOINT`), e.g. ``http://127.0.0.1:54321``.
        requests: every request received, in order (see `RecordedRequest`).
        unhandled: ``(method, path)`` of requests that matched no route (answered 404): a client call this server
            does not implement yet.
        users: further accounts, token -> user name: each may write, and the Hub reports it as its commits' author.
        faults: ``(method, path pattern, status)`` answered instead of the next matching request, each once, in
            order (e.g. ``("POST", "/commit/", 429)``), to test the client's retries. Status 0 holds the request
            unanswered until `release` is set (at most 60 s), then answers 503: a client to kill mid-call.
        held: set while a request is held by a status-0 fault.
    """

    def __init__(
        self,
        *,
        token: str | None = None,
        user: str = "local-user",
        host: str = "127.0.0.1",
        users: Mapping[str, str] | None = None,
    ) -> None:
        self.token = token
        self.user = user
        # more accounts: token -> user name; each may write, and its commits are authored by that name
        self.users = dict(users or {})
        self.host = host
        self.requests: list[RecordedRequest] = []
        self.unhandled: list[tuple[str, str]] = []
        self.faults: list[tuple[str, str, int]] = []
        self.held = threading.Event()
        self.release = threading.Event()
        self._repos: dict[tuple[str, str], Repo] = {}
        self._lock = threading.RLock()
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> Self:
        if self._server is not None:
            return self
        self._server = _Server((self.host, 0), _Handler, hub=self)
        self._thread = threading.Thread(target=self._server.serve_forever, args=(0.05,), name="local-hub", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is None:
            return
        self.release.set()  # a held request must not keep the server from closing
        self._server.shutdown()
        self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self._server = None
        self._thread = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    @property
    def url(self) -> str:
        if self._server is None:
            raise RuntimeError("LocalHub is not started.")
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    # ------------------------------------------------------------------ Python-side API (seeding / inspection)

    def create_repo(self, repo_id: str, *, repo_type: str = "model", private: bool = False) -> Repo:
        """Create a repo with the Hub's "initial commit" (a `.gitattributes` file) on `main`."""
        with self._lock:
            if (repo_type, repo_id) in self._repos:
                raise HubError(
                    409, f"You already created this {repo_type} repo", body={"url": self.repo_url(repo_id, repo_type)}
                )
            repo = Repo(repo_type=repo_type, repo_id=repo_id, private=private, created_at=_now())
            self._repos[(repo_type, repo_id)] = repo
            repo.branches["main"] = self._add_commit(
                repo, None, {".gitattributes": _GITATTRIBUTES}, "initial commit", ""
            ).sha
            return repo

    def get_repo(self, repo_id: str, *, repo_type: str = "model") -> Repo:
        with self._lock:
            try:
                return self._repos[(repo_type, repo_id)]
            except KeyError:
                raise HubError(404, "Repository not found", error_code="RepoNotFound") from None

    def commit(
        self,
        repo_id: str,
        files: Mapping[str, bytes | str],
        *,
        delete: Iterable[str] = (),
        message: str = "Commit from LocalHub",
        branch: str = "main",
        repo_type: str = "model",
    ) -> str:
        """Commit `files` (path -> content) and deletions on `branch`; returns the new commit sha."""
        with self._lock:
            repo = self.get_repo(repo_id, repo_type=repo_type)
            if branch not in repo.branches:
                raise HubError(404, f"Invalid rev id: {branch}", error_code="RevisionNotFound")
            head = repo.commits[repo.branches[branch]]
            snapshot = dict(head.files)
            for path in delete:
                if snapshot.pop(path, None) is None:
                    raise HubError(404, "A file with this name doesn't exist", error_code="EntryNotFound")
            for path, content in files.items():
                snapshot[path] = content.encode() if isinstance(content, str) else content
            commit = self._add_commit(repo, head.sha, snapshot, message, "")
            repo.branches[branch] = commit.sha
            return commit.sha

    def create_tag(self, repo_id: str, tag: str, *, revision: str = "main", repo_type: str = "model") -> str:
        """Tag `revision`; returns the tagged commit sha."""
        with self._lock:
            repo = self.get_repo(repo_id, repo_type=repo_type)
            if tag in repo.tags:
                raise HubError(409, f"Tag {tag} already exists")
            sha = repo.resolve(revision).sha
            repo.tags[tag] = sha
            return sha

    def resolve(self, repo_id: str, revision: str = "main", *, repo_type: str = "model") -> Commit:
        with self._lock:
            return self.get_repo(repo_id, repo_type=repo_type).resolve(revision)

    def read_file(self, repo_id: str, path: str, revision: str = "main", *, repo_type: str = "model") -> bytes:
        return self.resolve(repo_id, revision, repo_type=repo_type).files[path]

    def repo_url(self, repo_id: str, repo_type: str = "model") -> str:
        return f"{self.url}/{_URL_PREFIX[repo_type]}{repo_id}"

    # ------------------------------------------------------------------ internals

    def _add_commit(
        self,
        repo: Repo,
        parent: str | None,
        files: dict[str, bytes],
        title: str,
        description: str,
        author: str | None = None,
    ) -> Commit:
        digest = hashlib.sha1()
        for part in (repo.repo_type, repo.repo_id, parent or "", title, str(next(_sha_counter))):
            digest.update(part.encode() + b"\0")
        for path in sorted(files):
            digest.update(f"{path}\0{git_blob_sha(files[path])}\0".encode())
        commit = Commit(digest.hexdigest(), title, description, parent, files, _now(), author or self.user)
        repo.commits[commit.sha] = commit
        return commit


# ---------------------------------------------------------------------------- HTTP layer


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    # `snapshot_download` opens up to 8 connections at once: keep the listen backlog larger than that.
    request_queue_size = 64

    def __init__(self, address: tuple[str, int], handler: type[BaseHTTPRequestHandler], *, hub: LocalHub) -> None:
        self.hub = hub
        super().__init__(address, handler)


@dataclass
class _Response:
    status: int = 200
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)

    @classmethod
    def json(cls, payload: Any, status: int = 200, headers: Mapping[str, str] | None = None) -> _Response:
        return cls(status, json.dumps(payload).encode(), {"Content-Type": "application/json", **(headers or {})})


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    protocol_version = "HTTP/1.0"  # one request per connection, see module docstring
    server_version = "LocalHub/1.0"
    query: dict[str, list[str]]  # parsed query string of the current request
    body: bytes  # raw body of the current request

    # http.server dispatches on `do_<METHOD>`.
    def do_GET(self) -> None:
        self._dispatch()

    def do_HEAD(self) -> None:
        self._dispatch()

    def do_POST(self) -> None:
        self._dispatch()

    def do_PUT(self) -> None:
        self._dispatch()

    def do_DELETE(self) -> None:
        self._dispatch()

    def log_message(self, format: str, *args: Any) -> None:
        pass  # keep pytest output clean; `LocalHub.requests` records everything

    # ---------------------------------------------------------------- plumbing

    @property
    def hub(self) -> LocalHub:
        return self.server.hub

    def _dispatch(self) -> None:
        headers = {name.lower(): value for name, value in self.headers.items()}
        with self.hub._lock:
            self.hub.requests.append(RecordedRequest(self.command, self.path, headers))
        self.body = self._read_body()
        split = urlsplit(self.path)
        self.query = parse_qs(split.query, keep_blank_values=True)
        with self.hub._lock:
            fault = next((f for f in self.hub.faults if f[0] == self.command and re.search(f[1], split.path)), None)
            if fault is not None:
                self.hub.faults.remove(fault)
        if fault is not None:
            if fault[2] == 0:
                self.hub.held.set()
                self.hub.release.wait(timeout=60)
            status = fault[2] or 503
            try:
                self._send(_Response.json({"error": f"injected fault {status}"}, status=status))
            except OSError:
                pass  # the client was killed while held
            return
        try:
            with self.hub._lock:
                response = self._route(split.path)
        except HubError as err:
            response = self._error_response(err)
        except Exception as err:  # noqa: BLE001 - a bug in the fake hub: make it visible client-side
            # 501 rather than 500: the client retries 500/502/503/504 with backoff (~20 s) before giving up.
            response = _Response.json({"error": f"LocalHub internal error: {err!r}"}, status=501)
            print(f"LocalHub: {self.command} {self.path} failed: {err!r}", file=sys.stderr)
        self._send(response)

    def _read_body(self) -> bytes:
        # The whole body must be consumed, even when answering an error.
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass  # trailers
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _error_response(self, err: HubError) -> _Response:
        headers = {"X-Error-Message": err.message, **err.headers}
        if err.error_code:
            headers["X-Error-Code"] = err.error_code
        return _Response.json({"error": err.message, **err.body}, status=err.status, headers=headers)

    def _send(self, response: _Response) -> None:
        self.send_response(response.status)
        headers = {"Content-Length": str(len(response.body)), **response.headers}
        for name, value in headers.items():
            self.send_header(name, value)
        self.end_headers()
        if self.command != "HEAD" and response.body:
            self.wfile.write(response.body)

    def _json_body(self) -> Any:
        try:
            return json.loads(self.body or b"{}")
        except json.JSONDecodeError as err:
            raise HubError(400, f"Invalid JSON body: {err}") from None

    def _flag(self, name: str) -> bool:
        return self.query.get(name, ["false"])[-1].lower() in ("1", "true")

    # ---------------------------------------------------------------- auth

    def _bearer(self) -> str | None:
        value = self.headers.get("Authorization", "")
        return value[len("Bearer ") :] if value.startswith("Bearer ") else None

    def _user(self) -> str | None:
        """The account the bearer token belongs to, `None` for none or an unknown token."""
        token = self._bearer()
        if token is not None and token == self.hub.token:
            return self.hub.user
        return self.hub.users.get(token) if token is not None else None

    def _require_write(self) -> None:
        """Write endpoints: 401 unless the configured token is sent (no-op when the hub has no token)."""
        if (self.hub.token is None and not self.hub.users) or self._user() is not None:
            return
        if self._bearer() is not None:
            # The client special-cases this exact message (not turned into RepositoryNotFoundError).
            raise HubError(401, "Invalid credentials in Authorization header")
        raise HubError(401, "You must be authenticated to access this endpoint (Authorization: Bearer <token>).")

    def _readable_repo(self, repo_type: str, repo_id: str) -> Repo:
        """Reads: a private repo without the right token is reported as missing (401 + RepoNotFound), like the Hub."""
        repo = self.hub.get_repo(repo_id, repo_type=repo_type)
        if repo.private and (self.hub.token is not None or self.hub.users) and self._user() is None:
            raise HubError(401, "Repository not found", error_code="RepoNotFound")
        return repo

    def _writable_repo(self, repo_type: str, repo_id: str) -> Repo:
        self._require_write()
        return self.hub.get_repo(repo_id, repo_type=repo_type)

    # ---------------------------------------------------------------- routing

    def _route(self, path: str) -> _Response:
        segments = [unquote(s) for s in path.strip("/").split("/")] if path.strip("/") else []
        method = "GET" if self.command == "HEAD" else self.command
        if segments[:1] == ["api"]:
            rest = segments[1:]
            if rest == ["whoami-v2"] and method == "GET":
                return self._whoami()
            if rest == ["repos", "create"] and method == "POST":
                return self._create_repo()
            if rest == ["repos", "delete"] and method == "DELETE":
                return self._delete_repo()
            if rest == ["validate-yaml"] and method == "POST":
                # Called by `create_commit` when a README.md is committed (model cards).
                return _Response.json({"errors": [], "warnings": []})
            if len(rest) == 3 and rest[0] == "organizations" and rest[2] == "overview" and method == "GET":
                # This Hub hosts users only. Asked by `kernels`' publisher trust check, which bitsandbytes runs as it
                # is imported (through peft) on CPUs with AVX512-BF16; it then falls back to its own kernel.
                raise HubError(404, "Organization not found")
            if len(rest) >= 2 and rest[0] in _API_PREFIX_TO_TYPE:
                response = self._route_repo_api(method, _API_PREFIX_TO_TYPE[rest[0]], rest[1:])
                if response is not None:
                    return response
        else:
            response = self._route_resolve(path)
            if response is not None:
                return response
        self.hub.unhandled.append((self.command, self.path))
        raise HubError(404, f"LocalHub: no route for {self.command} {path}")

    def _split_repo_id(self, repo_type: str, rest: list[str]) -> tuple[str, list[str]]:
        """`[ns, name, *tail]` or (canonical repo ids without namespace) `[name, *tail]`."""
        if len(rest) >= 2 and (rest[1] not in _REPO_ACTIONS or (repo_type, f"{rest[0]}/{rest[1]}") in self.hub._repos):
            return f"{rest[0]}/{rest[1]}", rest[2:]
        return rest[0], rest[1:]

    def _route_repo_api(self, method: str, repo_type: str, rest: list[str]) -> _Response | None:
        repo_id, tail = self._split_repo_id(repo_type, rest)
        action, args = (tail[0], tail[1:]) if tail else ("", [])
        match method, action, len(args):
            case "GET", "", 0:
                return self._repo_info(repo_type, repo_id, "main")
            case "GET", "revision", 1:
                return self._repo_info(repo_type, repo_id, args[0])
            case "POST", "preupload", 1:
                return self._preupload(repo_type, repo_id, args[0])
            case "POST", "commit", 1:
                return self._commit(repo_type, repo_id, args[0])
            case "POST", "tag", 1:
                return self._create_tag(repo_type, repo_id, args[0])
            case "DELETE", "tag", 1:
                return self._delete_tag(repo_type, repo_id, args[0])
            case "POST", "branch", 1:
                return self._create_branch(repo_type, repo_id, args[0])
            case "DELETE", "branch", 1:
                return self._delete_branch(repo_type, repo_id, args[0])
            case "GET", "refs", 0:
                return self._refs(repo_type, repo_id)
            case "GET", "tree", n if n >= 1:
                # `list_repo_tree` quotes the folder with safe="" (one segment), but accept `a/b` too.
                return self._tree(repo_type, repo_id, args[0], "/".join(args[1:]))
            case "GET", "commits", 1:
                return self._commits(repo_type, repo_id, args[0])
            case "POST", "paths-info", 1:
                return self._paths_info(repo_type, repo_id, args[0])
        return None

    def _route_resolve(self, path: str) -> _Response | None:
        """`HEAD|GET /[datasets/|spaces/]{repo_id}/resolve/{revision}/{path}` (`hf_hub_url`)."""
        if self.command not in ("GET", "HEAD"):
            return None
        raw = path.strip("/").split("/")
        if "resolve" not in raw:
            return None
        index = raw.index("resolve")
        prefix, tail = raw[:index], raw[index + 1 :]
        repo_type = "model"
        if prefix and prefix[0] in ("datasets", "spaces") and len(prefix) > 1:
            repo_type, prefix = _API_PREFIX_TO_TYPE[prefix[0]], prefix[1:]
        if not 1 <= len(prefix) <= 2 or len(tail) < 2:
            return None
        # The revision is quoted with safe="" (`refs%2Fpr%2F1` is one segment); the filename keeps its slashes.
        return self._resolve(
            repo_type, "/".join(unquote(s) for s in prefix), unquote(tail[0]), "/".join(unquote(s) for s in tail[1:])
        )

    # ---------------------------------------------------------------- account / repos

    def _whoami(self) -> _Response:
        token, user = self._bearer(), self._user()
        if token is None or ((self.hub.token is not None or self.hub.users) and user is None):
            raise HubError(401, "Invalid credentials in Authorization header")
        return _Response.json(
            {
                "type": "user",
                "id": "0" * 24,
                "name": user or self.hub.user,
                "fullname": user or self.hub.user,
                "orgs": [],
                "auth": {"type": "access_token", "accessToken": {"displayName": "local", "role": "write"}},
            }
        )

    def _create_repo(self) -> _Response:
        """`HfApi.create_repo`: 409 with the repo `url` in the body if it exists (read by the client with exist_ok)."""
        self._require_write()
        payload = self._json_body()
        repo_type = payload.get("type") or "model"
        if repo_type not in _URL_PREFIX:
            raise HubError(400, f"Unsupported repo type: {repo_type}")
        repo_id = f"{payload.get('organization') or self.hub.user}/{payload['name']}"
        private = payload.get("visibility") == "private" or payload.get("private") is True
        self.hub.create_repo(repo_id, repo_type=repo_type, private=private)
        return _Response.json({"url": self.hub.repo_url(repo_id, repo_type), "name": repo_id, "id": repo_id})

    def _delete_repo(self) -> _Response:
        self._require_write()
        payload = self._json_body()
        repo_type = payload.get("type") or "model"
        repo_id = f"{payload.get('organization') or self.hub.user}/{payload['name']}"
        self.hub.get_repo(repo_id, repo_type=repo_type)
        del self.hub._repos[(repo_type, repo_id)]
        return _Response.json({})

    def _repo_info(self, repo_type: str, repo_id: str, revision: str) -> _Response:
        """`model_info` / `repo_info` / `repo_exists` / `revision_exists`, and `resolve_revision` (transformers,
        `snapshot_download`) which only needs `sha`. `?blobs=true` (files_metadata) adds sizes and blob ids."""
        repo = self._readable_repo(repo_type, repo_id)
        commit = repo.resolve(revision)
        blobs = self._flag("blobs")
        siblings = [
            {"rfilename": path, **({"size": len(data), "blobId": git_blob_sha(data)} if blobs else {})}
            for path, data in sorted(commit.files.items())
        ]
        info: dict[str, Any] = {
            "_id": hashlib.sha1(f"{repo_type}/{repo_id}".encode()).hexdigest()[:24],
            "id": repo_id,
            "author": repo_id.split("/")[0] if "/" in repo_id else None,
            "sha": commit.sha,
            "lastModified": commit.date,
            "createdAt": repo.created_at,
            "private": repo.private,
            "gated": False,
            "disabled": False,
            "downloads": 0,
            "likes": 0,
            "tags": [],
            "siblings": siblings,
            "usedStorage": sum(len(data) for data in commit.files.values()),
        }
        if repo_type == "model":
            info["modelId"] = repo_id
        return _Response.json(info)

    # ---------------------------------------------------------------- uploads

    def _preupload(self, repo_type: str, repo_id: str, revision: str) -> _Response:
        """Asked before every commit (`create_commit`, and `upload_folder`'s xet pipeline): answering "regular" for
        every file keeps the client away from LFS/Xet. `oid` (git sha1 of the remote file) lets the client skip
        unchanged files, like on the Hub."""
        repo = self._writable_repo(repo_type, repo_id)
        files = repo.resolve(revision).files
        entries = self._json_body().get("files", [])
        return _Response.json(
            {
                "files": [
                    {
                        "path": entry["path"],
                        "uploadMode": "regular",
                        "shouldIgnore": False,
                        "oid": git_blob_sha(files[entry["path"]]) if entry["path"] in files else None,
                    }
                    for entry in entries
                ],
                "commitOid": repo.resolve(revision).sha,
            }
        )

    def _commit(self, repo_type: str, repo_id: str, revision: str) -> _Response:
        """`create_commit` / `upload_file` / `upload_folder` / `delete_file`: ndjson body made of a `header` line
        (summary, description, optional parentCommit) then `file` (base64 content), `deletedFile` and
        `deletedFolder` lines. `lfsFile` lines never come since preupload always answers "regular"."""
        repo = self._writable_repo(repo_type, repo_id)
        if self._flag("create_pr"):
            raise HubError(400, "LocalHub does not support pull requests (create_pr).")
        branch = revision.removeprefix("refs/heads/")
        if branch not in repo.branches:
            repo.resolve(revision)  # 404 RevisionNotFound if it is nothing at all
            raise HubError(400, f"Cannot commit to {revision}: not a branch.")
        head = repo.commits[repo.branches[branch]]
        lines = [json.loads(line) for line in self.body.decode().splitlines() if line.strip()]
        if not lines or lines[0].get("key") != "header":
            raise HubError(400, "The first ndjson line must be the commit header.")
        header = lines[0]["value"]
        parent = header.get("parentCommit")
        if parent and not head.sha.startswith(parent.lower()):
            raise HubError(412, "A commit has happened since. Please refresh and try again.")
        snapshot = dict(head.files)
        for line in lines[1:]:
            key, value = line.get("key"), line.get("value", {})
            if key == "file":
                content = value["content"]
                snapshot[value["path"]] = (
                    base64.b64decode(content) if value.get("encoding") == "base64" else content.encode()
                )
            elif key == "deletedFile":
                if snapshot.pop(value["path"], None) is None:
                    raise HubError(404, "A file with this name doesn't exist", error_code="EntryNotFound")
            elif key == "deletedFolder":
                prefix = value["path"].rstrip("/") + "/"
                doomed = [path for path in snapshot if path.startswith(prefix)]
                if not doomed:
                    raise HubError(404, "A folder with this name doesn't exist", error_code="EntryNotFound")
                for path in doomed:
                    del snapshot[path]
            elif key == "lfsFile":
                raise HubError(400, "LocalHub stores regular files only (preupload never asks for LFS).")
            else:
                raise HubError(400, f"Unknown commit operation: {key!r}")
        commit = self.hub._add_commit(
            repo, head.sha, snapshot, header.get("summary", ""), header.get("description", ""), self._user()
        )
        repo.branches[branch] = commit.sha
        url = f"{self.hub.repo_url(repo_id, repo_type)}/commit/{commit.sha}"
        return _Response.json({"success": True, "commitOid": commit.sha, "commitUrl": url, "hookOutput": ""})

    # ---------------------------------------------------------------- refs

    def _create_tag(self, repo_type: str, repo_id: str, revision: str) -> _Response:
        """`create_tag`: `POST .../tag/{revision}` with `{"tag": name}`; 409 if it exists (ignored with exist_ok)."""
        repo = self._writable_repo(repo_type, repo_id)
        tag = self._json_body()["tag"]
        if tag in repo.tags:
            raise HubError(409, f"Tag {tag} already exists")
        repo.tags[tag] = repo.resolve(revision).sha
        return _Response.json({"name": tag, "ref": f"refs/tags/{tag}", "targetCommit": repo.tags[tag]})

    def _delete_tag(self, repo_type: str, repo_id: str, tag: str) -> _Response:
        repo = self._writable_repo(repo_type, repo_id)
        if repo.tags.pop(tag, None) is None:
            raise HubError(404, f"Invalid rev id: {tag}", error_code="RevisionNotFound")
        return _Response.json({})

    def _create_branch(self, repo_type: str, repo_id: str, branch: str) -> _Response:
        """`create_branch`: `{"startingPoint": revision}` (defaults to main's head); 409 if it exists."""
        repo = self._writable_repo(repo_type, repo_id)
        if branch in repo.branches:
            raise HubError(409, f"Branch {branch} already exists")
        repo.branches[branch] = repo.resolve(self._json_body().get("startingPoint") or "main").sha
        return _Response.json({})

    def _delete_branch(self, repo_type: str, repo_id: str, branch: str) -> _Response:
        repo = self._writable_repo(repo_type, repo_id)
        if branch == "main":
            raise HubError(403, "Cannot delete the default branch")
        if repo.branches.pop(branch, None) is None:
            raise HubError(404, f"Invalid rev id: {branch}", error_code="RevisionNotFound")
        return _Response.json({})

    def _refs(self, repo_type: str, repo_id: str) -> _Response:
        """`list_repo_refs`."""
        repo = self._readable_repo(repo_type, repo_id)

        def refs(names: dict[str, str], kind: str) -> list[dict[str, str]]:
            return [{"name": n, "ref": f"refs/{kind}/{n}", "targetCommit": sha} for n, sha in sorted(names.items())]

        return _Response.json(
            {
                "branches": refs(repo.branches, "heads"),
                "tags": refs(repo.tags, "tags"),
                "converts": [],
                "pullRequests": [],
            }
        )

    # ---------------------------------------------------------------- listing

    def _entries(self, repo: Repo, commit: Commit, paths: Iterable[str], expand: bool) -> list[dict[str, Any]]:
        """Tree entries shaped like the Hub's (`RepoFile` / `RepoFolder`) for existing files and folders."""
        files = commit.files
        entries: list[dict[str, Any]] = []
        for path in paths:
            if path in files:
                entry: dict[str, Any] = {
                    "type": "file",
                    "oid": git_blob_sha(files[path]),
                    "size": len(files[path]),
                    "path": path,
                }
                if expand:
                    entry["lastCommit"] = self._last_commit(repo, commit, path)
                entries.append(entry)
            else:
                prefix = path + "/"
                members = sorted(p for p in files if p.startswith(prefix))
                if members:
                    oid = hashlib.sha1(
                        "".join(f"{p}\0{git_blob_sha(files[p])}\0" for p in members).encode()
                    ).hexdigest()
                    entries.append({"type": "directory", "oid": oid, "size": 0, "path": path})
        return entries

    @staticmethod
    def _last_commit(repo: Repo, commit: Commit, path: str) -> dict[str, str]:
        """Oldest commit in the unbroken run of ancestors of `commit` holding this exact version of `path`."""
        data, last = commit.files[path], commit
        for ancestor in repo.history(commit):
            if ancestor.files.get(path) != data:
                break
            last = ancestor
        return {"id": last.sha, "title": last.title, "date": last.date}

    def _tree(self, repo_type: str, repo_id: str, revision: str, path: str) -> _Response:
        """`list_repo_tree` / `list_repo_files` / `snapshot_download`: `?recursive=true` lists the whole subtree
        (folders included), otherwise direct children only. Everything fits in one page (no `Link: next`)."""
        repo = self._readable_repo(repo_type, repo_id)
        commit = repo.resolve(revision)
        base = path.strip("/")
        prefix = f"{base}/" if base else ""
        if base and not any(p.startswith(prefix) for p in commit.files):
            raise HubError(
                404, f"Entry not found: {base}", error_code="EntryNotFound", headers={"X-Repo-Commit": commit.sha}
            )
        recursive = self._flag("recursive")
        paths: set[str] = set()
        for file_path in commit.files:
            if not file_path.startswith(prefix):
                continue
            parts = file_path[len(prefix) :].split("/")
            depth = len(parts) if recursive else 1
            for i in range(1, depth + 1):
                paths.add(prefix + "/".join(parts[:i]))
        return _Response.json(self._entries(repo, commit, sorted(paths), self._flag("expand")))

    def _paths_info(self, repo_type: str, repo_id: str, revision: str) -> _Response:
        """`get_paths_info` (also used for copy operations): form-encoded `paths=...&expand=...`; unknown paths are
        silently skipped."""
        repo = self._readable_repo(repo_type, repo_id)
        commit = repo.resolve(revision)
        form = parse_qs(self.body.decode(), keep_blank_values=True)
        expand = form.get("expand", ["false"])[-1].lower() in ("1", "true")
        paths = [p.strip("/") for p in form.get("paths", [])]
        return _Response.json(self._entries(repo, commit, paths, expand))

    def _commits(self, repo_type: str, repo_id: str, revision: str) -> _Response:
        """`list_repo_commits`: newest first, in one page."""
        repo = self._readable_repo(repo_type, repo_id)
        return _Response.json(
            [
                {
                    "id": c.sha,
                    "title": c.title,
                    "message": c.description,
                    "authors": [{"user": c.author, "avatar": None}],
                    "date": c.date,
                }
                for c in repo.history(repo.resolve(revision))
            ]
        )

    # ---------------------------------------------------------------- downloads

    def _resolve(self, repo_type: str, repo_id: str, revision: str, path: str) -> _Response:
        """`hf_hub_download` / `file_exists` / `get_hf_file_metadata` (HEAD) and the download itself (GET).

        The client needs `X-Repo-Commit` (commit the revision resolved to, also on EntryNotFound so it can cache
        the miss), a quoted `ETag` (blob name in the cache) and `Content-Length` (expected size). No Xet headers,
        no redirect: the body is served right here. `Range: bytes=a-b` is honoured (the client resumes with it)."""
        repo = self._readable_repo(repo_type, repo_id)
        commit = repo.resolve(revision)
        if path not in commit.files:
            raise HubError(404, "Entry not found", error_code="EntryNotFound", headers={"X-Repo-Commit": commit.sha})
        data = commit.files[path]
        headers = {
            "Content-Type": "application/octet-stream",
            "ETag": f'"{git_blob_sha(data)}"',
            "X-Repo-Commit": commit.sha,
            "Accept-Ranges": "bytes",
        }
        range_header = self.headers.get("Range", "")
        if self.command == "GET" and range_header.startswith("bytes="):
            start_s, _, end_s = range_header[len("bytes=") :].partition("-")
            if start_s:
                start, end = int(start_s), int(end_s) if end_s else len(data) - 1
            else:  # suffix range: the last N bytes
                start, end = max(len(data) - int(end_s), 0), len(data) - 1
            if start >= len(data) or start > end:
                return _Response(416, b"", {**headers, "Content-Range": f"bytes */{len(data)}"})
            end = min(end, len(data) - 1)
            return _Response(
                206, data[start : end + 1], {**headers, "Content-Range": f"bytes {start}-{end}/{len(data)}"}
            )
        return _Response(200, data, headers)


# ---------------------------------------------------------------------------- pytest helpers


def configure_hf_client(monkeypatch: pytest.MonkeyPatch, endpoint: str, home: Path) -> None:
    """Point the in-process `huggingface_hub` client (hence transformers and PEFT) at `endpoint`, for one test.

    `HF_ENDPOINT` alone is not enough once `huggingface_hub` is imported, which it always is under pytest: the client
    reads it at import time into module constants and module-level objects. So this sets the environment variables
    (for code that reads them later and for subprocesses) *and* patches every place that captured a value:

    * `constants.ENDPOINT` (HfApi default endpoint) and `constants.HUGGINGFACE_CO_URL_TEMPLATE` (what `hf_hub_url`,
      hence `hf_hub_download` / `file_exists`, actually formats: it does not read `ENDPOINT`);
    * `huggingface_hub.hf_api.api.endpoint`: the module-level `HfApi()` behind the top-level functions
      (`huggingface_hub.file_exists`, `model_info`, `create_repo`, ...: PEFT calls `file_exists` this way);
    * `transformers.utils.hub._hf_api`: transformers' shared `HfApi` (used by `resolve_revision` in every
      `from_pretrained`) is reset so that it is rebuilt with the patched endpoint (and restored after the test, so
      that no instance pointing at the dead server outlives it);
    * `HfFileSystem`'s instance cache (fsspec caches instances with the endpoint they were built with) is swapped
      for a test-local one;
    * cache / token locations (`HF_HOME`, `HF_HUB_CACHE`, `HF_TOKEN_PATH`, ...) moved under `home`, so no real token
      is sent to the local server and nothing is read from the user's cache; `HF_TOKEN` is removed (tests set it);
    * telemetry disabled (`HF_HUB_DISABLE_TELEMETRY`), offline mode off.

    Redirect allow-listing (`utils._http._HUB_ORIGINS`, `constants.HF_URL_HOSTS`) is left alone: the local hub
    never redirects.
    """
    import huggingface_hub
    from huggingface_hub import constants

    home = Path(home)
    hub_cache, xet_cache, assets_cache = home / "hub", home / "xet", home / "assets"
    token_path = home / "token"
    for name, value in {
        "HF_ENDPOINT": endpoint,
        "HF_HOME": home,
        "HF_HUB_CACHE": hub_cache,
        "HF_XET_CACHE": xet_cache,
        "HF_ASSETS_CACHE": assets_cache,
        "HF_TOKEN_PATH": token_path,
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "HF_HUB_DISABLE_UPDATE_CHECK": "1",
    }.items():
        monkeypatch.setenv(name, str(value))
    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_OIDC_RESOURCE"):
        monkeypatch.delenv(name, raising=False)

    for name, value in {
        "ENDPOINT": endpoint,
        "HUGGINGFACE_CO_URL_TEMPLATE": endpoint + "/{repo_id}/resolve/{revision}/{filename}",
        "HF_HOME": str(home),
        "HF_HUB_CACHE": str(hub_cache),
        "HUGGINGFACE_HUB_CACHE": str(hub_cache),
        "HF_XET_CACHE": str(xet_cache),
        "HF_ASSETS_CACHE": str(assets_cache),
        "HF_TOKEN_PATH": str(token_path),
        "HF_STORED_TOKENS_PATH": str(home / "stored_tokens"),
        "HF_HUB_DISABLE_TELEMETRY": True,
        "HF_HUB_DISABLE_IMPLICIT_TOKEN": False,
        "HF_HUB_OFFLINE": False,
    }.items():
        monkeypatch.setattr(constants, name, value)

    monkeypatch.setattr(huggingface_hub.hf_api.api, "endpoint", endpoint)
    # A test-local instance cache: instances built during the test hold an endpoint that dies with the server.
    monkeypatch.setattr(huggingface_hub.HfFileSystem, "_cache", {})
    try:  # imported here (not only when already imported) so that the pre-test value is what gets restored
        import transformers.utils.hub as transformers_hub
    except ImportError:
        transformers_hub = None
    if transformers_hub is not None and hasattr(transformers_hub, "_hf_api"):
        monkeypatch.setattr(transformers_hub, "_hf_api", None)


def local_hub_fixture(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[LocalHub]:
    """Pytest fixture body: a started `LocalHub` (no token enforced) with the HF client pointed at it.

    Use from a conftest (the `tests/` folder is on `sys.path` under pytest's default import mode)::

        import pytest
        from hub_server import local_hub_fixture

        local_hub = pytest.fixture(local_hub_fixture)

    How the client is pointed at the server: see `configure_hf_client` (env vars + monkeypatched constants and
    module-level `HfApi` instances; the HF cache and token file live in ``tmp_path / "hf_home"``). For a hub that
    requires a token, build ``LocalHub(token=...)`` yourself and call `configure_hf_client` with its url.
    """
    with LocalHub() as hub:
        configure_hf_client(monkeypatch, hub.url, tmp_path / "hf_home")
        yield hub


__all__ = [
    "Commit",
    "HubError",
    "LocalHub",
    "RecordedRequest",
    "Repo",
    "configure_hf_client",
    "git_blob_sha",
    "local_hub_fixture",
]

if __name__ == "__main__":  # manual debugging: `python tests/hub_server.py`, then HF_ENDPOINT=<printed url>
    with LocalHub() as _hub:
        print(f"LocalHub listening on {_hub.url}", flush=True)
        threading.Event().wait()
