"""Faults from a real loopback proxy in front of SeaweedFS, and the one-line errors users see;
last, the retry policy against what a store declares it can do (its capabilities).

Every test asserts that its fault really happened (the proxy's record of what it answered,
the SDK exception at the root of the error, or the offsets a store was asked for), so none
can pass without its fault.
"""

from __future__ import annotations

import hashlib
import io
import os
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, BinaryIO

import pytest
from botocore.exceptions import EndpointConnectionError, NoCredentialsError
from faultproxy import FaultProxy
from google.api_core import exceptions as gexc
from servers import BUCKET, fake_aws_env, free_port, s3_options

from torchwarm.errors import ObjectNotFound, StoreError, TransientStoreError
from torchwarm.stores import Store, open_store
from torchwarm.stores.local import LocalStore
from torchwarm.stores.retry import RetryingStore
from torchwarm.stores.s3 import S3Store

pytestmark = pytest.mark.timed  # deadline bounds; see pyproject.toml

MiB = 1 << 20
BLOB = os.urandom(24 * MiB)


@pytest.fixture
def faulty(proxy: FaultProxy, monkeypatch: pytest.MonkeyPatch) -> FaultProxy:
    """The reset fault proxy, with fake AWS credentials for the clients of the test."""
    fake_aws_env(monkeypatch)
    return proxy


def retrying(endpoint: str, attempts: int = 25, deadline_s: float = 30.0) -> RetryingStore:
    """An S3 store behind `endpoint` with fast backoff (the policy, not the timing, is tested)."""
    options = s3_options(endpoint, chunk_size=5 * MiB, download_chunk_size=5 * MiB,
                         multipart_threshold=5 * MiB, concurrency=4)  # fmt: skip
    inner = S3Store(BUCKET, f"faults-{os.urandom(4).hex()}", options)
    return RetryingStore(inner, attempts, deadline_s, backoff_s=0.01, max_backoff_s=0.2)


def answered(proxy: FaultProxy, method: str, status: int) -> int:
    """How many `method` requests the proxy answered with `status`."""
    return sum(1 for m, _, s, _ in proxy.answers if m == method and s == status)


def test_put_survives_30_percent_503(faulty: FaultProxy) -> None:
    """With 30 % of requests answered 503, put and read succeed."""
    store = retrying(faulty.endpoint)
    faulty.fail_rate = 0.3
    for i in range(10):
        store.put(f"k{i}", b"v%d" % i)
    assert [store.read(f"k{i}", 10).data for i in range(10)] == [b"v%d" % i for i in range(10)]
    assert answered(faulty, "PUT", 503) > 0 and answered(faulty, "GET", 503) > 0


def test_put_path_multipart_survives_30_percent_503(faulty: FaultProxy, tmp_path: Path) -> None:
    """With 30 % of requests answered 503, a 24 MiB multipart put of a path stores the exact
    bytes."""
    src = tmp_path / "blob"
    src.write_bytes(BLOB)
    store = retrying(faulty.endpoint)
    faulty.fail_rate = 0.3
    store.put("blob", src)
    faulty.fail_rate = 0.0
    assert answered(faulty, "PUT", 503) > 0  # parts were refused and sent again
    stored = store.read("blob", len(BLOB)).data
    assert hashlib.sha256(stored).digest() == hashlib.sha256(BLOB).digest()


def test_put_path_retry_sends_only_missing_parts(faulty: FaultProxy, tmp_path: Path) -> None:
    """When completing a multipart upload fails once, the retry re-sends no part."""
    src = tmp_path / "blob"
    src.write_bytes(BLOB)
    store = retrying(faulty.endpoint)
    faulty.fail_once = lambda method, path: method == "POST" and "uploadId=" in path
    store.put("blob", src)
    part_puts = [p for m, p in faulty.seen if m == "PUT" and "partNumber=" in p]
    completes = [p for m, p in faulty.seen if m == "POST" and "uploadId=" in p]
    assert len(part_puts) == 5 and len(completes) == 2  # 24 MiB in 5 MiB parts
    assert faulty.fail_once is None and answered(faulty, "POST", 503) == 1
    assert store.read("blob", len(BLOB)).data == BLOB


def test_download_survives_30_percent_503(faulty: FaultProxy) -> None:
    """With 30 % of requests answered 503, a ranged download is byte-exact."""
    store = retrying(faulty.endpoint)
    store.put("blob", BLOB)
    faulty.fail_rate = 0.3
    sink = io.BytesIO()
    assert store.download("blob", sink) == len(BLOB)
    assert answered(faulty, "GET", 503) > 0
    assert sink.getvalue() == BLOB


def test_download_resumes_after_cut_bodies(faulty: FaultProxy) -> None:
    """Bodies cut off mid-transfer are resumed at the right offset: no byte twice or missing."""
    store = retrying(faulty.endpoint)
    store.put("blob", BLOB)
    faulty.cut_rate = 0.3
    sink = io.BytesIO()
    assert store.download("blob", sink) == len(BLOB)
    assert faulty.cut > 0
    assert sink.getvalue() == BLOB


def test_all_503_fails_within_deadline_with_one_line(faulty: FaultProxy, tmp_path: Path) -> None:
    """With every request answered 503, each call gives up by its deadline with one line."""
    store = retrying(faulty.endpoint, attempts=1000, deadline_s=2.0)
    src = tmp_path / "f"
    src.write_bytes(b"x" * 100)
    faulty.fail_rate = 1.0
    calls = [
        lambda: store.put("k", b"v"),
        lambda: store.put("k", src),
        lambda: store.download("k", io.BytesIO()),
    ]
    for call in calls:
        start, refused = time.monotonic(), faulty.failed
        with pytest.raises(StoreError) as info:
            call()
        assert time.monotonic() - start < 2.0 + 1.0
        assert faulty.failed - refused > 1  # answered 503, and retried
        message = str(info.value)
        assert "\n" not in message
        assert "503" in message and "try again later" in message
        assert not isinstance(info.value, TransientStoreError)


def test_no_retry_on_not_found(faulty: FaultProxy) -> None:
    """A missing key is answered at once, not retried."""
    store = retrying(faulty.endpoint)
    start = time.monotonic()
    with pytest.raises(ObjectNotFound):
        store.read("missing", 100)
    assert time.monotonic() - start < 1.0
    assert [(m, s) for m, _, s, _ in faulty.answers] == [("GET", 404)]  # asked once


def test_access_denied_names_identity_and_is_not_retried(
    faulty: FaultProxy, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Unknown credentials fail at once, with one line that names the access key."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "intruderkey")
    store = open_store(f"s3://{BUCKET}/p", s3_options(faulty.endpoint))
    start = time.monotonic()
    with pytest.raises(StoreError) as info:
        store.put("k", b"v")
    assert time.monotonic() - start < 2.0
    assert "intruderkey" in str(info.value) and "\n" not in str(info.value)
    assert [(m, s) for m, _, s, _ in faulty.answers] == [("PUT", 403)]  # refused, not retried


def test_missing_bucket_says_create_it(faulty: FaultProxy) -> None:
    """A missing bucket is a StoreError that says to create it, not ObjectNotFound."""
    store = open_store("s3://no-such-bucket/p", s3_options(faulty.endpoint))
    with pytest.raises(StoreError, match="does not exist.*create it") as info:
        store.read("k", 100)
    assert not isinstance(info.value, ObjectNotFound)
    assert [(m, s) for m, _, s, _ in faulty.answers] == [("GET", 404)]


def test_no_credentials_says_where_to_put_them(
    faulty: FaultProxy, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without any AWS credentials the error names the places the SDK looks."""
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    store = open_store(f"s3://{BUCKET}/p", s3_options(faulty.endpoint))
    with pytest.raises(StoreError, match="no AWS credentials.*AWS_PROFILE") as info:
        store.read("k", 100)
    assert isinstance(info.value.__cause__, NoCredentialsError)
    assert faulty.answers == []  # nothing was sent


def test_unreachable_endpoint_names_it(monkeypatch: pytest.MonkeyPatch) -> None:
    """A closed port gives one line naming the endpoint, after a bounded retry."""
    fake_aws_env(monkeypatch)
    endpoint = f"http://127.0.0.1:{free_port()}"
    options = replace(s3_options(endpoint), attempts=2, deadline_s=5.0)
    with pytest.raises(StoreError, match="cannot reach the S3 endpoint") as info:
        open_store(f"s3://{BUCKET}/p", options).exists("k")
    assert endpoint in str(info.value) and "\n" not in str(info.value)
    assert "gave up after 2 attempts" in str(info.value)  # each one refused
    assert isinstance(info.value.__cause__.__cause__, EndpointConnectionError)


def test_gcs_missing_bucket_says_create_it(
    gcs_server: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On GCS, listing a missing bucket is a StoreError that says to create it."""
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", gcs_server.emulator_host)
    store = open_store("gs://no-such-bucket/p")
    with pytest.raises(StoreError, match="create it") as info:
        list(store.list(""))
    assert isinstance(info.value.__cause__, gexc.NotFound)  # the server's 404


# -- the retry policy against a store's declared capabilities ------------------------------


class BreaksOnce:
    """A local store whose first download breaks (transiently) after `cut` bytes reached the
    sink, declaring `resumable_download` as told; records the offset of every download."""

    def __init__(self, inner: Store, cut: int, resumable: bool) -> None:
        self.inner, self.url, self.cut = inner, inner.url, cut
        self.capabilities = replace(inner.capabilities, resumable_download=resumable)
        self.offsets: list[int] = []

    def download(
        self, key: str, sink: BinaryIO, *, limit: int | None = None, offset: int = 0
    ) -> int:
        self.offsets.append(offset)
        if len(self.offsets) > 1:
            return self.inner.download(key, sink, limit=limit, offset=offset)
        whole = io.BytesIO()
        self.inner.download(key, whole, limit=limit)
        sink.write(whole.getvalue()[: self.cut])
        raise TransientStoreError(f"{self.url}/{key}: connection reset by peer (test)")


def test_retry_resumes_a_store_that_declares_resumable_download(tmp_path: Path) -> None:
    """A download broken after 1000 bytes, from a store that declares resumable_download,
    is resumed at offset 1000: every byte reaches the sink once."""
    local = LocalStore(tmp_path / "store")
    local.put("blob", BLOB[:5000])
    store = BreaksOnce(local, 1000, resumable=True)
    sink = io.BytesIO()
    retrying = RetryingStore(store, backoff_s=0.01)  # type: ignore[arg-type]
    assert retrying.download("blob", sink, limit=5000) == 5000
    assert store.offsets == [0, 1000] and sink.getvalue() == BLOB[:5000]


def test_retry_never_repeats_bytes_of_a_store_that_cannot_resume(tmp_path: Path) -> None:
    """From a store that declares resumable_download False, a download broken after 1000
    bytes is not started again (its sink would get those bytes twice): one line says so."""
    local = LocalStore(tmp_path / "store")
    local.put("blob", BLOB[:5000])
    store = BreaksOnce(local, 1000, resumable=False)
    sink = io.BytesIO()
    retrying = RetryingStore(store, backoff_s=0.01)  # type: ignore[arg-type]
    with pytest.raises(StoreError, match="after 1000 bytes and this store cannot resume"):
        retrying.download("blob", sink)
    assert store.offsets == [0] and sink.getvalue() == BLOB[:1000]
