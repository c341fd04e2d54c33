"""`torchwarm gc`: keep the newest N manifests per workload and every young one, sweep
blobs no kept manifest names.

Stores are filled with hand-built manifests published by agent.publish (no compiling),
on a local folder and on SeaweedFS; the CLI runs in a subprocess as an operator's would.
"""

from __future__ import annotations

import os
import random
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import torchwarm
from factories import StoreWrapper, blob, fields, manifest
from servers import BUCKET, FAKE_AWS_ENV, ListingFaults, S3Server, StoreFactory, fake_aws_env

from torchwarm.admin import gc as retention
from torchwarm.errors import StoreError
from torchwarm.seed.publish import publish
from torchwarm.spec import keys
from torchwarm.spec import manifest as mf
from torchwarm.spec.manifest import BlobRef, Manifest
from torchwarm.stores import Read, Store, StoreOptions, open_store
from torchwarm.stores.local import LocalStore

OLD = time.time() - 30 * 86400
FORTY_DAYS_AGO = time.time() - 40 * 86400  # past gc's default --older-than (30d)


@dataclass
class GcStore:
    """A store (local folder or an S3 prefix), a config naming it, and the blob files."""

    store: Store
    config: Path
    files: Path
    local: bool

    def gc(self, *args: str, check: bool = True):
        return torchwarm("gc", "-c", str(self.config), *args, env=FAKE_AWS_ENV, check=check)

    def publish(self, m: Manifest, contents: dict[BlobRef, bytes]) -> None:
        publish(self.store, m, {b: self._file(data) for b, data in contents.items()})

    def put_blob(self, data: bytes) -> str:
        key = keys.blob_key(blob(data=data).sha256)
        self.store.put(key, data)
        return key

    def age_all(self) -> None:
        """Local store: make every blob a month old (S3 cannot backdate: use --grace 0)."""
        if self.local:
            for info in self.store.list(keys.BLOBS):
                self.age(info.key)

    def age(self, key: str, when: float = OLD) -> None:
        """Local store: set an object's modified time (what gc reads) to `when`."""
        assert self.local, "only a local store can be backdated"
        os.utime(self.store.root / key, (when, when))  # type: ignore[attr-defined]

    def keys(self, prefix: str = "") -> set[str]:
        return {i.key for i in self.store.list(prefix)}

    def _file(self, data: bytes) -> Path:
        path = self.files / blob(data=data).sha256
        path.write_bytes(data)
        return path


@pytest.fixture(params=["local", "seaweedfs"])
def gc_store(request: pytest.FixtureRequest, tmp_path: Path, monkeypatch) -> GcStore:
    (tmp_path / "files").mkdir()
    doc: dict[str, Any] = {"cache_dir": str(tmp_path / "cache" / "inductor")}
    if request.param == "local":
        doc["store"] = (tmp_path / "store").as_uri()
        options = StoreOptions()
    else:
        s3: S3Server = request.getfixturevalue("seaweedfs_server")
        fake_aws_env(monkeypatch)
        doc["store"] = f"s3://{BUCKET}/gc-{os.urandom(6).hex()}"
        doc["store_options"] = {"endpoint_url": s3.endpoint, "path_style": True,
                                "region": "us-east-1"}  # fmt: skip
        options = s3.options
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(doc))
    store = open_store(doc["store"], options)
    return GcStore(store, config, tmp_path / "files", request.param == "local")


# Tests that backdate objects: only a local folder can (S3 sets LastModified itself).
LOCAL_ONLY = pytest.mark.parametrize("gc_store", ["local"], indirect=True)


def version(n: int, workload: str = "mlp", shared: bytes = b"shared kernels") -> tuple:
    """Manifest n of `workload` for its own environment (threads=n) (megacache: a kernels
    blob shared by every version, and a megacache blob of its own), created on day n of
    2024, serial n."""
    own = f"{workload} megacache v{n}".encode()
    contents = {blob("kernels", shared): shared, blob("megacache", own): own}
    m = manifest(workload, "megacache", fields(threads=n), tuple(contents),
                 created_at=f"2024-01-{n:02d}T00:00:00Z", serial=n)  # fmt: skip
    return m, contents


def mkey(m: Manifest) -> str:
    return keys.manifest_key(m.workload, m.fingerprint_digest)


def bkey(b: BlobRef) -> str:
    return keys.blob_key(b.sha256)


def named_blobs(store: Store) -> dict[str, set[str]]:
    """Each manifest in the store -> the blob keys it names."""
    out = {}
    for info in store.list(keys.MANIFESTS):
        data = store.read(info.key, mf.MAX_MANIFEST_BYTES).data
        out[info.key] = {bkey(b) for b in mf.parse(data, info.key).blobs}
    return out


def assert_no_dangling(store: Store) -> None:
    present = {i.key for i in store.list(keys.BLOBS)}
    for key, names in named_blobs(store).items():
        assert names <= present, f"{key} names missing blobs {names - present}"


def test_keep_one_deletes_only_blobs_no_kept_manifest_names(gc_store):
    """Three versions, --keep 1 --older-than 0s --grace 0: the two older manifests and
    their own blobs go, the shared blob and the other workload's stay."""
    versions = [version(n) for n in (1, 2, 3)]
    for m, contents in versions:
        gc_store.publish(m, contents)
    other, other_contents = version(1, "other", shared=b"other kernels")
    gc_store.publish(other, other_contents)
    orphan = gc_store.put_blob(b"orphan")
    gc_store.age_all()
    out = gc_store.gc("--keep", "1", "--older-than", "0s", "--grace", "0").stdout
    kept = {keys.manifest_key("mlp", versions[2][0].fingerprint_digest),
            keys.manifest_key("other", other.fingerprint_digest)}  # fmt: skip
    assert gc_store.keys(keys.MANIFESTS) == kept
    expected = {bkey(b) for m in (versions[2][0], other) for b in m.blobs}
    assert gc_store.keys(keys.BLOBS) == expected
    gone = {bkey(versions[i][0].blobs[1]) for i in (0, 1)} | {orphan}
    assert {ln.split()[-1] for ln in out.splitlines() if ln.startswith("deleted blob")} == gone
    assert "kept 2 manifest(s) (0 of them" in out
    assert "deleted 2 manifest(s) and 3 blob(s)" in out
    assert_no_dangling(gc_store.store)


def test_mixed_fleet_keep_one_keeps_every_young_environment(gc_store):
    """One workload on three kinds of machine (three fingerprints): `--keep 1` with the
    default --older-than keeps all three manifests and their blobs; an orphan still goes."""
    versions = [version(n) for n in (1, 2, 3)]
    for m, contents in versions:
        gc_store.publish(m, contents)
    orphan = gc_store.put_blob(b"orphan")
    gc_store.age_all()
    out = gc_store.gc("--keep", "1", "--grace", "0").stdout
    assert gc_store.keys(keys.MANIFESTS) == {mkey(m) for m, _ in versions}
    assert gc_store.keys(keys.BLOBS) == {bkey(b) for m, _ in versions for b in m.blobs}
    assert "kept 3 manifest(s) (2 of them beyond --keep but younger than 30d)" in out
    assert f"deleted blob {orphan}" in out


@LOCAL_ONLY
def test_old_environment_goes_but_the_newest_stays_however_old(gc_store):
    """Local store: of three environments, the oldest by serial and the newest are 40 days
    old: `--keep 1 --older-than 30d` deletes the oldest (and its own blob), keeps the young
    one, and keeps the newest as the floor."""
    versions = [version(n) for n in (1, 2, 3)]
    for m, contents in versions:
        gc_store.publish(m, contents)
    gc_store.age_all()
    for n in (0, 2):
        gc_store.age(mkey(versions[n][0]), FORTY_DAYS_AGO)
    out = gc_store.gc("--keep", "1", "--older-than", "30d", "--grace", "0").stdout
    assert gc_store.keys(keys.MANIFESTS) == {mkey(versions[1][0]), mkey(versions[2][0])}
    assert f"deleted manifest {mkey(versions[0][0])}" in out
    assert gc_store.keys(keys.BLOBS) == {bkey(b) for m, _ in versions[1:] for b in m.blobs}
    assert_no_dangling(gc_store.store)


@LOCAL_ONLY
def test_newest_is_decided_by_serial_not_created_at(gc_store):
    """Local store, both manifests old: the one with the higher serial is kept even though
    its created_at (whole seconds, written by another clock) says it is older."""
    a, a_contents = version(1)
    b, b_contents = version(2)
    a = replace(a, created_at="2024-01-05T00:00:00Z", serial=100)
    b = replace(b, created_at="2024-01-04T00:00:00Z", serial=200)
    gc_store.publish(a, a_contents)
    gc_store.publish(b, b_contents)
    for m in (a, b):
        gc_store.age(mkey(m), FORTY_DAYS_AGO)
    gc_store.gc("--keep", "1", "--grace", "0")
    assert gc_store.keys(keys.MANIFESTS) == {mkey(b)}


def test_older_than_takes_a_duration(gc_store):
    """--older-than 3x is a usage error (exit 2) naming the flag; nothing is deleted."""
    gc_store.publish(*version(1))
    before = gc_store.keys()
    out = gc_store.gc("--keep", "1", "--older-than", "3x", check=False)
    assert out.returncode == 2, out.stderr
    assert "--older-than '3x': expected a duration" in out.stderr
    assert gc_store.keys() == before


class TouchBeforeSecondLook(StoreWrapper):
    """A store for gc: when gc looks at a manifest again before deleting it, a seed has just
    touched it (its refresh landed between gc's listing and its delete)."""

    def __init__(self, inner: Store) -> None:
        super().__init__(inner)
        self.touched: list[str] = []

    def list(self, prefix: str):
        if keys.parse_manifest_key(prefix):
            self.inner.touch(prefix)
            self.touched.append(prefix)
        return self.inner.list(prefix)


@LOCAL_ONLY
def test_manifest_touched_after_the_listing_is_kept(gc_store):
    """Local store: an old manifest beyond --keep that a seed touches between gc's listing
    and its delete stays, and so do its blobs."""
    (old, old_contents), (new, new_contents) = version(1), version(2)
    gc_store.publish(old, old_contents)
    gc_store.publish(new, new_contents)
    gc_store.age_all()
    gc_store.age(mkey(old), FORTY_DAYS_AGO)
    racing = TouchBeforeSecondLook(gc_store.store)
    rep = retention.gc(racing, keep=1, grace_s=0)
    assert racing.touched == [mkey(old)]  # the race happened
    assert rep.deleted_manifests == [] and rep.young_manifests == 1
    assert gc_store.keys(keys.MANIFESTS) == {mkey(old), mkey(new)}
    assert_no_dangling(gc_store.store)


def test_grace_period_keeps_young_unreferenced_blobs(gc_store):
    """An unreferenced blob younger than --grace stays; a month-old one goes (local store)."""
    if not gc_store.local:
        young = gc_store.put_blob(b"young")
        out = gc_store.gc("--keep", "1", "--grace", "3600").stdout
        assert young in gc_store.keys(keys.BLOBS)
        assert "1 unreferenced blob(s) inside the grace period kept" in out
        return
    old = gc_store.put_blob(b"old")
    gc_store.age_all()
    young = gc_store.put_blob(b"young")
    out = gc_store.gc("--keep", "1", "--grace", "3600").stdout
    assert gc_store.keys(keys.BLOBS) == {young}
    assert f"deleted blob {old}" in out
    assert "1 unreferenced blob(s) inside the grace period kept" in out


def test_dry_run_deletes_nothing_and_prints_what_would_go(gc_store):
    """--dry-run lists the old manifests and unreferenced blobs but leaves the store as it was."""
    for n in (1, 2):
        gc_store.publish(*version(n))
    orphan = gc_store.put_blob(b"orphan")
    gc_store.age_all()
    before = gc_store.keys()
    out = gc_store.gc("--keep", "1", "--older-than", "0s", "--grace", "0", "--dry-run").stdout
    assert gc_store.keys() == before
    old = version(1)[0]
    assert f"would delete manifest {keys.manifest_key('mlp', old.fingerprint_digest)}" in out
    assert f"would delete blob {orphan}" in out
    assert f"would delete blob {bkey(old.blobs[1])}" in out
    assert "would delete 1 manifest(s) and 2 blob(s)" in out


def test_unparseable_manifest_stops_the_sweep(gc_store):
    """A manifest gc cannot parse: no blob is deleted, and the output says why."""
    gc_store.publish(*version(1))
    orphan = gc_store.put_blob(b"orphan")
    bad = keys.manifest_key("broken", "0" * 32)
    gc_store.store.put(bad, b"{not json")
    gc_store.age_all()
    before = gc_store.keys(keys.BLOBS)
    out = gc_store.gc("--keep", "1", "--grace", "0").stdout
    assert orphan in before and gc_store.keys(keys.BLOBS) == before
    assert "blob sweep skipped" in out and bad in out


@pytest.mark.parametrize("keep", ["0", "-1"])
def test_keep_below_one_is_a_usage_error(gc_store, keep):
    """--keep 0 or negative exits 2 and deletes nothing."""
    gc_store.publish(*version(1))
    gc_store.age_all()
    before = gc_store.keys()
    out = gc_store.gc("--keep", keep, "--grace", "0", check=False)
    assert out.returncode == 2, out.stderr
    assert "--keep must be at least 1" in out.stderr
    assert gc_store.keys() == before
    with pytest.raises(ValueError):
        retention.gc(gc_store.store, int(keep))


class GrowsBeforeDownload(StoreWrapper):
    """A store whose unreferenced blob is replaced by a 4 MiB object right before gc
    downloads its held copy; counts the bytes gc's sink receives."""

    def __init__(self, inner: Store) -> None:
        super().__init__(inner)
        self.written = 0

    def download(self, key: str, sink: Any, limit: int | None = None) -> int:
        self.inner.put(key, b"x" * (4 << 20))
        counting = self

        class Sink:
            def write(self, data: bytes) -> int:
                counting.written += len(data)
                return sink.write(data)

        return self.inner.download(key, Sink(), limit=limit)  # type: ignore[arg-type]


def test_gc_holds_no_more_of_a_blob_than_it_listed(gc_store):
    """No manifest bounds an unreferenced blob, so gc's held copy is capped at the size it
    listed: a blob that grew since is neither downloaded whole nor deleted this pass."""
    key = gc_store.put_blob(b"small unreferenced kernels")
    gc_store.age_all()
    grows = GrowsBeforeDownload(gc_store.store)
    report = retention.gc(grows, keep=1, older_than_s=0, grace_s=0)
    assert grows.written <= len(b"small unreferenced kernels")
    assert report.deleted_blobs == [] and key in gc_store.keys(keys.BLOBS)


# -- publish racing gc ------------------------------------------------------------------


class GcAfterExists(StoreWrapper):
    """A store for a publisher: right after exists() says a blob is there, gc runs."""

    def __init__(self, inner: Store) -> None:
        super().__init__(inner)
        self.reports: list[retention.GcReport] = []

    def exists(self, key: str) -> bool:
        found = self.inner.exists(key)
        if found and keys.parse_blob_key(key) and not self.reports:
            self.reports.append(retention.gc(self.inner, keep=1, older_than_s=0, grace_s=0))
        return found


def test_blob_swept_between_exists_and_manifest_is_reuploaded(gc_store):
    """A publisher finds an old unreferenced blob present, gc sweeps it before the manifest
    lands: after publish returns, every blob the manifest names exists."""
    m, contents = version(1)
    reused = next(b for b in m.blobs if b.role == "kernels")
    gc_store.put_blob(contents[reused])
    gc_store.age_all()
    racing = GcAfterExists(gc_store.store)
    rep = publish(racing, m, {b: gc_store._file(d) for b, d in contents.items()})
    assert racing.reports and bkey(reused) in racing.reports[0].deleted_blobs  # the race happened
    assert rep.blobs_uploaded == 2  # the swept blob was uploaded again, not counted present
    assert named_blobs(gc_store.store) == {rep.manifest_key: {bkey(b) for b in m.blobs}}
    assert_no_dangling(gc_store.store)


class PublishBeforeDelete(StoreWrapper):
    """A store for gc: before its first blob delete, a whole publish runs to completion."""

    def __init__(self, inner: Store, publish_now: Callable[[], None]) -> None:
        super().__init__(inner)
        self.publish_now = publish_now
        self.published = False

    def delete(self, key: str) -> None:
        if keys.parse_blob_key(key) and not self.published:
            self.published = True
            self.publish_now()
        self.inner.delete(key)


def test_publish_landing_between_gc_listing_and_delete_loses_nothing(gc_store):
    """gc lists the manifests, a publisher reuses an old unreferenced blob and finishes, then
    gc deletes: the new manifest must not name a missing blob."""
    m, contents = version(1)
    reused = next(b for b in m.blobs if b.role == "kernels")
    gc_store.put_blob(contents[reused])
    gc_store.age_all()
    racing = PublishBeforeDelete(gc_store.store, lambda: gc_store.publish(m, contents))
    retention.gc(racing, keep=1, older_than_s=0, grace_s=0)
    assert racing.published  # the race happened
    assert keys.manifest_key("mlp", m.fingerprint_digest) in named_blobs(gc_store.store)
    assert_no_dangling(gc_store.store)


class GcDeletesAfterPutIfAbsent(StoreWrapper):
    """A store for a publisher: an older manifest at its key is deleted by gc right after
    a create-if-absent (put_if_version with version=None) found it there."""

    def __init__(self, inner: Store) -> None:
        super().__init__(inner)
        self.deleted = False

    def put_if_version(self, key: str, data: bytes, version: str | None) -> bool:
        created = self.inner.put_if_version(key, data, version)
        if not created and version is None:
            self.inner.delete(key)
            self.deleted = True
        return created


def test_publish_over_a_manifest_gc_just_deleted_succeeds(gc_store):
    """A republish for the same fingerprint whose old manifest gc deletes mid-publish still
    writes its manifest."""
    old, old_contents = version(1)
    gc_store.publish(old, old_contents)
    new, contents = version(1, shared=b"new kernels")
    racing = GcDeletesAfterPutIfAbsent(gc_store.store)
    rep = publish(racing, new, {b: gc_store._file(d) for b, d in contents.items()})
    assert racing.deleted  # the race happened
    assert named_blobs(gc_store.store) == {rep.manifest_key: {bkey(b) for b in new.blobs}}
    assert_no_dangling(gc_store.store)


def test_publishers_and_gc_loops_in_threads_leave_no_dangling_manifest(tmp_path):
    """Four publishers reusing a small pool of blobs and two gc loops (grace 0) run for 3 s
    on a local store: every manifest left names only blobs that exist."""
    store = LocalStore(tmp_path / "store")
    pool = [f"pool blob {i}".encode() for i in range(6)]
    paths = {}
    for data in pool:
        paths[data] = tmp_path / blob(data=data).sha256
        paths[data].write_bytes(data)
    stop = threading.Event()
    errors: list[tuple[str, Exception]] = []
    published = [0]
    start = datetime(2024, 1, 1, tzinfo=timezone.utc)

    def publisher(i: int) -> None:
        rng = random.Random(i)
        n = 0
        while not stop.is_set():
            n += 1
            k, mc = rng.sample(pool, 2)
            contents = {blob("kernels", k): k, blob("megacache", mc): mc}
            created = (start + timedelta(seconds=n)).strftime("%Y-%m-%dT%H:%M:%SZ")
            m = manifest(f"w{i}", "megacache", fields(threads=n % 3 + 1), tuple(contents),
                         created_at=created)  # fmt: skip
            try:
                publish(store, m, {b: paths[d] for b, d in contents.items()})
                published[0] += 1
            except Exception as e:  # noqa: BLE001 - reported below; keep publishing
                errors.append(("publish", e))

    def collector() -> None:
        while not stop.is_set():
            try:
                retention.gc(store, keep=1, older_than_s=0, grace_s=0)
            except Exception as e:  # noqa: BLE001 - reported below; keep sweeping
                errors.append(("gc", e))

    threads = [threading.Thread(target=publisher, args=(i,)) for i in range(4)]
    threads += [threading.Thread(target=collector) for _ in range(2)]
    for t in threads:
        t.start()
    time.sleep(3)
    stop.set()
    for t in threads:
        t.join(30)
    present = {i.key for i in store.list(keys.BLOBS)}
    dangling = {k: v - present for k, v in named_blobs(store).items() if v - present}
    assert published[0] > 20
    kinds = {(who, type(e).__name__) for who, e in errors}
    assert not errors and not dangling, (kinds, len(errors), errors[:2], dangling)


class OtherGcDeletesFirst(StoreWrapper):
    """A store for one gc: the first manifest it reads was just deleted by another gc."""

    def __init__(self, inner: Store) -> None:
        super().__init__(inner)
        self.deleted: list[str] = []

    def read(self, key: str, limit: int) -> Read:
        if keys.parse_manifest_key(key) and not self.deleted:
            self.deleted.append(key)
            self.inner.delete(key)
        return self.inner.read(key, limit)


def test_two_overlapping_gc_runs_do_not_fail(gc_store):
    """A manifest listed by one gc and deleted by another before it is read does not make
    the first gc fail, and no manifest left names a missing blob."""
    for n in (1, 2, 3):
        gc_store.publish(*version(n))
    gc_store.age_all()
    racing = OtherGcDeletesFirst(gc_store.store)
    retention.gc(racing, keep=1, older_than_s=0, grace_s=0)
    assert racing.deleted  # the race happened
    assert_no_dangling(gc_store.store)


# -- failures part-way: nothing a manifest names may be lost ------------------------------


def test_unreadable_manifest_listing_deletes_nothing(
    store_factory: StoreFactory, listing_faults: ListingFaults, tmp_path: Path
):
    """A manifest listing that fails part-way (a folder gone stale on NFS, a page the server
    will not send) stops gc before any delete, with an error that says so; on every backend."""
    store = store_factory()
    (tmp_path / "files").mkdir()
    filled = GcStore(store, tmp_path / "unused.yaml", tmp_path / "files", local=False)
    for m, contents in (version(1), version(1, "other", shared=b"other kernels")):
        filled.publish(m, contents)
    filled.put_blob(b"orphan")
    before = filled.keys()
    broken = listing_faults.unreadable(store, keys.MANIFESTS + "mlp")
    with pytest.raises(StoreError, match="gc deleted nothing"):
        retention.gc(broken, keep=1, older_than_s=0, grace_s=0)
    assert [k for k in sorted(before) if not store.exists(k)] == []


class PublishThenFail(StoreWrapper):
    """A store for gc: right before gc deletes its first blob, a publish whose manifest names
    that blob completes (the race gc's put-back repairs); then the store fails the next
    download, as one that goes away mid-sweep."""

    def __init__(self, inner: Store, publish_naming: Callable[[str], None]) -> None:
        super().__init__(inner)
        self.publish_naming = publish_naming
        self.published = ""

    def delete(self, key: str) -> None:
        if keys.parse_blob_key(key) and not self.published:
            self.publish_naming(key)
            self.published = key
        self.inner.delete(key)

    def download(self, key: str, sink: Any, limit: int | None = None) -> int:
        if self.published:
            raise StoreError(f"{self.url}/{key}: the store went away")
        return self.inner.download(key, sink, limit=limit)


def test_store_error_mid_sweep_still_puts_back_what_a_manifest_names(gc_store):
    """gc deletes a blob that a manifest published meanwhile names, then the store fails
    mid-sweep: the blob is back before the error reaches the caller."""
    old = {gc_store.put_blob(data): data for data in (b"old kernels 1", b"old kernels 2")}
    gc_store.age_all()

    def publish_naming(key: str) -> None:
        gc_store.publish(*version(1, shared=old[key]))

    racing = PublishThenFail(gc_store.store, publish_naming)
    with pytest.raises(StoreError, match="the store went away"):
        retention.gc(racing, keep=1, older_than_s=0, grace_s=0)
    assert racing.published  # the race happened
    assert racing.published in gc_store.keys(keys.BLOBS)
    assert_no_dangling(gc_store.store)


class PublishThenFailForGood(PublishThenFail):
    """As PublishThenFail, and the store refuses the put-back too."""

    def put(self, key: str, data: bytes | Path) -> None:
        raise StoreError(f"{self.url}/{key}: the store went away")


def test_blob_that_cannot_be_put_back_keeps_its_copy(gc_store):
    """When the store fails mid-sweep and refuses the put-back too, gc's error names the
    folder that still holds the copy of the blob a manifest names."""
    old = {gc_store.put_blob(data): data for data in (b"old kernels 1", b"old kernels 2")}
    gc_store.age_all()
    racing = PublishThenFailForGood(
        gc_store.store, lambda k: gc_store.publish(*version(1, shared=old[k]))
    )
    with pytest.raises(StoreError, match="copies are kept in ") as info:
        retention.gc(racing, keep=1, older_than_s=0, grace_s=0)
    folder = Path(str(info.value).split("copies are kept in ")[1].split()[0])
    copy = folder / keys.parse_blob_key(racing.published)
    assert copy.read_bytes() == old[racing.published]
    shutil.rmtree(folder)


class ManifestsUnlistableAfterDelete(StoreWrapper):
    """A store for gc: once gc has deleted a blob, listing the manifests fails."""

    def __init__(self, inner: Store) -> None:
        super().__init__(inner)
        self.deleted: list[str] = []

    def delete(self, key: str) -> None:
        self.inner.delete(key)
        self.deleted.append(key)

    def list(self, prefix: str):
        if self.deleted and prefix == keys.MANIFESTS:
            raise StoreError(f"{self.url}/{prefix}: the listing failed")
        return self.inner.list(prefix)


def test_manifests_unlistable_after_the_sweep_puts_back_every_deleted_blob(gc_store):
    """When gc cannot list the manifests again after its sweep, it cannot tell which deleted
    blobs a manifest written meanwhile names: it puts every one back and says so."""
    orphans = {gc_store.put_blob(data) for data in (b"orphan 1", b"orphan 2")}
    gc_store.age_all()
    racing = ManifestsUnlistableAfterDelete(gc_store.store)
    with pytest.raises(StoreError, match="every blob this gc deleted was put back"):
        retention.gc(racing, keep=1, older_than_s=0, grace_s=0)
    assert len(racing.deleted) == 2  # the sweep deleted both before the listing failed
    assert gc_store.keys(keys.BLOBS) == orphans


def tmpfs_prefix() -> list[str] | None:
    """A command prefix that runs the rest of the line with its TMPDIR on a fresh 80 MiB
    tmpfs, in a mount namespace of its own; None where this machine cannot make one."""
    mount = 'mount -t tmpfs -o size=80m torchwarm-test "$TMPDIR" && exec "$@"'
    for unshare in (["unshare", "--mount"], ["unshare", "--user", "--map-root-user", "--mount"]):
        prefix = [*unshare, "sh", "-c", mount, "sh"]
        if (
            shutil.which("unshare")
            and subprocess.run(
                [*prefix, "true"], env={**os.environ, "TMPDIR": "/tmp"}, capture_output=True
            ).returncode
            == 0
        ):
            return prefix
    return None


@LOCAL_ONLY
def test_blob_gc_cannot_hold_a_copy_of_stays(gc_store, tmp_path):
    """Local store, TMPDIR on an 80 MiB tmpfs: gc deletes the small unreferenced blob, keeps
    the 32 MiB one it has no room to hold a copy of (it keeps 64 MiB free), and says so."""
    prefix = tmpfs_prefix()
    if prefix is None:
        pytest.skip("cannot mount a small tmpfs here (needs unshare and mount namespaces)")
    small = gc_store.put_blob(b"small unreferenced kernels")
    big = gc_store.put_blob(os.urandom(32 << 20))
    gc_store.age_all()
    held = tmp_path / "held"
    held.mkdir()
    out = subprocess.run(
        [*prefix, sys.executable, "-m", "torchwarm.cli", "gc", "-c", str(gc_store.config),
         "--keep", "1", "--grace", "0"],
        env={**os.environ, "TMPDIR": str(held)}, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert out.returncode == 0, out.stdout + out.stderr
    assert gc_store.keys(keys.BLOBS) == {big}
    assert f"deleted blob {small}" in out.stdout
    assert f"kept blob {big}: no room in {held} to hold a copy" in out.stdout
