"""The node side: resolve → fetch → verify → install → ready marker; and `wait`.

Fail-open or fail-closed is decided in one place, `_PullJob._decide` (and, for the
deadline, in `pull` itself): by default a node that
cannot get a verified cache starts cold and says why in one line; with `require` the
same condition is an error and nothing is installed. Config errors are never hidden.
Verification is not relaxed by fail-open: bytes that fail their digest are refused
either way; fail-open only means the main process may start without them.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import threading
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from . import fetch, fingerprint, formats, install, torchenv
from .config import Config
from .errors import (
    DeadlineExceeded,
    IntegrityError,
    NoCacheForFingerprint,
    StoreError,
    TorchwarmError,
    WaitTimeout,
)
from .fsutil import atomic_write_bytes
from .manifest import Manifest
from .resolve import Miss, resolve
from .stores import Store


@dataclass
class WorkloadOutcome:
    workload: str
    status: str  # "warm" or "cold"
    reason: str = ""
    manifest: str = ""
    format: str = ""
    blobs: list[dict[str, Any]] = field(default_factory=list)
    bytes: int = 0


@dataclass
class PullReport:
    status: str  # "warm" (every workload), "partial", or "cold"
    cache_dir: str
    fingerprint: str
    store: str
    workloads: list[WorkloadOutcome]
    timings: dict[str, float]
    written_at: str = ""
    timed_out: bool = False  # the deadline passed; a worker may still be blocked on the store

    def to_json(self) -> bytes:
        return (json.dumps(asdict(self), indent=2, sort_keys=True) + "\n").encode()


def pull(
    cfg: Config,
    names: str | None = None,
    require: bool | None = None,
    deadline_s: float | None = None,
) -> PullReport:
    """Install the verified caches of the selected workloads, then write the ready marker.

    The whole pull (torch import and fingerprint included) is bounded by the deadline:
    when it passes, the install is cancelled unless its final swap has begun, and the
    node starts cold (fail-open) or DeadlineExceeded is raised (fail-closed). A worker
    thread still blocked on the store is abandoned; it can no longer touch the cache dir.
    """
    require = cfg.require if require is None else require
    deadline_s = cfg.deadline_s if deadline_s is None else deadline_s
    workloads = cfg.selected(names)
    marker = cfg.marker_path
    marker.unlink(missing_ok=True)  # a marker from an earlier boot must not let `wait` through
    job = _PullJob(cfg, workloads, require)
    worker = threading.Thread(target=job.run, name="torchwarm-pull", daemon=True)
    worker.start()
    worker.join(deadline_s)
    timed_out = worker.is_alive() and job.expire()
    if not timed_out:
        worker.join()
        if job.error is not None:
            raise job.error
    else:
        late = DeadlineExceeded(
            f"the pull did not finish within its {deadline_s:g} s deadline (it was "
            f"{job.phase}); check the store's reachability or raise deadline_s"
        )
        if require:
            raise late
        for w in workloads:
            if w.name not in job.outcomes or job.outcomes[w.name].status == "warm":
                job.outcomes[w.name] = WorkloadOutcome(w.name, "cold", str(late))
    job.timings["total_s"] = time.perf_counter() - job.t0
    ordered = [job.outcomes[w.name] for w in workloads]
    warm = sum(o.status == "warm" for o in ordered)
    status = "warm" if warm == len(ordered) else "cold" if warm == 0 else "partial"
    report = PullReport(
        status, str(cfg.cache_dir), job.fingerprint, cfg.store, ordered,
        {k: round(v, 3) for k, v in job.timings.items()},
        datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"), timed_out,
    )  # fmt: skip
    atomic_write_bytes(marker, report.to_json())
    return report


class _PullJob:
    """The pull's steps, run on a worker thread so that the caller can enforce a deadline."""

    def __init__(self, cfg: Config, workloads: tuple[Any, ...], require: bool) -> None:
        self.cfg, self.workloads, self.require = cfg, workloads, require
        self.t0 = time.perf_counter()
        self.timings: dict[str, float] = {}
        self.outcomes: dict[str, WorkloadOutcome] = {}
        self.fingerprint = ""
        self.phase = "starting"
        self.error: BaseException | None = None
        self.installed: dict[str, dict[str, Any]] = {}
        self._lock = threading.Lock()
        self._expired = False
        self._committed = False

    def expire(self) -> bool:
        """Called at the deadline: True if the job can no longer swap anything in."""
        with self._lock:
            if self._committed:
                return False  # the swap is under way or done: let it finish
            self._expired = True
            return True

    @contextlib.contextmanager
    def _commit(self) -> Iterator[None]:
        with self._lock:
            if self._expired:
                raise DeadlineExceeded("deadline passed before the install")
            self._committed = True
        yield

    def run(self) -> None:
        try:
            self._run()
        except BaseException as e:  # noqa: BLE001 - handed to the caller's thread
            self.error = e

    def _run(self) -> None:
        with install.locked(self.cfg.cache_dir) as work:
            self.installed = _load_installed(work)
            self.phase = "reading this machine's fingerprint"
            fields = fingerprint.collect(scratch=torchenv.probe_scratch())
            self.timings["fingerprint_s"] = time.perf_counter() - self.t0
            self.fingerprint = fingerprint.digest(fields)
            store = self.cfg.open_store()
            downloads = work / f"downloads-{os.getpid()}"
            downloads.mkdir(parents=True, exist_ok=True)
            try:
                t1 = time.perf_counter()
                hits = self._resolve_and_fetch(store, fields, downloads)
                self.timings["fetch_s"] = time.perf_counter() - t1
                if hits:
                    self.phase = "installing"
                    t2 = time.perf_counter()
                    self._install(hits)
                    self.timings["install_s"] = time.perf_counter() - t2
            finally:
                shutil.rmtree(downloads, ignore_errors=True)

    def _resolve_and_fetch(
        self, store: Store, fields: dict[str, Any], downloads: Path
    ) -> list[tuple[Manifest, dict[str, Path]]]:
        hits = []
        for w in self.workloads:
            try:
                self.phase = f"resolving {w.name!r} in {store.url}"
                found = resolve(store, w.name, fields, self.cfg.trusted_keys)
                if isinstance(found, Miss):
                    self._decide(w.name, NoCacheForFingerprint(found.reason))
                    continue
                _check_not_older(found, self.installed.get(_state_key(found)), store.url)
                self.phase = f"downloading {w.name!r} ({found.size} bytes) from {store.url}"
                blobs = fetch.fetch(store, found, downloads)
            except (StoreError, IntegrityError) as e:
                self._decide(w.name, e)
                continue
            hits.append((found, blobs))
        return hits

    def _install(self, hits: list[tuple[Manifest, dict[str, Path]]]) -> None:
        def fill(staging: Path) -> None:
            for m, blobs in hits:
                formats.get(m.format).install(blobs, staging)

        try:
            install.install(self.cfg.cache_dir, fill, guard=self._commit)
        except DeadlineExceeded:
            return  # the caller reports the deadline
        except TorchwarmError as e:
            for m, _ in hits:
                self._decide(m.workload, e)
            return
        for m, _ in hits:
            self.installed[_state_key(m)] = {"serial": m.serial, "created_at": m.created_at}
        _save_installed(install.workdir(self.cfg.cache_dir), self.installed)
        for m, _ in hits:
            self.outcomes[m.workload] = WorkloadOutcome(
                m.workload, "warm", "", f"{m.workload}/{m.fingerprint_digest}", m.format,
                [b.to_dict() for b in m.blobs], m.size,
            )  # fmt: skip

    def _decide(self, workload: str, error: TorchwarmError) -> None:
        """Fail-closed: raise (nothing is installed). Fail-open: record a cold start."""
        if self.require:
            raise error
        self.outcomes[workload] = WorkloadOutcome(workload, "cold", str(error))


INSTALLED = "installed.json"  # in the install workdir: newest serial per workload and env


def _state_key(m: Manifest) -> str:
    return f"{m.workload}/{m.fingerprint_digest}"


def _load_installed(work: Path) -> dict[str, dict[str, Any]]:
    try:
        doc = json.loads((work / INSTALLED).read_bytes())
    except FileNotFoundError:
        return {}
    except ValueError:
        return {}  # damaged: rollback protection restarts from here (docs/security.md)
    return doc if isinstance(doc, dict) else {}


def _save_installed(work: Path, installed: dict[str, dict[str, Any]]) -> None:
    atomic_write_bytes(work / INSTALLED, json.dumps(installed, sort_keys=True).encode())


def _check_not_older(m: Manifest, before: dict[str, Any] | None, where: str) -> None:
    """Refuse a manifest older than one this node already installed (a replay)."""
    if before is None or not isinstance(before.get("serial"), int):
        return
    if m.serial < before["serial"]:
        raise IntegrityError(
            f"manifest for {m.workload!r} in {where} is older (serial {m.serial}) than the "
            f"one this node installed before ({before['serial']}); refusing a replayed manifest"
        )


def describe(report: PullReport) -> list[str]:
    """The pull's outcome for people: a line per workload, then one summary line."""
    lines = []
    for o in report.workloads:
        if o.status == "warm":
            lines.append(f"warm: {o.workload} ({o.format}, {o.bytes} bytes) installed in "
                         f"{report.cache_dir}")  # fmt: skip
        else:
            lines.append(f"starting cold: {o.reason}")
    lines.append(
        f"ready ({report.status}) in {report.timings.get('total_s', 0):.1f} s; marker written"
    )
    return lines


def wait(marker: Path, timeout_s: float, poll_s: float = 0.2) -> dict[str, Any]:
    """Block until the ready marker exists and parses; return its content."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            doc: dict[str, Any] = json.loads(marker.read_bytes())
            return doc
        except (FileNotFoundError, ValueError):
            pass  # not there yet (it is written atomically, so ValueError means foreign junk)
        if time.monotonic() >= deadline:
            raise WaitTimeout(
                f"no ready marker at {marker} after {timeout_s:g} s; is the torchwarm pull "
                "running with the same marker path?"
            )
        time.sleep(poll_s)
