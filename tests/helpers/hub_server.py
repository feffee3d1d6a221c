"""A loopback stand-in for the Hugging Face Hub, enough for ``huggingface_hub.hf_hub_download`` (2.x).

It serves ``{(repo_type, repo_id, filename): bytes}`` on the Hub's resolve routes::

    HEAD/GET /{repo_id}/resolve/{revision}/{filename}            (models)
    HEAD/GET /datasets/{repo_id}/resolve/{revision}/{filename}   (datasets; also spaces/)

with what huggingface_hub reads from the Hub's answer (see ``get_hf_file_metadata``/``http_get`` in its
``file_download.py``): ``X-Repo-Commit`` (40 hex, required, else "not a Hub endpoint"), ``ETag`` (required: the blob
name in the cache), ``Content-Length`` (expected size), ``Range`` requests answered with 206 + ``Content-Range``
(resume after a dropped connection), and 404s carrying ``X-Error-Code`` (``RepoNotFound``, ``RevisionNotFound``,
``EntryNotFound``) which ``hf_raise_for_status`` maps to its exceptions. It never sends ``X-Xet-*`` headers, so
hf-xet is never used. Every request is recorded in ``FakeHub.requests``.
"""

from __future__ import annotations

import contextlib
import hashlib
import re
import socket
import threading
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlsplit

COMMIT = hashlib.sha1(b"q-psa fake hub").hexdigest()
_PREFIXES = {"datasets/": "dataset", "spaces/": "space"}
_RANGE = re.compile(r"bytes=(\d+)-(\d*)")


@dataclass
class Request:
    method: str
    path: str
    range: str | None
    status: int
    body_bytes: int  # body bytes written


class FakeHub:
    def __init__(self, files: dict[tuple[str, str, str], bytes] | None = None, commit: str = COMMIT):
        self.files = dict(files or {})
        self.commit = commit
        self.requests: list[Request] = []
        # filename -> body bytes to send on its next GET before dropping the connection (an interrupted transfer)
        self.drop_after: dict[str, int] = {}
        self._lock = threading.Lock()
        self._conns: set[socket.socket] = set()
        self._server: ThreadingHTTPServer | None = None

    # -- lifecycle ------------------------------------------------------------------------------------------------
    def start(self) -> FakeHub:
        hub = self

        class Handler(_Handler):
            fake = hub

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        return self

    def stop(self) -> None:
        """Stop listening and hang up the kept-alive connections too (else a client could go on using them)."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        with self._lock:
            conns, self._conns = self._conns, set()
        for c in conns:
            with contextlib.suppress(OSError):
                c.shutdown(socket.SHUT_RDWR)

    def __enter__(self) -> FakeHub:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def url(self) -> str:
        assert self._server is not None, "not started"
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    # -- what was asked ------------------------------------------------------------------------------------------
    def gets(self, filename: str | None = None) -> list[Request]:
        with self._lock:
            return [r for r in self.requests if r.method == "GET" and (not filename or r.path.endswith("/" + filename))]

    def _record(self, r: Request) -> None:
        with self._lock:
            self.requests.append(r)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, like the Hub; every answer carries a Content-Length
    fake: FakeHub

    def log_message(self, *args) -> None:  # quiet
        pass

    def setup(self) -> None:
        super().setup()
        with self.fake._lock:
            self.fake._conns.add(self.connection)

    def finish(self) -> None:
        with self.fake._lock:
            self.fake._conns.discard(self.connection)
        with contextlib.suppress(OSError):
            super().finish()

    def do_HEAD(self) -> None:
        self._serve(body=False)

    def do_GET(self) -> None:
        self._serve(body=True)

    def _serve(self, body: bool) -> None:
        fake = self.fake
        raw = urlsplit(self.path).path.lstrip("/")
        repo_type = "model"
        for prefix, kind in _PREFIXES.items():
            if raw.startswith(prefix):
                repo_type, raw = kind, raw[len(prefix) :]
        repo_id, sep, rest = raw.partition("/resolve/")
        revision, _, filename = rest.partition("/")
        repo_id, revision, filename = unquote(repo_id), unquote(revision), unquote(filename)
        if not sep or not filename:
            return self._error(body, 404, "RepoNotFound", "Repository not found")
        if not any(t == repo_type and r == repo_id for t, r, _ in fake.files):
            return self._error(body, 404, "RepoNotFound", "Repository not found")
        if revision not in ("main", fake.commit):
            return self._error(body, 404, "RevisionNotFound", "Invalid rev id: " + revision)
        data = fake.files.get((repo_type, repo_id, filename))
        if data is None:
            return self._error(body, 404, "EntryNotFound", "Entry not found", commit=True)

        total, start, end, status = len(data), 0, len(data), 200
        rng = self.headers.get("Range")
        if rng:
            m = _RANGE.fullmatch(rng.strip())
            if not m or int(m[1]) >= total:
                return self._send(body, 416, b"", {"Content-Range": f"bytes */{total}"}, rng)
            start, end, status = int(m[1]), min(int(m[2]) + 1 if m[2] else total, total), 206
        headers = {
            "X-Repo-Commit": fake.commit,
            "ETag": f'"{hashlib.sha256(data).hexdigest()}"',
            "Accept-Ranges": "bytes",
            "Content-Type": "application/octet-stream",
        }
        if status == 206:
            headers["Content-Range"] = f"bytes {start}-{end - 1}/{total}"
        chunk = data[start:end]
        drop = fake.drop_after.pop(filename, None) if body else None
        self._send(body, status, chunk, headers, rng, drop=drop)

    def _error(self, body: bool, status: int, code: str, message: str, commit: bool = False) -> None:
        headers = {"X-Error-Code": code, "X-Error-Message": message, "Content-Type": "application/json"}
        if commit:
            headers["X-Repo-Commit"] = self.fake.commit
        self._send(body, status, ('{"error": "%s"}' % message).encode(), headers, self.headers.get("Range"))

    def _send(self, body: bool, status: int, payload: bytes, headers: dict, rng: str | None, drop: int | None = None):
        out = b"" if not body else payload if drop is None else payload[:drop]
        # recorded before the answer goes out, so a client that got its answer always finds it in `requests`
        req = Request(self.command, self.path, rng, status, len(out))
        self.fake._record(req)
        self.send_response(status)
        for k, v in headers.items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(payload)))  # the full length, even when we then drop
        self.end_headers()
        try:
            self.wfile.write(out)
        except (BrokenPipeError, ConnectionResetError):
            req.body_bytes = 0  # the client went away; count nothing rather than guess
        if drop is not None:
            self.close_connection = True  # hang up mid-body: the client sees a truncated transfer


def use_endpoint(monkeypatch, tmp_path, endpoint: str) -> dict[str, str]:
    """Point huggingface_hub and q-psa at ``endpoint`` with caches under ``tmp_path``; returns the env it set.

    Child processes see the environment variables (read by huggingface_hub at import, its real code path). This process
    imported huggingface_hub already, so the same values are also set on ``huggingface_hub.constants``, the library's
    configuration module, which is where it keeps what it read from those variables.
    """
    from huggingface_hub import constants

    env = {
        "HF_ENDPOINT": endpoint,
        "HF_HOME": str(tmp_path / "hf"),
        "HF_HUB_CACHE": str(tmp_path / "hf" / "hub"),
        "QPSA_CACHE": str(tmp_path / "q-psa"),
        "HF_HUB_DISABLE_XET": "1",
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "NO_PROXY": "127.0.0.1,localhost",
    }
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_TOKEN_PATH"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setattr(constants, "ENDPOINT", endpoint)
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", endpoint + "/{repo_id}/resolve/{revision}/{filename}")
    monkeypatch.setattr(constants, "HF_HOME", env["HF_HOME"])
    monkeypatch.setattr(constants, "HF_HUB_CACHE", env["HF_HUB_CACHE"])
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "hf" / "token"))  # no real token leaves the box
    monkeypatch.setattr(constants, "HF_STORED_TOKENS_PATH", str(tmp_path / "hf" / "stored_tokens"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
    # else the first request of the process also GETs {endpoint}/api/agent-harnesses (user-agent agent detection)
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_TELEMETRY", True)
    return env
