"""`torchwarm serve`: the node agent as a Kubernetes native sidecar.

It starts listening at once, pulls in the background, and answers /readyz with 503
until the pull has installed the cache (or decided, fail-open, to start cold) and 200
from then on. A startupProbe on /readyz holds the main container until then. With
`require`, a failed pull keeps /readyz at 503 and exits non-zero, so the kubelet
restarts the sidecar and tries again. After the pull it keeps serving /healthz and
/metrics until SIGTERM, and watches the cache dir for entries the app compiles that the
warm-up did not cover (misses.py): counted on /metrics, one log line per kind.

SIGTERM during the pull (a pod deleted while it starts up) kills the pull's worker at
once, wherever it is stuck, instead of waiting for the pull's deadline. The gate then
finds the cache dir as after any stopped worker: the previous tree or the complete new
one, never a partial one; what the worker left in the workdir (its downloads, a staging
tree) is deleted by a detached process, or by the next pull, which also takes the
install lock the dead worker can no longer hold. No ready marker is left, and `serve`
exits 0.

The endpoint is one thread (util/httpd.py). Where not even that can be started (a full
pids cgroup), `serve` fails open as `pull` does: the main thread finishes the pull, then
serves, so probes queued on the socket meanwhile get /readyz 200 once it is done.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
import time
from collections.abc import Mapping
from typing import Any

from torchwarm.errors import TorchwarmError, one_line, printable
from torchwarm.node import gate as node
from torchwarm.node import marker, misses, selfseed
from torchwarm.node.report import PullReport, describe
from torchwarm.util import httpd


class Sidecar:
    def __init__(self) -> None:
        self.report: PullReport | None = None
        self.error: TorchwarmError | None = None
        self.watcher: misses.Watcher | None = None
        self.seeder: selfseed.Seeder | None = None
        self.started = time.time()

    def readyz(self) -> httpd.Response:
        if self.report is None:
            why = f"failed: {self.error}" if self.error else "pulling"
            return 503, httpd.TEXT, f"not ready: {printable(why)}\n".encode()
        return 200, httpd.TEXT, f"ready: {self.report.status}\n".encode()

    def healthz(self) -> httpd.Response:
        return 200, httpd.TEXT, b"ok\n"

    def metrics(self) -> httpd.Response:
        r = self.report
        warm: list[tuple[dict[str, str], float]] = []
        nbytes = 0.0
        if r is not None:
            warm = [({"workload": o.workload}, float(o.status == "warm")) for o in r.workloads]
            nbytes = float(sum(o.bytes for o in r.workloads))
        text = "".join(
            [
                httpd.metric("torchwarm_ready", "gauge", "1 once the pull has finished",
                             [({}, float(r is not None))]),
                httpd.metric("torchwarm_pull_failed", "gauge", "1 if a fail-closed pull failed",
                             [({}, float(self.error is not None))]),
                httpd.metric("torchwarm_workload_warm", "gauge",
                             "1 if the workload's cache was installed, 0 if it starts cold", warm),
                httpd.metric("torchwarm_pull_bytes", "gauge", "bytes of verified cache installed",
                             [({}, nbytes)]),
                httpd.metric("torchwarm_pull_seconds", "gauge", "seconds the pull took",
                             [({}, r.timings.get("total_s", 0.0) if r else 0.0)]),
                httpd.metric("torchwarm_start_time_seconds", "gauge", "when the agent started",
                             [({}, self.started)]),
                self._miss_metrics(),
                self._publish_metrics(),
            ]
        )  # fmt: skip
        return 200, httpd.PROMETHEUS, text.encode()

    def _publish_metrics(self) -> str:
        s = self.seeder
        counts = s.counts if s is not None else dict.fromkeys(selfseed.OUTCOMES, 0)
        return httpd.metric("torchwarm_publish_total", "counter",
                            "node publishes of the app's cache dir (serve --publish), by "
                            "outcome: published, skipped (another manifest was there, or "
                            "nothing to publish), failed",
                            [({"outcome": k}, float(n)) for k, n in counts.items()])  # fmt: skip

    def _miss_metrics(self) -> str:
        w = self.watcher
        counts, scans, scan_s, up = w.snapshot() if w else ({}, 0, 0.0, False)
        return "".join(
            [
                httpd.metric("torchwarm_cache_misses_total", "counter",
                             "compile entries the app wrote into the cache dir after the pull, "
                             "by kind: each one a compile the warm-up did not cover",
                             [({"kind": k}, float(n)) for k, n in counts.items()]),
                httpd.metric("torchwarm_miss_watch_up", "gauge",
                             "1 while the cache dir is watched for misses", [({}, float(up))]),
                httpd.metric("torchwarm_miss_scans_total", "counter",
                             "scans of the cache dir for misses", [({}, float(scans))]),
                httpd.metric("torchwarm_miss_scan_seconds", "gauge",
                             "how long the last scan of the cache dir took", [({}, scan_s)]),
            ]
        )  # fmt: skip


def serve(
    config_path: str,
    overrides: Mapping[str, Any],
    listen: str,
    names: str | None,
    require: bool | None,
    started: float | None = None,
) -> int:
    """Pull in a worker, serve probes, then keep serving until SIGTERM. The exit code."""
    state = Sidecar()
    stop = threading.Event()
    worker = _Worker()
    server: httpd.Server | None = None
    threaded = True

    def on_sigterm(*_: object) -> None:
        stop.set()
        worker.kill()  # a pull still running: stop it now, not at its deadline
        if not threaded and server is not None:
            server.shutdown()  # the loop runs on this thread: it ends after this handler

    # Before the fork and the endpoint: a SIGTERM at any time from here on ends in exit 0.
    signal.signal(signal.SIGTERM, on_sigterm)
    # The worker is forked before the HTTP thread starts (fork copies only this thread).
    begun = node.begin(config_path, overrides, names, require, started=started)
    if isinstance(begun, node.Supervisor):
        worker.track(begun.pid)
        if stop.is_set():
            worker.kill()  # SIGTERM came while the worker was being forked
    server = httpd.bind(
        listen, {"/readyz": state.readyz, "/healthz": state.healthz, "/metrics": state.metrics}
    )
    threaded = _start(server)
    report: PullReport | None = None
    try:
        report = begun if isinstance(begun, PullReport) else begun.finish()
    except TorchwarmError as e:
        if not worker.killed:  # killed: the error only says so (fail-closed)
            state.error = e
            server.shutdown()
            raise
    finally:
        worker.forget()
    if worker.killed and isinstance(begun, node.Supervisor):
        _stopped(begun)
        server.shutdown()
        return 0
    assert report is not None  # not killed: the pull returned its report, or raised
    for line in describe(report):
        print(line, flush=True)
    # The baseline scan comes before /readyz says 200, so the app cannot write before it.
    try:
        state.watcher = misses.watch(report)
    except Exception as e:  # noqa: BLE001 - a watcher that cannot start must not stop serving
        print(printable(f"miss watcher not started: {one_line(f'{type(e).__name__}: {e}')}"),
              flush=True)  # fmt: skip
    state.seeder = selfseed.prepare(begun.cfg if isinstance(begun, node.Supervisor) else None,
                                    report, _say, serve=True)  # fmt: skip
    state.report = report
    if state.seeder is not None:
        state.seeder.start()
    if threaded:
        stop.wait()
    elif not stop.is_set():
        server.serve_forever()  # until SIGTERM
    if state.watcher is not None:
        state.watcher.stop()
    if state.seeder is not None:
        state.seeder.stopping()  # publishes what is there if the app was ready
    server.shutdown()
    return 0


def _say(line: str) -> None:
    print(printable(line), flush=True)


def _stopped(sup: node.Supervisor) -> None:
    """After SIGTERM killed the pull's worker: no marker, and one line on what is left."""
    marker.clear(sup.cfg.marker_path)  # the gate wrote one ("cold"): nothing is ready
    print(printable(f"stopped by SIGTERM during the pull (it was {sup.rec.phase}); no ready "
                    "marker left; the cache dir holds its previous tree or the complete new "
                    "one, and what the stopped worker left beside it is deleted in the "
                    "background or by the next pull"), flush=True)  # fmt: skip


class _Worker:
    """The pull's worker, for SIGTERM to kill. Through a pidfd where the kernel has them:
    once the gate has reaped the worker, its pid may name another process, but the pidfd
    still names the dead worker (a kill then fails harmlessly)."""

    def __init__(self) -> None:
        self.pid = 0
        self.fd: int | None = None
        self.killed = False  # the kill reached a running worker

    def track(self, pid: int) -> None:
        self.pid = pid  # 0: no worker was forked
        if pid:
            with contextlib.suppress(AttributeError, OSError):  # no pidfds here: the pid
                self.fd = os.pidfd_open(pid)

    def kill(self) -> None:
        if not self.pid:
            return
        with contextlib.suppress(OSError):  # gone already
            if self.fd is not None:
                signal.pidfd_send_signal(self.fd, signal.SIGKILL)
            else:
                os.kill(self.pid, signal.SIGKILL)
            self.killed = True

    def forget(self) -> None:
        """The pull is over (the gate reaped the worker): nothing left to kill."""
        self.pid = 0
        if self.fd is not None:
            with contextlib.suppress(OSError):
                os.close(self.fd)
            self.fd = None


def _start(server: httpd.Server) -> bool:
    """Serve from a thread of its own; False where none can be started (a pids cgroup
    that is full). Then, failing open as `pull` does, this thread serves once the pull is
    done: the listening socket queues the probes until then, and /readyz says 200 after."""
    try:
        server.start()
    except RuntimeError as e:
        print(f"torchwarm: http: no thread for the endpoint ({e}); probes are answered "
              "once the pull is done", file=sys.stderr, flush=True)  # fmt: skip
        return False
    return True
