"""The one storage interface every backend implements (local folder, S3, GCS).

Backends only move bytes. Layout (keys.py), verification (verify.py) and policy
(node.py) live elsewhere, so a backend can be small and is tested by one shared
contract suite (tests/test_store_contract.py).

Keys are '/'-separated relative paths made by keys.py: no leading '/', no '.' or
'..' segments, no empty segments. A backend may reject anything else.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Protocol, runtime_checkable


@dataclass(frozen=True)
class ObjectInfo:
    key: str
    size: int
    modified: float  # seconds since the epoch, as the store reports it


@runtime_checkable
class Store(Protocol):
    url: str

    def read(self, key: str) -> bytes:
        """Return the whole object. For small objects (manifests).

        Raises ObjectNotFound when the key does not exist, StoreError when the
        store cannot answer.
        """
        ...

    def download(self, key: str, sink: BinaryIO) -> int:
        """Write the object's bytes to `sink` in order, and return how many were written.

        The caller hashes what arrives and owns `sink` (a temp file): on error
        it discards whatever was written. Raises ObjectNotFound / StoreError.
        Cloud backends also take `offset=N` (start at byte N) and set
        `resumable_download = True`, so that RetryingStore can resume a broken
        download without writing a byte twice.
        """
        ...

    def put(self, key: str, data: bytes) -> None:
        """Create or replace the object atomically: readers see old or new, never a part."""
        ...

    def put_file(self, key: str, path: Path) -> None:
        """Like put, from a file, streamed (blobs may be larger than memory)."""
        ...

    def put_if_absent(self, key: str, data: bytes) -> bool:
        """Create the object only if no object has that key; return whether it was created.

        Atomic against concurrent writers: of several racing calls exactly one
        returns True. The losers' data is not stored.
        """
        ...

    def exists(self, key: str) -> bool:
        """Whether an object with exactly this key exists. StoreError if the store cannot say."""
        ...

    def list(self, prefix: str) -> Iterator[ObjectInfo]:
        """Every object whose key starts with `prefix`, in no particular order.

        Objects being written (not yet visible to read) are not listed.
        """
        ...

    def delete(self, key: str) -> None:
        """Remove the object; deleting a missing key is not an error."""
        ...

    def touch(self, key: str) -> None:
        """Set the object's modified time (as list() reports it) to now, bytes unchanged.

        A publisher touches a blob it reuses, so that gc's grace period protects it.
        Raises ObjectNotFound when the key does not exist.
        """
        ...


def check_key(key: str) -> str:
    """Reject keys that could escape a prefix or a root folder; return the key."""
    parts = key.split("/")
    if not key or key.startswith("/") or any(p in ("", ".", "..") for p in parts):
        raise ValueError(f"invalid store key {key!r}")
    return key
