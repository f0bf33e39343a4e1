"""A local HTTP server that serves model repos in the Hugging Face Hub's layout (for HF_ENDPOINT).

Enough of the Hub's API for huggingface_hub's `snapshot_download`/`hf_hub_download`:

- `GET /api/models/{repo}/revision/{rev}` -> model info (`sha`, `siblings`)
- `GET /api/models/{repo}/tree/{rev}[/{path}]?recursive=...` -> file listing (paginated like the Hub
  with a `Link: <...>; rel="next"` header when `page_size` is exceeded)
- `HEAD|GET /{repo}/resolve/{rev}/{file}` -> the file, with `ETag`, `X-Repo-Commit`,
  `Content-Length`, `Accept-Ranges` and `Range: bytes=N-` / `N-M` support (206 + `Content-Range`)

Unknown repos answer 401 with `X-Error-Code: RepoNotFound` and unknown revisions/files 404 with
`X-Error-Code: RevisionNotFound`/`EntryNotFound`, as the Hub does. Tests can make the server cut a
file's transfer short once (`drop_after`) to exercise resuming, and read `requests` to see what
the client asked for.
"""

from __future__ import annotations

import hashlib
import json
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, quote, unquote, urlsplit

PAGE_SIZE = 1000  # the Hub's tree page size
CHUNK = 64 * 1024


@dataclass
class HubRepo:
    """One repo at one commit: files read from a local folder."""

    repo_id: str
    folder: Path
    sha: str = ""
    branch: str = "main"
    _hashes: dict[tuple[str, str], str] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        if not self.sha:
            digest = hashlib.sha1(self.repo_id.encode())
            for path in self.files():
                digest.update(path.encode() + self.blob_id(path).encode())
            self.sha = digest.hexdigest()

    def files(self) -> list[str]:
        return sorted(p.relative_to(self.folder).as_posix() for p in self.folder.rglob("*")
                      if p.is_file() and not p.name.startswith(".") and ".cache" not in p.parts)

    def blob_id(self, path: str) -> str:
        """git's blob id of the file (what the Hub reports as `oid`)."""
        if ("git", path) not in self._hashes:
            data = (self.folder / path).read_bytes()
            self._hashes[("git", path)] = hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()
        return self._hashes[("git", path)]

    def lfs_sha256(self, path: str) -> str:
        if ("lfs", path) not in self._hashes:
            self._hashes[("lfs", path)] = hashlib.sha256((self.folder / path).read_bytes()).hexdigest()
        return self._hashes[("lfs", path)]

    def is_lfs(self, path: str) -> bool:
        return path.endswith((".safetensors", ".gguf", ".bin", ".pt"))


@dataclass
class RequestLog:
    method: str
    path: str
    range: str | None


@dataclass
class HubState:
    repos: dict[str, HubRepo] = field(default_factory=dict)
    requests: list[RequestLog] = field(default_factory=list)
    drop_after: dict[str, int] = field(default_factory=dict)  # file name -> bytes to send before cutting once
    fail_files: dict[str, int] = field(default_factory=dict)  # file name -> HTTP status for every GET
    page_size: int = PAGE_SIZE
    lock: threading.Lock = field(default_factory=threading.Lock)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    state: HubState  # set on the subclass made per server

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - keep test output quiet
        pass

    # --- routing ---------------------------------------------------------------------------------
    def do_HEAD(self) -> None:  # noqa: N802
        self._route(head=True)

    def do_GET(self) -> None:  # noqa: N802
        self._route(head=False)

    def _route(self, head: bool) -> None:
        url = urlsplit(self.path)
        path = unquote(url.path)
        with self.state.lock:
            self.state.requests.append(RequestLog(self.command, path, self.headers.get("Range")))
        if path.startswith("/api/models/"):
            rest = path[len("/api/models/"):]
            if "/revision/" in rest:
                repo_id, rev = rest.split("/revision/", 1)
                return self._model_info(repo_id, rev)
            if "/tree/" in rest:
                repo_id, tail = rest.split("/tree/", 1)
                rev, _, sub = tail.partition("/")
                return self._tree(repo_id, rev, sub, parse_qs(url.query))
            return self._model_info(rest, "main")
        if "/resolve/" in path:
            repo_id, tail = path.lstrip("/").split("/resolve/", 1)
            rev, _, filename = tail.partition("/")
            return self._resolve(repo_id, rev, filename, head)
        self._error(404, "EntryNotFound", "not found")

    # --- API ---------------------------------------------------------------------------------------
    def _repo(self, repo_id: str, rev: str) -> HubRepo | None:
        repo = self.state.repos.get(repo_id)
        if repo is None:
            self._error(401, "RepoNotFound", f"Repository Not Found for url: {self.path}.")
            return None
        if rev not in (repo.sha, repo.branch):
            self._error(404, "RevisionNotFound", f"Invalid rev id: {rev}")
            return None
        return repo

    def _model_info(self, repo_id: str, rev: str) -> None:
        repo = self._repo(repo_id, rev)
        if repo is None:
            return
        self._json(200, {
            "_id": repo.sha[:24], "id": repo.repo_id, "modelId": repo.repo_id, "sha": repo.sha,
            "private": False, "disabled": False, "gated": False, "downloads": 0, "likes": 0, "tags": [],
            "lastModified": "2026-01-01T00:00:00.000Z", "createdAt": "2026-01-01T00:00:00.000Z",
            "siblings": [{"rfilename": f} for f in repo.files()],
        }, {"X-Repo-Commit": repo.sha})

    def _tree(self, repo_id: str, rev: str, sub: str, query: dict[str, list[str]]) -> None:
        repo = self._repo(repo_id, rev)
        if repo is None:
            return
        recursive = query.get("recursive", ["false"])[0].lower() == "true"
        entries: list[dict[str, object]] = []
        folders: set[str] = set()
        prefix = sub.strip("/") + "/" if sub.strip("/") else ""
        for f in repo.files():
            if not f.startswith(prefix):
                continue
            rel = f[len(prefix):]
            parts = rel.split("/")
            for i in range(1, len(parts)):
                folder = prefix + "/".join(parts[:i])
                if (recursive or i == 1) and folder not in folders:
                    folders.add(folder)
                    entries.append({"type": "directory", "oid": "0" * 40, "size": 0, "path": folder})
            if not recursive and len(parts) > 1:
                continue
            size = (repo.folder / f).stat().st_size
            entry: dict[str, object] = {"type": "file", "oid": repo.blob_id(f), "size": size, "path": f}
            if repo.is_lfs(f):
                entry["lfs"] = {"oid": repo.lfs_sha256(f), "size": size, "pointerSize": 134}
            entries.append(entry)
        start = int(query.get("cursor", ["0"])[0])
        page = entries[start:start + self.state.page_size]
        headers: dict[str, str] = {}
        if start + self.state.page_size < len(entries):
            host = self.headers.get("Host", "127.0.0.1")
            nxt = (f"http://{host}/api/models/{repo_id}/tree/{quote(rev, safe='')}"
                   f"{'/' + quote(sub) if sub else ''}?recursive={str(recursive).lower()}"
                   f"&cursor={start + self.state.page_size}")
            headers["Link"] = f'<{nxt}>; rel="next"'
        self._json(200, page, headers)

    def _resolve(self, repo_id: str, rev: str, filename: str, head: bool) -> None:
        repo = self._repo(repo_id, rev)
        if repo is None:
            return
        if filename not in repo.files():
            self._error(404, "EntryNotFound", f"{filename} does not exist", {"X-Repo-Commit": repo.sha})
            return
        status = self.state.fail_files.get(filename)
        if status and not head:
            self._error(status, "", "server error", {"X-Repo-Commit": repo.sha})
            return
        data = (repo.folder / filename).read_bytes()
        etag = repo.lfs_sha256(filename) if repo.is_lfs(filename) else repo.blob_id(filename)
        headers = {"ETag": f'"{etag}"', "X-Repo-Commit": repo.sha, "Accept-Ranges": "bytes",
                   "Content-Type": "application/octet-stream"}
        if repo.is_lfs(filename):
            headers["X-Linked-Etag"] = f'"{etag}"'
            headers["X-Linked-Size"] = str(len(data))
        start, end = 0, len(data) - 1
        code = 200
        rng = self.headers.get("Range")
        if rng and rng.startswith("bytes="):
            lo, _, hi = rng[len("bytes="):].partition("-")
            start = int(lo) if lo else 0
            end = int(hi) if hi else len(data) - 1
            if start >= len(data):
                self._error(416, "", "range not satisfiable", {"Content-Range": f"bytes */{len(data)}"})
                return
            code = 206
            headers["Content-Range"] = f"bytes {start}-{end}/{len(data)}"
        body = data[start:end + 1]
        headers["Content-Length"] = str(len(body))
        self.send_response(code)
        for k, v in headers.items():
            self.send_header(k, v)
        self.end_headers()
        if head:
            return
        with self.state.lock:
            cut = self.state.drop_after.pop(filename, None)
        if cut is not None and cut < len(body):
            self.wfile.write(body[:cut])
            self.wfile.flush()
            self.close_connection = True
            return  # the client sees a short body: a dropped transfer
        for i in range(0, len(body), CHUNK):
            self.wfile.write(body[i:i + CHUNK])

    # --- responses -------------------------------------------------------------------------------
    def _json(self, code: int, payload: object, headers: dict[str, str] | None = None) -> None:
        body = json.dumps(payload).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _error(self, code: int, error_code: str, message: str, headers: dict[str, str] | None = None) -> None:
        extra = dict(headers or {})
        if error_code:
            extra["X-Error-Code"] = error_code
        extra["X-Error-Message"] = message
        self._json(code, {"error": message}, extra)


class HubServer:
    """`with HubServer() as hub: hub.add_repo("org/name", folder)`; `hub.url` goes in HF_ENDPOINT."""

    def __init__(self) -> None:
        self.state = HubState()
        handler = type("HubHandler", (_Handler,), {"state": self.state})
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}"

    def add_repo(self, repo_id: str, folder: Path, branch: str = "main") -> HubRepo:
        repo = HubRepo(repo_id, Path(folder), branch=branch)
        self.state.repos[repo_id] = repo
        return repo

    def file_gets(self, filename: str) -> list[RequestLog]:
        """GET requests for `filename`'s content (any repo, any revision)."""
        return [r for r in self.state.requests if r.method == "GET" and r.path.endswith("/" + filename)
                and "/resolve/" in r.path]

    def start(self) -> HubServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()

    def __enter__(self) -> HubServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
