"""The node gate: run the pull in a worker process under a hard deadline, decide fail-open
or fail-closed in one place (`_settle`), write the ready marker.

Fail-open (the default) means the app starts: whatever happens to the pull short of
SIGKILL of this process (a store that is down or never answers, a full disk, a hostile
object, any exception, a config that does not load, the deadline) ends with the previous
cache tree or the complete new one, never a partial one, a ready marker that says
`cold` and why in one line, and exit 0 (or the exec). With `require` the same conditions
are an error with one line, and nothing is installed. Verification is never relaxed:
fail-open only means the app may start without the cache.

The worker (node/job.py) is a forked child; node/messages.py is what they say. At the
deadline the supervisor kills it, wherever it is stuck (a blocking read in C, a driver
call), unless it has been allowed to start a swap, which then gets a short grace to
reach its rename: the hard bound is deadline + SWAP_GRACE_S. The rename is the commit
point: a workload whose swap happened is warm, whether the worker said so (Installed,
sent right after the rename) or was stopped first (the gate then finds the staged tree
in the cache dir), and whatever became of the cleanup after it.

`_settle` is the decision, a pure function of what the supervisor recorded (`Recorded`).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import select
import signal
import sys
import time
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from torchwarm import config as cfgmod
from torchwarm import stores
from torchwarm.config import Config
from torchwarm.env import torchenv
from torchwarm.errors import (
    DeadlineExceeded,
    InternalError,
    NoCacheForFingerprint,
    RefusedNodePublish,
    TorchwarmError,
    one_line,
)
from torchwarm.node import fetch, install, marker
from torchwarm.node import messages as msgs
from torchwarm.node.job import PullJob
from torchwarm.node.messages import (
    Channel,
    Done,
    Failed,
    Fatal,
    Fingerprinted,
    Go,
    Installed,
    MayCommit,
    Message,
    Phase,
    Timing,
    as_error,
)
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


@dataclass
class Recorded:
    """What the supervisor saw of its worker: the messages, and how the worker ended."""

    names: list[str] = field(default_factory=list)  # the selected workloads, in order
    outcomes: dict[str, WorkloadOutcome] = field(default_factory=dict)  # reported Installed
    failures: dict[str, TorchwarmError] = field(default_factory=dict)  # reported Failed
    fatal: TorchwarmError | None = None  # every workload not yet settled fails with it
    phase: str = "starting"
    swap: MayCommit | None = None  # the last swap the supervisor allowed
    swap_landed: bool = False  # its staged tree is the cache dir, though not all reported
    deadline_passed: bool = False  # stopped waiting at the deadline (or the swap's grace)
    worker_exit: str = ""  # how the worker ended, where the supervisor did not kill it
    fingerprint: str = ""
    timings: dict[str, float] = field(default_factory=dict)

    def record(self, msg: Message) -> None:
        """Keep what one message of the worker says."""
        if isinstance(msg, Phase):
            self.phase = msg.phase
        elif isinstance(msg, Fingerprinted):
            self.fingerprint = msg.digest
            self.timings["fingerprint_s"] = msg.seconds
        elif isinstance(msg, Timing):
            self.timings[msg.name] = msg.seconds
        elif isinstance(msg, Installed):
            self.outcomes[msg.outcome.workload] = msg.outcome
        elif isinstance(msg, Failed):
            self.failures[msg.workload] = msg.error
        elif isinstance(msg, Fatal):
            self.fatal = msg.error
        else:  # Go, or a MayCommit / Done the watch loop did not take
            raise msgs.MessageError(f"the pull worker sent {type(msg).__name__} out of turn")

    def swap_reported(self) -> bool:
        """Whether every workload of the last allowed swap said how it went."""
        done = self.outcomes.keys() | self.failures.keys()
        return self.swap is None or set(self.swap.workloads) <= done


@dataclass(frozen=True)
class Settled:
    """The decision: one outcome per workload, or (fail-closed) the error to raise."""

    outcomes: list[WorkloadOutcome]
    reason: str  # why nothing was tried (no workload), else ""
    timed_out: bool  # some workload was stopped by the deadline
    error: TorchwarmError | None  # fail-closed: raise this (nothing was installed)


def _settle(rec: Recorded, require: bool, deadline_s: float) -> Settled:
    """Fail-open or fail-closed, for every workload, in one place: a workload whose swap
    happened is warm; any other fails with its own error, else the pull's fatal one, else
    the deadline, else how the worker died."""
    installed = dict(rec.outcomes)
    if rec.swap is not None and rec.swap_landed:
        installed = {o.workload: o for o in rec.swap.outcomes} | installed
    failures: dict[str, TorchwarmError] = {}
    timed_out = False
    for name in rec.names:
        if name in installed:
            continue
        if name in rec.failures:
            failures[name] = rec.failures[name]
        elif rec.fatal is not None:
            failures[name] = rec.fatal
        elif rec.deadline_passed:
            timed_out = True
            swapping = rec.swap is not None and name in rec.swap.workloads
            during = f" during the swap of {name!r}" if swapping else ""
            failures[name] = DeadlineExceeded(
                f"the pull did not finish within its {deadline_s:g} s deadline (it was "
                f"{rec.phase}{during}); check the store's reachability or raise deadline_s"
            )  # fmt: skip
        else:
            failures[name] = InternalError(
                f"the pull worker {rec.worker_exit or 'stopped'} while {rec.phase}"
            )
    error = None
    if require and (failures or (rec.fatal is not None and not rec.names)):
        error = next(iter(failures.values()), rec.fatal)
    outcomes = [installed.get(n) or _cold(n, failures[n]) for n in rec.names]
    reason = one_line(str(rec.fatal)) if rec.fatal is not None and not rec.names else ""
    return Settled(outcomes, reason, timed_out, error)


def _cold(name: str, e: TorchwarmError) -> WorkloadOutcome:
    """A workload that starts cold because of `e`, with what a node publish needs of it."""
    refused = getattr(e, "serial", None) if isinstance(e, RefusedNodePublish) else None
    return WorkloadOutcome(name, "cold", one_line(str(e)),
                           no_cache=isinstance(e, NoCacheForFingerprint),
                           refused_node=refused if isinstance(refused, int) else None)  # fmt: skip


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
        self.rec = Recorded()

    # -- start ------------------------------------------------------------------------

    def start(self) -> None:
        marker.clear(self.cfg.marker_path)  # last boot's marker must not let a waiter through
        try:
            self.workloads = self.cfg.selected(self.names)
        except TorchwarmError as e:
            self.rec.fatal = e
            return
        self.rec.names = [w.name for w in self.workloads]
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
            self.rec.fatal = as_error(e)
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
            except Exception as e:  # noqa: BLE001 - a broken message, or a bug here: cold
                self.rec.fatal = as_error(e)
            finally:
                self._reap()
                self._find_landed_swap()
                if self.rec.deadline_passed or self.rec.worker_exit:
                    _tidy_in_background(self.cfg.cache_dir)
        settled = _settle(self.rec, self.require, self.deadline_s)
        if settled.error is not None:
            raise settled.error
        rec = self.rec
        report = _report(self.cfg.cache_dir, rec.fingerprint, self.cfg.store, settled.outcomes,
                         rec.timings, self.started, settled.reason)  # fmt: skip
        report.timed_out = settled.timed_out
        report.env = torchenv.expand(self.cfg.env, self.cfg.cache_dir)
        _write_marker(self.cfg.marker_path, report)
        return report

    def _watch(self) -> None:
        rec = self.rec
        deadline = self.started + self.deadline_s
        lines = msgs.Lines()
        grace_until: float | None = None
        while True:
            limit = grace_until if grace_until is not None else deadline
            wait = limit - time.monotonic()
            if wait <= 0 or not select.select([self.to_parent], [], [], wait)[0]:
                rec.deadline_passed = True
                return  # _reap kills the worker
            chunk = os.read(self.to_parent, 65536)
            if not chunk:
                return  # the worker exited (done, or died: _reap tells which)
            for msg in lines.feed(chunk):
                if isinstance(msg, Done):
                    return
                if isinstance(msg, MayCommit):
                    if time.monotonic() >= deadline:
                        rec.deadline_passed = True
                        return  # no swap starts after the deadline
                    rec.swap = msg
                    grace_until = deadline + SWAP_GRACE_S
                    with contextlib.suppress(BrokenPipeError):  # it died: EOF says so next
                        msgs.write(self.to_child, Go())
                    continue
                rec.record(msg)
                if grace_until is not None and rec.swap_reported():
                    grace_until = None  # the grace covers the swap, not what comes after

    def _reap(self) -> None:
        """Collect the worker; kill it first if it is still running."""
        for fd in (self.to_parent, self.to_child):
            with contextlib.suppress(OSError):
                os.close(fd)
        pid, status = os.waitpid(self.pid, os.WNOHANG)
        if pid == 0:
            deadline = time.monotonic() + 0.5  # it closed its pipe: let it exit on its own
            while pid == 0 and not self.rec.deadline_passed and time.monotonic() < deadline:
                time.sleep(0.005)
                pid, status = os.waitpid(self.pid, os.WNOHANG)
        if pid == 0:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGKILL)
            pid, status = os.waitpid(self.pid, 0)
        if os.WIFSIGNALED(status) and not self.rec.deadline_passed:
            self.rec.worker_exit = f"killed by signal {os.WTERMSIG(status)}"
        elif os.WIFEXITED(status) and os.WEXITSTATUS(status) != 0:
            self.rec.worker_exit = f"exited with status {os.WEXITSTATUS(status)}"

    def _find_landed_swap(self) -> None:
        """With the worker gone: whether the swap it was allowed, and did not report,
        happened (the cache dir is the staged tree, which the rename keeps)."""
        rec = self.rec
        if rec.swap is None or set(rec.swap.workloads) <= rec.outcomes.keys():
            return
        with contextlib.suppress(OSError):
            st = os.stat(self.cfg.cache_dir)
            rec.swap_landed = (st.st_dev, st.st_ino) == rec.swap.staged


def _tidy_in_background(cache_dir: Path) -> None:
    """Delete what a stopped worker left in the workdir (a staging tree can be a GB that a
    bomb unpacked until the deadline) in a detached process, so that the app does not
    wait for it: the next pull would, but until then the volume holds it. The process
    does what the next pull's lock does first (install.tidy), and nothing if a pull holds
    the lock (which has done it)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # see Supervisor.start
            pid = os.fork()
    except OSError:
        return  # no process to spare: the next pull deletes it
    if pid:
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, 0)  # the middle process, which exits at once
        return
    try:  # the middle process: a grandchild outlives it, owned by no one's wait()
        os.setsid()
        if os.fork() == 0:
            devnull = os.open(os.devnull, os.O_RDWR)
            for fd in (0, 1, 2):
                os.dup2(devnull, fd)  # hold no pipe of the caller's open
            os.closerange(3, os.sysconf("SC_OPEN_MAX"))
            install.tidy(cache_dir)
    except BaseException:  # noqa: BLE001, S110 - best effort; nothing may escape a fork
        pass
    finally:
        os._exit(0)


def _worker(cfg: Config, workloads: tuple[Any, ...], require: bool, chan: Channel) -> None:
    """The forked child: die with the supervisor, run the job, never return."""
    code = 0
    try:
        with contextlib.suppress(Exception):
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # the supervisor decides
        fetch.bound_memory()
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
