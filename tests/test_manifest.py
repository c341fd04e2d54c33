"""manifest.parse is strict and one-line; spec/keys.py's key builders and parsers are inverses."""

from __future__ import annotations

import dataclasses
import json

import pytest
from factories import blob, fields, manifest
from hypothesis import Phase, example, given, settings
from hypothesis import strategies as st

from torchwarm.env import fingerprint
from torchwarm.errors import ManifestError
from torchwarm.spec import keys
from torchwarm.spec import manifest as mf

# No explain phase: it re-runs a failing example hundreds of times (~20 s).
PHASES = (Phase.explicit, Phase.reuse, Phase.generate, Phase.target, Phase.shrink)
WHERE = "manifests/v1/mlp/x.json"


def doc_of(m: mf.Manifest) -> dict:
    return json.loads(m.to_json())


def parse_error(doc_or_bytes) -> str:
    """The one-line message of the ManifestError that parsing raises."""
    data = doc_or_bytes if isinstance(doc_or_bytes, bytes) else json.dumps(doc_or_bytes).encode()
    with pytest.raises(ManifestError) as e:
        mf.parse(data, WHERE)
    msg = str(e.value)
    assert "\n" not in msg, msg
    assert WHERE in msg
    return msg


@pytest.mark.parametrize("fmt", ["cachedir", "megacache"])
def test_round_trip(fmt):
    """parse(to_json()) gives back an equal manifest, for both formats."""
    m = manifest(fmt=fmt, signature={"alg": "none"})
    assert mf.parse(m.to_json(), WHERE) == m


def test_canonical_bytes_independent_of_dict_order():
    """Two manifests with the same fingerprint in different key order have equal bytes."""
    reordered = dict(reversed(list(fields().items())))
    assert manifest().canonical_bytes() == manifest(fingerprint=reordered).canonical_bytes()


def test_canonical_bytes_exclude_signature():
    """A signature changes to_json but not canonical_bytes (what a signature covers)."""
    m = manifest()
    signed = dataclasses.replace(m, signature={"alg": "ed25519", "sig": "00"})
    assert signed.canonical_bytes() == m.canonical_bytes()
    assert b"signature" not in m.canonical_bytes()
    assert signed.to_json() != m.to_json()


def test_canonical_bytes_change_with_content():
    """Changing a blob changes canonical_bytes."""
    other = manifest(blobs=(blob("cachedir", b"other"),))
    assert other.canonical_bytes() != manifest().canonical_bytes()


def test_newer_format_version_says_upgrade():
    """A manifest from a newer torchwarm is refused with 'upgrade torchwarm'."""
    doc = doc_of(manifest())
    doc["format_version"] = mf.FORMAT_VERSION + 1
    assert "upgrade torchwarm" in parse_error(doc)


def test_older_format_version_refused():
    """A format_version below the current one is refused."""
    doc = doc_of(manifest())
    doc["format_version"] = 0
    assert "unsupported format_version 0" in parse_error(doc)


def test_not_json_refused():
    """Bytes that are not JSON are a ManifestError."""
    assert "is not valid JSON" in parse_error(b"\x89PNG not json")


def test_json_array_refused():
    """A JSON value that is not an object is a ManifestError."""
    assert "is not a JSON object" in parse_error(b"[1, 2]")


def test_deeply_nested_json_refused():
    """Deeply nested JSON under the size limit is a ManifestError, not a RecursionError."""
    parse_error(b"[" * 100_000)


def test_oversized_manifest_refused():
    """A manifest over MAX_MANIFEST_BYTES is refused before parsing."""
    assert "over the" in parse_error(b" " * (mf.MAX_MANIFEST_BYTES + 1))


def test_wrong_roles_for_format_refused():
    """A cachedir manifest naming a megacache blob is refused."""
    doc = doc_of(manifest())
    doc["blobs"][0]["role"] = "megacache"
    assert "needs blobs ['cachedir']" in parse_error(doc)


def test_missing_role_for_megacache_refused():
    """A megacache manifest without its kernels blob is refused."""
    doc = doc_of(manifest(fmt="megacache"))
    doc["blobs"] = [b for b in doc["blobs"] if b["role"] != "kernels"]
    assert "needs blobs" in parse_error(doc)


def test_unknown_format_refused():
    """An unknown format name is refused."""
    doc = doc_of(manifest())
    doc["format"] = "zipdir"
    assert "format 'zipdir' is unknown" in parse_error(doc)


def test_bad_sha256_refused():
    """An uppercase sha256 is not a sha256 here."""
    doc = doc_of(manifest())
    doc["blobs"][0]["sha256"] = doc["blobs"][0]["sha256"].upper()
    assert "blobs[0].sha256" in parse_error(doc)


def test_sha256_with_trailing_newline_refused():
    """A sha256 with a trailing newline is not 64 hex digits (a regex `$` must not let it in)."""
    doc = doc_of(manifest())
    doc["blobs"][0]["sha256"] += "\n"
    assert "blobs[0].sha256" in parse_error(doc)


def test_negative_size_refused():
    """A negative blob size is refused."""
    doc = doc_of(manifest())
    doc["blobs"][0]["size"] = -1
    assert "blobs[0].size" in parse_error(doc)


def test_boolean_size_refused():
    """A blob size of true is not an integer."""
    doc = doc_of(manifest())
    doc["blobs"][0]["size"] = True
    assert "blobs[0].size" in parse_error(doc)


def test_fingerprint_digest_mismatch_refused():
    """A fingerprint field edited without its digest is refused."""
    doc = doc_of(manifest())
    doc["fingerprint"]["cpu_vec_isa"] = "avx512"
    assert "fingerprint_digest does not match" in parse_error(doc)


def test_missing_field_refused():
    """A manifest without `workload` names the missing field."""
    doc = doc_of(manifest())
    del doc["workload"]
    assert "'workload' is missing" in parse_error(doc)


def test_signature_not_object_refused():
    """A signature that is a string is refused."""
    doc = doc_of(manifest())
    doc["signature"] = "trust me"
    assert "signature" in parse_error(doc)


def test_same_content_ignores_creation_details():
    """Manifests differing only in created_at/created_by/warmup have the same content."""
    a = manifest(created_at="2024-01-01T00:00:00Z", warmup={"x": 1})
    b = manifest(created_at="2025-01-01T00:00:00Z", created_by="other", warmup={})
    assert a.same_content(b)
    assert not a.same_content(manifest(fingerprint=fields(threads=4)))


_JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=10),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=20,
)
_FIELD_NAMES = st.sampled_from(list(doc_of(manifest()).keys()) + ["role", "sha256", "size"])


def _accepts_or_manifest_error(data: bytes) -> None:
    try:
        m = mf.parse(data, WHERE)
    except ManifestError as e:
        assert "\n" not in str(e)
    else:
        assert isinstance(m, mf.Manifest)


@settings(max_examples=200, deadline=None, database=None, phases=PHASES)
@given(data=st.binary(max_size=300))
@example(data=b"[" * 100_000)  # deep nesting under the size limit
def test_arbitrary_bytes_parse_or_manifest_error(data):
    """Any bytes give a Manifest or a ManifestError, nothing else."""
    _accepts_or_manifest_error(data)


@settings(max_examples=100, deadline=None, database=None, phases=PHASES)
@given(doc=st.dictionaries(st.text(max_size=8) | _FIELD_NAMES, _JSON, max_size=8))
def test_arbitrary_json_object_parse_or_manifest_error(doc):
    """Any JSON object gives a Manifest or a ManifestError, nothing else."""
    _accepts_or_manifest_error(json.dumps(doc).encode())


@settings(max_examples=200, deadline=None, database=None, phases=PHASES)
@given(name=_FIELD_NAMES, value=_JSON, in_blob=st.booleans())
def test_mutated_valid_manifest_parse_or_manifest_error(name, value, in_blob):
    """A valid manifest with one field replaced by any JSON gives Manifest or ManifestError."""
    doc = doc_of(manifest(fmt="megacache"))
    (doc["blobs"][0] if in_blob else doc)[name] = value
    _accepts_or_manifest_error(json.dumps(doc).encode())


# spec/keys.py

_HEX64 = st.text("0123456789abcdef", min_size=64, max_size=64)
_HEX32 = st.text("0123456789abcdef", min_size=32, max_size=32)
_NAMES = st.from_regex(r"\A[A-Za-z0-9][A-Za-z0-9._-]{0,63}\Z")


@settings(deadline=None, database=None, phases=PHASES)
@given(sha=_HEX64)
def test_blob_key_round_trip(sha):
    """parse_blob_key inverts blob_key."""
    key = keys.blob_key(sha)
    assert key == f"blobs/sha256/{sha[:2]}/{sha}"
    assert keys.parse_blob_key(key) == sha


@settings(deadline=None, database=None, phases=PHASES)
@given(workload=_NAMES, digest=_HEX32)
def test_manifest_key_round_trip(workload, digest):
    """parse_manifest_key inverts manifest_key for every valid workload name."""
    assert keys.parse_manifest_key(keys.manifest_key(workload, digest)) == (workload, digest)


def test_manifest_key_of_a_real_manifest():
    """A manifest's key embeds its fingerprint digest."""
    m = manifest()
    key = keys.manifest_key(m.workload, m.fingerprint_digest)
    assert key == f"manifests/v1/mlp/{fingerprint.digest(fields())}.json"


@pytest.mark.parametrize("bad", ["", "ab", "A" * 64, "g" * 64, "a" * 63, "a" * 65, "a" * 64 + "\n"])
def test_blob_key_rejects_malformed_digest(bad):
    """blob_key refuses anything but 64 lowercase hex digits."""
    with pytest.raises(ValueError):
        keys.blob_key(bad)


@pytest.mark.parametrize("bad", ["", "a" * 31, "a" * 33, "A" * 32, "a" * 64, "a" * 32 + "\n"])
def test_manifest_key_rejects_malformed_digest(bad):
    """manifest_key refuses anything but 32 lowercase hex digits."""
    with pytest.raises(ValueError):
        keys.manifest_key("mlp", bad)


@pytest.mark.parametrize(
    "key",
    [
        "blobs/sha256/ab/" + "cd" * 32,  # head does not match the digest
        "blobs/sha256/" + "ab" * 32,  # no fan-out folder
        "blobs/sha256/ab/" + "ab" * 31,  # short
        "blobs/md5/ab/" + "ab" * 32,
        "manifests/v1/mlp/" + "a" * 32 + ".json",
    ],
)
def test_parse_blob_key_rejects_other_keys(key):
    """parse_blob_key returns None for anything that is not a well-formed blob key."""
    assert keys.parse_blob_key(key) is None


@pytest.mark.parametrize(
    "key",
    [
        "manifests/v1/mlp/" + "a" * 31 + ".json",
        "manifests/v1/mlp/" + "a" * 32,
        "manifests/v2/mlp/" + "a" * 32 + ".json",
        "manifests/v1/a/b/" + "a" * 32 + ".json",
        "manifests/v1/../" + "a" * 32 + ".json",
        "blobs/sha256/ab/" + "ab" * 32,
    ],
)
def test_parse_manifest_key_rejects_other_keys(key):
    """parse_manifest_key returns None for anything that is not a well-formed manifest key."""
    assert keys.parse_manifest_key(key) is None
