"""A server workload's warm-up (config.Server): start the server, wait until it is ready,
send its warm-up requests, stop it.

The server runs in a process group of its own with its output in the warm-up log
(processes.started). Its readiness check and its requests go to 127.0.0.1:port only, over
http.client (no proxy is ever asked). The check is polled every 0.1 s at first, slower
up to every 1 s. Every wait has a monotonic deadline: `ready_timeout_s` for the check,
`request_timeout_s` for each request, `warmup_timeout_s` for all of it from the start;
then the stop signal goes to the server process (only: as docker stop and the kubelet
do), and the rest of its group gets what is left of `stop_grace_s` to exit after it;
past that, whatever is left of the group is killed. Any way this goes wrong is one
WarmupError line: what, the last lines of the log and its path.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import re
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from torchwarm.config import Server, WarmRequest
from torchwarm.errors import Cancelled, WarmupError, printable
from torchwarm.seed import processes

HOST = "127.0.0.1"  # never anything else: the warm-up talks to its own server only
POLL_FIRST_S = 0.1
POLL_MAX_S = 1.0
CHECK_TIMEOUT_S = 2.0  # one readiness attempt; a slow answer is "not ready yet"
LAST_LINES = 5  # of the log, in an error's line
_LINE_CHARS = 300  # each of them cut there: a traceback's line can be long
_CHUNK = 64 << 10
POLL_GROUP_S = 0.1  # how often the stop looks whether the server's group is gone
_T = TypeVar("_T")


def seconds(x: float) -> str:
    """Seconds for messages: 1800, 2, 0.5, 0.04 (never 1.8e+03)."""
    return f"{x:.3f}".rstrip("0").rstrip(".")


@dataclass(frozen=True)
class Answer:
    """One warm-up request as it went."""

    method: str
    path: str
    status: int
    latency_s: float


@dataclass(frozen=True)
class Served:
    """A server warm-up that went well."""

    ended: processes.Ended  # how the server process ended (after the stop signal)
    ready_s: float  # from its start until the check passed
    answers: tuple[Answer, ...]
    # How the stop went: "on SIGTERM: exit 0", "on SIGTERM: killed by SIGTERM", "on SIGTERM:
    # no exit within 30 s, killed (SIGKILL)", "on SIGTERM: exit 0; its process group was
    # not gone within 30 s, killed (SIGKILL)", "exit 0 before the stop signal".
    stopped: str

    def summary(self, server: Server) -> dict[str, Any]:
        """Its part of the manifest's warmup summary (docs/format.md)."""
        return {
            "ready": f"{server.ready} {server.ready_target}".strip(),
            "ready_s": round(self.ready_s, 3),
            "requests": [
                {
                    "method": a.method,
                    "path": a.path,
                    "status": a.status,
                    "latency_s": round(a.latency_s, 3),
                }
                for a in self.answers
            ],
            "stopped": self.stopped,
        }


def describe(summary: dict[str, Any]) -> str:
    """A server warm-up's summary (Served.summary) for people: when it was ready, how long
    its first requests took."""
    took = [r["latency_s"] for r in summary["requests"]]
    shown = ", ".join(f"{t:.2f}" for t in took[:4]) + (", …" if len(took) > 4 else "")
    return f"server ready in {summary['ready_s']:.2f} s, " + (
        f"{len(took)} request(s) ({shown} s)" if took else "no requests"
    )


class _Failed(Exception):
    """What went wrong, said inside the process group's lifetime, raised as WarmupError
    once the group is gone (so that the log's last lines are complete)."""

    def __init__(self, problem: str, killed: bool = True) -> None:
        super().__init__(problem)
        self.problem = problem
        self.killed = killed  # whether it still ran: it (and its children) were killed


def drive(
    what: str,
    who: str,
    server: Server,
    argv: Sequence[str],
    env: Mapping[str, str],
    log: Path,
    timeout_s: float,
    cwd: Path | None = None,
    stop: threading.Event | None = None,
) -> Served:
    """Start the server `argv`, wait until `server.ready` passes, send `server.requests`
    in order, stop it, and say how it went.

    `what` starts every error's line (e.g. "warm-up of 'api' (server python app.py)"),
    `who` names it when it cannot be started (ConfigError). WarmupError, naming `log`, when
    the port is taken before the start, it is not ready in time, exits before its stop,
    a request gets no answer or another status, it passes `timeout_s`, or it exits with
    another status than 0 or death by the stop signal; Cancelled when `stop` is set. The
    group is killed on every way out.
    """
    _refuse_taken_port(what, server.port)
    t0 = time.monotonic()
    deadline = t0 + timeout_s
    try:
        with processes.started(who, argv, env, log, cwd) as proc:
            ready_s = _wait_ready(proc, server, log, t0, deadline, timeout_s, stop)
            answers = _send(proc, server, deadline, timeout_s, stop)
            stopped = _stop(proc, server)
    except _Failed as e:
        tail = " | ".join(printable(line[:_LINE_CHARS]) for line in
                          processes.last_lines(log, LAST_LINES)) or "(no output)"  # fmt: skip
        killed = "; killed it and its child processes" if e.killed else ""
        raise WarmupError(
            f"{what}: {printable(e.problem)}{killed}; last lines: {tail}; full log: {log}"
        ) from None
    except Cancelled:
        raise Cancelled(f"{what} cancelled") from None
    ended = processes.Ended("exited", proc.returncode, time.monotonic() - t0)
    return Served(ended, ready_s, answers, stopped)


def _refuse_taken_port(what: str, port: int) -> None:
    """Another process listening there would pass the check and get the requests."""
    try:
        with socket.create_connection((HOST, port), timeout=CHECK_TIMEOUT_S):
            pass
    except OSError:
        return
    raise WarmupError(
        f"{what}: {HOST}:{port} accepts connections before the server started: another "
        "process listens there and would get the warm-up's requests; stop it or set "
        "server.port to a free port"
    )


def ready_check(server: Server) -> str:
    """The readiness check, as messages say it."""
    if server.ready == "http":
        return f"GET http://{HOST}:{server.port}{server.ready_target}"
    if server.ready == "tcp":
        return f"TCP connect to {HOST}:{server.port}"
    return f"a line of its output matching {server.ready_target!r}"


def _wait_ready(
    proc: subprocess.Popen[bytes],
    server: Server,
    log: Path,
    t0: float,
    deadline: float,
    timeout_s: float,
    stop: threading.Event | None,
) -> float:
    """Seconds from `t0` until the check passed."""
    ready_by = min(t0 + server.ready_timeout_s, deadline)
    lines = _LogLines(log, re.compile(server.ready_target)) if server.ready == "log" else None
    interval = POLL_FIRST_S
    while True:
        now = time.monotonic()
        last = _check(server, lines, min(CHECK_TIMEOUT_S, max(ready_by - now, 0.01)))
        if last is None:
            return time.monotonic() - t0
        seen = f"(ready: {ready_check(server)}, last: {last})"
        if processes.exited(proc):
            raise _Failed(f"exited ({_status(proc)}) before it was ready {seen}", killed=False)
        if stop is not None and stop.is_set():
            raise Cancelled()
        now = time.monotonic()
        if now >= ready_by:
            if ready_by == deadline and deadline < t0 + server.ready_timeout_s:
                raise _Failed(f"did not finish within {seconds(timeout_s)} s (warmup_timeout_s), "
                              f"not ready yet {seen}")  # fmt: skip
            raise _Failed(f"not ready within {seconds(server.ready_timeout_s)} s {seen}")
        time.sleep(min(interval, ready_by - now))
        interval = min(interval * 1.5, POLL_MAX_S)


def _check(server: Server, lines: _LogLines | None, timeout: float) -> str | None:
    """None when the server is ready, else what the check saw, within `timeout` in all
    (an answer dripping in byte by byte is "no answer in time")."""
    if lines is not None:
        return None if lines.matched() else "no such line yet"
    try:
        if server.ready == "tcp":
            with socket.create_connection((HOST, server.port), timeout=timeout):
                return None
    except OSError as e:
        return _why(e)
    return http_check(HOST, server.port, server.ready_target, timeout)


def http_check(host: str, port: int, path: str, timeout: float) -> str | None:
    """None when GET http://host:port/path answers 2xx within `timeout` in all, else what
    it saw (the server workload's ready check; a node's wait for its app to be ready)."""
    try:
        conn = http.client.HTTPConnection(host, port, timeout=timeout)

        def get() -> int:
            conn.request("GET", path)
            resp = conn.getresponse()
            resp.read(_CHUNK)
            return resp.status

        try:
            status = _bounded(get, time.monotonic() + timeout, None)
        finally:
            _hang_up(conn)
    except (OSError, http.client.HTTPException) as e:
        return _why(e)
    return None if 200 <= status < 300 else f"status {status}"


def _hang_up(conn: http.client.HTTPConnection) -> None:
    """Close `conn`, waking a thread still reading from it (close alone does not)."""
    if conn.sock is not None:
        with contextlib.suppress(OSError):
            conn.sock.shutdown(socket.SHUT_RDWR)
    conn.close()


class _LogLines:
    """The server's output lines as they come, for the log check."""

    def __init__(self, log: Path, pattern: re.Pattern[str]) -> None:
        self.log, self.pattern, self.offset, self.partial = log, pattern, 0, b""

    def matched(self) -> bool:
        with self.log.open("rb") as f:
            f.seek(self.offset)
            data = f.read()
        self.offset += len(data)
        *whole, self.partial = (self.partial + data).split(b"\n")
        # The unfinished last line too: a server may print "ready" without a newline.
        lines = (*whole, self.partial)
        return any(self.pattern.search(line.decode(errors="replace")) for line in lines)


def _send(
    proc: subprocess.Popen[bytes],
    server: Server,
    deadline: float,
    timeout_s: float,
    stop: threading.Event | None,
) -> tuple[Answer, ...]:
    answers: list[Answer] = []
    total = sum(r.repeat for r in server.requests)
    for r in server.requests:
        for _ in range(r.repeat):
            if stop is not None and stop.is_set():
                raise Cancelled()
            n = len(answers) + 1
            name = f"{r.method} http://{HOST}:{server.port}{r.path} (request {n} of {total})"
            t = time.monotonic()
            if t >= deadline:  # the last answer came just in time
                raise _Failed(f"the warm-up's time (warmup_timeout_s {seconds(timeout_s)} s) ran "
                              f"out before request {n} of {total} ({r.method} "
                              f"http://{HOST}:{server.port}{r.path})")  # fmt: skip
            until = min(t + server.request_timeout_s, deadline)
            which = ("request_timeout_s" if until < deadline
                     else f"warmup_timeout_s, {seconds(timeout_s)} s from the start")  # fmt: skip
            try:
                status, head = _request(server.port, r, until, stop)
            except TimeoutError:
                raise _Failed(f"{name} got no answer within {seconds(until - t)} s "
                              f"({which})") from None  # fmt: skip
            except (OSError, http.client.HTTPException) as e:
                # A server that crashed: give its exit a moment to show.
                if processes.wait_unreaped(proc, 1.0) == "exited":
                    raise _Failed(f"{name} got no answer ({_why(e)}); the server exited "
                                  f"({_status(proc)})", killed=False) from None  # fmt: skip
                raise _Failed(f"{name} got no answer ({_why(e)})") from None
            if status != r.status:
                said = head.decode(errors="replace").strip()[:_LINE_CHARS]
                raise _Failed(f"{name} answered {status}, expected {r.status}"
                              + (f" (answer: {said})" if said else ""))  # fmt: skip
            answers.append(Answer(r.method, r.path, status, time.monotonic() - t))
    return tuple(answers)


def _request(
    port: int, r: WarmRequest, until: float, stop: threading.Event | None
) -> tuple[int, bytes]:
    """Send `r` and read its whole answer (a streamed one too: the server compiles while
    it writes it) by `until`; its status and the start of its body. TimeoutError past
    `until`, Cancelled once `stop` is set.

    A thread left waiting ends when the server's group is killed (its socket closes).
    """
    return _bounded(lambda: _exchange(port, r, until), until, stop)


def _bounded(fn: Callable[[], _T], until: float, stop: threading.Event | None) -> _T:
    """`fn()` in a thread joined until `until` (socket timeouts bound each wait, not the
    sum); TimeoutError past it, Cancelled once `stop` is set. The thread is left to end
    when its socket closes."""
    got: list[Any] = []

    def run() -> None:
        try:
            got.append(fn())
        except BaseException as e:  # noqa: BLE001 - handed to the caller's thread
            got.append(e)

    t = threading.Thread(target=run, name="torchwarm-warm-request", daemon=True)
    t.start()
    while t.is_alive() and time.monotonic() < until:
        if stop is not None and stop.is_set():
            raise Cancelled()
        t.join(min(0.2, max(0.0, until - time.monotonic())))
    if not got:
        raise TimeoutError
    if isinstance(got[0], BaseException):
        raise got[0]
    result: _T = got[0]
    return result


def _exchange(port: int, r: WarmRequest, until: float) -> tuple[int, bytes]:
    body = None if r.json is None else json.dumps(r.json).encode()
    headers = {} if body is None else {"Content-Type": "application/json"}
    conn = http.client.HTTPConnection(HOST, port, timeout=max(0.01, until - time.monotonic()))
    try:
        conn.request(r.method, r.path, body=body, headers=headers)
        resp = conn.getresponse()
        head = resp.read(_CHUNK)
        while resp.read(_CHUNK):
            pass
        return resp.status, head
    finally:
        conn.close()


def _stop(proc: subprocess.Popen[bytes], server: Server) -> str:
    """Send the stop signal to the server process, wait up to the grace for it, then the
    rest of its group (workers flushing), to exit; past it, processes.started kills the
    group on the way out. How it ended."""
    sig = signal.Signals[server.stop_signal]
    if processes.exited(proc):
        code = processes.exit_status(proc)
        if code != 0:
            raise _Failed(f"exited ({_status(proc)}) after its requests, before the stop "
                          "signal", killed=False)  # fmt: skip
        return "exit 0 before the stop signal"
    grace, by = server.stop_grace_s, time.monotonic() + server.stop_grace_s
    # os.kill, not Popen.send_signal: its poll() would reap a server that just exited
    # (sending nothing, and freeing its pid, the group's id, for reuse before the kill).
    # Unreaped, this pid is still the server's, alive or a zombie.
    os.kill(proc.pid, sig)
    if processes.wait_unreaped(proc, grace) != "exited":
        return f"on {sig.name}: no exit within {seconds(grace)} s, killed (SIGKILL)"
    code = processes.exit_status(proc)
    if code not in (0, -sig, 128 + sig):
        raise _Failed(f"exited ({_status(proc)}) on {sig.name} (0, or death by {sig.name}, "
                      "expected)", killed=False)  # fmt: skip
    while _others_in_group(proc.pid):
        if time.monotonic() >= by:
            return (f"on {sig.name}: {_status(proc)}; its process group was not gone within "
                    f"{seconds(grace)} s, killed (SIGKILL)")  # fmt: skip
        time.sleep(POLL_GROUP_S)
    return f"on {sig.name}: {_status(proc)}"


def _others_in_group(pgid: int) -> bool:
    """Whether a live process other than its leader (exited, unreaped) is in the group.

    killpg(pgid, 0) counts the leader's zombie, so the group's members are read from
    /proc (Linux); without /proc, none is assumed (the group is killed at once)."""
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        entries = os.listdir("/proc")
    except OSError:
        return False
    for name in entries:
        if not name.isdigit() or int(name) == pgid:
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue  # gone meanwhile
        # "pid (comm) state ppid pgrp ...": comm may hold spaces and parentheses.
        state, _ppid, pgrp = stat[stat.rindex(b")") + 2 :].split()[:3]
        if int(pgrp) == pgid and state != b"Z":
            return True
    return False


def _status(proc: subprocess.Popen[bytes]) -> str:
    """How an exited process ended: "exit 3", "killed by SIGSEGV"."""
    code = processes.exit_status(proc)
    if code is None:
        return "exit status unknown"
    if code >= 0:
        return f"exit {code}"
    try:
        return f"killed by {signal.Signals(-code).name}"
    except ValueError:
        return f"killed by signal {-code}"


def _why(e: BaseException) -> str:
    """What a connection attempt or request saw, in a few words."""
    if isinstance(e, ConnectionRefusedError):
        return "connection refused"
    if isinstance(e, TimeoutError):
        return "no answer in time"
    if isinstance(e, http.client.RemoteDisconnected | ConnectionResetError | BrokenPipeError):
        return "connection closed without an answer"
    if isinstance(e, http.client.HTTPException):
        return f"not an HTTP answer: {type(e).__name__}"
    return getattr(e, "strerror", None) or str(e) or type(e).__name__
