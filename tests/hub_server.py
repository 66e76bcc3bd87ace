"""A small, local Hugging Face Hub-protocol server for tests (standard library only).

Why: ``huggingface_hub`` 2.x talks HTTP through its own httpx client, so response mocking
libraries do not intercept it, and no published local Hub server accepts uploads. This module
implements just the part of the Hub HTTP API that the *real* ``huggingface_hub`` client uses for
publishing and downloading model repos, so tests exercise the genuine client code paths
(URL building, headers, error mapping, the on-disk cache, offline fallback).

Implemented (model repos only; ``{repo}`` is always ``namespace/name``):

====================================================  =========================================
``GET  /api/whoami-v2``                               ``whoami``
``GET  /api/agent-harnesses``                         client user-agent probe (empty registry)
``POST /api/validate-yaml``                           README metadata check (always accepted)
``POST /api/repos/create``                            ``create_repo`` (private, exist_ok -> 409)
``DELETE /api/repos/delete``                          ``delete_repo``
``PUT  /api/models/{repo}/settings``                  ``update_repo_settings`` (visibility, gated)
``GET  /api/models/{repo}[/revision/{rev}]``           ``model_info`` / ``repo_info`` (sha, siblings)
``GET  /api/models/{repo}/tree/{rev}[/{path}]``       ``list_repo_tree`` / ``list_repo_files``
``POST /api/models/{repo}/paths-info/{rev}``          ``get_paths_info``
``GET  /api/models/{repo}/refs``                      ``list_repo_refs``
``GET  /api/models/{repo}/commits/{rev}``             ``list_repo_commits``
``GET  /api/models/{repo}/auth-check[/write]``        ``auth_check``
``POST /api/models/{repo}/preupload/{rev}``           always answers upload mode ``"regular"``
``POST /api/models/{repo}/commit/{rev}``              NDJSON commit, files inline (base64);
                                                      ``?create_pr=1`` opens ``refs/pr/N``
``POST|DELETE /api/models/{repo}/branch/{name}``      ``create_branch`` / ``delete_branch``
``POST /api/models/{repo}/tag/{rev}``                 ``create_tag``
``DELETE /api/models/{repo}/tag/{name}``              ``delete_tag``
``HEAD|GET /{repo}/resolve/{rev}/{path}``             ``hf_hub_download`` / ``snapshot_download``
====================================================  =========================================

Revisions resolve as branch name, tag name, ``refs/pr/N`` or a full 40-hex commit sha.
ETags are git blob sha1s (what the real Hub sends for non-LFS files) and every resolve answer
carries ``X-Repo-Commit``.

Auth mirrors the real Hub closely enough for the client's error mapping: a missing token on a
private repo gives ``401`` + ``X-Error-Code: RepoNotFound``; an authenticated user without access
gets ``404`` + ``RepoNotFound`` (both become ``RepositoryNotFoundError``); an unknown token gives
``401 "Invalid credentials in Authorization header"`` (a plain ``HfHubHTTPError``); writes without
permission give ``403``; unknown revisions/files give ``404`` with ``RevisionNotFound`` /
``EntryNotFound``; gated repos give ``GatedRepo`` on file access.

Not implemented (documented limits): LFS / Xet uploads (preupload never asks for them, so run the
client with ``HF_HUB_DISABLE_XET=1``), HTTP ``Range`` requests (the client copes with ``200``),
discussions/PR comments or merging, datasets/spaces, legacy single-segment repo ids, pagination
(trees are answered in one page), ``.gitignore`` filtering. Anything else answers ``404`` and is
recorded in :attr:`HubServer.unhandled` so a test can notice.

Bounded by design: request bodies are capped (:data:`MAX_BODY_BYTES`), NDJSON commits are capped
in lines, idle keep-alive connections time out, and :meth:`HubServer.stop` closes every open
connection so teardown never hangs.

Use the ``hub_server`` pytest fixture (import it into the test module): it starts one server per
test session, resets its data per test, points ``huggingface_hub`` at it (``HF_ENDPOINT`` plus the
copies ``huggingface_hub.constants`` took at import time), disables Xet, turns offline mode off
and gives every test its own empty HF cache.
"""

from __future__ import annotations

import base64
import binascii
import collections
import dataclasses
import hashlib
import http.server
import itertools
import json
import os
import re
import shutil
import socket
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, quote, unquote, urlsplit

import yaml  # PyYAML: installed with huggingface_hub, which parses card metadata with it

MAX_BODY_BYTES = 256 * 1024 * 1024
MAX_COMMIT_LINES = 20_000
MAX_TREE_DEPTH = 64
IDLE_CONNECTION_TIMEOUT_S = 20.0

_NAME_RE = re.compile(r"^(?!.*(--|\.\.))[A-Za-z0-9][A-Za-z0-9_.\-]{0,95}$")
_SHA_RE = re.compile(r"^[0-9a-f]{40}$")

DEFAULT_GITATTRIBUTES = (
    b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n"
    b"*.bin filter=lfs diff=lfs merge=lfs -text\n"
    b"*.pt filter=lfs diff=lfs merge=lfs -text\n"
    b"*.ckpt filter=lfs diff=lfs merge=lfs -text\n"
)


def git_blob_sha1(data: bytes) -> str:
    """The git object id of a blob: sha1(b"blob <len>\\0" + data)."""
    h = hashlib.sha1(b"blob %d\x00" % len(data))
    h.update(data)
    return h.hexdigest()


def _now_iso() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


@dataclasses.dataclass(frozen=True)
class TokenInfo:
    """A token known to the server: who it authenticates and whether it may write."""

    user: str
    role: str = "write"  # "write" | "read"


@dataclasses.dataclass
class Commit:
    oid: str
    parents: list[str]
    files: dict[str, str]  # path -> blob sha1
    title: str
    message: str
    author: str
    date: str


@dataclasses.dataclass
class Repo:
    repo_id: str
    owner: str  # namespace
    private: bool
    created_at: str
    gated: Any = False  # False | "auto" | "manual"
    granted: set[str] = dataclasses.field(default_factory=set)
    commits: dict[str, Commit] = dataclasses.field(default_factory=dict)
    branches: dict[str, str] = dataclasses.field(default_factory=dict)
    tags: dict[str, str] = dataclasses.field(default_factory=dict)
    prs: dict[int, str] = dataclasses.field(default_factory=dict)  # number -> "refs/pr/N" head


class HubError(Exception):
    """Raised inside a handler; becomes an HTTP error response shaped like the real Hub's."""

    def __init__(
        self, status: int, message: str, *, code: str | None = None, headers: dict[str, str] | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.headers = headers or {}


class HubState:
    """All repos, blobs (on disk under ``data_dir``) and auth data. Thread-safe via one lock."""

    def __init__(self, data_dir: Path, tokens: dict[str, TokenInfo], orgs: dict[str, set[str]]) -> None:
        self.data_dir = Path(data_dir)
        self.blob_dir = self.data_dir / "blobs"
        self.blob_dir.mkdir(parents=True, exist_ok=True)
        self.tokens = dict(tokens)
        self.orgs = {k: set(v) for k, v in orgs.items()}
        self.repos: dict[str, Repo] = {}
        self.lock = threading.RLock()
        self._counter = itertools.count()

    # -- blobs ---------------------------------------------------------------------------------
    def put_blob(self, data: bytes) -> str:
        sha = git_blob_sha1(data)
        path = self.blob_dir / sha
        if not path.exists():
            tmp = self.blob_dir / f".{sha}.{threading.get_ident()}.tmp"
            tmp.write_bytes(data)
            os.replace(tmp, path)
        return sha

    def blob_path(self, sha: str) -> Path:
        return self.blob_dir / sha

    def blob_size(self, sha: str) -> int:
        return self.blob_path(sha).stat().st_size

    # -- auth ----------------------------------------------------------------------------------
    def namespaces_of(self, user: str) -> set[str]:
        return {user} | {org for org, members in self.orgs.items() if user in members}

    def can_read(self, repo: Repo, user: str | None) -> bool:
        if not repo.private:
            return True
        return user is not None and repo.owner in self.namespaces_of(user)

    def can_write_namespace(self, user: str, namespace: str) -> bool:
        return namespace in self.namespaces_of(user)

    # -- commits -------------------------------------------------------------------------------
    def new_commit(
        self, repo: Repo, parent: str | None, files: dict[str, str], title: str, message: str, author: str
    ) -> Commit:
        date = _now_iso()
        seed = json.dumps(
            [repo.repo_id, parent, sorted(files.items()), title, message, date, next(self._counter)]
        ).encode()
        oid = hashlib.sha1(seed).hexdigest()
        commit = Commit(oid, [parent] if parent else [], dict(files), title, message, author, date)
        repo.commits[oid] = commit
        return commit

    def resolve(self, repo: Repo, rev: str) -> tuple[str, str | None]:
        """Return (commit oid, branch name or None). Raises RevisionNotFound like the Hub."""
        if rev in repo.branches:
            return repo.branches[rev], rev
        if rev.startswith("refs/heads/") and rev[len("refs/heads/") :] in repo.branches:
            name = rev[len("refs/heads/") :]
            return repo.branches[name], name
        if rev in repo.tags:
            return repo.tags[rev], None
        if rev.startswith("refs/tags/") and rev[len("refs/tags/") :] in repo.tags:
            return repo.tags[rev[len("refs/tags/") :]], None
        m = re.fullmatch(r"refs/pr/(\d+)", rev)
        if m and int(m.group(1)) in repo.prs:
            return repo.prs[int(m.group(1))], rev
        if _SHA_RE.fullmatch(rev) and rev in repo.commits:
            return rev, None
        raise HubError(404, f"Invalid rev id: {rev}", code="RevisionNotFound")


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # header + body are separate writes: avoid the 40 ms delayed-ACK stall
    timeout = IDLE_CONNECTION_TIMEOUT_S  # applied to the socket by StreamRequestHandler.setup
    server: _ThreadingServer

    # -- plumbing ------------------------------------------------------------------------------
    def setup(self) -> None:
        super().setup()
        self._quickack()
        self.server.track(self.connection, add=True)

    def _quickack(self) -> None:
        # clients send a POST's headers and body in two writes; acknowledge at once instead of
        # letting Nagle + delayed ACK stall each upload by ~40 ms (Linux only; harmless elsewhere)
        if hasattr(socket, "TCP_QUICKACK"):
            try:
                self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_QUICKACK, 1)
            except OSError:
                pass

    def finish(self) -> None:
        try:
            super().finish()
        finally:
            self.server.track(self.connection, add=False)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib signature
        pass  # keep test output clean; requests are recorded in HubServer.requests

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_HEAD(self) -> None:
        self._dispatch("HEAD")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def do_PUT(self) -> None:
        self._dispatch("PUT")

    def do_DELETE(self) -> None:
        self._dispatch("DELETE")

    def _read_body(self) -> bytes:
        self._quickack()
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks, total = [], 0
            for _ in range(1_000_000):  # bounded
                size_line = self.rfile.readline(1024)
                size = int(size_line.split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    self.rfile.readline(1024)
                    break
                total += size
                if total > MAX_BODY_BYTES:
                    raise HubError(413, "Request body too large for the test hub")
                chunks.append(self.rfile.read(size))
                self.rfile.readline(1024)
            return b"".join(chunks)
        length = int(self.headers.get("Content-Length") or 0)
        if length > MAX_BODY_BYTES:
            raise HubError(413, "Request body too large for the test hub")
        return self.rfile.read(length) if length else b""

    def _json_body(self) -> Any:
        raw = self._body
        if not raw:
            return {}
        try:
            return json.loads(raw)
        except ValueError as e:
            raise HubError(400, f"Invalid JSON body: {e}") from e

    def _send(
        self,
        status: int,
        body: bytes | Path = b"",
        *,
        content_type: str = "application/json",
        headers: dict[str, str] | None = None,
    ) -> None:
        length = body.stat().st_size if isinstance(body, Path) else len(body)
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(length))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        if self.command != "HEAD" and length:
            if isinstance(body, Path):
                with open(body, "rb") as f:
                    shutil.copyfileobj(f, self.wfile, 1024 * 1024)
            else:
                self.wfile.write(body)
        self._status = status

    def _send_json(self, status: int, obj: Any, headers: dict[str, str] | None = None) -> None:
        self._send(status, json.dumps(obj).encode(), headers=headers)

    def _send_error(self, err: HubError) -> None:
        safe = (
            err.message.encode("ascii", "backslashreplace")
            .decode("ascii")
            .replace("\r", " ")
            .replace("\n", " ")
        )
        headers = {"X-Error-Message": safe, **err.headers}
        if err.code:
            headers["X-Error-Code"] = err.code
        self._send_json(err.status, {"error": err.message}, headers=headers)

    def _dispatch(self, method: str) -> None:
        hub: HubServer = self.server.hub
        self._status = 0
        split = urlsplit(self.path)
        self._query = {k: v for k, v in parse_qs(split.query, keep_blank_values=True).items()}
        # split the *raw* path: revisions arrive quoted with safe="" (so "refs/pr/1" is one segment)
        segments = [unquote(s) for s in split.path.split("/")[1:]]
        self._user: str | None = None
        self._role: str | None = None
        try:
            self._body = self._read_body() if method in ("POST", "PUT", "DELETE") else b""
            self._user = self._authenticate()
            self._route(method, segments)
        except HubError as err:
            if err.status == 413:  # the body was not read: the connection cannot be reused
                self.close_connection = True
            self._send_error(err)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True
        except Exception as e:  # a server bug: answer 500 and record it for the test to see
            hub.errors.append(f"{method} {self.path}: {type(e).__name__}: {e}")
            try:
                self._send_json(500, {"error": f"test hub internal error: {type(e).__name__}: {e}"})
            except OSError:
                self.close_connection = True
        finally:
            hub.requests.append((method, self.path, self._status))
            self._quickack()  # quick ACK is not sticky on Linux: re-arm it for the next request

    def _authenticate(self) -> str | None:
        auth = self.headers.get("Authorization")
        if not auth:
            return None
        token = auth[7:].strip() if auth.lower().startswith("bearer ") else auth.strip()
        info = self.server.hub.state.tokens.get(token)
        if info is None:
            raise HubError(401, "Invalid credentials in Authorization header")
        self._role = info.role  # reset per request in _dispatch (handlers live per connection)
        return info.user

    def _endpoint(self) -> str:
        return self.server.hub.endpoint

    # -- routing -------------------------------------------------------------------------------
    def _route(self, method: str, seg: list[str]) -> None:
        if seg[:1] == ["api"]:
            rest = seg[1:]
            if rest == ["whoami-v2"] and method == "GET":
                return self._whoami()
            if rest == ["agent-harnesses"] and method == "GET":
                return self._send_json(200, {"standardEnvVars": [], "harnesses": {}})
            if rest == ["validate-yaml"] and method == "POST":
                return self._send_json(200, {"errors": [], "warnings": []})
            if rest == ["repos", "create"] and method == "POST":
                return self._create_repo()
            if rest == ["repos", "delete"] and method == "DELETE":
                return self._delete_repo()
            if len(rest) >= 3 and rest[0] == "models":
                repo_id = f"{rest[1]}/{rest[2]}"
                return self._route_repo_api(method, repo_id, rest[3:])
        elif len(seg) >= 4 and seg[2] == "resolve" and method in ("GET", "HEAD"):
            repo_id = f"{seg[0]}/{seg[1]}"
            return self._resolve_file(repo_id, seg[3], "/".join(seg[4:]))
        elif len(seg) >= 3 and seg[1] == "resolve":  # legacy single-segment repo id
            raise HubError(404, "Repository not found", code="RepoNotFound")
        self.server.hub.unhandled.append(f"{method} {self.path}")
        raise HubError(404, f"Not implemented by the test hub: {method} {urlsplit(self.path).path}")

    def _route_repo_api(self, method: str, repo_id: str, rest: list[str]) -> None:
        action = rest[0] if rest else ""
        if method == "GET" and not rest:
            return self._repo_info(repo_id, None)
        if method == "GET" and action == "revision" and len(rest) == 2:
            return self._repo_info(repo_id, rest[1])
        if method == "GET" and action == "tree" and len(rest) >= 2:
            return self._tree(repo_id, rest[1], "/".join(rest[2:]))
        if method == "POST" and action == "paths-info" and len(rest) == 2:
            return self._paths_info(repo_id, rest[1])
        if method == "GET" and action == "refs" and len(rest) == 1:
            return self._refs(repo_id)
        if method == "GET" and action == "commits" and len(rest) == 2:
            return self._commits(repo_id, rest[1])
        if method == "GET" and action == "auth-check":
            return self._auth_check(repo_id, write=rest[1:] == ["write"])
        if method == "POST" and action == "preupload" and len(rest) == 2:
            return self._preupload(repo_id, rest[1])
        if method == "POST" and action == "commit" and len(rest) == 2:
            return self._commit(repo_id, rest[1])
        if action == "branch" and len(rest) == 2 and method in ("POST", "DELETE"):
            return self._branch(method, repo_id, rest[1])
        if action == "tag" and len(rest) == 2 and method in ("POST", "DELETE"):
            return self._tag(method, repo_id, rest[1])
        if method == "PUT" and action == "settings" and len(rest) == 1:
            return self._settings(repo_id)
        self.server.hub.unhandled.append(f"{method} {self.path}")
        raise HubError(404, f"Not implemented by the test hub: {method} {urlsplit(self.path).path}")

    # -- access helpers ------------------------------------------------------------------------
    def _get_repo(self, repo_id: str) -> Repo:
        state = self.server.hub.state
        repo = state.repos.get(repo_id)
        if repo is None or not state.can_read(repo, self._user):
            # the real Hub hides private repos: 401 when anonymous, 404 when authenticated
            raise HubError(401 if self._user is None else 404, "Repository not found", code="RepoNotFound")
        return repo

    def _require_write(self, repo: Repo) -> str:
        if self._user is None:
            raise HubError(401, "You must be authenticated to write to this repo: pass a write token")
        if not self.server.hub.state.can_write_namespace(self._user, repo.owner):
            raise HubError(403, f"You don't have write access to {repo.repo_id}")
        if self._role != "write":
            raise HubError(403, "This token has read-only permissions; use a token with the 'write' role")
        return self._user

    def _check_gate(self, repo: Repo) -> None:
        if not repo.gated:
            return
        user = self._user
        if user is not None and (
            repo.owner in self.server.hub.state.namespaces_of(user) or user in repo.granted
        ):
            return
        raise HubError(
            401 if user is None else 403,
            f"Access to model {repo.repo_id} is restricted. You must have access to it and be authenticated.",
            code="GatedRepo",
        )

    # -- endpoints -----------------------------------------------------------------------------
    def _whoami(self) -> None:
        if self._user is None:
            raise HubError(401, "Invalid credentials in Authorization header")
        state = self.server.hub.state
        orgs = [{"type": "org", "name": o} for o, m in sorted(state.orgs.items()) if self._user in m]
        role = self._role
        self._send_json(
            200,
            {
                "type": "user",
                "id": hashlib.sha1(self._user.encode()).hexdigest()[:24],
                "name": self._user,
                "fullname": self._user,
                "email": f"{self._user}@example.invalid",
                "emailVerified": True,
                "isPro": False,
                "orgs": orgs,
                "auth": {"type": "access_token", "accessToken": {"displayName": "test", "role": role}},
            },
        )

    def _create_repo(self) -> None:
        body = self._json_body()
        if self._user is None:
            raise HubError(401, "You must be authenticated to create a repo: pass a write token")
        if body.get("type", "model") not in (None, "model"):
            raise HubError(400, "The test hub only hosts model repos")
        name, org = body.get("name"), body.get("organization")
        namespace = org or self._user
        if not isinstance(name, str) or not _NAME_RE.match(name) or not _NAME_RE.match(namespace):
            raise HubError(400, f"Invalid repo name: {namespace}/{name}")
        state = self.server.hub.state
        repo_id = f"{namespace}/{name}"
        url = f"{self._endpoint()}/{repo_id}"
        with state.lock:
            if not state.can_write_namespace(self._user, namespace):
                raise HubError(
                    403, f"You don't have the rights to create a model under the namespace {namespace}"
                )
            if self._role != "write":
                raise HubError(403, "This token has read-only permissions; use a token with the 'write' role")
            if repo_id in state.repos:
                return self._send_json(409, {"error": "You already created this model repo", "url": url})
            private = body.get("visibility") == "private" or bool(body.get("private"))
            repo = Repo(repo_id=repo_id, owner=namespace, private=private, created_at=_now_iso())
            blob = state.put_blob(DEFAULT_GITATTRIBUTES)
            first = state.new_commit(repo, None, {".gitattributes": blob}, "initial commit", "", self._user)
            repo.branches["main"] = first.oid
            state.repos[repo_id] = repo
        self._send_json(
            200, {"url": url, "name": repo_id, "id": hashlib.sha1(repo_id.encode()).hexdigest()[:24]}
        )

    def _delete_repo(self) -> None:
        body = self._json_body()
        namespace = body.get("organization") or self._user
        repo_id = f"{namespace}/{body.get('name')}"
        state = self.server.hub.state
        with state.lock:
            repo = self._get_repo(repo_id)
            self._require_write(repo)
            del state.repos[repo_id]
        self._send_json(200, {})

    def _settings(self, repo_id: str) -> None:
        body = self._json_body()
        state = self.server.hub.state
        with state.lock:
            repo = self._get_repo(repo_id)
            self._require_write(repo)
            if "visibility" in body:
                repo.private = body["visibility"] == "private"
            if "private" in body:
                repo.private = bool(body["private"])
            if "gated" in body:
                repo.gated = body["gated"] or False
        self._send_json(200, {})

    def _auth_check(self, repo_id: str, *, write: bool) -> None:
        with self.server.hub.state.lock:
            repo = self._get_repo(repo_id)
            if write:
                self._require_write(repo)
            self._check_gate(repo)
        self._send_json(200, {})

    def _repo_info(self, repo_id: str, rev: str | None) -> None:
        state = self.server.hub.state
        with state.lock:
            repo = self._get_repo(repo_id)
            oid, _ = state.resolve(repo, rev or "main")
            commit = repo.commits[oid]
            blobs = self._query.get("blobs", ["false"])[0].lower() in ("1", "true")
            siblings = []
            for path, sha in sorted(commit.files.items()):
                entry: dict[str, Any] = {"rfilename": path}
                if blobs:
                    entry.update(size=state.blob_size(sha), blobId=sha)
                siblings.append(entry)
            card = (
                _front_matter(state.blob_path(commit.files["README.md"]).read_bytes())
                if "README.md" in commit.files
                else {}
            )
        tags = list(card.get("tags") or []) if isinstance(card.get("tags"), list) else []
        info: dict[str, Any] = {
            "_id": hashlib.sha1(repo_id.encode()).hexdigest()[:24],
            "id": repo_id,
            "modelId": repo_id,
            "author": repo.owner,
            "sha": oid,
            "lastModified": commit.date,
            "createdAt": repo.created_at,
            "private": repo.private,
            "gated": repo.gated,
            "disabled": False,
            "downloads": 0,
            "likes": 0,
            "tags": tags,
            "siblings": siblings,
            "spaces": [],
        }
        if card:
            info["cardData"] = card
            if isinstance(card.get("library_name"), str):
                info["library_name"] = card["library_name"]
            if isinstance(card.get("pipeline_tag"), str):
                info["pipeline_tag"] = card["pipeline_tag"]
        self._send_json(200, info)

    def _tree_entries(
        self, repo: Repo, commit: Commit, prefix: str, recursive: bool, expand: bool
    ) -> list[dict]:
        state = self.server.hub.state
        prefix = prefix.strip("/")
        base = prefix + "/" if prefix else ""
        files = {p: s for p, s in commit.files.items() if p.startswith(base)}
        if prefix and not files:
            if prefix in commit.files:  # the path is a file, the Hub lists it alone
                files = {prefix: commit.files[prefix]}
                base = ""
            else:
                raise HubError(404, f"{prefix} does not exist on {commit.oid}", code="EntryNotFound")
        entries: dict[str, dict] = {}
        for path, sha in files.items():
            rel_parts = path[len(base) :].split("/")
            if len(rel_parts) > MAX_TREE_DEPTH:
                continue
            dirs = [base + "/".join(rel_parts[: i + 1]) for i in range(len(rel_parts) - 1)]
            if not recursive and dirs:
                d = dirs[0]
                entries[d] = {
                    "type": "directory",
                    "oid": hashlib.sha1(d.encode()).hexdigest(),
                    "size": 0,
                    "path": d,
                }
                continue
            for d in dirs:
                entries[d] = {
                    "type": "directory",
                    "oid": hashlib.sha1(d.encode()).hexdigest(),
                    "size": 0,
                    "path": d,
                }
            entry = {"type": "file", "oid": sha, "size": state.blob_size(sha), "path": path}
            if expand:
                last = self._last_commit_touching(repo, commit, path)
                entry["lastCommit"] = {"id": last.oid, "title": last.title, "date": last.date}
            entries[path] = entry
        return [entries[k] for k in sorted(entries)]

    @staticmethod
    def _last_commit_touching(repo: Repo, commit: Commit, path: str) -> Commit:
        current = commit
        for _ in range(len(repo.commits) + 1):  # bounded walk along first parents
            if not current.parents:
                return current
            parent = repo.commits[current.parents[0]]
            if parent.files.get(path) != current.files.get(path):
                return current
            current = parent
        return current

    def _tree(self, repo_id: str, rev: str, path: str) -> None:
        state = self.server.hub.state
        recursive = self._query.get("recursive", ["false"])[0].lower() in ("1", "true")
        expand = self._query.get("expand", ["false"])[0].lower() in ("1", "true")
        with state.lock:
            repo = self._get_repo(repo_id)
            oid, _ = state.resolve(repo, rev)
            entries = self._tree_entries(repo, repo.commits[oid], path, recursive, expand)
        self._send_json(200, entries)

    def _paths_info(self, repo_id: str, rev: str) -> None:
        ctype = self.headers.get("Content-Type", "")
        if "json" in ctype:
            body = self._json_body()
            paths = body.get("paths") or []
        else:
            form = parse_qs(self._body.decode(), keep_blank_values=True)
            paths = form.get("paths", [])
        state = self.server.hub.state
        out = []
        with state.lock:
            repo = self._get_repo(repo_id)
            oid, _ = state.resolve(repo, rev)
            files = repo.commits[oid].files
            for p in paths[:10_000]:
                p = p.strip("/")
                if p in files:
                    out.append(
                        {"type": "file", "oid": files[p], "size": state.blob_size(files[p]), "path": p}
                    )
                elif any(f.startswith(p + "/") for f in files):
                    out.append(
                        {
                            "type": "directory",
                            "oid": hashlib.sha1(p.encode()).hexdigest(),
                            "size": 0,
                            "path": p,
                        }
                    )
        self._send_json(200, out)

    def _refs(self, repo_id: str) -> None:
        with self.server.hub.state.lock:
            repo = self._get_repo(repo_id)
            data = {
                "branches": [
                    {"name": n, "ref": f"refs/heads/{n}", "targetCommit": o}
                    for n, o in sorted(repo.branches.items())
                ],
                "tags": [
                    {"name": n, "ref": f"refs/tags/{n}", "targetCommit": o}
                    for n, o in sorted(repo.tags.items())
                ],
                "converts": [],
            }
            if self._query.get("include_prs", ["0"])[0] in ("1", "true", "True"):
                data["pullRequests"] = [
                    {"name": f"refs/pr/{n}", "ref": f"refs/pr/{n}", "targetCommit": o}
                    for n, o in sorted(repo.prs.items())
                ]
        self._send_json(200, data)

    def _commits(self, repo_id: str, rev: str) -> None:
        state = self.server.hub.state
        out = []
        with state.lock:
            repo = self._get_repo(repo_id)
            oid, _ = state.resolve(repo, rev)
            current: Commit | None = repo.commits[oid]
            for _ in range(len(repo.commits)):
                if current is None:
                    break
                out.append(
                    {
                        "id": current.oid,
                        "title": current.title,
                        "message": current.message,
                        "authors": [{"user": current.author}],
                        "date": current.date,
                    }
                )
                current = repo.commits[current.parents[0]] if current.parents else None
        self._send_json(200, out)

    def _preupload(self, repo_id: str, rev: str) -> None:
        body = self._json_body()
        state = self.server.hub.state
        create_pr = self._query.get("create_pr", ["0"])[0] in ("1", "true")
        with state.lock:
            repo = self._get_repo(repo_id)
            self._require_write(repo)
            oid, branch = state.resolve(repo, rev)
            if branch is None and not create_pr:
                raise HubError(400, f"Cannot commit to {rev}: not a branch")
            files = repo.commits[oid].files
            answer = [
                {
                    "path": f["path"],
                    "uploadMode": "regular",
                    "shouldIgnore": False,
                    "oid": files.get(f["path"]),
                }
                for f in (body.get("files") or [])[:10_000]
            ]
        self._send_json(200, {"files": answer, "commitOid": oid})

    def _commit(self, repo_id: str, rev: str) -> None:
        state = self.server.hub.state
        create_pr = self._query.get("create_pr", ["0"])[0] in ("1", "true")
        lines = self._body.split(b"\n")
        if len(lines) > MAX_COMMIT_LINES:
            raise HubError(413, "Too many operations in one commit for the test hub")
        header: dict[str, Any] | None = None
        ops: list[tuple[str, dict]] = []
        for raw in lines:
            if not raw.strip():
                continue
            try:
                item = json.loads(raw)
            except ValueError as e:
                raise HubError(400, f"Invalid NDJSON line in commit payload: {e}") from e
            if item.get("key") == "header":
                header = item.get("value") or {}
            else:
                ops.append((item.get("key"), item.get("value") or {}))
        if header is None:
            raise HubError(400, "Commit payload has no header line")
        with state.lock:
            repo = self._get_repo(repo_id)
            author = self._require_write(repo)
            base_oid, branch = state.resolve(repo, rev)
            if branch is None:
                raise HubError(
                    400, f"Cannot commit to {rev}: it is not a branch (tags and commits are immutable)"
                )
            parent_commit = header.get("parentCommit")
            if parent_commit and not create_pr and parent_commit != base_oid:
                raise HubError(412, "A commit has happened since. Please refresh and try again.")
            files = dict(repo.commits[base_oid].files)
            for key, value in ops:
                path = str(value.get("path", ""))
                if key in ("file", "deletedFile", "deletedFolder", "lfsFile"):
                    _check_repo_path(path.rstrip("/") if key == "deletedFolder" else path)
                if key == "file":
                    if value.get("encoding", "base64") != "base64":
                        raise HubError(400, f"Unsupported encoding for {path}: {value.get('encoding')}")
                    try:
                        data = base64.b64decode(value.get("content", ""), validate=True)
                    except (binascii.Error, ValueError) as e:
                        raise HubError(400, f"Invalid base64 content for {path}") from e
                    files[path] = state.put_blob(data)
                elif key == "deletedFile":
                    if path not in files:
                        raise HubError(
                            404, f"A file with this name doesn't exist: {path}", code="EntryNotFound"
                        )
                    del files[path]
                elif key == "deletedFolder":
                    prefix = path.rstrip("/") + "/"
                    doomed = [p for p in files if p.startswith(prefix)]
                    if not doomed:
                        raise HubError(
                            404, f"A folder with this name doesn't exist: {path}", code="EntryNotFound"
                        )
                    for p in doomed:
                        del files[p]
                elif key == "lfsFile":
                    raise HubError(
                        400,
                        "LFS uploads are not supported by the test hub (preupload always answers 'regular')",
                    )
                else:
                    raise HubError(400, f"Unknown commit operation: {key!r}")
            summary = str(header.get("summary") or "").strip()
            if not summary:
                raise HubError(400, "Commit summary must not be empty")
            pr_url = None
            if create_pr:
                number = max(repo.prs, default=0) + 1
                commit = state.new_commit(
                    repo, base_oid, files, summary, header.get("description") or "", author
                )
                repo.prs[number] = commit.oid
                pr_url = f"{self._endpoint()}/{repo_id}/discussions/{number}"
            else:
                commit = state.new_commit(
                    repo, base_oid, files, summary, header.get("description") or "", author
                )
                if branch.startswith("refs/pr/"):
                    repo.prs[int(branch.rsplit("/", 1)[1])] = commit.oid
                else:
                    repo.branches[branch] = commit.oid
        self._send_json(
            200,
            {
                "success": True,
                "commitOid": commit.oid,
                "commitUrl": f"{self._endpoint()}/{repo_id}/commit/{commit.oid}",
                "hookOutput": "",
                "pullRequestUrl": pr_url,
            },
        )

    def _branch(self, method: str, repo_id: str, name: str) -> None:
        state = self.server.hub.state
        body = self._json_body()
        with state.lock:
            repo = self._get_repo(repo_id)
            self._require_write(repo)
            if method == "DELETE":
                if name not in repo.branches:
                    raise HubError(404, f"Invalid rev id: {name}", code="RevisionNotFound")
                if name == "main":
                    raise HubError(403, "Cannot delete the default branch")
                del repo.branches[name]
                return self._send_json(200, {})
            if not name or name.startswith("refs/") or ".." in name or name.endswith("/") or " " in name:
                raise HubError(400, f"Invalid reference for a branch: {name}")
            if name in repo.branches:
                raise HubError(409, f"Reference already exists: refs/heads/{name}")
            start = body.get("startingPoint")
            oid, _ = state.resolve(repo, start) if start else (repo.branches["main"], "main")
            repo.branches[name] = oid
        self._send_json(200, {})

    def _tag(self, method: str, repo_id: str, ref: str) -> None:
        state = self.server.hub.state
        body = self._json_body()
        with state.lock:
            repo = self._get_repo(repo_id)
            self._require_write(repo)
            if method == "DELETE":
                if ref not in repo.tags:
                    raise HubError(404, f"Invalid rev id: {ref}", code="RevisionNotFound")
                del repo.tags[ref]
                return self._send_json(200, {})
            tag = body.get("tag")
            if not isinstance(tag, str) or not tag or tag.startswith("refs/") or " " in tag:
                raise HubError(400, f"Invalid tag name: {tag!r}")
            oid, _ = state.resolve(repo, ref)
            if tag in repo.tags:
                raise HubError(409, f"Tag {tag} already exists")
            repo.tags[tag] = oid
        self._send_json(200, {})

    def _resolve_file(self, repo_id: str, rev: str, path: str) -> None:
        state = self.server.hub.state
        with state.lock:
            repo = self._get_repo(repo_id)
            oid, _ = state.resolve(repo, rev)
            self._check_gate(repo)
            sha = repo.commits[oid].files.get(path)
            if sha is None:
                raise HubError(404, "Entry not found", code="EntryNotFound", headers={"X-Repo-Commit": oid})
            blob = state.blob_path(sha)
        self._send(
            200,
            blob,
            content_type="application/octet-stream",
            headers={"ETag": f'"{sha}"', "X-Repo-Commit": oid, "Accept-Ranges": "none"},
        )


def _check_repo_path(path: str) -> None:
    if not path or path.startswith("/") or "\\" in path or any(p in ("", ".", "..") for p in path.split("/")):
        raise HubError(400, f"Invalid path in repo: {path!r}")


def _front_matter(readme: bytes) -> dict[str, Any]:
    """The model card's YAML front matter (``model_info().card_data/tags/library_name``), parsed with
    PyYAML's safe loader as the Hub parses it; a README without valid front matter has none."""
    text = readme.decode("utf-8", errors="replace")
    if not text.startswith("---"):
        return {}
    end = text.find("\n---", 3)
    if end < 0:
        return {}
    try:
        data = yaml.safe_load(text[3:end])
    except yaml.YAMLError:
        return {}
    return data if isinstance(data, dict) else {}


class _ThreadingServer(http.server.ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False
    allow_reuse_address = True

    def __init__(self, addr: tuple[str, int], hub: HubServer) -> None:
        self.hub = hub
        self._open: set[socket.socket] = set()
        self._open_lock = threading.Lock()
        super().__init__(addr, _Handler)

    def track(self, conn: socket.socket, *, add: bool) -> None:
        with self._open_lock:
            (self._open.add if add else self._open.discard)(conn)

    def close_all_connections(self) -> None:
        with self._open_lock:
            conns = list(self._open)
            self._open.clear()
        for c in conns:
            try:
                c.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


class HubServer:
    """A local Hub on ``127.0.0.1:<free port>``; data lives in ``data_dir`` (a temp dir by default).

    ``user``/``token`` is the main write identity; ``read_token`` is a read-only token for the same
    user; ``other_user``/``other_token`` is a second user with no access to ``user``'s private repos;
    ``org`` is an organisation ``user`` belongs to.
    """

    user = "ace-tester"
    token = "hf_ace_test_write_token_0000000000"
    read_token = "hf_ace_test_read_token_00000000000"
    other_user = "someone-else"
    other_token = "hf_ace_test_other_token_0000000000"
    org = "ace-test-org"

    def __init__(self, data_dir: str | os.PathLike | None = None) -> None:
        self._own_dir = data_dir is None
        self.data_dir = (
            Path(data_dir) if data_dir is not None else Path(tempfile.mkdtemp(prefix="ace-test-hub-"))
        )
        self.requests: collections.deque[tuple[str, str, int]] = collections.deque(maxlen=2000)
        self.unhandled: list[str] = []
        self.errors: list[str] = []
        self.state = self._fresh_state()
        self._httpd: _ThreadingServer | None = None
        self._thread: threading.Thread | None = None
        self.endpoint = ""

    def _fresh_state(self) -> HubState:
        tokens = {
            self.token: TokenInfo(self.user, "write"),
            self.read_token: TokenInfo(self.user, "read"),
            self.other_token: TokenInfo(self.other_user, "write"),
        }
        data = self.data_dir / f"state-{time.monotonic_ns()}"
        return HubState(data, tokens, {self.org: {self.user}})

    def start(self) -> HubServer:
        self._httpd = _ThreadingServer(("127.0.0.1", 0), self)
        port = self._httpd.server_address[1]
        self.endpoint = f"http://127.0.0.1:{port}"
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, kwargs={"poll_interval": 0.1}, name="ace-test-hub", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.close_all_connections()
            self._httpd.server_close()
            self._httpd = None
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
        if self._own_dir:
            shutil.rmtree(self.data_dir, ignore_errors=True)

    def reset(self) -> None:
        """Forget every repo (and start a fresh blob store); tokens and users stay."""
        old = self.state
        self.state = self._fresh_state()
        shutil.rmtree(old.data_dir, ignore_errors=True)
        self.requests.clear()
        self.unhandled.clear()
        self.errors.clear()

    def __enter__(self) -> HubServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- conveniences for tests ----------------------------------------------------------------
    def repo(self, repo_id: str) -> Repo:
        return self.state.repos[repo_id]

    def set_gated(self, repo_id: str, gated: Any = "manual", *, granted: tuple[str, ...] = ()) -> None:
        with self.state.lock:
            r = self.state.repos[repo_id]
            r.gated = gated
            r.granted = set(granted)

    def url(self, repo_id: str, filename: str, revision: str = "main") -> str:
        return f"{self.endpoint}/{repo_id}/resolve/{quote(revision, safe='')}/{quote(filename)}"


# --------------------------------------------------------------------------------------------
# pytest fixtures
# --------------------------------------------------------------------------------------------
try:
    import pytest
except ImportError:  # pragma: no cover - the server itself does not need pytest
    pytest = None  # type: ignore[assignment]


@dataclasses.dataclass
class HubContext:
    """What the ``hub_server`` fixture yields: the server plus switches scoped to one test."""

    server: HubServer
    cache_dir: Path
    _monkeypatch: Any

    @property
    def endpoint(self) -> str:
        return self.server.endpoint

    @property
    def token(self) -> str:
        return self.server.token

    @property
    def user(self) -> str:
        return self.server.user

    def repo_id(self, name: str) -> str:
        return f"{self.server.user}/{name}"

    def set_offline(self, offline: bool) -> None:
        """Flip offline mode for the rest of the test (env var *and* the constants copied at import)."""
        _patch_offline(self._monkeypatch, offline)


def _patch_offline(monkeypatch: Any, offline: bool) -> None:
    from huggingface_hub import constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1" if offline else "0")
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", offline)
    # diffusers copies the flag into a few modules at import (`from huggingface_hub.constants import ...`)
    for mod_name in (
        "diffusers.utils.hub_utils",
        "diffusers.loaders.lora_base",
        "diffusers.models.attention_dispatch",
    ):
        mod = sys.modules.get(mod_name)
        if mod is not None and hasattr(mod, "HF_HUB_OFFLINE"):
            monkeypatch.setattr(mod, "HF_HUB_OFFLINE", offline)


def configure_client(monkeypatch: Any, endpoint: str, cache_dir: Path, home_dir: Path) -> None:
    """Point the already-imported ``huggingface_hub`` (and diffusers' copies) at ``endpoint``."""
    from huggingface_hub import constants, hf_api

    home_dir.mkdir(parents=True, exist_ok=True)
    cache_dir.mkdir(parents=True, exist_ok=True)
    monkeypatch.setenv("HF_ENDPOINT", endpoint)
    monkeypatch.setenv("HF_HUB_DISABLE_XET", "1")
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache_dir))
    for var in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_HUB_ENABLE_HF_TRANSFER", "HUGGINGFACE_CO_STAGING"):
        monkeypatch.delenv(var, raising=False)
    _patch_offline(monkeypatch, False)

    monkeypatch.setattr(constants, "ENDPOINT", endpoint)
    monkeypatch.setattr(
        constants, "HUGGINGFACE_CO_URL_TEMPLATE", endpoint + "/{repo_id}/resolve/{revision}/{filename}"
    )
    if hasattr(constants, "HF_URL_HOSTS"):
        monkeypatch.setattr(constants, "HF_URL_HOSTS", frozenset(constants.HF_URL_HOSTS | {"127.0.0.1"}))
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_TELEMETRY", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache_dir))
    # no stored login from the machine running the tests may leak into "anonymous" requests
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(home_dir / "token"))
    monkeypatch.setattr(constants, "HF_STORED_TOKENS_PATH", str(home_dir / "stored_tokens"))
    if hasattr(constants, "AGENT_HARNESSES_PATH"):
        monkeypatch.setattr(constants, "AGENT_HARNESSES_PATH", str(home_dir / ".agent_harnesses.json"))
    # module-level `huggingface_hub.create_repo`, `model_info`, ... are bound to an HfApi built at import
    monkeypatch.setattr(hf_api.api, "endpoint", endpoint)
    try:
        from huggingface_hub.utils import _detect_agent

        monkeypatch.setattr(_detect_agent, "_registry", {"standardEnvVars": [], "harnesses": {}})
    except (ImportError, AttributeError):  # pragma: no cover - older/newer client layout
        pass
    dconst = sys.modules.get("diffusers.utils.constants")
    if dconst is not None and hasattr(dconst, "HUGGINGFACE_CO_RESOLVE_ENDPOINT"):
        monkeypatch.setattr(dconst, "HUGGINGFACE_CO_RESOLVE_ENDPOINT", endpoint)


if pytest is not None:

    @pytest.fixture(scope="session")
    def hub_server_session(tmp_path_factory: Any) -> Iterator[HubServer]:
        """One local Hub per test session (started lazily, stopped at session teardown)."""
        server = HubServer(tmp_path_factory.mktemp("hub-server-data")).start()
        try:
            yield server
        finally:
            server.stop()

    @pytest.fixture
    def hub_server(hub_server_session: HubServer, monkeypatch: Any, tmp_path: Path) -> Iterator[HubContext]:
        """A clean local Hub with the real ``huggingface_hub`` client pointed at it for one test.

        Yields a :class:`HubContext` (``.endpoint``, ``.token``, ``.user``, ``.server``,
        ``.cache_dir``, ``.set_offline(bool)``). Offline mode is off and the HF cache is a fresh
        ``tmp_path/hf-cache`` for the duration of the test; everything is restored afterwards.
        """
        hub_server_session.reset()
        cache_dir = tmp_path / "hf-cache"
        configure_client(monkeypatch, hub_server_session.endpoint, cache_dir, tmp_path / "hf-home")
        yield HubContext(hub_server_session, cache_dir, monkeypatch)
        assert not hub_server_session.errors, f"test hub internal errors: {hub_server_session.errors}"
        assert not hub_server_session.unhandled, (
            f"the client called endpoints the test hub does not implement: {hub_server_session.unhandled}; "
            "add them to tests/hub_server.py"
        )
