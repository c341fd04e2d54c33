"""Backends chosen by URL scheme; see base.py for the interface every one implements.

`file:///abs/path` (the embedded default), `s3://bucket/prefix`, `gs://bucket/prefix`.
Cloud stores come wrapped in RetryingStore (retry.py), and in ReadOnlyStore (readonly.py)
when opened read-only; docs/stores.md documents every StoreOptions field.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal
from urllib.parse import unquote, urlparse

from torchwarm.errors import ConfigError
from torchwarm.stores.base import Capabilities, ObjectInfo, Read, Store
from torchwarm.stores.local import LocalStore
from torchwarm.stores.readonly import ReadOnlyStore

__all__ = [
    "Capabilities",
    "ObjectInfo",
    "Read",
    "ReadOnlyStore",
    "Store",
    "StoreOptions",
    "open_store",
    "preload",
    "SCHEMES",
]

SCHEMES = ("file", "s3", "gs")


@dataclass(frozen=True)
class StoreOptions:
    """How to reach a cloud store. Never credentials: those come from the SDK default chains."""

    region: str | None = None  # S3 region; None: the SDK's (AWS_REGION, profile, ...)
    endpoint_url: str | None = None  # S3-compatible (MinIO, R2, SeaweedFS) or a GCS emulator
    path_style: bool = False  # S3 path-style addressing (http://host/bucket/key)
    # "when_required" for S3-compatible stores that reject boto3's default CRC checksums.
    request_checksum_calculation: Literal["when_supported", "when_required"] = "when_supported"
    gcs_project: str | None = None  # GCS project; None: from ADC
    connect_timeout_s: float = 5.0  # per request
    read_timeout_s: float = 60.0  # per request: longest silence while reading an answer
    attempts: int = 8  # retry attempts per call; 1 turns RetryingStore off
    deadline_s: float = 120.0  # overall limit per call, retries included
    chunk_size: int = 16 << 20  # bytes per multipart part / resumable-upload chunk
    # Bytes per ranged GET of a download (and the most one GET asks for): a download holds
    # about (concurrency + 1) x this in memory, 36 MiB by default (node/fetch.py).
    download_chunk_size: int = 4 << 20
    multipart_threshold: int = 64 << 20  # put of a Path uses multipart / resumable above this
    concurrency: int = 8  # parallel ranges or parts per transfer


def preload(url: str) -> None:
    """Import the modules of `url`'s backend now (before the pull forks its worker, so that
    the worker imports nothing that another thread of this process might be importing)."""
    scheme = urlparse(url).scheme
    if scheme == "s3":
        from torchwarm.stores import retry, s3  # noqa: F401
    elif scheme == "gs":
        from torchwarm.stores import gcs, retry  # noqa: F401


def open_store(url: str, options: StoreOptions | None = None, *, read_only: bool = False) -> Store:
    """Return the backend for `url` (`file:///abs/path`, `s3://bucket/prefix`, `gs://...`);
    with `read_only`, wrapped so that every write raises ReadOnlyStoreError (nodes)."""
    store = _open(url, options or StoreOptions())
    return ReadOnlyStore(store) if read_only else store


def _open(url: str, options: StoreOptions) -> Store:
    parsed = urlparse(url)
    if parsed.scheme == "file":
        if parsed.netloc not in ("", "localhost"):
            raise ConfigError(f"store URL {url!r}: file URLs take no host; use file:///abs/path")
        path = Path(unquote(parsed.path))
        if not path.is_absolute():
            raise ConfigError(f"store URL {url!r}: the path must be absolute")
        return LocalStore(path)
    if parsed.scheme in ("s3", "gs"):
        _check(url, parsed.netloc, options)
        prefix = parsed.path.strip("/")
        if parsed.scheme == "s3":
            from torchwarm.stores.s3 import S3Store

            inner: Store = S3Store(parsed.netloc, prefix, options)
        else:
            from torchwarm.stores.gcs import GCSStore

            inner = GCSStore(parsed.netloc, prefix, options)
        if options.attempts == 1:
            return inner
        from torchwarm.stores.retry import RetryingStore

        return RetryingStore(inner, attempts=options.attempts, deadline_s=options.deadline_s)
    raise ConfigError(
        f"store URL {url!r}: unsupported scheme {parsed.scheme or '(none)'!r}; "
        f"supported: {', '.join(s + '://' for s in SCHEMES)}"
    )


def _check(url: str, bucket: str, options: StoreOptions) -> None:
    if not bucket:
        raise ConfigError(f"store URL {url!r}: name the bucket, as in s3://bucket/prefix")
    parsed = urlparse(url)
    if parsed.query or parsed.fragment or "//" in parsed.path.strip("/"):
        raise ConfigError(f"store URL {url!r}: use scheme://bucket/prefix, without ?, # or //")
    if options.request_checksum_calculation not in ("when_supported", "when_required"):
        raise ConfigError(
            f"store option request_checksum_calculation="
            f"{options.request_checksum_calculation!r}: use when_supported or when_required"
        )
    if options.endpoint_url and urlparse(options.endpoint_url).scheme not in ("http", "https"):
        raise ConfigError(
            f"store option endpoint_url={options.endpoint_url!r}: use http(s)://host[:port]"
        )
    if options.attempts < 1 or options.deadline_s <= 0:
        raise ConfigError("store options: attempts must be >= 1 and deadline_s > 0")
    if options.chunk_size < 5 << 20 or options.concurrency < 1:
        raise ConfigError("store options: chunk_size must be >= 5 MiB and concurrency >= 1")
    if options.download_chunk_size < 64 << 10:
        raise ConfigError("store options: download_chunk_size must be >= 64 KiB")
    if options.connect_timeout_s <= 0 or options.read_timeout_s <= 0:
        raise ConfigError("store options: connect_timeout_s and read_timeout_s must be > 0")
