"""Text that the store, its server, the config or the environment supplied reaches people's
terminals and logs escaped (torchwarm.errors.printable): no control character, escape
sequence or bidi override of it is written raw, whichever command prints it."""

from __future__ import annotations

import json
import socket
import subprocess
import threading
import unicodedata
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import yaml
from conftest import CLI, WORKLOAD, cli_env
from factories import fields, manifest

from torchwarm.node import misses
from torchwarm.spec import keys
from torchwarm.stores.local import LocalStore
from torchwarm.util import httpd

# Retitles the terminal, erases the line, returns the carriage, a NUL, a right-to-left override.
HOSTILE = "\x1b]0;OWNED\x07\x1b[2K\r\x00\u202e"
SHOWN = "\\x1b]0;OWNED\\x07"  # how the start of it reads once escaped


def raw_controls(text: str) -> list[str]:
    """The control, format and line-separator characters in `text`, newlines aside."""
    return [c for c in text if c != "\n" and unicodedata.category(c) in ("Cc", "Cf", "Zl", "Zp")]


def output(*args: str, env: dict[str, str] | None = None, ok: bool = True) -> str:
    """stdout and stderr of the CLI in a new process, read as bytes: a text-mode pipe would
    turn a raw carriage return into a newline."""
    proc = subprocess.run([*CLI, *args], env=cli_env(env), capture_output=True, timeout=120)
    assert (proc.returncode == 0) == ok, proc
    return (proc.stdout + proc.stderr).decode("utf-8", "backslashreplace")


def assert_escaped(out: str) -> None:
    assert not raw_controls(out), ascii(out)
    assert SHOWN in out, out  # the text did reach the output, escaped


class HostileGCS(ThreadingHTTPServer):
    """A GCS endpoint that answers every request with `status` and a JSON API error whose
    message and reason are HOSTILE."""

    daemon_threads = True
    status = 400


class _Handler(BaseHTTPRequestHandler):
    def _answer(self) -> None:
        n = int(self.headers.get("Content-Length") or 0)
        self.rfile.read(n)
        status = self.server.status  # type: ignore[attr-defined]
        error = {"code": status, "message": HOSTILE, "errors": [{"reason": HOSTILE}]}
        body = json.dumps({"error": error}).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_GET = do_POST = do_PUT = do_DELETE = do_HEAD = _answer

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def hostile_gcs() -> Iterator[HostileGCS]:
    server = HostileGCS(("127.0.0.1", 0), _Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server
    server.shutdown()
    server.server_close()


def config(tmp_path: Path, store: str, cache_dir: Path | None = None) -> Path:
    doc = {
        "store": store,
        "store_options": {"attempts": 2},
        "cache_dir": str(cache_dir or tmp_path / "volume" / "inductor"),
        "workloads": [WORKLOAD],
    }
    path = tmp_path / "node.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


@pytest.mark.parametrize(
    "command",
    [["pull"], ["pull", "--require"], ["ls"], ["gc", "--keep", "1", "--dry-run"]],
    ids=["pull", "pull-require", "ls", "gc-dry-run"],
)
def test_a_store_servers_error_text_is_escaped(tmp_path, hostile_gcs, command):
    """An error message and reason from the store's server are printed escaped."""
    env = {"STORAGE_EMULATOR_HOST": f"http://127.0.0.1:{hostile_gcs.server_address[1]}"}
    cfg = config(tmp_path, "gs://bucket/prefix")
    assert_escaped(output(*command, "-c", str(cfg), env=env, ok=command == ["pull"]))


def test_retry_log_lines_are_escaped(tmp_path, hostile_gcs):
    """`pull -v`: the debug lines of retries name the server's reason escaped."""
    hostile_gcs.status = 503
    env = {"STORAGE_EMULATOR_HOST": f"http://127.0.0.1:{hostile_gcs.server_address[1]}"}
    out = output("-v", "pull", "-c", str(config(tmp_path, "gs://bucket")), env=env)
    assert "retrying" in out
    assert_escaped(out)


def test_ls_escapes_manifest_fields(tmp_path):
    """`ls` prints a manifest's workload name, input shapes and command escaped."""
    store = LocalStore(tmp_path / "store")
    shapes = {"input_sets": [[{"shape": ["4" + HOSTILE, 64]}]]}
    for m in (
        manifest(workload="mlp" + HOSTILE, warmup=shapes),
        manifest("cmd", fingerprint=fields(threads=1), warmup={"command": ["python", HOSTILE]}),
    ):
        store.put(keys.manifest_key("mlp", m.fingerprint_digest), m.to_json())
    out = output("ls", "-c", str(config(tmp_path, store.url)))
    assert out.count(SHOWN) == 3, out
    assert_escaped(out)


def test_pull_escapes_a_configured_path(tmp_path):
    """A cache_dir whose name holds escapes is printed escaped in the pull's lines."""
    cache_dir = tmp_path / HOSTILE.replace("\x00", "") / "inductor"
    cfg = config(tmp_path, LocalStore(tmp_path / "store").url, cache_dir)
    assert_escaped(output("pull", "-c", str(cfg)))


def test_miss_watcher_lines_are_escaped(tmp_path, capsys):
    """The miss watcher's line names the cache dir and the new entry's path escaped."""
    cache_dir = tmp_path / HOSTILE.replace("\x00", "")
    cache_dir.mkdir()
    watcher = misses.Watcher(cache_dir)
    watcher.baseline()
    entry = cache_dir / "fxgraph/gm/fgmdokgq7pl4fsyji264lpxnclmt/xrk5njfgmvhs25ze5p6t3pj7cf7tf"
    entry.parent.mkdir(parents=True)
    entry.write_bytes(b"entry")
    watcher.poll()
    assert_escaped(capsys.readouterr().out)


def test_probe_endpoint_escapes_the_request_target(capsys):
    """A route that fails is logged with the peer's request target escaped."""

    def boom() -> httpd.Response:
        raise RuntimeError("route failed")

    server = httpd.serve("127.0.0.1:0", {"/boom": boom})
    try:
        with socket.create_connection(server.server_address, timeout=5) as s:
            target = "/boom?" + HOSTILE.replace("\r", "")
            s.sendall(f"GET {target} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
            assert s.recv(100).startswith(b"HTTP/1.1 500")
    finally:
        server.shutdown()
    assert_escaped(capsys.readouterr().err)
