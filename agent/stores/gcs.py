"""Google Cloud Storage: `gs://bucket/prefix`.

Only adapts google-cloud-storage calls to the Store protocol. Every call passes
retry=None (RetryingStore is the one retry policy) and explicit timeouts.
Credentials come only from Application Default Credentials (workload identity,
GOOGLE_APPLICATION_CREDENTIALS, gcloud); STORAGE_EMULATOR_HOST selects an emulator.
"""

from __future__ import annotations

import base64
import contextlib
import io
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

import google_crc32c
import requests
from google.api_core import exceptions as gexc
from google.auth import exceptions as auth_exc
from google.cloud import storage
from google.cloud.storage import exceptions as media_exc

from torchwarm.errors import (
    ObjectNotFound,
    ObjectTooLarge,
    StoreError,
    TorchwarmError,
    TransientStoreError,
    one_line,
)
from torchwarm.stores.base import Capabilities, ObjectInfo, Read, check_key
from torchwarm.stores.transfer import write_ranges_in_order

if TYPE_CHECKING:
    from torchwarm.stores import StoreOptions

_LIST_PAGE = 1000  # objects per listing page: GCS's most (tests lower it)
_GCS_CHUNK_UNIT = 256 << 10  # resumable upload chunks are multiples of 256 KiB
# Failures below HTTP (no status to classify by); HTTP answers are classified by status.
_TRANSIENT = (
    auth_exc.TransportError,
    requests.ConnectionError,
    requests.Timeout,
    requests.exceptions.ChunkedEncodingError,
    media_exc.DataCorruption,
    ConnectionError,
    TimeoutError,
)
# errors[0]["reason"] values that mean "slow down or try again", whatever the status
# (Google APIs have answered rate limits with 403).
_TRANSIENT_REASONS = {"rateLimitExceeded", "userRateLimitExceeded", "backendError", "internalError"}


class _CrcSink:
    """Passes bytes through to the sink while computing their CRC32C."""

    def __init__(self, sink: BinaryIO) -> None:
        self.sink = sink
        self.crc = google_crc32c.Checksum()

    def write(self, data: bytes) -> int:
        self.crc.update(data)
        return self.sink.write(data)


class _Capped:
    """Collects at most `cap` bytes; one more raises `overflow()`, so a server that sends
    more than was asked for is cut off after cap + 1 bytes instead of filling memory."""

    def __init__(self, cap: int, overflow: Callable[[], Exception]) -> None:
        self.buf = io.BytesIO()
        self.cap = cap
        self.overflow = overflow

    def write(self, data: bytes) -> int:
        if self.buf.tell() + len(data) > self.cap:
            raise self.overflow()
        return self.buf.write(data)


class GCSStore:
    """Objects are blobs under `prefix` in `bucket`."""

    def __init__(self, bucket: str, prefix: str, options: StoreOptions) -> None:
        self.capabilities = Capabilities(writable=True, resumable_download=True, remote=True)
        self.bucket_name = bucket
        self.prefix = prefix.strip("/")
        self.url = f"gs://{bucket}/{self.prefix}" if self.prefix else f"gs://{bucket}"
        self.options = options
        self._timeout = (options.connect_timeout_s, options.read_timeout_s)
        client_options = {"api_endpoint": options.endpoint_url} if options.endpoint_url else None
        with self._mapped(None):
            self._client = storage.Client(
                project=options.gcs_project, client_options=client_options
            )
        self._bucket = self._client.bucket(bucket)
        self.endpoint = self._client._connection.API_BASE_URL
        # More pooled connections than parallel ranges, or requests discards them.
        adapter = requests.adapters.HTTPAdapter(
            pool_connections=4, pool_maxsize=options.concurrency + 4, max_retries=0
        )
        with contextlib.suppress(AttributeError):
            self._client._http.mount("https://", adapter)
            self._client._http.mount("http://", adapter)

    # -- keys and errors ----------------------------------------------------------

    def _key(self, key: str) -> str:
        check_key(key)
        return f"{self.prefix}/{key}" if self.prefix else key

    def _where(self, key: str | None) -> str:
        return f"gs://{self.bucket_name}/{self._key(key)}" if key else self.url

    def _identity(self) -> str:
        creds = getattr(self._client, "_credentials", None)
        email = getattr(creds, "service_account_email", None)
        if email and email != "default":
            return email
        return f"the {type(creds).__name__} credentials" if creds else "no credentials"

    def _error(self, e: Exception, key: str | None) -> StoreError:
        """Map an SDK exception by its class, HTTP status and errors[0]["reason"] (never its
        message text), and by what the call was about: the bucket (key None) or an object."""
        where = self._where(key)
        if isinstance(e, auth_exc.DefaultCredentialsError):
            return StoreError(
                f"{where}: no Google Cloud credentials found: use workload identity, set "
                "GOOGLE_APPLICATION_CREDENTIALS, or run `gcloud auth application-default login`"
            )
        if isinstance(e, (requests.ConnectionError, ConnectionError)) and not isinstance(
            e, requests.exceptions.ChunkedEncodingError
        ):
            return TransientStoreError(
                f"{where}: cannot reach the GCS endpoint {self.endpoint}: "
                "check endpoint_url / STORAGE_EMULATOR_HOST and the network path to it"
            )
        if isinstance(e, _TRANSIENT):
            return TransientStoreError(
                f"{where}: {type(e).__name__} from {self.endpoint}: {_first_line(e)}"
            )
        status, reason = _status(e), _reason(e)
        if status == 429 or status >= 500 or reason in _TRANSIENT_REASONS:
            return TransientStoreError(
                f"{where}: {_http(status, reason)} from {self.endpoint} (throttled or failing)"
            )
        if status == 404:
            if key is None:
                return StoreError(
                    f"{where}: bucket {self.bucket_name!r} does not exist: "
                    "create it or fix the store URL"
                )
            return ObjectNotFound(f"{where} does not exist")
        if status in (401, 403) or isinstance(e, auth_exc.RefreshError):
            return StoreError(
                f"{where}: access denied for {self._identity()}: grant it "
                "roles/storage.objectUser on the bucket, or use other credentials"
            )
        if status:
            return StoreError(f"{where}: GCS answered {_http(status, reason)}: {_first_line(e)}")
        return StoreError(f"{where}: GCS request failed: {_first_line(e)}")

    @contextlib.contextmanager
    def _mapped(self, key: str | None) -> Iterator[None]:
        try:
            yield
        except TorchwarmError:
            raise  # ours: a StoreError already mapped, or ObjectTooLarge
        except Exception as e:  # the SDK raises from several trees; none may escape
            if isinstance(e, (ValueError, TypeError)) and not isinstance(
                e, (gexc.GoogleAPIError, media_exc.InvalidResponse)
            ):
                raise  # our own bug or a bad key: not a store error
            if isinstance(e, OSError) and not isinstance(
                e, (requests.RequestException, ConnectionError, TimeoutError)
            ):
                raise  # the caller's file or sink (missing file, disk full)
            raise self._error(e, key) from e

    def _blob(self, key: str, generation: int | None = None) -> Any:
        return self._bucket.blob(self._key(key), generation=generation)

    # -- the Store protocol --------------------------------------------------------

    def read(self, key: str, limit: int) -> Read:
        """The object's metadata first (size, generation, CRC32C): one over `limit` is
        refused unread; otherwise that generation is read with a ranged GET for bytes
        0..limit (at most limit + 1 bytes, whatever the metadata claimed) and checked
        against the CRC32C. The version token is the generation."""
        where = self._where(key)
        with self._mapped(key):
            meta = self._meta(key)
            version = str(meta.generation)
            if int(meta.size or 0) > limit:
                raise ObjectTooLarge(where, limit, version)
            out = _Capped(limit, lambda: ObjectTooLarge(where, limit, version))
            if meta.size:  # an empty object has no byte 0 to ask for
                self._range(key, meta.generation, 0, limit + 1, out)
            data = out.buf.getvalue()
            if meta.crc32c and _crc32c(data) != base64.b64decode(meta.crc32c):
                raise TransientStoreError(f"{where}: CRC32C mismatch (corrupted in transit)")
            return Read(data, version)

    def _meta(self, key: str) -> Any:
        meta = self._bucket.get_blob(self._key(key), retry=None, timeout=self._timeout)
        if meta is None:
            raise ObjectNotFound(f"{self._where(key)} does not exist")
        return meta

    def _range(self, key: str, generation: int, lo: int, hi: int, sink: Any) -> None:
        """Stream bytes [lo, hi) of one generation of the object into `sink`."""
        try:
            self._blob(key, generation=generation).download_to_file(
                sink,
                start=lo,
                end=hi - 1,
                raw_download=True,
                checksum=None,
                retry=None,
                timeout=self._timeout,
            )
        except gexc.NotFound:
            # That generation is gone: replaced or deleted since its metadata was read.
            raise TransientStoreError(
                f"{self._where(key)}: changed while being read; reading it again"
            ) from None

    def download(
        self, key: str, sink: BinaryIO, *, limit: int | None = None, offset: int = 0
    ) -> int:
        """Write the object (from byte `offset`) to `sink`; ranges in parallel when large.

        One metadata GET gives size, generation and CRC32C: an object over `limit` is
        refused there, before any byte is requested; every range is pinned to that
        generation. A whole download (offset 0) is checked against the CRC32C.
        """
        where = self._where(key)
        with self._mapped(key):
            meta = self._meta(key)
            size = int(meta.size or 0)
            if limit is not None and size > limit:
                raise ObjectTooLarge(where, limit)
            if offset >= size:
                return 0
            out = _CrcSink(sink) if offset == 0 and meta.crc32c else None

            def fetch(lo: int, hi: int) -> bytes:
                buf = _Capped(
                    hi - lo,
                    lambda: TransientStoreError(f"{where}: the store sent more than was asked"),
                )
                with self._mapped(key):
                    self._range(key, meta.generation, lo, hi, buf)
                data = buf.buf.getvalue()
                if len(data) != hi - lo:
                    raise TransientStoreError(
                        f"{where}: short read ({len(data)} of {hi - lo} bytes)"
                    )
                return data

            target: Any = out or sink
            chunk = self.options.download_chunk_size
            if size - offset <= chunk:
                target.write(fetch(offset, size))  # small: one GET
            else:
                write_ranges_in_order(fetch, offset, size, chunk, self.options.concurrency, target)
            if out is not None and out.crc.digest() != base64.b64decode(meta.crc32c):
                raise TransientStoreError(
                    f"{where}: CRC32C mismatch after download (corrupted in transit)"
                )
            return size - offset

    def put(self, key: str, data: bytes | Path) -> None:
        """Bytes in one upload; a file in one upload up to multipart_threshold, above it as
        a resumable upload in chunk_size chunks."""
        with self._mapped(key):
            blob = self._blob(key)
            if not isinstance(data, Path):
                blob.upload_from_string(data, retry=None, timeout=self._timeout)
                return
            if data.stat().st_size > self.options.multipart_threshold:
                unit = _GCS_CHUNK_UNIT
                blob.chunk_size = max(unit, self.options.chunk_size // unit * unit)
            blob.upload_from_filename(str(data), retry=None, timeout=self._timeout)

    def put_if_version(self, key: str, data: bytes, version: str | None) -> bool:
        # Generation 0 matches only a missing object: create-if-absent.
        generation = 0 if version is None else int(version)
        with self._mapped(key):
            try:
                self._blob(key).upload_from_string(
                    data, if_generation_match=generation, retry=None, timeout=self._timeout
                )
            except gexc.PreconditionFailed:
                return False  # another generation now, or none (deleted), or one exists
            return True

    def exists(self, key: str) -> bool:
        with self._mapped(key):
            return bool(self._blob(key).exists(retry=None, timeout=self._timeout))

    def list(self, prefix: str) -> Iterator[ObjectInfo]:
        base = f"{self.prefix}/" if self.prefix else ""
        with self._mapped(None):
            blobs = self._client.list_blobs(
                self._bucket,
                prefix=base + prefix,
                page_size=_LIST_PAGE,
                retry=None,
                timeout=self._timeout,
            )
            for blob in blobs:
                modified = blob.updated.timestamp() if blob.updated else 0.0
                yield ObjectInfo(blob.name[len(base) :], int(blob.size or 0), modified)

    def touch(self, key: str) -> None:
        # A server-side rewrite onto itself makes a new generation with a new `updated`
        # (which list() reports) without sending the bytes through this client.
        with self._mapped(key):
            blob = self._blob(key)
            blob.metadata = {"torchwarm-touched": str(int(time.time()))}
            token, _, _ = blob.rewrite(blob, retry=None, timeout=self._timeout)
            while token is not None:  # large objects take several calls
                token, _, _ = blob.rewrite(blob, token=token, retry=None, timeout=self._timeout)

    def delete(self, key: str) -> None:
        with self._mapped(key), contextlib.suppress(gexc.NotFound):
            self._blob(key).delete(retry=None, timeout=self._timeout)


def _first_line(e: BaseException) -> str:
    text = str(getattr(e, "message", None) or e).strip()
    return one_line(text.splitlines()[0]) if text else type(e).__name__


def _status(e: BaseException) -> int:
    """The HTTP status of an SDK exception, 0 when it has none."""
    if isinstance(e, gexc.GoogleAPICallError):
        return int(e.code or 0)
    if isinstance(e, media_exc.InvalidResponse):
        return int(getattr(e.response, "status_code", 0) or 0)
    return 0


def _reason(e: BaseException) -> str:
    """errors[0]["reason"] of a JSON API error ("notFound", "rateLimitExceeded", ...)."""
    errors = getattr(e, "errors", None) if isinstance(e, gexc.GoogleAPICallError) else None
    first = errors[0] if errors else None
    return str(first.get("reason", "")) if isinstance(first, dict) else ""


def _http(status: int, reason: str) -> str:
    return f"HTTP {status} {reason}" if reason else f"HTTP {status}"


def _crc32c(data: bytes) -> bytes:
    return google_crc32c.Checksum(data).digest()
