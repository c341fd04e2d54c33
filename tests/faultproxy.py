"""A real loopback HTTP proxy that answers 503 SlowDown to a share of requests or cuts bodies.

It sits between a store client and a real S3 server (the fixture `fault_proxy` in
servers.py puts it in front of SeaweedFS); nothing in the client is mocked.
"""

from __future__ import annotations

import http.client
import random
import sys
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

SLOWDOWN = (
    b"<?xml version='1.0' encoding='UTF-8'?><Error><Code>SlowDown</Code>"
    b"<Message>Please reduce your request rate.</Message></Error>"
)
HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "expect", "proxy-connection"}


class FaultProxy(ThreadingHTTPServer):
    """Forwards HTTP to `upstream`; answers 503 SlowDown to a fraction `fail_rate` of requests.

    With `cut_rate`, a fraction of successful answers is cut off half-way through
    the body (the connection closes), as a reset mid-download would.
    `answers` records, per request, (method, path, status, body bytes the proxy sends
    to the client), before it sends them: an upper bound on what crossed the wire, for
    tests that bound it.
    `fail_once` / `fail_if` answer 503 to the first / every request a (method, path)
    predicate picks; `rewrite` changes an answer's body, as a server that misbehaves would.
    The Host header is forwarded as sent, so signatures still verify upstream.
    """

    daemon_threads = True

    def __init__(self, upstream_port: int, seed: int = 1) -> None:
        super().__init__(("127.0.0.1", 0), _ProxyHandler)  # the kernel picks a free port
        self.upstream_port = upstream_port
        self._lock = threading.Lock()
        self.reset(seed)

    def reset(self, seed: int = 1) -> None:
        """No faults, no history, and the same random draws as a new proxy: each test that
        shares the session's proxy starts from the same state."""
        with self._lock:
            self.fail_rate = 0.0
            self.cut_rate = 0.0
            self.failed = 0
            self.cut = 0
            self.fail_once: Callable[[str, str], bool] | None = None  # (method, path)
            self.fail_if: Callable[[str, str], bool] | None = None  # every match, not once
            # (method, path, body) -> the body the client gets instead
            self.rewrite: Callable[[str, str, bytes], bytes] | None = None
            self.seen: list[tuple[str, str]] = []
            self.answers: list[tuple[str, str, int, int]] = []
            self._rng = random.Random(seed)

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A client that hung up on a cut or slow answer is what these tests make happen."""
        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def answered(self, method: str, path: str, status: int, sent: int) -> None:
        with self._lock:
            self.answers.append((method, path, status, sent))

    def body_bytes(self, method: str, path_part: str) -> int:
        """Body bytes sent to the client for `method` requests whose path holds `path_part`."""
        with self._lock:
            return sum(n for m, p, _, n in self.answers if m == method and path_part in p)

    def draw(self, method: str, path: str) -> tuple[bool, bool]:
        """Decide (answer 503, cut the body) for the next request."""
        with self._lock:
            self.seen.append((method, path))
            fail = self._rng.random() < self.fail_rate
            if self.fail_once and self.fail_once(method, path):
                fail, self.fail_once = True, None
            if self.fail_if and self.fail_if(method, path):
                fail = True
            cut = not fail and self._rng.random() < self.cut_rate
            self.failed += fail
            self.cut += cut
            return fail, cut


class _ProxyHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: FaultProxy

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def _body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            out = bytearray()
            while True:
                size = int(self.rfile.readline().split(b";")[0], 16)
                chunk = self.rfile.read(size + 2)[:size]
                if not size:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass  # trailers
                    return bytes(out)
                out += chunk
        return self.rfile.read(int(self.headers.get("Content-Length", 0)))

    def _forward(self) -> None:
        body = self._body()
        fail, cut = self.server.draw(self.command, self.path)
        if fail:
            self.send_response(503)
            self.send_header("Content-Type", "application/xml")
            self.send_header("Content-Length", str(len(SLOWDOWN)))
            sent = 0 if self.command == "HEAD" else len(SLOWDOWN)
            self.server.answered(self.command, self.path, 503, sent)
            self.end_headers()
            if self.command != "HEAD":  # a HEAD answer has no body (RFC 9110)
                self.wfile.write(SLOWDOWN)
            return
        headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP_BY_HOP}
        if "Transfer-Encoding" in self.headers:
            headers["Content-Length"] = str(len(body))
        upstream = http.client.HTTPConnection("127.0.0.1", self.server.upstream_port, timeout=30)
        try:
            upstream.request(self.command, self.path, body=body, headers=headers)
            resp = upstream.getresponse()
            data = resp.read()
            if self.server.rewrite:
                data = self.server.rewrite(self.command, self.path, data)
            self.send_response(resp.status, resp.reason)
            for k, v in resp.getheaders():
                if k.lower() not in HOP_BY_HOP and k.lower() != "content-length":
                    self.send_header(k, v)
            length = resp.getheader("Content-Length") if self.command == "HEAD" else len(data)
            self.send_header("Content-Length", str(length or 0))
            if cut and len(data) > 1:
                data, self.close_connection = data[: len(data) // 2], True
            # Recorded before the client can see the answer: a client that stops reading
            # early cannot outrun the record (what is sent is at most this).
            self.server.answered(self.command, self.path, resp.status, len(data))
            self.end_headers()
            self.wfile.write(data)
        finally:
            upstream.close()

    do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _forward
