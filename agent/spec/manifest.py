"""The manifest: a small JSON document naming a workload's blobs for one fingerprint.

docs/format.md is the spec; this module and that page change together. Parsing is
strict: manifests come from an untrusted store, so anything unexpected is a
ManifestError with one line, never a traceback.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

from torchwarm.env import codeid, fingerprint
from torchwarm.errors import ManifestError, printable

FORMAT_VERSION = 1
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_KNOWN_FORMATS = ("cachedir", "megacache", "precompile")
_ROLES = {
    "cachedir": {"cachedir"},
    "megacache": {"megacache", "kernels"},
    "precompile": {"cachedir", "dynamo"},
}
MAX_MANIFEST_BYTES = 1 << 20
# Who wrote a manifest, which decides which keys may sign it (signing.check): a seed's
# warm-up, or a node that captured its app's own cache dir (node/selfseed.py).
SEED, NODE = "seed", "node"
PUBLISHERS = (SEED, NODE)


@dataclass(frozen=True)
class BlobRef:
    role: str
    sha256: str
    size: int
    media_type: str

    def to_dict(self) -> dict[str, Any]:
        return {
            "role": self.role,
            "sha256": self.sha256,
            "size": self.size,
            "media_type": self.media_type,
        }


@dataclass(frozen=True)
class Manifest:
    workload: str
    fingerprint: dict[str, Any]
    format: str
    blobs: tuple[BlobRef, ...]
    warmup: dict[str, Any] = field(default_factory=dict)
    created_at: str = ""
    created_by: str = ""
    serial: int = 0  # grows at each write of a key (publish.py); nodes refuse a lower one
    signature: dict[str, Any] | None = None
    publisher: str = SEED  # one of PUBLISHERS

    @property
    def fingerprint_digest(self) -> str:
        return fingerprint.digest(self.fingerprint)

    @property
    def size(self) -> int:
        return sum(b.size for b in self.blobs)

    def body(self) -> dict[str, Any]:
        """Everything but the signature: what a signature covers. `publisher` is written
        only when it is not the seed, so that a seed's manifest is what it was before the
        field existed (and verifies on older nodes)."""
        doc = {
            "format_version": FORMAT_VERSION,
            "workload": self.workload,
            "fingerprint_digest": self.fingerprint_digest,
            "fingerprint": self.fingerprint,
            "format": self.format,
            "blobs": [b.to_dict() for b in self.blobs],
            "warmup": self.warmup,
            "created_at": self.created_at,
            "created_by": self.created_by,
            "serial": self.serial,
        }
        if self.publisher != SEED:
            doc["publisher"] = self.publisher
        return doc

    def canonical_bytes(self) -> bytes:
        return fingerprint.canonical_json(self.body())

    def to_json(self) -> bytes:
        doc = self.body()
        doc["signature"] = self.signature
        return (json.dumps(doc, indent=2, sort_keys=True) + "\n").encode()

    def same_content(self, other: Manifest) -> bool:
        """Whether two manifests install the same bytes for the same environment and the
        same warm-up (so that a publisher may keep the older one). Signatures are not
        compared here: publish.py verifies the stored one with the publisher's key."""
        return (
            self.workload == other.workload
            and self.fingerprint == other.fingerprint
            and self.format == other.format
            and set(self.blobs) == set(other.blobs)
            and self.warmup.get("warmup_key") == other.warmup.get("warmup_key")
            and self.publisher == other.publisher
        )

    @property
    def signer(self) -> str | None:
        """The name of the key that signed this manifest (not verified here)."""
        return self.signature.get("key") if self.signature else None


def parse(data: bytes, where: str) -> Manifest:
    """Parse and validate manifest bytes read from `where` (a store key, for messages)."""

    def bad(what: str) -> ManifestError:
        return ManifestError(f"manifest {where}: {what}; refusing it (re-publish from the seed)")

    if len(data) > MAX_MANIFEST_BYTES:
        raise bad(f"is {len(data)} bytes, over the {MAX_MANIFEST_BYTES} limit")
    try:
        doc = json.loads(data)
    except (ValueError, UnicodeDecodeError, RecursionError) as e:
        raise bad(f"is not valid JSON ({type(e).__name__})") from None
    if not isinstance(doc, dict):
        raise bad("is not a JSON object")
    version = doc.get("format_version")
    if not isinstance(version, int) or isinstance(version, bool):
        raise bad("has no integer format_version")
    if version > FORMAT_VERSION:
        raise ManifestError(
            f"manifest {where}: format_version {version} is newer than this torchwarm "
            f"understands ({FORMAT_VERSION}); upgrade torchwarm on this node"
        )
    if version != FORMAT_VERSION:
        raise bad(f"has unsupported format_version {version}")

    def get(name: str, kind: type | tuple[type, ...]) -> Any:
        value = doc.get(name)
        if not isinstance(value, kind) or isinstance(value, bool) and kind is not bool:
            raise bad(f"field {name!r} is missing or not {_kind_name(kind)}")
        return value

    workload = get("workload", str)
    fp = get("fingerprint", dict)
    fmt = get("format", str)
    if fmt not in _KNOWN_FORMATS:
        raise bad(f"format {fmt!r} is unknown to this torchwarm")
    raw_blobs = get("blobs", list)
    blobs = tuple(_blob(b, i, bad) for i, b in enumerate(raw_blobs))
    roles = [b.role for b in blobs]
    if sorted(roles) != sorted(_ROLES[fmt]):
        raise bad(f"format {fmt!r} needs blobs {sorted(_ROLES[fmt])}, got {sorted(roles)}")
    claimed = get("fingerprint_digest", str)
    if fingerprint.digest(fp) != claimed:
        raise bad("fingerprint_digest does not match its fingerprint fields")
    warmup = get("warmup", dict)
    if fmt == "precompile":
        _check_precompile(warmup.get("precompile"), bad)
    serial = get("serial", int)
    if serial < 0:
        raise bad("field 'serial' is negative")
    signature = doc.get("signature")
    if signature is not None and not isinstance(signature, dict):
        raise bad("field 'signature' is not an object")
    publisher = doc.get("publisher", SEED)
    if publisher not in PUBLISHERS:
        raise bad(f"field 'publisher' is {printable(repr(publisher))[:40]}, not one of "
                  f"{', '.join(PUBLISHERS)}")  # fmt: skip
    return Manifest(
        workload=workload,
        fingerprint=fp,
        format=fmt,
        blobs=blobs,
        warmup=warmup,
        created_at=get("created_at", str),
        created_by=get("created_by", str),
        serial=serial,
        signature=signature,
        publisher=publisher,
    )


def _check_precompile(meta: Any, bad: Any) -> None:
    """warmup.precompile of a precompile manifest: the node decides from it (precompile.py).

    A scheme this reader does not know is left to that decision (which then leaves the
    entries out); the fields of schemes 1 and 2 must have their types. Scheme 2 adds
    `entries` (kept, dropped or unchecked, with `entries_reason` unless kept; no
    dynamo_keys unless kept) and a command's code identity (docs/format.md).
    """
    if not isinstance(meta, dict):
        raise bad("format 'precompile' needs an object warmup.precompile")
    scheme = meta.get("scheme")
    if not isinstance(scheme, int) or isinstance(scheme, bool):
        raise bad("warmup.precompile.scheme is not an integer")
    if scheme not in (1, 2):
        return
    ident = meta.get("code_identity")
    if scheme == 2 and isinstance(ident, dict) and ident.get("kind") == "command":
        _check_command_identity(ident, bad)
    elif (
        not isinstance(ident, dict)
        or not isinstance(ident.get("package"), str)
        or not isinstance(ident.get("sha256"), str)
        or not _SHA256.fullmatch(ident["sha256"])
        or not isinstance(ident.get("files"), int)
    ):
        raise bad("warmup.precompile.code_identity needs package, sha256 and files")
    if not isinstance(meta.get("workload_sha256"), str) or not _SHA256.fullmatch(
        meta["workload_sha256"]
    ):
        raise bad("warmup.precompile.workload_sha256 is not 64 lowercase hex digits")
    entries = meta.get("entries") if scheme == 2 else "kept"
    if entries not in ("kept", "dropped", "unchecked"):
        raise bad("warmup.precompile.entries is not one of kept, dropped, unchecked")
    if entries != "kept" and not isinstance(meta.get("entries_reason"), str):
        raise bad(f"warmup.precompile.entries is {entries}, without an entries_reason")
    keys = meta.get("dynamo_keys")
    if (
        not isinstance(keys, list)
        or (not keys) == (entries == "kept")
        or not all(isinstance(k, str) and _SHA256.fullmatch(k) for k in keys)
    ):
        raise bad(
            "warmup.precompile.dynamo_keys is not a non-empty list of sha256 keys"
            if entries == "kept"
            else f"warmup.precompile.dynamo_keys is not empty, with entries {entries}"
        )


def _check_command_identity(ident: dict[str, Any], bad: Any) -> None:
    """A command's code identity (codeid.command_identity): the node reads every field."""
    dists = ident.get("distributions")
    if (
        not isinstance(ident.get("code_sha256"), str)
        or not _SHA256.fullmatch(ident["code_sha256"])
        or not isinstance(ident.get("args"), list)
        or not all(isinstance(a, str) for a in ident["args"])
        or not isinstance(dists, list)
        or not all(
            isinstance(d, dict)
            and all(isinstance(d.get(k), str) for k in ("name", "version", "digest"))
            and isinstance(d.get("modules"), list)
            and all(isinstance(m, str) and codeid.MODULE_NAME.fullmatch(m) for m in d["modules"])
            for d in dists
        )
    ):
        raise bad(
            "warmup.precompile.code_identity of a command needs code_sha256, args and "
            "distributions (name, version, digest, modules)"
        )


def _blob(b: Any, i: int, bad: Any) -> BlobRef:
    if not isinstance(b, dict):
        raise bad(f"blobs[{i}] is not an object")
    role, sha, size, media = b.get("role"), b.get("sha256"), b.get("size"), b.get("media_type")
    if not isinstance(role, str) or not isinstance(media, str):
        raise bad(f"blobs[{i}] needs string 'role' and 'media_type'")
    if not isinstance(sha, str) or not _SHA256.fullmatch(sha):
        raise bad(f"blobs[{i}].sha256 is not 64 lowercase hex digits")
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        raise bad(f"blobs[{i}].size is not a non-negative integer")
    return BlobRef(role, sha, size, media)


def _kind_name(kind: type | tuple[type, ...]) -> str:
    names = {str: "a string", dict: "an object", list: "a list", int: "an integer"}
    return names.get(kind, str(kind)) if isinstance(kind, type) else "of the right type"
