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

    def read(self, key: str, limit: int) -> bytes:
        """Return the whole object if it holds at most `limit` bytes (manifests).

        The store is not trusted with sizes: a backend asks for at most limit + 1 bytes
        (a ranged request) and raises ObjectTooLarge when the object is larger, having
        read at most limit + 1 bytes of it. Raises ObjectNotFound when the key does not
        exist, StoreError when the store cannot answer.
        """
        ...

    def read_versioned(self, key: str, limit: int) -> tuple[bytes, str]:
        """Like read, and also the object's version token, for put_if_version.

        The token names exactly the bytes returned: S3 the ETag, GCS the generation, the
        local folder a digest of the size and the first limit + 1 bytes. Equal content may
        give an equal token (S3 ETags are content hashes), which is harmless to a
        compare-and-swap. ObjectTooLarge carries the token in `.version` where the backend
        had one, so that an oversized object can be replaced conditionally too.
        """
        ...

    def download(self, key: str, sink: BinaryIO, limit: int | None = None) -> int:
        """Write the object's bytes to `sink` in order, and return how many were written.

        The caller hashes what arrives and owns `sink` (a temp file): on error
        it discards whatever was written. Raises ObjectNotFound / StoreError.
        With `limit` (a blob's size from its manifest), never requests more than
        limit + 1 bytes in all nor writes more than `limit` to the sink, and raises
        ObjectTooLarge when the object is larger (before the first byte where the
        store tells the size up front).
        Cloud backends also take `offset=N` (start at byte N; `limit` still counts from
        byte 0) and set `resumable_download = True`, so that RetryingStore can resume a
        broken download without writing a byte twice.
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

    def put_if_version(self, key: str, data: bytes, version: str) -> bool:
        """Replace the object only if it is still the one `version` (from read_versioned)
        names; return whether it was replaced (a compare-and-swap).

        False when another writer replaced or deleted the object since: the caller reads
        again and decides anew. Atomic against every other write to the key. S3:
        PutObject with If-Match; GCS: ifGenerationMatch; local folder: a lock (see
        local.py).
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
