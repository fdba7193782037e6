"""A small, stdlib-only HTTP server implementing the subset of the Hugging Face Hub API used by ``huggingface_hub``.

The goal is to let tests push models / pipelines and load them back *by repo id* with the unmodified
``huggingface_hub`` (and therefore ``transformers`` / ``diffusers``) client, without any network access.

Everything lives in memory: repos (model / dataset / space / kernel), git-like commits with full file snapshots,
branches, tags and pull-request refs (``refs/pr/N``). Files are always stored "regular" (inline, base64 in the
commit payload): the preupload route never asks for LFS, so neither LFS nor Xet transfers are involved.

Routes (``{t}`` is ``models|datasets|spaces|kernels``, ``{repo}`` is ``namespace/name``, ``{rev}`` is a branch, a
tag, a (possibly short) commit sha or ``refs/pr/N``, usually URL-encoded as one path segment):

* ``GET  /api/whoami-v2``
* ``POST /api/repos/create`` · ``DELETE /api/repos/delete`` · ``POST /api/repos/move``
* ``PUT  /api/{t}/{repo}/settings``
* ``POST /api/validate-yaml``
* ``GET  /api/{t}`` (list repos, minimal) · ``GET /api/{t}/{repo}`` · ``GET /api/{t}/{repo}/revision/{rev}``
* ``GET  /api/{t}/{repo}/tree/{rev}[/{path}]`` (``recursive``, ``expand``, cursor pagination through ``Link``)
* ``POST /api/{t}/{repo}/paths-info/{rev}``
* ``POST /api/{t}/{repo}/preupload/{rev}`` · ``POST /api/{t}/{repo}/commit/{rev}`` (NDJSON, ``create_pr=1``)
* ``GET  /api/{t}/{repo}/commits/{rev}`` · ``GET /api/{t}/{repo}/refs``
* ``POST|DELETE /api/{t}/{repo}/branch/{branch}`` · ``POST /api/{t}/{repo}/tag/{rev}`` · ``DELETE .../tag/{tag}``
* ``GET  /api/{t}/{repo}/auth-check[/write]``
* ``POST /api/{t}/{repo}/discussions/{num}/merge`` · ``POST /api/{t}/{repo}/discussions/{num}/status``
* ``GET|HEAD /[{t}/]{repo}/resolve/{rev}/{path}`` (and ``/raw/``), with ``Range`` support

Any other request gets a 404 without ``X-Error-Code`` and is recorded in :attr:`LocalHub.unhandled_requests`, so a
test can assert that a client flow stayed within the implemented subset.

Example::

    with LocalHub() as hub:
        env = hub.env(hf_home="/tmp/hf")  # HF_ENDPOINT, HF_TOKEN, HF_HUB_DISABLE_XET, ... for a subprocess
        hub.run_python("from huggingface_hub import whoami; print(whoami())", hf_home="/tmp/hf")
"""

from __future__ import annotations

import base64
import hashlib
import itertools
import json
import os
import re
import socket
import subprocess
import sys
import threading
import traceback
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from email.message import Message
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import TracebackType
from typing import Any
from urllib.parse import parse_qs, unquote, urlencode, urlsplit

__all__ = ["DEFAULT_TOKEN", "DEFAULT_USER", "HubError", "LocalHub"]

DEFAULT_USER = "local-user"
DEFAULT_TOKEN = "hf_localhub_dummy_token"
DEFAULT_BRANCH = "main"

# URL segment <-> repo type. Models have no prefix in file URLs (``/{repo}/resolve/...``), the others do.
_API_TYPES = {"models": "model", "datasets": "dataset", "spaces": "space", "kernels": "kernel"}
_TYPE_URL_PREFIX = {"model": "", "dataset": "datasets/", "space": "spaces/", "kernel": "kernels/"}

# What a fresh repo on huggingface.co starts with: an "initial commit" holding a .gitattributes. Mirroring it keeps
# tests honest (list_repo_files / snapshot_download see the same extra file as they would on the real Hub).
_GITATTRIBUTES = "".join(
    f"{pattern} filter=lfs diff=lfs merge=lfs -text\n"
    for pattern in """
        *.7z *.arrow *.bin *.bz2 *.ckpt *.ftz *.gz *.h5 *.joblib *.lfs.* *.mlmodel *.model *.msgpack *.npy *.npz
        *.onnx *.ot *.parquet *.pb *.pickle *.pkl *.pt *.pth *.rar *.safetensors saved_model/**/* *.tar.* *.tar
        *.tflite *.tgz *.wasm *.xz *.zip *.zst *tfevents*
    """.split()
).encode()

# Repo names as accepted by the Hub: alphanumerics, '-', '_', '.'; no '--' or '..'; at most 96 characters.
_REPO_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,95}$")
_COMMIT_SHA_RE = re.compile(r"^[0-9a-f]{7,40}$")
_PR_REF_RE = re.compile(r"^refs/pr/(\d+)$")

# Path fragments for the route table (matched against the *raw*, still percent-encoded, request path).
_T = r"(?P<t>models|datasets|spaces|kernels)"
# A repo id is ``namespace/name``; a single segment is accepted too so that canonical-style ids ("gpt2") get a proper
# RepoNotFound answer instead of an "unhandled route" 404.
_R = r"(?P<repo>[^/]+(?:/[^/]+)?)"
# Revisions are URL-encoded as a single segment by the client; also accept raw ``refs/pr/N`` / ``refs/convert/x``.
_REV = r"(?P<rev>refs/pr/\d+|refs/convert/[^/]+|[^/]+)"


def _now_iso() -> str:
    """Current UTC time in the Hub's date format (``2024-01-31T12:34:56.789Z``), parseable by ``parse_datetime``."""
    now = datetime.now(timezone.utc)
    return now.strftime("%Y-%m-%dT%H:%M:%S.") + f"{now.microsecond // 1000:03d}Z"


def git_blob_sha1(data: bytes) -> str:
    """Git blob object id of ``data``: what the Hub reports as ``oid``/``ETag`` for regular (non-LFS) files."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def _truthy(value: str | None) -> bool:
    """Interpret a query/form flag the way the Hub does (``1``/``true``/``True``)."""
    return value is not None and value.lower() in {"1", "true", "yes", "on"}


class HubError(Exception):
    """An error answered to the client: JSON ``{"error": message}`` plus the ``X-Error-*`` headers.

    ``huggingface_hub.utils.hf_raise_for_status`` maps ``X-Error-Code`` to exception classes
    (``RepoNotFound`` -> ``RepositoryNotFoundError``, ``RevisionNotFound`` -> ``RevisionNotFoundError``,
    ``EntryNotFound`` -> ``RemoteEntryNotFoundError``), so the code matters more than the status.
    """

    def __init__(
        self,
        status: int,
        message: str,
        error_code: str | None = None,
        headers: Mapping[str, str] | None = None,
        extra: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.error_code = error_code
        self.headers = dict(headers or {})
        self.extra = dict(extra or {})  # additional JSON body fields


@dataclass(frozen=True)
class Commit:
    """One commit: a full snapshot of the repo's files (``path -> blob oid``) plus git-like metadata."""

    oid: str
    parents: tuple[str, ...]
    title: str
    message: str
    author: str
    date: str
    files: Mapping[str, str]


@dataclass
class PullRequest:
    """A pull request created by ``create_commit(create_pr=True)``; its head lives at ``refs/pr/{num}``."""

    num: int
    title: str
    target_branch: str
    base_commit: str
    head_commit: str
    status: str = "open"


@dataclass
class Repo:
    """In-memory state of one repository."""

    repo_type: str
    repo_id: str
    private: bool
    created_at: str
    commits: dict[str, Commit] = field(default_factory=dict)
    branches: dict[str, str] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)
    pull_requests: dict[int, PullRequest] = field(default_factory=dict)
    next_discussion_num: int = 1
    gated: bool | str = False


@dataclass
class _Request:
    """A parsed HTTP request as seen by a route handler."""

    method: str
    path: str
    query: dict[str, list[str]]
    headers: Message
    body: bytes
    params: dict[str, str]

    def q(self, name: str, default: str | None = None) -> str | None:
        """First value of query parameter ``name``."""
        values = self.query.get(name)
        return values[0] if values else default

    def json(self) -> Any:
        """Body decoded as JSON (``{}`` if empty); a malformed body is a 400."""
        if not self.body:
            return {}
        try:
            return json.loads(self.body)
        except ValueError as err:
            raise HubError(400, f"Invalid JSON body: {err}") from err

    @property
    def token(self) -> str | None:
        """Bearer token from the ``Authorization`` header, if any."""
        auth = self.headers.get("Authorization") or ""
        scheme, _, value = auth.partition(" ")
        return (value.strip() or None) if scheme.lower() == "bearer" else None


@dataclass
class _Response:
    """What a route handler returns; the HTTP handler serializes it (and drops the body for HEAD)."""

    status: int = 200
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)


def _json_response(payload: Any, status: int = 200, headers: Mapping[str, str] | None = None) -> _Response:
    return _Response(status, json.dumps(payload).encode(), {"Content-Type": "application/json", **(headers or {})})


class _Server(ThreadingHTTPServer):
    """ThreadingHTTPServer that remembers its open connections so :meth:`LocalHub.stop` can close keep-alive ones."""

    daemon_threads = True
    # Tests start many servers on ephemeral ports; never wait on TIME_WAIT.
    allow_reuse_address = True

    def __init__(self, address: tuple[str, int], hub: LocalHub) -> None:
        self.hub = hub
        self.open_connections: set[socket.socket] = set()
        self._conn_lock = threading.Lock()
        super().__init__(address, _Handler)

    def process_request(self, request: Any, client_address: Any) -> None:
        with self._conn_lock:
            self.open_connections.add(request)
        super().process_request(request, client_address)

    def shutdown_request(self, request: Any) -> None:
        with self._conn_lock:
            self.open_connections.discard(request)
        super().shutdown_request(request)

    def close_open_connections(self) -> None:
        """Force-close idle keep-alive connections so their handler threads exit instead of lingering."""
        with self._conn_lock:
            connections = list(self.open_connections)
        for conn in connections:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


class _Handler(BaseHTTPRequestHandler):
    """Thin HTTP layer: read the request, let :class:`LocalHub` compute a response, write it."""

    # HTTP/1.1 so the client's connection pool can reuse connections (much faster than reconnecting per call).
    protocol_version = "HTTP/1.1"
    # Idle keep-alive connections are dropped after this many seconds.
    timeout = 60
    # Headers and body go out in separate writes: without TCP_NODELAY, Nagle + delayed ACK add ~40 ms per request.
    disable_nagle_algorithm = True
    server: _Server

    def do_GET(self) -> None:  # noqa: N802 (http.server naming)
        self._handle("GET")

    def do_HEAD(self) -> None:  # noqa: N802
        self._handle("HEAD")

    def do_POST(self) -> None:  # noqa: N802
        self._handle("POST")

    def do_PUT(self) -> None:  # noqa: N802
        self._handle("PUT")

    def do_DELETE(self) -> None:  # noqa: N802
        self._handle("DELETE")

    def do_PATCH(self) -> None:  # noqa: N802
        self._handle("PATCH")

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
        """Silence the default stderr access log; requests are recorded in ``LocalHub.request_log`` instead."""

    def _read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass  # skip trailers
                    break
                chunks.append(self.rfile.read(size))
                self.rfile.readline()  # CRLF after each chunk
            return b"".join(chunks)
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _handle(self, method: str) -> None:
        body = self._read_body()
        response = self.server.hub._dispatch(method, self.path, self.headers, body)
        self.send_response(response.status)
        for name, value in response.headers.items():
            self.send_header(name, value)
        # For HEAD, advertise the size GET would return (the client reads the file size from it).
        self.send_header("Content-Length", str(len(response.body)))
        self.end_headers()
        if method != "HEAD" and response.body:
            self.wfile.write(response.body)


class LocalHub:
    """An in-memory Hugging Face Hub served over HTTP on ``127.0.0.1`` from a background thread.

    Args:
        host: interface to bind; keep the loopback default.
        port: TCP port; ``0`` picks a free one.
        user: the user that :attr:`token` authenticates as (default namespace for ``create_repo``).
        token: the token write requests must carry (``Authorization: Bearer ...``). ``None`` accepts any token.
        orgs: organizations listed by ``whoami`` (any namespace is writable; this is informative only).
        page_size: entries per page for tree / commit listings (the Hub uses 1000); lower it to test pagination.
        hf_home: default ``HF_HOME`` for :meth:`env` / :meth:`run_python`.
    """

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        user: str = DEFAULT_USER,
        token: str | None = DEFAULT_TOKEN,
        orgs: Iterable[str] = (),
        page_size: int = 1000,
        hf_home: str | os.PathLike[str] | None = None,
    ) -> None:
        self.host = host
        self._requested_port = port
        self.user = user
        self.token = token
        self.orgs = list(orgs)
        self.page_size = page_size
        self.hf_home = Path(hf_home) if hf_home is not None else None

        self.repos: dict[tuple[str, str], Repo] = {}
        self.blobs: dict[str, bytes] = {}  # git blob sha1 -> content
        self._sha256_to_blob: dict[str, str] = {}  # lets `lfsFile` commit lines (e.g. copies) reuse known content
        self._lock = threading.RLock()
        self._counter = itertools.count()

        self.request_log: list[tuple[str, str, int]] = []  # (method, path, status)
        self.unhandled_requests: list[str] = []  # "METHOD /path" of requests no route matched
        self.server_errors: list[str] = []  # tracebacks of handler crashes (answered as 500)

        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self._routes = self._build_routes()

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> LocalHub:
        """Bind the socket and serve from a daemon thread. Returns ``self`` for chaining."""
        if self._server is not None:
            return self
        self._server = _Server((self.host, self._requested_port), self)
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.01}, name="LocalHub", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving, close the listening socket and any kept-alive client connections."""
        if self._server is None:
            return
        self._server.shutdown()
        self._server.close_open_connections()
        self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self._server = None
        self._thread = None

    def __enter__(self) -> LocalHub:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    @property
    def port(self) -> int:
        """The bound TCP port (only valid once started)."""
        if self._server is None:
            raise RuntimeError("LocalHub is not started")
        return self._server.server_address[1]

    @property
    def endpoint(self) -> str:
        """Base URL to use as ``HF_ENDPOINT``, e.g. ``http://127.0.0.1:54321``."""
        return f"http://{self.host}:{self.port}"

    # ------------------------------------------------------------------ client configuration helpers

    def env(self, hf_home: str | os.PathLike[str] | None = None) -> dict[str, str]:
        """Environment variables that point a *freshly started* ``huggingface_hub`` process at this server.

        ``huggingface_hub.constants`` reads these at import time, so they are enough for subprocesses; for an
        already-imported client use ``hub_fixtures.configure_hf_client`` instead.
        """
        home = Path(hf_home) if hf_home is not None else self.hf_home
        env = {
            "HF_ENDPOINT": self.endpoint,
            "HF_HUB_DISABLE_XET": "1",
            "HF_HUB_OFFLINE": "0",
            "TRANSFORMERS_OFFLINE": "0",
            "HF_HUB_DISABLE_TELEMETRY": "1",
            "HF_HUB_DISABLE_UPDATE_CHECK": "1",
            "HF_HUB_DISABLE_IMPLICIT_TOKEN": "0",
            "HF_TOKEN": self.token or DEFAULT_TOKEN,
            "NO_PROXY": _merge_no_proxy(os.environ.get("NO_PROXY")),
            "no_proxy": _merge_no_proxy(os.environ.get("no_proxy")),
        }
        if home is not None:
            # Set the derived cache paths explicitly: an outer HF_HUB_CACHE / HUGGINGFACE_HUB_CACHE would otherwise
            # win over HF_HOME and leak the developer's real cache into the test.
            env.update(
                {
                    "HF_HOME": str(home),
                    "HF_HUB_CACHE": str(home / "hub"),
                    "HF_ASSETS_CACHE": str(home / "assets"),
                    "HF_XET_CACHE": str(home / "xet"),
                    "HF_TOKEN_PATH": str(home / "token"),
                }
            )
        return env

    def subprocess_env(
        self, hf_home: str | os.PathLike[str] | None = None, base: Mapping[str, str] | None = None
    ) -> dict[str, str]:
        """A complete environment for ``subprocess``: ``base`` (default ``os.environ``) overlaid with :meth:`env`."""
        env = dict(os.environ if base is None else base)
        # Staging mode would override HF_ENDPOINT; legacy cache variables are superseded by HF_HUB_CACHE anyway.
        for name in ("HUGGINGFACE_CO_STAGING", "HUGGINGFACE_HUB_CACHE", "HUGGINGFACE_ASSETS_CACHE"):
            env.pop(name, None)
        env.update(self.env(hf_home))
        return env

    def run_python(
        self,
        code: str,
        *,
        hf_home: str | os.PathLike[str] | None = None,
        extra_env: Mapping[str, str] | None = None,
        timeout: float = 300,
        check: bool = True,
    ) -> subprocess.CompletedProcess[str]:
        """Run ``python -c code`` in a fresh interpreter configured (through env vars only) to use this hub."""
        env = self.subprocess_env(hf_home)
        env.update(extra_env or {})
        result = subprocess.run(
            [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=timeout, check=False
        )
        if check and result.returncode != 0:
            raise AssertionError(
                f"subprocess failed with exit code {result.returncode}\n--- stdout ---\n{result.stdout}"
                f"\n--- stderr ---\n{result.stderr}"
            )
        return result

    # ------------------------------------------------------------------ direct (non-HTTP) access for tests

    def repo_url(self, repo_id: str, repo_type: str = "model") -> str:
        """Web URL of a repo, as the Hub returns it from ``/api/repos/create``."""
        return f"{self.endpoint}/{_TYPE_URL_PREFIX[repo_type]}{repo_id}"

    def create_repo(self, repo_id: str, repo_type: str = "model", private: bool = False) -> Repo:
        """Create a repo directly (no HTTP), with the Hub's initial ``.gitattributes`` commit."""
        with self._lock:
            if (repo_type, repo_id) in self.repos:
                raise HubError(409, f"You already created this {repo_type} repo: {repo_id}")
            repo = Repo(repo_type=repo_type, repo_id=repo_id, private=private, created_at=_now_iso())
            initial = self._make_commit(
                repo, (), {".gitattributes": self._store_blob(_GITATTRIBUTES)}, "initial commit"
            )
            repo.branches[DEFAULT_BRANCH] = initial.oid
            self.repos[(repo_type, repo_id)] = repo
            return repo

    def get_repo(self, repo_id: str, repo_type: str = "model") -> Repo:
        """The stored :class:`Repo` (``KeyError`` if missing)."""
        with self._lock:
            return self.repos[(repo_type, repo_id)]

    def resolve_revision(self, repo_id: str, revision: str = DEFAULT_BRANCH, repo_type: str = "model") -> str:
        """Commit sha a revision (branch, tag, sha prefix, ``refs/pr/N``) points to."""
        with self._lock:
            return self._resolve(self.get_repo(repo_id, repo_type), revision)

    def list_files(self, repo_id: str, revision: str = DEFAULT_BRANCH, repo_type: str = "model") -> list[str]:
        """Sorted file paths at ``revision``."""
        with self._lock:
            repo = self.get_repo(repo_id, repo_type)
            return sorted(repo.commits[self._resolve(repo, revision)].files)

    def read_file(self, repo_id: str, path: str, revision: str = DEFAULT_BRANCH, repo_type: str = "model") -> bytes:
        """Content of ``path`` at ``revision`` (``KeyError`` if the file does not exist)."""
        with self._lock:
            repo = self.get_repo(repo_id, repo_type)
            return self.blobs[repo.commits[self._resolve(repo, revision)].files[path]]

    def commit_files(
        self,
        repo_id: str,
        files: Mapping[str, bytes],
        *,
        repo_type: str = "model",
        branch: str = DEFAULT_BRANCH,
        message: str = "Direct commit",
    ) -> str:
        """Commit ``files`` straight into ``branch`` (creating the repo if needed); returns the commit sha."""
        with self._lock:
            if (repo_type, repo_id) not in self.repos:
                self.create_repo(repo_id, repo_type)
            repo = self.get_repo(repo_id, repo_type)
            head = repo.commits[repo.branches[branch]] if branch in repo.branches else None
            snapshot = dict(head.files) if head else {}
            snapshot.update({path: self._store_blob(data) for path, data in files.items()})
            commit = self._make_commit(repo, (head.oid,) if head else (), snapshot, message)
            repo.branches[branch] = commit.oid
            return commit.oid

    def history(self, repo_id: str, revision: str = DEFAULT_BRANCH, repo_type: str = "model") -> list[Commit]:
        """Commits reachable from ``revision`` through first parents, newest first."""
        with self._lock:
            repo = self.get_repo(repo_id, repo_type)
            return self._first_parent_chain(repo, self._resolve(repo, revision))

    # ------------------------------------------------------------------ storage internals

    def _store_blob(self, data: bytes) -> str:
        oid = git_blob_sha1(data)
        self.blobs.setdefault(oid, data)
        self._sha256_to_blob.setdefault(hashlib.sha256(data).hexdigest(), oid)
        return oid

    def _make_commit(
        self,
        repo: Repo,
        parents: tuple[str, ...],
        files: Mapping[str, str],
        title: str,
        message: str = "",
    ) -> Commit:
        # Not a real git hash (that would need tree objects) but stable-looking, unique, 40 hex chars: what
        # REGEX_COMMIT_HASH in the client expects for "this revision is already a commit".
        tree = json.dumps(sorted(files.items())).encode()
        seed = f"{repo.repo_type}/{repo.repo_id}\n{parents}\n{title}\n{message}\n{next(self._counter)}\n".encode()
        oid = hashlib.sha1(seed + tree).hexdigest()
        commit = Commit(oid, parents, title, message, self.user, _now_iso(), dict(files))
        repo.commits[oid] = commit
        return commit

    def _resolve(self, repo: Repo, revision: str) -> str:
        """Revision -> commit sha, or a ``RevisionNotFound`` 404 like the Hub."""
        if revision in repo.branches:
            return repo.branches[revision]
        if revision.startswith("refs/heads/") and revision[len("refs/heads/") :] in repo.branches:
            return repo.branches[revision[len("refs/heads/") :]]
        if revision in repo.tags:
            return repo.tags[revision]
        if revision.startswith("refs/tags/") and revision[len("refs/tags/") :] in repo.tags:
            return repo.tags[revision[len("refs/tags/") :]]
        pr_match = _PR_REF_RE.match(revision)
        if pr_match and int(pr_match.group(1)) in repo.pull_requests:
            return repo.pull_requests[int(pr_match.group(1))].head_commit
        if _COMMIT_SHA_RE.match(revision):
            if revision in repo.commits:
                return revision
            candidates = [oid for oid in repo.commits if oid.startswith(revision)]
            if len(candidates) == 1:
                return candidates[0]
        raise HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")

    def _first_parent_chain(self, repo: Repo, oid: str) -> list[Commit]:
        chain = []
        current: str | None = oid
        while current is not None:
            commit = repo.commits[current]
            chain.append(commit)
            current = commit.parents[0] if commit.parents else None
        return chain

    def _last_commit_touching(self, repo: Repo, head: str, path: str, is_dir: bool) -> Commit:
        """Most recent commit (first-parent history) that changed ``path`` (a file, or anything under a dir)."""

        def view(commit: Commit) -> Any:
            if is_dir:
                prefix = path + "/"
                return {p: o for p, o in commit.files.items() if p.startswith(prefix)}
            return commit.files.get(path)

        chain = self._first_parent_chain(repo, head)
        current = view(chain[0])
        last = chain[0]
        for commit in chain[1:]:
            if view(commit) != current:
                break
            last = commit
        return last

    # ------------------------------------------------------------------ request plumbing

    def _authorized(self, req: _Request) -> bool:
        token = req.token
        return token is not None and (self.token is None or token == self.token)

    def _repo_from(self, req: _Request, *, write: bool = False) -> Repo:
        """Repo addressed by the route (``t``/``repo`` params), enforcing private-repo and write access."""
        repo_type = _API_TYPES.get(req.params.get("t", "models"), "model")
        repo_id = req.params["repo"]
        repo = self.repos.get((repo_type, repo_id))
        if repo is None or (repo.private and not self._authorized(req)):
            # The Hub answers 401/404 + RepoNotFound for both missing and inaccessible repos.
            raise HubError(404, "Repository not found", "RepoNotFound")
        if write and not self._authorized(req):
            raise HubError(401, "Invalid credentials in Authorization header")
        return repo

    def _require_auth(self, req: _Request) -> None:
        if not self._authorized(req):
            raise HubError(401, "Invalid credentials in Authorization header")

    def _dispatch(self, method: str, raw_path: str, headers: Message, body: bytes) -> _Response:
        split = urlsplit(raw_path)
        query = parse_qs(split.query, keep_blank_values=True)
        route_method = "GET" if method == "HEAD" else method
        response: _Response
        try:
            for methods, pattern, handler in self._routes:
                match = pattern.match(split.path)
                if match is None or route_method not in methods:
                    continue
                params = {k: unquote(v) for k, v in match.groupdict().items() if v is not None}
                req = _Request(method, split.path, query, headers, body, params)
                with self._lock:
                    response = handler(req)
                break
            else:
                self.unhandled_requests.append(f"{method} {raw_path}")
                response = _json_response({"error": f"LocalHub: no route for {method} {split.path}"}, 404)
        except HubError as err:
            extra = {"X-Error-Message": err.message, **err.headers}
            if err.error_code:
                extra["X-Error-Code"] = err.error_code
            response = _json_response({**err.extra, "error": err.message}, err.status, extra)
        except Exception:  # noqa: BLE001 - a crash must surface as a 500 (and in server_errors), not kill the thread
            self.server_errors.append(traceback.format_exc())
            response = _json_response({"error": "LocalHub internal error"}, 500)
        self.request_log.append((method, raw_path, response.status))
        return response

    def _build_routes(self) -> list[tuple[tuple[str, ...], re.Pattern[str], Callable[[_Request], _Response]]]:
        api = rf"^/api/{_T}/{_R}"
        table: list[tuple[tuple[str, ...], str, Callable[[_Request], _Response]]] = [
            (("GET",), r"^/api/whoami-v2$", self._whoami),
            (("POST",), r"^/api/repos/create$", self._create_repo),
            (("DELETE",), r"^/api/repos/delete$", self._delete_repo),
            (("POST",), r"^/api/repos/move$", self._move_repo),
            (("POST",), r"^/api/validate-yaml$", self._validate_yaml),
            (("GET",), rf"^/api/{_T}$", self._list_repos),
            (("GET",), rf"{api}$", self._repo_info),
            (("GET",), rf"{api}/revision/{_REV}$", self._repo_info),
            (("GET",), rf"{api}/tree/{_REV}(?:/(?P<path>.*))?$", self._tree),
            (("POST",), rf"{api}/paths-info/{_REV}$", self._paths_info),
            (("POST",), rf"{api}/preupload/{_REV}$", self._preupload),
            (("POST",), rf"{api}/commit/{_REV}$", self._commit),
            (("GET",), rf"{api}/commits/{_REV}$", self._commits),
            (("GET",), rf"{api}/refs$", self._refs),
            (("POST", "DELETE"), rf"{api}/branch/{_REV}$", self._branch),
            (("POST", "DELETE"), rf"{api}/tag/{_REV}$", self._tag),
            (("PUT",), rf"{api}/settings$", self._settings),
            (("GET",), rf"{api}/auth-check(?P<write>/write)?$", self._auth_check),
            (("POST",), rf"{api}/discussions/(?P<num>\d+)/(?P<action>merge|status)$", self._discussion_change),
            (
                ("GET",),
                rf"^/(?:(?P<t>datasets|spaces|kernels)/)?{_R}/(?:resolve|raw)/{_REV}/(?P<path>.+)$",
                self._resolve_file,
            ),
        ]
        return [(methods, re.compile(pattern), handler) for methods, pattern, handler in table]

    # ------------------------------------------------------------------ routes: account / repos

    def _whoami(self, req: _Request) -> _Response:
        self._require_auth(req)
        return _json_response(
            {
                "type": "user",
                "id": hashlib.sha1(self.user.encode()).hexdigest()[:24],
                "name": self.user,
                "fullname": self.user,
                "email": f"{self.user}@localhost",
                "emailVerified": True,
                "canPay": False,
                "isPro": False,
                "periodEnd": None,
                "avatarUrl": "",
                "orgs": [{"type": "org", "name": org, "fullname": org, "roleInOrg": "admin"} for org in self.orgs],
                "auth": {
                    "type": "access_token",
                    "accessToken": {"displayName": "localhub", "role": "write", "createdAt": _now_iso()},
                },
            }
        )

    def _create_repo(self, req: _Request) -> _Response:
        self._require_auth(req)
        body = req.json()
        name = body.get("name") or ""
        namespace = body.get("organization") or self.user
        repo_type = body.get("type") or "model"
        if repo_type not in _TYPE_URL_PREFIX:
            raise HubError(400, f"Invalid repo type: {repo_type}")
        for part in (namespace, name):
            if not _REPO_NAME_RE.match(part) or "--" in part or ".." in part:
                raise HubError(400, f"Invalid repo name: {namespace}/{name}")
        repo_id = f"{namespace}/{name}"
        url = self.repo_url(repo_id, repo_type)
        if (repo_type, repo_id) in self.repos:
            # The client turns this 409 into success when create_repo(exist_ok=True), reading `url` from the body.
            raise HubError(409, f"You already created this {repo_type} repo", extra={"url": url})
        private = bool(body.get("private")) or body.get("visibility") == "private"
        self.create_repo(repo_id, repo_type, private=private)
        return _json_response({"url": url, "name": repo_id, "id": hashlib.sha1(url.encode()).hexdigest()[:24]})

    def _repo_from_body(self, body: Mapping[str, Any]) -> tuple[str, str]:
        namespace = body.get("organization") or self.user
        return body.get("type") or "model", f"{namespace}/{body.get('name')}"

    def _delete_repo(self, req: _Request) -> _Response:
        self._require_auth(req)
        key = self._repo_from_body(req.json())
        if key not in self.repos:
            raise HubError(404, "Repository not found", "RepoNotFound")
        del self.repos[key]
        return _Response(200)

    def _move_repo(self, req: _Request) -> _Response:
        self._require_auth(req)
        body = req.json()
        repo_type = body.get("type") or "model"
        src, dst = (repo_type, body.get("fromRepo")), (repo_type, body.get("toRepo"))
        if src not in self.repos:
            raise HubError(404, "Repository not found", "RepoNotFound")
        if dst in self.repos:
            raise HubError(409, "A repository with this name already exists")
        repo = self.repos.pop(src)
        repo.repo_id = dst[1]
        self.repos[dst] = repo
        return _Response(200)

    def _settings(self, req: _Request) -> _Response:
        repo = self._repo_from(req, write=True)
        body = req.json()
        if "private" in body and body["private"] is not None:
            repo.private = bool(body["private"])
        if body.get("visibility") in ("private", "public"):
            repo.private = body["visibility"] == "private"
        if "gated" in body and body["gated"] is not None:
            repo.gated = body["gated"]
        return _json_response({})

    def _auth_check(self, req: _Request) -> _Response:
        self._repo_from(req, write=bool(req.params.get("write")))
        return _json_response({})

    def _validate_yaml(self, req: _Request) -> _Response:
        # Only a structural check (no YAML parser in the stdlib): an opened front matter block must be closed.
        content = str(req.json().get("content") or "")
        if content.startswith("---") and "\n---" not in content[3:]:
            errors = [{"message": "Unclosed YAML front matter (missing closing '---')"}]
            return _json_response({"errors": errors, "warnings": []}, 400)
        return _json_response({"errors": [], "warnings": []})

    def _list_repos(self, req: _Request) -> _Response:
        repo_type = _API_TYPES[req.params["t"]]
        search, author = req.q("search"), req.q("author")
        items = []
        for (rtype, repo_id), repo in sorted(self.repos.items()):
            if rtype != repo_type or (repo.private and not self._authorized(req)):
                continue
            if search and search.lower() not in repo_id.lower():
                continue
            if author and repo_id.split("/")[0] != author:
                continue
            items.append(self._info_payload(repo, repo.branches[DEFAULT_BRANCH], blobs=False))
        return _json_response(items)

    # ------------------------------------------------------------------ routes: repo content

    def _info_payload(self, repo: Repo, oid: str, *, blobs: bool) -> dict[str, Any]:
        commit = repo.commits[oid]
        siblings = []
        for path in sorted(commit.files):
            sibling: dict[str, Any] = {"rfilename": path}
            if blobs:
                sibling.update({"size": len(self.blobs[commit.files[path]]), "blobId": commit.files[path]})
            siblings.append(sibling)
        payload: dict[str, Any] = {
            "_id": hashlib.sha1(f"{repo.repo_type}/{repo.repo_id}".encode()).hexdigest()[:24],
            "id": repo.repo_id,
            "author": repo.repo_id.split("/")[0],
            "sha": oid,
            "lastModified": commit.date,
            "createdAt": repo.created_at,
            "private": repo.private,
            "gated": repo.gated,
            "disabled": False,
            "downloads": 0,
            "likes": 0,
            "tags": [],
            "siblings": siblings,
            "usedStorage": sum(len(self.blobs[b]) for b in commit.files.values()),
        }
        if repo.repo_type == "model":
            payload["modelId"] = repo.repo_id
            config = self._json_file(commit, "config.json")
            if isinstance(config, dict):
                payload["config"] = {k: config[k] for k in ("architectures", "model_type") if k in config}
        return payload

    def _json_file(self, commit: Commit, path: str) -> Any:
        if path not in commit.files:
            return None
        try:
            return json.loads(self.blobs[commit.files[path]])
        except ValueError:
            return None

    def _repo_info(self, req: _Request) -> _Response:
        repo = self._repo_from(req)
        oid = self._resolve(repo, req.params.get("rev", DEFAULT_BRANCH))
        return _json_response(self._info_payload(repo, oid, blobs=_truthy(req.q("blobs"))))

    def _entry(self, repo: Repo, commit: Commit, path: str, *, expand: bool) -> dict[str, Any] | None:
        """Tree entry (file or directory) for ``path`` in ``commit``, or ``None`` if it does not exist."""
        if path in commit.files:
            oid = commit.files[path]
            entry: dict[str, Any] = {"type": "file", "oid": oid, "size": len(self.blobs[oid]), "path": path}
            is_dir = False
        else:
            prefix = path + "/"
            content = sorted((p, o) for p, o in commit.files.items() if p.startswith(prefix))
            if not content:
                return None
            tree_oid = hashlib.sha1(json.dumps(content).encode()).hexdigest()
            entry = {"type": "directory", "oid": tree_oid, "size": 0, "path": path}
            is_dir = True
        if expand:
            last = self._last_commit_touching(repo, commit.oid, path, is_dir)
            entry["lastCommit"] = {"id": last.oid, "title": last.title, "date": last.date}
        return entry

    def _paginate(self, req: _Request, items: list[Any], page_size: int) -> _Response:
        """Cursor pagination with a GitHub-style ``Link: <...>; rel="next"`` header, as ``paginate()`` expects."""
        start = int(req.q("cursor") or 0)
        page = items[start : start + page_size]
        headers = {}
        if start + page_size < len(items):
            query = {k: v[0] for k, v in req.query.items() if k != "cursor"}
            query["cursor"] = str(start + page_size)
            headers["Link"] = f'<{self.endpoint}{req.path}?{urlencode(query)}>; rel="next"'
        return _json_response(page, headers=headers)

    def _tree(self, req: _Request) -> _Response:
        repo = self._repo_from(req)
        commit = repo.commits[self._resolve(repo, req.params["rev"])]
        base = req.params.get("path", "").strip("/")
        recursive, expand = _truthy(req.q("recursive")), _truthy(req.q("expand"))
        if base and (base in commit.files or not any(p.startswith(base + "/") for p in commit.files)):
            raise HubError(404, f"{base} does not exist on {req.params['rev']}", "EntryNotFound")
        paths: set[str] = set()
        for file_path in commit.files:
            if base and not file_path.startswith(base + "/"):
                continue
            rel_parts = file_path[len(base) + 1 :].split("/") if base else file_path.split("/")
            depth = len(rel_parts) if recursive else 1
            for i in range(1, depth + 1):
                paths.add("/".join(([base] if base else []) + rel_parts[:i]))
        entries = [self._entry(repo, commit, p, expand=expand) for p in sorted(paths)]
        # The Hub caps pages at 1000 entries (50 when expanded).
        return self._paginate(req, entries, min(self.page_size, 50) if expand else self.page_size)

    def _paths_info(self, req: _Request) -> _Response:
        repo = self._repo_from(req)
        commit = repo.commits[self._resolve(repo, req.params["rev"])]
        content_type = req.headers.get("Content-Type", "")
        if "json" in content_type:
            form = req.json()
            paths, expand = list(form.get("paths", [])), bool(form.get("expand"))
        else:  # the client posts form data: paths=a&paths=b&expand=false
            form = parse_qs(req.body.decode(), keep_blank_values=True)
            paths, expand = form.get("paths", []), _truthy((form.get("expand") or ["false"])[0])
        entries = [self._entry(repo, commit, p.strip("/"), expand=expand) for p in paths]
        return _json_response([e for e in entries if e is not None])

    def _preupload(self, req: _Request) -> _Response:
        repo = self._repo_from(req, write=True)
        commit = repo.commits[self._resolve(repo, req.params["rev"])]
        files = []
        for item in req.json().get("files", []):
            path = item["path"]
            # Always "regular": content then travels base64-encoded inside the commit payload (no LFS / Xet).
            # `oid` is the current blob so the client can skip unchanged files, as it does with the real Hub.
            files.append({"path": path, "uploadMode": "regular", "shouldIgnore": False, "oid": commit.files.get(path)})
        return _json_response({"files": files, "commitOid": commit.oid})

    def _write_target(self, repo: Repo, revision: str) -> tuple[str, str | int]:
        """Ref a commit to ``revision`` updates: ``("branch", name)`` or ``("pr", num)``."""
        name = revision[len("refs/heads/") :] if revision.startswith("refs/heads/") else revision
        if name in repo.branches:
            return "branch", name
        pr_match = _PR_REF_RE.match(revision)
        if pr_match and int(pr_match.group(1)) in repo.pull_requests:
            return "pr", int(pr_match.group(1))
        self._resolve(repo, revision)  # 404 RevisionNotFound if it is not a tag / commit either
        raise HubError(400, f"Cannot commit to {revision}: not a branch or a pull request ref")

    def _commit(self, req: _Request) -> _Response:
        repo = self._repo_from(req, write=True)
        revision = req.params["rev"]
        create_pr = _truthy(req.q("create_pr"))
        try:
            lines = [json.loads(line) for line in req.body.splitlines() if line.strip()]
        except ValueError as err:
            raise HubError(400, f"Invalid NDJSON commit payload: {err}") from err
        header = next((line["value"] for line in lines if line.get("key") == "header"), None)
        if header is None:
            raise HubError(400, "Missing commit header")

        # Where the new commit goes: a new PR (based on `revision`), or the branch / PR ref `revision` names.
        target: tuple[str, str | int] | None = None
        if create_pr:
            base_oid = self._resolve(repo, revision)
            target_branch = revision if revision in repo.branches else DEFAULT_BRANCH
        else:
            target = self._write_target(repo, revision)
            kind, name = target
            base_oid = repo.branches[str(name)] if kind == "branch" else repo.pull_requests[int(name)].head_commit
        parent_commit = header.get("parentCommit")
        if parent_commit and parent_commit != base_oid:
            raise HubError(412, "A commit has happened since. Please refresh and try again.")

        files = dict(repo.commits[base_oid].files)
        for line in lines:
            key, value = line.get("key"), line.get("value") or {}
            if key == "header":
                continue
            path = str(value.get("path", "")).strip("/")
            if not path or path.startswith("/") or ".." in path.split("/"):
                raise HubError(400, f"Invalid path in commit: {value.get('path')!r}")
            if key == "file":
                content = value.get("content", "")
                data = base64.b64decode(content) if value.get("encoding") == "base64" else content.encode()
                files[path] = self._store_blob(data)
            elif key == "lfsFile":
                blob = self._sha256_to_blob.get(value.get("oid", ""))
                if blob is None:
                    raise HubError(400, f"LFS object {value.get('oid')} for {path} was never uploaded (LFS disabled)")
                files[path] = blob
            elif key == "deletedFile":
                if files.pop(path, None) is None:
                    raise HubError(404, f"A file with this name doesn't exist: {path}", "EntryNotFound")
            elif key == "deletedFolder":
                removed = [p for p in files if p.startswith(path + "/")]
                if not removed:
                    raise HubError(404, f"A folder with this name doesn't exist: {path}", "EntryNotFound")
                for p in removed:
                    del files[p]
            else:
                raise HubError(400, f"Unsupported commit operation: {key!r}")

        commit = self._make_commit(
            repo, (base_oid,), files, header.get("summary") or "", header.get("description") or ""
        )
        url = self.repo_url(repo.repo_id, repo.repo_type)
        pr_url = None
        if target is None:
            num = repo.next_discussion_num
            repo.next_discussion_num += 1
            repo.pull_requests[num] = PullRequest(num, commit.title, target_branch, base_oid, commit.oid)
            pr_url = f"{url}/discussions/{num}"
        elif target[0] == "branch":
            repo.branches[str(target[1])] = commit.oid
        else:
            repo.pull_requests[int(target[1])].head_commit = commit.oid
        return _json_response(
            {
                "success": True,
                "commitOid": commit.oid,
                "commitUrl": f"{url}/commit/{commit.oid}",
                "commitMessage": commit.title,
                "hookOutput": "",
                "pullRequestUrl": pr_url,
            }
        )

    def _commits(self, req: _Request) -> _Response:
        repo = self._repo_from(req)
        chain = self._first_parent_chain(repo, self._resolve(repo, req.params["rev"]))
        items = [
            {
                "id": c.oid,
                "title": c.title,
                "message": c.message,
                "date": c.date,
                "authors": [{"user": c.author, "avatar": ""}],
                "parents": list(c.parents),
            }
            for c in chain
        ]
        return self._paginate(req, items, self.page_size)

    def _refs(self, req: _Request) -> _Response:
        repo = self._repo_from(req)
        payload: dict[str, Any] = {
            "branches": [{"name": n, "ref": f"refs/heads/{n}", "targetCommit": o} for n, o in repo.branches.items()],
            "converts": [],
            "tags": [{"name": n, "ref": f"refs/tags/{n}", "targetCommit": o} for n, o in repo.tags.items()],
        }
        if _truthy(req.q("include_prs")):
            payload["pullRequests"] = [
                {"name": f"refs/pr/{n}", "ref": f"refs/pr/{n}", "targetCommit": pr.head_commit}
                for n, pr in sorted(repo.pull_requests.items())
            ]
        return _json_response(payload)

    def _branch(self, req: _Request) -> _Response:
        repo = self._repo_from(req, write=True)
        branch = req.params["rev"]
        if req.method == "DELETE":
            if branch not in repo.branches:
                raise HubError(404, f"Invalid rev id: {branch}", "RevisionNotFound")
            if branch == DEFAULT_BRANCH:
                raise HubError(403, "Cannot delete the default branch")
            del repo.branches[branch]
            return _json_response({})
        if branch.startswith("refs/") or not re.match(r"^[\w.\-/]+$", branch):
            raise HubError(400, f"Invalid branch name: {branch}")
        if branch in repo.branches:
            raise HubError(409, f"Reference already exists: refs/heads/{branch}")
        starting_point = req.json().get("startingPoint") or DEFAULT_BRANCH
        repo.branches[branch] = self._resolve(repo, starting_point)
        return _json_response({})

    def _tag(self, req: _Request) -> _Response:
        repo = self._repo_from(req, write=True)
        if req.method == "DELETE":
            tag = req.params["rev"]
            if tag not in repo.tags:
                raise HubError(404, f"Invalid rev id: {tag}", "RevisionNotFound")
            del repo.tags[tag]
            return _json_response({})
        oid = self._resolve(repo, req.params["rev"])
        tag = req.json().get("tag") or ""
        if not tag or tag.startswith("refs/"):
            raise HubError(400, f"Invalid tag name: {tag!r}")
        if tag in repo.tags:
            raise HubError(409, f"Reference already exists: refs/tags/{tag}")
        repo.tags[tag] = oid
        return _json_response({})

    def _discussion_change(self, req: _Request) -> _Response:
        repo = self._repo_from(req, write=True)
        pr = repo.pull_requests.get(int(req.params["num"]))
        if pr is None:
            raise HubError(404, "Discussion not found")
        if req.params["action"] == "status":
            status = req.json().get("new_status") or req.json().get("status")
            if status not in ("open", "closed"):
                raise HubError(400, f"Invalid status: {status!r}")
            pr.status = status
            return _json_response({})
        if pr.status != "open":
            raise HubError(400, f"Pull request #{pr.num} is {pr.status}")
        # Merge = replay the PR's changes (base -> head) on top of the current target branch.
        base, head = repo.commits[pr.base_commit].files, repo.commits[pr.head_commit].files
        target_head = repo.branches[pr.target_branch]
        files = dict(repo.commits[target_head].files)
        for path in set(base) | set(head):
            if base.get(path) != head.get(path):
                if path in head:
                    files[path] = head[path]
                else:
                    files.pop(path, None)
        merge = self._make_commit(repo, (target_head, pr.head_commit), files, f"Merge refs/pr/{pr.num}: {pr.title}")
        repo.branches[pr.target_branch] = merge.oid
        pr.status = "merged"
        return _json_response({})

    # ------------------------------------------------------------------ route: file download

    def _resolve_file(self, req: _Request) -> _Response:
        repo = self._repo_from(req)
        oid = self._resolve(repo, req.params["rev"])
        path = req.params["path"]
        blob = repo.commits[oid].files.get(path)
        if blob is None:
            # X-Repo-Commit lets the client cache the non-existence of the file for this commit.
            raise HubError(404, "Entry not found", "EntryNotFound", headers={"X-Repo-Commit": oid})
        data = self.blobs[blob]
        headers = {
            "Content-Type": "application/octet-stream",
            "ETag": f'"{blob}"',
            "X-Repo-Commit": oid,
            "Accept-Ranges": "bytes",
        }
        status = 200
        range_header = req.headers.get("Range")
        range_match = re.fullmatch(r"bytes=(\d*)-(\d*)", range_header.strip()) if range_header else None
        if range_match and (range_match.group(1) or range_match.group(2)):
            # Single byte range only: that is all the client's resume logic sends.
            size = len(data)
            if range_match.group(1):
                start = int(range_match.group(1))
                end = int(range_match.group(2)) if range_match.group(2) else size - 1
            else:  # suffix range: last N bytes
                start, end = max(size - int(range_match.group(2)), 0), size - 1
            if start >= size:
                raise HubError(416, "Requested range not satisfiable", headers={"Content-Range": f"bytes */{size}"})
            end = min(end, size - 1)
            headers["Content-Range"] = f"bytes {start}-{end}/{size}"
            data, status = data[start : end + 1], 206
        return _Response(status, data, headers)


def _merge_no_proxy(current: str | None) -> str:
    """Make sure loopback traffic never goes through an HTTP(S)_PROXY configured in the environment."""
    entries = [e for e in (current or "").split(",") if e.strip()]
    for host in ("127.0.0.1", "localhost"):
        if host not in entries:
            entries.append(host)
    return ",".join(entries)
