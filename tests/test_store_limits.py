"""The store as an adversary that may hold anything of any size: an oversized object is
refused after at most limit + 1 of its bytes crossed the wire.

A FaultProxy (tests/faultproxy.py) in front of SeaweedFS and one in front of
fake-gcs-server count the body bytes each answer carried; the stores under test talk
only to the proxy, through open_store (so RetryingStore is in the path).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

import pytest
from factories import blob, fields
from faultproxy import FaultProxy
from servers import BUCKET, GCSServer, fake_aws_env, s3_options

from torchwarm.env import fingerprint
from torchwarm.errors import ObjectTooLarge
from torchwarm.node import fetch, resolve
from torchwarm.spec import archive, keys
from torchwarm.spec.manifest import MAX_MANIFEST_BYTES
from torchwarm.stores import Store, StoreOptions, open_store

MiB = 1 << 20


@dataclass
class Proxied:
    """A fresh store reached only through `proxy`, and how its object keys appear in paths."""

    backend: str
    store: Store
    proxy: FaultProxy
    prefix: str

    def object_bytes(self, key: str) -> int:
        """Body bytes of the object at `key` sent to the client (GCS: media downloads only;
        its JSON metadata answers are not the object's bytes)."""
        if self.backend == "gcs":
            return sum(
                n
                for m, p, _, n in self.proxy.answers
                if m == "GET" and "alt=media" in p and quote(f"{self.prefix}/{key}", "") in p
            )
        return self.proxy.body_bytes("GET", f"/{BUCKET}/{self.prefix}/{key}")


def expected(proxied: Proxied, limit: int) -> int:
    """What may cross the wire for an object over `limit`: S3 asks for bytes 0..limit and
    learns the size from Content-Range, so exactly limit + 1; GCS reads the size from the
    object's metadata first, so none (and the proxy did see that metadata request)."""
    if proxied.backend == "gcs":
        assert any(m == "GET" and s == 200 for m, _, s, _ in proxied.proxy.answers)
        return 0
    return limit + 1


@pytest.fixture(scope="module")
def gcs_proxy(gcs_server: GCSServer) -> Iterator[FaultProxy]:
    """A FaultProxy in front of the session's fake-gcs-server."""
    server = FaultProxy(int(gcs_server.emulator_host.rsplit(":", 1)[1]))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server
    server.shutdown()
    server.server_close()


@pytest.fixture(params=["seaweedfs", "gcs"])
def proxied(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Proxied:
    prefix = f"limits-{os.urandom(6).hex()}"
    if request.param == "gcs":
        proxy: FaultProxy = request.getfixturevalue("gcs_proxy")
        monkeypatch.setenv("STORAGE_EMULATOR_HOST", proxy.endpoint)
        monkeypatch.setenv("GOOGLE_CLOUD_PROJECT", "torchwarm-test")
        store = open_store(f"gs://{BUCKET}/{prefix}", StoreOptions())
    else:
        proxy = request.getfixturevalue("fault_proxy")
        fake_aws_env(monkeypatch)
        store = open_store(f"s3://{BUCKET}/{prefix}", s3_options(proxy.endpoint))
    proxy.reset()
    return Proxied(request.param, store, proxy, prefix)


def test_oversized_manifest_is_refused_after_cap_plus_one_bytes(proxied: Proxied) -> None:
    """A 3 MiB object at a node's manifest key: resolve raises ObjectTooLarge, and at most
    MAX_MANIFEST_BYTES + 1 of its bytes reached the node."""
    key = keys.manifest_key("mlp", fingerprint.digest(fields()))
    proxied.store.put(key, b"{" + b" " * (3 * MiB))
    proxied.proxy.reset()
    with pytest.raises(ObjectTooLarge):
        resolve.resolve(proxied.store, "mlp", fields())
    assert proxied.object_bytes(key) == expected(proxied, MAX_MANIFEST_BYTES)


def test_blob_download_stops_at_manifest_size_plus_one(proxied: Proxied, tmp_path: Path) -> None:
    """A manifest names a 1000-byte blob, the store holds 5 MiB at its key: its stream
    raises ObjectTooLarge, at most 1001 of those bytes reached the node, and no partial
    copy is left to resume from."""
    ref = blob("cachedir", os.urandom(1000))
    key = keys.blob_key(ref.sha256)
    proxied.store.put(key, os.urandom(5 * MiB))
    proxied.proxy.reset()
    with pytest.raises(ObjectTooLarge):
        archive.read_whole(fetch.Streamed(proxied.store, ref, tmp_path))
    assert proxied.object_bytes(key) == expected(proxied, ref.size)
    assert list(fetch.partials_dir(tmp_path).iterdir()) == []
