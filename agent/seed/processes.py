"""Processes torchwarm starts and must be able to stop: the warm-up child of a model
workload, and a command workload (the user's own warm-up script or server).

Each runs in a process group of its own, with its output in a log file, and is killed
with everything it started (the whole group) when it passes its timeout, when it is
cancelled, and after it exits (a server a script left running). A command may print
one report line so that its own torch counters reach the manifest (`REPORT_KEY`).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import signal
import subprocess
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torchwarm.env import torchenv
from torchwarm.errors import ConfigError
from torchwarm.node import precompile_rules
from torchwarm.node.verify import file_sha256
from torchwarm.seed.child import COUNTERS

# The line a command prints to report its counters, on stdout or stderr, flushed:
#   {"torchwarm_report": {"counters": {"fxgraph_cache_hit": 0, ...}, "first_call_s": 1.5}}
# counters: names from child.COUNTERS (torch._dynamo.utils.counters), integers.
REPORT_KEY = "torchwarm_report"
_TAIL_BYTES = 1 << 20  # only the end of a (server's) long log is read


@dataclass(frozen=True)
class Ended:
    how: str  # "exited", "timeout" or "cancelled"
    returncode: int | None  # the exit status when it exited (negative: killed by a signal)
    wall_s: float


def child_env(cache: Path, extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """A warm-up's environment: this process's, plus `extra` (the config's and a command's
    `env`, {cache_dir} meaning `cache`), torch's caches in `cache`, torch's precompile
    mode off, and no TORCHWARM_* variable.

    The child runs the user's model code or command, so it must hold no signing key: not
    $TORCHWARM_SIGNING_KEY, nor $TORCHWARM_SIGNING_KEY_FILE or the config file that would
    lead to one. A model workload's child gets its workload as JSON on the command line.
    Precompile mode is set by the `precompile` format alone (in the child): a command
    compiling with it would leave AOTAutograd entries no node looks up.
    """
    env = torchenv.cache_env(cache, extra=extra)
    env.pop(precompile_rules.ENV_VAR, None)
    return {k: v for k, v in env.items() if not k.startswith("TORCHWARM_")}


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
    with started(who, argv, env, log_path, cwd) as proc:
        how = wait_unreaped(proc, timeout_s, stop)
    return Ended(how, proc.returncode if how == "exited" else None, time.monotonic() - t0)


@contextlib.contextmanager
def started(
    who: str, argv: Sequence[str], env: Mapping[str, str], log_path: Path, cwd: Path | None = None
) -> Iterator[subprocess.Popen[bytes]]:
    """Start `argv` in a new process group, stdout and stderr into `log_path`, and give
    it to the caller while it runs (without waiting: a server); on leaving, kill the
    whole group and reap it, so that `returncode` is set then.

    The caller must not reap it (wait, poll) before: its pid is the group's id, which
    could be another group's once it was reaped. `exited`, `exit_status` and
    `wait_unreaped` look without reaping. ConfigError naming `who` (e.g. "workload
    'mlp'") when it cannot be started.
    """
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
            yield proc
        finally:
            _kill_group(proc)  # also what a process that exited left running
            proc.wait()


def exited(proc: subprocess.Popen[bytes]) -> bool:
    """Whether it exited; it is left unreaped (WNOWAIT)."""
    try:
        return bool(os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT))
    except ChildProcessError:
        return True  # already reaped


def exit_status(proc: subprocess.Popen[bytes]) -> int | None:
    """Its exit status once it exited (negative: the signal that killed it, as
    Popen.returncode), left unreaped; None while it runs (or when something else reaped
    it, status unknown)."""
    try:
        info = os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
    except ChildProcessError:
        return proc.returncode
    if info is None:
        return None
    return info.si_status if info.si_code == os.CLD_EXITED else -info.si_status


def wait_unreaped(proc: subprocess.Popen[bytes], timeout_s: float,
                  stop: threading.Event | None = None) -> str:  # fmt: skip
    """'exited', 'timeout' or 'cancelled'. The child is left unreaped (WNOWAIT), so its
    process group id cannot be reused before _kill_group."""
    deadline = time.monotonic() + timeout_s
    while True:
        if exited(proc):
            return "exited"
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


def last_lines(log_path: Path, n: int) -> list[str]:
    """The last `n` lines of the log that are not blank, stripped; [] for none."""
    text = _tail(log_path).decode(errors="replace")
    return [line.strip() for line in text.splitlines() if line.strip()][-n:]


def read_report(log_path: Path) -> dict[str, Any] | None:
    """The last report line in the log, as {"counters": {...}, "first_call_s": x} with
    only the known counter names and well-typed values kept; None when there is none."""
    known = {name for names in COUNTERS.values() for name in names}
    for line in reversed(_tail(log_path).splitlines()):
        if REPORT_KEY.encode() not in line:
            continue
        try:
            doc = json.loads(line)
        except ValueError:
            continue
        body = doc.get(REPORT_KEY) if isinstance(doc, dict) else None
        if not isinstance(body, dict) or not isinstance(body.get("counters"), dict):
            continue
        report: dict[str, Any] = {
            "counters": {
                k: v
                for k, v in body["counters"].items()
                if k in known and isinstance(v, int) and not isinstance(v, bool) and v >= 0
            }
        }
        first = body.get("first_call_s")
        if isinstance(first, int | float) and not isinstance(first, bool) and first >= 0:
            report["first_call_s"] = round(float(first), 3)
        return report
    return None


def _tail(log_path: Path) -> bytes:
    with log_path.open("rb") as f:
        f.seek(max(0, f.seek(0, os.SEEK_END) - _TAIL_BYTES))
        return f.read()


def code_digest(paths: Sequence[Path]) -> str:
    """sha256 over the content of the files and folders a command workload names as its
    code (`code:`), walked in a stable order; __pycache__ folders are left out.

    ConfigError when one does not exist.
    """
    h = hashlib.sha256(b"torchwarm-command-code-1\0")
    for i, root in enumerate(paths):
        if root.is_file():
            files = [root]
        elif root.is_dir():
            files = sorted(
                p
                for p in root.rglob("*")
                if p.is_file() and "__pycache__" not in p.relative_to(root).parts
            )
        else:
            raise ConfigError(
                f"code path {root} does not exist; fix the workload's code list (paths "
                "are relative to the config file)"
            )
        for f in files:
            rel = "" if f == root else f.relative_to(root).as_posix()
            h.update(f"{i}\0{rel}\0{file_sha256(f)[0]}\0".encode())
    return h.hexdigest()
