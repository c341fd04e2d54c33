"""`torchwarm gc`: keep the newest N manifests per workload, then sweep unreferenced blobs.

Mark-and-sweep from the manifests, never by bucket TTLs (a TTL breaks the rule that
every blob a manifest names exists). The order makes it safe against a concurrent
publisher: blobs are listed *before* the manifests, so a manifest written after the
listing names blobs that are either not in the listing or were just uploaded, and a
blob younger than the grace period is never swept. A publisher that reused an old,
unreferenced blob that gc then swept re-uploads it after writing its manifest
(publish.py). A manifest this torchwarm cannot parse stops the sweep: its blobs are
unknown, so nothing is deleted.
"""

from __future__ import annotations

import time
from collections import defaultdict
from dataclasses import dataclass, field

from . import keys
from . import manifest as mf
from .errors import ManifestError
from .manifest import Manifest
from .stores import Store

DEFAULT_GRACE_S = 6 * 3600.0


@dataclass
class GcReport:
    kept_manifests: list[str] = field(default_factory=list)
    deleted_manifests: list[str] = field(default_factory=list)
    deleted_blobs: list[str] = field(default_factory=list)
    freed_bytes: int = 0
    young_blobs: int = 0  # unreferenced but inside the grace period
    sweep_skipped: str = ""  # why no blob was swept, if none was


def gc(
    store: Store, keep: int, grace_s: float = DEFAULT_GRACE_S, dry_run: bool = False
) -> GcReport:
    if keep < 1:
        raise ValueError("keep must be at least 1")
    report = GcReport()
    blobs = list(store.list(keys.BLOBS))  # before the manifests: see the module docstring
    by_workload: dict[str, list[tuple[str, Manifest]]] = defaultdict(list)
    unreadable = []
    for info in store.list(keys.MANIFESTS):
        if keys.parse_manifest_key(info.key) is None:
            continue
        try:
            by_workload[_workload(info.key)].append(
                (info.key, mf.parse(store.read(info.key), info.key))
            )
        except ManifestError:
            unreadable.append(info.key)
    referenced: set[str] = set()
    for entries in by_workload.values():
        entries.sort(key=lambda e: e[1].created_at, reverse=True)
        for key, m in entries[:keep]:
            report.kept_manifests.append(key)
            referenced.update(b.sha256 for b in m.blobs)
        for key, _ in entries[keep:]:
            report.deleted_manifests.append(key)
            if not dry_run:
                store.delete(key)
    if unreadable:
        report.sweep_skipped = (
            f"{len(unreadable)} manifest(s) could not be read (e.g. {unreadable[0]}); "
            "their blobs are unknown, so no blob was deleted"
        )
        return report
    now = time.time()
    for info in blobs:
        digest = keys.parse_blob_key(info.key)
        if digest is None or digest in referenced:
            continue
        if now - info.modified < grace_s:
            report.young_blobs += 1
            continue
        report.deleted_blobs.append(info.key)
        report.freed_bytes += info.size
        if not dry_run:
            store.delete(info.key)
    return report


def _workload(key: str) -> str:
    parsed = keys.parse_manifest_key(key)
    assert parsed is not None
    return parsed[0]
