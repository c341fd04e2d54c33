"""A tiny HTTP endpoint for probes and Prometheus scrapes (the node sidecar, the seed daemon).

Routes map a path to a function returning (status, content type, body). Metrics are
rendered in the Prometheus text exposition format (version 0.0.4) from plain values,
so nothing beyond the standard library is needed.
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Callable, Iterable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from torchwarm.errors import ConfigError

Response = tuple[int, str, bytes]
Route = Callable[[], Response]
TEXT = "text/plain; charset=utf-8"
PROMETHEUS = "text/plain; version=0.0.4; charset=utf-8"


def parse_listen(value: str) -> tuple[str, int]:
    """'HOST:PORT' or ':PORT' (all interfaces) → (host, port)."""
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ConfigError(f"--listen {value!r}: expected HOST:PORT, e.g. 0.0.0.0:8477")
    return host or "0.0.0.0", int(port)


class _Server(ThreadingHTTPServer):
    def handle_error(self, request: object, client_address: object) -> None:
        """A client that hung up (a probe past its timeout) is not an error; anything else
        is one line on stderr, not socketserver's traceback, and the server goes on."""
        kind, err = sys.exc_info()[:2]
        if kind is not None and issubclass(kind, ConnectionError):
            return
        print(f"torchwarm: http: answering {client_address}: {kind.__name__ if kind else '?'}: "
              f"{err}", file=sys.stderr)  # fmt: skip


def serve(listen: str, routes: dict[str, Route]) -> ThreadingHTTPServer:
    """Start serving `routes` on a background thread; return the server (for its port)."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - the http.server API
            route = routes.get(self.path.split("?", 1)[0])
            status, ctype, body = route() if route else (404, TEXT, b"not found\n")
            self.send_response(status)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:  # noqa: A002
            pass  # probes every few seconds would flood the log

    host, port = parse_listen(listen)
    try:
        server = _Server((host, port), Handler)
    except OSError as e:
        raise ConfigError(f"cannot listen on {listen}: {e.strerror}") from None
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, name="torchwarm-http", daemon=True).start()
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
