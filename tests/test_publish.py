"""publish writes blobs before the manifest and skips what is stored; resolve and fetch verify."""

from __future__ import annotations

import pytest
from factories import RecordingStore, captured, fields, sha256

from torchwarm import fetch, fingerprint, keys, resolve
from torchwarm.errors import IntegrityError, ManifestError
from torchwarm.manifest import Manifest
from torchwarm.publish import build_manifest, publish
from torchwarm.resolve import Miss
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
    assert not [c for c in rec.writes() if c[0] in ("put", "put_file")]


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
    assert publish(store, m, files).outcome == "replaced"
    assert resolve.resolve(store, "mlp", fields()) == m


def test_resolve_returns_manifest_for_same_fields(tmp_path, store):
    """resolve finds the manifest published for exactly these fields."""
    m, files = build(tmp_path)
    publish(store, m, files)
    assert resolve.resolve(store, "mlp", dict(reversed(list(fields().items())))) == m


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


def test_fetch_returns_verified_files(tmp_path, store):
    """fetch downloads every blob by role with the published bytes."""
    m, files = build(tmp_path, b"payload", fmt="megacache")
    publish(store, m, files)
    dest = tmp_path / "dl"
    dest.mkdir()
    got = fetch.fetch(store, m, dest)
    assert {r: p.read_bytes() for r, p in got.items()} == {
        "megacache": b"payload", "kernels": b"payloadk",
    }  # fmt: skip


def test_fetch_flipped_byte_is_integrity_error(tmp_path, store):
    """A stored blob with one flipped byte is refused and leaves no file in the dest dir."""
    m, files = build(tmp_path, b"payload bytes")
    publish(store, m, files)
    path = store.root / keys.blob_key(m.blobs[0].sha256)
    data = bytearray(path.read_bytes())
    data[3] ^= 0x01
    path.write_bytes(bytes(data))
    dest = tmp_path / "dl"
    dest.mkdir()
    with pytest.raises(IntegrityError, match="sha256"):
        fetch.fetch(store, m, dest)
    assert list(dest.iterdir()) == []


def test_fetch_truncated_blob_is_integrity_error(tmp_path, store):
    """A stored blob shorter than the manifest says is refused on its size."""
    m, files = build(tmp_path, b"payload bytes")
    publish(store, m, files)
    path = store.root / keys.blob_key(m.blobs[0].sha256)
    path.write_bytes(path.read_bytes()[:-1])
    dest = tmp_path / "dl"
    dest.mkdir()
    with pytest.raises(IntegrityError, match="size 12 != 13"):
        fetch.fetch(store, m, dest)
    assert list(dest.iterdir()) == []


def test_republish_repairs_damaged_blob(tmp_path, store):
    """Deleting the bad key and pushing again (what the IntegrityError advises) repairs it."""
    m, files = build(tmp_path, b"payload bytes")
    publish(store, m, files)
    path = store.root / keys.blob_key(m.blobs[0].sha256)
    path.write_bytes(b"damaged")
    dest = tmp_path / "bad"
    dest.mkdir()
    with pytest.raises(IntegrityError, match="delete that key, then push again"):
        fetch.fetch(store, m, dest)
    store.delete(keys.blob_key(m.blobs[0].sha256))
    publish(store, *build(tmp_path, b"payload bytes"))
    dest = tmp_path / "dl"
    dest.mkdir()
    assert fetch.fetch(store, m, dest)["cachedir"].read_bytes() == b"payload bytes"
