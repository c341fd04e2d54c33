"""The key tree in the store, in one place (docs/format.md is its spec).

blobs/sha256/<first 2 hex>/<64 hex>          content-addressed blob
manifests/v1/<workload>/<fingerprint>.json   one manifest per workload and environment
"""

from __future__ import annotations

import re

BLOBS = "blobs/sha256/"
MANIFESTS = "manifests/v1/"
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_WORKLOAD = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_FP = re.compile(r"^[0-9a-f]{32}$")
_MANIFEST = re.compile(r"^manifests/v1/([A-Za-z0-9][A-Za-z0-9._-]{0,63})/([0-9a-f]{32})\.json$")


def blob_key(sha256: str) -> str:
    if not _SHA256.fullmatch(sha256):
        raise ValueError(f"not a sha256 hex digest: {sha256!r}")
    return f"{BLOBS}{sha256[:2]}/{sha256}"


def manifest_key(workload: str, fingerprint_digest: str) -> str:
    if not _WORKLOAD.fullmatch(workload):
        raise ValueError(f"not a workload name: {workload!r}")
    if not _FP.fullmatch(fingerprint_digest):
        raise ValueError(f"not a fingerprint digest: {fingerprint_digest!r}")
    return f"{MANIFESTS}{workload}/{fingerprint_digest}.json"


def workload_prefix(workload: str) -> str:
    return f"{MANIFESTS}{workload}/"


def parse_manifest_key(key: str) -> tuple[str, str] | None:
    """(workload, fingerprint digest) for a manifest key; None for any other key."""
    m = _MANIFEST.fullmatch(key)
    return (m.group(1), m.group(2)) if m else None


def parse_blob_key(key: str) -> str | None:
    """The sha256 a blob key names; None for any other key."""
    if not key.startswith(BLOBS):
        return None
    rest = key[len(BLOBS) :]
    head, _, digest = rest.partition("/")
    return digest if _SHA256.fullmatch(digest) and head == digest[:2] else None
