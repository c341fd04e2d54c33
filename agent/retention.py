"""`torchwarm gc`: keep the newest N manifests per workload, then sweep unreferenced blobs.

Mark-and-sweep from the manifests, never by bucket TTLs (a TTL breaks the rule that
every blob a manifest names exists). Safe against a concurrent publisher: blobs are
listed *before* the manifests, so a manifest written after the listing names blobs
that are either not in the listing or were just uploaded; a blob younger than the grace
period is never swept; a publisher that reuses an old, unreferenced blob touches it
first (its modified time becomes now), gc looks at a blob's time again right before
deleting it, keeps a local copy of what it deletes until it has listed the manifests
once more and put back any blob a manifest written meanwhile names, and a publisher
whose reused blob was swept anyway re-uploads it after writing its manifest
(publish.py). Sweeping thus downloads what it deletes. A manifest this torchwarm cannot
parse stops the sweep: its blobs are unknown, so nothing is deleted.
"""

from __future__ import annotations

import tempfile
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from . import keys
from . import manifest as mf
from .errors import IntegrityError, ObjectNotFound
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
    restored_blobs: list[str] = field(default_factory=list)  # named by a manifest that raced
    sweep_skipped: str = ""  # why no blob was swept, if none was


def gc(
    store: Store, keep: int, grace_s: float = DEFAULT_GRACE_S, dry_run: bool = False
) -> GcReport:
    if keep < 1:
        raise ValueError("keep must be at least 1")
    report = GcReport()
    blobs = list(store.list(keys.BLOBS))  # before the manifests: see the module docstring
    by_workload: dict[str, list[tuple[str, Manifest]]] = defaultdict(list)
    manifests, unreadable = _manifests(store)
    for key, parsed in manifests:
        by_workload[parsed.workload].append((key, parsed))
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
    with tempfile.TemporaryDirectory(prefix="torchwarm-gc-") as held:
        for info in blobs:
            digest = keys.parse_blob_key(info.key)
            if digest is None or digest in referenced:
                continue
            if now - info.modified < grace_s or _renewed(store, info.key, grace_s):
                report.young_blobs += 1
                continue
            if not dry_run and not _hold_and_delete(store, info.key, Path(held) / digest):
                continue
            report.deleted_blobs.append(info.key)
            report.freed_bytes += info.size
        if report.deleted_blobs and not dry_run:
            _restore_named(store, report, Path(held))
    return report


def _manifests(store: Store) -> tuple[list[tuple[str, Manifest]], list[str]]:
    """Every parsable manifest as (key, manifest), and the keys of those that are not."""
    found, unreadable = [], []
    for info in store.list(keys.MANIFESTS):
        if keys.parse_manifest_key(info.key) is None:
            continue
        try:
            found.append(
                (info.key, mf.parse(store.read(info.key, mf.MAX_MANIFEST_BYTES), info.key))
            )
        except ObjectNotFound:
            continue  # deleted since the listing (another gc, a replacement)
        except IntegrityError:  # malformed or oversized
            unreadable.append(info.key)
    return found, unreadable


def _hold_and_delete(store: Store, key: str, copy: Path) -> bool:
    """Keep a local copy of the blob, then delete it; False if it was already gone."""
    try:
        with copy.open("wb") as f:
            store.download(key, f)
    except ObjectNotFound:
        return False
    store.delete(key)
    return True


def _restore_named(store: Store, report: GcReport, held: Path) -> None:
    """Put back every deleted blob that a manifest written during this gc names.

    Between gc's last look at a blob and its delete, a publisher may touch that blob,
    write its manifest and find the blob still present; only gc can then repair it.
    """
    manifests, unreadable = _manifests(store)
    named = {b.sha256 for _, m in manifests for b in m.blobs}
    for key in list(report.deleted_blobs):
        digest = keys.parse_blob_key(key)
        if digest is not None and (digest in named or unreadable):
            store.put_file(key, held / digest)
            report.deleted_blobs.remove(key)
            report.restored_blobs.append(key)


def _renewed(store: Store, key: str, grace_s: float) -> bool:
    """Look again right before deleting: a publisher may have touched it since the listing."""
    fresh = [o for o in store.list(key) if o.key == key]
    return not fresh or time.time() - fresh[0].modified < grace_s
