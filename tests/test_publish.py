"""publish writes blobs before the manifest and skips what is stored, stamps and swaps the
manifest so that serials only grow and no forged or broken manifest is kept; resolve and
fetch verify."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import threading
from dataclasses import replace
from pathlib import Path

import pytest
import yaml
from factories import RecordingStore, StoreWrapper, captured, fields, sha256
from servers import StoreFactory

from torchwarm.env import fingerprint
from torchwarm.errors import IntegrityError, ManifestError, ObjectNotFound
from torchwarm.node import fetch, resolve
from torchwarm.node.resolve import Miss
from torchwarm.seed import daemon
from torchwarm.seed.publish import build_manifest, is_current, now_us, publish
from torchwarm.seed.warmup import WarmupResult
from torchwarm.spec import archive, keys, signing
from torchwarm.spec import manifest as mf
from torchwarm.spec.manifest import Manifest
from torchwarm.stores import Read, Store
from torchwarm.stores.local import LocalStore


@pytest.fixture
def store(tmp_path):
    return LocalStore(tmp_path / "store")


def build(tmp_path, data=b"cache tree bytes", fmt="cachedir", workload="mlp", fp=None):
    """A manifest and its files for made-up blob bytes (two blobs for megacache)."""
    folder = tmp_path / f"capture-{sha256(data)[:8]}-{fmt}"
    if fmt == "cachedir":
        caps = [captured(folder, "cachedir", data)]
    else:
        caps = [captured(folder, "megacache", data), captured(folder, "kernels", data + b"k")]
    return build_manifest(workload, fp or fields(), fmt, caps, {"counters": {"x": 1}})


def test_build_manifest_names_file_digests(tmp_path):
    """build_manifest records each captured file's sha256 and size under its role."""
    m, files = build(tmp_path, b"abc", fmt="megacache")
    by_role = {b.role: b for b in m.blobs}
    assert by_role["megacache"].sha256 == sha256(b"abc")
    assert by_role["kernels"].size == 4
    assert {files[b].read_bytes() for b in m.blobs} == {b"abc", b"abck"}


def test_blobs_written_before_manifest(tmp_path, store):
    """Every blob write precedes the manifest write."""
    rec = RecordingStore(store)
    m, files = build(tmp_path, fmt="megacache")
    publish(rec, m, files)
    writes = rec.writes()
    manifest_key = keys.manifest_key("mlp", m.fingerprint_digest)
    assert [k for _, k in writes[-1:]] == [manifest_key]
    assert sorted(k for _, k in writes[:-1]) == sorted(keys.blob_key(b.sha256) for b in m.blobs)


def test_first_publish_outcome(tmp_path, store):
    """A first publish uploads every blob and reports 'published'."""
    m, files = build(tmp_path, b"12345")
    rep = publish(store, m, files)
    assert (rep.outcome, rep.blobs_uploaded, rep.bytes_uploaded) == ("published", 1, 5)
    assert store.exists(keys.blob_key(sha256(b"12345")))


def test_republish_identical_uploads_nothing(tmp_path, store):
    """Publishing the same content again uploads 0 bytes and reports 'unchanged'."""
    m, files = build(tmp_path)
    publish(store, m, files)
    rec = RecordingStore(store)
    m2, files2 = build(tmp_path)
    rep = publish(rec, m2, files2)
    assert (rep.outcome, rep.bytes_uploaded, rep.blobs_uploaded, rep.blobs_present) == (
        "unchanged", 0, 0, 1,
    )  # fmt: skip
    assert not [c for c in rec.writes() if c[0] == "put"]


def test_republish_different_content_replaces(tmp_path, store):
    """Publishing different bytes for the same workload and fingerprint reports 'replaced'."""
    m, files = build(tmp_path, b"first")
    publish(store, m, files)
    m2, files2 = build(tmp_path, b"second")
    rep = publish(store, m2, files2)
    assert rep.outcome == "replaced"
    got = resolve.resolve(store, "mlp", fields())
    assert isinstance(got, Manifest)
    assert got.blobs[0].sha256 == sha256(b"second")


def test_unreadable_existing_manifest_is_replaced(tmp_path, store):
    """A corrupt manifest at the key is replaced by a publish."""
    m, files = build(tmp_path)
    store.put(keys.manifest_key("mlp", m.fingerprint_digest), b"{not json")
    rep = publish(store, m, files)
    assert rep.outcome == "replaced"
    assert resolve.resolve(store, "mlp", fields()) == rep.manifest


def test_resolve_returns_manifest_for_same_fields(tmp_path, store):
    """resolve finds the manifest published for exactly these fields."""
    m, files = build(tmp_path)
    stored = publish(store, m, files).manifest
    assert resolve.resolve(store, "mlp", dict(reversed(list(fields().items())))) == stored


def test_resolve_miss_on_empty_store(store):
    """With nothing published, resolve returns a Miss saying to run a warm-up."""
    got = resolve.resolve(store, "mlp", fields())
    assert isinstance(got, Miss)
    assert "run a warm-up" in got.reason


def test_resolve_miss_names_differing_fields(tmp_path, store):
    """Another environment's fields give a Miss naming the fields that differ."""
    m, files = build(tmp_path)
    publish(store, m, files)
    got = resolve.resolve(store, "mlp", fields(cpu_vec_isa="avx512", threads=4))
    assert isinstance(got, Miss)
    assert "nearest differing in: cpu_vec_isa, threads" in got.reason


def test_resolve_miss_for_other_workload(tmp_path, store):
    """A manifest for another workload is not a hit for this one."""
    m, files = build(tmp_path, workload="other")
    publish(store, m, files)
    assert isinstance(resolve.resolve(store, "mlp", fields()), Miss)


def test_manifest_copied_to_other_key_refused(tmp_path, store):
    """A manifest copied to another fingerprint's key is refused with ManifestError."""
    m, files = build(tmp_path)
    publish(store, m, files)
    theirs = fields(cpu_vec_isa="avx512")
    store.put(keys.manifest_key("mlp", fingerprint.digest(theirs)), m.to_json())
    with pytest.raises(ManifestError, match="differs in: cpu_vec_isa"):
        resolve.resolve(store, "mlp", theirs)


def test_manifest_copied_to_other_workload_refused(tmp_path, store):
    """A manifest copied under another workload's name is refused."""
    m, files = build(tmp_path)
    store.put(keys.manifest_key("bert", m.fingerprint_digest), m.to_json())
    with pytest.raises(ManifestError, match="differs in: workload"):
        resolve.resolve(store, "bert", fields())


def fetched(store, m) -> dict[str, bytes]:
    """Every blob of `m`, streamed from `store` as a node reads it, by role."""
    return {role: archive.read_whole(src) for role, src in fetch.sources(store, m, None).items()}


def test_fetch_returns_verified_files(tmp_path, store):
    """A node streams every blob by role with the published bytes."""
    m, files = build(tmp_path, b"payload", fmt="megacache")
    publish(store, m, files)
    assert fetched(store, m) == {"megacache": b"payload", "kernels": b"payloadk"}


def test_fetch_flipped_byte_is_integrity_error(tmp_path, store):
    """A stored blob with one flipped byte is refused when its stream ends."""
    m, files = build(tmp_path, b"payload bytes")
    publish(store, m, files)
    path = store.root / keys.blob_key(m.blobs[0].sha256)
    data = bytearray(path.read_bytes())
    data[3] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(IntegrityError, match="sha256"):
        fetched(store, m)


def test_fetch_truncated_blob_is_integrity_error(tmp_path, store):
    """A stored blob shorter than the manifest says is refused on its size."""
    m, files = build(tmp_path, b"payload bytes")
    publish(store, m, files)
    path = store.root / keys.blob_key(m.blobs[0].sha256)
    path.write_bytes(path.read_bytes()[:-1])
    with pytest.raises(IntegrityError, match="size 12 != 13"):
        fetched(store, m)


def test_republish_repairs_damaged_blob(tmp_path, store):
    """Deleting the bad key and pushing again (what the IntegrityError advises) repairs it."""
    m, files = build(tmp_path, b"payload bytes")
    publish(store, m, files)
    path = store.root / keys.blob_key(m.blobs[0].sha256)
    path.write_bytes(b"damaged")
    with pytest.raises(IntegrityError, match="delete that key, then push again"):
        fetched(store, m)
    store.delete(keys.blob_key(m.blobs[0].sha256))
    publish(store, *build(tmp_path, b"payload bytes"))
    assert fetched(store, m)["cachedir"] == b"payload bytes"


# -- the manifest write: stamped, signed and swapped at write time --------------------------


@pytest.fixture(scope="module")
def seed_key() -> signing.SigningKey:
    return signing.load_secret(signing.generate("seed-1")[0], "test")


def forged(m: Manifest, name: str = "seed-1") -> Manifest:
    """`m` signed by an attacker's key that carries the seed's key name."""
    return signing.sign(m, signing.load_secret(signing.generate(name)[0], "attacker"))


def stored(store: Store, m: Manifest) -> Manifest:
    key = keys.manifest_key(m.workload, m.fingerprint_digest)
    return mf.parse(store.read(key, mf.MAX_MANIFEST_BYTES).data, key)


def verifies(m: Manifest, key: signing.SigningKey) -> bool:
    try:
        signing.verify(m, signing.load_trusted([key.public_text()], "test"), "test")
    except IntegrityError:
        return False
    return True


def test_serial_is_taken_when_the_manifest_is_written(tmp_path, store, seed_key):
    """The stored serial comes from the clock at write time, and exceeds the one it
    replaces even when the clock reads lower; the signature covers it."""
    m, files = build(tmp_path, b"first")
    assert publish(store, m, files, seed_key, clock=lambda: 500).manifest.serial == 500
    m2, files2 = build(tmp_path, b"second")
    rep = publish(store, m2, files2, seed_key, clock=lambda: 100)  # a clock gone backwards
    assert rep.outcome == "replaced" and stored(store, m2).serial == 501
    assert verifies(stored(store, m2), seed_key)


def test_forged_signature_under_own_key_name_is_replaced(tmp_path, store, seed_key):
    """Same content, signed by another key under the seed's name: replaced, not kept."""
    m, files = build(tmp_path)
    store.put(keys.manifest_key("mlp", m.fingerprint_digest), forged(m).to_json())
    rep = publish(store, m, files, seed_key)
    assert rep.outcome == "replaced"
    assert verifies(stored(store, m), seed_key)


def test_unsigned_publisher_replaces_a_signed_manifest(tmp_path, store, seed_key):
    """A publisher without a key replaces a signed manifest of the same content."""
    m, files = build(tmp_path)
    publish(store, m, files, seed_key)
    assert publish(store, *build(tmp_path)).outcome == "replaced"
    assert stored(store, m).signature is None


def test_oversized_manifest_is_replaced(tmp_path, store, seed_key):
    """An object over the manifest cap at the manifest key is replaced by the next publish."""
    m, files = build(tmp_path)
    store.put(keys.manifest_key("mlp", m.fingerprint_digest), b"{" * (mf.MAX_MANIFEST_BYTES + 1))
    assert publish(store, m, files, seed_key).outcome == "replaced"
    assert verifies(stored(store, m), seed_key)


@pytest.mark.parametrize("signed", [True, False])
def test_is_current(tmp_path, seed_key, signed):
    """The daemon's skip test: the stored manifest carries the warm-up key and is signed
    as the daemon signs; a forgery under the seed's key name, another warm-up key, or a
    signature where none is expected (and the reverse) is not current."""
    base = replace(build(tmp_path)[0], warmup={"warmup_key": "wk"})
    key = seed_key if signed else None
    good = signing.sign(base, seed_key) if signed else base
    assert is_current(good, "wk", key)
    assert not is_current(good, "other", key)
    assert not is_current(forged(base), "wk", key)
    assert not is_current(signing.sign(base, seed_key) if not signed else base, "wk", key)


# -- `torchwarm push` repairs what it must not keep (CLI, subprocess) ------------------------


def fake_result(folder: Path, content: bytes = b"cache tree") -> WarmupResult:
    """A warm-up result on disk, as `warmup --out` leaves it (no compiling)."""
    c = captured(folder, "cachedir", content)
    result = WarmupResult("mlp", "cachedir", fields(), {"warmup_key": "wk-1"}, [c])
    result.save(folder)
    return result


def push(config: Path, source: Path, secret: str) -> str:
    proc = subprocess.run(
        [sys.executable, "-m", "torchwarm.cli", "push", "-c", str(config), "--from", str(source)],
        env={**os.environ, "TORCHWARM_SIGNING_KEY": secret},
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


@pytest.mark.parametrize("damage", ["forged-signature", "unparsable", "oversized"])
def test_push_repairs_a_manifest_nodes_would_refuse(tmp_path, damage):
    """A manifest forged under the seed's key name, one that does not parse, or one over
    the cap: the daemon's skip test does not take it, and the next `torchwarm push`
    replaces it with one that verifies with the seed's key."""
    secret, _ = signing.generate("seed-1")
    seed = signing.load_secret(secret, "test")
    result = fake_result(tmp_path / "results" / "mlp")
    store = LocalStore(tmp_path / "store")
    m, _ = build_manifest(result.workload, result.fingerprint, result.format,
                          result.captured, result.summary)  # fmt: skip
    key = keys.manifest_key("mlp", m.fingerprint_digest)
    bad = {
        "forged-signature": forged(replace(m, serial=now_us() + 10**9)).to_json(),
        "unparsable": b'{"format_version": 1, "workload": ',
        "oversized": b" " * (mf.MAX_MANIFEST_BYTES + 1),
    }[damage]
    store.put(key, bad)
    found = daemon._read_manifest(store, key)
    assert found is None or not is_current(found, "wk-1", seed)
    config = tmp_path / "seed.yaml"
    config.write_text(yaml.safe_dump({"store": store.url, "cache_dir": str(tmp_path / "c")}))
    out = push(config, tmp_path / "results", secret)
    assert "replaced" in out
    repaired = stored(store, m)
    assert verifies(repaired, seed) and is_current(repaired, "wk-1", seed)
    if damage == "forged-signature":  # a node that took the forgery's serial takes this one
        assert repaired.serial > mf.parse(bad, key).serial


# -- publishers racing: the serial at a key only grows ---------------------------------------


def test_racing_publishers_never_leave_a_lower_serial_current(
    store_factory: StoreFactory, tmp_path, seed_key
):
    """Two publishers, one with its clock an hour behind, publish 4 warm-ups each to one
    key while a node reads it: every serial the node sees is >= the one before, and the
    last write is the highest serial written."""
    store = store_factory()
    clocks = {"ahead": now_us, "behind": lambda: now_us() - 3600 * 10**6}
    m0, _ = build(tmp_path)
    key = keys.manifest_key("mlp", m0.fingerprint_digest)
    written: list[int] = []
    seen: list[int] = []
    done = threading.Event()
    start = threading.Barrier(3)

    def publisher(name: str) -> None:
        start.wait()
        for i in range(4):
            m, files = build(tmp_path / name, f"{name} {i}".encode())
            written.append(publish(store, m, files, seed_key, clock=clocks[name]).manifest.serial)

    def node() -> None:
        start.wait()
        while not done.is_set():
            with contextlib.suppress(ObjectNotFound):  # not yet written
                seen.append(mf.parse(store.read(key, mf.MAX_MANIFEST_BYTES).data, key).serial)

    threads = [threading.Thread(target=publisher, args=(n,)) for n in clocks]
    reader = threading.Thread(target=node)
    for t in [*threads, reader]:
        t.start()
    for t in threads:
        t.join()
    done.set()
    reader.join()
    final = stored(store, m0)
    assert len(written) == 8 and len(seen) > 1
    assert seen == sorted(seen), "a lower serial became current"
    assert final.serial == max(written) and verifies(final, seed_key)


class WriterSneaksIn(StoreWrapper):
    """A store where another publisher's write lands right after our first read."""

    def __init__(self, inner: Store, sneak) -> None:
        super().__init__(inner)
        self.sneak = sneak

    def read(self, key: str, limit: int) -> Read:
        got = self.inner.read(key, limit)
        if self.sneak is not None:
            sneak, self.sneak = self.sneak, None
            sneak()
        return got


def test_lost_swap_reads_again_and_goes_above_the_winner(
    store_factory: StoreFactory, tmp_path, seed_key
):
    """When another publisher (its clock 1000 s ahead) writes between our read and our
    swap, the swap is refused; we read again and write a serial above the winner's."""
    store = store_factory()
    m, files = build(tmp_path, b"first")
    publish(store, m, files, seed_key)
    winner: list[Manifest] = []

    def other() -> None:
        m2, files2 = build(tmp_path / "other", b"other")
        ahead = lambda: now_us() + 10**9  # noqa: E731
        winner.append(publish(store, m2, files2, seed_key, clock=ahead).manifest)

    rep = publish(WriterSneaksIn(store, other), *build(tmp_path, b"mine"), seed_key)
    final = stored(store, m)
    assert winner and rep.outcome == "replaced" and final == rep.manifest
    assert final.blobs[0].sha256 == sha256(b"mine") and final.serial > winner[0].serial


def test_unchanged_content_writes_nothing(store_factory: StoreFactory, tmp_path, seed_key):
    """Publishing the same content again keeps the stored manifest: same version token
    (S3 ETag, GCS generation, local digest), outcome 'unchanged'."""
    store = store_factory()
    m, files = build(tmp_path)
    first = publish(store, m, files, seed_key)
    key = keys.manifest_key("mlp", m.fingerprint_digest)
    before = store.read(key, mf.MAX_MANIFEST_BYTES).version
    again = publish(store, *build(tmp_path), seed_key)
    assert again.outcome == "unchanged" and again.manifest == first.manifest
    assert store.read(key, mf.MAX_MANIFEST_BYTES).version == before
