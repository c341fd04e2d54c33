"""Processes torchwarm starts and must be able to stop: the warm-up child.

It runs in a process group of its own, with its output in a log file, and is killed
with everything it started (the whole group) when it passes its timeout, when it is
cancelled, and after it exits (whatever it left running).
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from .errors import ConfigError

_TAIL_BYTES = 1 << 20  # only the end of a long log is read


@dataclass(frozen=True)
class Ended:
    how: str  # "exited", "timeout" or "cancelled"
    returncode: int | None  # the exit status when it exited (negative: killed by a signal)
    wall_s: float


def run(
    who: str,
    argv: Sequence[str],
    env: Mapping[str, str],
    log_path: Path,
    timeout_s: float,
    cwd: Path | None = None,
    stop: threading.Event | None = None,
) -> Ended:
    """Run `argv` in a new process group, stdout and stderr into `log_path`, and wait
    until it exits, `timeout_s` passes or `stop` is set; then kill the group.

    ConfigError naming `who` (e.g. "workload 'mlp'") when it cannot be started.
    """
    t0 = time.monotonic()
    with log_path.open("wb") as log:
        try:
            proc = subprocess.Popen(list(argv), env=dict(env), cwd=cwd, stdout=log, stderr=log,
                                    start_new_session=True)  # fmt: skip
        except OSError as e:
            where = f" in {cwd}" if cwd is not None else ""
            raise ConfigError(
                f"{who}: cannot start {argv[0]!r}{where}: {e.strerror}; fix its command "
                "(no shell: a program on PATH, or a path) or cwd"
            ) from None
        try:
            how = _wait_unreaped(proc, timeout_s, stop)
        finally:
            _kill_group(proc)  # also what a process that exited left running
            proc.wait()
    return Ended(how, proc.returncode if how == "exited" else None, time.monotonic() - t0)


def _wait_unreaped(proc: subprocess.Popen[bytes], timeout_s: float,
                   stop: threading.Event | None) -> str:  # fmt: skip
    """'exited', 'timeout' or 'cancelled'. The child is left unreaped (WNOWAIT), so its
    process group id cannot be reused before _kill_group."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            if os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT):
                return "exited"
        except ChildProcessError:
            return "exited"  # already reaped
        if stop is not None and stop.is_set():
            return "cancelled"
        if time.monotonic() >= deadline:
            return "timeout"
        time.sleep(0.2)


def _kill_group(proc: subprocess.Popen[bytes]) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)


def last_line(log_path: Path) -> str:
    lines = _tail(log_path).decode(errors="replace").strip().splitlines()
    return lines[-1] if lines else "(no output)"


def _tail(log_path: Path) -> bytes:
    with log_path.open("rb") as f:
        f.seek(max(0, f.seek(0, os.SEEK_END) - _TAIL_BYTES))
        return f.read()
