"""A fault-injecting HTTP reverse proxy for S3 tests and the soak benchmark (stdlib only, no pytest).

It listens on 127.0.0.1 in front of an S3 server (moto in the tests) and forwards every request as it came:
method, path, query, body and headers, Host included, so a SigV4 signature made for the proxy's address
stays valid. A seeded random stream decides which requests fail and how:

- ``500`` / ``503``: an S3-style XML error (InternalError / SlowDown), the request never reaches the server;
- ``reset``: the connection is closed before the request is forwarded (nothing applied);
- ``lost``: the request is applied by the server, then the connection is closed before the response (the
  case that makes a retried non-idempotent request, a conditional put or a multipart complete, dangerous);
- ``truncate``: the response's status and headers go out with half of its body, then the connection closes
  (becomes ``lost`` for a response without a body).

The stream of decisions is deterministic for a given seed and order of arrival; ``counts`` says what was
injected. ``match`` narrows the faults to some requests and ``max_faults`` caps them.
"""

from __future__ import annotations

import http.client
import random
import socket
import threading
from collections import Counter
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable
from urllib.parse import urlparse

KINDS = ("500", "503", "reset", "lost", "truncate")
_HOP_BY_HOP = {"connection", "keep-alive", "proxy-connection", "proxy-authenticate", "proxy-authorization", "te",
               "trailer", "trailers", "transfer-encoding", "upgrade", "expect"}
_ERRORS = {"500": ("InternalError", "We encountered an internal error. Please try again."),
           "503": ("SlowDown", "Please reduce your request rate.")}


@dataclass(frozen=True)
class Request:
    """What ``match`` sees of a request."""

    method: str
    path: str  # with the query string
    headers: dict  # lower-case names


class FaultProxy:
    """``with FaultProxy("http://127.0.0.1:PORT", rate=0.2, seed=1) as proxy: ... proxy.endpoint``."""

    def __init__(self, upstream: str, rate: float = 0.0, kinds=KINDS, seed: int = 0,
                 match: Callable[[Request], bool] | None = None, max_faults: int | None = None):
        parsed = urlparse(upstream)
        self.upstream = (parsed.hostname, parsed.port or 80)
        self.kinds = tuple(kinds)
        unknown = set(self.kinds) - set(KINDS)
        if unknown:
            raise ValueError(f"unknown fault kinds {sorted(unknown)}; known: {KINDS}")
        self.rate, self.match, self.max_faults = rate, match, max_faults
        self.counts: Counter = Counter()
        self.requests = 0
        self._rng = random.Random(seed)
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _handler_for(self))
        self._server.daemon_threads = True
        self._thread: threading.Thread | None = None

    @property
    def endpoint(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    @property
    def injected(self) -> int:
        return sum(self.counts.values())

    def set_rate(self, rate: float) -> None:
        with self._lock:
            self.rate = rate

    def start(self) -> "FaultProxy":
        self._thread = threading.Thread(target=self._server.serve_forever, name="fault-proxy", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def __enter__(self) -> "FaultProxy":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def decide(self, request: Request) -> str | None:
        """The fault for this request, or None to forward it untouched."""
        with self._lock:
            self.requests += 1
            if self.max_faults is not None and self.injected >= self.max_faults:
                return None
            if self.match is not None and not self.match(request):
                return None
            if self._rng.random() >= self.rate:
                return None
            kind = self._rng.choice(self.kinds)
            self.counts[kind] += 1
            return kind


def _handler_for(proxy: FaultProxy):
    class Handler(_ProxyHandler):
        pass

    Handler.proxy = proxy
    return Handler


class _ProxyHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as botocore's connection pool expects
    proxy: FaultProxy

    def log_message(self, format, *args) -> None:  # noqa: A002 - the base class's signature
        pass

    def do_GET(self):
        self._relay()

    do_PUT = do_POST = do_DELETE = do_HEAD = do_GET

    def _relay(self) -> None:
        body = self._read_body()
        headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP_BY_HOP}
        fault = self.proxy.decide(Request(self.command, self.path, {k.lower(): v for k, v in headers.items()}))
        if fault in _ERRORS:
            return self._s3_error(int(fault), *_ERRORS[fault])
        if fault == "reset":
            return self._drop()
        try:
            status, reason, resp_headers, resp_body = self._forward(headers, body)
        except OSError as exc:
            return self._s3_error(502, "BadGateway", f"fault proxy: upstream unreachable ({exc})")
        if fault == "lost" or (fault == "truncate" and not resp_body):
            return self._drop()
        self.send_response(status, reason)
        for name, value in resp_headers:
            if name.lower() not in _HOP_BY_HOP and not (name.lower() == "content-length" and self.command != "HEAD"):
                self.send_header(name, value)
        if self.command != "HEAD":
            self.send_header("Content-Length", str(len(resp_body)))
        self.end_headers()
        if self.command == "HEAD":
            return
        if fault == "truncate":
            self.wfile.write(resp_body[: len(resp_body) // 2])
            return self._drop()
        self.wfile.write(resp_body)

    def _read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            parts = []
            while size := int(self.rfile.readline().split(b";")[0].strip() or b"0", 16):
                parts.append(self.rfile.read(size))
                self.rfile.readline()
            while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                pass  # trailers
            return b"".join(parts)
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _forward(self, headers: dict, body: bytes):
        conn = http.client.HTTPConnection(*self.proxy.upstream, timeout=60)
        try:
            conn.putrequest(self.command, self.path, skip_host=True, skip_accept_encoding=True)
            for name, value in headers.items():
                if name.lower() != "content-length":
                    conn.putheader(name, value)
            if body or self.command in ("PUT", "POST"):
                conn.putheader("Content-Length", str(len(body)))
            conn.endheaders(body)
            resp = conn.getresponse()
            data = resp.read()
            return resp.status, resp.reason, resp.getheaders(), data
        finally:
            conn.close()

    def _s3_error(self, status: int, code: str, message: str) -> None:
        body = (f'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{code}</Code><Message>{message}</Message>'
                f"<RequestId>fault-proxy</RequestId></Error>").encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/xml")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _drop(self) -> None:
        """Close the connection at once: the client sees no (or no complete) response."""
        self.close_connection = True
        try:
            self.wfile.flush()
            self.connection.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
