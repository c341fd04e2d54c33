"""`torchwarm daemon`: keep the store warm for every workload in a YAML file.

Each pass, for each workload: compute its warm-up key (config, model source, format,
fingerprint: warmup.warmup_key); if the store's manifest for (workload, fingerprint)
carries that key, skip it (no compile, no upload); otherwise warm up in a fresh
subprocess, capture, publish. A failing workload backs off on its own (60 s doubling
to daemon.backoff_max_s) and does not stop the others.

Passes repeat every daemon.interval_s (± jitter); `--once` runs one pass (Kubernetes
Job/CronJob). The config is reloaded when its file changes or on SIGHUP (a broken
edit is reported and the previous config kept). SIGTERM stops the daemon: a running
warm-up is terminated, a publish that has not written its manifest is abandoned
(its blobs stay for gc; no manifest ever names a missing blob), and the process exits
0 within a few seconds even if an upload is stuck.

Events are JSON lines on stdout; /metrics and /healthz are served when daemon.listen
(or --listen) is set.
"""

from __future__ import annotations

import json
import os
import random
import signal
import sys
import tempfile
import threading
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

from . import config as cfgmod
from . import fingerprint, httpd, keys, torchenv, warmup
from . import manifest as mf
from .config import Workload
from .errors import Cancelled, IntegrityError, ObjectNotFound, TorchwarmError, WarmupError
from .publish import is_current, publish_warmup

BACKOFF_START_S = 60.0
STOP_GRACE_S = 8.0  # after SIGTERM, how long a stuck upload may hold the exit


def emit(event: str, **fields: Any) -> None:
    """One JSON log line per event."""
    doc = {"ts": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "event": event, **fields}
    print(json.dumps(doc, sort_keys=True, default=str), flush=True)


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
        self.failed_this_pass: list[str] = []
        self.exit_code = 0

    # -- the loop -----------------------------------------------------------------------

    def run(self, once: bool, listen: str | None) -> int:
        listen = listen or self.cfg.daemon.listen
        server = None
        if listen:
            server = httpd.serve(listen, {"/metrics": self.metrics, "/healthz": self.healthz})
            emit("listening", address=f"{server.server_address[0]}:{server.server_address[1]}")
        signal.signal(signal.SIGTERM, lambda *_: self.stop.set())
        signal.signal(signal.SIGINT, lambda *_: self.stop.set())
        signal.signal(signal.SIGHUP, lambda *_: self.reload.set())
        worker = threading.Thread(target=self._loop, args=(once,), name="torchwarm-daemon",
                                  daemon=True)  # fmt: skip
        worker.start()
        while worker.is_alive() and not self.stop.is_set():
            worker.join(0.2)
        if worker.is_alive():
            emit("stopping", grace_s=STOP_GRACE_S)
            worker.join(STOP_GRACE_S)
        if server is not None:
            server.shutdown()
        emit("stopped", passes=self.passes, abandoned=worker.is_alive())
        if worker.is_alive():
            sys.stdout.flush()
            os._exit(0)  # an upload is stuck: its publish never writes a manifest
        return self.exit_code

    def _loop(self, once: bool) -> None:
        try:
            self._passes(once)
        except TorchwarmError as e:
            emit("fatal", error=str(e))
            self.exit_code = e.exit_code

    def _passes(self, once: bool) -> None:
        while not self.stop.is_set():
            self._maybe_reload()
            self.pass_once()
            if once:
                if self.failed_this_pass:  # a Job or CronJob must see it
                    self.exit_code = WarmupError.exit_code
                return
            d = self.cfg.daemon
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
        except TorchwarmError as e:
            emit("config_invalid", error=str(e), action="keeping the previous config")

    # -- one pass -----------------------------------------------------------------------

    def pass_once(self) -> None:
        t0 = time.monotonic()
        self.failed_this_pass = []
        if not self.fields:  # the environment does not change under a running process
            self.fields = fingerprint.collect(scratch=torchenv.probe_scratch())
        store = self.cfg.open_store()
        for w in self.cfg.selected(self.only):
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
            except TorchwarmError as e:
                self.failures[w.name] += 1
                delay = min(BACKOFF_START_S * 2 ** (self.failures[w.name] - 1),
                            self.cfg.daemon.backoff_max_s)  # fmt: skip
                self.retry_at[w.name] = time.time() + delay
                self.m[w.name]["failures_total"] += 1
                self.failed_this_pass.append(w.name)
                emit("warmup_failed", workload=w.name, error=str(e), retry_in_s=delay)
        self.passes += 1
        emit("pass_finished", seconds=round(time.monotonic() - t0, 3))

    def _ensure(self, store: Any, w: Workload) -> None:
        fp = fingerprint.digest(self.fields)
        key = warmup.warmup_key(w, self.cfg.format, fp)
        existing = _read_manifest(store, keys.manifest_key(w.name, fp))
        # Skip only a current, complete manifest: a missing blob (lost to an operator or a
        # gc race) is healed by warming up and publishing again.
        if (
            existing is not None
            and is_current(existing, key, self.cfg.signing_key)
            and all(store.exists(keys.blob_key(b.sha256)) for b in existing.blobs)
        ):
            self.m[w.name]["skipped_total"] += 1
            emit("skipped_present", workload=w.name, fingerprint=fp)
            return
        emit("warmup_started", workload=w.name, fingerprint=fp)
        t0 = time.monotonic()
        with tempfile.TemporaryDirectory(prefix="torchwarm-daemon-") as tmp:
            result = warmup.warmup(self.cfg, w, Path(tmp) / w.name, stop=self.stop)
            seconds = time.monotonic() - t0
            c = result.summary["counters"]
            emit("warmup_finished", workload=w.name, seconds=round(seconds, 3),
                 hits=c["fxgraph_cache_hit"], misses=c["fxgraph_cache_miss"])  # fmt: skip
            if fingerprint.digest(result.fingerprint) != fp:
                emit("fingerprint_mismatch", workload=w.name, daemon=fp,
                     warmup=fingerprint.digest(result.fingerprint),
                     differs=fingerprint.differences(self.fields, result.fingerprint))  # fmt: skip
            rep = publish_warmup(store, result, self.cfg.signing_key, self.stop.is_set)
        stats = self.m[w.name]
        stats["warmups_total"] += 1
        stats["warmup_seconds"] = seconds
        stats["bytes_pushed_total"] += rep.bytes_uploaded
        stats["last_success_timestamp_seconds"] = time.time()
        emit("published", workload=w.name, manifest=rep.manifest_key, outcome=rep.outcome,
             bytes_pushed=rep.bytes_uploaded, blobs_uploaded=rep.blobs_uploaded,
             blobs_present=rep.blobs_present)  # fmt: skip

    # -- HTTP -----------------------------------------------------------------------------

    def healthz(self) -> httpd.Response:
        return 200, httpd.TEXT, b"ok\n"

    def metrics(self) -> httpd.Response:
        families = [
            ("warmups_total", "counter", "warm-ups that compiled and published"),
            ("failures_total", "counter", "warm-ups or publishes that failed"),
            ("skipped_total", "counter", "workloads skipped: the store already held them"),
            ("bytes_pushed_total", "counter", "blob bytes uploaded"),
            ("warmup_seconds", "gauge", "seconds the last warm-up and capture took"),
            ("last_success_timestamp_seconds", "gauge", "when the workload was last published"),
        ]
        names = sorted(w.name for w in self.cfg.workloads)
        text = httpd.metric("torchwarm_daemon_passes_total", "counter", "passes finished",
                            [({}, float(self.passes))])  # fmt: skip
        for name, kind, help in families:
            samples = [({"workload": w}, self.m[w][name]) for w in names]
            text += httpd.metric(f"torchwarm_daemon_{name}", kind, help, samples)
        return 200, httpd.PROMETHEUS, text.encode()


def _read_manifest(store: Any, key: str) -> mf.Manifest | None:
    try:
        return mf.parse(store.read(key, mf.MAX_MANIFEST_BYTES), key)
    except ObjectNotFound:
        return None
    except IntegrityError as e:  # malformed or oversized
        emit("manifest_unreadable", key=key, error=str(e), action="warming up again")
        return None


def _mtime(path: str) -> float:
    try:
        return os.stat(path).st_mtime
    except OSError:
        return 0.0
