"""Digests: computed as bytes arrive (no second read), compared before anything is installed."""

from __future__ import annotations

import hashlib
from pathlib import Path

from torchwarm.errors import IntegrityError
from torchwarm.spec.manifest import BlobRef

_CHUNK = 1 << 20


class Digest:
    """The size and sha256 of bytes fed to it in order (a blob as it streams)."""

    def __init__(self) -> None:
        self.size = 0
        self._h = hashlib.sha256()

    def update(self, data: bytes | bytearray | memoryview) -> None:
        self._h.update(data)
        self.size += len(data)

    def check(self, blob: BlobRef, where: str) -> None:
        """Raise IntegrityError unless what was fed is exactly `blob`."""
        if self.size != blob.size:
            _damaged(f"blob {where}: size {self.size} != {blob.size} named by the manifest")
        actual = self._h.hexdigest()
        if actual != blob.sha256:
            _damaged(
                f"blob {where}: sha256 {actual[:16]}… != {blob.sha256[:16]}… named by the manifest"
            )


def _damaged(what: str) -> None:
    # The job streams a blob that fails once more before it believes this (job.py): the
    # error that reaches anyone is the second.
    raise IntegrityError(
        f"{what}; twice; refusing it (the stored copy is damaged: delete that key, then push again)"
    )


def file_sha256(path: Path) -> tuple[str, int]:
    """(sha256 hex, size) of a local file."""
    h = hashlib.sha256()
    size = 0
    with path.open("rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
            size += len(chunk)
    return h.hexdigest(), size
