"""A read-only view of any Store: what a node opens, since a node never writes to the store.

Reads pass through unchanged; every write raises ReadOnlyStoreError before it reaches
the wrapped store, so that a bug that would write from a node fails loudly, in one line,
instead of changing what every other node pulls.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import BinaryIO

from torchwarm.errors import ReadOnlyStoreError
from torchwarm.stores.base import ObjectInfo, Read, Store


class ReadOnlyStore:
    """Wrap `inner`: read, download, exists and list are its own; the writes are refused."""

    def __init__(self, inner: Store) -> None:
        self.inner = inner
        self.url = inner.url
        self.capabilities = replace(inner.capabilities, writable=False)

    def read(self, key: str, limit: int) -> Read:
        return self.inner.read(key, limit)

    def download(
        self, key: str, sink: BinaryIO, *, limit: int | None = None, offset: int = 0
    ) -> int:
        return self.inner.download(key, sink, limit=limit, offset=offset)

    def exists(self, key: str) -> bool:
        return self.inner.exists(key)

    def list(self, prefix: str) -> Iterator[ObjectInfo]:
        return self.inner.list(prefix)

    def put(self, key: str, data: bytes | Path) -> None:
        raise self._refused("put", key)

    def put_if_version(self, key: str, data: bytes, version: str | None) -> bool:
        raise self._refused("put_if_version", key)

    def delete(self, key: str) -> None:
        raise self._refused("delete", key)

    def touch(self, key: str) -> None:
        raise self._refused("touch", key)

    def _refused(self, operation: str, key: str) -> ReadOnlyStoreError:
        return ReadOnlyStoreError(
            f"{self.url}: {operation}({key}) refused: this store was opened read-only, as "
            "a node opens it; write from a seed (push, daemon) or with gc"
        )
