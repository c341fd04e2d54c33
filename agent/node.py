"""The node side: resolve → fetch → verify → install → ready marker; and `wait`.

Fail-open or fail-closed is decided in one place, `_decide`: by default a node that
cannot get a verified cache starts cold and says why in one line; with `require` the
same condition is an error and nothing is installed. Config errors are never hidden.
Verification is not relaxed by fail-open: bytes that fail their digest are refused
either way; fail-open only means the main process may start without them.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from . import fetch, fingerprint, formats, install
from .config import Config
from .errors import IntegrityError, NoCacheForFingerprint, StoreError, TorchwarmError, WaitTimeout
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

    def to_json(self) -> bytes:
        return (json.dumps(asdict(self), indent=2, sort_keys=True) + "\n").encode()


def pull(cfg: Config, names: str | None = None, require: bool | None = None) -> PullReport:
    """Install the verified caches of the selected workloads, then write the ready marker."""
    require = cfg.require if require is None else require
    workloads = cfg.selected(names)
    marker = cfg.marker_path
    marker.unlink(missing_ok=True)  # a marker from an earlier boot must not let `wait` through
    t0 = time.perf_counter()
    timings: dict[str, float] = {}
    outcomes: dict[str, WorkloadOutcome] = {}
    with install.locked(cfg.cache_dir) as work:
        fields = fingerprint.collect(scratch=work / "fingerprint-scratch")
        timings["fingerprint_s"] = time.perf_counter() - t0
        fp = fingerprint.digest(fields)
        store = cfg.open_store()
        downloads = work / f"downloads-{os.getpid()}"
        downloads.mkdir(parents=True, exist_ok=True)
        try:
            hits = _resolve_and_fetch(store, workloads, fields, downloads, require, outcomes)
            timings["fetch_s"] = time.perf_counter() - t0 - timings["fingerprint_s"]
            if hits:
                t1 = time.perf_counter()
                _install(cfg, hits, require, outcomes)
                timings["install_s"] = time.perf_counter() - t1
        finally:
            shutil.rmtree(downloads, ignore_errors=True)
    timings["total_s"] = time.perf_counter() - t0
    ordered = [outcomes[w.name] for w in workloads]
    warm = sum(o.status == "warm" for o in ordered)
    status = "warm" if warm == len(ordered) else "cold" if warm == 0 else "partial"
    report = PullReport(
        status, str(cfg.cache_dir), fp, store.url, ordered,
        {k: round(v, 3) for k, v in timings.items()},
        datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
    )  # fmt: skip
    atomic_write_bytes(marker, report.to_json())
    return report


def _resolve_and_fetch(
    store: Store,
    workloads: tuple[Any, ...],
    fields: dict[str, Any],
    downloads: Path,
    require: bool,
    outcomes: dict[str, WorkloadOutcome],
) -> list[tuple[Manifest, dict[str, Path]]]:
    hits = []
    for w in workloads:
        try:
            found = resolve(store, w.name, fields)
            if isinstance(found, Miss):
                _decide(require, w.name, NoCacheForFingerprint(found.reason), outcomes)
                continue
            blobs = fetch.fetch(store, found, downloads)
        except (StoreError, IntegrityError) as e:
            _decide(require, w.name, e, outcomes)
            continue
        hits.append((found, blobs))
    return hits


def _install(
    cfg: Config,
    hits: list[tuple[Manifest, dict[str, Path]]],
    require: bool,
    outcomes: dict[str, WorkloadOutcome],
) -> None:
    def fill(staging: Path) -> None:
        for m, blobs in hits:
            formats.get(m.format).install(blobs, staging)

    try:
        install.install(cfg.cache_dir, fill)
    except TorchwarmError as e:
        for m, _ in hits:
            _decide(require, m.workload, e, outcomes)
        return
    for m, _ in hits:
        outcomes[m.workload] = WorkloadOutcome(
            m.workload, "warm", "", f"{m.workload}/{m.fingerprint_digest}", m.format,
            [b.to_dict() for b in m.blobs], m.size,
        )  # fmt: skip


def _decide(
    require: bool, workload: str, error: TorchwarmError, outcomes: dict[str, WorkloadOutcome]
) -> None:
    """Fail-closed: raise (the caller installs nothing). Fail-open: record a cold start."""
    if require:
        raise error
    outcomes[workload] = WorkloadOutcome(workload, "cold", str(error))


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
