"""May this start of the app use the precompiled entries? A per-boot record of how the
app's starts with them ended, beside the ready marker.

torch's caching precompile can fail at load for real code (torch 2.13: `AttributeError:
'_Missing' object has no attribute '__name__'` out of torch.compile(), in
torch/_dynamo/package.py load_guard_manager), and a crash at start is worse than a cold
start: it would repeat at every restart in the same boot (a pod's container restarts on
the same volume). So `torchwarm run` and `torchwarm.activate()` make each start with the
entries a trial, recorded in `torchwarm-precompile.json` before the app runs and again
when it ends:

  running   a start with the entries is under way in process `pid` (`started`: its start
            time, so that a reused pid is not taken for it)
  stopping  `run` was asked to stop it (`how`: by which signal), so its end, even a
            SIGKILL of both after a stop's grace, is no failure
  failed    a start with them failed; `how` says how (exited 1, was killed by SIGSEGV,
            raised AttributeError: ..., died without exiting)
  ended     a start with them ended with no sign of failure

A record counts only in the boot it was written in (marker.boot_id()) and for the
entries it was made for (each precompiled workload's dynamo blob): a new boot, or a pull
that installs other entries, tries them again. While it says failed, or running in a
process that is gone (a segfault, SIGKILL, os._exit), starts go without the entries
(warm through the FX-graph cache) and say why in one line. The file is untrusted: what
does not parse as a record of this boot is no record.
"""

from __future__ import annotations

import atexit
import logging
import os
import resource
import shutil
import signal
import sys
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any

from torchwarm.errors import one_line, printable
from torchwarm.node import marker
from torchwarm.util.fs import atomic_write_json, read_json

if TYPE_CHECKING:
    from collections.abc import Callable, Mapping

    from torchwarm.node.report import PullReport

log = logging.getLogger(__name__)

RECORD = "torchwarm-precompile.json"  # beside the ready marker
VERSION = 1
STATES = ("running", "stopping", "failed", "ended")
LIVE = ("running", "stopping")  # a start under way, in a process that may be gone
# What `run` passes on to the app. A stop (the first four) ends the app by request, so
# whatever exit follows is no failure of the entries.
STOPS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT)
FORWARDED = (*STOPS, signal.SIGUSR1, signal.SIGUSR2)
# What Python sets to SIG_IGN at start and the app must not inherit (an ignored signal
# stays ignored across exec): a `run -- sh -c 'producer | head'` would go on writing.
PYTHON_IGNORED = (signal.SIGPIPE, signal.SIGXFSZ)


@dataclass
class Trial:
    """This process's start with the entries, recorded as running in `path`."""

    path: Path
    entries: list[str]
    pid: int
    started: str
    done: bool = False

    def end(self, how: str, failed: bool) -> None:
        """Record how the start ended, once. A failure is always recorded; a clean end only
        while the record is still this start's (a later start of the app may hold it)."""
        if self.done:
            return
        self.done = True
        if not failed and not self._mine():
            return
        try:
            _write(self, "failed" if failed else "ended", how)
        except OSError as e:
            log.warning("cannot record in %s how the app's start with precompiled entries "
                        "ended (%s): %s", self.path, how, e)  # fmt: skip

    def stopping(self, how: str) -> None:
        """Record that the start was asked to stop, before the stop reaches the app: a
        stop it does not finish in time ends with both SIGKILLed, and no record after."""
        if self.done or not self._mine():
            return
        try:
            _write(self, "stopping", how)
        except OSError as e:
            log.warning("cannot record in %s that the app was asked to stop (%s): %s",
                        self.path, how, e)  # fmt: skip

    def _mine(self) -> bool:
        """Whether the record is still this start's (a later start of the app may hold it)."""
        doc = _read(self.path, self.entries)
        return doc is not None and doc["state"] in LIVE and _same(doc, self)


@dataclass(frozen=True)
class Ended:
    """How the app that `supervise` ran ended: its exit code (128+N for a death by signal
    N), in words, whether that was a failed start, and the signal it died of (0: none)."""

    code: int
    how: str
    failed: bool
    signo: int = 0
    stopped: str = ""  # the stop signal passed on to it, if one came ("SIGTERM")


def entries(report: PullReport) -> list[str]:
    """The precompiled entries the report's pull installed, one name per workload."""
    names = []
    for o in report.workloads:
        if o.precompiled:
            sha = [b.get("sha256") for b in o.blobs if b.get("role") == "dynamo"]
            names.append(f"{o.workload}:{sha[0] if sha else o.manifest}")
    return sorted(names)


def begin(report: PullReport) -> tuple[Trial | None, str]:
    """Start a trial of the report's precompiled entries in this process.

    (trial, ""): start with them (recorded as running); (None, reason): start without
    them, `reason` the one line to say; (None, ""): the pull installed none.
    """
    names = entries(report)
    if not names:
        return None, ""
    if not report.marker:
        return None, _off("the ready marker was not written, so a failed start with them "
                          "could not be remembered")  # fmt: skip
    path = Path(report.marker).with_name(RECORD)
    started = _start_time(os.getpid())
    if started is None:  # no /proc: no boot id either, nothing to tell a dead start by
        return None, _off("this system has no /proc, so a failed start could not be told")
    trial = Trial(path, names, os.getpid(), started)
    doc = _read(path, names)
    if doc is not None and doc["state"] == "failed":
        return None, _off(f"the app's last start with them {doc['how']}", path)
    if doc is not None and doc["state"] in LIVE:
        if _same(doc, trial):
            return trial, ""  # activate() again in the same process
        if doc["state"] == "running" and _start_time(doc["pid"]) != doc["started"]:
            how = (f"(pid {doc['pid']}) died without exiting (a crash, a signal or "
                   "os._exit)")  # fmt: skip
            dead = Trial(path, names, doc["pid"], doc["started"])
            dead.end(how, failed=True)
            return None, _off(f"the app's last start with them {how}", path)
        # else another start of the app runs (or stopped) now: this one is the record's
        # from here on
    try:
        _write(trial, "running", "")
    except OSError as e:
        return None, _off(f"cannot record the start in {path} ({e.strerror or e}), so a "
                          "failed start with them could not be remembered")  # fmt: skip
    return trial, ""


def supervise(
    trial: Trial | None,
    argv: list[str],
    env: Mapping[str, str],
    spawned: Callable[[], None] = lambda: None,
) -> Ended:
    """Run the app as a child (`run` cannot exec: it would never learn how the app
    ended), pass FORWARDED signals on to it, reap it (and orphans, as a container's PID 1
    must), and record how it ended in `trial` (None: a start without precompiled entries,
    supervised for a node publish). Raises OSError if the app cannot be started.

    Signals are taken with sigwaitinfo so that one a terminal sent (^C, a hangup: the
    kernel sends those to the app's process group too) is not passed on twice. They are
    blocked in this thread before the app is spawned, and `spawned()` runs right after:
    a thread it starts inherits the mask, so every signal still comes here.
    """
    waited = {*FORWARDED, signal.SIGCHLD}
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, waited)
    try:
        try:
            pid = os.posix_spawn(_which(argv[0], env), argv, env, setsigmask=mask,
                                 setsigdef=PYTHON_IGNORED)  # fmt: skip
        except OSError:
            if trial is not None:
                trial.end("could not be started", failed=False)
            raise
        spawned()
        stop = ""
        status = None
        while status is None:
            info = signal.sigwaitinfo(waited)
            if info.si_signo == signal.SIGCHLD:
                status = _reap(pid)
                continue
            if info.si_signo in STOPS and not stop:
                stop = _name(info.si_signo)
                if trial is not None:
                    trial.stopping(f"asked to stop by {stop}")
            if info.si_code <= 0:  # sent by a process (kill, sigqueue), not the kernel
                os.kill(pid, info.si_signo)
        while signal.sigtimedwait(waited, 0) is not None:
            pass  # a signal that came after the app ended has no one to go to
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)
    signo = os.WTERMSIG(status) if os.WIFSIGNALED(status) else 0
    if signo:
        code, how = 128 + signo, f"was killed by {_name(signo)}"
    else:
        code = os.waitstatus_to_exitcode(status)
        how = f"exited {code}"
    failed = code != 0 and not stop
    if trial is not None:
        trial.end(f"{how} after {stop}" if stop else how, failed)
    return Ended(code, how, failed, signo, stop)


def die_by(signo: int) -> int:
    """End this process by signal `signo`, as the app it ran did: whoever waits for `run`
    (systemd, a shell, a container runtime) must see what it would see of the app, and
    systemd counts a SIGTERM death as a clean stop where exit 143 is a failure. Returns
    128+N, the exit code to use, only where the signal could not end this process."""
    sys.stdout.flush()
    sys.stderr.flush()
    if os.getpid() == 1:
        # A PID 1 (a container's) ignores every signal it has no handler for, its own
        # included: the shell's 128+N is the nearest it can say.
        return 128 + signo
    # The app's core, if any, is written; a core of torchwarm's own would only mislead.
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    if signo != signal.SIGKILL:  # whose disposition cannot be set, nor need be
        signal.signal(signo, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signo})
    os.kill(os.getpid(), signo)
    return 128 + signo  # not reached: the app died of it, so by default it ends a process


def watch(trial: Trial) -> None:
    """Record how this process ends (activate()): an uncaught exception is a failed
    start, a normal interpreter exit an ended one. A death without either (a signal it
    does not handle, a segfault, os._exit) leaves the record running in a process that is
    gone, which the next begin() reads as failed."""
    first = not _watched
    _watched[:] = [trial]
    if not first:
        return
    previous = sys.excepthook

    def hook(kind: type[BaseException], value: BaseException, tb: TracebackType | None) -> None:
        t = _watched[0]
        if os.getpid() == t.pid and not issubclass(kind, KeyboardInterrupt):
            t.end(f"raised {kind.__name__}: {one_line(str(value))[:300]}", failed=True)
        previous(kind, value, tb)

    sys.excepthook = hook
    atexit.register(_at_exit)


_watched: list[Trial] = []  # the trial of this process that watch() ends


def _at_exit() -> None:
    t = _watched[0]
    if os.getpid() == t.pid:  # not in a forked child that exits through atexit
        t.end("exited", failed=False)


def _off(reason: str, path: Path | None = None) -> str:
    again = f" (delete {path} to try them again)" if path is not None else ""
    return printable(f"precompiled entries off for this boot: {reason}; starting FX-graph "
                     f"warm{again}")  # fmt: skip


def _read(path: Path, names: list[str]) -> dict[str, Any] | None:
    """The record in `path` if it is one of this boot for these entries, else None."""
    doc = read_json(path)
    if not isinstance(doc, dict):
        return None
    ok = (
        doc.get("version") == VERSION
        and doc.get("boot_id") == marker.boot_id()
        and doc.get("entries") == names
        and doc.get("state") in STATES
        and type(doc.get("pid")) is int
        and doc["pid"] > 0
        and isinstance(doc.get("started"), str)
        and isinstance(doc.get("how"), str)
    )
    return doc if ok else None


def _write(t: Trial, state: str, how: str) -> None:
    doc = {
        "version": VERSION,
        "boot_id": marker.boot_id(),
        "entries": t.entries,
        "state": state,
        "pid": t.pid,
        "started": t.started,
        "how": how,
        "at": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }
    atomic_write_json(t.path, doc)


def _same(doc: Mapping[str, Any], t: Trial) -> bool:
    return doc["pid"] == t.pid and doc["started"] == t.started


def _start_time(pid: int) -> str | None:
    """When process `pid` started (clock ticks after boot, /proc/<pid>/stat field 22);
    None if it is gone or a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rpartition(")")[2].split()  # the name before it may hold anything
    if len(fields) < 20 or fields[0] in ("Z", "X"):
        return None
    return fields[19]


def _which(command: str, env: Mapping[str, str]) -> str:
    """The file os.execvpe would run: `command` searched on the app's PATH."""
    if os.sep in command:
        return command
    found = shutil.which(command, path=os.pathsep.join(os.get_exec_path(dict(env))))
    if found is None:
        raise FileNotFoundError(2, "No such file or directory", command)
    return found


def _reap(pid: int) -> int | None:
    """Reap every child that ended; the app's wait status if it is one of them."""
    status = None
    while True:
        try:
            done, st = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return status
        if done == 0:
            return status
        if done == pid:
            status = st


def _name(signo: int) -> str:
    try:
        return signal.Signals(signo).name
    except ValueError:
        return f"signal {signo}"
