"""Publish a warm-up: blobs first (skipping those already stored), the manifest last.

The order is the store's one invariant: a manifest is written only after every blob it
names exists, so a publisher killed at any point leaves at worst unreferenced blobs
(which gc removes), never a manifest that names a missing blob.

The manifest is stamped when it is written: its serial is max(now in µs, the stored
manifest's serial + 1), then it is signed, and it replaces the stored one only by a
compare-and-swap against the version just read (Store.put_if_version). So the serial
at a key only grows, whatever the publishers' clocks and however they race, and a node
that remembers a serial never sees a lower one become current. A stored manifest that
does not parse, or does not verify with the publisher's own key, is never kept.
"""

from __future__ import annotations

import logging
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from pathlib import Path

from torchwarm import __version__
from torchwarm.errors import Cancelled, IntegrityError, ObjectNotFound, ObjectTooLarge, StoreError
from torchwarm.formats import Captured
from torchwarm.node import verify
from torchwarm.seed.warmup import WarmupResult
from torchwarm.spec import keys
from torchwarm.spec import manifest as mf
from torchwarm.spec.manifest import BlobRef, Manifest
from torchwarm.spec.signing import SigningKey, TrustedKeys, sign
from torchwarm.spec.signing import verify as verify_signature
from torchwarm.stores import Store
from torchwarm.util import progress

log = logging.getLogger(__name__)


@dataclass
class PublishReport:
    manifest_key: str
    manifest: Manifest
    bytes_uploaded: int
    blobs_uploaded: int
    blobs_present: int
    outcome: str  # "published", "unchanged" (identical manifest already there), "replaced",
    # "skipped" (a node's publish that found another manifest there: `reason` says which)
    reason: str = ""


def now_us() -> int:
    """The publisher's clock: microseconds since the epoch (a serial's lower bound)."""
    return time.time_ns() // 1000


MANIFEST_WRITE_ATTEMPTS = 5  # conditional writes lost to other publishers before giving up


def build_manifest(
    workload: str, fingerprint: dict, fmt: str, captured: list[Captured], warmup: dict
) -> tuple[Manifest, dict[BlobRef, Path]]:
    """The manifest for captured blob files, unsigned and with serial 0 (publish stamps
    and signs it when it writes it), and which file each BlobRef comes from."""
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
    )
    return m, files


def publish(
    store: Store,
    m: Manifest,
    files: dict[BlobRef, Path],
    signing_key: SigningKey | None = None,
    should_stop: Callable[[], bool] = lambda: False,
    clock: Callable[[], int] = now_us,
) -> PublishReport:
    """Upload missing blobs, then write the manifest (stamped with a serial from `clock`
    and signed with `signing_key` as it is written; any serial or signature `m` carries
    is replaced). `should_stop()` true before the manifest is written cancels the publish
    (the blobs stay, unreferenced, for gc)."""
    uploaded, present, nbytes = _upload(store, m, files)
    if should_stop():
        raise Cancelled(f"publish of {m.workload!r} stopped before its manifest was written")
    key = keys.manifest_key(m.workload, m.fingerprint_digest)
    stored, outcome = _write_manifest(store, key, m, signing_key, clock)
    nbytes += _restore_vanished(store, files)
    return PublishReport(key, stored, nbytes, uploaded, present, outcome)


def publish_node(
    store: Store,
    m: Manifest,
    files: dict[BlobRef, Path],
    node_key: SigningKey,
    replaces: int | None = None,
    should_stop: Callable[[], bool] = lambda: False,
    clock: Callable[[], int] = now_us,
) -> PublishReport:
    """A node's publish of its app's cache (`m`, publisher node), signed with the node key.

    With `replaces` None it only creates: a node finding any manifest at the key, or
    losing the race to create it, publishes nothing (outcome "skipped", with the
    reason), so the first node wins and a seed's manifest is never replaced. With
    `replaces` (the serial of the node manifest this node installed: `publish: misses`)
    it replaces that one only, by a compare-and-swap, and only while it is still the one
    stored. Blobs first, the manifest last, as publish()."""
    key = keys.manifest_key(m.workload, m.fingerprint_digest)
    m = replace(m, publisher=mf.NODE)

    def skipped(why: str, nbytes: int = 0, uploaded: int = 0, present: int = 0) -> PublishReport:
        return PublishReport(key, m, nbytes, uploaded, present, "skipped", why)

    version: str | None = None
    if replaces is None:
        if store.exists(key):  # before any upload: the common case of a later node
            return skipped("a manifest for this fingerprint is in the store already")
    else:
        stored, version, why = _still(store, key, replaces)
        if stored is None:
            return skipped(why)
    uploaded, present, nbytes = _upload(store, m, files)
    if should_stop():
        raise Cancelled(f"publish of {m.workload!r} stopped before its manifest was written")
    base = replaces if replaces is not None else 0
    ours = sign(replace(m, serial=max(clock(), base + 1), signature=None), node_key)
    if not store.put_if_version(key, ours.to_json(), version):
        why = ("another publisher created it first" if replaces is None else
               "it changed since it was read")  # fmt: skip
        return skipped(why, nbytes, uploaded, present)
    nbytes += _restore_vanished(store, files)
    return PublishReport(key, ours, nbytes, uploaded, present,
                         "published" if replaces is None else "replaced")  # fmt: skip


def _still(store: Store, key: str, installed: int) -> tuple[Manifest | None, str | None, str]:
    """The stored manifest and its version if it is still the node manifest this node
    installed (serial `installed`, publisher node); else None and why not."""
    try:
        data, version = store.read(key, mf.MAX_MANIFEST_BYTES)
    except ObjectNotFound:
        return None, None, "the manifest it would extend is gone from the store"
    except ObjectTooLarge:
        return None, None, "the stored manifest is over the size limit (not the one installed)"
    stored = _usable(data, f"{store.url}/{key}")
    if stored is not None and stored.publisher != mf.NODE:
        why = "a seed's manifest is stored for this fingerprint now; a node never replaces it"
        return None, None, why
    if stored is None or stored.serial != installed:
        return None, None, "the stored manifest changed since this node installed it"
    if version is None:
        return None, None, "the store gave no version token, which a safe replace needs"
    return stored, version, ""


def _upload(store: Store, m: Manifest, files: dict[BlobRef, Path]) -> tuple[int, int, int]:
    """Upload the blobs the store lacks (touching those it has); (uploaded, present, bytes)."""
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
            store.put(key, path)
            bar.update(blob.size)
        uploaded += 1
        nbytes += blob.size
    return uploaded, present, nbytes


def _restore_vanished(store: Store, files: dict[BlobRef, Path]) -> int:
    """A blob that existed when checked may have been swept by a concurrent gc (it was
    unreferenced and old) before the manifest landed: put back whatever is missing."""
    nbytes = 0
    for blob, path in files.items():
        if not store.exists(keys.blob_key(blob.sha256)):
            log.warning("blob %s vanished during publish (a concurrent gc?); re-uploading",
                        blob.sha256)  # fmt: skip
            store.put(keys.blob_key(blob.sha256), path)
            nbytes += blob.size
    return nbytes


def is_current(stored: Manifest, warmup_key: str, signing_key: SigningKey | None) -> bool:
    """Whether a stored manifest stands for a warm-up with this key by this publisher: it
    carries `warmup_key` and is signed the way the publisher signs (it verifies with
    `signing_key`, or is unsigned when there is none). The daemon skips a workload only
    then; a manifest forged under the seed's key name is not current."""
    return stored.warmup.get("warmup_key") == warmup_key and _signed_as(stored, signing_key)


def _signed_as(m: Manifest, signing_key: SigningKey | None) -> bool:
    if signing_key is None:
        return m.signature is None
    own = TrustedKeys({signing_key.name: signing_key.key.public_key()})
    try:
        verify_signature(m, own, "stored")
    except IntegrityError:
        return False
    return True


def _write_manifest(
    store: Store,
    key: str,
    m: Manifest,
    signing_key: SigningKey | None,
    clock: Callable[[], int],
) -> tuple[Manifest, str]:
    """Create the manifest, or keep an identical one signed as we sign, or replace any
    other by a conditional write against the version just read, reading again when
    another writer won. Returns the manifest now stored and the outcome."""

    def stamped(stored_serial: int) -> Manifest:
        out = replace(m, serial=max(clock(), stored_serial + 1), signature=None)
        return sign(out, signing_key) if signing_key is not None else out

    ours = stamped(0)
    sent, outcome = ours.to_json(), "published"
    if store.put_if_version(key, sent, version=None):
        return ours, outcome
    for _ in range(MANIFEST_WRITE_ATTEMPTS):
        try:
            data, version = store.read(key, mf.MAX_MANIFEST_BYTES)
        except ObjectNotFound:  # deleted (by gc) since: create it again
            ours = stamped(0)
            sent, outcome = ours.to_json(), "published"
            if store.put_if_version(key, sent, version=None):
                return ours, outcome
            continue
        except ObjectTooLarge as e:
            if e.version is None:
                raise
            data, version = b"", e.version
        if data == sent:
            return ours, outcome  # our last write landed; only its answer was lost
        existing = _usable(data, f"{store.url}/{key}")
        if existing is not None and existing.same_content(m) and _signed_as(existing, signing_key):
            return existing, "unchanged"  # same bytes already published: keep the older one
        ours = stamped(existing.serial if existing is not None else 0)
        sent, outcome = ours.to_json(), "replaced"
        if version is None:  # version=None would mean "only if absent": never true here
            raise StoreError(
                f"manifest {store.url}/{key}: the store gave no version token (S3: an ETag) "
                "for it, which replacing it safely needs; use a store that sends ETags"
            )
        if store.put_if_version(key, sent, version):
            return ours, outcome
    raise StoreError(
        f"manifest {store.url}/{key}: other publishers replaced it {MANIFEST_WRITE_ATTEMPTS} "
        "times while this one tried to write it; run one publisher per workload, or try again"
    )


def _usable(data: bytes, where: str) -> Manifest | None:
    """The stored manifest if it parses, else None (it will be replaced)."""
    try:
        return mf.parse(data, where)
    except mf.ManifestError as e:
        log.warning("%s; replacing it", e)
        return None


def publish_warmup(
    store: Store,
    result: WarmupResult,
    signing_key: SigningKey | None = None,
    should_stop: Callable[[], bool] = lambda: False,
) -> PublishReport:
    """Build the manifest of a warm-up result and publish it (signed with `signing_key`):
    the one entry point of `torchwarm push`, `warmup --push` and the daemon."""
    m, files = build_manifest(
        result.workload, result.fingerprint, result.format, result.captured, result.summary
    )
    return publish(store, m, files, signing_key, should_stop)
