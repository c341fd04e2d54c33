"""Publish a warm-up: blobs first (skipping those already stored), the manifest last.

The order is the store's one invariant: a manifest is written only after every blob it
names exists, so a publisher killed at any point leaves at worst unreferenced blobs
(which gc removes), never a manifest that names a missing blob.
"""

from __future__ import annotations

import logging
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from . import __version__, keys, progress, verify
from . import manifest as mf
from .errors import Cancelled, ObjectNotFound
from .formats import Captured
from .manifest import BlobRef, Manifest
from .signing import SigningKey, sign
from .stores import Store
from .warmup import WarmupResult

log = logging.getLogger(__name__)


@dataclass
class PublishReport:
    manifest_key: str
    manifest: Manifest
    bytes_uploaded: int
    blobs_uploaded: int
    blobs_present: int
    outcome: str  # "published", "unchanged" (identical manifest already there), "replaced"


def build_manifest(
    workload: str,
    fingerprint: dict,
    fmt: str,
    captured: list[Captured],
    warmup: dict,
    signing_key: SigningKey | None = None,
) -> tuple[Manifest, dict[BlobRef, Path]]:
    """The manifest for captured blob files (signed when a key is given), and which file
    each BlobRef comes from."""
    files: dict[BlobRef, Path] = {}
    for c in captured:
        sha, size = verify.file_sha256(c.path)
        files[BlobRef(c.role, sha, size, c.media_type)] = c.path
    m = Manifest(
        workload=workload,
        fingerprint=fingerprint,
        format=fmt,
        blobs=tuple(sorted(files, key=lambda b: b.role)),
        warmup=warmup,
        created_at=datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        created_by=f"torchwarm {__version__} on {socket.gethostname()}",
        serial=time.time_ns() // 1000,
    )
    if signing_key is not None:
        m = sign(m, signing_key)
    return m, files


def publish(
    store: Store,
    m: Manifest,
    files: dict[BlobRef, Path],
    should_stop: Callable[[], bool] = lambda: False,
) -> PublishReport:
    """Upload missing blobs, then the manifest; `should_stop()` true before the manifest
    is written cancels the publish (the blobs stay, unreferenced, for gc)."""
    uploaded = present = nbytes = 0
    for blob, path in files.items():
        key = keys.blob_key(blob.sha256)
        if store.exists(key):
            try:
                store.touch(key)  # renew it: gc's grace period now protects it
            except ObjectNotFound:
                pass  # swept meanwhile: upload it below
            else:
                present += 1
                log.info("blob %s already in the store; not uploading", key)
                continue
        with progress.Progress(f"uploading {m.workload} {blob.role}", blob.size) as bar:
            store.put_file(key, path)
            bar.update(blob.size)
        uploaded += 1
        nbytes += blob.size
    if should_stop():
        raise Cancelled(f"publish of {m.workload!r} stopped before its manifest was written")
    key = keys.manifest_key(m.workload, m.fingerprint_digest)
    outcome = _write_manifest(store, key, m)
    # A blob that existed when checked may have been swept by a concurrent gc (it was
    # unreferenced and old) before this manifest landed: put back whatever is missing.
    for blob, path in files.items():
        if not store.exists(keys.blob_key(blob.sha256)):
            log.warning("blob %s vanished during publish (a concurrent gc?); re-uploading",
                        blob.sha256)  # fmt: skip
            store.put_file(keys.blob_key(blob.sha256), path)
            nbytes += blob.size
    return PublishReport(key, m, nbytes, uploaded, present, outcome)


def _write_manifest(store: Store, key: str, m: Manifest) -> str:
    """Create the manifest, or keep an identical one, or replace a different one."""
    data = m.to_json()
    for _ in range(3):
        if store.put_if_absent(key, data):
            return "published"
        try:
            existing = mf.parse(store.read(key, mf.MAX_MANIFEST_BYTES), key)
        except ObjectNotFound:
            continue  # deleted (by gc) between our two calls: try to create it again
        except mf.ManifestError:
            existing = None  # unreadable: replace it
        if existing is not None and existing.same_content(m):
            return "unchanged"  # same bytes already published: keep the older manifest
        break
    store.put(key, data)  # a newer warm-up of the same workload replaces the old one
    return "replaced"


def publish_warmup(
    store: Store,
    result: WarmupResult,
    signing_key: SigningKey | None = None,
    should_stop: Callable[[], bool] = lambda: False,
) -> PublishReport:
    """Build (and sign) the manifest of a warm-up result and publish it."""
    m, files = build_manifest(
        result.workload, result.fingerprint, result.format, result.captured, result.summary,
        signing_key,
    )  # fmt: skip
    return publish(store, m, files, should_stop)
