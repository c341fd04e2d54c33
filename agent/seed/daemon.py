"""`torchwarm daemon`: keep the store warm for every workload in a YAML file.

Each pass, for each workload: compute its warm-up key (config, model source or a
command's code files, format, fingerprint: warmup.warmup_key); if the store's manifest
for (workload, fingerprint) carries that key, skip it (no compile, no upload); otherwise
warm up in a fresh subprocess (killed past its warmup_timeout_s), capture, publish. A
skipped workload's manifest older than daemon.refresh_s is touched, so gc sees the
environment as live.
Any exception in a workload is an event and a backoff for that workload (60 s doubling
to daemon.backoff_max_s) and does not stop the others; one outside the workloads
(fingerprint, store, workload list) fails the pass, which is retried with the same backoff.
`--once` raises what failed, for the CLI to map to an exit code.

Passes repeat every daemon.interval_s (± jitter); `--once` runs one pass (Kubernetes
Job/CronJob). The config is reloaded when its file changes or on SIGHUP (a broken
edit is reported and the previous config kept). SIGTERM stops the daemon: a running
warm-up is terminated, a publish that has not written its manifest is abandoned
(its blobs stay for gc; no manifest ever names a missing blob), and the process exits
0 within a few seconds even if an upload is stuck.

Events are JSON lines on stdout; /metrics and /healthz are served when daemon.listen
(or --listen) is set. /healthz answers 503 when one step of a pass (the pass's set-up,
a workload's check, warm-up, capture or publish) has run past its timeout.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import signal
import sys
import tempfile
import threading
import time
import traceback
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torchwarm import config as cfgmod
from torchwarm.config import Workload
from torchwarm.env import fingerprint
from torchwarm.errors import (
    Cancelled,
    IntegrityError,
    ObjectNotFound,
    TorchwarmError,
    WorkloadsFailed,
)
from torchwarm.seed import warmup
from torchwarm.seed.publish import is_current, publish_warmup
from torchwarm.spec import keys
from torchwarm.spec import manifest as mf
from torchwarm.util import httpd

BACKOFF_START_S = 60.0
STOP_GRACE_S = 8.0  # after SIGTERM, how long a stuck upload may hold the exit
# How far past its timeout a step may run before /healthz calls it stuck: a timed-out
# warm-up is killed at its timeout, and the kill takes well under this.
STUCK_MARGIN_S = 10.0


def emit(event: str, **fields: Any) -> None:
    """One JSON log line per event."""
    doc = {"ts": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "event": event, **fields}
    print(json.dumps(doc, sort_keys=True, default=str), flush=True)


@dataclass(frozen=True)
class Step:
    """What the worker is doing now, for /healthz."""

    what: str  # e.g. "workload 'mlp': warm-up"
    since: float  # time.monotonic()
    limit_s: float  # the timeout that bounds it


class Daemon:
    def __init__(self, config_path: str, overrides: dict[str, Any], workload: str | None) -> None:
        self.config_path = config_path
        self.overrides = overrides
        self.only = workload
        self.cfg = cfgmod.load(config_path, overrides)
        self.mtime = _mtime(config_path)
        self.stop = threading.Event()
        self.reload = threading.Event()
        self.fields: dict[str, Any] = {}
        self.failures: dict[str, int] = defaultdict(int)
        self.retry_at: dict[str, float] = {}
        self.m: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
        self.passes = 0
        self.pass_failures = 0  # consecutive passes that failed outside any workload
        self.pass_failures_total = 0
        self.failed_this_pass: list[str] = []
        self.pass_error: Exception | None = None  # the last pass's error outside workloads
        self.fatal: Exception | None = None  # a bug in the loop itself
        self.step: Step | None = None
        self.workdir: Path | None = None  # warm-up folders; a failed one keeps its log

    # -- the loop -----------------------------------------------------------------------

    def run(self, once: bool, listen: str | None) -> int:
        """Pass after pass until SIGTERM, or one pass with `once`; return 0.

        With `once`, what failed is raised for the CLI to map to an exit code: an error
        outside any workload as it is, WorkloadsFailed when a workload failed.
        """
        listen = listen or self.cfg.daemon.listen
        server = None
        if listen:
            server = httpd.serve(listen, {"/metrics": self.metrics, "/healthz": self.healthz})
            emit("listening", address=f"{server.server_address[0]}:{server.server_address[1]}")
        handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT,
                                                           signal.SIGHUP)}  # fmt: skip
        signal.signal(signal.SIGTERM, lambda *_: self.stop.set())
        signal.signal(signal.SIGINT, lambda *_: self.stop.set())
        signal.signal(signal.SIGHUP, lambda *_: self.reload.set())
        worker = threading.Thread(target=self._loop, args=(once,), name="torchwarm-daemon",
                                  daemon=True)  # fmt: skip
        try:
            worker.start()
            while worker.is_alive() and not self.stop.is_set():
                worker.join(0.2)
            if worker.is_alive():
                emit("stopping", grace_s=STOP_GRACE_S)
                worker.join(STOP_GRACE_S)
        finally:
            for sig, handler in handlers.items():
                signal.signal(sig, handler)
        if server is not None:
            server.shutdown()
        emit("stopped", passes=self.passes, abandoned=worker.is_alive())
        if worker.is_alive():
            sys.stdout.flush()
            os._exit(0)  # an upload is stuck: its publish never writes a manifest
        if self.workdir is not None:
            with contextlib.suppress(OSError):
                self.workdir.rmdir()  # kept when a failed warm-up's log is in it
        if self.fatal is not None:
            raise self.fatal
        if once and self.pass_error is not None:
            raise self.pass_error
        if once and self.failed_this_pass:  # a Job or CronJob must see it
            raise WorkloadsFailed(
                f"daemon --once: {len(self.failed_this_pass)} workload(s) failed: "
                f"{', '.join(self.failed_this_pass)}; see their warmup_failed events"
            )
        return 0

    def _loop(self, once: bool) -> None:
        try:
            self._passes(once)
        except Exception as e:  # noqa: BLE001 - a bug in the loop: report it, end the process
            _print_traceback(e)
            emit("fatal", error=_describe(e), error_type=type(e).__name__)
            self.fatal = e

    def _passes(self, once: bool) -> None:
        while not self.stop.is_set():
            self._maybe_reload()
            self.pass_once()
            if once:
                return
            d = self.cfg.daemon
            if self.pass_error is not None:
                wait = self._backoff(self.pass_failures)
            else:
                wait = d.interval_s * (1 + random.uniform(-d.jitter, d.jitter))
            deadline = time.monotonic() + wait
            while time.monotonic() < deadline and not self.stop.is_set():
                if self.reload.wait(1.0) or _mtime(self.config_path) != self.mtime:
                    break

    def _maybe_reload(self) -> None:
        if not self.reload.is_set() and _mtime(self.config_path) == self.mtime:
            return
        self.reload.clear()
        self.mtime = _mtime(self.config_path)
        try:
            self.cfg = cfgmod.load(self.config_path, self.overrides)
            emit("config_reloaded", workloads=[w.name for w in self.cfg.workloads])
        except Exception as e:  # noqa: BLE001 - any failure keeps the previous config
            emit("config_invalid", error=_describe(e), action="keeping the previous config")

    # -- one pass -----------------------------------------------------------------------

    def pass_once(self) -> None:
        t0 = time.monotonic()
        self.failed_this_pass = []
        self.pass_error = None
        try:
            self._begin("pass: fingerprint, store, workload list", self.cfg.warmup_timeout_s)
            if not self.fields:  # the environment does not change under a running process
                self.fields = fingerprint.collect()
            store = self.cfg.open_store()
            workloads = self.cfg.selected(self.only)
        except Exception as e:  # noqa: BLE001 - any error fails the pass, never the loop
            self._pass_failed(e)
            workloads = ()
        else:
            self.pass_failures = 0
        for w in workloads:
            if self.stop.is_set():
                break
            if time.time() < self.retry_at.get(w.name, 0.0):
                emit("backing_off", workload=w.name, until=self.retry_at[w.name])
                continue
            try:
                self._ensure(store, w)
                self.failures[w.name] = 0
                self.retry_at.pop(w.name, None)
            except Cancelled:
                emit("cancelled", workload=w.name)
                break
            except Exception as e:  # noqa: BLE001 - one workload's failure, whatever it is
                self._workload_failed(w, e)
        self.step = None
        self.passes += 1
        emit("pass_finished", seconds=round(time.monotonic() - t0, 3))

    def _pass_failed(self, e: Exception) -> None:
        _print_traceback(e)
        self.pass_error = e
        self.pass_failures += 1
        self.pass_failures_total += 1
        delay = self._backoff(self.pass_failures)
        emit("pass_failed", error=_describe(e), error_type=type(e).__name__, retry_in_s=delay)

    def _workload_failed(self, w: Workload, e: Exception) -> None:
        _print_traceback(e)
        self.failures[w.name] += 1
        delay = self._backoff(self.failures[w.name])
        self.retry_at[w.name] = time.time() + delay
        self.m[w.name]["failures_total"] += 1
        self.failed_this_pass.append(w.name)
        emit("warmup_failed", workload=w.name, error=_describe(e), error_type=type(e).__name__,
             retry_in_s=delay)  # fmt: skip

    def _backoff(self, failures: int) -> float:
        """60 s after the first failure, doubling, capped at daemon.backoff_max_s."""
        return min(BACKOFF_START_S * 2 ** (failures - 1), self.cfg.daemon.backoff_max_s)

    def _begin(self, what: str, limit_s: float) -> None:
        self.step = Step(what, time.monotonic(), limit_s)

    def _ensure(self, store: Any, w: Workload) -> None:
        step = f"workload {w.name!r}"
        self._begin(f"{step}: checking the store", w.warmup_timeout_s)
        fp = fingerprint.digest(self.fields)
        key = warmup.warmup_key(w, self.cfg.format, fp, self.cfg.env, cache_dir=self.cfg.cache_dir)
        manifest_key = keys.manifest_key(w.name, fp)
        existing = _read_manifest(store, manifest_key)
        # Skip only a current, complete manifest: a missing blob (lost to an operator or a
        # gc race) is healed by warming up and publishing again.
        if (
            existing is not None
            and is_current(existing, key, self.cfg.signing_key)
            and all(store.exists(keys.blob_key(b.sha256)) for b in existing.blobs)
        ):
            self._refresh(store, manifest_key, w)
            self.m[w.name]["skipped_total"] += 1
            emit("skipped_present", workload=w.name, fingerprint=fp)
            return
        emit("warmup_started", workload=w.name, fingerprint=fp)
        self._begin(f"{step}: warm-up", w.warmup_timeout_s)
        t0 = time.monotonic()
        if self.workdir is None:
            self.workdir = Path(tempfile.mkdtemp(prefix="torchwarm-daemon-"))
        out = self.workdir / w.name  # a failed warm-up leaves its log here, until the next try
        result = warmup.warmup(self.cfg, w, out, stop=self.stop,
                               on_capture=lambda: self._begin(f"{step}: capture",
                                                              w.warmup_timeout_s))  # fmt: skip
        seconds = time.monotonic() - t0
        c = result.summary.get("counters") or {}  # a command may report none: null, not 0
        emit("warmup_finished", workload=w.name, seconds=round(seconds, 3),
             hits=c.get("fxgraph_cache_hit"), misses=c.get("fxgraph_cache_miss"))  # fmt: skip
        if fingerprint.digest(result.fingerprint) != fp:
            emit("fingerprint_mismatch", workload=w.name, daemon=fp,
                 warmup=fingerprint.digest(result.fingerprint),
                 differs=fingerprint.differences(self.fields, result.fingerprint))  # fmt: skip
        self._begin(f"{step}: publish", w.warmup_timeout_s)
        try:
            rep = publish_warmup(store, result, self.cfg.signing_key, self.stop.is_set)
        finally:
            shutil.rmtree(out, ignore_errors=True)
        stats = self.m[w.name]
        stats["warmups_total"] += 1
        stats["warmup_seconds"] = seconds
        stats["bytes_pushed_total"] += rep.bytes_uploaded
        stats["last_success_timestamp_seconds"] = time.time()
        emit("published", workload=w.name, manifest=rep.manifest_key, outcome=rep.outcome,
             bytes_pushed=rep.bytes_uploaded, blobs_uploaded=rep.blobs_uploaded,
             blobs_present=rep.blobs_present)  # fmt: skip

    def _refresh(self, store: Any, key: str, w: Workload) -> None:
        """Keep a live environment young for gc: touch its manifest (modified time only; the
        signed bytes stay) once the store says it is older than daemon.refresh_s. A manifest
        touched within that period is left alone, so passes in a row write nothing."""
        info = next((o for o in store.list(key) if o.key == key), None)
        if info is None:
            return  # deleted since it was read: the next pass publishes it again
        age = time.time() - info.modified
        if age < self.cfg.daemon.refresh_s:
            return
        try:
            store.touch(key)
        except ObjectNotFound:
            return
        self.m[w.name]["refreshed_total"] += 1
        emit("manifest_refreshed", workload=w.name, manifest=key, age_s=round(age))

    # -- HTTP -----------------------------------------------------------------------------

    def healthz(self) -> httpd.Response:
        reason = self.stuck()
        if reason:
            return 503, httpd.TEXT, f"{reason}\n".encode()
        return 200, httpd.TEXT, b"ok\n"

    def stuck(self) -> str | None:
        """Why the daemon is unhealthy (a step running past its timeout), or None."""
        step = self.step
        if step is None:
            return None
        ran = time.monotonic() - step.since
        if ran <= step.limit_s + STUCK_MARGIN_S:
            return None
        return (
            f"stuck: {step.what} has run {ran:.0f} s, past its {step.limit_s:g} s timeout "
            "(warmup_timeout_s)"
        )

    def metrics(self) -> httpd.Response:
        families = [
            ("warmups_total", "counter", "warm-ups that compiled and published"),
            ("failures_total", "counter", "warm-ups or publishes that failed"),
            ("skipped_total", "counter", "workloads skipped: the store already held them"),
            ("refreshed_total", "counter", "skipped workloads whose manifest was touched"),
            ("bytes_pushed_total", "counter", "blob bytes uploaded"),
            ("warmup_seconds", "gauge", "seconds the last warm-up and capture took"),
            ("last_success_timestamp_seconds", "gauge", "when the workload was last published"),
        ]
        names = sorted(w.name for w in self.cfg.workloads)
        text = httpd.metric("torchwarm_daemon_passes_total", "counter", "passes finished",
                            [({}, float(self.passes))])  # fmt: skip
        text += httpd.metric("torchwarm_daemon_pass_failures_total", "counter",
                             "passes that failed outside any workload",
                             [({}, float(self.pass_failures_total))])  # fmt: skip
        for name, kind, help in families:
            samples = [({"workload": w}, self.m[w][name]) for w in names]
            text += httpd.metric(f"torchwarm_daemon_{name}", kind, help, samples)
        return 200, httpd.PROMETHEUS, text.encode()


def _read_manifest(store: Any, key: str) -> mf.Manifest | None:
    try:
        return mf.parse(store.read(key, mf.MAX_MANIFEST_BYTES).data, key)
    except ObjectNotFound:
        return None
    except IntegrityError as e:  # malformed or oversized
        emit("manifest_unreadable", key=key, error=str(e), action="warming up again")
        return None


def _describe(e: BaseException) -> str:
    """One line for an event: torchwarm's own message, or the type of an unexpected error."""
    if isinstance(e, TorchwarmError):
        return str(e)
    return f"internal error: {type(e).__name__}: {e} (traceback on stderr)"


def _print_traceback(e: BaseException) -> None:
    """Unexpected errors get their traceback on stderr (events stay one line, on stdout)."""
    if not isinstance(e, TorchwarmError):
        traceback.print_exception(e, file=sys.stderr)


def _mtime(path: str) -> float:
    try:
        return os.stat(path).st_mtime
    except OSError:
        return 0.0
