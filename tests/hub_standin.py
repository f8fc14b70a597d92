"""A local HTTP server that plays the Hugging Face hub for one repository, and fails on demand.

It answers the calls `huggingface_hub` makes to fetch a model (the repository's file list, and HEAD and
GET of each file) from a folder on disk, so a real `firm-serve` can download a checkpoint from it with
`HF_ENDPOINT` pointing here. `mode` picks how it behaves:

- "ok": serve the files;
- "not_found": every call answers 404 with the hub's `RepoNotFound` error code;
- "gated": 403 with `GatedRepo`, as the hub answers for a gated model asked for without a token;
- "error": 503 for every call (an outage);
- "slow": serve the files, but stream each at `bytes_per_s`, so a download is seen in progress.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.server
import json
import re
import threading
import time
from pathlib import Path
from typing import Any

COMMIT = "0123456789abcdef0123456789abcdef01234567"
_INFO = re.compile(r"^/api/models/(?P<repo>[^/]+/[^/]+)(?:/revision/(?P<rev>[^/]+))?$")
_TREE = re.compile(r"^/api/models/(?P<repo>[^/]+/[^/]+)/tree/(?P<rev>[^/]+)/?(?P<under>.*)$")
_RESOLVE = re.compile(r"^/(?P<repo>[^/]+/[^/]+)/resolve/(?P<rev>[^/]+)/(?P<path>.+)$")


class HubStandIn:
    """Serves `folder` as the hub repository `repo`; `requests` records every path asked for."""

    def __init__(self, repo: str, folder: Path, *, mode: str = "ok", bytes_per_s: int = 200_000) -> None:
        self.repo, self.folder, self.mode, self.bytes_per_s = repo, folder, mode, bytes_per_s
        self.requests: list[str] = []
        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def __enter__(self) -> HubStandIn:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()

    def files(self) -> list[Path]:
        return sorted(p for p in self.folder.rglob("*") if p.is_file())

    def info(self) -> dict[str, Any]:
        siblings = [
            {"rfilename": str(p.relative_to(self.folder)), "size": p.stat().st_size, "blobId": _etag(p)}
            for p in self.files()
        ]
        return {"id": self.repo, "modelId": self.repo, "sha": COMMIT, "private": False, "siblings": siblings}

    def tree(self, under: str = "") -> list[dict[str, Any]]:
        return [
            {"type": "file", "path": str(p.relative_to(self.folder)), "size": p.stat().st_size, "oid": _etag(p)}
            for p in self.files()
            if str(p.relative_to(self.folder)).startswith(under)
        ]

    def _handler(self) -> type[http.server.BaseHTTPRequestHandler]:
        hub = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:  # quiet: the tests read `hub.requests`
                pass

            def _fail(self) -> bool:
                codes = {"not_found": (404, "RepoNotFound"), "gated": (403, "GatedRepo"), "error": (503, None)}
                if hub.mode not in codes:
                    return False
                status, code = codes[hub.mode]
                body = json.dumps({"error": f"stand-in hub: {hub.mode}"}).encode()
                self.send_response(status)
                if code:
                    self.send_header("X-Error-Code", code)
                    self.send_header("X-Error-Message", f"stand-in hub: {hub.mode}")
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(body)
                return True

            def _file(self) -> Path | None:
                match = _RESOLVE.match(self.path.split("?")[0])
                if not match or match["repo"] != hub.repo:
                    return None
                path = (hub.folder / match["path"]).resolve()
                return path if path.is_file() and hub.folder.resolve() in path.parents else None

            def _serve(self, with_body: bool) -> None:
                hub.requests.append(f"{self.command} {self.path}")
                if self._fail():
                    return
                path_only = self.path.split("?")[0]
                info, tree = _INFO.match(path_only), _TREE.match(path_only)
                listed = hub.tree(tree["under"]) if tree and tree["repo"] == hub.repo else None
                if listed == [] and tree and tree["under"]:
                    listed = None  # a folder the repository does not have
                    tree = None
                if (info and info["repo"] == hub.repo) or listed is not None:
                    body = json.dumps(hub.info() if info else listed).encode()
                    self.send_response(200)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    if with_body:
                        self.wfile.write(body)
                    return
                path = self._file()
                if path is None:
                    self.send_response(404)
                    self.send_header("X-Error-Code", "EntryNotFound")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                data = path.read_bytes()
                self.send_response(200)
                self.send_header("X-Repo-Commit", COMMIT)
                self.send_header("ETag", f'"{_etag(path)}"')
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if with_body:
                    self._write(data)

            def _write(self, data: bytes) -> None:
                if hub.mode != "slow":
                    self.wfile.write(data)
                    return
                chunk = max(1, hub.bytes_per_s // 10)
                for start in range(0, len(data), chunk):
                    self.wfile.write(data[start : start + chunk])
                    self.wfile.flush()
                    time.sleep(0.1)

            def do_HEAD(self) -> None:
                self._serve(with_body=False)

            def do_GET(self) -> None:
                with contextlib.suppress(BrokenPipeError, ConnectionResetError):  # the downloader went away
                    self._serve(with_body=True)

        return Handler


def _etag(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()
