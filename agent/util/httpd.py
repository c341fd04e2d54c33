"""A tiny HTTP endpoint for probes and Prometheus scrapes (the node sidecar, the seed daemon).

Routes map a path to a function returning (status, content type, body). Metrics are
rendered in the Prometheus text exposition format (version 0.0.4) from plain values,
so nothing beyond the standard library is needed.

One thread serves every connection from a selector loop: a connection costs a socket,
never a thread, so a peer holding hundreds of idle connections, or a pids cgroup with no
room for another thread, cannot starve the probes. Each connection has `idle_timeout_s`
from its accept to send its request and take the answer, idle or trickling; at most
MAX_CONNECTIONS are open, and a new one closes the oldest. One request per connection
(`Connection: close`). Routes run on the loop's thread, so they must be quick.
"""

from __future__ import annotations

import contextlib
import selectors
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from http import HTTPStatus

from torchwarm.errors import ConfigError, printable

Response = tuple[int, str, bytes]
Route = Callable[[], Response]
TEXT = "text/plain; charset=utf-8"
PROMETHEUS = "text/plain; version=0.0.4; charset=utf-8"
IDLE_TIMEOUT_S = 5.0  # kubelet probes and Prometheus send their request at once
MAX_CONNECTIONS = 256
MAX_REQUEST_BYTES = 8192  # request line and headers; probes send about 100


def parse_listen(value: str) -> tuple[str, int]:
    """'HOST:PORT' or ':PORT' (all interfaces) → (host, port)."""
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ConfigError(f"--listen {value!r}: expected HOST:PORT, e.g. 0.0.0.0:8477")
    return host or "0.0.0.0", int(port)


@dataclass
class _Conn:
    sock: socket.socket
    deadline: float
    received: bytearray = field(default_factory=bytearray)
    answer: bytes = b""
    sent: int = 0


class Server:
    """A listening endpoint: `serve_forever()` runs its loop on the calling thread,
    `start()` on a new one; `shutdown()` stops either and closes every socket."""

    def __init__(self, listen: str, routes: dict[str, Route], idle_timeout_s: float) -> None:
        host, port = parse_listen(listen)
        try:
            self._listener = socket.create_server((host, port), backlog=128)
            self._wake_r, self._wake_w = socket.socketpair()
        except OSError as e:
            raise ConfigError(f"cannot listen on {listen}: {e.strerror}") from None
        for sock in (self._listener, self._wake_r, self._wake_w):
            sock.setblocking(False)
        self.server_address: tuple[str, int] = self._listener.getsockname()[:2]
        self._routes = routes
        self._timeout = idle_timeout_s
        self._conns: dict[socket.socket, _Conn] = {}  # oldest first
        self._sel = selectors.DefaultSelector()
        self._stopping = False
        self._closed = False
        self._lock = threading.RLock()
        self._loop_thread: int | None = None
        self._thread_started = False
        self._done = threading.Event()

    def start(self) -> None:
        """Serve from a new daemon thread; RuntimeError where no thread can be started."""
        threading.Thread(target=self.serve_forever, name="torchwarm-http", daemon=True).start()
        self._thread_started = True

    def serve_forever(self) -> None:
        self._loop_thread = threading.get_ident()
        try:
            if self._stopping:
                return
            self._sel.register(self._listener, selectors.EVENT_READ)
            self._sel.register(self._wake_r, selectors.EVENT_READ)
            while not self._stopping:
                now = time.monotonic()
                first = next(iter(self._conns.values()), None)
                wait = min(1.0, first.deadline - now) if first else 1.0
                for key, _mask in self._sel.select(max(0.0, wait)):
                    if key.fileobj is self._listener:
                        self._accept()
                    elif key.fileobj is self._wake_r:
                        with contextlib.suppress(OSError):
                            self._wake_r.recv(64)
                    else:
                        self._step(key.data)
                self._expire(time.monotonic())
        finally:
            self._close_all()
            self._done.set()

    def shutdown(self) -> None:
        """Stop serving and close every socket; wait for a loop that runs on another thread.

        Safe from a signal handler on the loop's own thread (it returns at once, and the
        loop ends after the handler).
        """
        self._stopping = True
        with contextlib.suppress(OSError):
            self._wake_w.send(b"x")
        if threading.get_ident() == self._loop_thread:
            return
        if self._thread_started or self._loop_thread is not None:
            self._done.wait()
        else:
            self._close_all()

    # -- the loop -------------------------------------------------------------------------

    def _accept(self) -> None:
        while True:
            try:
                sock, _addr = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError:  # no descriptor left (EMFILE): make room, or wait a little
                if self._conns:
                    self._close(next(iter(self._conns)))
                else:
                    time.sleep(0.05)
                return
            if len(self._conns) >= MAX_CONNECTIONS:
                self._close(next(iter(self._conns)))  # the oldest: the newest may be a probe
            sock.setblocking(False)
            conn = _Conn(sock, time.monotonic() + self._timeout)
            self._conns[sock] = conn
            self._sel.register(sock, selectors.EVENT_READ, conn)

    def _step(self, conn: _Conn) -> None:
        """Read what arrived; once the request is complete, answer it."""
        try:
            if not conn.answer:
                data = conn.sock.recv(4096)
                if not data:
                    return self._close(conn.sock)
                conn.received += data
                end = conn.received.find(b"\r\n\r\n")
                if end < 0 and len(conn.received) <= MAX_REQUEST_BYTES:
                    return None
                conn.answer = self._answer(bytes(conn.received[: max(end, 0)]))
                self._sel.modify(conn.sock, selectors.EVENT_WRITE, conn)
            conn.sent += conn.sock.send(conn.answer[conn.sent :])
            if conn.sent >= len(conn.answer):
                self._close(conn.sock)
        except (BlockingIOError, InterruptedError):
            pass
        except OSError:  # the peer hung up (a probe past its timeout): not an error
            self._close(conn.sock)
        return None

    def _answer(self, head: bytes) -> bytes:
        parts = head.split(b"\r\n", 1)[0].decode("latin-1").split()
        if len(parts) != 3 or not parts[2].startswith("HTTP/"):
            return _response(400, TEXT, b"bad request\n")
        method, target = parts[0], parts[1]
        if method not in ("GET", "HEAD"):
            return _response(405, TEXT, b"only GET\n")
        route = self._routes.get(target.split("?", 1)[0])
        try:
            status, ctype, body = route() if route else (404, TEXT, b"not found\n")
        except Exception as e:  # noqa: BLE001 - one line on stderr, and the loop goes on
            print(printable(f"torchwarm: http: answering {target}: {type(e).__name__}: {e}"),
                  file=sys.stderr)  # fmt: skip
            status, ctype, body = 500, TEXT, b"internal error\n"
        return _response(status, ctype, body if method == "GET" else b"", len(body))

    def _expire(self, now: float) -> None:
        for sock, conn in list(self._conns.items()):
            if conn.deadline > now:
                return  # every later one was accepted later
            self._close(sock)

    def _close(self, sock: socket.socket) -> None:
        self._conns.pop(sock, None)
        with contextlib.suppress(KeyError, ValueError):
            self._sel.unregister(sock)
        sock.close()

    def _close_all(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            for sock in list(self._conns):
                self._close(sock)
            for sock in (self._listener, self._wake_r, self._wake_w):
                sock.close()
            self._sel.close()


def _response(status: int, ctype: str, body: bytes, length: int | None = None) -> bytes:
    try:
        phrase = HTTPStatus(status).phrase
    except ValueError:
        phrase = ""
    head = (f"HTTP/1.1 {status} {phrase}\r\nContent-Type: {ctype}\r\n"
            f"Content-Length: {len(body) if length is None else length}\r\n"
            "Connection: close\r\n\r\n")  # fmt: skip
    return head.encode("latin-1") + body


def bind(listen: str, routes: dict[str, Route], idle_timeout_s: float = IDLE_TIMEOUT_S) -> Server:
    """Listen on `listen` (ConfigError if it cannot); serve nothing until started."""
    return Server(listen, routes, idle_timeout_s)


def serve(listen: str, routes: dict[str, Route], idle_timeout_s: float = IDLE_TIMEOUT_S) -> Server:
    """Start serving `routes` on a background thread; return the server (for its port)."""
    server = bind(listen, routes, idle_timeout_s)
    server.start()
    return server


def metric(name: str, kind: str, help: str, samples: Iterable[tuple[dict[str, str], float]]) -> str:
    """One metric family in the text format: HELP, TYPE, and a line per labelled sample."""
    lines = [f"# HELP {name} {help}", f"# TYPE {name} {kind}"]
    for labels, value in samples:
        shown = ",".join(f'{k}="{_escape(v)}"' for k, v in sorted(labels.items()))
        lines.append(f"{name}{{{shown}}} {value:g}" if shown else f"{name} {value:g}")
    return "\n".join(lines) + "\n"


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
