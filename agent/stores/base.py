"""The one storage interface every backend implements (local folder, S3, GCS).

Backends only move bytes. Layout (spec/keys.py), verification (node/verify.py) and
policy (node/gate.py) live elsewhere, so a backend can be small and is tested by one
shared contract suite (tests/test_store_contract.py). Retries (retry.py) and read-only
access (readonly.py) are wrappers around any store.

Keys are '/'-separated relative paths made by spec/keys.py: no leading '/', no '.' or
'..' segments, no empty segments. A backend may reject anything else.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, NamedTuple, Protocol, runtime_checkable


@dataclass(frozen=True)
class ObjectInfo:
    key: str
    size: int
    modified: float  # seconds since the epoch, as the store reports it


class Read(NamedTuple):
    """What Store.read returns: the object's bytes and the version token that names them."""

    data: bytes
    version: str | None  # None only where the store gave none (an S3 store without ETags)


@dataclass(frozen=True)
class Capabilities:
    """What a store can do, declared by every store (a wrapper derives its own from the
    store it wraps), so that a caller tests a flag instead of probing for methods."""

    writable: bool  # False: put, put_if_version, delete and touch raise ReadOnlyStoreError
    resumable_download: bool  # download honours offset > 0 (RetryingStore resumes with it)
    # Bytes cross a network: a node keeps a partial copy of a blob it streams, to resume
    # from after a stopped pull (node/fetch.py); a local folder is simply read again.
    remote: bool


@runtime_checkable
class Store(Protocol):
    url: str
    capabilities: Capabilities

    def read(self, key: str, limit: int) -> Read:
        """Return the whole object and its version token, if it holds at most `limit` bytes
        (manifests).

        The store is not trusted with sizes: a backend asks for at most limit + 1 bytes
        (a ranged request) and raises ObjectTooLarge when the object is larger, having
        read at most limit + 1 bytes of it; ObjectTooLarge carries the token in `.version`
        where the backend had one, so that an oversized object can be replaced
        conditionally too. The token, for put_if_version, names exactly the bytes
        returned: S3 the ETag, GCS the generation, the local folder a digest of the size
        and the first limit + 1 bytes. Equal content may give an equal token (S3 ETags are
        content hashes), which is harmless to a compare-and-swap; it is None only where
        the store gave none (an S3-compatible store that sends no ETag), and such an
        object cannot be replaced conditionally. Raises ObjectNotFound when the key does
        not exist, StoreError when the store cannot answer.
        """
        ...

    def download(
        self, key: str, sink: BinaryIO, *, limit: int | None = None, offset: int = 0
    ) -> int:
        """Write the object's bytes from byte `offset` on to `sink`, in order, and return
        how many were written.

        The caller hashes what arrives and owns `sink` (a temp file): on error it discards
        whatever was written. Raises ObjectNotFound / StoreError. With `limit` (a blob's
        size from its manifest; it counts from byte 0, whatever the offset), never
        requests more than limit + 1 bytes in all nor writes past byte `limit` to the sink,
        and raises ObjectTooLarge when the object is larger (before the first byte where
        the store tells the size up front). An offset at or past the end writes nothing.
        A store whose capabilities say resumable_download=False accepts only offset 0
        (ValueError otherwise), and RetryingStore retries its downloads only before their
        first byte.
        """
        ...

    def put(self, key: str, data: bytes | Path) -> None:
        """Create or replace the object atomically: readers see old or new, never a part.

        `data` is the bytes, or the Path of a file whose bytes are streamed (blobs may be
        larger than memory; above StoreOptions.multipart_threshold S3 sends it in parts
        and GCS as a resumable upload, each visible only once complete). A source file
        that cannot be read raises its OSError, and nothing is stored.
        """
        ...

    def put_if_version(self, key: str, data: bytes, version: str | None) -> bool:
        """Write the object only if it is still the one `version` names (a
        compare-and-swap), or, with version=None, only if no object has the key (a
        create-if-absent); return whether it was written.

        Atomic against every other write to the key: of several racing calls with the
        same `version` exactly one returns True, and the losers' data is not stored.
        `version` comes from read (or ObjectTooLarge.version). False means another writer
        came first: it created the object (version=None), or replaced or deleted it since
        it was read; the caller reads again and decides anew. S3: PutObject with
        If-None-Match: * or If-Match; GCS: ifGenerationMatch (0 for none); local folder:
        a hard link, or a compare under the folder's lock (see local.py).
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
