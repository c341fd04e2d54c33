"""The node gate: run the pull in a worker process under a hard deadline, decide fail-open
or fail-closed in one place (`_settle`), write the ready marker.

Fail-open (the default) means the app starts: whatever happens to the pull short of
SIGKILL of this process (a store that is down or never answers, a full disk, a hostile
object, any exception, a config that does not load, the deadline) ends with the previous
cache tree or the complete new one, never a partial one, a ready marker that says
`cold` and why in one line, and exit 0 (or the exec). With `require` the same conditions
are an error with one line, and nothing is installed. Verification is never relaxed:
fail-open only means the app may start without the cache.

The worker (pulljob.py) is a forked child. At the deadline the supervisor kills it,
wherever it is stuck (a blocking read in C, a driver call), unless it has been allowed
to start a swap, which then gets a short grace to finish: the hard bound is
deadline + SWAP_GRACE_S.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import select
import signal
import sys
import time
import warnings
from collections.abc import Mapping
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from torchwarm import config as cfgmod
from torchwarm import stores
from torchwarm.config import Config
from torchwarm.env import torchenv
from torchwarm.errors import DeadlineExceeded, TorchwarmError, one_line
from torchwarm.node import marker
from torchwarm.node.job import Channel, Failure, PullJob
from torchwarm.node.report import PullReport, WorkloadOutcome, overall

SWAP_GRACE_S = 1.0  # how long a swap that started before the deadline may take
_PR_SET_PDEATHSIG = 1


def begin(
    config_path: str | Path | None,
    overrides: Mapping[str, Any] | None = None,
    names: str | None = None,
    require: bool | None = None,
    deadline_s: float | None = None,
    started: float | None = None,
) -> Supervisor | PullReport:
    """Load the config and start the pull, inside the fail-open promise.

    Returns the started Supervisor, or, when the config does not load in fail-open mode,
    the cold report (its marker written where the flags, the environment or the readable
    part of the file put it). With `require` (flag, or $TORCHWARM_REQUIRE when the file
    does not say) a config error is raised.
    """
    started = time.monotonic() if started is None else started
    try:
        cfg = cfgmod.load(config_path, overrides)
    except Exception as e:  # noqa: BLE001 - fail-open: a config error is one more reason
        fallback = cfgmod.fallback(config_path, overrides)
        if fallback.require if require is None else require:
            raise
        why = str(e) if isinstance(e, TorchwarmError) else f"{type(e).__name__}: {e} (a bug)"
        report = _report(fallback.cache_dir, "", "", [], {}, started,
                         f"config error: {one_line(why)}")  # fmt: skip
        if fallback.marker is not None:
            _write_marker(fallback.marker, report)
        return report
    sup = Supervisor(cfg, names, require, deadline_s, started)
    sup.start()
    return sup


def gate(
    config_path: str | Path | None,
    overrides: Mapping[str, Any] | None = None,
    names: str | None = None,
    require: bool | None = None,
    deadline_s: float | None = None,
    started: float | None = None,
) -> tuple[PullReport, Config | None]:
    """`begin`, then wait for the pull: the report, and the config when it loaded."""
    begun = begin(config_path, overrides, names, require, deadline_s, started)
    if isinstance(begun, PullReport):
        return begun, None
    return begun.finish(), begun.cfg


def pull(
    cfg: Config,
    names: str | None = None,
    require: bool | None = None,
    deadline_s: float | None = None,
    started: float | None = None,
) -> PullReport:
    """Install the verified caches of the selected workloads, then write the ready marker.

    Fail-open: always returns a report (cold where it must). Fail-closed: raises the
    error that stopped the pull (its exit code is the CLI's), having installed nothing.
    """
    sup = Supervisor(cfg, names, require, deadline_s, started)
    sup.start()
    return sup.finish()


class Supervisor:
    """Forks the worker (`start`), then watches it until it is done or the deadline
    passes (`finish`). Split in two so that `serve` can fork before its HTTP threads."""

    def __init__(
        self,
        cfg: Config,
        names: str | None = None,
        require: bool | None = None,
        deadline_s: float | None = None,
        started: float | None = None,
    ) -> None:
        self.cfg = cfg
        self.names = names
        self.require = cfg.require if require is None else require
        self.deadline_s = cfg.deadline_s if deadline_s is None else deadline_s
        self.started = time.monotonic() if started is None else started
        self.pid = 0
        self.workloads: tuple[Any, ...] = ()
        self.outcomes: dict[str, WorkloadOutcome] = {}
        self.failures: dict[str, Failure] = {}
        self.fatal: Failure | None = None
        self.fingerprint = ""
        self.timings: dict[str, float] = {}
        self.phase = "starting"
        self.swapping: list[str] = []
        self.timed_out = False
        self.worker_exit = ""

    # -- start ------------------------------------------------------------------------

    def start(self) -> None:
        marker.clear(self.cfg.marker_path)  # last boot's marker must not let a waiter through
        try:
            self.workloads = self.cfg.selected(self.names)
        except TorchwarmError as e:
            self.fatal = Failure.of(e)
            return
        try:
            stores.preload(self.cfg.store)
            self.to_parent, child_out = os.pipe()
            child_in, self.to_child = os.pipe()
            sys.stdout.flush()
            sys.stderr.flush()
            with warnings.catch_warnings():
                # Python 3.12+ warns when a process with threads forks (the Python API may
                # run in one). The worker runs only torchwarm's code, imported before the
                # fork, and the deadline bounds it whatever happens.
                warnings.simplefilter("ignore", DeprecationWarning)
                pid = os.fork()
        except Exception as e:  # noqa: BLE001 - no worker (no memory, no processes): cold
            self.fatal = Failure.of(e)
            return
        if pid == 0:  # the worker
            os.close(self.to_parent)
            os.close(self.to_child)
            _worker(self.cfg, self.workloads, self.require, Channel(child_out, child_in))
        self.pid = pid
        os.close(child_out)
        os.close(child_in)

    # -- finish -----------------------------------------------------------------------

    def finish(self) -> PullReport:
        if self.pid:
            try:
                self._watch()
            except Exception as e:  # noqa: BLE001 - a bug here must not stop the app either
                self.fatal = Failure.of(e)
            finally:
                self._reap()
        report = self._settle()
        _write_marker(self.cfg.marker_path, report)
        return report

    def _watch(self) -> None:
        deadline = self.started + self.deadline_s
        buf = b""
        grace_until: float | None = None
        while True:
            limit = grace_until if grace_until is not None else deadline
            wait = limit - time.monotonic()
            if wait <= 0 or not select.select([self.to_parent], [], [], wait)[0]:
                self.timed_out = True
                return  # _reap kills the worker
            chunk = os.read(self.to_parent, 65536)
            if not chunk:
                return  # the worker exited (done, or died: _reap tells which)
            buf += chunk
            *lines, buf = buf.split(b"\n")
            for line in lines:
                msg = json.loads(line)
                if msg["t"] == "done":
                    return
                if msg["t"] == "commit?":
                    if time.monotonic() >= deadline:
                        self.timed_out = True
                        return  # no swap starts after the deadline
                    self.swapping = msg["workloads"]
                    grace_until = deadline + SWAP_GRACE_S
                    os.write(self.to_child, b"go\n")
                else:
                    self._record(msg)
                    if msg["t"] == "installed" and not set(self.swapping) - set(self.outcomes):
                        self.swapping, grace_until = [], None

    def _record(self, msg: dict[str, Any]) -> None:
        kind = msg["t"]
        if kind == "phase":
            self.phase = msg["phase"]
        elif kind == "fingerprint":
            self.fingerprint = msg["digest"]
            self.timings["fingerprint_s"] = msg["seconds"]
        elif kind == "timing":
            self.timings[msg["name"]] = msg["seconds"]
        elif kind == "installed":
            o = WorkloadOutcome.from_dict(msg["outcome"])
            self.outcomes[o.workload] = o
        elif kind == "failed":
            self.failures[msg["workload"]] = Failure(**msg["failure"])
        elif kind == "fatal":
            self.fatal = Failure(**msg["failure"])

    def _reap(self) -> None:
        """Collect the worker; kill it first if it is still running."""
        for fd in (self.to_parent, self.to_child):
            with contextlib.suppress(OSError):
                os.close(fd)
        pid, status = os.waitpid(self.pid, os.WNOHANG)
        if pid == 0:
            deadline = time.monotonic() + 0.5  # it closed its pipe: let it exit on its own
            while pid == 0 and not self.timed_out and time.monotonic() < deadline:
                time.sleep(0.005)
                pid, status = os.waitpid(self.pid, os.WNOHANG)
        if pid == 0:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGKILL)
            pid, status = os.waitpid(self.pid, 0)
        if os.WIFSIGNALED(status) and not self.timed_out:
            self.worker_exit = f"killed by signal {os.WTERMSIG(status)}"
        elif os.WIFEXITED(status) and os.WEXITSTATUS(status) != 0:
            self.worker_exit = f"exited with status {os.WEXITSTATUS(status)}"

    # -- the one decision ---------------------------------------------------------------

    def _settle(self) -> PullReport:
        """Fail-open or fail-closed, for every workload, in one place."""
        names = [w.name for w in self.workloads]
        failures: dict[str, Failure] = {}
        for name in names:
            if name in self.outcomes:
                continue
            if name in self.failures:
                failures[name] = self.failures[name]
            elif self.fatal is not None:
                failures[name] = self.fatal
            elif self.timed_out:
                during = f" during the swap of {name!r}" if name in self.swapping else ""
                failures[name] = Failure.of(DeadlineExceeded(
                    f"the pull did not finish within its {self.deadline_s:g} s deadline (it "
                    f"was {self.phase}{during}); check the store's reachability or raise "
                    "deadline_s"
                ))  # fmt: skip
            else:
                failures[name] = Failure(
                    "InternalError", 1,
                    f"the pull worker {self.worker_exit or 'stopped'} while {self.phase}",
                )  # fmt: skip
        if self.require and (failures or (self.fatal and not names)):
            first = next(iter(failures.values()), self.fatal)
            assert first is not None
            raise first.error()
        outcomes = [
            self.outcomes.get(n) or WorkloadOutcome(n, "cold", failures[n].message) for n in names
        ]
        reason = self.fatal.message if self.fatal is not None and not names else ""
        report = _report(self.cfg.cache_dir, self.fingerprint, self.cfg.store, outcomes,
                         self.timings, self.started, reason)  # fmt: skip
        report.timed_out = self.timed_out
        report.env = torchenv.expand(self.cfg.env, self.cfg.cache_dir)
        return report


def _worker(cfg: Config, workloads: tuple[Any, ...], require: bool, chan: Channel) -> None:
    """The forked child: die with the supervisor, run the job, never return."""
    code = 0
    try:
        with contextlib.suppress(Exception):
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # the supervisor decides
        PullJob(cfg, workloads, require, chan).run()
    except BaseException:  # noqa: BLE001 - nothing may escape a forked child
        code = 70
    finally:
        with contextlib.suppress(Exception):
            sys.stderr.flush()
        os._exit(code)


def _report(
    cache_dir: Path | None,
    fp: str,
    store: str,
    outcomes: list[WorkloadOutcome],
    timings: dict[str, float],
    started: float,
    reason: str = "",
) -> PullReport:
    timings = {**timings, "total_s": time.monotonic() - started}
    return PullReport(
        overall(outcomes), str(cache_dir or ""), fp, store, outcomes,
        {k: round(v, 3) for k, v in timings.items()},
        datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"), False, reason,
    )  # fmt: skip


def _write_marker(path: Path, report: PullReport) -> None:
    """Write the marker; one that cannot be written is said in the report, never a crash."""
    report.marker = str(path)
    try:
        marker.write(path, report.to_dict())
    except (OSError, TorchwarmError) as e:  # TorchwarmError: a blank $TORCHWARM_BOOT_ID
        report.marker = ""
        report.marker_error = one_line(f"{path}: {getattr(e, 'strerror', None) or e}")
