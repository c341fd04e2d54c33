"""The probe endpoint against a peer that holds connections, and `serve` where no thread
can be started (#20): probes stay answered, idle connections time out, `serve` fails
open. Limits are real: a pids cgroup where this machine lets root make one, else an
address-space limit that leaves room for a few dozen thread stacks."""

from __future__ import annotations

import contextlib
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import yaml
from conftest import CLI, WORKLOAD, cli_env
from factories import PidsCgroups
from servers import free_port

from torchwarm.stores.local import LocalStore
from torchwarm.util import httpd


def get(port: int, path: str, timeout: float = 5) -> tuple[int, str]:
    """(status, body) of GET `path`; (0, why) when no answer came."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=timeout) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()
    except OSError as e:
        return 0, repr(e)


def closed_by_server(sock: socket.socket, within_s: float) -> bool:
    """Whether the server closes `sock` within `within_s` (the peer sends nothing more)."""
    sock.settimeout(within_s)
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False


def test_idle_connection_is_closed_after_the_idle_timeout():
    """A connection that never sends a request is closed by the server, not held forever."""
    server = httpd.serve("127.0.0.1:0", {}, idle_timeout_s=0.5)
    try:
        with socket.create_connection(server.server_address) as s:
            assert closed_by_server(s, within_s=10)
    finally:
        server.shutdown()


def test_trickling_request_is_closed_after_the_idle_timeout():
    """A request sent a byte at a time is closed at the timeout, however busy it looks."""
    server = httpd.serve("127.0.0.1:0", {}, idle_timeout_s=0.5)
    try:
        with socket.create_connection(server.server_address) as s:
            deadline = time.monotonic() + 10
            with contextlib.suppress(OSError):
                while time.monotonic() < deadline:
                    s.sendall(b"G")
                    time.sleep(0.05)
            assert time.monotonic() < deadline
            assert closed_by_server(s, within_s=1)
    finally:
        server.shutdown()


# -- `torchwarm serve` under a limit on threads ------------------------------------------


def node_config(tmp_path: Path) -> Path:
    """A node whose store is empty: the pull ends cold at once (no cache for the workload)."""
    (tmp_path / "volume").mkdir()
    doc = {"store": LocalStore(tmp_path / "store").url,
           "cache_dir": str(tmp_path / "volume" / "inductor"), "workloads": [WORKLOAD]}  # fmt: skip
    path = tmp_path / "node.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


@pytest.fixture
def pids_cgroup() -> Iterator[Callable[[int], list[str]]]:
    """limit(n): a command prefix that runs a program in a new pids cgroup of `n` tasks."""
    groups = PidsCgroups()
    yield lambda n: ["sh", "-c", f'echo $$ > {groups.procs(n)} && exec "$@"', "sh"]
    groups.close()


def address_space_limit() -> list[str]:
    """A command prefix: an address-space limit with room for a few dozen 8 MiB thread
    stacks beyond what `serve` needs (~125 MiB, with at most two malloc arenas)."""
    size = 512 << 20
    return [sys.executable, "-c", "import os, resource, sys; "
            f"resource.setrlimit(resource.RLIMIT_AS, ({size}, {size})); "
            "os.execv(sys.argv[1], sys.argv[1:])"]  # fmt: skip


class Serve:
    """`torchwarm serve` in a fresh process, run through a command `prefix` (a limit)."""

    def __init__(self, config: Path, prefix: list[str]) -> None:
        self.port = free_port()
        cmd = [*prefix, *CLI, "serve", "-c", str(config), "--listen", f"127.0.0.1:{self.port}"]
        env = cli_env({"MALLOC_ARENA_MAX": "2"})
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     text=True, env=env)  # fmt: skip

    def ready(self, within_s: float = 30) -> tuple[int, str]:
        """Poll /readyz until it says 200, the process exits, or `within_s` pass."""
        deadline = time.monotonic() + within_s
        status, body = get(self.port, "/readyz", timeout=2)
        while status != 200 and self.proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
            status, body = get(self.port, "/readyz", timeout=2)
        return status, body

    def stop(self) -> tuple[int, str, str]:
        """SIGTERM; (exit code, stdout, stderr)."""
        if self.proc.poll() is None:
            self.proc.terminate()
        try:
            out, err = self.proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            out, err = self.proc.communicate()
        return self.proc.returncode, out, err


@pytest.fixture(params=["pids-cgroup", "address-space"])
def limited_serve(request, tmp_path) -> Iterator[Serve]:
    """`serve` with room for far fewer threads than the 400 connections held below."""
    config = node_config(tmp_path)
    if request.param == "pids-cgroup":
        serve = Serve(config, prefix=request.getfixturevalue("pids_cgroup")(300))
    else:
        serve = Serve(config, prefix=address_space_limit())
    yield serve
    serve.stop()


def test_probes_answered_while_400_connections_idle(limited_serve):
    """With 400 connections held idle by a peer, /readyz and /healthz still answer."""
    status, body = limited_serve.ready()
    assert status == 200, (body, limited_serve.stop())
    held = [socket.create_connection(("127.0.0.1", limited_serve.port)) for _ in range(400)]
    try:
        assert get(limited_serve.port, "/readyz") == (200, "ready: cold\n")
        assert get(limited_serve.port, "/healthz") == (200, "ok\n")
    finally:
        for s in held:
            s.close()
    code, _out, err = limited_serve.stop()
    assert code == 0, err


@pytest.mark.parametrize("tasks", [1, 2])
def test_serve_without_room_for_threads_fails_open(pids_cgroup, tmp_path, tasks):
    """In a pids cgroup of 1 or 2 tasks (no thread, at most the pull worker), `serve` still
    answers /readyz 200 once the pull is done, and exits 0 on SIGTERM."""
    serve = Serve(node_config(tmp_path), prefix=pids_cgroup(tasks))
    status, body = serve.ready()
    code, out, err = serve.stop()
    assert status == 200 and body.startswith("ready: "), (status, body, code, err)
    assert code == 0, err
