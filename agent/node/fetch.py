"""Download a manifest's blobs to temp files, verifying each as it arrives."""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
from pathlib import Path

from torchwarm.errors import IntegrityError, ObjectTooLarge
from torchwarm.node import verify
from torchwarm.spec import keys
from torchwarm.spec.manifest import BlobRef, Manifest
from torchwarm.stores import Store
from torchwarm.util import progress

log = logging.getLogger(__name__)


def fetch_blob(store: Store, blob: BlobRef, dest_dir: Path) -> Path:
    """Download one blob into `dest_dir`; return its path only if size and sha256 match.

    A mismatch is downloaded once more before it is believed: bytes damaged in transit
    differ the second time, a damaged stored copy does not.
    """
    try:
        return _fetch_once(store, blob, dest_dir)
    except ObjectTooLarge:
        raise  # the store said how large it is: asking again would only fetch more
    except IntegrityError as first:
        log.info("%s; downloading it once more", first)
    return _fetch_once(store, blob, dest_dir)


def _fetch_once(store: Store, blob: BlobRef, dest_dir: Path) -> Path:
    key = keys.blob_key(blob.sha256)
    fd, tmp = tempfile.mkstemp(prefix=f"{blob.sha256[:12]}.", suffix=".part", dir=dest_dir)
    try:
        with (
            os.fdopen(fd, "wb") as f,
            progress.Progress(f"downloading {blob.role} {blob.sha256[:12]}", blob.size) as bar,
        ):
            sink = verify.HashingSink(f, on_write=bar.update)
            store.download(key, sink, limit=blob.size)
        verify.check(blob, sink, f"{store.url}/{key}")
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return Path(tmp)


def fetch(store: Store, manifest: Manifest, dest_dir: Path) -> dict[str, Path]:
    """Every blob of `manifest`, verified, by role. Raises on the first bad one."""
    return {b.role: fetch_blob(store, b, dest_dir) for b in manifest.blobs}
