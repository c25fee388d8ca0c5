"""A tiny local stand-in for the Hugging Face Hub: the few endpoints huggingface_hub and wanalpha.download call.

    with HubServer() as hub:
        hub.add("Wan-AI/Wan2.1-T2V-14B", {"Wan2.1_VAE.pth": b"..."})
        env = {"HF_ENDPOINT": hub.url}

Endpoints (as huggingface_hub 0.2x-2.x use them):
- GET  /api/models/{repo}[/revision/{rev}]   model info: id, sha, siblings [{rfilename, size, blobId, lfs}]
- GET  /api/models/{repo}/tree/{rev}[/{path}] ?recursive=  the file listing of snapshot_download
- HEAD /{repo}/resolve/{rev}/{path}          X-Repo-Commit, ETag, X-Linked-Etag/-Size, Content-Length
- GET  /{repo}/resolve/{rev}/{path}          the bytes; `Range: bytes=N-` → 206 + Content-Range
Unknown repos and files answer 404 with the hub's X-Error-Code. `stall_after[path] = n` makes the next GET of that
file send n bytes and then hang (until `release()` or shutdown), to interrupt a transfer; `requests` records
(method, path, Range header) of every request.
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlsplit


class HubServer:
    def __init__(self) -> None:
        self.repos: dict[str, dict[str, bytes]] = {}
        self.commits: dict[str, str] = {}
        self.stall_after: dict[str, int] = {}
        self.requests: list[tuple[str, str, str | None]] = []
        self._release = threading.Event()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def add(self, repo: str, files: dict[str, bytes]) -> None:
        self.repos.setdefault(repo, {}).update(files)
        self.commits[repo] = hashlib.sha1(json.dumps(sorted(self.repos[repo])).encode() + repo.encode()).hexdigest()

    def release(self) -> None:
        """Let stalled transfers finish their response (they close without sending the rest)."""
        self._release.set()

    def gets(self, path: str) -> list[str | None]:
        """The Range headers of the GETs of one repo path."""
        return [r for m, p, r in self.requests if m == "GET" and p.endswith("/" + path)]

    def __enter__(self) -> HubServer:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._release.set()
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=10)


def _etag(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _handler(hub: HubServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.0"

        def log_message(self, *args) -> None:  # quiet
            pass

        # ------------------------------------------------------------------ routing
        def _route(self, method: str) -> None:
            path = unquote(urlsplit(self.path).path)
            hub.requests.append((method, path, self.headers.get("Range")))
            if m := re.fullmatch(r"/api/models/([^/]+/[^/]+)(?:/revision/([^/]+))?", path):
                return self._info(m.group(1))
            if m := re.fullmatch(r"/api/models/([^/]+/[^/]+)/tree/([^/]+)(?:/(.*))?", path):
                return self._tree(m.group(1), m.group(3) or "")
            if m := re.fullmatch(r"/([^/]+/[^/]+)/resolve/([^/]+)/(.+)", path):
                return self._resolve(method, m.group(1), m.group(3))
            self._error(404, "RepoNotFound", "not found")

        def do_GET(self) -> None:  # noqa: N802 - http.server's names
            self._route("GET")

        def do_HEAD(self) -> None:  # noqa: N802
            self._route("HEAD")

        # ------------------------------------------------------------------ answers
        def _error(self, code: int, kind: str, message: str, repo: str | None = None) -> None:
            body = json.dumps({"error": message}).encode()
            self.send_response(code)
            self.send_header("X-Error-Code", kind)
            self.send_header("X-Error-Message", message)
            if repo in hub.commits:
                self.send_header("X-Repo-Commit", hub.commits[repo])
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

        def _json(self, payload) -> None:
            body = json.dumps(payload).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def _entry(self, path: str, data: bytes, tree: bool = False) -> dict:
            lfs = {"size": len(data), "pointerSize": 134}
            if tree:
                return {
                    "type": "file",
                    "path": path,
                    "size": len(data),
                    "oid": _etag(data)[:40],
                    "lfs": lfs | {"oid": _etag(data)},
                }
            return {
                "rfilename": path,
                "size": len(data),
                "blobId": _etag(data)[:40],
                "lfs": lfs | {"sha256": _etag(data)},
            }

        def _info(self, repo: str) -> None:
            if repo not in hub.repos:
                return self._error(404, "RepoNotFound", f"Repository {repo} not found")
            files = hub.repos[repo]
            self._json(
                {
                    "id": repo,
                    "modelId": repo,
                    "sha": hub.commits[repo],
                    "private": False,
                    "siblings": [self._entry(p, d) for p, d in sorted(files.items())],
                }
            )

        def _tree(self, repo: str, folder: str) -> None:
            if repo not in hub.repos:
                return self._error(404, "RepoNotFound", f"Repository {repo} not found")
            prefix = folder.rstrip("/") + "/" if folder else ""
            self._json(
                [self._entry(p, d, tree=True) for p, d in sorted(hub.repos[repo].items()) if p.startswith(prefix)]
            )

        def _resolve(self, method: str, repo: str, path: str) -> None:
            if repo not in hub.repos:
                return self._error(404, "RepoNotFound", f"Repository {repo} not found")
            data = hub.repos[repo].get(path)
            if data is None:
                return self._error(404, "EntryNotFound", f"{path} does not exist", repo)
            start, status = 0, 200
            if (m := re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range") or "")) and method == "GET":
                start, status = int(m.group(1)), 206
                if start >= len(data):
                    return self._error(416, "RangeNotSatisfiable", "range not satisfiable", repo)
            self.send_response(status)
            self.send_header("X-Repo-Commit", hub.commits[repo])
            self.send_header("ETag", f'"{_etag(data)}"')
            self.send_header("X-Linked-Etag", f'"{_etag(data)}"')
            self.send_header("X-Linked-Size", str(len(data)))
            self.send_header("Accept-Ranges", "bytes")
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("Content-Length", str(len(data) - start))
            if status == 206:
                self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
            self.end_headers()
            if method == "HEAD":
                return
            stall = hub.stall_after.pop(path, None)
            if stall is not None and start < stall:
                self.wfile.write(data[start:stall])
                self.wfile.flush()
                hub._release.wait()
                return  # the connection closes with the body cut short
            self.wfile.write(data[start:])

    return Handler
