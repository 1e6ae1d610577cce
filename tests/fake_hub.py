"""A local stand-in for the Hugging Face Hub API, enough for `fusedata publish` with the real client.

Runs a `ThreadingHTTPServer` on 127.0.0.1 and implements: whoami, repo create, repo info (models,
datasets, spaces), validate-yaml, branch create, preupload (always "regular": file contents arrive
base64-inlined in the commit), commit (NDJSON), and tree listing. It records every request (method,
path, whether the token was right) and every commit, and can answer 500 to chosen commits.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

REPO = r"(?P<type>model|dataset|space)s/(?P<repo>[^/]+/[^/]+)"


@dataclass
class Repo:
    type: str
    private: bool = False
    branches: dict[str, dict[str, bytes]] = field(default_factory=lambda: {"main": {}})
    heads: dict[str, str] = field(default_factory=lambda: {"main": "0" * 40})


@dataclass
class Commit:
    repo: str
    revision: str
    summary: str
    added: list[str]
    deleted: list[str]


def git_sha1(data: bytes) -> str:
    return hashlib.sha1(f"blob {len(data)}\0".encode() + data).hexdigest()


class FakeHub:
    def __init__(self, token: str, user: str = "tester") -> None:
        self.token = token
        self.user = user
        self.repos: dict[tuple[str, str], Repo] = {}
        self.requests: list[tuple[str, str, bool]] = []  # (method, path, authorised)
        self.commits: list[Commit] = []
        self.fail_commits: set[int] = set()  # 1-based numbers of commit requests to answer with 500
        self.commit_requests = 0
        self.lock = threading.Lock()
        self.server: ThreadingHTTPServer | None = None
        self.thread: threading.Thread | None = None

    # -- lifecycle ------------------------------------------------------------------------------
    @property
    def endpoint(self) -> str:
        assert self.server is not None
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def start(self) -> FakeHub:
        hub = self

        class Handler(_Handler):
            pass

        Handler.hub = hub
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()
        return self

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
        if self.thread is not None:
            self.thread.join(timeout=5)

    def __enter__(self) -> FakeHub:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    # -- helpers for tests ----------------------------------------------------------------------
    def add_repo(self, repo_id: str, repo_type: str = "dataset") -> Repo:
        repo = Repo(repo_type)
        self.repos[(repo_type, repo_id)] = repo
        return repo

    def files(self, repo_id: str, revision: str = "main", repo_type: str = "dataset") -> dict[str, bytes]:
        return dict(self.repos[(repo_type, repo_id)].branches[revision])


class _Handler(BaseHTTPRequestHandler):
    hub: FakeHub
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:  # keep test output clean
        pass

    # -- plumbing -------------------------------------------------------------------------------
    def _body(self) -> bytes:
        n = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(n) if n else b""

    def _send(self, status: int, payload: Any = None, error_code: str | None = None) -> None:
        body = json.dumps(payload if payload is not None else {}).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        if error_code:
            self.send_header("X-Error-Code", error_code)
            self.send_header("X-Error-Message", str((payload or {}).get("error", error_code)))
        self.end_headers()
        self.wfile.write(body)

    def _authorised(self) -> bool:
        return self.headers.get("Authorization") == f"Bearer {self.hub.token}"

    def _route(self, method: str) -> None:
        url = urlsplit(self.path)
        path = unquote(url.path)
        query = parse_qs(url.query)
        body = self._body()
        ok = self._authorised()
        with self.hub.lock:
            self.hub.requests.append((method, path, ok))
        if not ok:
            return self._send(401, {"error": "Invalid credentials in Authorization header"})
        try:
            self._dispatch(method, path, query, body)
        except Exception as exc:  # a bug in the fake: tell the client instead of hanging
            self._send(500, {"error": f"fake hub: {type(exc).__name__}: {exc}"})

    def do_GET(self) -> None:  # noqa: N802
        self._route("GET")

    def do_POST(self) -> None:  # noqa: N802
        self._route("POST")

    # -- the API --------------------------------------------------------------------------------
    def _dispatch(self, method: str, path: str, query: dict[str, list[str]], body: bytes) -> None:
        hub = self.hub
        if method == "GET" and path == "/api/whoami-v2":
            return self._send(200, {"type": "user", "name": hub.user, "orgs": [],
                                    "auth": {"type": "access_token", "accessToken": {"role": "write"}}})
        if method == "POST" and path == "/api/repos/create":
            d = json.loads(body)
            repo_id = f"{d['organization']}/{d['name']}" if d.get("organization") else f"{hub.user}/{d['name']}"
            key = (d.get("type") or "model", repo_id)
            with hub.lock:
                if key in hub.repos:
                    return self._send(409, {"error": "You already created this repo"})
                hub.repos[key] = Repo(key[0], private=d.get("visibility") == "private" or bool(d.get("private")))
            return self._send(200, {"url": f"{hub.endpoint}/{'datasets/' if key[0] == 'dataset' else ''}{repo_id}"})
        if method == "POST" and path == "/api/validate-yaml":
            return self._send(200, {})
        m = re.fullmatch(rf"/api/{REPO}(?:/revision/(?P<rev>[^/]+))?", path)
        if method == "GET" and m:
            repo = hub.repos.get((m["type"], m["repo"]))
            if repo is None:
                return self._send(404, {"error": "Repository not found"}, "RepoNotFound")
            rev = m["rev"] or "main"
            return self._send(200, {"id": m["repo"], "private": repo.private, "sha": repo.heads.get(rev, "0" * 40)})
        m = re.fullmatch(rf"/api/{REPO}/(?P<op>preupload|commit|tree|branch|paths-info)/(?P<rev>[^/]+)(?P<rest>/.*)?",
                         path)
        if not m:
            return self._send(404, {"error": f"fake hub: no route for {method} {path}"})
        repo = hub.repos.get((m["type"], m["repo"]))
        if repo is None:
            return self._send(404, {"error": "Repository not found"}, "RepoNotFound")
        op, rev = m["op"], m["rev"]
        if op == "branch" and method == "POST":
            with hub.lock:
                if rev in repo.branches:
                    return self._send(409, {"error": "Branch already exists"})
                repo.branches[rev] = dict(repo.branches["main"])
                repo.heads[rev] = repo.heads["main"]
            return self._send(200, {})
        if rev not in repo.branches:
            return self._send(404, {"error": "Revision not found"}, "RevisionNotFound")
        files = repo.branches[rev]
        if op == "preupload":
            d = json.loads(body)
            return self._send(200, {"files": [
                {"path": f["path"], "uploadMode": "regular", "shouldIgnore": False,
                 "oid": git_sha1(files[f["path"]]) if f["path"] in files else None}
                for f in d["files"]]})
        if op == "tree":
            prefix = (m["rest"] or "").lstrip("/")
            recursive = query.get("recursive", ["False"])[0].lower() == "true"
            entries = []
            for p, data in sorted(files.items()):
                if prefix and not p.startswith(prefix.rstrip("/") + "/"):
                    continue
                rel = p[len(prefix.rstrip("/")) + 1:] if prefix else p
                if "/" in rel and not recursive:
                    continue
                entries.append(_entry(p, data))
            if prefix and not entries:
                return self._send(404, {"error": "Entry not found"}, "EntryNotFound")
            return self._send(200, entries)
        if op == "commit" and method == "POST":
            with hub.lock:
                hub.commit_requests += 1
                number = hub.commit_requests
            if number in hub.fail_commits:
                return self._send(500, {"error": "Internal Error - We're working hard to fix this as soon as possible!"})
            lines = [json.loads(line) for line in body.decode().splitlines() if line.strip()]
            header = lines[0]["value"]
            added, deleted = [], []
            with hub.lock:
                for item in lines[1:]:
                    v = item["value"]
                    if item["key"] == "file":
                        assert v["encoding"] == "base64"
                        files[v["path"]] = base64.b64decode(v["content"])
                        added.append(v["path"])
                    elif item["key"] == "deletedFile":
                        files.pop(v["path"], None)
                        deleted.append(v["path"])
                    else:
                        raise ValueError(f"unsupported commit operation {item['key']}")
                oid = hashlib.sha1(f"{m['repo']}{rev}{number}".encode()).hexdigest()
                repo.heads[rev] = oid
                hub.commits.append(Commit(m["repo"], rev, header["summary"], added, deleted))
            prefix = "datasets/" if m["type"] == "dataset" else ""
            return self._send(200, {"commitUrl": f"{hub.endpoint}/{prefix}{m['repo']}/commit/{oid}",
                                    "commitOid": oid, "pullRequestUrl": None})
        return self._send(404, {"error": f"fake hub: no route for {method} {path}"})


def _entry(path: str, data: bytes) -> dict[str, Any]:
    """A tree entry as the Hub lists it: binary data files are LFS (sha256 oid), text files plain git blobs."""
    entry: dict[str, Any] = {"type": "file", "path": path, "size": len(data), "oid": git_sha1(data)}
    if path.endswith(".parquet"):
        entry["lfs"] = {"oid": hashlib.sha256(data).hexdigest(), "size": len(data), "pointerSize": 134}
    return entry
