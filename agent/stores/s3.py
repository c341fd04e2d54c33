"""Amazon S3 and S3-compatible stores (MinIO, R2, SeaweedFS): `s3://bucket/prefix`.

Only adapts boto3 calls to the Store protocol. One attempt per request (botocore
retries off): RetryingStore is the retry policy. Credentials come only from the
SDK's default chain (env, profiles, web identity / IRSA, instance metadata).
"""

from __future__ import annotations

import contextlib
import os
import re
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

import boto3
import botocore.session
import urllib3
from botocore.config import Config
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    ConnectionClosedError,
    ConnectTimeoutError,
    EndpointConnectionError,
    IncompleteReadError,
    NoCredentialsError,
    PartialCredentialsError,
    ReadTimeoutError,
    ResponseStreamingError,
)

from torchwarm.errors import (
    ObjectNotFound,
    ObjectTooLarge,
    StoreError,
    TransientStoreError,
    one_line,
)
from torchwarm.stores.base import Capabilities, ObjectInfo, Read, check_key
from torchwarm.stores.transfer import write_ranges_in_order

if TYPE_CHECKING:
    from torchwarm.stores import StoreOptions

_MAX_PARTS = 10_000
_LIST_PAGE = 1000  # keys per listing page: S3's most (tests lower it to get several pages)
_MIN_PART = 5 << 20  # S3's minimum part size (all parts but the last)
_TRANSIENT_CODES = {
    "SlowDown",
    "Throttling",
    "ThrottlingException",
    "RequestTimeout",
    "RequestTimeTooSkewed",
    "InternalError",
    "ServiceUnavailable",
    "ConditionalRequestConflict",  # AWS: a concurrent conditional write; retry
    "OperationAborted",
}
_NETWORK_ERRORS = (
    EndpointConnectionError,
    ConnectTimeoutError,
    ReadTimeoutError,
    ConnectionClosedError,
    ResponseStreamingError,
    IncompleteReadError,  # a body shorter than its Content-Length
)


_SESSION_LOCK = threading.Lock()
_LOADER: Any = None


def _new_session() -> boto3.session.Session:
    """A fresh session (credentials resolved anew) sharing one model loader.

    Loading botocore's JSON service models costs ~0.2 s per session; the loader
    only caches those read-only files, so every store can share it.
    """
    global _LOADER
    with _SESSION_LOCK:
        core = botocore.session.Session()
        if _LOADER is None:
            _LOADER = core.get_component("data_loader")
        else:
            core.register_component("data_loader", _LOADER)
        return boto3.session.Session(botocore_session=core)


@dataclass
class _Upload:
    """A multipart upload in progress: its id, part size, and the parts stored so far."""

    upload_id: str
    part_size: int
    etags: dict[int, str] = field(default_factory=dict)


class S3Store:
    """Objects are keys under `prefix` in `bucket`."""

    def __init__(self, bucket: str, prefix: str, options: StoreOptions) -> None:
        self.capabilities = Capabilities(writable=True, resumable_download=True, remote=True)
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.url = f"s3://{bucket}/{self.prefix}" if self.prefix else f"s3://{bucket}"
        self.options = options
        self._session = _new_session()
        config = Config(
            region_name=options.region,
            s3={"addressing_style": "path" if options.path_style else "auto"},
            # One attempt per request: RetryingStore is the one retry policy.
            retries={"total_max_attempts": 1, "mode": "standard"},
            connect_timeout=options.connect_timeout_s,
            read_timeout=options.read_timeout_s,
            max_pool_connections=max(10, options.concurrency + 2),
            request_checksum_calculation=options.request_checksum_calculation,
            response_checksum_validation="when_required",
            tcp_keepalive=True,
        )
        # An endpoint without a region (MinIO, SeaweedFS) still needs one to sign with.
        region = options.region
        if options.endpoint_url and not (region or self._session.region_name):
            region = "us-east-1"
        with _SESSION_LOCK:
            self._client: Any = self._session.client(
                "s3", endpoint_url=options.endpoint_url, region_name=region, config=config
            )
        self.endpoint = self._client.meta.endpoint_url
        self._lock = threading.Lock()
        self._uploads: dict[tuple[str, str, int, int], _Upload] = {}

    # -- keys and errors ----------------------------------------------------------

    def _key(self, key: str) -> str:
        check_key(key)
        return f"{self.prefix}/{key}" if self.prefix else key

    def _identity(self) -> str:
        try:
            creds = self._session.get_credentials()
        except BotoCoreError:
            creds = None
        if creds is None:
            return "no credentials"
        return f"access key {creds.access_key} (from {creds.method})"

    def _error(self, e: Exception, key: str | None) -> StoreError:
        """Map a botocore exception to one actionable line."""
        where = f"s3://{self.bucket}/{self._key(key)}" if key else self.url
        if isinstance(e, (NoCredentialsError, PartialCredentialsError)):
            return StoreError(
                f"{where}: no AWS credentials found: set AWS_PROFILE or AWS_ACCESS_KEY_ID/"
                "AWS_SECRET_ACCESS_KEY, or run with an IAM role (IRSA, instance profile)"
            )
        if isinstance(e, (EndpointConnectionError, ConnectTimeoutError)):
            return TransientStoreError(
                f"{where}: cannot reach the S3 endpoint {self.endpoint}: "
                "check endpoint_url, DNS and the network path to it"
            )
        if isinstance(e, _NETWORK_ERRORS):
            return TransientStoreError(
                f"{where}: connection to {self.endpoint} failed: {one_line(str(e))}"
            )
        if not isinstance(e, ClientError):
            return StoreError(f"{where}: S3 request failed: {one_line(str(e))}")
        err = e.response.get("Error", {})
        code = _code(e)
        meta = e.response.get("ResponseMetadata", {})
        status = int(meta.get("HTTPStatusCode", 0))
        message = one_line(str(err.get("Message", ""))) or code
        if code == "NoSuchBucket" or (code == "404" and key is None):
            return StoreError(
                f"{where}: bucket {self.bucket!r} does not exist at {self.endpoint}: "
                "create it or fix the store URL"
            )
        if code in ("NoSuchKey", "404", "NotFound"):
            return ObjectNotFound(f"{where} does not exist")
        if code in ("PermanentRedirect", "AuthorizationHeaderMalformed", "301") or status == 301:
            region = meta.get("HTTPHeaders", {}).get("x-amz-bucket-region") or err.get("Region")
            if not region:
                found = re.search(r"expecting '([a-z0-9-]+)'", message)
                region = found.group(1) if found else None
            hint = f"set the store's region to {region}" if region else "set the store's region"
            return StoreError(
                f"{where}: bucket {self.bucket!r} is in another region than "
                f"{self._client.meta.region_name}: {hint}"
            )
        if code in ("AccessDenied", "403", "Forbidden", "InvalidAccessKeyId") or status == 403:
            return StoreError(
                f"{where}: access denied for {self._identity()}: grant it s3:GetObject, "
                "s3:PutObject and s3:ListBucket on the bucket, or use other credentials"
            )
        if code == "SignatureDoesNotMatch":
            return StoreError(
                f"{where}: the store rejected the signature of {self._identity()}: "
                "check the secret key (and request_checksum_calculation for S3-compatible stores)"
            )
        if code == "NoSuchUpload":
            return TransientStoreError(f"{where}: the multipart upload is gone; starting again")
        if code in _TRANSIENT_CODES or status >= 500 or status == 429:
            return TransientStoreError(
                f"{where}: HTTP {status} {code} from {self.endpoint} (throttled or failing)"
            )
        return StoreError(f"{where}: S3 answered HTTP {status} {code}: {message}")

    @contextlib.contextmanager
    def _mapped(self, key: str | None) -> Iterator[None]:
        try:
            yield
        except StoreError:
            raise
        except (BotoCoreError, ClientError) as e:
            raise self._error(e, key) from e
        except (ConnectionError, TimeoutError, urllib3.exceptions.HTTPError) as e:
            # A socket error that escaped botocore's wrapping. Other OSErrors (the
            # caller's file or sink: missing file, disk full) propagate unchanged.
            raise TransientStoreError(
                f"{self._where(key)}: connection to {self.endpoint} failed: {one_line(str(e))}"
            ) from e

    def _where(self, key: str | None) -> str:
        return f"s3://{self.bucket}/{self._key(key)}" if key else self.url

    # -- the Store protocol --------------------------------------------------------

    def read(self, key: str, limit: int) -> Read:
        """One GET for `bytes=0-limit`: the server sends at most limit + 1 bytes, and its
        Content-Range tells the whole size, so an oversized object is refused unread. The
        version token is the ETag."""
        where = self._where(key)
        with self._mapped(key):
            resp = self._ranged_get(key, 0, limit + 1)
            etag = resp.get("ETag") or None
            total = _total_size(resp)
            if total > limit:
                _read_body(resp, 0)
                raise ObjectTooLarge(where, limit, etag)
            data = _read_body(resp, total)
            if len(data) != total:
                raise TransientStoreError(f"{where}: short read ({len(data)} of {total} bytes)")
            return Read(bytes(data), etag)

    def _ranged_get(self, key: str, start: int, end: int) -> Any:
        """GET bytes [start, end); None when the object ends at or before `start` (non-zero).

        An empty object answers 416 to every range, so a 416 at offset 0 is followed by
        a plain GET; its body is then read only as far as the caller allows.
        """
        full = self._key(key)
        try:
            return self._client.get_object(
                Bucket=self.bucket, Key=full, Range=f"bytes={start}-{end - 1}"
            )
        except ClientError as e:
            if _code(e) != "InvalidRange":
                raise
            if start:
                return None
            return self._client.get_object(Bucket=self.bucket, Key=full)

    def download(
        self, key: str, sink: BinaryIO, *, limit: int | None = None, offset: int = 0
    ) -> int:
        """Write the object (from byte `offset`) to `sink`; ranges in parallel when large.

        The first GET asks for one chunk (never past byte `limit`); its Content-Range tells
        the size. An object over `limit` is refused there, before a byte reaches the sink. A
        small object is then done in one request; a large one fetches the remaining chunks
        in parallel, pinned to the first answer's ETag.
        """
        chunk = self.options.download_chunk_size
        full = self._key(key)
        where = self._where(key)
        if limit is not None and offset > limit:
            raise ObjectTooLarge(where, limit)
        end = offset + chunk if limit is None else min(offset + chunk, limit + 1)
        with self._mapped(key):
            resp = self._ranged_get(key, offset, end)
            if resp is None:
                return 0  # nothing left past `offset`
            if offset and not resp.get("ContentRange"):
                _read_body(resp, 0)
                raise StoreError(f"{where}: the store ignored a Range request")
            total = _total_size(resp)
            if limit is not None and total > limit:
                _read_body(resp, 0)
                raise ObjectTooLarge(where, limit)
            expected = max(0, min(end, total) - offset)
            first = _read_body(resp, expected)
            if len(first) != expected:
                raise TransientStoreError(f"{where}: short read ({len(first)} of {expected} bytes)")
            sink.write(first)
            start = offset + len(first)
            if start >= total:
                return len(first)
            etag = resp.get("ETag")

            def fetch(lo: int, hi: int) -> bytes:
                with self._mapped(key):
                    extra = {"IfMatch": etag} if etag else {}
                    r = self._client.get_object(
                        Bucket=self.bucket, Key=full, Range=f"bytes={lo}-{hi - 1}", **extra
                    )
                    data = _read_body(r, hi - lo)
                if len(data) != hi - lo:
                    raise TransientStoreError(
                        f"{where}: short read ({len(data)} of {hi - lo} bytes)"
                    )
                return data

            rest = write_ranges_in_order(fetch, start, total, chunk, self.options.concurrency, sink)
            return len(first) + rest

    def put(self, key: str, data: bytes | Path) -> None:
        if isinstance(data, Path):
            self._put_file(key, data)
            return
        with self._mapped(key):
            self._client.put_object(Bucket=self.bucket, Key=self._key(key), Body=data)

    def _put_file(self, key: str, path: Path) -> None:
        """One streamed PUT up to multipart_threshold, a multipart upload above it."""
        size = path.stat().st_size
        if size <= self.options.multipart_threshold:
            with self._mapped(key), path.open("rb") as f:
                self._client.put_object(
                    Bucket=self.bucket, Key=self._key(key), Body=f, ContentLength=size
                )
            return
        self._multipart(key, path, size)

    def _multipart(self, key: str, path: Path, size: int) -> None:
        """Upload in parts on a thread pool; a retry after a transient error resumes.

        The parts already stored are remembered per (key, file, size, mtime), so
        RetryingStore's next attempt sends only the missing ones instead of
        starting again. Any other error aborts the upload.
        """
        full = self._key(key)
        ident = (full, str(path.resolve()), size, path.stat().st_mtime_ns)
        with self._lock:
            upload = self._uploads.pop(ident, None)
        if upload is None:
            part = max(self.options.chunk_size, _MIN_PART, -(-size // _MAX_PARTS))
            with self._mapped(key):
                resp = self._client.create_multipart_upload(Bucket=self.bucket, Key=full)
            upload = _Upload(resp["UploadId"], part)
        part = upload.part_size
        count = -(-size // part)
        fd = os.open(path, os.O_RDONLY)

        def send(number: int) -> None:
            lo = (number - 1) * part
            data = os.pread(fd, min(part, size - lo), lo)
            with self._mapped(key):
                r = self._client.upload_part(
                    Bucket=self.bucket,
                    Key=full,
                    UploadId=upload.upload_id,
                    PartNumber=number,
                    Body=data,
                )
            upload.etags[number] = r["ETag"]

        pool = ThreadPoolExecutor(self.options.concurrency, thread_name_prefix="torchwarm-part")
        try:
            todo = [n for n in range(1, count + 1) if n not in upload.etags]
            for future in [pool.submit(send, n) for n in todo]:
                future.result()
            pool.shutdown()
            parts = [{"PartNumber": n, "ETag": upload.etags[n]} for n in range(1, count + 1)]
            with self._mapped(key):
                self._client.complete_multipart_upload(
                    Bucket=self.bucket,
                    Key=full,
                    UploadId=upload.upload_id,
                    MultipartUpload={"Parts": parts},
                )
        except TransientStoreError as e:
            pool.shutdown(cancel_futures=True)
            if isinstance(e.__cause__, ClientError) and _code(e.__cause__) == "NoSuchUpload":
                raise  # the upload is gone (expired or completed): the retry starts afresh
            with self._lock:
                self._uploads[ident] = upload  # the retry sends only the missing parts
            raise
        except BaseException:
            pool.shutdown(cancel_futures=True)
            # Parts of an aborted upload are freed; a lifecycle rule
            # (AbortIncompleteMultipartUpload) catches uploads whose retry never came.
            with contextlib.suppress(BotoCoreError, ClientError):
                self._client.abort_multipart_upload(
                    Bucket=self.bucket, Key=full, UploadId=upload.upload_id
                )
            raise
        finally:
            os.close(fd)

    def put_if_version(self, key: str, data: bytes, version: str | None) -> bool:
        condition = {"IfNoneMatch": "*"} if version is None else {"IfMatch": version}
        with self._mapped(key):
            try:
                self._client.put_object(
                    Bucket=self.bucket, Key=self._key(key), Body=data, **condition
                )
            except ClientError as e:
                # 412: another writer won, or replaced it since; to If-Match on a deleted
                # key AWS answers 404 NoSuchKey (SeaweedFS 412).
                if _code(e) in ("PreconditionFailed", "NoSuchKey"):
                    return False
                raise
            return True

    def exists(self, key: str) -> bool:
        with self._mapped(key):
            try:
                self._client.head_object(Bucket=self.bucket, Key=self._key(key))
            except ClientError as e:
                if _code(e) in ("404", "NoSuchKey", "NotFound"):
                    return False
                raise
            return True

    def list(self, prefix: str) -> Iterator[ObjectInfo]:
        """ListObjectsV2 page by page. botocore's paginator ends quietly on a page that
        says more keys follow (IsTruncated) but carries no token to ask for them; a short
        listing makes gc take live blobs for unreferenced ones, so that page raises here."""
        base = f"{self.prefix}/" if self.prefix else ""
        where = f"{self.url}/{prefix}" if prefix else self.url
        token: str | None = None
        with self._mapped(None):
            while True:
                more = {"ContinuationToken": token} if token else {}
                page = self._client.list_objects_v2(
                    Bucket=self.bucket, Prefix=base + prefix, MaxKeys=_LIST_PAGE, **more
                )
                for obj in page.get("Contents", []):
                    yield ObjectInfo(
                        obj["Key"][len(base) :], int(obj["Size"]), obj["LastModified"].timestamp()
                    )
                if not page.get("IsTruncated"):
                    return
                following = page.get("NextContinuationToken")
                if not following or following == token:
                    raise StoreError(
                        f"{where}: the listing from {self.endpoint} stopped part-way (a page "
                        "said more keys follow but gave no new continuation token); "
                        "nothing after it is known: check the S3-compatible store or a proxy"
                    )
                token = following

    def delete(self, key: str) -> None:
        with self._mapped(key):
            self._client.delete_object(Bucket=self.bucket, Key=self._key(key))

    def touch(self, key: str) -> None:
        # A copy onto itself with new metadata is the one S3 call that renews
        # LastModified without sending the bytes (objects up to 5 GB).
        with self._mapped(key):
            self._client.copy_object(
                Bucket=self.bucket,
                Key=self._key(key),
                CopySource={"Bucket": self.bucket, "Key": self._key(key)},
                MetadataDirective="REPLACE",
                Metadata={"torchwarm-touched": str(int(time.time()))},
            )


def _total_size(resp: Any) -> int:
    """The object's size: the total of a Content-Range ('bytes 0-99/1234'), or the
    Content-Length of an answer that holds the whole object."""
    content_range = resp.get("ContentRange")
    if content_range and "/" in content_range:
        total = content_range.rsplit("/", 1)[1]
        if total.isdigit():
            return int(total)
    return int(resp.get("ContentLength") or 0)


_PIECE = 256 << 10  # a body is read in pieces of this into one buffer


def _read_body(resp: Any, n: int) -> bytes | bytearray:
    """At most `n` bytes of an answer's body, read piece by piece into one buffer (a
    whole read joins its chunks: twice the range in memory); a body not read to its end
    is closed, so that what the server sends past `n` is never read."""
    body = resp["Body"]
    length = resp.get("ContentLength")
    buf = bytearray()
    if length is not None and int(length) <= n:  # to its end: the connection is reused
        while piece := body.read(_PIECE):
            buf += piece
        return buf
    while len(buf) < n and (piece := body.read(min(_PIECE, n - len(buf)))):
        buf += piece
    body.close()
    return buf


def _code(e: ClientError) -> str:
    return str(e.response.get("Error", {}).get("Code", ""))
