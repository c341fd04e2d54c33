"""ed25519 signatures over manifests, with Nix-style named keys (`name-1:base64`).

A seed signs the manifest's canonical bytes (manifest.canonical_bytes: every field but
the signature, so every blob's sha256 and size and the serial are covered). A node that
has trusted keys refuses a manifest that is unsigned, signed by a key it does not
trust, or whose signature does not verify, in fail-open mode too. Several trusted keys
may be configured at once, which is how keys are rotated (docs/security.md).
"""

from __future__ import annotations

import base64
import binascii
import ctypes
import logging
import os
import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

from torchwarm.errors import ConfigError, IntegrityError, RefusedNodePublish
from torchwarm.spec.manifest import NODE, Manifest

# cryptography is imported where a key is used: a node without trusted keys never loads it.
if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import (
        Ed25519PrivateKey,
        Ed25519PublicKey,
    )

log = logging.getLogger(__name__)

ALGORITHM = "ed25519"
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


@dataclass(frozen=True)
class SigningKey:
    name: str
    key: Ed25519PrivateKey

    def public_raw(self) -> bytes:
        """The public key's 32 bytes (what compares keys whatever their names)."""
        return self.key.public_key().public_bytes_raw()

    def public_text(self) -> str:
        return f"{self.name}:{base64.b64encode(self.public_raw()).decode()}"


@dataclass(frozen=True)
class TrustedKeys:
    keys: dict[str, Ed25519PublicKey]

    def __bool__(self) -> bool:
        return bool(self.keys)


def generate(name: str) -> tuple[str, str]:
    """A new key pair as (secret text, public text), both `name:base64`."""
    if not _NAME.fullmatch(name):
        raise ConfigError(f"key name {name!r}: use letters, digits, '.', '_', '-', e.g. seed-1")
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    key = Ed25519PrivateKey.generate()
    secret = base64.b64encode(key.private_bytes_raw()).decode()
    return f"{name}:{secret}", SigningKey(name, key).public_text()


def _split(text: str, where: str, size: int) -> tuple[str, bytes]:
    name, sep, b64 = text.strip().partition(":")
    try:
        raw = base64.b64decode(b64, validate=True)
    except (binascii.Error, ValueError):
        raw = b""
    if not sep or not _NAME.fullmatch(name) or len(raw) != size:
        raise ConfigError(
            f"{where}: not an ed25519 key of the form name:base64 ({size} bytes); "
            "make one with `torchwarm keygen NAME`"
        )
    return name, raw


def load_secret(text: str, where: str) -> SigningKey:
    """The secret key in `text`; from here on this process is not dumpable (hold_secret)."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    name, raw = _split(text, where, 32)
    hold_secret()
    return SigningKey(name, Ed25519PrivateKey.from_private_bytes(raw))


_PR_SET_DUMPABLE = 4


def hold_secret() -> None:
    """Make this process non-dumpable, as a process holding a signing key must be: its
    /proc files (environ, mem, root) then belong to root, so another process of the same
    user (the app that `torchwarm run --publish` starts, an app beside the sidecar) cannot
    read the key out of it. Children that exec are dumpable again, so the app is not
    affected. Where prctl is missing (not Linux) the key is as exposed as its file."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(_PR_SET_DUMPABLE, 0, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), os.strerror(ctypes.get_errno()))
    except (OSError, AttributeError) as e:
        log.warning("cannot make this process non-dumpable (%s): a process of the same "
                    "user may read the signing key from it", e)  # fmt: skip


def load_secret_file(path: Path) -> SigningKey:
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"signing key file {path}: cannot read it ({e})") from None
    return load_secret(text, f"signing key file {path}")


def load_trusted(texts: list[str], where: str) -> TrustedKeys:
    if not texts:
        return TrustedKeys({})
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    keys = {}
    for i, text in enumerate(texts):
        name, raw = _split(text, f"{where}[{i}]", 32)
        keys[name] = Ed25519PublicKey.from_public_bytes(raw)
    return TrustedKeys(keys)


def sign(m: Manifest, key: SigningKey) -> Manifest:
    sig = key.key.sign(m.canonical_bytes())
    return replace(
        m,
        signature={
            "algorithm": ALGORITHM,
            "key": key.name,
            "value": base64.b64encode(sig).decode(),
        },
    )


def check(m: Manifest, trusted: TrustedKeys, trusted_node: TrustedKeys, where: str) -> None:
    """Raise IntegrityError unless this node may take `m`, by who published it: a seed's
    manifest is verified with the seed keys when this node has any (none: unsigned is
    taken, as before node publishes existed); a node's only with the node keys, and never
    without them, whatever the seed keys. A node key cannot pass as a seed's: a manifest
    that says `publisher: seed` is checked against the seed keys alone."""
    if m.publisher == NODE:
        if not trusted_node:
            raise RefusedNodePublish(
                f"manifest {where}: it was published by a node (signed by "
                f"{m.signer or 'no key'!r}), and this node trusts no node publishes "
                "(trusted_node_keys is not set); refusing it",
                m.serial,
            )
        try:
            verify(m, trusted_node, where, "trusted_node_keys")
        except IntegrityError as e:
            raise RefusedNodePublish(str(e), m.serial) from None
    elif trusted:
        verify(m, trusted, where)


def verify(m: Manifest, trusted: TrustedKeys, where: str, setting: str = "trusted_keys") -> None:
    """Raise IntegrityError unless `m` carries a valid signature by a trusted key."""

    def refuse(why: str) -> IntegrityError:
        return IntegrityError(f"manifest {where}: {why}; refusing it")

    sig = m.signature
    if not sig:
        raise refuse(f"it is unsigned and this node requires signatures ({setting} is set)")
    name, value = sig.get("key"), sig.get("value")
    if sig.get("algorithm") != ALGORITHM or not isinstance(name, str) or not isinstance(value, str):
        raise refuse(f"its signature is not an {ALGORITHM} signature with a key name")
    from cryptography.exceptions import InvalidSignature

    public = trusted.keys.get(name)
    if public is None:
        known = ", ".join(sorted(trusted.keys))
        raise refuse(f"it is signed by {name!r}, which is not a trusted key ({setting}: {known})")
    try:
        public.verify(base64.b64decode(value, validate=True), m.canonical_bytes())
    except (InvalidSignature, binascii.Error, ValueError):
        raise refuse(f"its signature by {name!r} does not match its content") from None
