"""`torchwarm gc`: drop the manifests no node needs any more, then sweep unreferenced blobs.

Which manifests stay, per workload (one manifest per fingerprint, so per environment):
the newest `keep` by `serial` (the publish time in µs), always; the others only while
their object is younger than `older_than_s` by the store's modified time. A seed daemon
touches the manifest of an environment it still serves once that time passes
daemon.refresh_s (default 7 days, well below the 30-day default here), so in a mixed
fleet every live environment stays, whatever `keep` says, and an environment no seed
serves any more goes once it is that old. gc looks at a manifest's time once more right
before deleting it: a seed may have touched it, or a publisher replaced it, meanwhile.

Blobs: mark-and-sweep from the kept manifests, never by bucket TTLs (a TTL breaks the
rule that every blob a manifest names exists). Safe against a concurrent publisher: blobs
are listed *before* the manifests, so a manifest written after the listing names blobs
that are either not in the listing or were just uploaded; a blob younger than the grace
period is never swept; a publisher that reuses an old, unreferenced blob touches it
first (its modified time becomes now), gc looks at a blob's time again right before
deleting it, keeps a local copy of what it deletes until it has listed the manifests
once more and put back any blob a manifest written meanwhile names, and a publisher
whose reused blob was swept anyway re-uploads it after writing its manifest
(publish.py). Sweeping thus downloads what it deletes, up to its listed size. A
manifest this torchwarm cannot parse stops the sweep: its blobs are unknown, so nothing
is deleted.
"""

from __future__ import annotations

import tempfile
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from torchwarm.errors import IntegrityError, ObjectNotFound, ObjectTooLarge
from torchwarm.spec import keys
from torchwarm.spec import manifest as mf
from torchwarm.spec.manifest import Manifest
from torchwarm.stores import ObjectInfo, Store

DEFAULT_GRACE_S = 6 * 3600.0
DEFAULT_OLDER_THAN_S = 30 * 86400.0


@dataclass
class GcReport:
    kept_manifests: list[str] = field(default_factory=list)
    young_manifests: int = 0  # kept beyond `keep` because younger than older_than_s
    deleted_manifests: list[str] = field(default_factory=list)
    deleted_blobs: list[str] = field(default_factory=list)
    freed_bytes: int = 0
    young_blobs: int = 0  # unreferenced but inside the grace period
    restored_blobs: list[str] = field(default_factory=list)  # named by a manifest that raced
    sweep_skipped: str = ""  # why no blob was swept, if none was


@dataclass
class _Entry:
    info: ObjectInfo  # as listed: key and modified time
    manifest: Manifest

    def newest_first(self) -> tuple[int, str, str]:
        # serial is µs; created_at (1 s) and the key only break ties, e.g. serial-less ones
        return (self.manifest.serial, self.manifest.created_at, self.info.key)


def gc(
    store: Store,
    keep: int,
    older_than_s: float = DEFAULT_OLDER_THAN_S,
    grace_s: float = DEFAULT_GRACE_S,
    dry_run: bool = False,
) -> GcReport:
    if keep < 1:
        raise ValueError("keep must be at least 1")
    if older_than_s < 0 or grace_s < 0:
        raise ValueError("older_than_s and grace_s must not be negative")
    report = GcReport()
    blobs = list(store.list(keys.BLOBS))  # before the manifests: see the module docstring
    by_workload: dict[str, list[_Entry]] = defaultdict(list)
    manifests, unreadable = _manifests(store)
    for entry in manifests:
        by_workload[entry.manifest.workload].append(entry)
    referenced: set[str] = set()
    for entries in by_workload.values():
        entries.sort(key=_Entry.newest_first, reverse=True)
        for i, entry in enumerate(entries):
            key = entry.info.key
            fate = "kept" if i < keep else _fate(store, entry.info, older_than_s, dry_run)
            if fate == "deleted":
                report.deleted_manifests.append(key)
            elif fate != "gone":
                if fate == "young":
                    report.young_manifests += 1
                report.kept_manifests.append(key)
                referenced.update(b.sha256 for b in entry.manifest.blobs)
    if unreadable:
        report.sweep_skipped = (
            f"{len(unreadable)} manifest(s) could not be read (e.g. {unreadable[0]}); "
            "their blobs are unknown, so no blob was deleted"
        )
        return report
    with tempfile.TemporaryDirectory(prefix="torchwarm-gc-") as held:
        for info in blobs:
            digest = keys.parse_blob_key(info.key)
            if digest is None or digest in referenced:
                continue
            if _young(info, grace_s) or _renewed(store, info.key, grace_s):
                report.young_blobs += 1
                continue
            if not dry_run and not _hold_and_delete(store, info, Path(held) / digest):
                continue
            report.deleted_blobs.append(info.key)
            report.freed_bytes += info.size
        if report.deleted_blobs and not dry_run:
            _restore_named(store, report, Path(held))
    return report


def _fate(store: Store, info: ObjectInfo, older_than_s: float, dry_run: bool) -> str:
    """For a manifest beyond `keep`: 'young' (kept), 'deleted' or 'gone' (deleted by
    someone else). An old one is looked at again right before the delete: a seed may
    have touched it, or a publisher replaced it, since the listing."""
    if _young(info, older_than_s):
        return "young"
    if dry_run:
        return "deleted"
    fresh = _look_again(store, info.key)
    if fresh is None:
        return "gone"
    if _young(fresh, older_than_s):
        return "young"
    store.delete(info.key)
    return "deleted"


def _manifests(store: Store) -> tuple[list[_Entry], list[str]]:
    """Every parsable manifest with its listing, and the keys of those that do not parse."""
    found, unreadable = [], []
    for info in store.list(keys.MANIFESTS):
        if keys.parse_manifest_key(info.key) is None:
            continue
        try:
            data = store.read(info.key, mf.MAX_MANIFEST_BYTES).data
            found.append(_Entry(info, mf.parse(data, info.key)))
        except ObjectNotFound:
            continue  # deleted since the listing (another gc, a replacement)
        except IntegrityError:  # malformed or oversized
            unreadable.append(info.key)
    return found, unreadable


def _hold_and_delete(store: Store, info: ObjectInfo, copy: Path) -> bool:
    """Keep a local copy of the blob, then delete it; False if it was already gone, or
    holds more bytes than listed (replaced since the listing: the next gc looks again).
    No manifest names it, so the listed size is the only bound on what gc downloads."""
    try:
        with copy.open("wb") as f:
            store.download(info.key, f, limit=info.size)
    except (ObjectNotFound, ObjectTooLarge):
        return False
    store.delete(info.key)
    return True


def _restore_named(store: Store, report: GcReport, held: Path) -> None:
    """Put back every deleted blob that a manifest written during this gc names.

    Between gc's last look at a blob and its delete, a publisher may touch that blob,
    write its manifest and find the blob still present; only gc can then repair it.
    """
    manifests, unreadable = _manifests(store)
    named = {b.sha256 for e in manifests for b in e.manifest.blobs}
    for key in list(report.deleted_blobs):
        digest = keys.parse_blob_key(key)
        if digest is not None and (digest in named or unreadable):
            store.put(key, held / digest)
            report.deleted_blobs.remove(key)
            report.restored_blobs.append(key)


def _young(info: ObjectInfo, age_s: float) -> bool:
    return time.time() - info.modified < age_s


def _look_again(store: Store, key: str) -> ObjectInfo | None:
    """The object as listed now; None when it is gone."""
    return next((o for o in store.list(key) if o.key == key), None)


def _renewed(store: Store, key: str, grace_s: float) -> bool:
    """Look again right before deleting: a publisher may have touched it since the listing."""
    fresh = _look_again(store, key)
    return fresh is None or _young(fresh, grace_s)
