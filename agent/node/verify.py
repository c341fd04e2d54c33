"""Digests: computed as bytes arrive (no second read), compared before anything is installed."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

from torchwarm.errors import IntegrityError
from torchwarm.spec.manifest import BlobRef

_CHUNK = 1 << 20


class HashingSink:
    """A write-only file wrapper that counts and sha256-hashes what passes through."""

    def __init__(self, inner: BinaryIO, on_write: Callable[[int], None] | None = None) -> None:
        self.inner = inner
        self.size = 0
        self._h = hashlib.sha256()
        self._on_write = on_write

    def write(self, data: bytes | bytearray | memoryview) -> int:
        self._h.update(data)
        self.size += len(data)
        if self._on_write is not None:
            self._on_write(len(data))
        return self.inner.write(data)

    def flush(self) -> None:
        self.inner.flush()

    def hexdigest(self) -> str:
        return self._h.hexdigest()


def file_sha256(path: Path) -> tuple[str, int]:
    """(sha256 hex, size) of a local file."""
    h = hashlib.sha256()
    size = 0
    with path.open("rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
            size += len(chunk)
    return h.hexdigest(), size


def check(blob: BlobRef, sink: HashingSink, where: str) -> None:
    """Raise IntegrityError unless what passed through `sink` is exactly `blob`."""
    if sink.size != blob.size:
        raise IntegrityError(
            f"blob {where}: size {sink.size} != {blob.size} named by the manifest; "
            "twice; refusing it (the stored copy is damaged: delete that key, then push again)"
        )
    actual = sink.hexdigest()
    if actual != blob.sha256:
        raise IntegrityError(
            f"blob {where}: sha256 {actual[:16]}… != {blob.sha256[:16]}… named by the manifest; "
            "twice; refusing it (the stored copy is damaged: delete that key, then push again)"
        )
