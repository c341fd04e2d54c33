"""A fault-injecting TCP proxy for HTTP/1.1 on loopback: sockets and threads, no HTTP library.

It sits between a store client (boto3 inside the agent) and a real S3 server (SeaweedFS
in the tests) and decides, per connection, by an explicit plan or a seeded RNG, to:

- ``pass``: forward the request and the answer unchanged;
- ``reset``: send the head and N body bytes, then close with SO_LINGER 0 (a TCP RST; the
  kernel may drop part of the N bytes still in its send buffer, as a real reset does);
- ``truncate``: send the head (whose Content-Length says more) and N < length body
  bytes, then close cleanly (FIN): a body cut short under correct headers;
- ``flip``: invert one body byte at offset N, send everything else unchanged;
- ``stall``: send the head and N body bytes, then hold the connection silent until the
  client gives up and closes it (its read timeout) or `stall_s` passes;
- ``503``: answer at once, without asking upstream, ``503 SlowDown`` with an S3 XML body
  and a correct Content-Length (no body for HEAD). A random 503 comes as a *burst*: it
  queues further 503s for the next matching connections.

Keep-alive is turned off to keep the HTTP simple: one request per connection. The proxy
forwards the request with ``Connection: close`` (SigV4 does not sign that header) and
answers with ``Connection: close``, so every request the client sends is a new connection
and the upstream answer ends where its Content-Length (or the upstream EOF) says. It
parses the status line, headers, Content-Length and a chunked request body (forwarded
raw); body faults are placed in responses that carry a Content-Length, which SeaweedFS
sends for every GET. A fault that has no body to act on (a HEAD, an empty body, a chunked
answer) passes the answer through and is counted in `skipped`, not in `fired`.
``Expect: 100-continue`` is answered by the proxy itself and not forwarded.

Only requests for which `match(method, path)` is true draw a fault; the plan (`plan()`)
is consumed first, then the RNG draws with `rates`. The proxy stops itself: `close()`
(or leaving its `with` block, or `lifetime_s` passing) closes the listener and every
live socket and joins the threads.
"""

from __future__ import annotations

import collections
import contextlib
import random
import select
import socket
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

KINDS = ("reset", "truncate", "flip", "stall", "503")
SLOWDOWN = (
    b"<?xml version='1.0' encoding='UTF-8'?><Error><Code>SlowDown</Code>"
    b"<Message>Please reduce your request rate.</Message></Error>"
)
_MAX_HEAD = 64 << 10


@dataclass(frozen=True)
class Fault:
    """What to do to one connection; `at`: body offset (bytes, or a fraction), None: random."""

    kind: str
    at: int | float | None = None

    def __post_init__(self) -> None:
        assert self.kind in ("pass", *KINDS), self.kind


@dataclass
class Event:
    """One proxied request: what it asked, what the proxy did, and what upstream answered."""

    method: str
    path: str
    fault: str  # the kind that fired, "pass", or "skipped:<kind>"
    status: int = 0
    offset: int | None = None


class _Closed(Exception):
    """The peer closed before a whole head arrived."""


class TcpFaultProxy:
    """Listen on 127.0.0.1 (a free port); forward to `upstream_port` with faults."""

    def __init__(
        self,
        upstream_port: int,
        *,
        seed: int = 0,
        rates: dict[str, float] | None = None,
        match: Callable[[str, str], bool] | None = None,
        burst: tuple[int, int] = (1, 3),
        stall_s: float = 30.0,
        lifetime_s: float = 600.0,
    ) -> None:
        self.upstream = ("127.0.0.1", upstream_port)
        self.rates = dict(rates or {})
        assert set(self.rates) <= set(KINDS) and sum(self.rates.values()) <= 1.0
        self.match = match or (lambda method, path: True)
        self.burst = burst
        self.stall_s = stall_s
        self.fired: collections.Counter[str] = collections.Counter()
        self.skipped: collections.Counter[str] = collections.Counter()
        self.events: list[Event] = []
        self._rng = random.Random(seed)
        self._queue: collections.deque[Fault] = collections.deque()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._socks: set[socket.socket] = set()
        self._threads: list[threading.Thread] = []
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(0.2)
        self.port = int(self._listener.getsockname()[1])
        self._timer = threading.Timer(lifetime_s, self.close)
        self._timer.daemon = True
        acceptor = threading.Thread(target=self._accept, name="tcpfaults-accept", daemon=True)
        self._threads.append(acceptor)
        acceptor.start()
        self._timer.start()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def plan(self, *faults: Fault) -> None:
        """Queue faults for the next matching connections, before any random draw."""
        with self._lock:
            self._queue.extend(faults)

    def requests(self, method: str, contains: str = "") -> list[Event]:
        with self._lock:
            return [e for e in self.events if e.method == method and contains in e.path]

    def close(self) -> None:
        """Stop accepting, cut every live connection, join the threads. Idempotent."""
        self._stop.set()
        self._timer.cancel()
        with self._lock:
            socks = [self._listener, *self._socks]
        for s in socks:
            with contextlib.suppress(OSError):
                s.close()
        for t in list(self._threads):
            if t is not threading.current_thread():
                t.join(timeout=5)

    def __enter__(self) -> TcpFaultProxy:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # -- the connection loop ----------------------------------------------------------

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return  # closed
            t = threading.Thread(target=self._serve, args=(conn,), daemon=True)
            with self._lock:
                self._socks.add(conn)
                self._threads = [x for x in self._threads if x.is_alive()]
                self._threads.append(t)
            t.start()

    def _track(self, s: socket.socket, add: bool) -> None:
        with self._lock:
            (self._socks.add if add else self._socks.discard)(s)

    def _draw(self, method: str, path: str) -> Fault:
        with self._lock:
            if not self.match(method, path):
                return Fault("pass")
            if self._queue:
                return self._queue.popleft()
            x = self._rng.random()
            for kind, rate in self.rates.items():
                if x < rate:
                    if kind == "503":
                        extra = self._rng.randint(*self.burst) - 1
                        self._queue.extend([Fault("503")] * extra)
                    return Fault(kind)
                x -= rate
            return Fault("pass")

    def _offset(self, fault: Fault, length: int) -> int:
        if isinstance(fault.at, float):
            n = int(length * fault.at)
        elif isinstance(fault.at, int):
            n = fault.at
        else:
            with self._lock:
                n = self._rng.randrange(length)
        return max(0, min(n, length - 1))

    def _record(self, event: Event, fired: str | None, skipped: str | None = None) -> None:
        with self._lock:
            self.events.append(event)
            if fired:
                self.fired[fired] += 1
            if skipped:
                self.skipped[skipped] += 1

    def _serve(self, client: socket.socket) -> None:
        upstream: socket.socket | None = None
        try:
            client.settimeout(30)
            head, rest = _read_head(client)
            method, path, headers = _parse_request(head)
            if headers.get("expect", "").lower() == "100-continue":
                client.sendall(b"HTTP/1.1 100 Continue\r\n\r\n")
            body = _read_request_body(client, headers, rest)
            fault = self._draw(method, path)
            event = Event(method, path, fault.kind)
            if fault.kind == "503":
                self._record(event, "503")
                event.status = 503
                client.sendall(_slowdown(method))
                return
            upstream = socket.create_connection(self.upstream, timeout=30)
            self._track(upstream, True)
            upstream.sendall(_rewrite(head, drop=("connection", "expect")) + body)
            rhead, rbody = _read_head(upstream)
            status, rheaders = _parse_response(rhead)
            event.status = status
            length = rheaders.get("content-length")
            has_body = method != "HEAD" and status not in (204, 304) and length not in (None, "0")
            client.sendall(_rewrite(rhead, drop=("connection", "keep-alive")))
            if fault.kind == "pass" or not has_body or length is None:
                if fault.kind != "pass":
                    event.fault = f"skipped:{fault.kind}"
                self._record(event, None, None if fault.kind == "pass" else fault.kind)
                _pump(upstream, client, rbody, None if length is None else int(length))
                return
            total = int(length)
            n = self._offset(fault, total)
            event.offset = n
            self._record(event, fault.kind)
            if fault.kind == "flip":
                _pump(upstream, client, rbody, total, flip=n)
            elif fault.kind == "truncate":
                _pump(upstream, client, rbody, n)
                client.shutdown(socket.SHUT_WR)
            elif fault.kind == "reset":
                _pump(upstream, client, rbody, n)
                client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            elif fault.kind == "stall":
                _pump(upstream, client, rbody, n)
                self._hold(client)
        except (_Closed, OSError, ValueError):
            pass  # the client or upstream went away, or the proxy is closing
        finally:
            for s in (upstream, client):
                if s is not None:
                    self._track(s, False)
                    with contextlib.suppress(OSError):
                        s.close()

    def _hold(self, client: socket.socket) -> None:
        """Stay silent until the client closes (its read timeout), stall_s passes, or close()."""
        end = time.monotonic() + self.stall_s
        while not self._stop.is_set() and time.monotonic() < end:
            ready, _, _ = select.select([client], [], [], 0.1)
            if ready and not client.recv(1 << 16):
                return


def _read_head(s: socket.socket) -> tuple[bytes, bytes]:
    """Bytes up to and including the blank line, and whatever arrived after it."""
    buf = b""
    while b"\r\n\r\n" not in buf:
        data = s.recv(1 << 16)
        if not data:
            raise _Closed
        buf += data
        if len(buf) > _MAX_HEAD:
            raise ValueError("head too large")
    end = buf.index(b"\r\n\r\n") + 4
    return buf[:end], buf[end:]


def _headers(lines: list[bytes]) -> dict[str, str]:
    out = {}
    for line in lines:
        if line:
            k, _, v = line.decode("latin-1").partition(":")
            out[k.strip().lower()] = v.strip()
    return out


def _parse_request(head: bytes) -> tuple[str, str, dict[str, str]]:
    first, *lines = head.rstrip(b"\r\n").split(b"\r\n")
    method, path, _version = first.decode("latin-1").split(" ", 2)
    return method, path, _headers(lines)


def _parse_response(head: bytes) -> tuple[int, dict[str, str]]:
    first, *lines = head.rstrip(b"\r\n").split(b"\r\n")
    return int(first.split(b" ", 2)[1]), _headers(lines)


def _rewrite(head: bytes, drop: tuple[str, ...]) -> bytes:
    """The head without the `drop` headers, with `Connection: close` added."""
    first, *lines = head.rstrip(b"\r\n").split(b"\r\n")
    kept = [ln for ln in lines if ln.split(b":", 1)[0].strip().lower().decode() not in drop]
    return b"\r\n".join([first, *kept, b"Connection: close", b"", b""])


def _read_request_body(s: socket.socket, headers: dict[str, str], buf: bytes) -> bytes:
    """The request body as sent (chunked framing kept raw)."""
    if "chunked" in headers.get("transfer-encoding", "").lower():
        while True:  # read until the last chunk and the trailers' blank line
            end = _chunked_end(buf)
            if end is not None:
                return buf[:end]
            data = s.recv(1 << 16)
            if not data:
                raise _Closed
            buf += data
    want = int(headers.get("content-length", "0"))
    while len(buf) < want:
        data = s.recv(min(1 << 20, want - len(buf)))
        if not data:
            raise _Closed
        buf += data
    return buf[:want]


def _chunked_end(buf: bytes) -> int | None:
    """Where a complete chunked body ends in `buf`, or None if it is not all there yet."""
    pos = 0
    while True:
        eol = buf.find(b"\r\n", pos)
        if eol < 0:
            return None
        size = int(buf[pos:eol].split(b";")[0], 16)
        if size == 0:
            trailers = buf.find(b"\r\n\r\n", eol)
            return None if trailers < 0 else trailers + 4
        pos = eol + 2 + size + 2
        if pos > len(buf):
            return None


def _pump(
    src: socket.socket, dst: socket.socket, first: bytes, limit: int | None, flip: int = -1
) -> None:
    """Copy `first` then `src` to `dst` until `limit` body bytes (None: until EOF)."""
    sent = 0
    data = first
    while True:
        if limit is not None:
            data = data[: limit - sent]
        if 0 <= flip - sent < len(data):
            i = flip - sent
            data = data[:i] + bytes([data[i] ^ 0xFF]) + data[i + 1 :]
        if data:
            dst.sendall(data)
            sent += len(data)
        if limit is not None and sent >= limit:
            return
        data = src.recv(1 << 16)
        if not data:
            return


def _slowdown(method: str) -> bytes:
    head = (
        "HTTP/1.1 503 Slow Down\r\n"
        "Content-Type: application/xml\r\n"
        f"Content-Length: {len(SLOWDOWN)}\r\n"
        "Connection: close\r\n\r\n"
    ).encode()
    return head if method == "HEAD" else head + SLOWDOWN
