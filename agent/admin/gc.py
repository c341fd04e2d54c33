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

Failures. Both listings and every manifest are read before the first delete, and a
listing that cannot be completed raises StoreError (every backend's list() does): gc
then deletes nothing and says so. The put-back runs in a `finally`: a store error, a
full disk, a bug or Ctrl-C mid-sweep still re-lists the manifests and puts back every
deleted blob one names (every held blob, when that re-listing fails too) before the
error propagates; a copy that cannot be put back stays in the temp folder, which the
error names. A copy is held only where it leaves TEMP_RESERVE_BYTES free in the temp
folder (TMPDIR); a blob gc cannot hold a copy of is not deleted, and the report says so.

Why held copies and not restic's rule (an exclusive lock before removing anything):
restic can lock because every restic writer takes a lock in the repository. Here the
writers are seed daemons and jobs on many machines, and the bucket format has no lock;
adding one would make every publish wait for gc, and a gc that crashed holding it would
block publishing until the lock expired by someone's clock. Held copies keep publishing
lock-free. What they cannot cover: a gc killed outright (SIGKILL, power loss) between a
delete and the put-back, while a publisher reusing that very blob wrote its manifest and
checked its blobs in between; that manifest names a missing blob until the workload is
next published, and a node's pull of it fails (fail-open: the node starts cold).
"""

from __future__ import annotations

import errno
import shutil
import tempfile
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from torchwarm.errors import IntegrityError, ObjectNotFound, ObjectTooLarge, StoreError, one_line
from torchwarm.spec import keys
from torchwarm.spec import manifest as mf
from torchwarm.spec.manifest import Manifest
from torchwarm.stores import ObjectInfo, Store

DEFAULT_GRACE_S = 6 * 3600.0
DEFAULT_OLDER_THAN_S = 30 * 86400.0
TEMP_RESERVE_BYTES = 64 << 20  # bytes a held copy must leave free in the temp folder


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
    unheld_blobs: list[str] = field(default_factory=list)  # old, unreferenced, kept: no room
    temp_dir: str = ""  # where held copies go (TMPDIR)


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
    report = GcReport(temp_dir=tempfile.gettempdir())
    try:
        blobs = list(store.list(keys.BLOBS))  # before the manifests: see the module docstring
        manifests, unreadable = _manifests(store)
    except StoreError as e:
        raise StoreError(f"gc deleted nothing: {e}") from e
    try:
        referenced = _drop_manifests(store, report, manifests, keep, older_than_s, dry_run)
        if unreadable:
            report.sweep_skipped = (
                f"{len(unreadable)} manifest(s) could not be read (e.g. {unreadable[0]}); "
                "their blobs are unknown, so no blob was deleted"
            )
            return report
        _sweep(store, report, blobs, referenced, grace_s, dry_run)
    except StoreError as e:
        raise StoreError(
            f"{e}; gc stopped part-way, after deleting {len(report.deleted_manifests)} "
            f"manifest(s) and {len(report.deleted_blobs)} blob(s): run it again"
        ) from e
    return report


def _drop_manifests(
    store: Store,
    report: GcReport,
    manifests: list[_Entry],
    keep: int,
    older_than_s: float,
    dry_run: bool,
) -> set[str]:
    """Keep or delete each manifest (see the module docstring); the sha256 of every blob
    a kept one names."""
    by_workload: dict[str, list[_Entry]] = defaultdict(list)
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
    return referenced


def _sweep(
    store: Store,
    report: GcReport,
    blobs: list[ObjectInfo],
    referenced: set[str],
    grace_s: float,
    dry_run: bool,
) -> None:
    """Delete each listed blob no kept manifest names and older than the grace period,
    holding a copy of it; then, whatever happened meanwhile, put back the named ones."""
    held = Path(tempfile.mkdtemp(prefix="torchwarm-gc-"))
    at_risk: list[ObjectInfo] = []  # deleted, or its delete failed and may have landed
    try:
        for info in blobs:
            digest = keys.parse_blob_key(info.key)
            if digest is None or digest in referenced:
                continue
            if _young(info, grace_s) or _renewed(store, info.key, grace_s):
                report.young_blobs += 1
                continue
            if not dry_run:
                held_it = _hold(store, info, held / digest)
                if held_it != "held":
                    if held_it == "no room":
                        report.unheld_blobs.append(info.key)
                    continue
                at_risk.append(info)
                store.delete(info.key)
            report.deleted_blobs.append(info.key)
            report.freed_bytes += info.size
    finally:
        # Also on an error: a blob that a manifest written meanwhile names must come back.
        # Raises, keeping `held`, when a copy cannot be put back.
        relist_error = _put_back_named(store, report, at_risk, held) if at_risk else None
        shutil.rmtree(held, ignore_errors=True)
    if isinstance(relist_error, StoreError):
        raise StoreError(
            f"{relist_error}; the manifests could not be listed again after the sweep, so "
            "every blob this gc deleted was put back"
        ) from relist_error
    if relist_error is not None:
        raise relist_error


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


def _hold(store: Store, info: ObjectInfo, copy: Path) -> str:
    """Download a local copy of the blob before it is deleted: 'held'; 'no room' when the
    copy would leave less than TEMP_RESERVE_BYTES free (checked first) or the disk filled while
    writing it; 'changed' when it is gone or holds more bytes than listed (replaced since
    the listing: the next gc looks again). No manifest names it, so the listed size is
    the only bound on what gc downloads."""
    if shutil.disk_usage(copy.parent).free < info.size + TEMP_RESERVE_BYTES:
        return "no room"
    try:
        with copy.open("wb") as f:
            store.download(info.key, f, limit=info.size)
    except (ObjectNotFound, ObjectTooLarge):
        copy.unlink(missing_ok=True)
        return "changed"
    except OSError as e:
        copy.unlink(missing_ok=True)
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            return "no room"
        raise
    return "held"


def _put_back_named(
    store: Store, report: GcReport, at_risk: list[ObjectInfo], held: Path
) -> Exception | None:
    """Put back every blob in `at_risk` that a manifest (listed again now) names: all of
    them when the manifests cannot be listed (that error is returned) or one cannot be
    parsed. Raises StoreError naming the folder of the copies when one of them cannot be
    put back.

    Between gc's last look at a blob and its delete, a publisher may touch that blob,
    write its manifest and find the blob still present; only gc can then repair it.
    """
    relist_error: Exception | None = None
    try:
        manifests, unreadable = _manifests(store)
        named: set[str] | None = {b.sha256 for e in manifests for b in e.manifest.blobs}
        if unreadable:
            named = None
    except Exception as e:  # noqa: BLE001 - whatever stops the re-listing, put back everything
        relist_error, named = e, None
    lost: list[str] = []
    for info in at_risk:
        digest = keys.parse_blob_key(info.key) or ""
        if named is not None and digest not in named:
            continue
        try:
            store.put(info.key, held / digest)
        except Exception as e:  # noqa: BLE001 - try the others; the copies stay for the operator
            lost.append(f"{info.key}: {one_line(str(e))}")
            continue
        if info.key in report.deleted_blobs:
            report.deleted_blobs.remove(info.key)
            report.freed_bytes -= info.size
        report.restored_blobs.append(info.key)
    if lost:
        # No `from`: the error that stopped the sweep, if any, stays this one's context.
        raise StoreError(
            f"gc could not put back {len(lost)} deleted blob(s) that manifests may name "
            f"(e.g. {lost[0]}); their copies are kept in {held} (file name = sha256): "
            "upload each to blobs/sha256/<first 2 hex digits>/<file name> in the store"
        )
    return relist_error


def _young(info: ObjectInfo, age_s: float) -> bool:
    return time.time() - info.modified < age_s


def _look_again(store: Store, key: str) -> ObjectInfo | None:
    """The object as listed now; None when it is gone."""
    return next((o for o in store.list(key) if o.key == key), None)


def _renewed(store: Store, key: str, grace_s: float) -> bool:
    """Look again right before deleting: a publisher may have touched it since the listing."""
    fresh = _look_again(store, key)
    return fresh is None or _young(fresh, grace_s)
