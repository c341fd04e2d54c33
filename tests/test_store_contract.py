"""The Store contract (agent/stores/base.py), run against every backend on real servers."""

from __future__ import annotations

import errno
import hashlib
import io
import json
import os
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import WORKLOAD, torchwarm
from factories import inject_env, tree
from servers import ListingFaults, StoreFactory
from synthetic import publish_synthetic

from torchwarm.errors import ObjectNotFound, ObjectTooLarge, ReadOnlyStoreError, StoreError
from torchwarm.stores import Capabilities, StoreOptions, open_store

MiB = 1 << 20
LARGE = os.urandom(40 * MiB)
# Small chunks so 40 MiB takes several parallel ranges and multipart parts.
TRANSFER: dict[str, Any] = {"chunk_size": 8 * MiB, "download_chunk_size": 8 * MiB,
                            "multipart_threshold": 8 * MiB, "concurrency": 4}  # fmt: skip


class HashingSink:
    """A sink that is not a file: it only hashes, so bytes must arrive in order."""

    def __init__(self) -> None:
        self.sha = hashlib.sha256()
        self.size = 0

    def write(self, data: bytes) -> int:
        self.sha.update(data)
        self.size += len(data)
        return len(data)


def test_put_then_read(store_factory: StoreFactory) -> None:
    """What put stored, read returns."""
    store = store_factory()
    store.put("a/b.json", b'{"x": 1}')
    assert store.read("a/b.json", 100).data == b'{"x": 1}'


def test_put_replaces(store_factory: StoreFactory) -> None:
    """A second put replaces the object."""
    store = store_factory()
    store.put("k", b"old")
    store.put("k", b"new")
    assert store.read("k", 100).data == b"new"


def test_read_missing_raises_object_not_found(store_factory: StoreFactory) -> None:
    """Reading a missing key raises ObjectNotFound."""
    with pytest.raises(ObjectNotFound):
        store_factory().read("nope/missing", 100)


def test_download_missing_raises_object_not_found(store_factory: StoreFactory) -> None:
    """Downloading a missing key raises ObjectNotFound and writes nothing."""
    sink = io.BytesIO()
    with pytest.raises(ObjectNotFound):
        store_factory().download("missing", sink)
    assert sink.getvalue() == b""


def test_exists(store_factory: StoreFactory) -> None:
    """exists is true for a stored key only, not for its prefix."""
    store = store_factory()
    store.put("dir/obj", b"1")
    assert store.exists("dir/obj")
    assert not store.exists("dir/ob")
    assert not store.exists("dir")


def test_list_gives_relative_keys_and_sizes(store_factory: StoreFactory) -> None:
    """list yields keys relative to the store's prefix, with sizes, filtered by prefix."""
    store = store_factory()
    store.put("blobs/aa/1", b"x" * 3)
    store.put("blobs/ab/2", b"y" * 5)
    store.put("manifests/m", b"z")
    found = {(o.key, o.size) for o in store.list("blobs/")}
    assert found == {("blobs/aa/1", 3), ("blobs/ab/2", 5)}
    assert {o.key for o in store.list("blobs/a")} == {"blobs/aa/1", "blobs/ab/2"}
    assert {o.key for o in store.list("")} == {"blobs/aa/1", "blobs/ab/2", "manifests/m"}


def test_list_ignores_sibling_prefixes(store_factory: StoreFactory) -> None:
    """A store never lists objects of a store whose prefix merely starts the same."""
    store_factory(prefix="p-sib/a").put("k", b"1")
    store_factory(prefix="p-sib/ab").put("k", b"2")
    assert [o.key for o in store_factory(prefix="p-sib/a").list("")] == ["k"]


def test_list_that_cannot_finish_raises_store_error(
    store_factory: StoreFactory, listing_faults: ListingFaults
) -> None:
    """A listing that fails part-way (a folder that cannot be read, a page the server will
    not send) raises StoreError instead of ending early with the keys it got."""
    store = store_factory()
    for name in ("a", "b", "c"):
        store.put(f"manifests/{name}/m", b"1")
    broken = listing_faults.unreadable(store, "manifests/b")
    with pytest.raises(StoreError):
        list(broken.list("manifests/"))


@pytest.mark.parametrize("store_factory", ["moto", "seaweedfs"], indirect=True)
def test_list_refuses_a_truncated_page_without_a_token(
    store_factory: StoreFactory, listing_faults: ListingFaults
) -> None:
    """S3: a listing page that says more keys follow (IsTruncated) but gives no continuation
    token raises StoreError instead of ending the listing there."""
    store = store_factory()
    for name in ("a", "b"):
        store.put(f"blobs/{name}", b"1")
    with pytest.raises(StoreError, match="continuation token"):
        list(listing_faults.tokenless(store).list("blobs/"))


def test_delete(store_factory: StoreFactory) -> None:
    """A deleted object is gone."""
    store = store_factory()
    store.put("k", b"1")
    store.delete("k")
    assert not store.exists("k")
    with pytest.raises(ObjectNotFound):
        store.read("k", 100)


def test_delete_missing_is_not_an_error(store_factory: StoreFactory) -> None:
    """Deleting a missing key succeeds."""
    store_factory().delete("never/was")


def test_put_if_version_none_creates_once(store_factory: StoreFactory) -> None:
    """The first put_if_version with version=None creates; the second returns False and
    keeps the original."""
    store = store_factory()
    assert store.put_if_version("m", b"first", version=None) is True
    assert store.put_if_version("m", b"second", version=None) is False
    assert store.read("m", 100).data == b"first"


def test_put_if_version_none_race_has_one_winner(store_factory: StoreFactory) -> None:
    """Of 8 threads racing to create one key (version=None), exactly one wins, and its
    data stays."""
    store = store_factory()
    (winner,) = race_8(lambda i: store.put_if_version("race", f"writer {i}".encode(), None))
    assert store.read("race", 100).data == f"writer {winner}".encode()


def race_8(write: Callable[[int], bool]) -> list[int]:
    """Run write(0..7) on 8 threads released together; the indexes whose write won."""
    barrier = threading.Barrier(8)
    results: dict[int, bool] = {}

    def race(i: int) -> None:
        barrier.wait()
        results[i] = write(i)

    threads = [threading.Thread(target=race, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 8
    return [i for i, won in results.items() if won]


def test_download_small_object(store_factory: StoreFactory) -> None:
    """A small object downloads whole, and download returns its size."""
    store = store_factory()
    store.put("small", b"hello world")
    sink = io.BytesIO()
    assert store.download("small", sink) == 11
    assert sink.getvalue() == b"hello world"


def test_download_empty_object(store_factory: StoreFactory) -> None:
    """An empty object downloads as zero bytes."""
    store = store_factory()
    store.put("empty", b"")
    sink = io.BytesIO()
    assert store.download("empty", sink) == 0
    assert sink.getvalue() == b""


def test_download_large_in_order(store_factory: StoreFactory) -> None:
    """A 40 MiB object, fetched in parallel ranges, reaches a non-seekable sink in order."""
    store = store_factory(**TRANSFER)
    store.put("large", LARGE)
    sink = HashingSink()
    assert store.download("large", sink) == len(LARGE)  # type: ignore[arg-type]
    assert sink.size == len(LARGE)
    assert sink.sha.hexdigest() == hashlib.sha256(LARGE).hexdigest()


def test_put_path_multipart(store_factory: StoreFactory, tmp_path: Path) -> None:
    """put of a 40 MiB file's path uploads it in parts; it reads back byte-exact."""
    src = tmp_path / "blob"
    src.write_bytes(LARGE)
    store = store_factory(**TRANSFER)
    store.put("blobs/large", src)
    assert store.read("blobs/large", len(LARGE)).data == LARGE
    assert [o.size for o in store.list("blobs/")] == [len(LARGE)]


def test_put_path_small(store_factory: StoreFactory, tmp_path: Path) -> None:
    """put of a small file's path uploads it in one request; it reads back byte-exact."""
    src = tmp_path / "small"
    src.write_bytes(b"abc" * 1000)
    store = store_factory()
    store.put("s", src)
    assert store.read("s", 3000).data == b"abc" * 1000


def test_put_missing_path_is_os_error(store_factory: StoreFactory, tmp_path: Path) -> None:
    """put of a path that does not exist raises FileNotFoundError, and no object appears."""
    store = store_factory()
    with pytest.raises(FileNotFoundError):
        store.put("s", tmp_path / "absent")
    assert not store.exists("s")


def test_touch_renews_modified_time_keeps_bytes(store_factory: StoreFactory) -> None:
    """touch() moves the listed modified time forward and leaves the bytes as they were."""
    store = store_factory()
    store.put("blobs/t", b"same bytes")
    (before,) = list(store.list("blobs/t"))
    time.sleep(1.1)  # S3 and GCS report whole seconds
    store.touch("blobs/t")
    (after,) = list(store.list("blobs/t"))
    assert after.modified > before.modified
    assert store.read("blobs/t", 100).data == b"same bytes"


def test_touch_missing_is_not_found(store_factory: StoreFactory) -> None:
    """Touching a key that does not exist raises ObjectNotFound."""
    with pytest.raises(ObjectNotFound):
        store_factory().touch("blobs/absent")


def test_rejects_keys_that_escape(store_factory: StoreFactory) -> None:
    """Keys with '..', empty segments or a leading '/' are refused."""
    store = store_factory()
    for bad in ("../x", "a//b", "/abs", "a/./b"):
        with pytest.raises(ValueError):
            store.put(bad, b"1")


def test_sink_errors_reach_the_caller(store_factory: StoreFactory) -> None:
    """A sink that fails (disk full) raises its own OSError, not a store error."""

    class FullDisk:
        def write(self, data: bytes) -> int:
            raise OSError(errno.ENOSPC, "No space left on device")

    store = store_factory()
    store.put("k", b"data")
    with pytest.raises(OSError) as info:
        store.download("k", FullDisk())  # type: ignore[arg-type]
    assert info.value.errno == errno.ENOSPC


# -- bounded reads: the store may hold anything of any size ------------------------------


def test_read_at_the_limit_returns_the_object(store_factory: StoreFactory) -> None:
    """An object of exactly `limit` bytes is returned whole; an empty one with limit 0."""
    store = store_factory()
    store.put("m", b"12345")
    store.put("empty", b"")
    assert store.read("m", 5).data == b"12345"
    assert store.read("empty", 0).data == b""


def test_read_over_the_limit_is_object_too_large(store_factory: StoreFactory) -> None:
    """One byte over the limit raises ObjectTooLarge, one line naming the key and limit."""
    store = store_factory()
    store.put("manifests/m", b"123456")
    with pytest.raises(ObjectTooLarge) as info:
        store.read("manifests/m", 5)
    message = str(info.value)
    assert "manifests/m" in message and "5 bytes" in message and "\n" not in message


def test_read_large_object_with_small_limit(store_factory: StoreFactory) -> None:
    """A 40 MiB object read with a 1 MiB limit is refused (not read into memory first)."""
    store = store_factory(**TRANSFER)
    store.put("big", LARGE)
    with pytest.raises(ObjectTooLarge):
        store.read("big", MiB)


def test_download_from_an_offset(store_factory: StoreFactory) -> None:
    """download with offset=N writes the bytes from N on and returns how many; `limit`
    still counts from byte 0, and an offset at the end writes nothing."""
    store = store_factory()
    store.put("blob", b"0123456789")
    sink = io.BytesIO()
    assert store.download("blob", sink, offset=4, limit=10) == 6
    assert sink.getvalue() == b"456789"
    assert store.download("blob", io.BytesIO(), offset=10) == 0
    with pytest.raises(ObjectTooLarge):
        store.download("blob", io.BytesIO(), offset=4, limit=9)


def test_download_within_limit(store_factory: StoreFactory) -> None:
    """download with limit = the object's size writes it whole; limit 0 fits an empty one."""
    store = store_factory()
    store.put("blob", b"0123456789")
    store.put("empty", b"")
    sink = io.BytesIO()
    assert store.download("blob", sink, limit=10) == 10
    assert sink.getvalue() == b"0123456789"
    assert store.download("empty", io.BytesIO(), limit=0) == 0


def test_download_over_limit_writes_nothing(store_factory: StoreFactory) -> None:
    """A 40 MiB object downloaded with a smaller limit raises ObjectTooLarge before the sink
    sees a byte (every backend learns the size up front)."""
    store = store_factory(**TRANSFER)
    store.put("big", LARGE)
    sink = HashingSink()
    with pytest.raises(ObjectTooLarge):
        store.download("big", sink, limit=len(LARGE) - 1)  # type: ignore[arg-type]
    assert sink.size == 0


# -- versions and compare-and-swap ----------------------------------------------------------


def test_read_token_follows_content(store_factory: StoreFactory) -> None:
    """read returns the bytes and a version token that changes when the object is replaced."""
    store = store_factory()
    store.put("m", b"one")
    data, v1 = store.read("m", 100)
    store.put("m", b"two")
    data2, v2 = store.read("m", 100)
    assert (data, data2) == (b"one", b"two") and v1 is not None and v1 != v2


def test_put_if_version_replaces_unchanged_object(store_factory: StoreFactory) -> None:
    """put_if_version with the token just read replaces the object."""
    store = store_factory()
    store.put("m", b"one")
    _, version = store.read("m", 100)
    assert store.put_if_version("m", b"two", version) is True
    assert store.read("m", 100).data == b"two"


def test_put_if_version_refuses_a_stale_token(store_factory: StoreFactory) -> None:
    """A token read before another writer replaced the object is refused; that write stays."""
    store = store_factory()
    store.put("m", b"one")
    _, stale = store.read("m", 100)
    store.put("m", b"other writer")
    assert store.put_if_version("m", b"mine", stale) is False
    assert store.read("m", 100).data == b"other writer"
    _, current = store.read("m", 100)
    assert store.put_if_version("m", b"mine", current) is True


def test_put_if_version_none_creates_again_after_a_delete(store_factory: StoreFactory) -> None:
    """version=None creates an object that was deleted since it was first created."""
    store = store_factory()
    assert store.put_if_version("m", b"first", version=None) is True
    store.delete("m")
    assert store.put_if_version("m", b"again", version=None) is True
    assert store.read("m", 100).data == b"again"


def test_put_if_version_refuses_a_deleted_object(store_factory: StoreFactory) -> None:
    """A token of an object deleted since is refused, and nothing is created."""
    store = store_factory()
    store.put("m", b"one")
    _, version = store.read("m", 100)
    store.delete("m")
    assert store.put_if_version("m", b"mine", version) is False
    assert not store.exists("m")


def test_oversized_object_can_be_replaced_conditionally(store_factory: StoreFactory) -> None:
    """ObjectTooLarge from read carries a token that put_if_version accepts."""
    store = store_factory()
    store.put("m", b"x" * 1000)
    with pytest.raises(ObjectTooLarge) as info:
        store.read("m", 100)
    assert info.value.version is not None
    assert store.put_if_version("m", b"small", info.value.version) is True
    assert store.read("m", 100).data == b"small"


def test_put_if_version_race_has_one_winner(store_factory: StoreFactory) -> None:
    """Of 8 threads swapping from the same token, exactly one wins, and its data stays."""
    store = store_factory()
    store.put("race", b"base")
    _, version = store.read("race", 100)
    (winner,) = race_8(lambda i: store.put_if_version("race", f"writer {i}".encode(), version))
    assert store.read("race", 100).data == f"writer {winner}".encode()


def test_concurrent_read_modify_write_loses_no_update(store_factory: StoreFactory) -> None:
    """4 threads each add 1 five times by read + put_if_version, retrying when
    refused: the counter ends at 20, so no write overwrote another it had not read."""
    store = store_factory()
    store.put("counter", b"0")

    def add_five() -> None:
        for _ in range(5):
            while True:
                data, version = store.read("counter", 100)
                if store.put_if_version("counter", b"%d" % (int(data) + 1), version):
                    break

    threads = [threading.Thread(target=add_five) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert store.read("counter", 100).data == b"20"


# -- capabilities and the read-only store (what a node opens) ----------------------------


def read_only(store_factory: StoreFactory, prefix: str) -> Any:
    """The store at `prefix` as a node opens it: open_store(..., read_only=True)."""
    return open_store(store_factory.url(prefix), store_factory.options, read_only=True)


def test_backends_declare_their_capabilities(store_factory: StoreFactory) -> None:
    """Every backend, as open_store returns it, declares itself writable and resumable,
    and remote unless it is the local folder; opened read-only, the same store declares
    itself not writable."""
    prefix = f"caps-{uuid.uuid4().hex[:12]}"
    remote = store_factory.backend != "local"
    assert store_factory(prefix).capabilities == Capabilities(
        writable=True, resumable_download=True, remote=remote
    )
    assert read_only(store_factory, prefix).capabilities == Capabilities(
        writable=False, resumable_download=True, remote=remote
    )


def test_read_only_store_refuses_every_write(store_factory: StoreFactory, tmp_path: Path) -> None:
    """Opened read-only, every write (put of bytes or a path, both conditional puts, delete,
    touch) raises ReadOnlyStoreError, one line naming the store, the key and the operation,
    and the store is left as it was."""
    prefix = f"ro-{uuid.uuid4().hex[:12]}"
    writer = store_factory(prefix)
    writer.put("k", b"old")
    version = writer.read("k", 100).version
    src = tmp_path / "src"
    src.write_bytes(b"new")
    reader = read_only(store_factory, prefix)
    writes: list[tuple[str, Callable[[], object]]] = [
        ("put", lambda: reader.put("k", b"new")),
        ("put", lambda: reader.put("k", src)),
        ("put_if_version", lambda: reader.put_if_version("fresh", b"new", version=None)),
        ("put_if_version", lambda: reader.put_if_version("k", b"new", version)),
        ("delete", lambda: reader.delete("k")),
        ("touch", lambda: reader.touch("k")),
    ]
    for op, write in writes:
        with pytest.raises(ReadOnlyStoreError) as info:
            write()
        message = str(info.value)
        assert f"{op}(" in message and reader.url in message and "read-only" in message
        assert "\n" not in message and isinstance(info.value, StoreError)
    assert writer.read("k", 100) == (b"old", version)
    assert not writer.exists("fresh")


def test_read_only_store_reads_as_the_store_does(store_factory: StoreFactory) -> None:
    """Opened read-only, read, download, exists and list answer as the writable store does."""
    prefix = f"ro-{uuid.uuid4().hex[:12]}"
    writer = store_factory(prefix)
    writer.put("blobs/k", b"bytes")
    reader = read_only(store_factory, prefix)
    sink = io.BytesIO()
    assert reader.download("blobs/k", sink, limit=5) == 5 and sink.getvalue() == b"bytes"
    assert reader.read("blobs/k", 100) == writer.read("blobs/k", 100)
    assert reader.exists("blobs/k") and not reader.exists("blobs/other")
    assert [(o.key, o.size) for o in reader.list("blobs/")] == [("blobs/k", 5)]


NODE_FILES = {"fxgraph/entry": b"graph" * 100, "kernels/k.so": b"so" * 50}


def node_config(store_factory: StoreFactory, prefix: str, root: Path) -> Path:
    """A node's YAML config for the store at `prefix` (its options as the factory's)."""
    defaults = asdict(StoreOptions())
    options = {k: v for k, v in asdict(store_factory.options).items() if v != defaults[k]}
    doc = {"store": store_factory.url(prefix), "store_options": options,
           "cache_dir": str(root / "volume" / "inductor"), "workloads": [WORKLOAD]}  # fmt: skip
    path = root / "node.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def test_node_pull_works_through_a_read_only_store(
    store_factory: StoreFactory, tmp_path: Path
) -> None:
    """A fresh node process (which opens its store read-only) pulls a published cache from
    the backend and installs exactly its files."""
    prefix = f"node-{uuid.uuid4().hex[:12]}"
    publish_synthetic(store_factory(prefix), tmp_path / "capture", NODE_FILES)
    config = node_config(store_factory, prefix, tmp_path)
    report = json.loads(torchwarm("pull", "-c", str(config), "--json").stdout)
    assert report["status"] == "warm", report
    assert tree(tmp_path / "volume" / "inductor") == NODE_FILES


@pytest.mark.parametrize("store_factory", ["local"], indirect=True)
def test_node_opens_its_store_read_only(store_factory: StoreFactory, tmp_path: Path) -> None:
    """A node's pull reads its manifest through ReadOnlyStore: a fault injected there makes
    the pull start cold, naming the fault."""
    prefix = f"node-{uuid.uuid4().hex[:12]}"
    publish_synthetic(store_factory(prefix), tmp_path / "capture", NODE_FILES)
    config = node_config(store_factory, prefix, tmp_path)
    fault = inject_env("torchwarm.stores.readonly:ReadOnlyStore.read:raise")
    report = json.loads(torchwarm("pull", "-c", str(config), "--json", env=fault).stdout)
    assert report["status"] == "cold" and "injected fault" in json.dumps(report), report
